"""AMOS22 (abdominal CT and MR in one folder): the `amos` adapter.

AMOS22 ships as one nnU-Net-like folder for both modalities:

  <root>/dataset.json
  <root>/imagesTr/amos_0001.nii.gz   <root>/labelsTr/amos_0001.nii.gz
  <root>/imagesVa/...                <root>/labelsVa/...      (validation, labelled)
  <root>/imagesTs/...                                         (test, unlabelled: not read)

Nothing in a file says its modality; the case number does.  The AMOS22 readme: "id numbers
less than 500 belong to CT data, otherwise they belong to MRI data" -- amos_0001..amos_0499
are CT, amos_0500 and up MR (the released MR cases are numbered 507-600).  Images may also
carry nnU-Net's channel suffix (amos_0001_0000.nii.gz), as converted copies do.

Labels use AMOS's 15 organ codes (`AMOS_CLASSES`, code = class index) in both modalities.
"""

from __future__ import annotations

import os

from etils import epath

from ukd.data.adapters.base import (
  Adapter,
  Case,
  check_modalities,
  match_files,
  pair_cases,
  require_dir,
  require_root,
)
from ukd.data.adapters.folder import read_dataset_json
from ukd.data.adapters.registry import register
from ukd.data.io.volumes import Volume
from ukd.errors import DataError, error

# AMOS22's label codes 0..15, in order (its dataset.json spells aorta 'arota' and writes
# 'gall bladder', 'postcava' for the inferior vena cava and 'prostate/uterus').
AMOS_CLASSES = (
  "background",
  "spleen",
  "right_kidney",
  "left_kidney",
  "gall_bladder",
  "esophagus",
  "liver",
  "stomach",
  "aorta",
  "postcava",
  "pancreas",
  "right_adrenal_gland",
  "left_adrenal_gland",
  "duodenum",
  "bladder",
  "prostate_uterus",
)

# Case numbers from here on are MR, below it CT (the AMOS22 readme).
FIRST_MR = 500

# Labelled parts of the release: training and validation.  imagesTs has no labels.
_PARTS = ("Tr", "Va")


def modality_of(number: int) -> str:
  """'ct' for AMOS case numbers below 500, 'mr' from 500 on."""
  return "ct" if number < FIRST_MR else "mr"


@register("amos")
class AmosAdapter(Adapter):
  """AMOS22 CT and MR from one folder, told apart by case number (see the module docstring)."""

  classes = AMOS_CLASSES
  lateral_pairs = (
    ("left_kidney", "right_kidney"),
    ("left_adrenal_gland", "right_adrenal_gland"),
  )

  def __init__(self, *, modalities=("ct", "mr"), ignore_unknown_labels: bool = False):
    super().__init__(ignore_unknown_labels=ignore_unknown_labels)
    self.modalities = check_modalities(modalities, ("ct", "mr"), "amos")

  def cases(self, root: str) -> list[Case]:
    root = require_root(root)
    meta = os.path.join(root, "dataset.json")
    found, _ = read_dataset_json(meta)
    if len(found) != len(AMOS_CLASSES):
      raise error(
        DataError, meta, f"{len(found)} labels; AMOS22 has background and 15 organs (codes 0-15)"
      )
    images, labels = _labelled_files(root)
    cases = []
    for modality in self.modalities:
      mine = {k for k in {**images, **labels} if modality_of(int(k)) == modality}
      cases += pair_cases(
        {k: p for k, p in images.items() if k in mine},
        {k: p for k, p in labels.items() if k in mine},
        modality,
        root,
        lambda key: f"amos_{key}",
      )
    return cases

  def read(self, case: Case) -> tuple[Volume, Volume | None]:
    return self._read_nifti(case)  # codes are the class indices


def _labelled_files(root: str) -> tuple[dict[str, str], dict[str, str]]:
  """{case number: path} of the images and of the labels of imagesTr/labelsTr and, where the
  release has them, imagesVa/labelsVa; a case number in both parts is an error."""
  images, labels = {}, {}
  for part in _PARTS:
    image_dir = os.path.join(root, f"images{part}")
    if part != "Tr" and not epath.Path(image_dir).is_dir():
      continue
    require_dir(image_dir, f"AMOS images{part} folder")
    label_dir = require_dir(os.path.join(root, f"labels{part}"), f"AMOS labels{part} folder")
    for found, folder, pattern in (
      (images, image_dir, r"amos_(\d{4})(?:_0000)?"),
      (labels, label_dir, r"amos_(\d{4})"),
    ):
      for key, path in match_files(folder, pattern).items():
        if key in found:
          raise error(DataError, path, f"same case as {found[key]}")
        found[key] = path
  return images, labels
