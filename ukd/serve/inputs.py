"""What one `--input` of a prediction holds: NIfTI files, DICOM series or a dataset's layout.

`find_inputs(path)` turns what a user points at into the cases to predict, each with the
name its outputs get:

  * a NIfTI file, or a folder of them (the folder itself, not below it: an output folder
    inside it is not read back as input);
  * a dataset folder where labels sit beside the images: MM-WHS `<case>_image.nii.gz` with
    `<case>_label.nii.gz`, an nnU-Net dataset (`imagesTr/`, `imagesTs/` with `labelsTr/`,
    `labelsTs/`), CHAOS `DICOM_anon/` with `Ground/` PNG masks. Only the images are read; the
    label files are counted, so the user sees they were left out on purpose;
  * a folder holding DICOM series, searched through (one series, a study, a PACS export or a
    CD copy), a .zip of one, or a single DICOM file: each series is a case
    (`ukd.data.io.dicom_series`).

A folder with NIfTI files is read as NIfTI, one without as DICOM. A case's output name is
what its label would be called: a NIfTI file's name without its extension and the image
suffix a dataset gives it (nnU-Net `case_0000`, MM-WHS `case_image`: `case`); a series the
name `find_series` gives it.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re

from ukd import files
from ukd.data.io import dicom_series
from ukd.errors import DataError, error

_NIFTI = re.compile(r"\.nii(\.gz)?$")
# The suffix a dataset gives a case's image (nnU-Net's single channel, MM-WHS) and not its label.
_IMAGE_SUFFIX = re.compile(r"_(0000|image)$")
_LABEL_SUFFIX = re.compile(r"_label\.nii(\.gz)?$")  # MM-WHS: beside `<case>_image`
# nnU-Net dataset folders: images and their labels.
_NNUNET_IMAGES, _NNUNET_LABELS = ("imagesTr", "imagesTs"), ("labelsTr", "labelsTs")
_CHAOS_MASKS = "Ground"  # CHAOS: PNG masks beside the DICOM_anon folder of a series


@dataclasses.dataclass(frozen=True)
class Case:
  """One volume to predict: a NIfTI file (`path`) or a DICOM series (`series`)."""

  name: str  # outputs are `<name>.nii.gz`, `<name>.json`...
  source: str  # how messages name it
  path: str | None = None
  series: dicom_series.Series | None = None


@dataclasses.dataclass(frozen=True)
class Inputs:
  """The cases of one input and what was left out: label files of a dataset's layout."""

  cases: list[Case]
  skipped_labels: int = 0
  label_kind: str = ""  # which label files, e.g. '*_label.nii.gz'


def output_name(path) -> str:
  """`case_0000.nii.gz`, `case_image.nii.gz` -> `case`: the name of the case's label."""
  return _IMAGE_SUFFIX.sub("", _NIFTI.sub("", os.path.basename(os.fspath(path))))


def is_nifti(path) -> bool:
  return _NIFTI.search(os.fspath(path)) is not None


def _nifti_case(path: str) -> Case:
  return Case(output_name(path), path, path=path)


def _niftis(folder: str) -> list[str]:
  """The folder's own .nii/.nii.gz files (not below it), sorted."""
  entries = files.Path(folder).iterdir() if files.Path(folder).is_dir() else []
  names = sorted(e.name for e in entries if is_nifti(e.name) and not e.name.startswith("."))
  return [os.path.join(folder, name) for name in names]


def find_inputs(path, extract_to: str | None = None, exclude=None) -> Inputs:
  """The cases under `path` (module docstring); `extract_to` is where a .zip is unpacked
  (a temporary folder by default). DICOM series whose files all lie under `exclude` (the
  output folder) are left out: a SEG written into the input tree is no input."""
  path = os.fspath(path)
  where = files.Path(path)
  if where.is_file():
    if is_nifti(path):
      return Inputs([_nifti_case(path)])
    if path.lower().endswith(".zip") or dicom_series.is_dicom_file(path):
      return _dicom(path, extract_to, exclude)
    raise error(
      DataError, path, "not a NIfTI file (.nii, .nii.gz), a DICOM file, a folder or a .zip"
    )
  if not where.is_dir():
    raise error(DataError, path, "input not found")
  layout = [os.path.join(path, d) for d in _NNUNET_IMAGES if (where / d).is_dir()]
  if layout:
    labels = sum(len(_niftis(os.path.join(path, d))) for d in _NNUNET_LABELS)
    cases = [_nifti_case(p) for folder in layout for p in _niftis(folder)]
    if not cases:
      raise error(DataError, path, f"no .nii or .nii.gz files in {' or '.join(_NNUNET_IMAGES)}")
    return Inputs(cases, labels, "/".join(_NNUNET_LABELS) + "/")
  found = _niftis(path)
  images = [p for p in found if not _LABEL_SUFFIX.search(p)]
  if images:
    return Inputs([_nifti_case(p) for p in images], len(found) - len(images), "*_label.nii.gz")
  if found:
    raise error(DataError, path, "holds only label files (*_label.nii.gz), no images")
  if not any(names for _, _, names in files.walk(path)):
    raise error(DataError, path, "no .nii or .nii.gz files and no DICOM files in this folder")
  return _dicom(path, extract_to, exclude)


def needs_dicom(path) -> bool:
  """Whether `find_inputs(path)` would read DICOM (a .zip, or a folder without NIfTI
  images), which needs the 'dicom' extra: asked before a model is loaded."""
  path = os.fspath(path)
  where = files.Path(path)
  if where.is_file():
    return path.lower().endswith(".zip")
  if not where.is_dir():
    return False
  folders = [os.path.join(path, d) for d in _NNUNET_IMAGES if (where / d).is_dir()] or [path]
  return not any(_niftis(folder) for folder in folders)


def _dicom(path: str, extract_to: str | None, exclude) -> Inputs:
  found = dicom_series.find_series(path, extract_to=extract_to)
  if exclude is not None:
    outside = [s for s in found if not all(_under(f, exclude) for f in s.files)]
    if not outside:
      raise error(DataError, path, f"holds no DICOM series outside the output folder {exclude}")
    found = outside
  cases = [Case(s.name, s.source, series=s) for s in found]
  masks = _chaos_masks(found[0].folder)
  return Inputs(cases, masks, f"{_CHAOS_MASKS}/*.png")


def _under(path: str, folder) -> bool:
  if files.is_remote(path) or files.is_remote(folder):
    return os.fspath(path).startswith(os.fspath(folder).rstrip("/") + "/")
  return os.path.commonpath([os.path.abspath(path), os.path.abspath(folder)]) == os.path.abspath(
    folder
  )


def _chaos_masks(folder: str) -> int:
  """PNG masks in `Ground` folders below `folder`: CHAOS keeps them beside the DICOM."""
  return sum(
    sum(name.lower().endswith(".png") for name in names)
    for top, _, names in files.walk(folder)
    if posixpath.basename(top.rstrip("/")) == _CHAOS_MASKS
  )
