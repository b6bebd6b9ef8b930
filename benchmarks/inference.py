"""Whole-volume inference time of the paper's 2D network.

  python -m benchmarks.inference                          # width 16, 256x256x150, batch 32
  python -m benchmarks.inference --width=4 --slices=40    # a quick look on a small CPU

The network (5 classes, random weights: the time does not depend on them) predicts a random
CT-like volume twice through `Segmenter.predict`.  The first time includes compilation; the
second, a volume of the same size, shows the steady state, in which nothing is recompiled.
"""

import time

import jax
import numpy as np
from absl import app, flags

from ukd import config as config_lib
from ukd import infer, models

_WIDTH = flags.DEFINE_integer("width", 16, "Base width of the network (16 in the paper).")
_SIZE = flags.DEFINE_integer("size", 256, "In-plane size of the volume and the network (H = W).")
_SLICES = flags.DEFINE_integer("slices", 150, "Slices per volume.")
_BATCH = flags.DEFINE_integer("batch", 32, "Slices per device call (infer.batch_size).")
_CLASSES = flags.DEFINE_integer("classes", 5, "Classes including background (5 for MM-WHS).")


def _config():
  config = config_lib.default()
  config.model.width = _WIDTH.value
  config.model.num_classes = _CLASSES.value
  config.data.size = (_SIZE.value, _SIZE.value)
  config.infer.batch_size = _BATCH.value
  return config


def _timed(segmenter, volume) -> float:
  start = time.perf_counter()
  segmenter.predict(volume, "ct")
  return time.perf_counter() - start


def main(argv):
  del argv
  config = _config()
  model = models.build(config.model, config.modalities)
  variables = models.init_variables(model, config.model, tuple(config.data.size), jax.random.key(0))
  segmenter = infer.Segmenter(config, variables)
  rng = np.random.default_rng(0)
  shape = (_SIZE.value, _SIZE.value, _SLICES.value)
  volumes = [rng.normal(0.0, 400.0, shape).astype(np.float32) for _ in range(2)]
  first, second = (_timed(segmenter, v) for v in volumes)
  print(f"devices: {len(jax.devices())} x {jax.devices()[0].device_kind}")
  print(
    f"2D network width {_WIDTH.value}, {_CLASSES.value} classes, volume {shape}, "
    f"batch {segmenter.batch_size}"
  )
  print(f"first volume (with compilation): {first:.1f} s")
  print(f"second volume (compiled):        {second:.1f} s ({_SLICES.value / second:.1f} slices/s)")


if __name__ == "__main__":
  app.run(main)
