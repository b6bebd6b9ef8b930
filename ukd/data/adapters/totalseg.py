"""One binary mask file per structure (TotalSegmentator's layout): the `totalseg` adapter.

  <root>/<case>/ct.nii.gz   or   <root>/<case>/mri.nii.gz
  <root>/<case>/segmentations/<structure>.nii.gz      0/1 masks on the image's grid

TotalSegmentator's CT and MR releases (117 and 50 structures) and many hospital exports store
labels this way.  Which structures to train is the config's choice (`data.structures`, e.g.
'liver,spleen,kidney_left,kidney_right'): class k is the k-th structure named, background 0,
and predictions are written with those class indices.  Files of other structures are not
read.  Masks may not overlap: a voxel of two structures would need two classes, and which one
wins cannot be guessed, so an overlap is a one-line error naming both files.  Structures named
`*_left` / `*_right` (TotalSegmentator's convention) form the left/right pairs.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
from etils import epath

from ukd.data import lateral
from ukd.data.adapters.base import Adapter, Case, check_modalities, require_root, visible
from ukd.data.adapters.registry import register
from ukd.data.io.volumes import Volume, read_image, read_label
from ukd.errors import DataError, error

# The image file of a case, by modality.
IMAGE_FILES = {"ct": "ct.nii.gz", "mr": "mri.nii.gz"}
MASK_FOLDER = "segmentations"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def structure_list(structures) -> tuple[str, ...]:
  """`data.structures` ('liver,spleen' or a sequence) as names of mask files, checked."""
  if isinstance(structures, str):
    structures = structures.split(",")
  names = tuple(str(name).strip() for name in structures)
  where = f"totalseg option structures={','.join(names)!r}"
  if not names or names == ("",):
    raise error(DataError, where, "name the structures to train, e.g. data.structures='liver'")
  for name in names:
    if not _NAME.fullmatch(name) or name == "background":
      raise error(DataError, where, f"{name!r} is not a structure file name")
  if len(set(names)) != len(names):
    raise error(DataError, where, "a structure is named twice")
  return names


@register("totalseg")
class TotalSegAdapter(Adapter):
  """Per-structure masks (see the module docstring); `structures` picks and orders the classes."""

  def __init__(
    self, *, structures=(), modalities=("ct", "mr"), ignore_unknown_labels: bool = False
  ):
    super().__init__(ignore_unknown_labels=ignore_unknown_labels)
    self.structures = structure_list(structures)
    self.classes = ("background", *self.structures)
    self.lateral_pairs = lateral.pairs_by_name(self.structures)
    self.modalities = check_modalities(modalities, tuple(IMAGE_FILES), "totalseg")

  def cases(self, root: str) -> list[Case]:
    root = require_root(root)
    cases = []
    for name in visible(root):
      folder = os.path.join(root, name)
      if not epath.Path(folder).is_dir():
        continue  # meta.csv and the like
      found = [m for m, file in IMAGE_FILES.items() if epath.Path(folder, file).exists()]
      if len(found) != 1:
        images = " or ".join(IMAGE_FILES.values())
        problem = f"holds both {images}" if found else f"holds no {images}"
        raise error(DataError, folder, problem)
      (modality,) = found
      if modality in self.modalities:
        image = os.path.join(folder, IMAGE_FILES[modality])
        cases.append(Case(name, modality, image, os.path.join(folder, MASK_FOLDER)))
    for modality in self.modalities:
      if not any(case.modality == modality for case in cases):
        raise error(DataError, root, f"no {modality} cases (<case>/{IMAGE_FILES[modality]})")
    return cases

  def read(self, case: Case) -> tuple[Volume, Volume | None]:
    image = read_image(case.image)
    label = np.zeros(image.array.shape, np.int32)
    paths = []
    for index, structure in enumerate(self.structures, start=1):
      path = os.path.join(case.label, f"{structure}.nii.gz")
      if not epath.Path(path).exists():
        raise error(DataError, path, f"structure mask missing (data.structures names {structure})")
      mask = read_label(path, like=image).array
      if not np.isin(mask, (0, 1)).all():
        raise error(DataError, path, f"not a binary mask: values {np.unique(mask)[:5].tolist()}")
      taken = (mask == 1) & (label > 0)
      if taken.any():
        other = paths[label[taken][0] - 1]
        raise error(DataError, path, f"overlaps {other} in {int(taken.sum())} voxels")
      label[mask == 1] = index
      paths.append(path)
    return image, dataclasses.replace(image, array=label, source=case.label)
