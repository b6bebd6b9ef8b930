"""DICOM series and their PNG masks (CHAOS) as canonical Volumes.

pydicom is an optional extra (`pip install 'ukd[dicom]'`): only the CHAOS DICOM layout
needs it, so it is imported when a series is read.
"""

from __future__ import annotations

import numpy as np

from ukd import files
from ukd.data.volumes import Volume, from_array
from ukd.errors import DataError, error

# DICOM patient coordinates are LPS; NIfTI/ukd affines are RAS.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _import_pydicom():
  """pydicom is an optional extra: only CHAOS DICOM needs it."""
  try:
    import pydicom
  except ImportError:
    raise DataError("reading DICOM needs pydicom: pip install 'ukd[dicom]'") from None
  return pydicom


def _read_slice(pydicom, path: str):
  """Pixels (rescaled float32 [rows, cols]) and the geometry tags of one DICOM file."""
  try:
    with files.local_file(path) as local:
      ds = pydicom.dcmread(local)
      pixels = ds.pixel_array.astype(np.float32)
    orientation = np.array(ds.ImageOrientationPatient, dtype=np.float64)
    position = np.array(ds.ImagePositionPatient, dtype=np.float64)
    spacing = np.array(ds.PixelSpacing, dtype=np.float64)
  except Exception as exc:  # unreadable file, missing tag or pixel data
    raise error(DataError, path, f"cannot read DICOM slice ({type(exc).__name__}: {exc})") from exc
  shapes = (pixels.ndim, orientation.shape, position.shape, spacing.shape)
  if shapes != (2, (6,), (3,), (2,)):
    raise error(DataError, path, "DICOM slice is not a single 2D frame with full geometry tags")
  slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
  intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
  # Only used for single-slice series, where positions cannot give the slice step.
  thickness = getattr(ds, "SpacingBetweenSlices", 0) or getattr(ds, "SliceThickness", 0) or 1
  thickness = float(thickness)
  return pixels * slope + intercept, orientation, position, spacing, thickness


def _read_mask(path: str, shape: tuple[int, int]) -> np.ndarray:
  """A single-channel PNG mask with the same pixel grid as its DICOM slice."""
  from PIL import Image

  try:
    with files.local_file(path) as local, Image.open(local) as picture:
      mask = np.asarray(picture)
  except Exception as exc:
    raise error(DataError, path, f"cannot read PNG mask ({type(exc).__name__}: {exc})") from exc
  if mask.shape != shape:
    raise error(
      DataError, path, f"mask shape {mask.shape} differs from the DICOM slice shape {shape}"
    )
  return mask.astype(np.int32)


def _slice_step(positions: np.ndarray, normal: np.ndarray, thickness: float, folder: str):
  """Vector between consecutive sorted slices; uneven or repeated slices are errors."""
  if len(positions) == 1:
    return normal * thickness
  gaps = np.diff(positions @ normal)
  if gaps.min() < 1e-3:
    raise error(DataError, folder, "two DICOM slices share a position")
  if gaps.max() - gaps.min() > 0.01 * gaps.mean():
    raise error(DataError, folder, f"uneven slice spacing {gaps.min():.4g}..{gaps.max():.4g} mm")
  return (positions[-1] - positions[0]) / (len(positions) - 1)


def read_dicom_series(dicom_dir: str, mask_dir: str | None = None) -> tuple[Volume, Volume | None]:
  """Read a DICOM series (and its PNG masks, raw grey values) as canonical Volumes.

  Slices are ordered by ImagePositionPatient along the slice normal, not by file name,
  because CHAOS file numbering need not follow anatomy. Masks are paired with DICOM files
  by sorted file name (CHAOS gives each mask the stem of its slice) before that ordering.
  Voxel axes before reorientation: column, row, slice - the usual DICOM-to-NIfTI layout.
  """
  pydicom = _import_pydicom()
  slice_files = files.glob(dicom_dir, "*.dcm")
  if not slice_files:
    raise error(DataError, dicom_dir, "no DICOM slices (*.dcm) found")
  slices = [_read_slice(pydicom, path) for path in slice_files]
  pixels, orientation, _, spacing, thickness = slices[0]
  for path, (other, other_orientation, _, other_spacing, _) in zip(slice_files, slices):
    if (
      other.shape != pixels.shape
      or not np.allclose(other_orientation, orientation, atol=1e-4)
      or not np.allclose(other_spacing, spacing, atol=1e-4)
    ):
      raise error(DataError, path, f"slice geometry differs from {slice_files[0]}")
  row_dir, col_dir = orientation[:3], orientation[3:]
  normal = np.cross(row_dir, col_dir)
  positions = np.array([s[2] for s in slices])
  order = np.argsort(positions @ normal, kind="stable")
  step = _slice_step(positions[order], normal, thickness, dicom_dir)

  affine = np.eye(4)
  # Along a row the column index grows (spacing[1]); down a column the row index grows.
  affine[:3, 0] = row_dir * spacing[1]
  affine[:3, 1] = col_dir * spacing[0]
  affine[:3, 2] = step
  affine[:3, 3] = positions[order[0]]
  affine = _LPS_TO_RAS @ affine

  stack = np.stack([slices[i][0].T for i in order], axis=-1)
  image = from_array(stack, affine, source=dicom_dir)
  if mask_dir is None:
    return image, None
  masks = files.glob(mask_dir, "*.png")
  if len(masks) != len(slice_files):
    raise error(
      DataError,
      mask_dir,
      f"{len(masks)} PNG masks for {len(slice_files)} DICOM slices in {dicom_dir}",
    )
  labels = np.stack([_read_mask(masks[i], pixels.shape).T for i in order], axis=-1)
  return image, from_array(labels, affine, source=mask_dir)
