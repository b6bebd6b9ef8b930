"""Label maps from a trained network: whole volumes in, label volumes of the same grid out.

Two ways to get a `Segmenter`: `Segmenter(config, variables)` wraps live variables (validation
during training); `load(path)` restores a work dir's checkpoint together with the config saved
in it, so a network always runs with the preprocessing it was trained with.

Every volume takes the same road: canonical Volume -> `preprocess.prepare` (network space
[H, W, S], from the image alone) -> class probabilities [H, W, S, C] ->
`preprocess.restore_labels` (linear interpolation onto the canonical grid, then argmax, a run
of slices at a time so a large CT never holds all classes at full resolution) ->
`Volume.to_original` for the caller's own orientation.  Restoring probabilities rather than
labels gives smoother boundaries than nearest-neighbour label resizing.  `label_table` gives
the dataset's own label codes, in which `ukd.predict` writes files and folders.

  * 2D networks see every slice with its two neighbours as channels, edges replicated, exactly
    as the training pipeline builds its inputs; a slice larger than `data.size` (prepared with
    `data.spacing`) is seen through in-plane windows of `data.size`, as training saw it.
  * 3D networks see windows of `data.patch`.
  Windows overlap by `infer.overlap` and their probabilities are blended with a Gaussian
  importance map (sigma = window / 8 per axis, as nnU-Net), which trusts the window centre,
  where the network saw most context, more than its border.  Both kinds take one road
  (`Segmenter._slide`); a 2D slice no larger than `data.size` is one window whose
  probabilities are taken as they are.

Slices or windows reach the devices in batches of one fixed size (`infer.batch_size` rounded
up to a multiple of the device count, the last batch padded) sharded over the 'data' mesh axis.
So a single compiled function per modality serves every volume whatever its size, and a
sample's result does not depend on which batch it landed in.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ukd import checkpoints, models, steps
from ukd import config as config_lib
from ukd import mesh as mesh_lib
from ukd.data import preprocess, volumes
from ukd.errors import ConfigError, DataError


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


class Segmenter:
  """A network with its variables on the devices and the config it was trained with."""

  # What a checkpoint recorded of the dataset it was trained on ({'classes', 'label_codes',
  # 'splits'}: `checkpoints.save`); None for live variables and older checkpoints.
  dataset: dict | None = None

  def __init__(self, config, variables, mesh=None, *, step: int | None = None):
    """`variables` holds 'params' and 'batch_stats' (anything else, e.g. optimizer state, is
    not needed); `mesh` defaults to all of this process's devices.  Inference runs within one
    process, on its own devices: every volume is small enough for one host, and its result is
    needed there (several hosts share out the cases instead: `evaluate.evaluate_cases`).
    `config` is a checked one (`ukd.config.check`), as training and checkpoints hold."""
    self.config = config
    self.step = step  # checkpoint step when loaded from a work dir (reports name it)
    self.mesh = mesh if mesh is not None else mesh_lib.make_mesh(jax.local_devices())
    eval_step = steps.make_eval_step(models.build(config.model, config.modalities))
    # Compiled once per (modality, batch shape) for this Segmenter's life: training holds one
    # Segmenter for every validation and hands it new weights through `update`.
    self._probabilities = jax.jit(
      lambda variables, batch, modality: jax.nn.softmax(
        eval_step(variables, batch, modality).astype(jnp.float32), axis=-1
      ),
      static_argnames="modality",
    )
    devices = self.mesh.shape[mesh_lib.DATA_AXIS]
    self.batch_size = -(-int(config.infer.batch_size) // devices) * devices
    self.update(variables)

  @classmethod
  def load(cls, path, step="best") -> "Segmenter":
    """Restores params and batch_stats (no optimizer state) and the saved config.

    `path` is a work dir, its checkpoints dir or one step's dir; a step dir selects its step
    (`step` may then stay 'best' or name the same step).  The variables land replicated on
    whatever devices this process has, whatever trained them.
    """
    workdir, step = checkpoints.resolve(path, step)
    mgr = checkpoints.manager(workdir, read_only=True)
    try:
      chosen = checkpoints.select_step(mgr, step)
      config = config_lib.frozen(checkpoints.restore_config(mgr, chosen).to_dict())
      mesh = mesh_lib.make_mesh(jax.local_devices())
      variables = checkpoints.restore_variables(mgr, chosen, _abstract_variables(config, mesh))
      dataset = checkpoints.restore_dataset(mgr, chosen)
    finally:
      mgr.close()
    logging.info("restored step %d of %s", chosen, workdir)
    segmenter = cls(config, variables, mesh, step=chosen)
    segmenter.dataset = dataset
    return segmenter

  def update(self, variables) -> None:
    """Takes new weights without recompiling; copied, so a train step that donates its state
    cannot delete them. Weights replicated over several hosts' devices (multi-host training)
    are taken from this process's own replica: inference runs on this process's devices."""
    kept = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    kept = jax.tree.map(_local_replica, kept)
    self.variables = jax.device_put(kept, mesh_lib.replicated(self.mesh), may_alias=False)

  # --- public prediction API ------------------------------------------------------------------

  def predict(self, volume, modality: str, spacing=None, affine=None) -> np.ndarray:
    """A 3D array in its own orientation -> uint8 labels of the same shape.

    Orientation matters (slices are taken along the canonical `data.slice_axis`): pass the
    array's affine, or at least its voxel spacing (an axis-aligned RAS affine); with neither,
    the array is taken as already RAS.
    """
    self.check_modality(modality)
    if spacing is not None:
      if affine is not None:
        raise DataError("predict: give spacing or affine, not both (the affine holds the spacing)")
      affine = _spacing_affine(spacing)
    vol = volumes.from_array(volume, affine, source="input volume")
    labels, _ = self.predict_volume(vol, modality)
    return vol.to_original(labels)

  def predict_volume(self, vol: volumes.Volume, modality: str, *, probabilities: bool = False):
    """(labels uint8 [X,Y,Z], probabilities float32 [X,Y,Z,C] or None), on `vol`'s canonical
    grid; the probabilities only with `probabilities=True`, since at full resolution they take
    4 bytes per voxel and class.

    The image alone decides everything, the crop included (`data.crop` is found from the
    image): evaluation predicts exactly as prediction does, never helped by the label it is
    scored against.
    """
    self.check_modality(modality)
    prepared = preprocess.prepare(vol, None, modality, self.config.data)
    if models.DIMS[self.config.model.name] == 2:
      network = self._predict_slices(prepared.image, modality)
    else:
      network = self._predict_windows(prepared.image, modality)
    return preprocess.restore_labels(network, prepared.geometry, probabilities=probabilities)

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
    do callers that have work to do before the first prediction (`ukd.predict`)."""
    known = list(self.config.modalities)
    if modality not in known:
      raise DataError(f"modality {modality!r} is not one this network was trained on: {known}")

  # --- network-space prediction ----------------------------------------------------------------

  def _batches(self, inputs, count: int, modality: str):
    """Yields (sample indices, probabilities) batch by batch.

    `inputs(indices)` builds the samples on the host.  The next batch is dispatched before
    the previous one is fetched, so building inputs overlaps the device's work.
    """
    sharding = mesh_lib.batch_sharding(self.mesh)
    pending = None
    for start in range(0, count, self.batch_size):
      index = range(start, min(start + self.batch_size, count))
      batch = jax.device_put(_fill_batch(inputs(index), self.batch_size), sharding)
      result = self._probabilities(self.variables, batch, modality)
      if pending is not None:
        yield pending[0], np.asarray(pending[1])[: len(pending[0])]
      pending = (index, result)
    if pending is not None:
      yield pending[0], np.asarray(pending[1])[: len(pending[0])]

  def _predict_slices(self, image: np.ndarray, modality: str) -> np.ndarray:
    """[H, W, S] -> [H, W, S, C]: slice k sees slices (k-1, k, k+1) as channels, through
    in-plane windows of `data.size` (one per slice unless the slice is larger)."""
    size = tuple(int(n) for n in self.config.data.size)
    last = image.shape[2] - 1

    def sample(padded, region):
      rows, cols, k = region
      return padded[rows, cols][:, :, np.clip(np.arange(k.start - 1, k.start + 2), 0, last)]

    overlap = float(self.config.infer.overlap)
    # Windows one slice thick, side by side along the slices; in-plane they overlap, and are
    # blended, only where the slice is larger than data.size.
    blend = image.shape[0] > size[0] or image.shape[1] > size[1]
    return self._slide(image, size + (1,), (overlap, overlap, 0.0), sample, modality, blend)

  def _predict_windows(self, image: np.ndarray, modality: str) -> np.ndarray:
    """[H, W, S] -> [H, W, S, C] by Gaussian-weighted sliding windows of `data.patch`."""
    window = tuple(int(n) for n in self.config.data.patch)
    overlap = (float(self.config.infer.overlap),) * 3
    return self._slide(image, window, overlap, lambda padded, r: padded[r][..., None], modality)

  def _slide(self, image, window, overlap, sample, modality, blend=True) -> np.ndarray:
    """[H, W, S] -> [H, W, S, C]: the network on every `window` at `window_starts` (with the
    per-axis `overlap`) of the image, padded where it is smaller; `sample(padded, region)` is
    one window's network input.  With `blend` every voxel averages the windows that hold it,
    weighted by `gaussian_importance`; without, the windows must not overlap, and each voxel
    takes its window's probabilities as they are."""
    padded = _pad_to(image, window)
    starts = [window_starts(n, k, o) for n, k, o in zip(padded.shape, window, overlap)]
    regions = [
      tuple(slice(o, o + k) for o, k in zip(origin, window))
      for origin in itertools.product(*starts)
    ]
    total = np.zeros(padded.shape + (self.config.model.num_classes,), np.float32)
    if blend:
      weights = gaussian_importance(window)[..., None]
      norm = np.zeros(padded.shape + (1,), np.float32)

    def inputs(index):
      return np.stack([sample(padded, regions[i]) for i in index])

    for index, probs in self._batches(inputs, len(regions), modality):
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


load = Segmenter.load


def _local_replica(x):
  """This process's copy of a replicated array that spans other processes' devices too."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return x.addressable_data(0)
  return x


# How predicted files encode classes: the dataset's own codes, or class indices 0..C-1.
LABEL_CODES = ("dataset", "index")


def _abstract_variables(config, mesh):
  """Shapes of params and batch_stats, placed replicated: the target orbax restores onto."""
  model = models.build(config.model, config.modalities)
  spatial = models.input_spatial(config)
  shapes = jax.eval_shape(
    lambda: models.init_variables(model, config.model, spatial, jax.random.key(0))
  )
  sharding = mesh_lib.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def _spacing_affine(spacing) -> np.ndarray:
  try:
    values = [float(v) for v in spacing]
  except (TypeError, ValueError):
    values = []
  if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
    raise DataError(f"predict: spacing must be 3 positive numbers (mm), got {spacing!r}")
  return np.diag(values + [1.0])
