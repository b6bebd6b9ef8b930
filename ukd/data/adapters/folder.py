"""nnU-Net style folders (imagesTr / labelsTr / dataset.json, one per modality): `folder`."""

from __future__ import annotations

import json
import os
import re

from etils import epath

from ukd.data import lateral
from ukd.data.adapters.base import Adapter, Case, pair_cases, require_dir, require_root, visible
from ukd.data.adapters.registry import register
from ukd.data.io.volumes import Volume
from ukd.errors import DataError, error


def read_dataset_json(path: str) -> tuple[tuple[str, ...], str]:
  """Class names (by index) and file ending from an nnU-Net v1 or v2 dataset.json."""
  try:
    with epath.Path(path).open() as f:
      meta = json.load(f)
    labels = meta["labels"]
  except (OSError, ValueError, KeyError, TypeError) as exc:
    problem = f"cannot read dataset.json labels ({type(exc).__name__}: {exc})"
    raise error(DataError, path, problem) from exc
  if not isinstance(labels, dict) or not labels:
    raise error(DataError, path, "'labels' must be a non-empty mapping")
  if all(str(key).isdigit() for key in labels):  # v1: {"0": "background", ...}
    by_index = {int(key): str(name) for key, name in labels.items()}
  else:  # v2: {"background": 0, ...}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
      raise error(
        DataError, path, "label values must be integers (region-based labels unsupported)"
      )
    by_index = {int(index): str(name) for name, index in labels.items()}
  if sorted(by_index) != list(range(len(by_index))) or len(by_index) != len(labels):
    raise error(
      DataError, path, f"label indices must be 0..C-1 without gaps, got {sorted(by_index)}"
    )
  classes = tuple(by_index[i] for i in range(len(by_index)))
  if classes[0] != "background":
    raise error(DataError, path, f"label 0 must be 'background', got '{classes[0]}'")
  return classes, str(meta.get("file_ending", ".nii.gz"))


@register("folder")
class FolderAdapter(Adapter):
  """nnU-Net style folders, one per modality: imagesTr/<case>_0000<ext>, labelsTr/<case><ext>.

  `modalities` maps a modality name to its folder (absolute or relative to the root).
  Class names come from each folder's dataset.json, and the folders may label different
  structures (BTCV-like CT with 13 organs, CHAOS-like MR with 4): classes are matched by
  name, and the network's classes are their union, background first, then the first
  modality's classes in its dataset.json order, then each next modality's new names in its
  order; modalities come in the order of their names, since a config keeps its options'
  keys sorted.  Each modality's label codes are its own dataset.json indices, and it holds
  only its own names (`labelled`).  All this is known after `cases(root)`.
  """

  def __init__(self, *, modalities: dict[str, str], ignore_unknown_labels: bool = False):
    super().__init__(ignore_unknown_labels=ignore_unknown_labels)
    if not isinstance(modalities, dict) or not modalities:
      raise error(
        DataError, f"folder option modalities={modalities!r}", "must map modality names to folders"
      )
    self.modalities = dict(sorted(modalities.items()))
    self._held: dict[str, tuple[str, ...]] | None = None  # {modality: its dataset.json names}

  @property
  def classes(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys(name for names in self._names().values() for name in names))

  @property
  def phantom_options(self) -> dict:
    """Phantoms in this layout go to the folders it reads (`generate.write_folder`)."""
    return {"folders": dict(self.modalities)}

  @property
  def lateral_pairs(self) -> tuple[tuple[str, str], ...]:
    """Pairs by name (`kidney_left` / `kidney_right`): a folder dataset names its own classes."""
    return lateral.pairs_by_name(self.classes)

  def _names(self) -> dict[str, tuple[str, ...]]:
    if self._held is None:
      raise DataError("folder dataset: class names come from dataset.json; call cases(root) first")
    return self._held

  def labelled(self, modality: str) -> tuple[str, ...]:
    return self._names()[modality]

  def code_table(self, modality: str) -> dict[int, int]:
    union = self.classes
    return {code: union.index(name) for code, name in enumerate(self._names()[modality])}

  def cases(self, root: str) -> list[Case]:
    root = require_root(root)
    cases, held = [], {}
    for modality, folder in self.modalities.items():
      folder = os.path.join(root, os.fspath(folder))
      require_dir(folder, f"{modality} dataset folder")
      held[modality], ending = read_dataset_json(os.path.join(folder, "dataset.json"))
      cases += _folder_cases(folder, modality, ending)
    self._held = held
    return cases

  def read(self, case: Case) -> tuple[Volume, Volume | None]:
    return self._read_nifti(case)  # codes are the modality's dataset.json indices


def _folder_cases(folder: str, modality: str, ending: str) -> list[Case]:
  """Pair imagesTr/<case>_0000 with labelsTr/<case>; other channels are not supported."""
  image_dir = require_dir(os.path.join(folder, "imagesTr"), "imagesTr folder")
  label_dir = require_dir(os.path.join(folder, "labelsTr"), "labelsTr folder")
  images, labels = {}, {}
  for name in visible(image_dir):
    match = re.fullmatch(r"(.+)_(\d{4})" + re.escape(ending), name)
    if match is None:
      raise error(DataError, os.path.join(image_dir, name), f"expected <case>_0000{ending}")
    if match.group(2) != "0000":
      raise error(
        DataError, os.path.join(image_dir, name), "only single-channel cases (_0000) are supported"
      )
    images[match.group(1)] = os.path.join(image_dir, name)
  for name in visible(label_dir):
    if not name.endswith(ending):
      raise error(DataError, os.path.join(label_dir, name), f"expected <case>{ending}")
    labels[name[: -len(ending)]] = os.path.join(label_dir, name)
  return pair_cases(images, labels, modality, folder, lambda key: key)
