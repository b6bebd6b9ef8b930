"""train(config, workdir): the whole training run, in clear sections.

Running the same command again in the same work dir resumes from the latest
checkpoint: parameters, optimizer, per-modality statistics, RNG, step and the
data iterators' positions, so a resumed run's losses equal an uninterrupted one's.
"""

import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import jax
import ml_collections as mc
import numpy as np
from jax.experimental import multihost_utils

from ukd import config as config_lib
from ukd import config_fields, files, models
from ukd.data import adapters, check, lateral, pipeline, preprocess, splits
from ukd.data.synthetic import generate
from ukd.errors import ConfigError, Preempted, TrainingError
from ukd.evaluation import evaluate
from ukd.runtime import checkpoints, fault_log, recovery
from ukd.runtime import mesh as mesh_lib
from ukd.serve.segmenter import Segmenter, shares_nothing
from ukd.train import profiling, steps, writers
from ukd.train import state as state_lib

T = TypeVar("T")


@dataclasses.dataclass
class Data:
  """What the run needs from the dataset: classes, cases by split, cached training volumes."""

  adapter: adapters.Adapter
  class_names: tuple[str, ...]
  cases: dict  # {modality: {split: [Case]}}, the whole split (training uses a subset)
  train_sources: dict  # {modality: [cache entries]}
  trained: dict  # {modality: [Case]}: the training cases the budget keeps (`training_subset`)
  lateral_pairs: tuple  # ((left, right) class indices), what a left-right flip swaps

  def record(self) -> dict:
    """What checkpoints keep of the dataset (`checkpoints.save`): the split, so evaluation
    scores the same test cases whatever happens to splits.json or the dataset, the training
    cases a `data.train_fraction` budget kept, and the class names and label codes, so
    predictions are written in the dataset's own codes."""
    return dict(
      splits={m: {s: [c.id for c in cs] for s, cs in by.items()} for m, by in self.cases.items()},
      trained={m: [c.id for c in cs] for m, cs in self.trained.items()},
      classes=list(self.class_names),
      label_codes={m: list(self.adapter.label_codes(m)) for m in self.cases},
    )


def dataset_root(config: mc.ConfigDict, workdir: str | os.PathLike) -> str:
  """The dataset root a run reads, generating synthetic phantoms there on first use.

  Phantoms are generated into `<workdir>/phantoms` when `data.root` is unset, and into a
  `data.root` the user set only when that folder exists (empty, or holding the phantoms):
  a mistyped root would otherwise fill a new folder at the typo and train on it silently.

  Args:
    config: the run's config; `data.root` and `data.synthetic` are read.
    workdir: the run's work dir; synthetic phantoms without a root go to `<workdir>/phantoms`.

  Returns:
    `config.data.root` (local, made absolute, or `gs://...`), or the phantoms' folder.
  """
  root = config.data.root
  if config.data.synthetic.enabled:
    if root in (config_lib.REQUIRED, ""):
      root = files.path(workdir) / "phantoms"
    elif not files.path(root).exists():
      raise ConfigError(
        f"config.data.root={root} does not exist; with data.synthetic.enabled, phantoms are "
        "made only into a folder that exists and is empty (create it) or, with data.root "
        "unset, into <workdir>/phantoms"
      )
    phantoms = config.data.synthetic
    generate.ensure(
      root,
      config.data.dataset,
      n_ct=phantoms.n_ct,
      n_mr=phantoms.n_mr,
      shape=phantoms.shape,
      seed=phantoms.seed,
      realism=phantoms.realism,
      **splits.adapter_for(config).phantom_options,
      **({"contrasts": dict(phantoms.contrasts)} if phantoms.get("contrasts") else {}),
    )
  if root in (config_lib.REQUIRED, ""):
    raise ConfigError("config.data.root is not set: pass --config.data.root=/path/to/dataset")
  return os.fspath(files.path(root))


def prepare_data(config: mc.ConfigDict, root: str, workdir: str | os.PathLike) -> Data:
  """Dataset root -> cases -> splits -> preprocessed, cached training volumes.

  Args:
    config: the run's checked config.
    root: the dataset root (`dataset_root`).
    workdir: the run's work dir (its `splits.json`, and `cache/` unless `data.cache_dir`).

  Returns:
    The classes, every split's cases, the cache entries of the training cases and the
    dataset's left/right pairs (a flip that would mirror an unpaired lateral class is refused
    here, before anything is prepared).
  """
  adapter = splits.adapter_for(config)
  modalities = tuple(config.modalities)
  cases = splits.cases_for(config, adapter, root, workdir)
  flips = config_fields.flip_axes(config.data.augment.flip)
  lateral.check_flip(
    adapter.classes, adapter.lateral_pairs, flips, config.data.slice_axis, config.data.dataset
  )
  pairs = lateral.pair_indices(adapter.classes, adapter.lateral_pairs)
  # Every case of every split, before minutes of preprocessing: a broken test case fails now.
  check.check_cases(adapter, [c for m in modalities for part in cases[m].values() for c in part])
  cache_dir = config.data.cache_dir or os.fspath(files.path(workdir) / "cache")
  trained = {
    m: training_subset(
      cases[m]["train"], config_fields.train_fraction_for(config.data.train_fraction, m)
    )
    for m in modalities
  }
  preprocessing = config_lib.preprocessing(config)
  sources = {
    m: preprocess.cache_cases(adapter, trained[m], preprocessing[m], cache_dir) for m in trained
  }
  return Data(adapter, tuple(adapter.classes), cases, sources, trained, pairs)


def training_subset(cases: list[adapters.Case], fraction: float) -> list[adapters.Case]:
  """The first round(fraction * n) training cases (at least one): the split is already a
  seeded shuffle, so this is a random subset drawn by the run's seed, and a smaller budget is
  nested in a larger. Validation and test cases are never part of a budget."""
  return cases[: max(1, round(fraction * len(cases)))]


def score_validation(
  segmenter: Segmenter, data: Data, split: str = "val"
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Whole-volume validation as training logs it: Dice alone, since the surface distances
  (two distance transforms per class and case) are left to the test evaluation.

  Args:
    segmenter: the network with the current weights.
    data: the run's cases (`prepare_data`).
    split: the split to score.

  Returns:
    ({'val_dice/<modality>/<class | mean>', 'val_dice/mean': mean Dice}, {'<modality>/<case
    id>': overlay}) with `config.overlays` overlays per modality (process 0 draws them: it
    writes).
  """
  config = segmenter.config
  cases = [c for m in config.modalities for c in data.cases[m][split]]
  result = evaluate.evaluate_cases(
    segmenter,
    data.adapter,
    cases,
    overlays=config.overlays,
    metric_names=("dice",),
    label_sets=config.data.label_sets,  # checkpoints are chosen on what validation labels
  )
  scalars = {
    f"val_dice/{m}/{name}": values["dice"]["mean"]
    for m, table in result["summary"].items()
    for name, values in table.items()
  }
  means = [v for k, v in scalars.items() if k.endswith("/mean")]
  scalars["val_dice/mean"] = float(np.mean(means)) if means else float("nan")
  return scalars, result["overlays"]


def main_process_first(fn: Callable[[], T]) -> T:
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
  for step, metrics in jax.device_get(pending):  # host (numpy) values from here on
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
  step for all, which Orbax's manager reports (`reached_preemption`, also part of its
  `should_save`), so every host saves the same step."""

  def __init__(self):
    self.requested = False
    self.multi_process = jax.process_count() > 1
    if not self.multi_process and threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, self._request)

  def _request(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, mgr, step: int) -> bool:
    if self.multi_process:
      return mgr.reached_preemption(step)
    return self.requested


class Throughput:
  """Steps/s and examples/s of training alone, over the steps since the last measurement:
  the first measurement only starts the clock (its steps paid for compilation), and the loop
  restarts it after a validation or checkpoint, whose time is logged on its own."""

  def __init__(self, examples_per_step: int, clock=time.perf_counter):
    self.examples_per_step = examples_per_step
    self.clock = clock
    self.mark = None  # (step, time) the clock started at

  def measure(self, step: int) -> dict:
    """{'perf/steps_per_sec', 'perf/examples_per_sec'} ({} the first time), at a sync with
    the device (its work up to `step` is done)."""
    now, rates = self.clock(), {}
    if self.mark is not None and step > self.mark[0]:
      per_sec = (step - self.mark[0]) / max(now - self.mark[1], 1e-9)
      rates = {
        "perf/steps_per_sec": per_sec,
        "perf/examples_per_sec": per_sec * self.examples_per_step,
      }
    self.mark = (step, now)
    return rates

  def restart(self, step: int) -> None:
    self.mark = (step, self.clock())


def train(
  config: mc.ConfigDict, workdir: str | os.PathLike, preemption: "Preemption | None" = None
) -> dict:
  """Trains (or resumes) in `workdir` to `config.total_steps`, validating and checkpointing on
  the way (`ukd.commands.train_and_evaluate` then chooses post-processing and evaluates).

  Args:
    config: the training config; not changed: the run uses `config_lib.resolve`'s frozen copy,
      which is what its checkpoints hold.
    workdir: local or `gs://...`; a work dir with a checkpoint resumes from it.
    preemption: the SIGTERM listener, made by a caller that does work first (taking the work
      dir's lock); None: made here, first thing.

  Returns:
    {'step': the last step, 'val': the last validation's scalars, 'validated': whether the
    dataset has validation cases}.
  """
  # Listening from the start: a SIGTERM during setup or compilation stops the run after its
  # first step, with that step saved.
  preemption = preemption or Preemption()
  config = config_lib.check(config)
  workdir = files.path(workdir)
  files.makedirs(workdir)
  # Orbax's reports of a failed save or restore, a traceback from each of its threads, go to
  # the work dir's log; the terminal gets the one line the run ends with.
  with fault_log.background_errors(workdir):
    return _train(config, workdir, preemption)


def _train(config: mc.ConfigDict, workdir, preemption: Preemption) -> dict:
  """`train`'s run, in `workdir` (made)."""
  is_main = jax.process_index() == 0
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_size(config.batch_size, mesh)  # before minutes of preprocessing

  # ---- Data: cases, splits, preprocessed cache; then the config is resolved and frozen -----
  root = main_process_first(lambda: dataset_root(config, workdir))
  data = main_process_first(lambda: prepare_data(config, root, workdir))
  config = config_lib.resolve(
    config,
    root=root,
    classes=data.class_names,
    held={m: data.adapter.labelled(m) for m in config.modalities},
    lateral_pairs=data.lateral_pairs,
  )

  # ---- Model, state --------------------------------------------------------------------------
  model = models.build(config.model, config.modalities)
  spatial = models.input_spatial(config)
  state = state_lib.create(config, model, spatial, state_lib.seed_key(config.seed), mesh)

  # ---- Checkpoint: resume when the work dir has one ------------------------------------------
  mgr = checkpoints.manager(
    workdir,
    keep_best=config.keep_best,
    every=config.checkpoint_every,
    last_step=config.total_steps,
    # Separate networks (nothing shared) are each chosen on their own modality's Dice.
    best_of=tuple(config.modalities) if shares_nothing(state.params) else (),
  )
  try:
    start, restored = recovery.restore_newest(
      mgr, config, jax.eval_shape(lambda: state), workdir, main_process=is_main
    )
  except BaseException:
    mgr.close()  # its threads, left running, would report again at exit
    raise
  if start:
    state = restored
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

  writer = writers.create(
    workdir, start_step=start, total_steps=config.total_steps, main_process=is_main
  )
  writer.write_texts(start, {"config": "```\n" + str(config) + "\n```"})
  train_step = steps.make_train_step(model, config, mesh)
  # Both modalities' samples count: one step trains on batch_size of each.
  throughput = Throughput(config.batch_size * len(config.modalities))
  trace = profiling.StepTrace(workdir, config.profile)
  # One Segmenter for the whole run: each validation hands it the current weights, and its
  # compiled functions serve every validation.
  segmenter = Segmenter(config, _variables(state))

  # ---- Loop ----------------------------------------------------------------------------------
  step, val = start, {}
  pending = []  # (step, metrics still on the device) since the last sync with the host
  with contextlib.ExitStack() as cleanup:  # each closes, in reverse order, whatever raises
    cleanup.callback(getattr(train_iter, "close", lambda: None))  # workers, shared memory
    cleanup.callback(writer.close)
    # Waits for the save in flight: the last step's, or the one a preemption stops after.
    cleanup.callback(checkpoints.close, mgr)
    cleanup.callback(trace.close)
    while step < config.total_steps:
      batch = mesh_lib.to_global_batch(next(train_iter), mesh)
      trace.before(step + 1)
      with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
        state, metrics = train_step(state, batch)
      step += 1
      trace.after(step, metrics)
      pending.append((step, metrics))
      last = step == config.total_steps
      validate = (config.eval_every and step % config.eval_every == 0) or last
      # Orbax decides the saves (every checkpoint_every steps, the last step, a multi-process
      # preemption point); a single process's SIGTERM adds its own.
      preempted = preemption.reached(mgr, step)
      save = preempted or mgr.should_save(step)
      # The host waits for the device only here, so input loading overlaps device compute;
      # every step's losses are still checked before anything is saved.
      if step % config.log_every == 0 or validate or save:
        metrics = _synced(pending)
        pending = []
        scalars = {f"train/{k}": v for k, v in metrics.items()}
        writer.write_scalars(step, {**scalars, **throughput.measure(step)})

      val = {}
      if validate:
        started = time.perf_counter()
        segmenter.update(_variables(state))
        val, pictures = score_validation(segmenter, data)
        spent = {"perf/validation_sec": time.perf_counter() - started}
        writer.write_scalars(step, {**val, **spent})
        writer.write_images(step, {f"overlay/{k}": v for k, v in pictures.items()})
      if save:
        started = time.perf_counter()
        checkpoints.save(
          mgr,
          step,
          state,
          config,
          val_dice=val.get("val_dice/mean"),
          modality_dice={
            m: val[f"val_dice/{m}/mean"] for m in config.modalities if f"val_dice/{m}/mean" in val
          },
          dataset=data.record(),
        )
        writer.write_scalars(step, {"perf/checkpoint_sec": time.perf_counter() - started})
        writer.flush()  # a remote work dir's logs reach every checkpoint a run resumes from
      if validate or save:
        throughput.restart(step)
      if preempted:
        raise Preempted(step)

  validated = any(data.cases[m]["val"] for m in config.modalities)
  return {"step": step, "val": val, "validated": validated}
