"""Inference time of the paper's 2D network: one volume, a folder end to end, the backends.

  python -m benchmarks.inference                          # width 16, 256x256x150, batch 32
  python -m benchmarks.inference --width=4 --slices=40    # a quick look on a small CPU
  python -m benchmarks.inference --mode=pipeline --workdir=/tmp/ukd_demo
  python -m benchmarks.inference --mode=backends --batch=8
  python -m benchmarks.inference --pad=reference --conv_grads=cpu_matmul --slices=40
      # configs/mmwhs.py's padding and convolutions

volume: the network (5 classes, random weights: the time does not depend on them) predicts a
random CT-like volume twice through `Segmenter.predict`.  The first time includes compilation;
the second, a volume of the same size, shows the steady state, in which nothing is recompiled.

pipeline: a trained work dir's test volumes predicted end to end (`ukd.serve.predict.predict_paths`:
read, prepare, network, restore, write, three stages on threads) against the network's
forward passes alone on the same prepared volumes; the ratio is what the host costs on top.

backends: ms per slice of the width-`--width` network at `--size` squared, `--batch` slices a
call, on JAX, and exported (`ukd.serve.export`) on onnxruntime and OpenVINO (float32; bf16 where the
CPU has bf16 units and OpenVINO is installed).
"""

import os
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from ukd import cli, models
from ukd import config as config_lib
from ukd.serve import segmenter as infer

_WIDTH = flags.DEFINE_integer("width", 16, "Base width of the network (16 in the paper).")
_SIZE = flags.DEFINE_integer("size", 256, "In-plane size of the volume and the network (H = W).")
_SLICES = flags.DEFINE_integer("slices", 150, "Slices per volume.")
_BATCH = flags.DEFINE_integer("batch", 32, "Slices per device call (infer.batch_size).")
_CLASSES = flags.DEFINE_integer("classes", 5, "Classes including background (5 for MM-WHS).")
_MODE = flags.DEFINE_enum("mode", "volume", ["volume", "pipeline", "backends"], "What to time.")
_WORKDIR = flags.DEFINE_string("workdir", None, "pipeline: a trained work dir (e.g. the demo's).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "backends: timed calls per backend (best is kept).")
_PAD = flags.DEFINE_enum(
  "pad", "zeros", ["zeros", "reference"], "config.model.pad: configs/mmwhs.py's is 'reference'."
)
_CONV_GRADS = flags.DEFINE_enum(
  "conv_grads",
  "xla",
  ["xla", "cpu_matmul"],
  "config.model.conv_grads: configs/mmwhs.py's is 'cpu_matmul' (its wide convolution's forward "
  "pass is an im2col matmul on a CPU).",
)


def _config():
  config = config_lib.default()
  config.model.width = _WIDTH.value
  config.model.num_classes = _CLASSES.value
  config.data.size = (_SIZE.value, _SIZE.value)
  config.infer.batch_size = _BATCH.value
  config.model.pad = _PAD.value
  config.model.conv_grads = _CONV_GRADS.value
  return config


def _timed(segmenter, volume) -> float:
  start = time.perf_counter()
  segmenter.predict(volume, "ct")
  return time.perf_counter() - start


def _pipeline(workdir: str) -> None:
  """End-to-end prediction of the test split against the forward passes alone."""
  from ukd.serve import predict, windows

  seg = infer.load(workdir)
  adapter, cases = infer.split_cases(seg, workdir, "test")
  for modality in seg.config.modalities:  # compile every modality's network first
    chosen = [c for c in cases if c.modality == modality]
    seg.predict_volume(adapter.read(chosen[0])[0], modality)
  prepared = [
    (c.modality, windows.prepare(adapter.read(c)[0], c.modality, seg.settings)) for c in cases
  ]
  start = time.perf_counter()
  for modality, p in prepared:
    windows.network_probabilities(p.image, seg.settings, seg.batch_function(modality))
  network = time.perf_counter() - start
  total = 0.0
  with tempfile.TemporaryDirectory() as out:
    for modality in seg.config.modalities:
      folder = os.path.join(out, f"in_{modality}")
      os.makedirs(folder)
      for c in cases:
        if c.modality == modality:
          os.symlink(os.path.abspath(c.image), os.path.join(folder, os.path.basename(c.image)))
      start = time.perf_counter()
      predict.predict_paths(seg, folder, os.path.join(out, modality), modality, show_progress=False)
      total += time.perf_counter() - start
  print(f"{len(cases)} test volumes of {workdir}")
  print(f"network forward passes alone: {network:.2f} s")
  print(f"end to end (read .. write):   {total:.2f} s")
  print(f"ratio: {total / network:.2f}")


def _backends() -> None:
  """ms per slice on JAX and on the exported model's runtimes."""
  from ukd.serve import export
  from ukd.serve import onnx_graph as onnx_export
  from ukd.serve import runners as exported

  config = _config()
  config.infer.batch_size = _BATCH.value
  model = models.build(config.model, config.modalities)
  variables = models.init_variables(model, config.model, tuple(config.data.size), jax.random.key(0))
  seg = infer.Segmenter(config_lib.check(config), variables)
  batch = np.random.default_rng(0).normal(size=(_BATCH.value, _SIZE.value, _SIZE.value, 3))
  batch = batch.astype(np.float32)
  runs = {"jax float32": seg.batch_function("ct")}
  with tempfile.TemporaryDirectory() as folder:
    fn, example = export.batch_function(seg, "ct")
    graph = onnx_export.to_onnx(fn, example)
    with open(os.path.join(folder, "ct.onnx"), "wb") as f:
      f.write(graph.SerializeToString())
    record = export.sidecar(seg)
    for backend, precision in (
      ("onnxruntime", "float32"),
      ("openvino", "float32"),
      ("openvino", "bf16"),
    ):
      if precision == "bf16" and not exported.cpu_has_bf16():
        print("openvino bf16: not run (this CPU has no bf16 matrix units)")
        continue
      try:
        loaded = exported.ExportedModel(folder, record, backend, precision)
        runs[f"{backend} {precision}"] = loaded.batch_function("ct")
      except Exception as e:  # an optional runtime that is not installed
        print(f"{backend} {precision}: not run ({e})")
    print(
      f"2D network width {_WIDTH.value}, pad {_PAD.value}, {_SIZE.value}x{_SIZE.value}, "
      f"batch {_BATCH.value}"
    )
    for name, run in runs.items():
      np.asarray(run(batch))  # compiles
      best = min(_call_seconds(run, batch) for _ in range(_REPEATS.value))
      print(f"{name:22s} {1000 * best / _BATCH.value:8.1f} ms per slice")


def _call_seconds(run, batch) -> float:
  start = time.perf_counter()
  np.asarray(run(batch))
  return time.perf_counter() - start


def main(argv):
  del argv
  if _MODE.value == "pipeline":
    return _pipeline(_WORKDIR.value)
  if _MODE.value == "backends":
    return _backends()
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
    f"2D network width {_WIDTH.value}, pad {_PAD.value}, {_CLASSES.value} classes, "
    f"volume {shape}, batch {segmenter.batch_size}"
  )
  print(f"first volume (with compilation): {first:.1f} s")
  print(f"second volume (compiled):        {second:.1f} s ({_SLICES.value / second:.1f} slices/s)")


if __name__ == "__main__":
  cli.set_xla_defaults()  # as every ukd command line: what its users run
  app.run(main)
