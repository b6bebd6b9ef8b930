"""Dataset adapters: find the labelled cases of a public dataset layout and read them.

Each adapter knows one layout on disk and the label codes of its annotations; it hands out
`Case` records (paths only, cheap to list) and reads a case into canonical `Volume`s whose
label array holds class indices 0..C-1 in the order of `Adapter.classes`. Datasets whose
CT and MR parts come from different collections (BTCV + CHAOS) map onto one class list, so
the two modalities share a label space, which the shared network and the distillation loss
need.

`base` holds what the layouts share (`Case`, `Adapter`, label mapping, listing helpers),
`registry` finds an adapter by name; one module per dataset family registers its adapters
when this package is imported: `mmwhs`, `abdominal` (BTCV + CHAOS), `folder` (nnU-Net
style), `amos` (AMOS22) and `totalseg` (a mask file per structure).
"""

from ukd.data.adapters import abdominal, amos, folder, mmwhs, totalseg  # noqa: F401  (they register)
from ukd.data.adapters.base import Adapter, Case, map_labels
from ukd.data.adapters.registry import get_adapter, register

__all__ = ["Adapter", "Case", "get_adapter", "map_labels", "register"]
