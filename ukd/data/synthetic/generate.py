"""Phantom datasets written in the on-disk layouts of MM-WHS 2017, BTCV, CHAOS, AMOS22,
TotalSegmentator (a mask file per structure) and nnU-Net style folders (one per modality).

The real datasets need a registration and cannot be fetched everywhere, yet the dataset
adapters, preprocessing, training and evaluation must run end to end on files that look
like the real ones: the same folders, file names, label codes, dtypes and geometry
conventions. The volumes come from `ukd.data.synthetic.phantoms` (anatomy, geometry, intensities: the
'simple' set) or, for MM-WHS, from `ukd.data.synthetic.scanner_phantoms` (acquired as the MM-WHS
scanners do: the 'scanner' set); this module writes them as each dataset ships: MM-WHS, BTCV
and AMOS22 as NIfTI label maps, TotalSegmentator as NIfTI masks, CHAOS as DICOM series with
PNG masks, and cardiac cases of any number of modalities (CT, b-SSFP, T2-weighted MR) as
nnU-Net style folders. `ensure` generates a dataset once, for
configs that ask for synthetic data; `python -m ukd.data.synthetic --layout=mmwhs --out=DIR`
writes one.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import nibabel as nib
import numpy as np

from ukd import files
from ukd.data.adapters.abdominal import CHAOS_SEQUENCES
from ukd.data.adapters.mmwhs import MMWHS_CODES, MMWHSAdapter
from ukd.data.synthetic import scanner_phantoms
from ukd.data.synthetic.phantoms import (
  DEFAULT_SHAPE,
  MODALITIES,
  RAS_FROM_LPS,
  Phantom,
  check_shape,
  make_phantom,
)
from ukd.errors import DataError

# Phantom sets by `data.synthetic.realism`.
_MAKERS = {"simple": make_phantom, "scanner": scanner_phantoms.make_phantom}
REALISMS = tuple(_MAKERS)

# CHAOS ground-truth grey values per BTCV code (liver, right kidney, left kidney, spleen);
# CHAOS labels nothing else.
CHAOS_GREY = {6: 63, 2: 126, 3: 189, 1: 252}

# ----------------------------------------------------------------------------- writers


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: str) -> None:
  """NIfTI with qform and sform both 'scanner' (code 1), as scanner converters write them."""
  image = nib.Nifti1Image(array, affine)
  image.set_qform(affine, code=1)
  image.set_sform(affine, code=1)
  with files.replacing(path) as tmp:
    nib.save(image, tmp)


def _check_counts(**counts) -> None:
  for name, n in counts.items():
    if int(n) != n or n < 0:
      raise DataError(f"synthetic {name} must be a non-negative integer, got {n!r}")


def _maker(realism: str):
  if realism not in _MAKERS:
    raise DataError(f"synthetic realism {realism!r} unknown: one of {REALISMS}")
  return _MAKERS[realism]


def write_mmwhs(
  root, n_ct: int, n_mr: int, shape=DEFAULT_SHAPE, seed: int = 0, realism: str = "simple"
) -> list[str]:
  """MM-WHS 2017 layout: <root>/{ct,mr}_train/{ct,mr}_train_<1001+k>_{image,label}.nii.gz.

  Labels are uint16 with the real codes 205 MYO, 420 LA, 500 LV, 820 AA and the
  background-mapped 550 RA, 600 RV, 850 PA; `realism` picks the phantom set (`REALISMS`).
  Returns the written paths.
  """
  _check_counts(n_ct=n_ct, n_mr=n_mr)
  make = _maker(realism)
  written = []
  for modality, count in (("ct", n_ct), ("mr", n_mr)):
    folder = os.path.join(os.fspath(root), f"{modality}_train")
    files.makedirs(folder)
    for index in range(count):
      phantom = make("cardiac", modality, shape, seed=seed, index=index)
      stem = os.path.join(folder, f"{modality}_train_{1001 + index}")
      for suffix, array in (("image", phantom.image), ("label", phantom.label)):
        path = f"{stem}_{suffix}.nii.gz"
        _save_nifti(array, phantom.affine, path)
        written.append(path)
  return written


def _ds(value: float) -> str:
  """DICOM decimal strings are limited to 16 characters."""
  return f"{value:.4f}"


class _ChaosSeries(NamedTuple):
  """How the phantoms write one CHAOS sequence."""

  number: int  # SeriesNumber
  description: str  # SeriesDescription
  scanning: str  # ScanningSequence: spin echo (T2-SPIR) or gradient echo (T1-DUAL)
  prefix: int  # the series number in file names, IMG-<prefix>-<file number>
  first: int  # file (and instance) number of slice 0 ...
  step: int  # ... and the step from slice to slice
  masks: bool  # whether its masks are written with it


# CHAOS numbers both T1-DUAL phases' files under series 4, interleaved (out-phase odd, in-phase
# even), and names the shared masks after the in-phase files; the phantoms give each phase a
# series of its own, as a scanner exports them.
_CHAOS_SERIES = {
  "T2SPIR": _ChaosSeries(2, "T2SPIR", "SE", 2, 1, 1, True),
  "T1DUAL/InPhase": _ChaosSeries(4, "T1DUAL InPhase", "GR", 4, 2, 2, True),
  "T1DUAL/OutPhase": _ChaosSeries(5, "T1DUAL OutPhase", "GR", 4, 1, 2, False),
}
# T1-DUAL's contrast change of the T2-SPIR image, v * exp(1 - v / peak) * gain, is largest
# (peak * gain) at v = peak: fluid, bright in T2, turns darker than liver and spleen, and fat
# brighter, as in T1; the out-phase image peaks lower and is dimmer, as where fat and water
# cancel.
_T1DUAL_CONTRAST = {"T1DUAL/InPhase": (400.0, 1.0), "T1DUAL/OutPhase": (250.0, 0.8)}


def _t1dual_image(image: np.ndarray, sequence: str) -> np.ndarray:
  """A T1-DUAL phase of a T2-SPIR phantom image (`_T1DUAL_CONTRAST`), on its grid."""
  peak, gain = _T1DUAL_CONTRAST[sequence]
  values = image.astype(np.float32)
  changed = values * np.exp(1.0 - values / np.float32(peak)) * np.float32(gain)
  return np.rint(changed).astype(np.uint16)


def _write_chaos_series(
  patient_dir: str, sequence: str, image: np.ndarray, phantom: Phantom, patient: int, seed: int
) -> list[str]:
  """One CHAOS series of `sequence` (`_CHAOS_SERIES`): a DICOM file per slice of `image`, and
  where the series carries them, a PNG mask per slice with the same stem."""
  import pydicom  # optional dependency, only needed for the CHAOS layout
  from PIL import Image
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

  written_as = _CHAOS_SERIES[sequence]
  dicom_part, ground_part = CHAOS_SEQUENCES[sequence]
  dicom_dir = os.path.join(patient_dir, *dicom_part.split("/"))
  ground_dir = os.path.join(patient_dir, *ground_part.split("/"))
  files.makedirs(dicom_dir)
  if written_as.masks:
    files.makedirs(ground_dir)
  # T2-SPIR's UIDs are those it had before T1-DUAL was written: reruns write identical files.
  own = () if sequence == "T2SPIR" else (sequence,)

  def uid(*parts):  # deterministic, so reruns write identical files
    return generate_uid(entropy_srcs=["ukd-synthetic", str(seed), str(patient), *map(str, parts)])

  lps = np.linalg.inv(RAS_FROM_LPS) @ phantom.affine
  row_step, column_step, slice_step = lps[:3, :3].T  # array axes: rows, columns, slices
  grey = np.zeros(256, np.uint8)
  for code, value in CHAOS_GREY.items():
    grey[code] = value
  study, series, frame = uid("study"), uid("series", *own), uid("frame")
  written = []
  for k in range(image.shape[2]):
    number = written_as.first + written_as.step * k
    stem = f"IMG-{written_as.prefix:04d}-{number:05d}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = uid("image", *own, number)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.PatientName, ds.PatientID = "Anonymous", str(patient)
    ds.Modality, ds.SeriesDescription = "MR", written_as.description
    ds.SeriesNumber, ds.ScanningSequence = written_as.number, written_as.scanning
    ds.InstanceNumber = number
    position = lps[:3, 3] + k * slice_step
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [
      _ds(v)
      for v in (*column_step / np.linalg.norm(column_step), *row_step / np.linalg.norm(row_step))
    ]
    ds.PixelSpacing = [_ds(np.linalg.norm(row_step)), _ds(np.linalg.norm(column_step))]
    ds.SliceThickness = ds.SpacingBetweenSlices = _ds(np.linalg.norm(slice_step))
    ds.SliceLocation = _ds(position[2])
    ds.Rows, ds.Columns = image.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.ascontiguousarray(image[:, :, k]).astype("<u2").tobytes()
    path = os.path.join(dicom_dir, stem + ".dcm")
    with files.replacing(path) as tmp:
      pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
    written.append(path)
    if written_as.masks:
      mask_path = os.path.join(ground_dir, stem + ".png")
      with files.replacing(mask_path) as tmp:
        Image.fromarray(grey[phantom.label[:, :, k]], mode="L").save(tmp)
      written.append(mask_path)
  return written


def write_abdominal(
  root,
  n_ct: int,
  n_mr: int,
  shape=DEFAULT_SHAPE,
  seed: int = 0,
  realism: str = "simple",
  t1dual: bool = False,
) -> list[str]:
  """BTCV CT plus CHAOS MR, in their layouts, from the simple set (the only one with
  abdominal anatomy).

  CT: <root>/BTCV/img/img000k.nii.gz (int16 HU) and label/label000k.nii.gz (uint8 codes
  1 spleen, 2 right kidney, 3 left kidney, 6 liver, and background-mapped 4 gallbladder,
  7 stomach, 8 aorta, 9 IVC), k = 1, 2, ...
  MR: <root>/CHAOS/Train_Sets/MR/<k>/T2SPIR/DICOM_anon/IMG-0002-000NN.dcm and
  .../Ground/IMG-0002-000NN.png (grey values in CHAOS_GREY), k = 1, 2, ...
  With `t1dual` also .../<k>/T1DUAL/DICOM_anon/{InPhase,OutPhase}/*.dcm and the masks both
  share, .../T1DUAL/Ground/*.png: the T2-SPIR phantom with its contrast changed
  (`_t1dual_image`), not a simulation of the sequence, on the same grid with the same labels,
  so that each MR sequence can be a modality of its own.
  `shape` is (rows, columns, slices) for MR. Returns the written paths.
  """
  _check_counts(n_ct=n_ct, n_mr=n_mr)
  _simple_only(realism, "abdominal")
  root = os.fspath(root)
  written = []
  for name in ("img", "label"):
    files.makedirs(os.path.join(root, "BTCV", name))
  for index in range(n_ct):
    phantom = make_phantom("abdominal", "ct", shape, seed=seed, index=index)
    for name, array in (("img", phantom.image), ("label", phantom.label)):
      path = os.path.join(root, "BTCV", name, f"{name}{index + 1:04d}.nii.gz")
      _save_nifti(array, phantom.affine, path)
      written.append(path)
  for index in range(n_mr):
    phantom = make_phantom("abdominal", "mr", shape, seed=seed, index=index)
    patient_dir = os.path.join(root, "CHAOS", "Train_Sets", "MR", str(index + 1))
    for sequence in CHAOS_SEQUENCES if t1dual else ("T2SPIR",):
      image = phantom.image if sequence == "T2SPIR" else _t1dual_image(phantom.image, sequence)
      written += _write_chaos_series(patient_dir, sequence, image, phantom, index + 1, seed)
  return written


# AMOS22's dataset.json labels as it ships them ('arota' included).  The abdominal phantoms
# carry BTCV codes, which are AMOS's for the organs they draw: 1 spleen, 2 right kidney, 3 left
# kidney, 4 gall bladder, 6 liver, 7 stomach, 8 aorta, 9 postcava; the other 7 never occur.
AMOS_LABELS = (
  "background", "spleen", "right kidney", "left kidney", "gall bladder", "esophagus", "liver",
  "stomach", "arota", "postcava", "pancreas", "right adrenal gland", "left adrenal gland",
  "duodenum", "bladder", "prostate/uterus",
)  # fmt: skip
# The first case number of each modality: CT from 1, MR from 507 (as AMOS22 numbers them).
AMOS_FIRST = {"ct": 1, "mr": 507}


def write_amos(
  root, n_ct: int, n_mr: int, shape=DEFAULT_SHAPE, seed: int = 0, realism: str = "simple"
) -> list[str]:
  """AMOS22 layout, from the abdominal phantoms (simple set): <root>/dataset.json and
  imagesTr/amos_NNNN.nii.gz + labelsTr/amos_NNNN.nii.gz, every third case of a modality in
  imagesVa/labelsVa instead; CT numbered from amos_0001, MR from amos_0507.  Labels are uint8
  AMOS codes: the 8 organs the phantoms draw (`AMOS_LABELS`).  Returns the written paths."""
  _check_counts(n_ct=n_ct, n_mr=n_mr)
  _simple_only(realism, "amos")
  root = os.fspath(root)
  written, listed = [], {"Tr": [], "Va": []}
  for modality, count in (("ct", n_ct), ("mr", n_mr)):
    for index in range(count):
      phantom = make_phantom("abdominal", modality, shape, seed=seed, index=index)
      part = "Va" if index % 3 == 2 else "Tr"
      name = f"amos_{AMOS_FIRST[modality] + index:04d}.nii.gz"
      entry = {}
      for kind, array in (("image", phantom.image), ("label", phantom.label)):
        folder = os.path.join(root, f"{kind}s{part}")
        files.makedirs(folder)
        _save_nifti(array, phantom.affine, os.path.join(folder, name))
        written.append(os.path.join(folder, name))
        entry[kind] = f"./{kind}s{part}/{name}"
      listed[part].append(entry)
  meta = {
    "name": "AMOS",
    "labels": {str(code): name for code, name in enumerate(AMOS_LABELS)},
    "modality": {"0": "CT"},
    "training": listed["Tr"],
    "validation": listed["Va"],
  }
  path = os.path.join(root, "dataset.json")
  with open(path, "w") as f:
    json.dump(meta, f, indent=2)
  return [*written, path]


# TotalSegmentator's names of the structures the abdominal phantoms draw, by BTCV code.
TOTALSEG_NAMES = {
  1: "spleen",
  2: "kidney_right",
  3: "kidney_left",
  4: "gallbladder",
  6: "liver",
  7: "stomach",
  8: "aorta",
  9: "inferior_vena_cava",
}


def write_totalseg(
  root, n_ct: int, n_mr: int, shape=DEFAULT_SHAPE, seed: int = 0, realism: str = "simple"
) -> list[str]:
  """TotalSegmentator layout, from the abdominal phantoms (simple set): <root>/sNNNN/ct.nii.gz
  (CT cases s0000 on) or mri.nii.gz (MR cases numbered after them), and
  sNNNN/segmentations/<structure>.nii.gz, a uint8 0/1 mask for each of the 8 structures the
  phantoms draw (`TOTALSEG_NAMES`), plus a meta.csv as the release has.  Returns the paths."""
  _check_counts(n_ct=n_ct, n_mr=n_mr)
  _simple_only(realism, "totalseg")
  root = os.fspath(root)
  written, rows = [], ["image_id;modality"]
  cases = [("ct", k) for k in range(n_ct)] + [("mr", k) for k in range(n_mr)]
  for number, (modality, index) in enumerate(cases):
    phantom = make_phantom("abdominal", modality, shape, seed=seed, index=index)
    case = os.path.join(root, f"s{number:04d}")
    files.makedirs(os.path.join(case, "segmentations"))
    image = os.path.join(case, "ct.nii.gz" if modality == "ct" else "mri.nii.gz")
    _save_nifti(phantom.image, phantom.affine, image)
    written.append(image)
    for code, structure in TOTALSEG_NAMES.items():
      path = os.path.join(case, "segmentations", f"{structure}.nii.gz")
      _save_nifti((phantom.label == code).astype(np.uint8), phantom.affine, path)
      written.append(path)
    rows.append(f"s{number:04d};{modality}")
  path = os.path.join(root, "meta.csv")
  with open(path, "w") as f:
    f.write("\n".join(rows) + "\n")
  return [*written, path]


# MM-WHS codes -> the folder layout's class indices, those of `MMWHSAdapter.classes`.
_FOLDER_INDEX = np.zeros(max(MMWHS_CODES) + 1, np.uint8)
_FOLDER_INDEX[list(MMWHS_CODES)] = list(MMWHS_CODES.values())


def write_folder(
  root,
  n_ct: int,
  n_mr: int,
  shape=DEFAULT_SHAPE,
  seed: int = 0,
  realism: str = "simple",
  *,
  folders: dict,
  contrasts=None,
) -> list[str]:
  """Cardiac phantoms as nnU-Net style folders, one per modality (the `folder` adapter's
  layout): <root>/<folder>/imagesTr/<modality>_NNN_0000.nii.gz, labelsTr/<modality>_NNN.nii.gz
  (uint8 indices: 1 MYO, 2 LAC, 3 LVC, 4 AA) and a dataset.json naming them.

  `folders` maps each modality to its folder (the adapter's `modalities` option), `contrasts`
  each to the phantom it holds: 'ct', 'mr' (b-SSFP) or, in the scanner set, 'mr_t2' (a
  T2-weighted black-blood image, `scanner_phantoms`).  A modality named 'ct' or 'mr' holds that
  contrast unless told otherwise; any other must be named.  A CT modality gets `n_ct` cases,
  each MR one `n_mr`, patients of its own.  Returns the written paths.
  """
  _check_counts(n_ct=n_ct, n_mr=n_mr)
  make = _maker(realism)
  known = scanner_phantoms.CONTRASTS if realism == "scanner" else MODALITIES
  contrasts = dict(contrasts or {})
  root = os.fspath(root)
  written = []
  for modality, folder in sorted(dict(folders).items()):
    contrast = contrasts.get(modality, modality)
    if contrast not in known:
      raise DataError(
        f"synthetic folder modality {modality!r}: its phantom contrast {contrast!r} is not one of "
        f"the {realism} set's {known}; name it in data.synthetic.contrasts"
      )
    count = n_ct if contrast == "ct" else n_mr
    base = os.path.join(root, os.fspath(folder))
    for part in ("imagesTr", "labelsTr"):
      files.makedirs(os.path.join(base, part))
    for index in range(count):
      phantom = make("cardiac", contrast, shape, seed=seed, index=index)
      label = _FOLDER_INDEX[phantom.label]
      case = f"{modality}_{index + 1:03d}"
      for path, array in (
        (os.path.join(base, "imagesTr", f"{case}_0000.nii.gz"), phantom.image),
        (os.path.join(base, "labelsTr", f"{case}.nii.gz"), label),
      ):
        _save_nifti(array, phantom.affine, path)
        written.append(path)
    meta = {
      "channel_names": {"0": "CT" if contrast == "ct" else "MR"},
      "labels": {name: index for index, name in enumerate(MMWHSAdapter.classes)},
      "numTraining": count,
      "file_ending": ".nii.gz",
    }
    path = os.path.join(base, "dataset.json")
    with open(path, "w") as f:
      json.dump(meta, f, indent=2)
    written.append(path)
  return written


def _simple_only(realism: str, layout: str) -> None:
  """Abdominal layouts come from the simple set: the scanner set has no abdominal anatomy."""
  if realism != "simple":
    raise DataError(f"synthetic realism {realism!r} for the {layout} layout: only 'simple' exists")


WRITERS = {
  "mmwhs": write_mmwhs,
  "abdominal": write_abdominal,
  "amos": write_amos,
  "totalseg": write_totalseg,
  "folder": write_folder,
}
_MARKER = ".ukd_synthetic.json"  # hidden, so the dataset adapters never list it


def ensure(
  root, layout: str, *, n_ct: int, n_mr: int, shape, seed: int, realism: str = "simple", **options
) -> str:
  """Generate a phantom dataset in `layout` (one of `WRITERS`, the names of the dataset
  adapters that read them) into `root` once; later calls (a resumed run) reuse it.
  `options` go to the layout's writer (the adapter's `phantom_options`, e.g. `t1dual`) and
  are recorded only where given, so phantoms made before an option existed still match.

  The dataset is written to a temporary
  sibling folder and renamed into place, so an interrupted run never leaves a half-written
  root that a later run would take for complete; on an object store (`gs://...`) it is
  uploaded file by file with the settings marker last (`files.new_directory`), so a cut-short
  upload leaves a root without one, which is refused. A root that holds files must hold
  phantoms made with the same settings: silently training on other data would be worse than
  stopping; an empty one is filled.
  """
  settings = {
    "layout": str(layout),
    "n_ct": int(n_ct),
    "n_mr": int(n_mr),
    "shape": [int(n) for n in shape],
    "seed": int(seed),
    "realism": str(realism),
    **options,
  }
  root = files.path(root)
  if root.exists() and any(root.iterdir()):  # an empty folder is made for them: filled
    try:
      found = json.loads((root / _MARKER).read_text())
    except (OSError, ValueError):
      raise DataError(
        f"{root}: exists but holds no synthetic dataset ({_MARKER} missing or "
        "unreadable); point data.root elsewhere"
      ) from None
    found.setdefault("realism", "simple")  # markers from before the scanner set: simple ones
    if found != settings:
      raise DataError(
        f"{root}: holds phantoms made with {found}, not {settings}; delete it or use another root"
      )
    return os.fspath(root)
  if settings["layout"] not in WRITERS:
    raise DataError(
      f"synthetic data in the {settings['layout']!r} layout cannot be made: "
      f"use data.dataset one of {sorted(WRITERS)}"
    )
  check_shape(settings["shape"])  # fail before anything is written
  _check_counts(n_ct=settings["n_ct"], n_mr=settings["n_mr"])
  with files.new_directory(root) as staging:
    WRITERS[settings["layout"]](staging, **{k: v for k, v in settings.items() if k != "layout"})
    with open(os.path.join(staging, _MARKER), "w") as f:
      json.dump(settings, f, sort_keys=True)
  # Checks the settings of phantoms another process finished first.
  return ensure(
    root, layout, n_ct=n_ct, n_mr=n_mr, shape=shape, seed=seed, realism=realism, **options
  )
