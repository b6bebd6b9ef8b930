"""NIfTI volumes in one canonical orientation, with what is needed to write results back.

Every volume is handed to the rest of ukd in RAS+ orientation (index increasing towards
the patient's Right, Anterior and Superior along the three axes), so a network never has
to care whether a scanner stored the data as LPS, RAS or oblique.
The original affine and header are kept untouched so a prediction can be turned back into
the on-disk orientation and written with the same geometry: it then overlays its input
exactly in any viewer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import nibabel as nib
import numpy as np
from nibabel import orientations

from ukd import files
from ukd.errors import DataError, error

# Label and image affines written by different tools differ by float32 rounding of the
# qform/sform (well below a micrometre); real mismatches are voxel-sized.
AFFINE_TOLERANCE = 1e-3
# Plausible voxel sizes in mm: micro-CT reaches ~0.01 mm, thick-slice scans a few cm.
MIN_SPACING, MAX_SPACING = 0.01, 50.0

_RAS = orientations.axcodes2ornt(("R", "A", "S"))


@dataclasses.dataclass
class Volume:
  """3D array in canonical RAS orientation + what is needed to write results back exactly."""

  array: np.ndarray
  spacing: tuple[float, float, float]
  affine: np.ndarray
  header: nib.Nifti1Header | None
  original_shape: tuple[int, int, int]
  source: str

  def canonical_affine(self) -> np.ndarray:
    """The affine of `array` (canonical voxel axes), not of the file's own axes: equal for
    files of one grid stored with their axes in different orders or directions."""
    ornt = orientations.io_orientation(self.affine)
    return self.affine @ orientations.inv_ornt_aff(ornt, self.original_shape)

  def to_original(self, canonical: np.ndarray) -> np.ndarray:
    """Inverse reorientation; accepts extra trailing axes (e.g. probabilities [X,Y,Z,C]).

    Predictions are made in canonical space; this undoes the flips and transposes so
    the result lines up voxel by voxel with the file on disk.
    """
    canonical = np.asarray(canonical)
    if canonical.shape[:3] != self.array.shape:
      raise error(
        DataError,
        self.source,
        f"array of shape {canonical.shape} does not match the canonical shape {self.array.shape}",
      )
    to_disk = orientations.ornt_transform(_RAS, _orientation(self.affine, self.source))
    return orientations.apply_orientation(canonical, to_disk)


def _orientation(affine: np.ndarray, source) -> np.ndarray:
  """Orientation of the voxel axes; a degenerate affine cannot be made canonical."""
  ornt = orientations.io_orientation(affine)
  if np.isnan(ornt).any():
    raise error(DataError, source, "affine is degenerate (an axis has no direction)")
  return ornt


def _check_spacing(zooms, source) -> None:
  """Voxel sizes outside [MIN_SPACING, MAX_SPACING] mm are a broken header (a zero, metres
  written as millimetres), not anatomy: every distance and resize downstream would be off."""
  bad = [float(z) for z in zooms if not MIN_SPACING <= z <= MAX_SPACING]
  if bad:
    raise error(
      DataError,
      source,
      f"voxel spacing {[round(float(z), 6) for z in zooms]} mm is outside "
      f"[{MIN_SPACING}, {MAX_SPACING}] mm; check the file's affine / pixdim",
    )


def _check_units(header, source) -> None:
  """Spacing is read as millimetres: a header that says metres or microns would make every
  distance wrong by 1000x.  'unknown' (code 0, what many tools write) is conventionally mm."""
  unit = header.get_xyzt_units()[0]
  if unit not in ("mm", "unknown"):
    raise error(DataError, source, f"spatial unit is {unit!r}; ukd reads spacing in 'mm'")


def _canonical(array: np.ndarray, affine: np.ndarray, source) -> tuple[np.ndarray, tuple]:
  """Reorient to RAS and report voxel sizes along the new axes (checked: `_check_spacing`)."""
  zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
  _check_spacing(zooms, source)
  ornt = _orientation(affine, source)
  spacing = [0.0, 0.0, 0.0]
  for axis, (target, _) in enumerate(ornt):
    spacing[int(target)] = float(zooms[axis])
  canonical = np.ascontiguousarray(orientations.apply_orientation(array, ornt))
  return canonical, tuple(spacing)


def _exactly_3d(array: np.ndarray, source) -> np.ndarray:
  """Squeeze trailing singleton axes (e.g. [X,Y,Z,1]); anything else must be 3D."""
  while array.ndim > 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim != 3:
    raise error(DataError, source, f"expected a 3D volume, got shape {array.shape}")
  return array


def _check_finite(array: np.ndarray, source) -> None:
  """NaN/Inf voxels would silently poison normalisation statistics and losses."""
  if np.issubdtype(array.dtype, np.floating):
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if bad:
      raise error(DataError, source, f"{bad} voxels are NaN or Inf")


def from_array(array, affine=None, source: str = "<array>") -> Volume:
  """Wrap an in-memory 3D array; with affine None (identity) canonical == input."""
  array = _exactly_3d(np.asarray(array), source)
  _check_finite(array, source)
  affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
  if affine.shape != (4, 4) or not np.isfinite(affine).all():
    raise error(DataError, source, f"affine must be a finite 4x4 matrix, got {affine.tolist()}")
  canonical, spacing = _canonical(array, affine, source)
  return Volume(canonical, spacing, affine, None, tuple(array.shape), str(source))


def _load(local: str, path: str):
  """Open the NIfTI file `local` (the local copy of `path`, which messages name), turning
  every way it can fail into a DataError.  A temporary copy of a remote file is read into
  memory rather than memory-mapped, since it is deleted once read."""
  try:
    image = nib.load(local, mmap=local == path)
  except Exception as exc:  # nibabel raises many types for corrupt files
    raise error(DataError, path, f"cannot read as NIfTI ({type(exc).__name__}: {exc})") from exc
  if not isinstance(image.header, nib.Nifti1Header):
    raise error(DataError, path, f"not a NIfTI file ({type(image).__name__})")
  if not np.isfinite(image.affine).all():
    raise error(DataError, path, "affine contains NaN or Inf")
  _check_units(image.header, path)
  return image


@contextlib.contextmanager
def _opened(path):
  """The NIfTI image at `path`, local or remote (`files.local_file`), while the body reads it:
  nibabel reads voxel data lazily, from the file."""
  path = os.fspath(path)
  if not files.Path(path).is_file():
    raise error(DataError, path, "file not found")
  with files.local_file(path) as local:
    yield _load(local, path)


def _read_data(image, path, dtype=None) -> np.ndarray:
  """Read voxel data; truncated/corrupt compressed files only fail here."""
  try:
    if dtype is None:
      return np.asanyarray(image.dataobj)
    return image.get_fdata(dtype=dtype)
  except Exception as exc:
    raise error(DataError, path, f"cannot read voxel data ({type(exc).__name__}: {exc})") from exc


def _wrap(array: np.ndarray, image, path) -> Volume:
  canonical, spacing = _canonical(array, image.affine, path)
  return Volume(
    canonical, spacing, image.affine.copy(), image.header.copy(), tuple(array.shape), path
  )


def read_image(path) -> Volume:
  """Read an image as float32 (scaling applied) in canonical orientation."""
  path = os.fspath(path)
  with _opened(path) as image:
    array = _exactly_3d(_read_data(image, path, np.float32), path)
  _check_finite(array, path)
  return _wrap(array, image, path)


def _as_int_codes(array: np.ndarray, path) -> np.ndarray:
  """Label files are often stored as float; only whole numbers are valid codes."""
  if np.issubdtype(array.dtype, np.integer):
    return _cast(array, np.int32, path)
  if not np.issubdtype(array.dtype, np.floating):
    raise error(DataError, path, f"label data type {array.dtype} is not numeric")
  _check_finite(array, path)
  fractional = array != np.round(array)
  if fractional.any():
    example = float(array[fractional][0])
    raise error(DataError, path, f"label values must be integers, found {example}")
  return _cast(array, np.int32, path)


def read_label(path, like: Volume | None = None) -> Volume:
  """Read a label map as int32 RAW codes; with `like`, check it matches its image.

  A label whose grid differs from its image would train the network on misplaced
  targets, so shape and affine must agree (affine within AFFINE_TOLERANCE).
  """
  path = os.fspath(path)
  with _opened(path) as image:
    array = _as_int_codes(np.asarray(_exactly_3d(_read_data(image, path), path)), path)
  if like is not None:
    if tuple(array.shape) != tuple(like.original_shape):
      raise error(
        DataError,
        path,
        f"label shape {tuple(array.shape)} differs from image shape "
        f"{tuple(like.original_shape)} of {like.source}",
      )
    if not np.allclose(image.affine, like.affine, rtol=0, atol=AFFINE_TOLERANCE):
      raise error(
        DataError,
        path,
        f"label affine {np.round(image.affine, 4).tolist()} differs from the "
        f"affine {np.round(like.affine, 4).tolist()} of {like.source}",
      )
  return _wrap(array, image, path)


def _cast(array: np.ndarray, dtype, path) -> np.ndarray:
  """Refuse casts that would wrap around (e.g. class 300 into uint8)."""
  dtype = np.dtype(dtype)
  if np.issubdtype(dtype, np.integer) and array.size:
    info = np.iinfo(dtype)
    if array.min() < info.min or array.max() > info.max:
      raise error(
        DataError, path, f"values {array.min()}..{array.max()} do not fit in {dtype.name}"
      )
  return array.astype(dtype)


def write_like(canonical: np.ndarray, ref: Volume, path, dtype=np.uint8) -> None:
  """Write a canonical-space array in ref's on-disk orientation with ref's affine and header.

  Reusing the header keeps the sform/qform codes, units and description, which is what
  makes viewers place the prediction exactly on top of the input. A 4D array [X,Y,Z,C]
  (class probabilities, float32) is allowed.  Written atomically (`ukd.files`).
  """
  path = os.fspath(path)
  canonical = np.asarray(canonical)
  if canonical.ndim not in (3, 4):
    raise error(DataError, path, f"expected a 3D or 4D array to write, got shape {canonical.shape}")
  data = _cast(ref.to_original(canonical), dtype, path)
  if ref.header is None:
    image = nib.Nifti1Image(data, ref.affine)
  else:
    nifti2 = isinstance(ref.header, nib.Nifti2Header)
    image_class = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    header = ref.header.copy()
    header.set_data_dtype(data.dtype)
    # Intensity display range and intent describe the input image, not this output.
    header["cal_min"], header["cal_max"] = 0, 0
    header.set_intent("none")
    image = image_class(data, ref.affine, header=header)
  with files.replacing(path) as tmp:
    nib.save(image, tmp)
