"""Predicting a CT from a DICOM series against predicting the same scan as NIfTI.

  python -m benchmarks.dicom_predict                  # 512 x 512 x 200 CT, the demo network
  python -m benchmarks.dicom_predict --slices=40      # a quick look

One CT-like volume (whole HU values, 0.7 x 0.7 x 1.5 mm) is written as an int16 `.nii.gz`
and as a DICOM series of one file per slice, each stored exactly. Then `ukd.serve.predict.predict_paths`
predicts each with the demo network (configs/demo.py; random weights: the time does not
depend on them), in a subprocess of its own per input and measurement, so neither inherits
the other's memory or file cache state:
  * time: the network compiled first on a tiny volume, then the input predicted `--repeats`
    times, the fastest counted; also the read alone (NIfTI `read_image`, DICOM
    `find_series` + `read_series`), and the process's peak resident memory (ru_maxrss);
  * host memory: the peak of Python's allocations (numpy arrays included) during one
    prediction, with tracemalloc (which slows allocation, hence its own process).
Targets: DICOM within 1.3x the NIfTI time and 2x its peak memory.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np
from absl import app, flags

_SLICES = flags.DEFINE_integer("slices", 200, "Slices of the CT (512 x 512 in-plane).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed predictions per input; the fastest counts.")
_DIR = flags.DEFINE_string("dir", None, "Where the scan and outputs go (default: a temp dir).")
_CHILD = flags.DEFINE_enum("child", None, ["time", "memory"], "Internal: one measurement.")
_INPUT = flags.DEFINE_enum("input", None, ["nifti", "dicom"], "Internal: which input.")

SPACING = (0.7, 0.7, 1.5)


def _write_scan(folder: str, slices: int) -> None:
  """A body-like ellipse of soft tissue with noise in air, as NIfTI and as DICOM."""
  import nibabel as nib

  from ukd.data.synthetic import dicom_write

  rng = np.random.default_rng(0)
  x, y = np.meshgrid(np.linspace(-1, 1, 512), np.linspace(-1, 1, 512), indexing="ij")
  body = (x / 0.8) ** 2 + (y / 0.6) ** 2 < 1
  scan = np.empty((512, 512, slices), np.int16)
  for k in range(slices):
    tissue = 40 + 300 * np.cos(6 * x + k / 20) * np.sin(5 * y) + rng.normal(0, 20, x.shape)
    scan[:, :, k] = np.where(body, tissue, -1000 + rng.normal(0, 5, x.shape)).round()
  affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
  nib.save(nib.Nifti1Image(scan, affine), os.path.join(folder, "ct.nii.gz"))
  dicom_write.write_series(scan, os.path.join(folder, "ct"), affine=affine, modality="CT")


def _segmenter():
  import jax

  from configs import demo
  from ukd import config as config_lib
  from ukd import models
  from ukd.data.io import volumes
  from ukd.serve import segmenter as infer

  config = config_lib.check(demo.get_config())
  model = models.build(config.model, config.modalities)
  variables = models.init_variables(
    model, config.model, models.input_spatial(config), jax.random.key(0)
  )
  seg = infer.Segmenter(config, variables)
  seg.predict_volume(volumes.from_array(np.zeros((64, 64, 2), np.float32)), "ct")  # compile
  return seg


def _child(folder: str, which: str, measure: str) -> dict:
  from ukd.data.io import dicom_series, volumes
  from ukd.serve import predict

  seg = _segmenter()
  source = os.path.join(folder, "ct.nii.gz" if which == "nifti" else "ct")
  modality = "ct" if which == "nifti" else None  # DICOM: from the Modality tag

  def run():
    predict.predict_paths(
      seg,
      source,
      os.path.join(folder, f"out_{which}"),
      modality,
      overwrite=True,
      show_progress=False,
    )

  if measure == "memory":
    tracemalloc.start()
    run()
    return {"python_peak_mb": tracemalloc.get_traced_memory()[1] / 2**20}
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  start = time.perf_counter()
  if which == "nifti":
    volumes.read_image(source)
  else:
    dicom_series.read_series(dicom_series.find_series(source)[0])
  read = time.perf_counter() - start
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
  return {"seconds": min(times), "all_seconds": times, "read_seconds": read, "max_rss_mb": rss}


def _measure(folder: str, which: str, measure: str) -> dict:
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "benchmarks.dicom_predict",
      f"--child={measure}",
      f"--input={which}",
      f"--dir={folder}",
      f"--repeats={_REPEATS.value}",
    ],
    capture_output=True,
    text=True,
    check=False,
  )
  if out.returncode != 0:
    raise SystemExit(f"{which} {measure} run failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if _CHILD.value:
    print(json.dumps(_child(_DIR.value, _INPUT.value, _CHILD.value)))
    return
  folder = _DIR.value or tempfile.mkdtemp(prefix="ukd-dicom-bench-")
  os.makedirs(folder, exist_ok=True)
  start = time.perf_counter()
  _write_scan(folder, _SLICES.value)
  print(
    f"scan 512 x 512 x {_SLICES.value} written to {folder} in {time.perf_counter() - start:.0f} s"
  )
  results = {w: _measure(folder, w, "time") for w in ("nifti", "dicom")}
  for which in results:
    results[which] |= _measure(folder, which, "memory")
  print(f"cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} (1 min)")
  print(
    "| input | predict s (fastest) | all runs s | read alone s | peak RSS MB | Python peak MB |"
  )
  print("| --- | ---: | --- | ---: | ---: | ---: |")
  for which, r in results.items():
    runs = ", ".join(f"{t:.1f}" for t in r["all_seconds"])
    print(
      f"| {which} | {r['seconds']:.1f} | {runs} | {r['read_seconds']:.2f} | "
      f"{r['max_rss_mb']:.0f} | {r['python_peak_mb']:.0f} |"
    )
  nifti, dicom = results["nifti"], results["dicom"]
  print(
    f"DICOM / NIfTI: time {dicom['seconds'] / nifti['seconds']:.2f}x (target <= 1.3x), "
    f"peak RSS {dicom['max_rss_mb'] / nifti['max_rss_mb']:.2f}x, "
    f"Python peak {dicom['python_peak_mb'] / nifti['python_peak_mb']:.2f}x (target <= 2x)"
  )


if __name__ == "__main__":
  app.run(main)
