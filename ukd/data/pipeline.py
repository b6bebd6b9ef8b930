"""Training input: one batch per modality per step, from cached network-space volumes (grain).

Design. The pipeline is a grain ``MapDataset`` indexed by step. Element ``step`` holds this
host's slice of the global batch of every modality, and sample ``b`` of modality ``m`` is drawn
with its own generator seeded by (seed, m, global sample index). Hence:
  * modalities are independent streams ("paired by step, not by anatomy"), yet zipped per step;
  * a batch depends only on (seed, step), so it is the same for any number of worker processes
    or hosts, and resuming is starting the dataset at the resumed step: nothing about the
    iterator needs saving, and a run may resume on another number of hosts;
  * host ``h`` of ``n`` takes global samples [h*B/n, (h+1)*B/n) of every step: hosts never
    overlap and together they yield exactly the batch a single host would.

Settings: `Spec.from_config(config)` reads them from a full, resolved config (so one that
`ukd.config.check` passed: the batch size is positive), with no defaults of its own, and
checks the others, naming the field:
  model.name             dilated2d: a slice with its two neighbours as channels [H,W,3];
                         unet3d: patches [H,W,S,1]
  batch_size             per modality, global (all hosts together)
  data.size              2D sample (H, W): the prepared slice, or a window of it where the
                         slice is larger (as `data.spacing` may leave it)
  data.patch             3D patch (H, W, S); H, W at most the prepared size
  data.fg_fraction       probability that a sample is centred on a slice with foreground, and
                         where the sample is a window of the slice, that it holds a foreground
                         pixel of that slice
  data.augment           flip (axes flipped at random: 0, 1 in-plane, 2 along the slices;
                         a flip along the patient's left-right swaps the labels of the
                         pairs in data.lateral_pairs: `ukd.data.lateral`),
                         rotate (max degrees), scale (max relative zoom, 0.1 = 0.9..1.1), intensity (max jitter:
                         x * (1 + a) + b, |a|, |b| <= it)
  data.workers           grain worker processes (0 = in the training process)
  data.prefetch          batches buffered per process
  data.label_sets        resolved label sets (`ukd.config.label_sets`): a modality whose
                         labels hold only some classes has the others' labels read as
                         background, so that a class `data.labelled` leaves out is never
                         trained on, nor drawn as foreground, whatever its files hold

Worker processes are spawned by grain: outside ``absl.app.run`` call
``absl.flags.FLAGS.mark_as_parsed()`` first, and ``close()`` the iterator when done.
"""

import dataclasses
import zlib

import grain
import numpy as np

from ukd.data import lateral
from ukd.errors import DataError

# Steps available; effectively endless (training stops by step count, not by exhaustion).
_MAX_STEPS = 2**62
_AUGMENT_KEYS = ("flip", "rotate", "scale", "intensity")
# Sample dimensionality of each network (ukd.models.DIMS; not imported, so that input worker
# processes need no JAX).
_DIMS_BY_MODEL = {"dilated2d": 2, "unet3d": 3}


@dataclasses.dataclass(frozen=True)
class Spec:
  """Checked sampling and loading settings shared by every modality's sampler."""

  dims: int
  batch: int  # global, per modality
  size: tuple[int, int]  # 2D samples (H, W)
  patch: tuple[int, int, int] | None
  fg_fraction: float
  augment: dict
  workers: int
  prefetch: int
  mirror: lateral.Mirror | None  # what a left-right flip does to the labels (None: nothing)
  # {modality: [num_classes] int lookup, label -> label trained on} of partly labelled ones.
  relabel: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def from_config(cls, config, dims: int | None = None) -> "Spec":
    """The settings of a full config (see the module docstring); `dims` overrides the
    network's own (2D slices for a 3D network, say)."""
    if dims is None:
      dims = _DIMS_BY_MODEL.get(config.model.name)
    if dims not in (2, 3):
      raise DataError(
        f"model.name={config.model.name!r} is not one of {sorted(_DIMS_BY_MODEL)} (dims={dims!r})"
      )
    data = config.data
    size = tuple(data.size)
    if len(size) != 2 or not all(isinstance(v, int) and v >= 1 for v in size):
      raise DataError(f"data.size must be two positive ints (H, W), got {size}")
    patch = None
    if dims == 3:
      patch = tuple(data.patch)
      if len(patch) != 3 or not all(isinstance(v, int) and v >= 1 for v in patch):
        raise DataError(f"data.patch must be three positive ints (H, W, S), got {patch}")
    fg = float(data.fg_fraction)
    if not 0.0 <= fg <= 1.0:
      raise DataError(f"data.fg_fraction must be in [0, 1], got {fg}")
    workers, prefetch = int(data.workers), int(data.prefetch)
    if workers < 0 or prefetch < 1:
      raise DataError(
        f"data.workers must be >= 0 and data.prefetch >= 1, got {workers} and {prefetch}"
      )
    augment = _augment_spec(data.augment)
    # `data.label_sets` holds, per partly labelled modality, the class indices its labels
    # hold (resolved by `ukd.config.resolve`): any other label is trained on as background.
    relabel = {}
    for m, indices in (data.get("label_sets") or {}).items():
      relabel[m] = np.zeros(int(config.model.num_classes), np.int32)
      relabel[m][list(indices)] = list(indices)
    return cls(
      int(dims),
      int(config.batch_size),
      size,
      patch,
      fg,
      augment,
      workers,
      prefetch,
      lateral.mirror_of(config),
      relabel,
    )

  @property
  def window(self) -> tuple[int, int]:
    """In-plane size of every sample."""
    return self.patch[:2] if self.dims == 3 else self.size


def _augment_spec(raw) -> dict:
  """Checked augmentation settings; a missing or unknown key is an error, not a default."""
  raw = dict(raw.to_dict() if hasattr(raw, "to_dict") else raw)
  if sorted(raw) != sorted(_AUGMENT_KEYS):
    raise DataError(f"data.augment has keys {sorted(raw)}; expected exactly {list(_AUGMENT_KEYS)}")
  aug = dict(raw)
  for key in ("rotate", "scale", "intensity"):
    aug[key] = float(aug[key])
    if aug[key] < 0:
      raise DataError(f"data.augment.{key} must be >= 0, got {aug[key]}")
  if aug["scale"] >= 1:
    raise DataError(f"data.augment.scale must be < 1 (a relative zoom), got {aug['scale']}")
  aug["flip"] = tuple(aug["flip"])  # axes, as `ukd.config.check` leaves them
  return aug


def _check_entries(modality: str, entries, spec: Spec) -> list[tuple[str, str]]:
  """Labelled cache entries at least a sample large in-plane; returns (image, label) paths."""
  paths = []
  for entry in entries:
    name = entry.get("id", entry.get("image"))
    if entry.get("label") is None:
      raise DataError(f"{modality} case {name}: training needs a label (cache entry has none)")
    image = np.load(entry["image"], mmap_mode="r")
    label = np.load(entry["label"], mmap_mode="r")
    if image.ndim != 3 or image.shape != label.shape:
      raise DataError(
        f"{modality} case {name}: image {image.shape} and label {label.shape} "
        "must be equal [H, W, S] arrays"
      )
    if spec.window[0] > image.shape[0] or spec.window[1] > image.shape[1]:
      field, value = ("data.patch", spec.patch) if spec.dims == 3 else ("data.size", spec.size)
      raise DataError(
        f"{field} {value} is larger in-plane than the prepared {modality} volume {name} "
        f"{image.shape[:2]}; prepare the cases with this data.size"
      )
    paths.append((entry["image"], entry["label"]))
  return paths


def _window_start(size: int, length: int, centre: int | None, rng) -> int:
  """Start of a window of `size` inside [0, length) that contains `centre` at a random place."""
  if size >= length:
    return 0
  if centre is None:
    return int(rng.integers(length - size + 1))
  return int(np.clip(centre - rng.integers(size), 0, length - size))


def warp(array: np.ndarray, matrix: np.ndarray, order: int, cval: float) -> np.ndarray:
  """Resample every slice/channel of [H, W, ...] with one in-plane linear map about the centre.

  Output pixel p reads input position matrix @ (p - centre) + centre, bilinearly (order 1) or
  from the nearest pixel (order 0, rounding half up like scipy); outside reads `cval`. Written
  with numpy gathers shared by all channels: about 10x faster than scipy's affine_transform on
  [256, 256, 3], which matters because it runs for every training sample.
  """
  h, w = array.shape[:2]
  channels = np.ascontiguousarray(array.reshape(h * w, -1).T)
  centre = (np.asarray([h, w], np.float32) - 1) / 2
  grid = np.indices((h, w), np.float32).reshape(2, -1) - centre[:, None]
  r, c = np.asarray(matrix, np.float32) @ grid + centre[:, None]
  if order == 0:
    corners = [(np.floor(r + 0.5), np.floor(c + 0.5), np.ones_like(r))]
  else:
    r0, c0 = np.floor(r), np.floor(c)
    fr, fc = r - r0, c - c0
    corners = [
      (r0 + dr, c0 + dc, (fr if dr else 1 - fr) * (fc if dc else 1 - fc))
      for dr in (0, 1)
      for dc in (0, 1)
    ]
  out = np.zeros(channels.shape, np.float32)
  covered = np.zeros(h * w, np.float32)
  for rows, cols, weight in corners:
    weight = weight * ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w))
    index = np.clip(rows, 0, h - 1).astype(np.intp) * w + np.clip(cols, 0, w - 1).astype(np.intp)
    out += np.take(channels, index, axis=1) * weight
    covered += weight
  out += np.float32(cval) * (1 - covered)
  return out.T.reshape(array.shape).astype(array.dtype if order == 0 else np.float32)


def augment(image: np.ndarray, label: np.ndarray, rng, aug: dict, mirror=None):
  """Random flips, rotation/scaling and intensity jitter; image [H,W,X...], label [H,W(,S)].

  Geometry changes hit image and label identically (nearest neighbour for the label); the area
  moved in from outside is background (image minimum, label 0) rather than smeared edges.
  A flip along `mirror.axis` (a `ukd.data.lateral.Mirror`: the patient's left-right) also
  swaps left and right classes, so a mirrored left kidney is labelled as the right one it
  now looks like.
  """
  for axis in aug["flip"]:
    if rng.random() < 0.5:
      # Axis 2 of a 2D sample is its neighbour slices: reversed, the slice axis is mirrored.
      image = np.flip(image, axis)
      label = np.flip(label, axis) if axis < label.ndim else label
      if mirror is not None and mirror.affects((axis,)):
        label = np.asarray(mirror.swap, np.int32)[label]
  if aug["rotate"] > 0 or aug["scale"] > 0:
    angle = np.deg2rad(rng.uniform(-aug["rotate"], aug["rotate"]))
    zoom = 1.0 + rng.uniform(-aug["scale"], aug["scale"])
    # Output -> input coordinates: rotate back and divide by the zoom.
    matrix = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]]) / zoom
    image = warp(image, matrix, 1, float(image.min()))
    label = warp(label, matrix, 0, 0)
  jitter = aug["intensity"]
  if jitter > 0:
    image = image * (1.0 + rng.uniform(-jitter, jitter)) + rng.uniform(-jitter, jitter)
  return np.ascontiguousarray(image, np.float32), np.ascontiguousarray(label, np.int32)


class ModalitySampler:
  """Draws training samples of one modality from memory-mapped cache files.

  Arrays are opened lazily in whichever process samples, and dropped on pickling, so worker
  processes receive paths rather than volumes.
  """

  def __init__(self, paths: list[tuple[str, str]], spec: Spec, relabel: np.ndarray | None = None):
    self._paths = paths
    self._spec = spec
    self._relabel = relabel  # `Spec.relabel` of this modality, or None: labels as they are
    self._open = {}

  def __getstate__(self):
    return {**self.__dict__, "_open": {}}

  def _volume(self, index: int):
    """(image, label, slices with foreground) of one volume, opened on first use."""
    if index not in self._open:
      image_path, label_path = self._paths[index]
      label = np.load(label_path, mmap_mode="r")
      if self._relabel is not None:  # in memory then: one label volume per case
        label = self._relabel[label]
      fg_slices = np.flatnonzero(np.asarray(label).any(axis=(0, 1)))
      self._open[index] = (np.load(image_path, mmap_mode="r"), label, fg_slices)
    return self._open[index]

  def sample(self, rng) -> dict:
    """One sample; with probability fg_fraction centred on a foreground slice (when the drawn
    volume has one, else uniform)."""
    image, label, fg_slices = self._volume(int(rng.integers(len(self._paths))))
    want_fg = rng.random() < self._spec.fg_fraction and fg_slices.size > 0
    k = (
      int(fg_slices[rng.integers(fg_slices.size)]) if want_fg else int(rng.integers(image.shape[2]))
    )
    if self._spec.dims == 2:
      x, y = _slice_with_neighbours(image, label, k, want_fg, self._spec.size, rng)
    else:
      x, y = _patch(image, label, k if want_fg else None, self._spec.patch, rng)
    x, y = augment(x, y, rng, self._spec.augment, self._spec.mirror)
    return {"image": x, "label": y}


def _plane_window(label, k: int | None, window, rng) -> tuple[slice, slice]:
  """Rows and columns of an in-plane `window` (h, w); with `k` given it contains a foreground
  pixel of slice k (drawn at random, as is the window's place around it). A window as large
  as the plane is the whole plane and draws nothing."""
  h, w = window
  centre = (None, None)
  if k is not None and (h < label.shape[0] or w < label.shape[1]):
    hits = np.argwhere(np.asarray(label[:, :, k]) > 0)
    centre = tuple(hits[rng.integers(len(hits))])
  r0 = _window_start(h, label.shape[0], centre[0], rng)
  c0 = _window_start(w, label.shape[1], centre[1], rng)
  return slice(r0, r0 + h), slice(c0, c0 + w)


def _slice_with_neighbours(image, label, k: int, want_fg: bool, size, rng):
  """A `size` window of slice k with slices k-1 and k+1 as channels (edges replicated):
  [h,w,3], label [h,w]; with `want_fg` the window holds foreground of slice k."""
  rows, cols = _plane_window(label, k if want_fg else None, size, rng)
  last = image.shape[2] - 1
  channels = [image[rows, cols, min(max(j, 0), last)] for j in (k - 1, k, k + 1)]
  return np.stack(channels, axis=-1).astype(np.float32), np.asarray(label[rows, cols, k], np.int32)


def _patch(image, label, k: int | None, patch, rng):
  """A [h,w,s,1] patch; with `k` given it contains slice k and, in-plane, a foreground voxel of
  it. Volumes with fewer than s slices are padded with background on both sides."""
  rows, cols = _plane_window(label, k, patch[:2], rng)
  s = patch[2]
  s0 = _window_start(s, image.shape[2], k, rng)
  x = np.asarray(image[rows, cols, s0 : s0 + s], np.float32)
  y = np.asarray(label[rows, cols, s0 : s0 + s], np.int32)
  missing = s - x.shape[2]
  if missing:
    pad = ((0, 0), (0, 0), (missing // 2, missing - missing // 2))
    x = np.pad(x, pad, constant_values=float(x.min()))
    y = np.pad(y, pad)
  return x[..., None], y


class StepBatch:
  """Maps a step index to this host's batch of every modality (a picklable grain transform)."""

  def __init__(self, samplers: dict, seed: int, batch: int, shard_index: int, shard_count: int):
    self._samplers = samplers
    self._seed = seed
    self._batch = batch
    self._local = batch // shard_count
    self._first = shard_index * self._local
    # Stable across processes and Python runs, unlike hash(str).
    self._codes = {m: zlib.crc32(m.encode()) for m in samplers}

  def __call__(self, step: int) -> dict:
    out = {}
    for modality, sampler in self._samplers.items():
      samples = []
      for b in range(self._local):
        index = step * self._batch + self._first + b
        rng = np.random.default_rng([self._seed, self._codes[modality], index])
        samples.append(sampler.sample(rng))
      out[modality] = {k: np.stack([s[k] for s in samples]) for k in ("image", "label")}
    return out


def make_train_iterator(
  sources: dict,
  spec: Spec,
  modalities,
  *,
  seed: int,
  start_step: int = 0,
  shard_index: int = 0,
  shard_count: int = 1,
):
  """Endless iterator of {modality: {'image', 'label'}} batches for one host, from the batch
  of step `start_step + 1` on (the step a resumed run trains next).

  `sources` maps each of `modalities` (the output order) to its cache entries. Each host gets
  batch // shard_count samples of each modality per step (see the module docstring).
  """
  if not 0 <= shard_index < shard_count:
    raise DataError(f"shard_index {shard_index} must be in [0, shard_count={shard_count})")
  if spec.batch % shard_count:
    raise DataError(
      f"batch_size {spec.batch} is not divisible by shard_count {shard_count}: "
      "every host takes an equal slice of the global batch"
    )
  if not isinstance(seed, int) or seed < 0:
    raise DataError(f"seed must be a non-negative int, got {seed!r}")
  for modality in modalities:
    if not sources.get(modality):
      raise DataError(f"sources[{modality!r}] is empty: no training volumes for this modality")
  samplers = {
    m: ModalitySampler(_check_entries(m, sources[m], spec), spec, spec.relabel.get(m))
    for m in modalities
  }
  if not isinstance(start_step, int) or start_step < 0:
    raise DataError(f"start_step must be a non-negative int, got {start_step!r}")
  ds = grain.MapDataset.range(start_step, _MAX_STEPS).map(
    StepBatch(samplers, seed, spec.batch, shard_index, shard_count)
  )
  # One reading thread per process: sampling is numpy work, more threads only fight the GIL;
  # parallelism comes from worker processes.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=spec.prefetch))
  if spec.workers > 0:
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=spec.workers, per_worker_buffer_size=spec.prefetch)
    )
  return iter(ds)
