"""--mode=export: StableHLO and ONNX per modality with a JSON sidecar, run by `ukd.exported`
without the training stack, on JAX and onnxruntime, with the labels of the live network."""

import gc
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from helpers import ROOT, random_variables, run_module, tiny_config

from ukd import config as config_lib
from ukd.errors import ConfigError
from ukd.runtime import checkpoints
from ukd.serve import export, predict
from ukd.serve import runners as exported
from ukd.serve import segmenter as infer

RECORD = {
  "splits": {"ct": {"train": ["a"], "val": ["b"], "test": ["c"]}},
  "classes": ["background", "MYO", "AA"],
  "label_codes": {"ct": [0, 205, 820], "mr": [0, 63, 126]},
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  config = tiny_config()
  config.data.size = (16, 16)
  config.data.augment.flip = (0, 1)
  config.infer.tta = True  # the export carries the mirrors inside its graph
  config.infer.batch_size = 4
  config = config_lib.check(config)
  path = str(tmp_path_factory.mktemp("run"))
  mgr = checkpoints.manager(path)
  checkpoints.save(mgr, 7, random_variables(config), config, dataset=RECORD)
  mgr.wait_until_finished()
  mgr.close()
  return path


@pytest.fixture(scope="module")
def export_dir(workdir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("export") / "model")
  run_module("ukd.main", "--mode=export", f"--workdir={workdir}", f"--output={out}")
  return out


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
  rng = np.random.default_rng(0)
  grid = np.meshgrid(*(np.linspace(-1, 1, n) for n in (20, 18, 6)), indexing="ij")
  data = 400 * np.cos(3 * grid[0]) * np.sin(2 * grid[1] + 1) + rng.normal(0, 40, (20, 18, 6))
  path = str(tmp_path_factory.mktemp("scan") / "scan.nii.gz")
  nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([-0.9, 1.1, 2.5, 1.0])), path)
  return path


def _labels(path):
  return np.asarray(nib.load(path).dataobj)


def test_an_export_holds_both_graphs_per_modality_and_what_prediction_needs(export_dir):
  names = sorted(os.listdir(export_dir))
  assert names == ["ct.onnx", "ct.stablehlo", "model.json", "mr.onnx", "mr.stablehlo"]
  with open(os.path.join(export_dir, "model.json")) as f:
    record = json.load(f)
  assert record["step"] == 7 and record["dims"] == 2 and record["tta"] is True
  assert record["mirrors"] == [[], [0], [1], [0, 1]]
  assert record["classes"] == RECORD["classes"] and record["label_codes"] == RECORD["label_codes"]
  assert record["config"]["data"]["size"] == [16, 16]
  assert record["bf16_gate"]["passed"] is False and "not measured" in record["bf16_gate"]["reason"]


def test_a_second_export_into_the_same_folder_is_refused(workdir, export_dir):
  out = run_module(
    "ukd.main", "--mode=export", f"--workdir={workdir}", f"--output={export_dir}", check=False
  )
  assert out.returncode != 0 and "already holds an exported model" in out.stderr


# What an exported model's runner must not need: the training stack, the config and path
# libraries, the writers' and reports' libraries.  It runs on numpy, scipy, nibabel and the
# backend (jax, onnxruntime), through the public face `ukd.exported`.
_NOT_NEEDED = ("flax", "optax", "orbax", "grain", "ml_collections", "etils", "absl", "tensorboardX")
_NOT_NEEDED += ("matplotlib", "PIL", "rich")


def test_exported_model_runs_without_the_training_stack_and_predicts_the_live_labels(
  workdir, export_dir, scan, tmp_path
):
  live = str(tmp_path / "live.nii.gz")
  predict.predict_file(infer.load(workdir), scan, live, "ct")
  script = f"""
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in {_NOT_NEEDED!r}:
      raise ImportError(name + " is not installed here")
sys.meta_path.insert(0, Refuse())
from ukd import exported
for backend in ("jax", "onnxruntime"):
  exported.load({export_dir!r}, backend=backend).predict_file(
    {scan!r}, {str(tmp_path)!r} + f"/{{backend}}.nii.gz", "ct"
  )
"""
  out = subprocess.run(
    [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-3000:]
  expected = _labels(live)
  assert set(np.unique(expected)) > {0}  # the network predicts more than background
  for backend in ("jax", "onnxruntime"):
    got = _labels(str(tmp_path / f"{backend}.nii.gz"))
    assert got.shape == expected.shape and np.array_equal(got, expected), backend


def test_predict_with_onnxruntime_from_a_work_dir_exports_on_the_fly(workdir, scan, tmp_path):
  model = export.load_backend(workdir, backend="onnxruntime")
  live = infer.load(workdir)
  vol = predict.volumes.read_image(scan)
  a, pa = model.predict_volume(vol, "ct", probabilities=True)
  b, pb = live.predict_volume(vol, "ct", probabilities=True)
  np.testing.assert_allclose(pa, pb, atol=1e-5)
  assert np.array_equal(a, b)
  folder = model.path  # the temporary export goes with the model, not left in /tmp
  assert os.path.exists(os.path.join(folder, exported.SIDECAR))
  del model
  gc.collect()
  assert not os.path.exists(folder)


def test_bf16_needs_openvino_a_cpu_with_bf16_units_and_a_passed_gate(tmp_path, export_dir):
  with_units = tmp_path / "amx"
  with_units.write_text("flags\t\t: fpu sse2 avx2 amx_bf16 amx_tile\n")
  without = tmp_path / "plain"
  without.write_text("flags\t\t: fpu sse2 avx2\n")
  assert exported.cpu_has_bf16(str(with_units)) and not exported.cpu_has_bf16(str(without))
  with pytest.raises(ConfigError, match="openvino only"):
    exported.load(export_dir, backend="onnxruntime", precision="bf16")
  with pytest.raises(ConfigError, match="bf16"):
    exported.load(export_dir, backend="openvino", precision="bf16")  # no units, or no gate


def test_a_folder_that_is_not_an_export_is_a_one_line_error(tmp_path):
  with pytest.raises(Exception, match="not an exported ukd model"):
    exported.load(str(tmp_path))
