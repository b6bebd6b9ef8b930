"""Network-space prediction of whole volumes, by windows, with any batch function.

Kept free of flax, optax, orbax and grain: both a live `ukd.infer.Segmenter` and an exported
model (`ukd.exported`, which runs without the training stack) predict through `predict_volume`,
so the two cannot drift apart.  Only the batch function differs: the jitted network of a
checkpoint, a deserialised `jax.export` artefact or an ONNX session.

Every volume takes the same road: canonical Volume -> `preprocess.prepare` (network space
[H, W, S], from the image alone) -> class probabilities [H, W, S, C] ->
`preprocess.restore_labels` (linear interpolation onto the canonical grid, then argmax).

  * 2D networks see every slice with its two neighbours as channels, edges replicated, exactly
    as the training pipeline builds its inputs; a slice larger than `data.size` (prepared with
    `data.spacing`) is seen through in-plane windows of `data.size`, as training saw it.
  * 3D networks see windows of `data.patch`.
  Windows overlap by `infer.overlap` and their probabilities are blended with a Gaussian
  importance map (sigma = window / 8 per axis, as nnU-Net), which trusts the window centre,
  where the network saw most context, more than its border.  Both kinds take one road
  (`_slide`); a 2D slice no larger than `data.size` is one window whose probabilities are taken
  as they are.

Samples reach the batch function in batches of one fixed size (the last one padded with
zeros), so one compiled function serves every volume whatever its size, and a sample's result
does not depend on which batch it landed in.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable

import numpy as np

from ukd.data import preprocess
from ukd.data.io import volumes
from ukd.errors import ConfigError, DataError
from ukd.evaluation import postprocess

# batch [N, *window, channels] float32 -> class probabilities [N, *window, C] (any array type).
BatchFn = Callable[[np.ndarray], object]


@dataclasses.dataclass(frozen=True)
class Settings:
  """What windowed prediction needs to know of a network and its preprocessing."""

  preprocessing: dict  # {modality: `preprocess.Preprocessing`}, resolved once
  window: tuple[int, ...]  # the network's input: data.size (2D) or data.patch (3D)
  dims: int  # 2 or 3
  num_classes: int
  overlap: float
  batch_size: int
  # Connected-component rules chosen on validation (`ukd.evaluation.postprocess`), applied to the labels
  # on the volume's grid; None: the network's labels as they are.
  postprocess: dict | None = None

  @classmethod
  def from_config(cls, config, preprocessing, dims: int, batch_size: int, postprocess=None):
    """The settings of a resolved config and its `preprocessing` (`ukd.config.preprocessing`)."""
    window = config.data.patch if dims == 3 else config.data.size
    return cls(
      dict(preprocessing),
      tuple(int(n) for n in window),
      dims,
      int(config.model.num_classes),
      float(config.infer.overlap),
      batch_size,
      postprocess,
    )


# How predicted files encode classes: the dataset's own codes, or class indices 0..C-1.
LABEL_CODES = ("dataset", "index")


class Predictor:
  """What predicting whole volumes needs of a network, whatever runs it: a live
  `ukd.infer.Segmenter` or an exported model (`ukd.exported`).  A subclass sets `config` (a
  checked config), `settings`, `dataset` and `step`, and gives `batch_function`."""

  config: object
  settings: Settings
  # What a checkpoint recorded of the dataset it was trained on ({'classes', 'label_codes',
  # 'splits'}: `checkpoints.save`); None for live variables and older checkpoints.
  dataset: dict | None = None
  step: object = None  # checkpoint step(s) (reports name it), None for live variables

  @property
  def step_name(self) -> str:
    """The step as reports and folder names write it: '600'; 'ct600-mr400' for separate
    networks each chosen at its own best step (`ukd.infer.load`)."""
    if isinstance(self.step, dict):
      return "-".join(f"{m}{s}" for m, s in self.step.items())
    return str(self.step)

  def batch_function(self, modality: str) -> BatchFn:
    """batch [N, *window, channels] float32 -> class probabilities [N, *window, C]."""
    raise NotImplementedError

  def predict_volume(self, vol: volumes.Volume, modality: str, *, probabilities: bool = False):
    """(labels uint8 [X,Y,Z], probabilities float32 [X,Y,Z,C] or None), on `vol`'s canonical
    grid; the probabilities only with `probabilities=True`, since at full resolution they take
    4 bytes per voxel and class (`predict_volume` below)."""
    self.check_modality(modality)
    run = self.batch_function(modality)
    return predict_volume(vol, modality, self.settings, run, probabilities=probabilities)

  def label_table(self, modality: str, label_codes: str = "dataset") -> list[tuple[int, str]]:
    """(code written to files, class name) for class indices 0..C-1.

    'dataset' gives the codes of the dataset the network was trained on (MM-WHS 205, 420, ...,
    as its checkpoint recorded them); 'index' gives 0..C-1.  A network without that record
    (live variables, older checkpoints) writes indices.
    """
    if label_codes not in LABEL_CODES:
      raise ConfigError(f"label_codes={label_codes!r} must be one of {LABEL_CODES}")
    count = int(self.config.model.num_classes)
    record = self.dataset or {}
    names = list(record.get("classes") or ["background"] + [f"class_{i}" for i in range(1, count)])
    codes = list(range(count))
    if label_codes == "dataset" and record.get("label_codes"):
      codes = [int(c) for c in record["label_codes"][modality]]
    return list(zip(codes, names))

  def check_modality(self, modality: str) -> None:
    """A DataError unless the network was trained on `modality`; predicting checks it, and so
    do callers that have work to do before the first prediction (`ukd.serve.predict`)."""
    known = list(self.config.modalities)
    if modality not in known:
      raise DataError(f"modality {modality!r} is not one this network was trained on: {known}")


def predict_volume(
  vol: volumes.Volume, modality: str, settings: Settings, run: BatchFn, *, probabilities=False
):
  """(labels uint8 [X,Y,Z], probabilities float32 [X,Y,Z,C] or None) on `vol`'s canonical grid.

  The image alone decides everything, the crop included: evaluation predicts exactly as
  prediction does, never helped by the label it is scored against.  The three stages are
  public so that `ukd.serve.predict` can run them on different threads, case after case.
  """
  prepared = prepare(vol, modality, settings)
  network = network_probabilities(prepared.image, settings, run)
  return finish(network, prepared, vol, modality, settings, probabilities=probabilities)


def prepare(vol: volumes.Volume, modality: str, settings: Settings) -> preprocess.Prepared:
  """Host stage 1: the image in network space."""
  return preprocess.prepare(vol, None, settings.preprocessing[modality])


def finish(
  network, prepared, vol: volumes.Volume, modality: str, settings: Settings, *, probabilities=False
):
  """Host stage 3: probabilities back on `vol`'s canonical grid, argmax, post-processing
  (the rules chosen for `modality`)."""
  labels, probs = preprocess.restore_labels(network, prepared.geometry, probabilities=probabilities)
  rules = (settings.postprocess or {}).get(modality)
  if rules:
    labels = postprocess.apply(labels, rules, vol.spacing)
  return labels, probs


def network_probabilities(image: np.ndarray, settings: Settings, run: BatchFn) -> np.ndarray:
  """[H, W, S] in network space -> [H, W, S, C]."""
  overlap = settings.overlap
  if settings.dims == 3:
    return _slide(image, settings.window, (overlap,) * 3, _window_input, settings, run)
  size = settings.window
  # Windows one slice thick, side by side along the slices; in-plane they overlap, and are
  # blended, only where the slice is larger than data.size.
  blend = image.shape[0] > size[0] or image.shape[1] > size[1]
  return _slide(image, size + (1,), (overlap, overlap, 0.0), _slice_input, settings, run, blend)


def gaussian_importance(shape) -> np.ndarray:
  """Window weights exp(-d^2 / 2 sigma^2), sigma = size / 8 per axis, peak 1 at the centre."""
  axes = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / (n / 8)) ** 2) for n in shape]
  weights = functools.reduce(np.multiply.outer, axes)
  return (weights / weights.max()).astype(np.float32)


def window_starts(length: int, window: int, overlap: float) -> list[int]:
  """Evenly spaced window origins covering [0, length), consecutive ones overlapping at least
  `overlap` of a window; the first starts at 0 and the last ends at `length` (as nnU-Net)."""
  if length <= window:
    return [0]
  count = math.ceil((length - window) / (window * (1.0 - overlap))) + 1
  return [round(i * (length - window) / (count - 1)) for i in range(count)]


def _slice_input(padded: np.ndarray, region) -> np.ndarray:
  """A 2D network's input: the slice with its two neighbours as channels, edges replicated."""
  rows, cols, k = region
  last = padded.shape[2] - 1
  return padded[rows, cols][:, :, np.clip(np.arange(k.start - 1, k.start + 2), 0, last)]


def _window_input(padded: np.ndarray, region) -> np.ndarray:
  return padded[region][..., None]


def _pad_to(array: np.ndarray, shape) -> np.ndarray:
  """Pads the end of each axis shorter than a window up to `shape`, replicating the border:
  that keeps the padding within the volume's own intensities (the 2D path replicates missing
  neighbour slices too).  The caller crops the padding off the result."""
  pad = [(0, max(0, s - n)) for n, s in zip(array.shape, shape)]
  return np.pad(array, pad, mode="edge") if any(p for _, p in pad) else array


def _fill_batch(samples: np.ndarray, size: int) -> np.ndarray:
  """Zero samples complete the last batch so every call has the compiled shape."""
  missing = size - len(samples)
  if not missing:
    return samples
  return np.concatenate([samples, np.zeros((missing, *samples.shape[1:]), samples.dtype)])


def _batches(inputs, count: int, batch_size: int, run: BatchFn):
  """Yields (sample indices, probabilities) batch by batch.

  `inputs(indices)` builds the samples on the host.  The next batch is dispatched before the
  previous one is fetched, so with an asynchronous `run` (a jitted function) building inputs
  overlaps the device's work.
  """
  pending = None
  for start in range(0, count, batch_size):
    index = range(start, min(start + batch_size, count))
    result = run(_fill_batch(inputs(index), batch_size))
    if pending is not None:
      yield pending[0], np.asarray(pending[1])[: len(pending[0])]
    pending = (index, result)
  if pending is not None:
    yield pending[0], np.asarray(pending[1])[: len(pending[0])]


def _slide(image, window, overlap, sample, settings: Settings, run: BatchFn, blend=True):
  """[H, W, S] -> [H, W, S, C]: the network on every `window` at `window_starts` (with the
  per-axis `overlap`) of the image, padded where it is smaller; `sample(padded, region)` is
  one window's network input.  With `blend` every voxel averages the windows that hold it,
  weighted by `gaussian_importance`; without, the windows must not overlap, and each voxel
  takes its window's probabilities as they are."""
  padded = _pad_to(image, window)
  starts = [window_starts(n, k, o) for n, k, o in zip(padded.shape, window, overlap)]
  regions = [
    tuple(slice(o, o + k) for o, k in zip(origin, window)) for origin in itertools.product(*starts)
  ]
  total = np.zeros(padded.shape + (settings.num_classes,), np.float32)
  if blend:
    weights = gaussian_importance(window)[..., None]
    norm = np.zeros(padded.shape + (1,), np.float32)

  def inputs(index):
    return np.stack([sample(padded, regions[i]) for i in index])

  for index, probs in _batches(inputs, len(regions), settings.batch_size, run):
    for i, p in zip(index, probs):
      p = p.reshape(window + p.shape[-1:])
      if blend:
        total[regions[i]] += p * weights
        norm[regions[i]] += weights
      else:
        total[regions[i]] = p
  if blend:
    total /= norm
  h, w, s = image.shape
  return total[:h, :w, :s]


def entropy(probs: np.ndarray) -> np.ndarray:
  """-sum_c p_c ln p_c over the last axis, float32: in [0, ln C]."""
  p = np.clip(probs, 0.0, 1.0)
  logs = np.log(np.where(p > 0, p, 1.0))
  return np.maximum(-np.sum(p * logs, axis=-1), 0.0).astype(np.float32)
