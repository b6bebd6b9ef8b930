"""Dataset adapters: find the labelled cases of a public dataset layout and read them.

Each adapter knows one layout on disk and the label codes of its annotations; it hands out
`Case` records (paths only, cheap to list) and reads a case into canonical `Volume`s whose
label array holds class indices 0..C-1 in the order of `Adapter.classes`. Datasets whose
CT and MR parts come from different collections (BTCV + CHAOS) map onto one class list, so
the two modalities share a label space, which the shared network and the distillation loss
need.

Layout problems (missing folders, unpaired files, unknown label codes) raise `DataError`
rather than skipping cases: a silently smaller training set is hard to notice later.
"""

from __future__ import annotations

import dataclasses
import glob
import inspect
import json
import os
import random
import re
from collections.abc import Callable

import numpy as np

from ukd.data.volumes import DataError, Volume, from_array, read_image, read_label

SPLIT_NAMES = ("train", "val", "test")
_NIFTI = re.compile(r"^(?P<stem>.+?)\.nii(\.gz)?$")


def _error(source, problem: str) -> DataError:
  """One-line message naming the offending path first."""
  return DataError(f"{source}: {' '.join(str(problem).split())}")


@dataclasses.dataclass(frozen=True)
class Case:
  """One labelled volume: identity and where its files are; nothing is loaded yet."""

  id: str
  modality: str
  image: str
  label: str | None


class Adapter:
  """One dataset layout; subclasses set `classes` and implement `cases` and `read`.

  `ignore_unknown_labels=True` maps label codes the adapter does not know to background
  instead of failing, for datasets with stray annotation codes.
  """

  classes: tuple[str, ...] = ("background",)

  def __init__(self, *, ignore_unknown_labels: bool = False):
    self.ignore_unknown_labels = bool(ignore_unknown_labels)

  def cases(self, root: str) -> list[Case]:
    """All labelled cases of every modality under `root`."""
    raise NotImplementedError

  def read(self, case: Case) -> tuple[Volume, Volume | None]:
    """Image (float32) and label (class indices) of a case, both canonical."""
    raise NotImplementedError

  def _read_nifti(self, case: Case, lookup: Callable[[int], int | None]):
    """Shared NIfTI path: label geometry checked against its image, codes mapped."""
    image = read_image(case.image)
    if case.label is None:
      return image, None
    label = read_label(case.label, like=image)
    return image, map_labels(label, lookup, self.ignore_unknown_labels)


_REGISTRY: dict[str, type[Adapter]] = {}


def register(name: str):
  """Make an adapter class available to `get_adapter` (and so to configs) by name."""

  def add(cls):
    _REGISTRY[name] = cls
    return cls

  return add


def get_adapter(name: str, **options) -> Adapter:
  """Build the adapter registered as `name`; unknown names/options are DataErrors."""
  if name not in _REGISTRY:
    raise _error(f"dataset '{name}'", f"unknown adapter; known: {sorted(_REGISTRY)}")
  cls = _REGISTRY[name]
  try:
    inspect.signature(cls).bind(**options)
  except TypeError as exc:
    raise _error(f"dataset '{name}' options {sorted(options)}", str(exc)) from None
  return cls(**options)


def map_labels(
  label: Volume, lookup: Callable[[int], int | None], ignore_unknown: bool = False
) -> Volume:
  """Replace raw label codes by class indices; `lookup` returns None for unknown codes."""
  codes, inverse = np.unique(label.array, return_inverse=True)
  indices = [lookup(int(code)) for code in codes]
  unknown = [int(code) for code, index in zip(codes, indices) if index is None]
  if unknown and not ignore_unknown:
    raise _error(
      label.source,
      f"unknown label codes {unknown}; set ignore_unknown_labels=True to treat them as background",
    )
  table = np.array([0 if index is None else index for index in indices], np.int32)
  mapped = table[inverse].reshape(label.array.shape)
  return dataclasses.replace(label, array=mapped)


# ----------------------------------------------------------------------------------------
# Listing helpers
# ----------------------------------------------------------------------------------------


def _require_dir(path: str, what: str) -> str:
  if not os.path.isdir(path):
    raise _error(path, f"{what} not found")
  return path


def _visible(folder: str) -> list[str]:
  """Entries of a folder without hidden files (.DS_Store and the like)."""
  return sorted(name for name in os.listdir(folder) if not name.startswith("."))


def _match_files(folder: str, pattern: str) -> dict[str, str]:
  """{key: path} for NIfTI files in `folder` whose stem fully matches `pattern` (group 1).

  NIfTI files with other names are errors: they are probably cases under a name this
  adapter does not expect, and skipping them would shrink the dataset unnoticed.
  """
  found = {}
  for name in _visible(_require_dir(folder, "folder")):
    nifti = _NIFTI.match(name)
    if nifti is None:
      continue
    key = re.fullmatch(pattern, nifti.group("stem"))
    if key is None:
      raise _error(os.path.join(folder, name), f"unexpected file name (expected {pattern})")
    if key.group(1) in found:
      raise _error(os.path.join(folder, name), f"same case as {found[key.group(1)]}")
    found[key.group(1)] = os.path.join(folder, name)
  return found


def _pair(images: dict[str, str], labels: dict[str, str], modality: str, where: str, make_id):
  """Cases from {key: path} dicts; an image without label (or vice versa) is an error."""
  for key, path in images.items():
    if key not in labels:
      raise _error(path, "image has no matching label file")
  for key, path in labels.items():
    if key not in images:
      raise _error(path, "label has no matching image file")
  if not images:
    raise _error(where, f"no {modality} cases found")
  return [Case(make_id(key), modality, images[key], labels[key]) for key in sorted(images)]


def _check_modalities(modalities, allowed: tuple[str, ...], adapter: str) -> tuple[str, ...]:
  modalities = tuple(modalities)
  if not modalities or any(m not in allowed for m in modalities):
    raise _error(f"{adapter} option modalities={modalities}", f"choose from {allowed}")
  return modalities


def _require_root(root) -> str:
  root = os.fspath(root)
  return _require_dir(root, "dataset root")


# ----------------------------------------------------------------------------------------
# MM-WHS 2017 (cardiac CT and MR)
# ----------------------------------------------------------------------------------------

# The four structures used by Dou et al.; the other annotated structures (550 RV cavity,
# 600 RA cavity, 850 pulmonary artery) become background. Code 421 (seen as a left-atrium
# variant in some copies) is deliberately not listed: it is not in the official code table,
# so it is reported instead of guessed.
MMWHS_CODES = {0: 0, 205: 1, 420: 2, 500: 3, 820: 4, 550: 0, 600: 0, 850: 0}


@register("mmwhs")
class MMWHSAdapter(Adapter):
  """MM-WHS 2017 as distributed: <root>/{ct,mr}_train/<mod>_train_<n>_{image,label}.nii.gz."""

  classes = ("background", "MYO", "LAC", "LVC", "AA")

  def __init__(self, *, modalities=("ct", "mr"), ignore_unknown_labels: bool = False):
    super().__init__(ignore_unknown_labels=ignore_unknown_labels)
    self.modalities = _check_modalities(modalities, ("ct", "mr"), "mmwhs")

  def cases(self, root: str) -> list[Case]:
    root = _require_root(root)
    return [case for m in self.modalities for case in _mmwhs_cases(root, m)]

  def read(self, case: Case) -> tuple[Volume, Volume | None]:
    return self._read_nifti(case, MMWHS_CODES.get)


def _mmwhs_cases(root: str, modality: str) -> list[Case]:
  """MM-WHS keeps image and label side by side, told apart by the _image/_label suffix."""
  folder = _require_dir(os.path.join(root, f"{modality}_train"), f"{modality} training folder")
  files = _match_files(folder, r"(.+_(?:image|label))")
  images = {k[: -len("_image")]: p for k, p in files.items() if k.endswith("_image")}
  labels = {k[: -len("_label")]: p for k, p in files.items() if k.endswith("_label")}
  return _pair(images, labels, modality, folder, lambda key: key)


# ----------------------------------------------------------------------------------------
# Abdominal: BTCV CT + CHAOS T2-SPIR MR
# ----------------------------------------------------------------------------------------

ABDOMINAL_CLASSES = ("background", "liver", "right_kidney", "left_kidney", "spleen")

# BTCV: 1 spleen, 2 right kidney, 3 left kidney, 6 liver; 4 gallbladder, 5 esophagus,
# 7 stomach, 8 aorta, 9 IVC, 10 portal/splenic vein, 11 pancreas, 12/13 adrenal glands are
# not annotated in CHAOS and so become background.
BTCV_CODES = {0: 0, 6: 1, 2: 2, 3: 3, 1: 4, **{code: 0 for code in (4, 5, 7, 8, 9, 10, 11, 12, 13)}}

# CHAOS masks nominally use 63/126/189/252 but document value ranges (resampled or
# re-saved PNGs drift); the NIfTI conversions accepted here use the same grey values.
CHAOS_RANGES = ((55, 70, 1), (110, 135, 2), (175, 200, 3), (240, 255, 4))


def chaos_class(code: int) -> int | None:
  """CHAOS grey value -> class index (ranges from the CHAOS documentation)."""
  if code == 0:
    return 0
  for low, high, index in CHAOS_RANGES:
    if low <= code <= high:
      return index
  return None


@register("abdominal")
class AbdominalAdapter(Adapter):
  """BTCV CT (NIfTI) and CHAOS T2-SPIR MR (DICOM + PNG masks, or NIfTI conversions).

  CT: <root>/<ct_dir>/img/imgNNNN.nii.gz + label/labelNNNN.nii.gz, or the distributed
  <root>/<ct_dir>/RawData/Training/{img,label}/.
  MR: <root>/<mr_dir>/Train_Sets/MR/<patient>/T2SPIR/{DICOM_anon/*.dcm, Ground/*.png},
  or <root>/<mr_dir>/{images,labels}/<name>.nii.gz with the CHAOS grey values as codes.
  """

  classes = ABDOMINAL_CLASSES

  def __init__(
    self,
    *,
    ct_dir: str = "BTCV",
    mr_dir: str = "CHAOS",
    modalities=("ct", "mr"),
    ignore_unknown_labels: bool = False,
  ):
    super().__init__(ignore_unknown_labels=ignore_unknown_labels)
    self.ct_dir, self.mr_dir = ct_dir, mr_dir
    self.modalities = _check_modalities(modalities, ("ct", "mr"), "abdominal")

  def cases(self, root: str) -> list[Case]:
    root = _require_root(root)
    listers = {"ct": self._btcv_cases, "mr": self._chaos_cases}
    return [case for m in self.modalities for case in listers[m](root)]

  def _btcv_cases(self, root: str) -> list[Case]:
    base = os.path.join(root, self.ct_dir)
    for sub in ("", os.path.join("RawData", "Training")):
      if os.path.isdir(os.path.join(base, sub, "img")):
        folder = os.path.join(base, sub)
        break
    else:
      raise _error(base, "no BTCV img/ or RawData/Training/img/ folder found")
    images = _match_files(os.path.join(folder, "img"), r"img(\d+)")
    label_dir = _require_dir(os.path.join(folder, "label"), "BTCV label folder")
    labels = _match_files(label_dir, r"label(\d+)")
    return _pair(images, labels, "ct", folder, lambda key: f"btcv_{key}")

  def _chaos_cases(self, root: str) -> list[Case]:
    base = os.path.join(root, self.mr_dir)
    dicom_root = os.path.join(base, "Train_Sets", "MR")
    if os.path.isdir(dicom_root):
      return _chaos_dicom_cases(dicom_root)
    if os.path.isdir(os.path.join(base, "images")):
      images = _match_files(os.path.join(base, "images"), r"(.+)")
      label_dir = _require_dir(os.path.join(base, "labels"), "CHAOS labels folder")
      labels = _match_files(label_dir, r"(.+)")
      return _pair(images, labels, "mr", base, lambda key: f"chaos_{key}")
    raise _error(base, "no CHAOS Train_Sets/MR/ or images/ folder found")

  def read(self, case: Case) -> tuple[Volume, Volume | None]:
    if case.modality == "ct":
      return self._read_nifti(case, BTCV_CODES.get)
    if os.path.isdir(case.image):
      image, label = read_dicom_series(case.image, case.label)
      if label is not None:
        label = map_labels(label, chaos_class, self.ignore_unknown_labels)
      return image, label
    return self._read_nifti(case, chaos_class)


def _chaos_dicom_cases(dicom_root: str) -> list[Case]:
  """One case per patient folder; a patient without T2-SPIR DICOMs or masks is an error."""
  cases = []
  for patient in _visible(dicom_root):
    series = os.path.join(dicom_root, patient, "T2SPIR")
    dicom_dir = os.path.join(series, "DICOM_anon")
    if not glob.glob(os.path.join(dicom_dir, "*.dcm")):
      raise _error(dicom_dir, "no T2-SPIR DICOM slices (*.dcm) found")
    ground = os.path.join(series, "Ground")
    if not glob.glob(os.path.join(ground, "*.png")):
      raise _error(ground, "image has no label: no PNG masks found")
    cases.append(Case(f"chaos_{patient}", "mr", dicom_dir, ground))
  if not cases:
    raise _error(dicom_root, "no mr cases found")
  return cases


# ----------------------------------------------------------------------------------------
# DICOM series + PNG masks (CHAOS)
# ----------------------------------------------------------------------------------------

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
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.astype(np.float32)
    orientation = np.array(ds.ImageOrientationPatient, dtype=np.float64)
    position = np.array(ds.ImagePositionPatient, dtype=np.float64)
    spacing = np.array(ds.PixelSpacing, dtype=np.float64)
  except Exception as exc:  # unreadable file, missing tag or pixel data
    raise _error(path, f"cannot read DICOM slice ({type(exc).__name__}: {exc})") from exc
  shapes = (pixels.ndim, orientation.shape, position.shape, spacing.shape)
  if shapes != (2, (6,), (3,), (2,)):
    raise _error(path, "DICOM slice is not a single 2D frame with full geometry tags")
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
    with Image.open(path) as picture:
      mask = np.asarray(picture)
  except Exception as exc:
    raise _error(path, f"cannot read PNG mask ({type(exc).__name__}: {exc})") from exc
  if mask.shape != shape:
    raise _error(path, f"mask shape {mask.shape} differs from the DICOM slice shape {shape}")
  return mask.astype(np.int32)


def _slice_step(positions: np.ndarray, normal: np.ndarray, thickness: float, folder: str):
  """Vector between consecutive sorted slices; uneven or repeated slices are errors."""
  if len(positions) == 1:
    return normal * thickness
  gaps = np.diff(positions @ normal)
  if gaps.min() < 1e-3:
    raise _error(folder, "two DICOM slices share a position")
  if gaps.max() - gaps.min() > 0.01 * gaps.mean():
    raise _error(folder, f"uneven slice spacing {gaps.min():.4g}..{gaps.max():.4g} mm")
  return (positions[-1] - positions[0]) / (len(positions) - 1)


def read_dicom_series(dicom_dir: str, mask_dir: str | None = None) -> tuple[Volume, Volume | None]:
  """Read a DICOM series (and its PNG masks, raw grey values) as canonical Volumes.

  Slices are ordered by ImagePositionPatient along the slice normal, not by file name,
  because CHAOS file numbering need not follow anatomy. Masks are paired with DICOM files
  by sorted file name (CHAOS gives each mask the stem of its slice) before that ordering.
  Voxel axes before reorientation: column, row, slice - the usual DICOM-to-NIfTI layout.
  """
  pydicom = _import_pydicom()
  files = sorted(glob.glob(os.path.join(dicom_dir, "*.dcm")))
  if not files:
    raise _error(dicom_dir, "no DICOM slices (*.dcm) found")
  slices = [_read_slice(pydicom, path) for path in files]
  pixels, orientation, _, spacing, thickness = slices[0]
  for path, (other, other_orientation, _, other_spacing, _) in zip(files, slices):
    if (
      other.shape != pixels.shape
      or not np.allclose(other_orientation, orientation, atol=1e-4)
      or not np.allclose(other_spacing, spacing, atol=1e-4)
    ):
      raise _error(path, f"slice geometry differs from {files[0]}")
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
  masks = sorted(glob.glob(os.path.join(mask_dir, "*.png")))
  if len(masks) != len(files):
    raise _error(mask_dir, f"{len(masks)} PNG masks for {len(files)} DICOM slices in {dicom_dir}")
  labels = np.stack([_read_mask(masks[i], pixels.shape).T for i in order], axis=-1)
  return image, from_array(labels, affine, source=mask_dir)


# ----------------------------------------------------------------------------------------
# Folder: nnU-Net style imagesTr / labelsTr / dataset.json, one folder per modality
# ----------------------------------------------------------------------------------------


def _read_dataset_json(path: str) -> tuple[tuple[str, ...], str]:
  """Class names (by index) and file ending from an nnU-Net v1 or v2 dataset.json."""
  try:
    with open(path) as f:
      meta = json.load(f)
    labels = meta["labels"]
  except (OSError, ValueError, KeyError, TypeError) as exc:
    problem = f"cannot read dataset.json labels ({type(exc).__name__}: {exc})"
    raise _error(path, problem) from exc
  if not isinstance(labels, dict) or not labels:
    raise _error(path, "'labels' must be a non-empty mapping")
  if all(str(key).isdigit() for key in labels):  # v1: {"0": "background", ...}
    by_index = {int(key): str(name) for key, name in labels.items()}
  else:  # v2: {"background": 0, ...}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
      raise _error(path, "label values must be integers (region-based labels unsupported)")
    by_index = {int(index): str(name) for name, index in labels.items()}
  if sorted(by_index) != list(range(len(by_index))) or len(by_index) != len(labels):
    raise _error(path, f"label indices must be 0..C-1 without gaps, got {sorted(by_index)}")
  classes = tuple(by_index[i] for i in range(len(by_index)))
  if classes[0] != "background":
    raise _error(path, f"label 0 must be 'background', got '{classes[0]}'")
  return classes, str(meta.get("file_ending", ".nii.gz"))


@register("folder")
class FolderAdapter(Adapter):
  """nnU-Net style folders, one per modality: imagesTr/<case>_0000<ext>, labelsTr/<case><ext>.

  `modalities` maps a modality name to its folder (absolute or relative to the root).
  Class names come from each folder's dataset.json and must agree across modalities,
  because all modalities share one network head. They are known after `cases(root)`.
  """

  def __init__(self, *, modalities: dict[str, str], ignore_unknown_labels: bool = False):
    super().__init__(ignore_unknown_labels=ignore_unknown_labels)
    if not isinstance(modalities, dict) or not modalities:
      raise _error(f"folder option modalities={modalities!r}", "must map modality names to folders")
    self.modalities = dict(modalities)
    self._classes: tuple[str, ...] | None = None

  @property
  def classes(self) -> tuple[str, ...]:
    if self._classes is None:
      raise DataError("folder dataset: class names come from dataset.json; call cases(root) first")
    return self._classes

  def cases(self, root: str) -> list[Case]:
    root = _require_root(root)
    cases, agreed, agreed_at = [], None, None
    for modality, folder in self.modalities.items():
      folder = os.path.join(root, os.fspath(folder))
      _require_dir(folder, f"{modality} dataset folder")
      meta_path = os.path.join(folder, "dataset.json")
      classes, ending = _read_dataset_json(meta_path)
      if agreed is not None and classes != agreed:
        raise _error(
          meta_path, f"classes {list(classes)} differ from {list(agreed)} in {agreed_at}"
        )
      agreed, agreed_at = classes, meta_path
      cases += _folder_cases(folder, modality, ending)
    self._classes = agreed
    return cases

  def read(self, case: Case) -> tuple[Volume, Volume | None]:
    count = len(self.classes)
    return self._read_nifti(case, lambda code: code if 0 <= code < count else None)


def _folder_cases(folder: str, modality: str, ending: str) -> list[Case]:
  """Pair imagesTr/<case>_0000 with labelsTr/<case>; other channels are not supported."""
  image_dir = _require_dir(os.path.join(folder, "imagesTr"), "imagesTr folder")
  label_dir = _require_dir(os.path.join(folder, "labelsTr"), "labelsTr folder")
  images, labels = {}, {}
  for name in _visible(image_dir):
    match = re.fullmatch(r"(.+)_(\d{4})" + re.escape(ending), name)
    if match is None:
      raise _error(os.path.join(image_dir, name), f"expected <case>_0000{ending}")
    if match.group(2) != "0000":
      raise _error(os.path.join(image_dir, name), "only single-channel cases (_0000) are supported")
    images[match.group(1)] = os.path.join(image_dir, name)
  for name in _visible(label_dir):
    if not name.endswith(ending):
      raise _error(os.path.join(label_dir, name), f"expected <case>{ending}")
    labels[name[: -len(ending)]] = os.path.join(label_dir, name)
  return _pair(images, labels, modality, folder, lambda key: key)


# ----------------------------------------------------------------------------------------
# Train / val / test splits
# ----------------------------------------------------------------------------------------


def _ids_by_modality(cases) -> dict[str, list[str]]:
  ids: dict[str, list[str]] = {}
  for case in cases:
    ids.setdefault(case.modality, []).append(case.id)
  for modality, names in ids.items():
    if len(set(names)) != len(names):
      raise DataError(f"cases: duplicate case ids in modality '{modality}'")
  if not ids:
    raise DataError("cases: the dataset has no cases")
  return {modality: sorted(names) for modality, names in ids.items()}


def _split_sizes(count: int, fractions) -> list[int]:
  """Largest-remainder rounding; with >= 3 cases no requested split is left empty."""
  exact = [count * f for f in fractions]
  sizes = [int(x) for x in exact]
  by_remainder = sorted(range(3), key=lambda i: exact[i] - sizes[i], reverse=True)
  for i in by_remainder[: count - sum(sizes)]:
    sizes[i] += 1
  if count >= 3:
    for i in range(3):
      if sizes[i] == 0 and fractions[i] > 0:
        sizes[sizes.index(max(sizes))] -= 1
        sizes[i] = 1
  return sizes


def _make_splits(ids: dict[str, list[str]], seed: int, fractions) -> dict:
  """Seeded shuffle per modality; string seeds keep it identical across processes."""
  splits = {}
  for modality, names in ids.items():
    order = list(names)
    random.Random(f"{seed}/{modality}").shuffle(order)
    sizes = _split_sizes(len(order), fractions)
    bounds = np.cumsum([0] + sizes)
    splits[modality] = {
      split: sorted(order[bounds[i] : bounds[i + 1]]) for i, split in enumerate(SPLIT_NAMES)
    }
  return splits


def _load_splits(path: str, ids: dict[str, list[str]]) -> dict:
  """Read a split file and check it covers exactly the current cases, each once."""
  try:
    with open(path) as f:
      splits = json.load(f)
  except (OSError, ValueError) as exc:
    raise _error(path, f"cannot read split file ({type(exc).__name__}: {exc})") from exc
  if not isinstance(splits, dict) or set(splits) != set(ids):
    names = sorted(splits) if isinstance(splits, dict) else type(splits).__name__
    raise _error(path, f"split modalities {names} differ from the dataset's {sorted(ids)}")
  result = {}
  for modality, parts in splits.items():
    if not isinstance(parts, dict) or set(parts) != set(SPLIT_NAMES):
      raise _error(path, f"'{modality}' must have exactly the keys {list(SPLIT_NAMES)}")
    listed = [name for split in SPLIT_NAMES for name in parts[split]]
    unknown = sorted(set(listed) - set(ids[modality]))
    if unknown:
      raise _error(path, f"{modality} case ids not in the dataset: {unknown}")
    if len(set(listed)) != len(listed):
      raise _error(path, f"{modality} has case ids in more than one split")
    missing = sorted(set(ids[modality]) - set(listed))
    if missing:
      raise _error(path, f"{modality} cases in no split: {missing}")
    result[modality] = {split: sorted(parts[split]) for split in SPLIT_NAMES}
  return result


def _write_json(path: str, value) -> None:
  """Write via a temporary file so an interrupted run never leaves half a split file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  temporary = f"{path}.tmp"
  with open(temporary, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(temporary, path)


def load_or_make_splits(
  workdir, cases, *, seed: int, fractions=(0.6, 0.2, 0.2), split_file=None
) -> dict:
  """{modality: {'train': ids, 'val': ids, 'test': ids}}, fixed for the life of a workdir.

  The split is saved as <workdir>/splits.json and reused, so a resumed or re-evaluated run
  can never test on cases it trained on. A user `split_file` is validated and copied
  there; it must agree with a split the workdir already holds.
  """
  ids = _ids_by_modality(cases)
  fractions = tuple(float(f) for f in fractions)
  if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
    raise DataError(f"fractions={fractions}: need three non-negative numbers summing to 1")
  saved = os.path.join(os.fspath(workdir), "splits.json")
  if split_file is not None:
    splits = _load_splits(os.fspath(split_file), ids)
    if os.path.exists(saved) and _load_splits(saved, ids) != splits:
      raise _error(saved, f"differs from split_file {split_file}; use a new workdir")
  elif os.path.exists(saved):
    return _load_splits(saved, ids)
  else:
    splits = _make_splits(ids, seed, fractions)
  _write_json(saved, splits)
  return splits
