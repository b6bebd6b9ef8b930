"""MM-WHS 2017 (cardiac CT and MR): the `mmwhs` adapter."""

from __future__ import annotations

import os

from ukd.data.adapters.base import (
  Adapter,
  Case,
  check_modalities,
  match_files,
  pair_cases,
  require_dir,
  require_root,
)
from ukd.data.adapters.registry import register
from ukd.data.io.volumes import Volume

# The four structures used by Dou et al.; the other annotated structures (550 RV cavity,
# 600 RA cavity, 850 pulmonary artery) become background. Code 421 (seen as a left-atrium
# variant in some copies) is deliberately not listed: it is not in the official code table,
# so it is reported instead of guessed.
MMWHS_CODES = {0: 0, 205: 1, 420: 2, 500: 3, 820: 4, 550: 0, 600: 0, 850: 0}


@register("mmwhs")
class MMWHSAdapter(Adapter):
  """MM-WHS 2017 as distributed: <root>/{ct,mr}_train/<mod>_train_<n>_{image,label}.nii.gz."""

  classes = ("background", "MYO", "LAC", "LVC", "AA")
  lateral_pairs = ()  # the heart's left and right chambers are no mirror images

  def __init__(self, *, modalities=("ct", "mr"), ignore_unknown_labels: bool = False):
    super().__init__(ignore_unknown_labels=ignore_unknown_labels)
    self.modalities = check_modalities(modalities, ("ct", "mr"), "mmwhs")

  def cases(self, root: str) -> list[Case]:
    root = require_root(root)
    return [case for m in self.modalities for case in _mmwhs_cases(root, m)]

  def code_table(self, modality: str) -> dict[int, int]:
    return MMWHS_CODES

  def read(self, case: Case) -> tuple[Volume, Volume | None]:
    return self._read_nifti(case)


def _mmwhs_cases(root: str, modality: str) -> list[Case]:
  """MM-WHS keeps image and label side by side, told apart by the _image/_label suffix."""
  folder = require_dir(os.path.join(root, f"{modality}_train"), f"{modality} training folder")
  files = match_files(folder, r"(.+_(?:image|label))")
  images = {k[: -len("_image")]: p for k, p in files.items() if k.endswith("_image")}
  labels = {k[: -len("_label")]: p for k, p in files.items() if k.endswith("_label")}
  return pair_cases(images, labels, modality, folder, lambda key: key)
