"""Writing a volume as a DICOM series: CT or MR Image Storage, one file per slice, or one
enhanced (Legacy Converted Enhanced) multi-frame file.

Handy for converting NIfTI to DICOM, and for tests and benchmarks of the DICOM reader: the
series carries the patient, study, series, frame of reference, equipment and image plane
modules a DICOM-SEG writer (highdicom) needs from its source. Values are stored as 16-bit
integers; float data gets a rescale slope and intercept (CT: HU) chosen so it reads back
within half a slope step.
"""

from __future__ import annotations

import datetime
import os
import random

import numpy as np

from ukd import files
from ukd.data.io.dicom import LPS_TO_RAS, import_pydicom
from ukd.data.io.volumes import Volume
from ukd.errors import DataError, error

_SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
_INT16 = np.iinfo(np.int16)


def _rescale(data: np.ndarray, modality: str) -> tuple[np.ndarray, str, str, bool]:
  """(stored little-endian values, slope, intercept as decimal strings, signed). Whole
  numbers that fit 16 bits are stored as they are; anything else is spread over the int16
  range, with the slope and intercept rounded to decimal strings *before* the stored values
  are computed."""
  from pydicom.valuerep import format_number_as_ds

  low, high = float(data.min()), float(data.max())
  whole = bool(np.all(data == np.round(data)))
  if whole and _INT16.min <= low and high <= _INT16.max:
    return data.astype("<i2"), "1", "0", True
  if whole and modality == "MR" and low >= 0 and high <= np.iinfo(np.uint16).max:
    return data.astype("<u2"), "1", "0", False
  # One step fewer than the range holds, so rounding of the intercept cannot push the
  # extremes outside it.
  slope = format_number_as_ds((high - low) / (_INT16.max - _INT16.min - 1) if high > low else 1.0)
  intercept = format_number_as_ds(low - (_INT16.min + 1) * float(slope))
  stored = np.round((data.astype(np.float64) - float(intercept)) / float(slope))
  return np.clip(stored, _INT16.min, _INT16.max).astype("<i2"), slope, intercept, True


def _ds(value: float) -> str:
  """A DICOM decimal string (at most 16 characters) as precise as it can be."""
  from pydicom.valuerep import format_number_as_ds

  return format_number_as_ds(float(value))


def _plane(affine: np.ndarray, where: str):
  """(orientation, pixel spacing, first position, slice step) in LPS for voxel axes
  (column, row, slice) of a RAS affine; rows and columns must be perpendicular and the slices
  stacked along their normal (no shear)."""
  lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
  along_row, down_column, step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
  row_dir = along_row / np.linalg.norm(along_row)
  col_dir = down_column / np.linalg.norm(down_column)
  normal = np.cross(row_dir, col_dir)
  if abs(row_dir @ col_dir) > 1e-6 or np.linalg.norm(step - (step @ normal) * normal) > 1e-6 * (
    np.linalg.norm(step)
  ):
    raise error(DataError, where, "affine is sheared; DICOM slices need perpendicular axes")
  spacing = (np.linalg.norm(down_column), np.linalg.norm(along_row))
  return np.concatenate([row_dir, col_dir]), spacing, lps[:3, 3], step


def _base_dataset(pydicom, ids: dict, modality: str, when: datetime.datetime, meta: dict):
  """The modules shared by every slice: patient, study, series, frame of reference,
  equipment."""
  ds = pydicom.Dataset()
  ds.SpecificCharacterSet = "ISO_IR 100"
  ds.PatientName, ds.PatientID = meta["patient_name"], meta["patient_id"]
  ds.PatientBirthDate, ds.PatientSex = "", ""
  ds.StudyInstanceUID, ds.SeriesInstanceUID = ids["study"], ids["series"]
  ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = ids["frame"], ""
  ds.StudyDate = ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
  ds.StudyTime = ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")
  ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "1", ""
  ds.Modality, ds.SeriesNumber = modality, meta["series_number"]
  ds.SeriesDescription = meta["series_description"]
  ds.Manufacturer = "ukd"
  ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL" if modality == "CT" else "OTHER"]
  ds.AcquisitionNumber = 1
  if modality == "CT":
    ds.KVP = ""
  else:
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "RM", "NONE", ""
    ds.MRAcquisitionType, ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = "3D", "", "", ""
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
  ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
  return ds


def _slices(pydicom, data: np.ndarray, affine: np.ndarray, modality: str, ids, uid, meta, where):
  """One single-frame dataset per slice k: pixels data[:, :, k].T (rows, columns)."""
  orientation, spacing, origin, step = _plane(affine, where)
  stored, slope, intercept, signed = _rescale(data, modality)
  rescaled = modality == "CT" or (slope, intercept) != ("1", "0")
  centre, width = (float(data.max()) + float(data.min())) / 2, float(np.ptp(data)) or 1.0
  when = datetime.datetime.now()
  datasets = []
  for k in range(data.shape[2]):
    ds = _base_dataset(pydicom, ids, modality, when, meta)
    ds.SOPClassUID = _SOP_CLASSES[modality]
    ds.SOPInstanceUID = uid(f"image {k}")
    ds.InstanceNumber = k + 1
    ds.ImageOrientationPatient = [_ds(v) for v in orientation]
    ds.ImagePositionPatient = [_ds(v) for v in origin + k * step]
    ds.PixelSpacing = [_ds(v) for v in spacing]
    ds.SliceThickness = ds.SpacingBetweenSlices = _ds(np.linalg.norm(step))
    ds.Rows, ds.Columns = data.shape[1], data.shape[0]
    ds.PixelRepresentation = int(signed)
    if rescaled:
      ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
      ds.RescaleType = "HU" if modality == "CT" else "US"
    ds.WindowCenter, ds.WindowWidth = _ds(centre), _ds(width)
    ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
    datasets.append(_file_meta(pydicom, ds))
  return datasets


def _file_meta(pydicom, ds):
  meta = pydicom.dataset.FileMetaDataset()
  meta.MediaStorageSOPClassUID = ds.SOPClassUID
  meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
  meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
  ds.file_meta = meta
  return ds


def _multiframe(datasets, modality: str, ids, uid, meta):
  """One Legacy Converted Enhanced CT/MR image of all slices (highdicom builds the functional
  groups that hold each frame's position)."""
  try:
    from highdicom import legacy
  except ImportError:
    raise DataError("writing multi-frame DICOM needs highdicom: pip install 'ukd[dicom]'") from None
  convert = {
    "CT": legacy.LegacyConvertedEnhancedCTImage,
    "MR": legacy.LegacyConvertedEnhancedMRImage,
  }
  return convert[modality](
    datasets, ids["series"], meta["series_number"], uid("multi-frame"), instance_number=1
  )


def write_series(
  image,
  folder,
  *,
  affine=None,
  modality: str = "CT",
  series_number: int = 1,
  series_description: str = "",
  patient_id: str = "anonymous",
  patient_name: str = "Anonymous^",
  study_uid: str | None = None,
  shuffle_names: bool = False,
  multiframe: bool = False,
  seed: int | None = None,
) -> list[str]:
  """Write a Volume (its on-disk grid and affine), or an array [X, Y, Z] with a RAS `affine`
  (identity when None), as a DICOM series in `folder`; returns the paths written.

  Voxel axes (column, row, slice), as `ukd.data.io.dicom` reads them: a volume read back has the
  same canonical array and, for an affine with a positive determinant, the same affine (a
  negative one comes back with the slice axis reversed). Files are `IM00001.dcm`... in slice
  order, or with `shuffle_names` random names without extension, so a reader cannot rely on
  them; `multiframe` writes one enhanced file instead. Several series of one study share a
  `study_uid`. `seed` makes UIDs and names repeatable.
  """
  pydicom = import_pydicom()
  folder = os.fspath(folder)
  if modality not in _SOP_CLASSES:
    raise error(
      DataError, folder, f"modality must be one of {sorted(_SOP_CLASSES)}, got {modality!r}"
    )
  if isinstance(image, Volume):
    data, affine = image.to_original(image.array), image.affine
  else:
    data = np.asarray(image)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
  if data.ndim != 3 or not np.isfinite(data).all():
    raise error(DataError, folder, f"need a finite 3D volume, got shape {data.shape}")

  def uid(role: str) -> str:
    sources = None if seed is None else ["ukd", str(seed), str(series_number), role]
    return pydicom.uid.generate_uid(entropy_srcs=sources)

  ids = {"study": study_uid or uid("study"), "series": uid("series"), "frame": uid("frame")}
  meta = {
    "patient_id": patient_id,
    "patient_name": patient_name,
    "series_number": series_number,
    "series_description": series_description,
  }
  datasets = _slices(pydicom, data, affine, modality, ids, uid, meta, folder)
  if multiframe:
    datasets = [_multiframe(datasets, modality, ids, uid, meta)]
  rng = random.Random(seed)
  names = [f"IM{k + 1:05d}.dcm" for k in range(len(datasets))]
  if shuffle_names:
    names = [f"{rng.getrandbits(64):016x}" for _ in datasets]
  files.makedirs(folder)
  written = []
  for name, ds in zip(names, datasets):
    path = os.path.join(folder, name)
    with files.replacing(path) as tmp:
      pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
    written.append(path)
  return written
