"""Predictions as DICOM Segmentation objects (DICOM-SEG), and back, with highdicom.

A SEG is what a PACS or viewer shows over the series it was computed on: it references the
source images and their frame of reference, and describes each segment with coded concepts
(SNOMED CT) so software other than ukd knows what was segmented. Segment k is class k of the
model's class list, labelled with the class name; the algorithm (name 'ukd', its version and
the checkpoint's step) is recorded with each segment.

highdicom (and pydicom) are the optional `dicom` extra: `pip install 'ukd[dicom]'`.
"""

from __future__ import annotations

import os

import numpy as np

from ukd import files
from ukd.data.io import dicom_series
from ukd.data.io.dicom import DicomImage
from ukd.data.io.volumes import Volume, from_array
from ukd.errors import DataError, error

# Grids closer than this fraction of a voxel are the same grid: DICOM decimal strings and
# float32 NIfTI affines round positions far below it.
GRID_TOLERANCE = 0.01

# Segmented property (category, type) of each class, per dataset: the name of a SNOMED CT
# concept in pydicom's `codes.SCT`, or (code value, meaning) for the few it lacks. Classes
# not listed (a folder dataset's own classes) are coded as generic tissue (`TISSUE`).
_ANATOMY = "AnatomicalStructure"
SEG_CODES = {
  "mmwhs": {
    "MYO": (_ANATOMY, "LeftVentricleMyocardium"),  # MM-WHS label 205: the LV myocardium
    "LAC": (_ANATOMY, "LeftAtrium"),  # blood cavities: the chamber (DICOM CID 7152)
    "LVC": (_ANATOMY, "LeftVentricle"),
    "AA": (_ANATOMY, "AscendingAorta"),
  },
  "abdominal": {
    "liver": (_ANATOMY, "Liver"),
    "right_kidney": (_ANATOMY, ("9846003", "Right kidney")),
    "left_kidney": (_ANATOMY, ("18639004", "Left kidney")),
    "spleen": (_ANATOMY, "Spleen"),
  },
}
TISSUE = ("Tissue", "Tissue")


def _import_highdicom():
  try:
    import highdicom
  except ImportError:
    raise DataError("DICOM-SEG needs highdicom: pip install 'ukd[dicom]'") from None
  return highdicom


def _concept(entry):
  """A SNOMED CT concept from its pydicom name or (code value, meaning)."""
  from pydicom.sr.codedict import codes
  from pydicom.sr.coding import Code

  if isinstance(entry, str):
    return getattr(codes.SCT, entry)
  value, meaning = entry
  return Code(value, "SCT", meaning)


def _multiframe(image: DicomImage) -> bool:
  """Whether the series is one multi-frame image (frames addressed by number), not a list
  of single-frame images."""
  return len(image.headers) == 1 and int(image.headers[0].get("NumberOfFrames", 1) or 1) > 1


def _source_frames(labels: np.ndarray, image: DicomImage) -> np.ndarray:
  """Canonical labels -> one frame per source image [len(headers), rows, cols], or per frame
  of one multi-frame source [NumberOfFrames, rows, cols] (a frame without a slice, such as a
  skipped localizer, stays 0): the arrangement highdicom pairs with its sources."""
  on_disk = image.volume.to_original(labels)  # (column, row, slice)
  first = image.headers[0]
  multiframe = _multiframe(image)
  count = int(first.NumberOfFrames) if multiframe else len(image.headers)
  frames = np.zeros((count, int(first.Rows), int(first.Columns)), on_disk.dtype)
  for k, (header, number) in enumerate(image.frames):
    frames[number - 1 if multiframe else header] = on_disk[:, :, k].T
  return frames


def write_seg(
  labels,
  image: DicomImage,
  out_path,
  class_names,
  codes_table=None,
  algorithm_version: str = "",
  step: int | None = None,
  series_number: int = 100,
  series_description: str = "ukd segmentation",
) -> None:
  """Write class indices `labels` (canonical, the shape of `image.volume.array`) as one
  BINARY DICOM-SEG of the series `image` at `out_path` (written atomically).

  One segment per foreground class of `class_names` (segment k = class k, labelled with its
  name, present or not), coded from `codes_table` (class name -> (category, type) as in
  SEG_CODES; missing classes are TISSUE).
  """
  hd = _import_highdicom()
  from pydicom.sr.codedict import codes

  out_path = os.fspath(out_path)
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
    raise error(
      DataError,
      out_path,
      f"labels {labels.min()}..{labels.max()} outside the {len(class_names)} classes",
    )
  if len(image.headers) > 1 and any(
    int(h.get("NumberOfFrames", 1) or 1) > 1 for h in image.headers
  ):
    raise error(DataError, image.source, "a SEG can reference one multi-frame image, not several")
  algorithm = hd.AlgorithmIdentificationSequence(
    name="ukd",
    family=codes.cid7162.ArtificialIntelligence,
    version=algorithm_version or "unknown",
    parameters=None if step is None else {"checkpoint_step": str(step)},
  )
  segments = []
  for index, name in enumerate(class_names[1:], start=1):
    category, kind = (codes_table or {}).get(name, TISSUE)
    segments.append(
      hd.seg.SegmentDescription(
        segment_number=index,
        segment_label=name,
        segmented_property_category=_concept(category),
        segmented_property_type=_concept(kind),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
      )
    )
  pixels = _source_frames(labels.astype(np.uint16 if len(class_names) > 256 else np.uint8), image)
  seg = hd.seg.Segmentation(
    source_images=image.headers,
    pixel_array=pixels,
    segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
    segment_descriptions=segments,
    series_instance_uid=hd.UID(),
    series_number=series_number,
    sop_instance_uid=hd.UID(),
    instance_number=1,
    manufacturer="ukd",
    manufacturer_model_name="ukd",
    software_versions=algorithm_version or "unknown",
    device_serial_number="0",
    content_description=series_description + ("" if step is None else f", checkpoint step {step}"),
    series_description=series_description,
  )
  with files.replacing(out_path) as tmp:
    seg.save_as(tmp)


def read_seg(path, image: DicomImage, class_names) -> np.ndarray:
  """The class indices of a DICOM-SEG of the series `image`, canonical like
  `image.volume.array` (int32): each segment becomes the class its label names, so a SEG is
  scored against a NIfTI reference read with `ukd.data.io.volumes.read_label` voxel by voxel."""
  hd = _import_highdicom()
  path = os.fspath(path)
  try:
    with files.local_file(path) as local:
      seg = hd.seg.segread(local)
  except Exception as exc:
    raise error(DataError, path, f"cannot read DICOM-SEG ({type(exc).__name__}: {exc})") from exc
  numbers = list(seg.get_segment_numbers())
  lookup = np.zeros(max(numbers, default=0) + 1, np.int32)
  for number in numbers:
    label = seg.get_segment_description(number).segment_label
    if label not in class_names:
      raise error(DataError, path, f"segment {number} '{label}' is not one of {list(class_names)}")
    lookup[number] = list(class_names).index(label)
  # A SEG leaves out empty frames: a source frame it does not reference holds no segment.
  options = {
    "segment_numbers": numbers,
    "combine_segments": True,
    "dtype": np.int32,
    "assert_missing_frames_are_empty": True,
  }
  try:
    if _multiframe(image):
      pixels = seg.get_pixels_by_source_frame(
        image.headers[0].SOPInstanceUID,
        source_frame_numbers=[number for _, number in image.frames],
        **options,
      )
    else:
      uids = [image.headers[header].SOPInstanceUID for header, _ in image.frames]
      pixels = seg.get_pixels_by_source_instance(uids, **options)
  except Exception as exc:  # other source series, overlapping segments
    raise error(
      DataError, path, f"cannot map onto {image.source} ({type(exc).__name__}: {exc})"
    ) from exc
  on_disk = np.stack([lookup[frame].T for frame in pixels], axis=-1)
  return from_array(on_disk, image.volume.affine, source=path).array


def read_reference(folder):
  """The one DICOM series of `--dicom_reference`, read before any prediction."""
  found = dicom_series.find_series(folder)
  if len(found) != 1:
    raise error(
      DataError, folder, f"--dicom_reference must hold one DICOM series, found {len(found)}"
    )
  return dicom_series.read_series(found[0])


def check_reference_grid(vol: Volume, reference, source: str) -> None:
  """A NIfTI's SEG refers to the reference series voxel by voxel: the grids must agree."""
  ref = reference.volume
  tolerance = GRID_TOLERANCE * min(vol.spacing)
  if vol.array.shape != ref.array.shape or not np.allclose(
    vol.canonical_affine(), ref.canonical_affine(), rtol=0, atol=tolerance
  ):
    raise error(
      DataError,
      source,
      f"not on the grid of the --dicom_reference series {reference.source} (shape "
      f"{vol.array.shape} vs {ref.array.shape}, or a different affine); a SEG must match its series",
    )
