"""train_and_evaluate(config, workdir): the whole training run, in clear sections.

Running the same command again in the same work dir resumes from the latest
checkpoint: parameters, optimizer, per-modality statistics, RNG, step and the
data iterators' positions, so a resumed run's losses equal an uninterrupted one's.
"""

import dataclasses
import os

import jax
import ml_collections as mc
import numpy as np

from ukd import checkpoints, evaluate, infer, models, steps, writers
from ukd import config as config_lib
from ukd import state as state_lib
from ukd.data import adapters, pipeline, preprocess, splits, synthetic
from ukd.errors import ConfigError, TrainingError


@dataclasses.dataclass
class Data:
  """What the run needs from the dataset: classes, cases by split, cached training volumes."""

  adapter: adapters.Adapter
  class_names: tuple[str, ...]
  cases: dict  # {modality: {split: [Case]}}
  train_sources: dict  # {modality: [cache entries]}


def prepare_data(config, workdir) -> Data:
  """Dataset root -> cases -> splits -> preprocessed, cached training volumes."""
  if config.data.get("synthetic", {}).get("enabled"):
    root = config.data.root
    if root in (config_lib.REQUIRED, ""):
      root = os.path.join(workdir, "phantoms")
    synthetic.ensure(root, config.data.synthetic)
    config.data.root = root
  if config.data.root in (config_lib.REQUIRED, ""):
    raise ConfigError("config.data.root is not set: pass --config.data.root=/path/to/dataset")
  adapter = adapters.get_adapter(config.data.dataset, **config.data.options.to_dict())
  modalities = tuple(config.modalities)
  cases = splits.cases_by_split(
    adapter,
    config.data.root,
    modalities,
    workdir,
    seed=config.seed,
    fractions=tuple(config.data.split_fractions),
    split_file=config.data.split_file or None,
  )
  for m in modalities:
    cases[m]["train"] = training_subset(cases[m]["train"], config.data.train_fraction)
  cache_dir = config.data.cache_dir or os.path.join(workdir, "cache")
  sources = {
    m: preprocess.cache_cases(adapter, cases[m]["train"], config.data, cache_dir)
    for m in modalities
  }
  return Data(adapter, tuple(adapter.classes), cases, sources)


def training_subset(cases, fraction: float):
  """The first round(fraction * n) training cases (at least one): the split is already a
  seeded shuffle, so this is a random subset, and a smaller budget is nested in a larger."""
  return cases[: max(1, round(fraction * len(cases)))]


def validate(segmenter, data: Data, split="val"):
  """Whole-volume validation: mean Dice per modality and class, and one overlay per modality."""
  scalars, pictures = {}, {}
  for m in segmenter.config.modalities:
    cases = data.cases[m][split]
    if not cases:
      continue
    result = evaluate.evaluate_cases(segmenter, data.adapter, cases)
    for name, values in result["summary"][m].items():
      scalars[f"val_dice/{m}/{name}"] = values["dice"]["mean"]
    pictures[m] = result["overlays"][f"{m}/{cases[0].id}"]
  means = [v for k, v in scalars.items() if k.endswith("/mean")]
  scalars["val_dice/mean"] = float(np.mean(means)) if means else float("nan")
  return scalars, pictures


def _check_finite(metrics, step):
  bad = steps.nonfinite_terms(metrics)
  if bad:
    terms = ", ".join(f"{k}={float(metrics[k])}" for k in bad)
    raise TrainingError(
      f"non-finite loss at step {step}: {terms}; the work dir keeps the last good checkpoint"
    )


def train_and_evaluate(config: mc.ConfigDict, workdir: str) -> dict:
  config = config_lib.validate(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0

  # ---- Data: cases, splits, preprocessed cache ---------------------------------------------
  data = prepare_data(config, workdir)
  config.model.num_classes = len(data.class_names)
  config.data.class_names = data.class_names

  # ---- Mesh, model, state --------------------------------------------------------------------
  mesh = state_lib.make_mesh()
  state_lib.check_batch_size(config, mesh)
  model = models.build(config.model, config.modalities)
  spatial = models.input_spatial(config)
  state = state_lib.create(config, model, spatial, jax.random.key(config.seed), mesh)
  train_iter = pipeline.make_train_iterator(
    data.train_sources,
    config,
    seed=config.seed,
    shard_index=jax.process_index(),
    shard_count=jax.process_count(),
  )

  # ---- Checkpoint: resume when the work dir has one ------------------------------------------
  mgr = checkpoints.manager(workdir, keep_best=config.keep_best)
  start = mgr.latest_step() or 0
  if start:
    checkpoints.check_resumable(mgr, start, config)
    state = checkpoints.restore_train(mgr, start, jax.eval_shape(lambda: state), train_iter)
    if is_main:
      print(f"resumed from step {start} in {workdir}", flush=True)

  writer = writers.MetricWriter(workdir, start_step=start, enabled=is_main)
  writer.write_config(config)
  train_step = steps.make_train_step(model, config, mesh)
  progress = writers.Progress(config.total_steps, start, enabled=is_main)

  # ---- Loop ----------------------------------------------------------------------------------
  step, val = start, {}
  try:
    while step < config.total_steps:
      batch = state_lib.to_global_batch(next(train_iter), mesh)
      state, metrics = train_step(state, batch)
      step += 1
      metrics = jax.device_get(metrics)
      _check_finite(metrics, step)
      progress.update(step, metrics)
      if step % config.log_every == 0 or step == config.total_steps:
        writer.scalars(step, {f"train/{k}": v for k, v in metrics.items()})

      last = step == config.total_steps
      val = {}
      if (config.eval_every and step % config.eval_every == 0) or last:
        segmenter = infer.Segmenter(
          config, {"params": state.params, "batch_stats": state.batch_stats}, mesh=mesh
        )
        val, pictures = validate(segmenter, data)
        writer.scalars(step, val)
        writer.images(step, pictures)
        progress.note(step, f"validation mean Dice {val['val_dice/mean']:.3f}")
      if step % config.checkpoint_every == 0 or last:
        checkpoints.save(mgr, step, state, config, train_iter, val_dice=val.get("val_dice/mean"))
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
  summary = evaluate.evaluate(workdir, overlays=config.overlays)
  return {"step": step, "val": val, "test": summary}
