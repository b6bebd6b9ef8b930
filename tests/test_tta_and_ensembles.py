"""Mirroring test-time augmentation, ensembles of work dirs, entropy maps, and predicting a
folder in three stages with --continue."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from helpers import random_variables, tiny_config

from ukd import config as config_lib
from ukd import config_fields
from ukd.data import pipeline
from ukd.errors import ConfigError
from ukd.runtime import checkpoints
from ukd.serve import predict
from ukd.serve import segmenter as infer

RECORD = {
  "splits": {"ct": {"train": ["a"], "val": ["b"], "test": ["c"]}},
  "classes": ["background", "MYO", "AA"],
  "label_codes": {"ct": [0, 205, 820], "mr": [0, 63, 126]},
}


def _config(name="dilated2d", flip=(0, 1)):
  config = tiny_config(name)
  config.model.init = "lecun"  # class scores far enough apart for stable argmaxes
  config.data.size = (16, 16)
  config.data.patch = (8, 8, 8)
  config.data.augment.flip = flip
  config.infer.batch_size = 4
  return config_lib.check(config)


def _mirror(x, axes):
  return np.flip(x, [a + 1 for a in axes]) if axes else x


@pytest.mark.parametrize(
  "name,flip,channels,count",
  [("dilated2d", (0, 1), 3, 4), ("dilated2d", (0, 1, 2), 3, 8), ("unet3d", (0, 1, 2), 1, 8)],
)
def test_tta_is_the_mean_of_the_mirrored_predictions_mirrored_back(name, flip, channels, count):
  """A 2D sample's axis 2 is its neighbour slices: mirrored in the input, not in the output."""
  config = _config(name, flip)
  variables = random_variables(config)
  plain = infer.Segmenter(config, variables, tta=False)
  mirrored = infer.Segmenter(config, variables, tta=True)
  assert len(mirrored.flips) == count and mirrored.flips[0] == ()
  window = (16, 16) if name == "dilated2d" else (8, 8, 8)
  batch = np.random.default_rng(0).normal(size=(4, *window, channels)).astype(np.float32)
  dims = len(window)
  expected = np.mean(
    [
      _mirror(
        np.asarray(plain.batch_function("ct")(_mirror(batch, axes).copy())),
        [a for a in axes if a < dims],
      )
      for axes in mirrored.flips
    ],
    axis=0,
  )
  got = np.asarray(mirrored.batch_function("ct")(batch))
  np.testing.assert_allclose(got, expected, atol=1e-6)
  assert np.abs(got - np.asarray(plain.batch_function("ct")(batch))).max() > 1e-4  # it did mirror


def test_tta_is_refused_for_a_network_trained_without_flips():
  config = _config(flip=())
  with pytest.raises(ConfigError, match=r"data.augment.flip"):
    infer.Segmenter(config, random_variables(config), tta=True)


def test_the_flip_field_takes_axes_and_old_switches():
  assert config_fields.flip_axes(True) == (0, 1)
  assert config_fields.flip_axes(False) == ()
  assert config_fields.flip_axes([2, 0]) == (0, 2)
  with pytest.raises(ConfigError, match=r"config.data.augment.flip=\(0, 3\)"):
    config_fields.flip_axes((0, 3))


def test_a_2d_sample_flipped_along_the_slices_reverses_its_neighbours():
  image = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)
  label = np.array([[0, 1], [2, 0]])

  class Always:
    def random(self):
      return 0.0

  aug = dict(flip=(2,), rotate=0.0, scale=0.0, intensity=0.0)
  got_image, got_label = pipeline.augment(image, label, Always(), aug)
  np.testing.assert_array_equal(got_image, image[:, :, ::-1])
  np.testing.assert_array_equal(got_label, label)


def test_an_ensemble_averages_its_members_probabilities():
  config = _config()
  members = [random_variables(config, seed) for seed in (0, 1)]
  batch = np.random.default_rng(1).normal(size=(4, 16, 16, 3)).astype(np.float32)
  singles = [np.asarray(infer.Segmenter(config, v).batch_function("ct")(batch)) for v in members]
  both = np.asarray(infer.Segmenter(config, members).batch_function("ct")(batch))
  np.testing.assert_allclose(both, np.mean(singles, axis=0), atol=1e-6)


def _workdir(path, config, variables, step=3):
  mgr = checkpoints.manager(str(path))
  checkpoints.save(mgr, step, variables, config, dataset=RECORD)
  mgr.wait_until_finished()
  mgr.close()
  return str(path)


def test_load_of_several_work_dirs_is_an_ensemble_and_members_must_agree(tmp_path):
  config = _config()
  a = _workdir(tmp_path / "a", config, random_variables(config, 0))
  b = _workdir(tmp_path / "b", config, random_variables(config, 1), step=5)
  ensemble = infer.load(f"{a},{b}")
  assert ensemble.step == [3, 5] and len(ensemble.variables) == 2
  other = config_lib.check(config)
  other.data.size = (32, 32)
  c = _workdir(tmp_path / "c", other, random_variables(other, 2))
  with pytest.raises(ConfigError, match=r"differ in config.data.size"):
    infer.load([a, c])


def _ct(path, shape=(16, 16, 5), seed=0):
  rng = np.random.default_rng(seed)
  data = (300 * rng.normal(size=shape)).astype(np.float32)
  nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 3.0, 1.0])), str(path))
  return str(path)


def test_entropy_maps_lie_between_zero_and_ln_c_and_continue_skips_complete_cases(tmp_path):
  config = _config()
  seg = infer.Segmenter(config, random_variables(config), tta=True)
  inputs = tmp_path / "in"
  inputs.mkdir()
  for i in range(3):
    _ct(inputs / f"case{i}.nii.gz", seed=i)
  out = tmp_path / "out"
  written = predict.predict_paths(
    seg, str(inputs), str(out), "ct", uncertainty=True, show_progress=False
  )
  assert len(written) == 9  # labels, entropy, sidecar per case
  entropy = np.asarray(nib.load(str(out / "case0_entropy.nii.gz")).dataobj)
  assert entropy.shape == (16, 16, 5)
  assert entropy.min() >= 0 and entropy.max() <= np.log(3) + 1e-6 and entropy.max() > 0.01

  # A case interrupted before its sidecar is redone; complete ones are skipped; a killed
  # run's temporary file is removed, a running writer's is not.
  os.remove(out / "case1.json")
  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
  )
  stale = out / f".tmp-{int(dead.stdout)}-0123abcd-case1.json"
  live = out / f".tmp-{os.getpid()}-0123abcd-case2.json"
  stale.write_text("{")
  live.write_text("{")
  before = os.path.getmtime(out / "case0.nii.gz")
  with pytest.raises(Exception, match="already exists"):
    predict.predict_paths(seg, str(inputs), str(out), "ct", uncertainty=True, show_progress=False)
  again = predict.predict_paths(
    seg, str(inputs), str(out), "ct", uncertainty=True, show_progress=False, resume=True
  )
  assert sorted(os.path.basename(p) for p in again) == [
    "case1.json",
    "case1.nii.gz",
    "case1_entropy.nii.gz",
  ]
  assert os.path.getmtime(out / "case0.nii.gz") == before
  assert not stale.exists() and live.exists()
  with open(out / "case1.json") as f:
    assert json.load(f)["seconds"] > 0


def test_three_stage_prediction_writes_what_one_case_at_a_time_writes(tmp_path):
  config = _config()
  seg = infer.Segmenter(config, random_variables(config))
  inputs = tmp_path / "in"
  inputs.mkdir()
  paths = [_ct(inputs / f"c{i}.nii.gz", shape=(16, 16, 3 + i), seed=i) for i in range(5)]
  predict.predict_paths(seg, str(inputs), str(tmp_path / "out"), "ct", show_progress=False)
  for i, path in enumerate(paths):
    alone = tmp_path / f"alone{i}.nii.gz"
    predict.predict_file(seg, path, alone, "ct")
    a = np.asarray(nib.load(str(alone)).dataobj)
    b = np.asarray(nib.load(str(tmp_path / "out" / f"c{i}.nii.gz")).dataobj)
    assert a.shape == (16, 16, 3 + i) and np.array_equal(a, b)
