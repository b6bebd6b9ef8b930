"""DICOM images as canonical Volumes: one reader for training (CHAOS) and prediction.

A series is a set of frames: one per single-frame file, or many in an enhanced multi-frame
file (geometry in its Shared/PerFrameFunctionalGroupsSequence). The frames are stacked by
position along the slice normal (the cross product of ImageOrientationPatient), never by file
name or InstanceNumber, which need not follow anatomy. What cannot be stacked onto one regular
grid is refused with one line naming the series and the problem (missing slices, mixed sizes
or orientations, gantry tilt, no pixel data, an undecodable transfer syntax), so a caller
reading many series can go on with the others; a localizer mixed into a series is skipped and
reported instead. The source headers stay with the volume, so a DICOM-SEG can reference them
(`ukd.data.io.dicom_seg`).

pydicom is an optional extra (`pip install 'ukd[dicom]'`), imported when a series is read.
Series discovery is `ukd.data.io.dicom_series`, writing `ukd.data.synthetic.dicom_write`.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from ukd import files
from ukd.data.io import mosaic
from ukd.data.io.volumes import Volume, from_array
from ukd.errors import DataError, error, import_extra

# DICOM patient coordinates are LPS; NIfTI/ukd affines are RAS (the matrix is its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Slices closer than this fraction of their spacing to the regular grid are on it: decimal
# strings round positions to ~1e-4 mm, scanners jitter by less than 1%.
SPACING_TOLERANCE = 0.01
# In-plane drift of positions (mm, as a fraction of the pixel size) beyond which the stack is
# tilted: the slices would not lie on one voxel grid.
TILT_TOLERANCE = 0.1
# Orientation cosines that differ by less than this are the same orientation.
ORIENTATION_TOLERANCE = 1e-3

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# What to install where no installed plugin decodes a compressed transfer syntax, by UID
# (JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE); anything else: python-gdcm.
_JPEG_2000 = "pylibjpeg pylibjpeg-openjpeg"
_DECODER_PACKAGES = {
  **dict.fromkeys(
    [f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 57, 70)],
    "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)",
  ),
  **dict.fromkeys(
    ["1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"], "pyjpegls (or python-gdcm)"
  ),
  **dict.fromkeys(
    [f"1.2.840.10008.1.2.4.{n}" for n in (90, 91, 92, 93)], f"{_JPEG_2000} (or python-gdcm)"
  ),
  **dict.fromkeys([f"1.2.840.10008.1.2.4.{n}" for n in (201, 202, 203)], _JPEG_2000),
  "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",
}


def import_pydicom():
  """pydicom is an optional extra: only DICOM input needs it."""
  return import_extra("pydicom", "dicom", "DICOM input")


@dataclasses.dataclass
class DicomImage:
  """A DICOM series read onto one grid, with what a DICOM-SEG of it needs.

  `volume` is canonical (float32; CT in HU). Its on-disk axes (`volume.to_original`) are
  (column, row, slice), slices in order along the normal; on-disk slice k is frame
  `frames[k] = (i, n)`: frame n (1-based) of `headers[i]`, read from `paths[i]`. `headers`
  are the source datasets without pixel data, localizers left out; `skipped` holds one line
  per skipped localizer.
  """

  volume: Volume
  headers: list
  paths: list[str]
  frames: list[tuple[int, int]]
  skipped: list[str]
  source: str


@dataclasses.dataclass
class _Frame:
  """One 2D frame with its geometry; `header` indexes the file's dataset."""

  header: int
  number: int
  pixels: np.ndarray
  orientation: np.ndarray
  position: np.ndarray
  spacing: np.ndarray
  thickness: float
  localizer: bool
  name: str


def _item(ds, frame: int, sequence: str, keyword: str):
  """An enhanced file's per-frame functional group value, else the shared one, else None."""
  groups = []
  if "PerFrameFunctionalGroupsSequence" in ds:
    groups.append(ds.PerFrameFunctionalGroupsSequence[frame])
  if "SharedFunctionalGroupsSequence" in ds:
    groups.append(ds.SharedFunctionalGroupsSequence[0])
  for group in groups:
    if sequence in group and len(group[sequence].value) and keyword in group[sequence][0]:
      return group[sequence][0][keyword].value
  return None


def _geometry(ds, frame: int, enhanced: bool):
  """(orientation, position, spacing, thickness, slope, intercept) of one frame, or None
  where a geometry tag is missing. The thickness is what a lone slice's voxels get:
  SliceThickness, the slab imaged, rather than SpacingBetweenSlices, which can be larger
  (a gap between slices) and says nothing about a single one."""
  if enhanced:
    values = [
      _item(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient"),
      _item(ds, frame, "PlanePositionSequence", "ImagePositionPatient"),
      _item(ds, frame, "PixelMeasuresSequence", "PixelSpacing"),
    ]
    thickness = _item(ds, frame, "PixelMeasuresSequence", "SliceThickness") or _item(
      ds, frame, "PixelMeasuresSequence", "SpacingBetweenSlices"
    )
    slope = _item(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _item(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
  else:
    values = [
      ds.get(k) for k in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing")
    ]
    thickness = ds.get("SliceThickness") or ds.get("SpacingBetweenSlices")
    slope, intercept = None, None
  if any(v is None for v in values):
    return None
  orientation, position, spacing = (np.array(v, dtype=np.float64) for v in values)
  if (orientation.shape, position.shape, spacing.shape) != ((6,), (3,), (2,)):
    return None
  slope = slope if slope is not None else ds.get("RescaleSlope")
  intercept = intercept if intercept is not None else ds.get("RescaleIntercept")
  return (
    orientation,
    position,
    spacing,
    float(thickness or 1.0),
    float(1.0 if slope in (None, "") else slope),
    float(0.0 if intercept in (None, "") else intercept),
  )


def _check_decoder(ds, where: str) -> None:
  """A one-line error naming the transfer syntax and what to install, before pydicom fails
  with a multi-line one."""
  from pydicom.pixels import get_decoder

  syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
  if syntax is None:
    return
  try:
    decoder = get_decoder(syntax)
  except NotImplementedError:
    raise error(DataError, where, f"transfer syntax {syntax} cannot be decoded") from None
  if not decoder.is_available:
    package = _DECODER_PACKAGES.get(str(syntax), "python-gdcm")
    raise error(
      DataError,
      where,
      f"pixel data compressed as {syntax.name} ({syntax}) and no installed decoder reads it: "
      f"pip install {package}",
    )


def _pixels(ds, count: int, where: str) -> np.ndarray:
  """The stored values of all frames [frames, rows, cols]; the pixel data is then dropped
  from `ds`, which stays as the header."""
  if int(ds.get("SamplesPerPixel", 1)) != 1:
    raise error(DataError, where, f"colour image ({ds.SamplesPerPixel} samples per pixel)")
  _check_decoder(ds, where)
  try:
    stored = ds.pixel_array
  except Exception as exc:  # corrupt or truncated pixel data, decoder errors
    raise error(
      DataError, where, f"cannot decode pixel data ({type(exc).__name__}: {exc})"
    ) from exc
  for keyword in _PIXEL_KEYWORDS:
    if keyword in ds:
      delattr(ds, keyword)
  return stored.reshape(count, *stored.shape[-2:])


def _read_file(pydicom, path: str, source: str, name: str, index: int):
  """The dataset of one file (pixel data dropped) and its frames; `name` is how messages
  name the file (after the series `source`)."""
  where = f"{source}: {name}"
  try:
    with files.local_file(path) as local:
      ds = pydicom.dcmread(local)
  except Exception as exc:  # not DICOM, truncated
    raise error(DataError, where, f"cannot read DICOM file ({type(exc).__name__}: {exc})") from exc
  if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
    raise error(DataError, where, "no pixel data (not an image)")
  count = int(ds.get("NumberOfFrames", 1) or 1)
  enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
  geometry = [_geometry(ds, i, enhanced) for i in range(count)]
  if any(g is None for g in geometry):
    raise error(
      DataError,
      where,
      "no ImageOrientationPatient/ImagePositionPatient/PixelSpacing: not a cross-sectional image",
    )
  stored = _pixels(ds, count, where)
  image_type = [str(v).upper() for v in ds.get("ImageType", [])]
  if "MOSAIC" in image_type:
    stored, geometry = mosaic.demosaic(ds, stored, geometry, where)
  localizer = "LOCALIZER" in image_type
  frames = []
  for number, (image, (orientation, position, spacing, thickness, slope, intercept)) in enumerate(
    zip(stored, geometry), start=1
  ):
    pixels = image.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    label = name if len(stored) == 1 else f"{name} frame {number}"
    frames.append(
      _Frame(index, number, pixels, orientation, position, spacing, thickness, localizer, label)
    )
  return ds, frames


def _same_orientation(a: np.ndarray, b: np.ndarray) -> bool:
  return bool(np.allclose(a, b, atol=ORIENTATION_TOLERANCE))


def _drop_localizers(frames: list[_Frame], source: str) -> tuple[list[_Frame], list[str]]:
  """Localizers (ImageType LOCALIZER, or a lone frame in another orientation than a stack)
  are skipped with a note; several frames in each of two orientations are an error."""
  skipped = [
    f"{source}: skipped localizer {f.name} (ImageType LOCALIZER)" for f in frames if f.localizer
  ]
  frames = [f for f in frames if not f.localizer]
  groups: list[list[_Frame]] = []
  for frame in frames:
    for group in groups:
      if _same_orientation(group[0].orientation, frame.orientation):
        group.append(frame)
        break
    else:
      groups.append([frame])
  groups.sort(key=len, reverse=True)
  if not groups:
    raise error(DataError, source, "holds only localizer images")
  if len(groups) > 1 and (len(groups[0]) == 1 or len(groups[1]) > 1):
    found = ", ".join(f"{len(g)} along {np.round(g[0].orientation, 3).tolist()}" for g in groups)
    raise error(DataError, source, f"slices in {len(groups)} orientations mixed: {found}")
  for group in groups[1:]:
    skipped.append(
      f"{source}: skipped localizer {group[0].name} (a lone slice in another orientation)"
    )
  return groups[0], skipped


def _check_grid(frames: list[_Frame], source: str) -> None:
  """Every frame must have the same size and pixel spacing."""
  kinds: dict[tuple, int] = {}
  for frame in frames:
    key = (*frame.pixels.shape, *np.round(frame.spacing, 4))
    kinds[key] = kinds.get(key, 0) + 1
  if len(kinds) > 1:
    found = ", ".join(
      f"{rows}x{cols} at {dr:g}x{dc:g} mm ({n})" for (rows, cols, dr, dc), n in kinds.items()
    )
    raise error(DataError, source, f"slices of different size or pixel spacing mixed: {found}")


def _slice_step(frames: list[_Frame], normal: np.ndarray, source: str) -> np.ndarray:
  """The vector between consecutive slices (sorted along the normal); a tilted stack,
  duplicate positions, missing slices and uneven spacing are errors."""
  if len(frames) == 1:
    return normal * frames[0].thickness
  positions = np.array([f.position for f in frames])
  along = positions @ normal
  drift = positions - positions[0] - np.outer(along - along[0], normal)
  shift = float(np.linalg.norm(drift, axis=1).max())
  if shift > TILT_TOLERANCE * float(frames[0].spacing.min()):
    angle = np.degrees(np.arctan2(np.linalg.norm(drift[-1]), along[-1] - along[0]))
    raise error(
      DataError,
      source,
      f"gantry tilt: slice positions drift {shift:.3g} mm in-plane ({angle:.2g} degrees off the "
      "slice normal); resample it onto an untilted grid first",
    )
  gaps = np.diff(along)
  step = float(gaps.min())
  if step < 1e-3:
    repeated = int((gaps < 1e-3).sum())
    raise error(
      DataError,
      source,
      f"{_count(repeated, 'slice')} {'repeats' if repeated == 1 else 'repeat'} another's "
      "position (several acquisitions, echoes or phases in one series)",
    )
  ratios = gaps / step
  if np.abs(ratios - 1).max() <= SPACING_TOLERANCE:
    return (positions[-1] - positions[0]) / (len(frames) - 1)
  whole = np.round(ratios)
  if np.abs(ratios - whole).max() <= SPACING_TOLERANCE:
    first, missing = int(np.argmax(whole > 1)), int((whole - 1).sum())
    raise error(
      DataError,
      source,
      f"{missing} missing slice{'s' * (missing > 1)}: a gap of {gaps[first]:.4g} mm after "
      f"{frames[first].name} where slices are {step:.4g} mm apart",
    )
  raise error(DataError, source, f"uneven slice spacing {gaps.min():.4g}..{gaps.max():.4g} mm")


def _stack(frames: list[_Frame], source: str) -> tuple[list[_Frame], np.ndarray, list[str]]:
  """The kept frames in slice order and the grid's RAS affine; voxel axes (column, row,
  slice), the usual DICOM-to-NIfTI layout."""
  frames, skipped = _drop_localizers(frames, source)
  _check_grid(frames, source)
  row_dir, col_dir = (v / np.linalg.norm(v) for v in np.split(frames[0].orientation, 2))
  if abs(row_dir @ col_dir) > ORIENTATION_TOLERANCE:
    raise error(DataError, source, "ImageOrientationPatient rows and columns are not perpendicular")
  normal = np.cross(row_dir, col_dir)
  frames = sorted(frames, key=lambda f: float(f.position @ normal))
  step = _slice_step(frames, normal, source)
  spacing = frames[0].spacing
  affine = np.eye(4)
  # Along a row the column index grows (spacing[1]); down a column the row index grows.
  affine[:3, 0] = row_dir * spacing[1]
  affine[:3, 1] = col_dir * spacing[0]
  affine[:3, 2] = step
  affine[:3, 3] = frames[0].position
  return frames, LPS_TO_RAS @ affine, skipped


def _count(n: int, noun: str) -> str:
  """'1 slice', '2 slices'."""
  return f"{n} {noun}{'' if n == 1 else 's'}"


def _check_copy(first: list[_Frame], copy: list[_Frame], source: str) -> None:
  """A second file of one SOPInstanceUID is a copy (CDs and PACS exports hold them) only if
  its frames are the first's, pixels and positions alike; anything else is an error, since
  which of the two is the instance cannot be told."""
  same = len(first) == len(copy) and all(
    a.pixels.shape == b.pixels.shape
    and np.array_equal(a.pixels, b.pixels)
    and np.allclose(a.position, b.position)
    for a, b in zip(first, copy)
  )
  if not same:
    raise error(
      DataError,
      source,
      f"{first[0].name} and {copy[0].name} hold the same SOPInstanceUID with different pixels "
      "or positions",
    )


def read_files(paths, source: str, root: str | None = None) -> DicomImage:
  """Read the DICOM files `paths` (one series) onto one grid; `source` names the series in
  errors and `root` shortens file names in them (relative paths)."""
  pydicom = import_pydicom()
  if not paths:
    raise error(DataError, source, "no DICOM files")
  headers, frames, seen, copies = [], [], {}, []
  for index, path in enumerate(paths):
    name = os.path.relpath(path, root) if root and not files.is_remote(path) else path
    ds, found = _read_file(pydicom, path, source, name, index)
    headers.append(ds)
    uid = str(ds.get("SOPInstanceUID", "")) or None
    if uid in seen:
      _check_copy(seen[uid], found, source)
      copies.append(name)
      continue
    seen[uid] = found
    frames += found
  frames, affine, skipped = _stack(frames, source)
  if copies:
    shown = ", ".join(copies[:3]) + (", ..." if len(copies) > 3 else "")
    skipped.append(f"{source}: dropped {_count(len(copies), 'duplicate file')} ({shown})")
  kept = sorted({f.header for f in frames})
  renumber = {old: new for new, old in enumerate(kept)}
  stack = np.stack([f.pixels.T for f in frames], axis=-1)
  return DicomImage(
    volume=from_array(stack, affine, source=source),
    headers=[headers[i] for i in kept],
    paths=[paths[i] for i in kept],
    frames=[(renumber[f.header], f.number) for f in frames],
    skipped=skipped,
    source=source,
  )


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


def read_dicom_series(dicom_dir: str, mask_dir: str | None = None) -> tuple[Volume, Volume | None]:
  """Read a CHAOS DICOM series (*.dcm) and its PNG masks (raw grey values) as canonical Volumes.

  Masks are paired with DICOM files by sorted file name (CHAOS gives each mask the stem of
  its slice), then follow their slice into position order.
  """
  slice_files = files.glob(dicom_dir, "*.dcm")
  if not slice_files:
    raise error(DataError, dicom_dir, "no DICOM slices (*.dcm) found")
  image = read_files(slice_files, dicom_dir, root=dicom_dir)
  if mask_dir is None:
    return image.volume, None
  masks = files.glob(mask_dir, "*.png")
  if len(masks) != len(slice_files):
    raise error(
      DataError,
      mask_dir,
      f"{len(masks)} PNG masks for {len(slice_files)} DICOM slices in {dicom_dir}",
    )
  mask_of = {path: mask for path, mask in zip(slice_files, masks)}
  shape = (int(image.headers[0].Rows), int(image.headers[0].Columns))
  labels = np.stack(
    [_read_mask(mask_of[image.paths[i]], shape).T for i, _ in image.frames], axis=-1
  )
  return image.volume, from_array(labels, image.volume.affine, source=mask_dir)
