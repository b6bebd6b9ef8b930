"""Label maps from a trained network: whole volumes in, label volumes of the same grid out.

Two ways to get a `Segmenter`: `Segmenter(config, variables)` wraps live variables (validation
during training); `load(path)` restores a work dir's checkpoint together with the config saved
in it, so a network always runs with the preprocessing it was trained with.

Every volume takes the same road: canonical Volume -> `preprocess.prepare` (network space
[H, W, S], from the image alone) -> class probabilities [H, W, S, C] ->
`preprocess.restore_labels` (linear interpolation onto the canonical grid, then argmax, a run
of slices at a time so a large CT never holds all classes at full resolution) ->
`Volume.to_original` for the caller's own orientation.  Restoring probabilities rather than
labels gives smoother boundaries than nearest-neighbour label resizing.  Files are written in
the dataset's own label codes (`Segmenter.label_table`).

  * 2D networks see every slice with its two neighbours as channels, edges replicated, exactly
    as the training pipeline builds its inputs.
  * 3D networks see sliding windows of `data.patch` overlapping by `infer.overlap`.  The
    windows' probabilities are blended with a Gaussian importance map (sigma = window / 8 per
    axis, as nnU-Net), which trusts the window centre, where the network saw most context,
    more than its border.

Slices or windows reach the devices in batches of one fixed size (`infer.batch_size` rounded
up to a multiple of the device count, the last batch padded) sharded over the 'data' mesh axis.
So a single compiled function per modality serves every volume whatever its size, and a
sample's result does not depend on which batch it landed in.
"""

import functools
import itertools
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from ukd import checkpoints, files, models, steps
from ukd import config as config_lib
from ukd import state as state_lib
from ukd.data import preprocess, volumes
from ukd.errors import ConfigError, DataError, error

_NIFTI = re.compile(r"\.nii(\.gz)?$")
# nnU-Net names the single channel of an image `<case>_0000.nii.gz`; its label is `<case>`.
_CHANNEL_SUFFIX = re.compile(r"_0000$")


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
    needed there (several hosts share out the cases instead: `evaluate.evaluate_cases`)."""
    if int(config.infer.batch_size) < 1:
      raise ConfigError(f"config.infer.batch_size={config.infer.batch_size} must be at least 1")
    overlap = float(config.infer.overlap)
    if not 0.0 <= overlap < 1.0:
      raise ConfigError(f"config.infer.overlap={overlap} must be in [0, 1)")
    self.config = config
    self.step = step  # checkpoint step when loaded from a work dir (reports name it)
    self.mesh = mesh if mesh is not None else state_lib.make_mesh(jax.local_devices())
    eval_step = steps.make_eval_step(models.build(config.model, config.modalities))
    # Compiled once per (modality, batch shape) for this Segmenter's life: training holds one
    # Segmenter for every validation and hands it new weights through `update`.
    self._probabilities = jax.jit(
      lambda variables, batch, modality: jax.nn.softmax(
        eval_step(variables, batch, modality).astype(jnp.float32), axis=-1
      ),
      static_argnames="modality",
    )
    devices = self.mesh.shape[state_lib.DATA_AXIS]
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
      mesh = state_lib.make_mesh(jax.local_devices())
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
    self.variables = jax.device_put(kept, state_lib.replicated(self.mesh), may_alias=False)

  # --- public prediction API ------------------------------------------------------------------

  def predict(self, volume, modality: str, spacing=None, affine=None) -> np.ndarray:
    """A 3D array in its own orientation -> uint8 labels of the same shape.

    Orientation matters (slices are taken along the canonical `data.slice_axis`): pass the
    array's affine, or at least its voxel spacing (an axis-aligned RAS affine); with neither,
    the array is taken as already RAS.
    """
    self._check_modality(modality)
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

    The image alone decides everything, the crop included (`check_crop`): evaluation predicts
    exactly as prediction does, never helped by the label it is scored against.
    """
    self._check_modality(modality)
    check_crop(self.config)
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

  def predict_file(
    self, in_path, out_path, modality: str, probabilities=None, label_codes: str = "dataset"
  ) -> None:
    """NIfTI in, label map out with the input's exact affine and header, in the dataset's codes
    (`label_table`; uint8, or uint16 when a code exceeds 255), and `<name>.json` beside it
    naming each code's class.  With `probabilities` (a path) also the float32 class
    probabilities [X, Y, Z, C], channel k for class index k."""
    table = self.label_table(modality, label_codes)
    vol = volumes.read_image(in_path)
    labels, probs = self.predict_volume(vol, modality, probabilities=bool(probabilities))
    dtype = np.uint8 if max(code for code, _ in table) <= 255 else np.uint16
    codes = np.array([code for code, _ in table], dtype)
    volumes.write_like(codes[labels], vol, out_path, dtype=dtype)
    files.write_json(sidecar_path(out_path), {"classes": {str(c): name for c, name in table}})
    if probabilities:
      volumes.write_like(probs, vol, probabilities, dtype=np.float32)

  # --- network-space prediction ----------------------------------------------------------------

  def _check_modality(self, modality) -> None:
    known = list(self.config.modalities)
    if modality not in known:
      raise DataError(f"modality {modality!r} is not one this network was trained on: {known}")

  def _batches(self, inputs, count: int, modality: str):
    """Yields (sample indices, probabilities) batch by batch.

    `inputs(indices)` builds the samples on the host.  The next batch is dispatched before
    the previous one is fetched, so building inputs overlaps the device's work.
    """
    sharding = state_lib.batch_sharding(self.mesh)
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
    """[H, W, S] -> [H, W, S, C]: slice k sees slices (k-1, k, k+1) as channels."""
    h, w, s = image.shape
    out = np.empty((h, w, s, self.config.model.num_classes), np.float32)

    def inputs(index):
      neighbours = np.clip(np.asarray(index)[:, None] + np.array([-1, 0, 1]), 0, s - 1)
      return np.moveaxis(image[:, :, neighbours], 2, 0)  # [H,W,n,3] -> [n,H,W,3]

    for index, probs in self._batches(inputs, s, modality):
      out[:, :, index.start : index.stop] = np.moveaxis(probs, 0, 2)
    return out

  def _predict_windows(self, image: np.ndarray, modality: str) -> np.ndarray:
    """[H, W, S] -> [H, W, S, C] by Gaussian-weighted sliding windows of `data.patch`."""
    window = tuple(int(n) for n in self.config.data.patch)
    padded = _pad_to(image, window)
    overlap = float(self.config.infer.overlap)
    origins = list(
      itertools.product(*(window_starts(n, k, overlap) for n, k in zip(padded.shape, window)))
    )
    regions = [tuple(slice(o, o + k) for o, k in zip(origin, window)) for origin in origins]
    weights = gaussian_importance(window)
    total = np.zeros(padded.shape + (self.config.model.num_classes,), np.float32)
    norm = np.zeros(padded.shape, np.float32)

    def inputs(index):
      return np.stack([padded[regions[i]] for i in index])[..., None]

    for index, probs in self._batches(inputs, len(regions), modality):
      for i, p in zip(index, probs):
        total[regions[i]] += p * weights[..., None]
        norm[regions[i]] += weights
    h, w, s = image.shape
    return (total / norm[..., None])[:h, :w, :s]


load = Segmenter.load


def _local_replica(x):
  """This process's copy of a replicated array that spans other processes' devices too."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return x.addressable_data(0)
  return x


# How predicted files encode classes: the dataset's own codes, or class indices 0..C-1.
LABEL_CODES = ("dataset", "index")


def check_crop(config) -> None:
  """Prediction sees no ground truth, so it cannot crop around it; evaluation must predict
  the same way, or its scores would be helped by the label they are scored against."""
  if config.data.crop == "foreground":
    raise ConfigError(
      "config.data.crop='foreground' crops around the ground truth, which prediction does not "
      "have; use 'body' (found from the image) or 'none'"
    )


def _abstract_variables(config, mesh):
  """Shapes of params and batch_stats, placed replicated: the target orbax restores onto."""
  model = models.build(config.model, config.modalities)
  spatial = models.input_spatial(config)
  shapes = jax.eval_shape(
    lambda: models.init_variables(model, config.model, spatial, jax.random.key(0))
  )
  sharding = state_lib.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def _spacing_affine(spacing) -> np.ndarray:
  try:
    values = [float(v) for v in spacing]
  except (TypeError, ValueError):
    values = []
  if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
    raise DataError(f"predict: spacing must be 3 positive numbers (mm), got {spacing!r}")
  return np.diag(values + [1.0])


# --- files and folders ------------------------------------------------------------------------


def _input_files(input_path) -> list[str]:
  """The NIfTI file itself, or a folder's .nii/.nii.gz files (not recursive), sorted."""
  input_path = os.fspath(input_path)
  folder = epath.Path(input_path)
  if folder.is_file():
    return [input_path]
  if not folder.is_dir():
    raise DataError(f"{input_path}: input not found")
  found = sorted(
    os.path.join(input_path, entry.name)
    for entry in folder.iterdir()
    if _NIFTI.search(entry.name) and not entry.name.startswith(".")
  )
  if not found:
    raise DataError(f"{input_path}: no .nii or .nii.gz files in this folder")
  return found


def _exists(path) -> bool:
  """Whether `path` exists; locally a dangling link counts too (a write would replace it)."""
  return epath.Path(path).exists() if files.is_remote(path) else os.path.lexists(path)


def output_name(path) -> str:
  """`case_0000.nii.gz` -> `case`: the name nnU-Net gives the case's label file."""
  return _CHANNEL_SUFFIX.sub("", _NIFTI.sub("", os.path.basename(path)))


def sidecar_path(out_path) -> str:
  """`<name>.nii.gz` -> `<name>.json`: where `predict_file` names the classes of its codes."""
  out_path = os.fspath(out_path)
  return _NIFTI.sub("", out_path) + ".json"


def predict_paths(
  seg: Segmenter,
  input_path,
  output_dir,
  modality: str,
  probabilities: bool = False,
  *,
  overwrite: bool = False,
  label_codes: str = "dataset",
) -> list[str]:
  """Predicts a file or a folder of NIfTI files into `<output_dir>/<name>.nii.gz`.

  `<name>.json` names the classes of its label codes (`label_codes`: 'dataset' or 'index');
  with `probabilities`, `<name>_probabilities.nii.gz` holds the float32 class probabilities.
  Returns every written path.  All names are checked before the first prediction, so a clash,
  an output that would overwrite its input, or one that already exists (nnU-Net names the
  label of `case_0000.nii.gz` `case.nii.gz`: predicting imagesTr into labelsTr would replace
  the ground truth) fails before minutes of work; `overwrite=True` replaces existing outputs.
  """
  seg._check_modality(modality)
  seg.label_table(modality, label_codes)  # a bad choice fails before any work
  inputs = _input_files(input_path)
  targets, taken = {}, set()
  for path in inputs:
    out = os.path.join(os.fspath(output_dir), output_name(path) + ".nii.gz")
    probs = out[: -len(".nii.gz")] + "_probabilities.nii.gz" if probabilities else None
    outputs = [out, sidecar_path(out)] + ([probs] if probs else [])
    for target in outputs:
      if files.path(target) in taken:
        raise DataError(f"{path}: its output {target} would overwrite another input's output")
      if files.path(target) == files.path(path):
        raise DataError(f"{path}: the output would overwrite this input; choose another --output")
      if not overwrite and _exists(target):
        raise error(DataError, target, "already exists; pass --overwrite to replace it")
      taken.add(files.path(target))
    targets[path] = (out, probs, outputs)
  written = []
  for i, (path, (out, probs, outputs)) in enumerate(targets.items()):
    seg.predict_file(path, out, modality, probabilities=probs, label_codes=label_codes)
    written += outputs
    logging.info("[%d/%d] %s -> %s", i + 1, len(inputs), path, out)
  return written
