"""Input pipeline throughput in the paper's settings.

  python -m benchmarks.input_pipeline --size=256 --batch=8 --workers=2 --steps=50
  python -m benchmarks.input_pipeline --dims=3 --batch=2   # 3D: 256x256x8 patches, 2 + 2

2D (default): 256x256x3 slices (centre + neighbours), 8 + 8 per step.
With --train_step, the paper's 2D train step (width 16, 5 classes, 8 + 8 at 256x256) is timed
too on the same machine, and the ratio of the two rates is printed (the pipeline should supply
at least 3x what the step consumes).

Synthetic volumes (random ellipsoid blobs on noise) are written as cache entries to a temporary
directory, so the number measures sampling, augmentation and batching, not file decoding.
"""

import os
import tempfile
import time

import numpy as np
from absl import app, flags

from ukd import config as config_lib
from ukd.data import pipeline

_SIZE = flags.DEFINE_integer("size", 256, "In-plane size of the volumes (H = W).")
_SLICES = flags.DEFINE_integer("slices", 40, "Slices per volume.")
_VOLUMES = flags.DEFINE_integer("volumes", 4, "Volumes per modality.")
_BATCH = flags.DEFINE_integer("batch", 8, "Batch size per modality.")
_WORKERS = flags.DEFINE_integer("workers", 2, "grain worker processes (0 = in-process).")
_STEPS = flags.DEFINE_integer("steps", 50, "Timed steps after warm-up.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed steps first (worker start-up).")
_FG = flags.DEFINE_float("fg_fraction", 0.0, "Foreground oversampling probability.")
_DIMS = flags.DEFINE_integer("dims", 2, "2: slices with neighbours; 3: patches (size, size, 8).")
_AUGMENT = flags.DEFINE_bool("augment", False, "Flips, rotation, scaling and intensity jitter.")
_TRAIN_STEP = flags.DEFINE_bool("train_step", False, "Also time the paper 2D train step.")


def _blob_volume(rng, size: int, slices: int):
  """Noise with a few labelled ellipsoids: enough structure for foreground sampling."""
  grid = np.stack(
    np.meshgrid(np.arange(size), np.arange(size), np.arange(slices), indexing="ij"), -1
  ).astype(np.float32)
  label = np.zeros((size, size, slices), np.uint8)
  for cls in range(1, 5):
    centre = rng.uniform([0.2 * size, 0.2 * size, 0], [0.8 * size, 0.8 * size, slices])
    radii = rng.uniform([0.05 * size, 0.05 * size, 2], [0.15 * size, 0.15 * size, slices / 3])
    label[(((grid - centre) / radii) ** 2).sum(-1) <= 1] = cls
  image = rng.normal(size=label.shape).astype(np.float32) + label
  return image, label


def _write_sources(directory: str) -> dict:
  """Cache-style entries: Fortran-ordered .npy files, as preprocess writes them."""
  rng = np.random.default_rng(0)
  sources = {}
  for modality in ("ct", "mr"):
    sources[modality] = []
    for i in range(_VOLUMES.value):
      image, label = _blob_volume(rng, _SIZE.value, _SLICES.value)
      paths = {k: os.path.join(directory, f"{modality}_{i}_{k}.npy") for k in ("image", "label")}
      np.save(paths["image"], np.asfortranarray(image))
      np.save(paths["label"], np.asfortranarray(label))
      sources[modality].append(dict(**paths, geometry={}, id=f"{modality}_{i}", modality=modality))
  return sources


def main(argv):
  del argv
  config = config_lib.default()
  config.batch_size = _BATCH.value
  config.model.name = {2: "dilated2d", 3: "unet3d"}[_DIMS.value]
  config.data.update(
    dict(patch=(_SIZE.value, _SIZE.value, 8), fg_fraction=_FG.value, workers=_WORKERS.value)
  )
  config.data.size = (_SIZE.value, _SIZE.value)
  config.data.prefetch = 2
  if _AUGMENT.value:
    config.data.augment.update(dict(flip=True, rotate=15.0, scale=0.1, intensity=0.1))
  with tempfile.TemporaryDirectory() as directory:
    sources = _write_sources(directory)
    spec = pipeline.Spec.from_config(config)
    it = pipeline.make_train_iterator(sources, spec, list(sources), seed=0)
    try:
      for _ in range(_WARMUP.value):
        next(it)
      start = time.perf_counter()
      for _ in range(_STEPS.value):
        batch = next(it)
      elapsed = time.perf_counter() - start
      shapes = {m: tuple(batch[m]["image"].shape) for m in batch}
      del batch  # release grain's shared memory before the iterator closes
    finally:
      it.close()
  samples = _STEPS.value * _BATCH.value * len(shapes)
  rate = _STEPS.value / elapsed
  print(
    f"dims={_DIMS.value} workers={_WORKERS.value} augment={_AUGMENT.value} "
    f"image shapes {shapes}: {rate:.1f} batches/s ({samples / elapsed:.0f} samples/s)"
  )
  if _TRAIN_STEP.value:
    steps_per_s = _train_step_rate()
    print(
      f"paper 2D train step: {steps_per_s:.3f} steps/s; pipeline / step = {rate / steps_per_s:.0f}x"
    )


def _train_step_rate(repeats: int = 3) -> float:
  """Steps per second of the paper's 2D train step on random data, after compilation."""
  import jax

  from ukd import models
  from ukd.runtime import mesh as mesh_lib
  from ukd.train import state as state_lib
  from ukd.train import steps

  config = config_lib.default()  # the paper's 2D setting: width 16, 256x256, 8 + 8
  config.batch_size = _BATCH.value
  model = models.build(config.model, config.modalities)
  mesh = mesh_lib.make_mesh()
  state = state_lib.create(config, model, tuple(config.data.size), jax.random.key(0), mesh)
  step = steps.make_train_step(model, config, mesh)
  rng = np.random.default_rng(0)
  batch = {
    m: {
      "image": rng.normal(size=(_BATCH.value, *config.data.size, 3)).astype(np.float32),
      "label": rng.integers(0, 5, (_BATCH.value, *config.data.size)).astype(np.int32),
    }
    for m in config.modalities
  }
  batch = mesh_lib.to_global_batch(batch, mesh)
  state, _ = step(state, batch)  # compile
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(repeats):
    state, _ = step(state, batch)
  jax.block_until_ready(state)
  return repeats / (time.perf_counter() - start)


if __name__ == "__main__":
  app.run(main)
