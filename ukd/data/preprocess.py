"""Turn canonical volumes into network-space arrays, undo it for predictions, cache the result.

Network space is what every model sees: intensities normalised per modality, optionally cropped
in-plane, the slice axis last and the two in-plane axes either resized to ``data.size`` or, with
``data.spacing``, resampled to a fixed number of millimetres per pixel, so that an organ has one
size in pixels whatever the scanner, patient and modality.  ``prepare`` goes there, ``restore``
comes back, and ``geometry`` (JSON-able) is the only thing they share, so a prediction made days
later from a cache entry can still be written onto the original grid.

Settings (the ``data`` ConfigDict of a config `ukd.config.check` passed; defaults in brackets):
  size (256, 256)        in-plane network size (H, W)
  spacing ['']           in-plane target mm (`ukd.config_fields.spacing_for`); '' resizes to size.
                         Set, the crop box becomes round(extent mm / target) pixels per axis
                         (half up); a smaller plane is padded to size, centred, with the
                         volume's minimum (air: what lies outside a scanner's field of view,
                         where replicating the edge would smear a cut through the body into
                         stripes) and label 0; a larger plane is kept, and the pipeline and
                         the Segmenter slide windows of size over it
  slice_axis [2]         canonical (RAS) axis that indexes slices
  crop ['none']          'none' | 'body' (in-plane box around the body, found from the image
                         alone, so prediction crops as training did; all slices kept)
  crop_margin [8]        voxels added around the crop box
  norm {modality: dict}  'kind': 'window' -> clip to 'window' [(-1000, 1000)] and scale to [-1, 1];
                         'zscore' -> clip at 'percentiles' [(0.5, 99.5)], then zero mean, unit std.
The CT default window (-1000, 1000) HU keeps air to dense bone, so no soft tissue contrast is
clipped; narrower windows (e.g. (-125, 275) for the abdomen) are a config choice. Statistics
come from the whole volume before cropping, so intensities do not depend on the crop setting.
Cached labels are stored as uint8 (int32 only if a class index needs it); readers cast to int32.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import re

import numpy as np
import scipy.ndimage

from ukd import files
from ukd.data.io.volumes import Volume
from ukd.errors import DataError

# Bump when the content or layout of cache entries changes, so old entries are not reused.
# 2: geometry records the prepared plane and where the resampled crop lies in it.
# 3: images shrunk in-plane are smoothed first (`_resize`'s antialias).
CACHE_VERSION = 3

# 'body' crop: a voxel is body when it is above this fraction of the way from the minimum to the
# 99th percentile of the normalised volume (air and scanner padding sit at the minimum) ...
_BODY_LEVEL = 0.1
# ... in at least this fraction of the slices, so scattered background noise does not count.
_BODY_MIN_SLICES = 0.05


@dataclasses.dataclass
class Prepared:
  """Network-space arrays of one case plus the geometry that `restore` needs."""

  image: np.ndarray  # float32 [H, W, S]; H, W = data.size, or larger with data.spacing
  label: np.ndarray | None  # int32 [H, W, S]
  geometry: dict


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How one modality's volumes reach the network: everything that changes `prepare`'s
  output.  Resolved once from a checked config (`ukd.config.preprocessing`), so nothing here
  parses or re-checks a setting per volume."""

  size: tuple[int, int]  # data.size: the network's in-plane input
  slice_axis: int  # data.slice_axis of the canonical volume
  crop: str  # data.crop: 'none' or 'body'
  crop_margin: int
  norm: dict  # data.norm[modality], plain data
  spacing: tuple[float, float] | None  # data.spacing of this modality (mm); None: resize

  @classmethod
  def from_record(cls, record: dict) -> "Preprocessing":
    """The settings `record` wrote (an exported model's sidecar holds them)."""
    spacing = record["spacing"]
    return cls(
      size=tuple(record["size"]),
      slice_axis=int(record["slice_axis"]),
      crop=record["crop"],
      crop_margin=int(record["crop_margin"]),
      norm=dict(record["norm"]),
      spacing=None if spacing is None else tuple(spacing),
    )

  def record(self) -> dict:
    """The settings as plain data, as the cache key hashes them."""
    return dict(
      size=list(self.size),
      slice_axis=self.slice_axis,
      crop=self.crop,
      crop_margin=self.crop_margin,
      norm=self.norm,
      spacing=None if self.spacing is None else list(self.spacing),
    )


def normalise(array: np.ndarray, norm: dict) -> np.ndarray:
  """Bring one volume to a modality-independent range so shared kernels see similar inputs."""
  array = np.asarray(array, np.float32)
  if norm["kind"] == "window":
    lo, hi = (float(v) for v in norm["window"])
    return (np.clip(array, lo, hi) - lo) * np.float32(2.0 / (hi - lo)) - np.float32(1.0)
  lo, hi = np.percentile(array, [float(v) for v in norm["percentiles"]])
  array = np.clip(array, lo, hi)
  std = float(array.std())
  # A constant volume has no contrast to scale; centring it is all that can be done.
  return ((array - array.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


def _box_of(mask2d: np.ndarray, margin: int) -> list[list[int]]:
  """Half-open in-plane bounding box of a 2D mask plus margin; the whole plane when empty."""
  if not mask2d.any():
    return [[0, mask2d.shape[0]], [0, mask2d.shape[1]]]
  box = []
  for axis in (0, 1):
    hits = np.flatnonzero(mask2d.any(axis=1 - axis))
    box.append([max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask2d.shape[axis])])
  return box


def _body_mask(image: np.ndarray) -> np.ndarray:
  """In-plane pixels inside the body; works from the image alone, so also at inference."""
  lo, hi = float(image.min()), float(np.percentile(image, 99))
  above = image > lo + _BODY_LEVEL * (hi - lo)
  return above.sum(axis=-1) >= max(1.0, _BODY_MIN_SLICES * image.shape[-1])


def _crop_box(image: np.ndarray, crop: str, margin: int) -> list[list[int]]:
  """In-plane crop box in slice-last space (the slice axis is never cropped)."""
  if crop == "body":
    return _box_of(_body_mask(image), margin)
  return [[0, image.shape[0]], [0, image.shape[1]]]


def _resize(
  array: np.ndarray, shape: tuple[int, int], order: int, antialias: bool = False
) -> np.ndarray:
  """Resize the two leading axes to `shape`.

  Pixel-centre alignment (grid_mode) makes an integer up-and-down resize map every voxel back
  onto itself, and zoom factors taken from the shapes make the output shape exact both ways.
  `antialias` first blurs each axis that shrinks by k with a Gaussian of sigma (k - 1) / 2
  input pixels: a linear resize alone would take every output pixel from the two nearest
  input pixels and keep their full noise, so one anatomy scanned at 0.7 mm and at 1.4 mm
  would reach the network at one spacing but with two noise levels and aliased edges.
  """
  if tuple(array.shape[:2]) == tuple(shape):
    return np.array(array)
  factors = (shape[0] / array.shape[0], shape[1] / array.shape[1]) + (1.0,) * (array.ndim - 2)
  if antialias and min(factors) < 1:
    sigma = [max(0.0, (1.0 / f - 1.0) / 2.0) for f in factors]
    array = scipy.ndimage.gaussian_filter(array, sigma, mode="nearest")
  return scipy.ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True)


def _plane_layout(box, plane_spacing, s) -> tuple[list[int], list[int], list[list[int]]]:
  """(resampled crop box shape, prepared plane, where the resampled box lies in the plane)."""
  extent = [hi - lo for lo, hi in box]
  if s["spacing"] is None:
    return list(s["size"]), list(s["size"]), [[0, n] for n in s["size"]]
  resampled = [
    max(1, math.floor(n * mm / target + 0.5))
    for n, mm, target in zip(extent, plane_spacing, s["spacing"])
  ]
  plane = [max(n, k) for n, k in zip(resampled, s["size"])]
  content = [[(p - n) // 2, (p - n) // 2 + n] for n, p in zip(resampled, plane)]
  return resampled, plane, content


def _place(array: np.ndarray, content, plane, value) -> np.ndarray:
  """`array` [h,w,...] put at `content` of a [plane, ...] array filled with `value`."""
  if list(array.shape[:2]) == list(plane):
    return array
  out = np.full(tuple(plane) + array.shape[2:], value, array.dtype)
  (t0, t1), (l0, l1) = content
  out[t0:t1, l0:l1] = array
  return out


def prepare(image: Volume, label: Volume | None, settings: Preprocessing) -> Prepared:
  """Canonical volume (and label) -> network space, recording how to go back."""
  s = settings.record()
  if label is not None and label.array.shape != image.array.shape:
    raise DataError(
      f"{label.source}: label shape {label.array.shape} differs from image "
      f"shape {image.array.shape} ({image.source})"
    )
  img = np.moveaxis(normalise(image.array, s["norm"]), s["slice_axis"], -1)
  lab = None if label is None else np.moveaxis(np.asarray(label.array), s["slice_axis"], -1)
  box = _crop_box(img, s["crop"], s["crop_margin"])
  (r0, r1), (c0, c1) = box
  plane_spacing = [float(v) for i, v in enumerate(image.spacing) if i != s["slice_axis"]]
  resampled, plane, content = _plane_layout(box, plane_spacing, s)
  out_image = _resize(img[r0:r1, c0:c1], resampled, order=1, antialias=True)
  out_image = out_image.astype(np.float32)
  out_image = _place(out_image, content, plane, img.min())
  out_label = None
  if lab is not None:
    out_label = _resize(lab[r0:r1, c0:c1].astype(np.int32), resampled, order=0)
    out_label = _place(out_label, content, plane, 0)
  geometry = dict(
    version=CACHE_VERSION,
    canonical_shape=[int(v) for v in image.array.shape],
    slice_axis=s["slice_axis"],
    crop_box=box,
    size=list(s["size"]),  # the network's in-plane input: data.size
    target_spacing=s["spacing"],  # data.spacing of this modality; None: resized to size
    plane=plane,  # in-plane shape of the prepared arrays: size, or larger with a target spacing
    content_box=content,  # the resampled crop box within the plane; the rest is padding
    spacing=[float(v) for v in image.spacing],
  )
  return Prepared(image=out_image, label=out_label, geometry=geometry)


def _network_shape(array: np.ndarray, geometry: dict, is_label: bool) -> list[int]:
  """The canonical grid in slice-last order, after checking `array` is this geometry's."""
  axis = geometry["slice_axis"]
  shape = geometry["canonical_shape"]
  full = [n for i, n in enumerate(shape) if i != axis] + [shape[axis]]
  expected = tuple(geometry["plane"]) + (full[2],)
  if array.shape[:3] != expected or array.ndim != (3 if is_label else 4):
    kind = "labels [H,W,S]" if is_label else "probabilities [H,W,S,C]"
    raise DataError(f"restore expects {kind} with H,W,S = {expected}, got {array.shape}")
  return full


def _restore_planes(array: np.ndarray, geometry: dict, full, is_label: bool) -> np.ndarray:
  """Network-space slices [H,W,k(,C)] -> the canonical in-plane grid, still slice-last.

  Slices are independent (the resize keeps the slice axis), so any run of slices restores to
  exactly what it is within the whole volume.  Padding added by `prepare` is dropped first.
  """
  (r0, r1), (c0, c1) = geometry["crop_box"]
  (t0, t1), (l0, l1) = geometry["content_box"]
  content = array[t0:t1, l0:l1]
  cropped = _resize(content, (r1 - r0, c1 - c0), order=0 if is_label else 1)
  if is_label:
    out = np.zeros(full[:2] + [array.shape[2]], array.dtype)
  else:
    out = np.zeros(full[:2] + list(array.shape[2:]), np.float32)
    out[..., 0] = 1.0
  out[r0:r1, c0:c1] = cropped
  return out


def restore(array: np.ndarray, geometry: dict, *, is_label: bool) -> np.ndarray:
  """Network-space labels [H,W,S] or probabilities [H,W,S,C] -> the input volume's canonical grid.

  Probabilities are resized linearly (the caller takes the argmax afterwards, which is smoother
  than resizing labels); the region the crop removed is background with probability 1.
  """
  array = np.asarray(array)
  full = _network_shape(array, geometry, is_label)
  return np.moveaxis(_restore_planes(array, geometry, full, is_label), 2, geometry["slice_axis"])


# Full-resolution probabilities are materialised this many bytes at a time: a 512x512x600 CT
# with 5 classes would need 3 GiB for one copy of all of them.
RESTORE_CHUNK_BYTES = 128 * 2**20


def restore_labels(probs: np.ndarray, geometry: dict, *, probabilities: bool = False):
  """Network-space probabilities [H,W,S,C] -> (labels, probabilities or None) on the canonical
  grid: the argmax of `restore(probs, is_label=False)`, bit for bit, without holding it all.

  Slices are restored and reduced in runs of at most RESTORE_CHUNK_BYTES of full-resolution
  probabilities; the restored probabilities are kept (float32 [X,Y,Z,C]) only when asked for.
  Labels are uint8 class indices (int32 beyond 256 classes).
  """
  probs = np.asarray(probs)
  full = _network_shape(probs, geometry, is_label=False)
  classes = probs.shape[3]
  labels = np.empty(full, np.uint8 if classes <= 256 else np.int32)
  kept = np.empty(full + [classes], np.float32) if probabilities else None
  plane_bytes = full[0] * full[1] * classes * 4
  run = max(1, RESTORE_CHUNK_BYTES // plane_bytes)
  for start in range(0, full[2], run):
    part = slice(start, start + run)
    planes = _restore_planes(probs[:, :, part], geometry, full, is_label=False)
    labels[:, :, part] = np.argmax(planes, axis=-1)
    if kept is not None:
      kept[:, :, part] = planes
  axis = geometry["slice_axis"]
  labels = np.ascontiguousarray(np.moveaxis(labels, 2, axis))
  return labels, None if kept is None else np.moveaxis(kept, 2, axis)


# Content sampled for a file's fingerprint: the whole file up to twice this, else its first and
# last this many bytes (headers, and the end a rewrite or a truncation changes).
_SAMPLE_BYTES = 2**20


def _file_fingerprint(path) -> list:
  """Size, mtime and a hash of the content: a file rewritten in place with the same size and
  mtime (a restored backup, `os.utime`, a tool that keeps times) still changes its key.  A
  remote file's mtime is the object's, in whole seconds."""
  path = files.Path(path)
  if files.is_remote(path):
    st = path.stat()
    size, mtime = st.length, st.mtime
  else:
    st = os.stat(path)
    size, mtime = st.st_size, st.st_mtime_ns
  digest = hashlib.sha256()
  with path.open("rb") as f:
    if size <= 2 * _SAMPLE_BYTES:
      digest.update(f.read())
    else:
      digest.update(f.read(_SAMPLE_BYTES))
      f.seek(-_SAMPLE_BYTES, os.SEEK_END)
      digest.update(f.read(_SAMPLE_BYTES))
  return [size, mtime, digest.hexdigest()]


def _fingerprint(path: str) -> list:
  """`_file_fingerprint` of a file, or of every file under a directory (DICOM, PNG masks),
  by folder, then name."""
  top = files.Path(path)
  if not top.is_dir():
    return _file_fingerprint(top)
  found = []
  for folder, name in sorted(_files_under(top)):
    full = files.Path(folder) / name
    found.append([os.fspath(full.relative_to(top)), *_file_fingerprint(full)])
  return found


def _files_under(folder: files.Path) -> list[tuple[str, str]]:
  """(folder, name) of every file under `folder`.  Listed folder by folder rather than with
  `walk`, which epath's fsspec backend answers with paths that lost their `gs://`."""
  found = []
  for entry in folder.iterdir():
    if entry.is_dir():
      found += _files_under(entry)
    else:
      found.append((os.fspath(folder), entry.name))
  return found


def cache_key(adapter, case, settings: Preprocessing) -> str:
  """Names a cache entry by everything its content depends on, so any change misses the cache:
  the files (by content, `_fingerprint`), how label codes become classes (the adapter's code
  table and `ignore_unknown_labels`) and the preprocessing settings."""
  try:
    paths = {
      k: None if p is None else [os.fspath(files.path(p)), _fingerprint(p)]
      for k, p in (("image", case.image), ("label", case.label))
    }
  except OSError as e:
    raise DataError(f"case {case.id}: cannot read {e.filename}: {e.strerror}") from e
  described = dict(
    version=CACHE_VERSION,
    files=paths,
    modality=case.modality,
    adapter=type(adapter).__name__,
    classes=list(adapter.classes),
    codes=sorted(adapter.code_table(case.modality).items()),
    ignore_unknown_labels=adapter.ignore_unknown_labels,
    settings=settings.record(),
  )
  digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:20]
  return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', case.id)}-{digest}"


def _label_dtype(label: np.ndarray):
  """Class indices fit a byte for any realistic class count: 4x less disk and I/O than int32."""
  return np.uint8 if label.size == 0 or (label.min() >= 0 and label.max() < 256) else np.int32


def _write_entry(directory: str, prepared: Prepared) -> None:
  """Arrays saved Fortran-ordered: shape stays [H,W,S], but each slice is contiguous on disk,
  so the pipeline's slice reads through a memory map touch only that slice's pages."""
  np.save(os.path.join(directory, "image.npy"), np.asfortranarray(prepared.image))
  if prepared.label is not None:
    label = prepared.label.astype(_label_dtype(prepared.label))
    np.save(os.path.join(directory, "label.npy"), np.asfortranarray(label))
  with open(os.path.join(directory, "geometry.json"), "w") as f:
    json.dump(prepared.geometry, f)


def _entry(directory: str, case) -> dict:
  """The dict the pipeline consumes for one cached case."""
  with open(os.path.join(directory, "geometry.json")) as f:
    geometry = json.load(f)
  label = os.path.join(directory, "label.npy")
  return dict(
    image=os.path.join(directory, "image.npy"),
    label=label if os.path.exists(label) else None,
    geometry=geometry,
    id=case.id,
    modality=case.modality,
  )


def local_cache_dir(cache_dir) -> str:
  """Where the entries of `cache_dir` live: `cache_dir` itself when local.  The pipeline
  memory-maps entries, which needs local files, so a remote one (`gs://...`, such as the
  default `<workdir>/cache` of a remote work dir) stands for a local folder named by its
  hash, `$XDG_CACHE_HOME/ukd/<hash>` (`~/.cache/ukd/<hash>`): a run resumed on the same
  machine finds its entries again, and one on another machine rebuilds them."""
  if not files.is_remote(cache_dir):
    return os.fspath(cache_dir)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  digest = hashlib.sha256(os.fspath(cache_dir).encode()).hexdigest()[:16]
  return os.path.join(base, "ukd", digest)


def cache_case(adapter, case, settings: Preprocessing, cache_dir) -> dict:
  """Prepare one case once and reuse it.

  The entry is built in a temporary directory and renamed into place (`files.new_directory`),
  so a killed process leaves at most a stray '.tmp-*' directory, never a half-written entry.
  """
  final = os.path.join(local_cache_dir(cache_dir), cache_key(adapter, case, settings))
  if os.path.isdir(final):
    return _entry(final, case)
  image, label = adapter.read(case)
  prepared = prepare(image, label, settings)
  with files.new_directory(final) as tmp:
    _write_entry(tmp, prepared)
  return _entry(final, case)


def cache_cases(adapter, cases, settings: Preprocessing, cache_dir, workers: int = 2) -> list[dict]:
  """`cache_case` for many cases, in order; threads overlap file decoding with resizing."""
  if workers <= 1:
    return [cache_case(adapter, c, settings, cache_dir) for c in cases]
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(lambda c: cache_case(adapter, c, settings, cache_dir), cases))
