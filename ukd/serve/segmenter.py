"""Label maps from a trained network: whole volumes in, label volumes of the same grid out.

Two ways to get a `Segmenter`: `Segmenter(config, variables)` wraps live variables (validation
during training); `load(path)` restores a work dir's checkpoint together with the config saved
in it, so a network always runs with the preprocessing it was trained with.  `load` given
several work dirs (the folds of a cross-validation) gives an ensemble.

Volumes take the road of `ukd.serve.windows` (prepare -> windows -> restore), which an exported
model shares.  What this module adds is the batch function, one jitted call per batch:
  * the network of every ensemble member on the batch, their softmax probabilities averaged;
  * with test-time augmentation (`tta`), each sample also mirrored along every combination of
    the axes the network was trained to see flipped (`data.augment.flip`), all mirrors in one
    batch through the network, flipped back and averaged (as nnU-Net's mirroring); a mirror
    along the patient's left-right has its left/right classes' probabilities swapped back
    first (`data.lateral_pairs`, `ukd.data.lateral`), or the average would blur a left kidney
    into the right one.
`label_table` gives the dataset's own label codes, in which `ukd.serve.predict` writes files.

Batches are sharded over the 'data' mesh axis (`infer.batch_size` rounded up to a multiple of
the device count), so a single compiled function per modality serves every volume.
"""

import itertools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ukd import config as config_lib
from ukd import models
from ukd.data import lateral, splits
from ukd.data.adapters import Adapter, Case
from ukd.data.io import volumes
from ukd.errors import ConfigError, DataError, UkdError
from ukd.evaluation import postprocess as postprocess_lib
from ukd.runtime import checkpoints, fault_log, recovery
from ukd.runtime import mesh as mesh_lib
from ukd.serve import windows


class Segmenter(windows.Predictor):
  """A network (or an ensemble of networks) with its variables on the devices and the config
  it was trained with; `predict_volume`, `label_table` and `check_modality` come from
  `ukd.serve.windows.Predictor`, which an exported model shares."""

  def __init__(
    self, config, variables, mesh=None, *, step=None, tta: bool | None = None, postprocess=None
  ):
    """`variables` holds 'params' and 'batch_stats' (anything else, e.g. optimizer state, is
    not needed), or is a list of such, one per ensemble member, all of `config`'s network.
    `mesh` defaults to all of this process's devices.  Inference runs within one process, on
    its own devices: every volume is small enough for one host, and its result is needed
    there (several hosts share out the cases instead: `evaluate.evaluate_cases`).
    `config` is a checked one (`ukd.config.check`), as training and checkpoints hold.
    `tta` mirrors every sample (None: the config's `infer.tta`); `postprocess` holds the
    connected-component rules applied to the labels (`ukd.evaluation.postprocess`; None: none)."""
    self.config = config
    self.step = step  # checkpoint step(s) when loaded from work dirs (reports name it)
    self.mesh = mesh if mesh is not None else mesh_lib.make_mesh(jax.local_devices())
    self.tta = bool(config.infer.tta if tta is None else tta)
    self.flips = mirror_axes(config) if self.tta else [()]
    eval_step = models.make_eval_step(models.build(config.model, config.modalities))
    flips = self.flips
    unmirror = _unmirror(models.DIMS[config.model.name], lateral.mirror_of(config))

    def probabilities(members, batch, modality):
      """Mean softmax over members and mirrors: every mirror of the batch in one call."""
      mirrored = jnp.concatenate([_flip(batch, axes) for axes in flips])
      total = 0.0
      for variables in members:
        p = jax.nn.softmax(eval_step(variables, mirrored, modality).astype(jnp.float32), -1)
        parts = jnp.split(p, len(flips))
        total += sum(unmirror(part, axes) for part, axes in zip(parts, flips)) / len(flips)
      return total / len(members)

    # Compiled once per (modality, batch shape) for this Segmenter's life: training holds one
    # Segmenter for every validation and hands it new weights through `update`.
    self._probabilities = jax.jit(probabilities, static_argnames="modality")
    devices = self.mesh.shape[mesh_lib.DATA_AXIS]
    self.batch_size = -(-int(config.infer.batch_size) // devices) * devices
    self.settings = windows.Settings.from_config(
      config,
      config_lib.preprocessing(config),
      models.DIMS[config.model.name],
      self.batch_size,
      postprocess,
    )
    self.update(variables)

  @classmethod
  def load(
    cls, path, step="best", *, tta: bool | None = None, postprocess: str = "auto"
  ) -> "Segmenter":
    """Restores params and batch_stats (no optimizer state) and the saved config.

    `path` is a work dir, its checkpoints dir or one step's dir; a step dir selects its step
    (`step` may then stay 'best' or name the same step).  A list of paths (or one string of
    comma-separated paths) is an ensemble: its members must share classes, label codes,
    modalities, network and preprocessing, since their probabilities are averaged voxel by
    voxel.  The variables land replicated on whatever devices this process has, whatever
    trained them.  `postprocess`: 'auto' (the work dir's chosen rules, if any), 'none', or
    the path of a postprocessing.json (`ukd.evaluation.postprocess.load_rules`).
    """
    if isinstance(path, (list, tuple)):
      paths = list(path)
    else:
      paths = [p for p in os.fspath(path).split(",") if p]
    mesh = mesh_lib.make_mesh(jax.local_devices())
    members = [_restore(p, step, mesh) for p in paths]
    config, _, dataset, _ = members[0]
    for other in members[1:]:
      _check_member(members[0], other)
    steps_ = [m[3] for m in members]
    segmenter = cls(
      config,
      [m[1] for m in members],
      mesh,
      step=steps_[0] if len(steps_) == 1 else steps_,
      tta=tta,
      postprocess=postprocess_lib.load_rules(paths, postprocess),
    )
    segmenter.dataset = dataset
    return segmenter

  def update(self, variables) -> None:
    """Takes new weights without recompiling; copied, so a train step that donates its state
    cannot delete them. Weights replicated over several hosts' devices (multi-host training)
    are taken from this process's own replica: inference runs on this process's devices."""
    members = variables if isinstance(variables, (list, tuple)) else [variables]
    kept = [{"params": v["params"], "batch_stats": v.get("batch_stats", {})} for v in members]
    kept = jax.tree.map(_local_replica, kept)
    self.variables = jax.device_put(kept, mesh_lib.replicated(self.mesh), may_alias=False)

  # --- public prediction API ------------------------------------------------------------------

  def predict(self, volume, modality: str, spacing=None, affine=None) -> np.ndarray:
    """A 3D array in its own orientation -> uint8 labels of the same shape.

    Orientation matters (slices are taken along the canonical `data.slice_axis`): pass the
    array's affine, or at least its voxel spacing (an axis-aligned RAS affine); with neither,
    the array is taken as already RAS. A model trained at a set pixel size (`data.spacing`)
    resamples every slice to it, which 1 mm voxels assumed for an array of any size would get
    silently wrong: there an array with neither is a one-line DataError.
    """
    self.check_modality(modality)
    if spacing is None and affine is None and self.settings.preprocessing[modality].spacing:
      raise DataError(
        f"predict: this model resamples to {self.config.data.spacing} mm pixels, so it needs "
        "the array's voxel size: pass affine= (e.g. nibabel's image.affine) or spacing= (mm)"
      )
    if spacing is not None:
      if affine is not None:
        raise DataError("predict: give spacing or affine, not both (the affine holds the spacing)")
      affine = _spacing_affine(spacing)
    vol = volumes.from_array(volume, affine, source="input volume")
    labels, _ = self.predict_volume(vol, modality)
    return vol.to_original(labels)

  def batch_function(self, modality: str):
    """batch [N, *window, channels] (N = `batch_size`) -> probabilities on the devices: the
    function `ukd.serve.windows` slides over a volume, and what an export serialises."""
    sharding = mesh_lib.batch_sharding(self.mesh)

    def run(batch):
      return self._probabilities(self.variables, jax.device_put(batch, sharding), modality)

    return run


def mirror_axes(config) -> list[tuple[int, ...]]:
  """Every combination of the axes training flipped (`data.augment.flip`), the identity first:
  4 mirrors for a 2D network trained with both in-plane flips, 8 for a 3D one with all three.
  A network never shown a flip is not asked to predict on one: a ConfigError."""
  axes = tuple(config.data.augment.flip)  # sorted axes, as `ukd.config.check` leaves them
  if not axes:
    raise ConfigError(
      "test-time augmentation mirrors the image, but this network was trained without flips "
      "(data.augment.flip is empty in its config)"
    )
  return [c for n in range(len(axes) + 1) for c in itertools.combinations(axes, n)]


def _flip(batch, axes):
  """Mirrors data axes (0 = first spatial axis) of a [N, *spatial, channels] batch."""
  return jnp.flip(batch, [a + 1 for a in axes]) if axes else batch


def _unmirror(dims: int, mirror: lateral.Mirror | None):
  """(probabilities [N, *spatial, C] of a batch mirrored along `axes`, axes) -> probabilities
  of the batch itself: flipped back along the axes the output has (axis 2 of a 2D sample is
  its input's neighbour slices, not a dimension of the output), and where the mirror was along
  the patient's left-right, each left/right pair's probabilities swapped back."""

  # The swap as a permutation matrix: a matmul exports (ONNX MatMul) where a gather would not,
  # and at full precision it moves each probability exactly.
  swap = None if mirror is None else np.eye(len(mirror.swap), dtype=np.float32)[list(mirror.swap)]

  def back(part, axes):
    part = _flip(part, tuple(a for a in axes if a < dims))
    if mirror is not None and mirror.affects(axes):
      part = jnp.matmul(part, swap.T, precision=jax.lax.Precision.HIGHEST)
    return part

  return back


def _restore(path, step, mesh):
  """(config, variables, dataset record, step) of one work dir's checkpoint.  The 'best' of
  a network whose modalities share no parameter (scheme `single`) is each modality's own best
  step, by that modality's validation Dice: its variables are merged from those steps, and
  the step is then {modality: step}."""
  workdir, step = checkpoints.resolve(path, step)
  mgr = checkpoints.manager(workdir, read_only=True)
  try:
    chosen = checkpoints.select_step(mgr, step)
    with fault_log.background_errors(workdir):
      config, variables, dataset, chosen = _restore_step(mgr, step, chosen, mesh)
  except UkdError:
    raise
  except Exception as e:  # whatever Orbax or TensorStore raise for a damaged folder
    raise recovery.damaged_error(mgr, chosen, e, workdir) from None
  finally:
    mgr.close()
  logging.info("restored step %s of %s", chosen, workdir)
  return config, variables, dataset, chosen


def _restore_step(mgr, step, chosen: int, mesh):
  """`_restore` once `select_step` has chosen the step for `step`."""
  config = config_lib.frozen(checkpoints.restore_config(mgr, chosen).to_dict())
  abstract = _abstract_variables(config, mesh)
  variables = checkpoints.restore_variables(mgr, chosen, abstract)
  dataset = checkpoints.restore_dataset(mgr, chosen)
  per_modality = None
  if step == "best" and shares_nothing(abstract):
    per_modality = checkpoints.best_steps(mgr, config.modalities)
  if per_modality and set(per_modality.values()) != {chosen}:
    restored = {
      s: checkpoints.restore_variables(mgr, s, abstract) for s in set(per_modality.values())
    }
    variables = _merge_modalities({m: restored[s] for m, s in per_modality.items()})
    chosen = per_modality
  return config, variables, dataset, chosen


def _modality_of(path, modalities) -> str | None:
  """The modality a variable belongs to: the per-modality branch in its path
  (`ukd.models.layers`), None for a shared one."""
  names = [getattr(key, "key", None) for key in path]
  return next((m for m in modalities if m in names), None)


def shares_nothing(variables) -> bool:
  """Whether no layer of the network has a branch shared by the modalities."""
  paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(variables)]
  return not any(getattr(key, "key", None) == "shared" for path in paths for key in path)


def _merge_modalities(by_modality: dict) -> dict:
  """One variables tree whose every modality's branch comes from `by_modality[modality]`."""
  modalities = tuple(by_modality)
  leaves = {
    m: dict(jax.tree_util.tree_leaves_with_path(variables)) for m, variables in by_modality.items()
  }
  return jax.tree_util.tree_map_with_path(
    lambda path, _: leaves[_modality_of(path, modalities)][path], by_modality[modalities[0]]
  )


# What ensemble members must agree on: one network input per voxel (the preprocessing), one
# network (members differ in weights only: folds, seeds), one meaning per class.
_MEMBER_FIELDS = ("modalities", "model") + tuple(
  f"data.{k}" for k in ("size", "spacing", "slice_axis", "crop", "crop_margin", "norm", "patch")
)


def _check_member(first, other) -> None:
  def pick(config, field):
    value = config
    for key in field.split("."):
      value = value[key]
    return value.to_dict() if hasattr(value, "to_dict") else value

  for field in _MEMBER_FIELDS:
    if pick(first[0], field) != pick(other[0], field):
      raise ConfigError(f"ensemble members differ in config.{field}: they must share it")
  for key in ("classes", "label_codes"):
    if (first[2] or {}).get(key) != (other[2] or {}).get(key):
      raise ConfigError(f"ensemble members differ in their dataset's {key}: they must share them")


load = Segmenter.load


def _local_replica(x):
  """This process's copy of a replicated array that spans other processes' devices too."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return x.addressable_data(0)
  return x


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


def split_cases(
  seg: Segmenter, workdir: str | os.PathLike, split: str
) -> tuple[Adapter, list[Case]]:
  """(adapter, cases of `split` for every modality) of a loaded checkpoint: the split the
  checkpoint recorded (`checkpoints.save`; `splits.json` for checkpoints that recorded none)."""
  config = seg.config
  adapter = splits.adapter_for(config)
  saved = (seg.dataset or {}).get("splits")
  step = next(iter(seg.step.values())) if isinstance(seg.step, dict) else seg.step
  source = checkpoints.directory(workdir) / str(step) / "dataset"
  cases = splits.cases_for(config, adapter, config.data.root, workdir, saved=saved, source=source)
  return adapter, [c for m in config.modalities for c in cases[m][split]]
