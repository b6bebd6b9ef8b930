"""train_and_evaluate(config, workdir): the whole training run, in clear sections.

Running the same command again in the same work dir resumes from the latest
checkpoint: parameters, optimizer, per-modality statistics, RNG, step and the
data iterators' positions, so a resumed run's losses equal an uninterrupted one's.
"""

import dataclasses
import os
import signal
import threading

import jax
import ml_collections as mc
import numpy as np
from jax.experimental import multihost_utils

from ukd import check, checkpoints, evaluate, files, infer, models, steps, writers
from ukd import config as config_lib
from ukd import state as state_lib
from ukd.data import adapters, pipeline, preprocess, splits, synthetic
from ukd.errors import ConfigError, Preempted, TrainingError


@dataclasses.dataclass
class Data:
  """What the run needs from the dataset: classes, cases by split, cached training volumes."""

  adapter: adapters.Adapter
  class_names: tuple[str, ...]
  cases: dict  # {modality: {split: [Case]}}, the whole split (training uses a subset)
  train_sources: dict  # {modality: [cache entries]}

  def record(self) -> dict:
    """What checkpoints keep of the dataset (`checkpoints.save`): the split, so evaluation
    scores the same test cases whatever happens to splits.json or the dataset, and the class
    names and label codes, so predictions are written in the dataset's own codes."""
    return dict(
      splits={m: {s: [c.id for c in cs] for s, cs in by.items()} for m, by in self.cases.items()},
      classes=list(self.class_names),
      label_codes={m: list(self.adapter.label_codes(m)) for m in self.cases},
    )


def dataset_root(config, workdir) -> str:
  """`config.data.root` (local, made absolute, or `gs://...`); for synthetic phantoms with no
  root, `<workdir>/phantoms`. Phantoms are generated there on first use."""
  root = config.data.root
  if config.data.synthetic.enabled:
    if root in (config_lib.REQUIRED, ""):
      root = files.path(workdir) / "phantoms"
    phantoms = config.data.synthetic
    synthetic.ensure(
      root,
      config.data.dataset,
      n_ct=phantoms.n_ct,
      n_mr=phantoms.n_mr,
      shape=phantoms.shape,
      seed=phantoms.seed,
    )
  if root in (config_lib.REQUIRED, ""):
    raise ConfigError("config.data.root is not set: pass --config.data.root=/path/to/dataset")
  return os.fspath(files.path(root))


def prepare_data(config, root, workdir) -> Data:
  """Dataset root -> cases -> splits -> preprocessed, cached training volumes."""
  adapter = adapters.get_adapter(config.data.dataset, **config.data.options.to_dict())
  modalities = tuple(config.modalities)
  cases = splits.cases_by_split(
    adapter,
    root,
    modalities,
    workdir,
    seed=config.seed,
    fractions=tuple(config.data.split_fractions),
    split_file=config.data.split_file or None,
  )
  # Every case of every split, before minutes of preprocessing: a broken test case fails now.
  check.check_cases(adapter, [c for m in modalities for part in cases[m].values() for c in part])
  cache_dir = config.data.cache_dir or os.fspath(files.path(workdir) / "cache")
  sources = {
    m: preprocess.cache_cases(
      adapter,
      training_subset(cases[m]["train"], config.data.train_fraction),
      config.data,
      cache_dir,
    )
    for m in modalities
  }
  return Data(adapter, tuple(adapter.classes), cases, sources)


def training_subset(cases, fraction: float):
  """The first round(fraction * n) training cases (at least one): the split is already a
  seeded shuffle, so this is a random subset, and a smaller budget is nested in a larger."""
  return cases[: max(1, round(fraction * len(cases)))]


def score_validation(segmenter, data: Data, split="val"):
  """Whole-volume validation: mean Dice per modality and class, and one overlay per modality."""
  scalars, pictures = {}, {}
  for m in segmenter.config.modalities:
    cases = data.cases[m][split]
    if not cases:
      continue
    result = evaluate.evaluate_cases(segmenter, data.adapter, cases)
    for name, values in result["summary"][m].items():
      scalars[f"val_dice/{m}/{name}"] = values["dice"]["mean"]
    # The first case's overlay; with several processes, process 0 (which writes) has it.
    picture = result["overlays"].get(f"{m}/{cases[0].id}")
    if picture is not None:
      pictures[m] = picture
  means = [v for k, v in scalars.items() if k.endswith("/mean")]
  scalars["val_dice/mean"] = float(np.mean(means)) if means else float("nan")
  return scalars, pictures


def main_process_first(fn):
  """`fn()` on process 0, then, past a barrier, on the others. What process 0 writes to a
  shared work dir (phantoms, splits.json, cache entries) the others then find and read rather
  than write again; on storage each host has for itself, each writes its own copy, the same
  one (the split is seeded, the cache deterministic)."""
  if jax.process_count() == 1:
    return fn()
  result = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("ukd: process 0 prepared the data")
  return fn() if jax.process_index() != 0 else result


def _variables(state) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


def _synced(pending) -> dict:
  """Fetches the metrics of the steps since the last sync; stops the run at the first step
  whose loss is not finite, before anything of that step is saved. Returns the last step's."""
  for step, metrics in jax.device_get(pending):
    bad = steps.nonfinite_terms(metrics)
    if bad:
      terms = ", ".join(f"{k}={float(metrics[k])}" for k in bad)
      raise TrainingError(
        f"non-finite loss at step {step}: {terms}; the work dir keeps the last good checkpoint"
      )
  return metrics


class Preemption:
  """Cloud TPU / SLURM preemption and Kubernetes eviction send SIGTERM, then kill a while
  later. One process: a SIGTERM handler sets a flag that the loop reads after each step.
  Several processes: jax's coordination service hears the notice on any host and picks one
  step for all (`reached_preemption_sync_point`), so every host saves the same step."""

  def __init__(self):
    self.requested = False
    self.multi_process = jax.process_count() > 1
    if not self.multi_process and threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, self._request)

  def _request(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if self.multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


def train_and_evaluate(config: mc.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) in `workdir`, then evaluates the test split. `config` is not changed:
  the run uses `config_lib.resolve`'s frozen copy, which is what its checkpoints hold."""
  config = config_lib.check(config)
  # Listening from the start: a SIGTERM during setup or compilation stops the run after its
  # first step, with that step saved.
  preemption = Preemption()
  workdir = files.path(workdir)
  files.makedirs(workdir)
  is_main = jax.process_index() == 0
  mesh = state_lib.make_mesh()
  state_lib.check_batch_size(config.batch_size, mesh)  # before minutes of preprocessing
  infer.check_crop(config)  # so is a crop that validation could not reproduce

  # ---- Data: cases, splits, preprocessed cache; then the config is resolved and frozen -----
  root = main_process_first(lambda: dataset_root(config, workdir))
  data = main_process_first(lambda: prepare_data(config, root, workdir))
  config = config_lib.resolve(config, root=root, num_classes=len(data.class_names))

  # ---- Model, state --------------------------------------------------------------------------
  model = models.build(config.model, config.modalities)
  spatial = models.input_spatial(config)
  state = state_lib.create(config, model, spatial, jax.random.key(config.seed), mesh)

  # ---- Checkpoint: resume when the work dir has one ------------------------------------------
  mgr = checkpoints.manager(workdir, keep_best=config.keep_best)
  start = mgr.latest_step() or 0
  if start:
    checkpoints.check_resumable(mgr, start, config)
    state = checkpoints.restore_train(mgr, start, jax.eval_shape(lambda: state))
    if is_main:
      print(f"resumed from step {start} in {workdir}", flush=True)

  # ---- Input: this host's slice of every step's batch, from the step after `start` ----------
  train_iter = pipeline.make_train_iterator(
    data.train_sources,
    pipeline.Spec.from_config(config),
    config.modalities,
    seed=config.seed,
    start_step=start,
    shard_index=jax.process_index(),
    shard_count=jax.process_count(),
  )

  writer = writers.MetricWriter(workdir, start_step=start, enabled=is_main)
  writer.write_config(config)
  train_step = steps.make_train_step(model, config, mesh)
  progress = writers.Progress(config.total_steps, start, enabled=is_main)
  # One Segmenter for the whole run: each validation hands it the current weights, and its
  # compiled functions serve every validation.
  segmenter = infer.Segmenter(config, _variables(state))

  # ---- Loop ----------------------------------------------------------------------------------
  step, val = start, {}
  pending = []  # (step, metrics still on the device) since the last sync with the host
  try:
    while step < config.total_steps:
      batch = state_lib.to_global_batch(next(train_iter), mesh)
      state, metrics = train_step(state, batch)
      step += 1
      pending.append((step, metrics))
      last = step == config.total_steps
      validate = (config.eval_every and step % config.eval_every == 0) or last
      preempted = preemption.reached(step)
      save = step % config.checkpoint_every == 0 or last or preempted
      # The host waits for the device only here, so input loading overlaps device compute;
      # every step's losses are still checked before anything is saved.
      if step % config.log_every == 0 or validate or save:
        metrics = _synced(pending)
        pending = []
        progress.update(step, metrics)
        writer.scalars(step, {f"train/{k}": v for k, v in metrics.items()})

      val = {}
      if validate:
        segmenter.update(_variables(state))
        val, pictures = score_validation(segmenter, data)
        writer.scalars(step, val)
        writer.images(step, pictures)
        progress.note(step, f"validation mean Dice {val['val_dice/mean']:.3f}")
      if save:
        checkpoints.save(
          mgr, step, state, config, val_dice=val.get("val_dice/mean"), dataset=data.record()
        )
        writer.flush()  # a remote work dir's logs reach every checkpoint a run resumes from
      if preempted:
        raise Preempted(step)
  finally:
    progress.close()
    mgr.wait_until_finished()
    mgr.close()
    writer.close()
    # Worker processes and shared memory of the input pipeline.
    closer = getattr(train_iter, "close", None)
    if closer:
      closer()

  # ---- Test evaluation -----------------------------------------------------------------------
  tested = evaluate.evaluate(workdir, overlays=config.overlays)  # summary, rows, its folder
  return {"step": step, "val": val, "test": tested}
