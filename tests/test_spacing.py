"""`data.spacing`: the setting, sliding windows over slices larger than `data.size`, and a
network trained in millimetres that predicts alike whatever the pixel size of its input."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from helpers import ROOT, tiny_config
from ml_collections import config_flags

from ukd import config as config_lib
from ukd import config_fields, models
from ukd.data import adapters, pipeline, preprocess
from ukd.data.io import volumes
from ukd.data.synthetic import generate as synthetic
from ukd.data.synthetic import phantoms
from ukd.errors import ConfigError
from ukd.runtime import mesh as mesh_lib
from ukd.serve import segmenter as infer
from ukd.serve import windows
from ukd.train import state as state_lib
from ukd.train import steps

# --- the setting ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "text, ct, mr",
  [
    ("", None, None),
    ("1.2", (1.2, 1.2), (1.2, 1.2)),
    ("0.8x1", (0.8, 1.0), (0.8, 1.0)),
    ("ct=0.8, mr=1.6x1.2", (0.8, 0.8), (1.6, 1.2)),
  ],
)
def test_spacing_is_one_value_a_pair_or_one_per_modality(text, ct, mr):
  config = config_lib.default()
  config.data.spacing = text
  config_lib.check(config)
  assert config_fields.spacing_for(text, "ct") == ct and config_fields.spacing_for(text, "mr") == mr


_USAGE = "must be '' (off), 'MM', 'ROWSxCOLS' or 'ct=MM,mr=ROWSxCOLS' with positive numbers (mm)"


@pytest.mark.parametrize(
  "text, message",
  [
    ("0", f"config.data.spacing='0' {_USAGE}"),
    ("1x-2", f"config.data.spacing='1x-2' {_USAGE}"),
    ("1x2x3", f"config.data.spacing='1x2x3' {_USAGE}"),
    ("one", f"config.data.spacing='one' {_USAGE}"),
    ("1,mr=2", f"config.data.spacing='1,mr=2' {_USAGE}"),
    ("ct=1", "config.data.spacing='ct=1' gives no spacing for modality 'mr'"),
    ("ct=1,mr=1,pet=2", "config.data.spacing='ct=1,mr=1,pet=2' names modality 'pet', not one of"),
  ],
)
def test_a_bad_spacing_is_a_one_line_config_error(text, message):
  config = config_lib.default()
  config.data.spacing = text
  with pytest.raises(ConfigError) as error:
    config_lib.check(config)
  assert str(error.value).startswith(message) and "\n" not in str(error.value)


# config_flags loads the config file with the deprecated `load_module`.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_spacing_can_be_set_on_the_command_line():
  argv = ["ukd", f"--config={ROOT}/configs/demo.py", "--config.data.spacing=ct=0.8,mr=1.2x1"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  assert values.config.data.spacing == "ct=0.8,mr=1.2x1"
  config_lib.check(values.config)


# --- sliding windows over slices larger than data.size -----------------------------------------


def _segmenter(name, record=None, **data):
  """A Segmenter whose network is replaced by `pointwise`: one function of each voxel's own
  input, so a window's output at a voxel does not depend on where the window lies."""
  config = tiny_config(name)
  config.data.update(data)
  config.infer.batch_size = 4
  seg = infer.Segmenter(config, {"params": {}, "batch_stats": {}})

  def probabilities(variables, batch, modality):
    if record is not None:
      record.append(batch.shape)
    return pointwise(batch)

  seg._probabilities = probabilities
  return seg


def pointwise(x):
  """Class scores from the channels (2D: the slice and its neighbours) of every voxel."""
  if x.shape[-1] == 3:
    scores = [x[..., 1], x[..., 0] - x[..., 2], -x[..., 1]]
  else:
    scores = [x[..., 0], -x[..., 0], jnp.zeros_like(x[..., 0])]
  return jax.nn.softmax(jnp.stack(scores, -1), -1)


def test_2d_windows_over_a_larger_slice_equal_the_network_on_the_whole_slice():
  shapes = []
  seg = _segmenter("dilated2d", shapes, size=(8, 8))
  image = np.random.default_rng(0).normal(size=(21, 13, 5)).astype(np.float32)
  result = windows.network_probabilities(image, seg.settings, seg.batch_function("ct"))
  neighbours = np.clip(np.arange(5)[:, None] + [-1, 0, 1], 0, 4)
  whole = np.asarray(pointwise(np.moveaxis(image[:, :, neighbours], 2, 0)))  # [S, H, W, C]
  np.testing.assert_allclose(result, np.moveaxis(whole, 0, 2), atol=1e-6)
  # Rows start at 0, 3, 6, 10, 13 and columns at 0, 2, 5: 15 windows per slice, 4 per call.
  assert shapes == [(4, 8, 8, 3)] * 19


def test_3d_windows_over_a_larger_plane_equal_the_network_on_the_whole_volume():
  seg = _segmenter("unet3d", size=(8, 8), patch=(8, 8, 4))
  image = np.random.default_rng(1).normal(size=(19, 10, 6)).astype(np.float32)
  expected = np.asarray(pointwise(image[..., None]))
  np.testing.assert_allclose(
    windows.network_probabilities(image, seg.settings, seg.batch_function("ct")),
    expected,
    atol=1e-6,
  )


def test_overlapping_2d_windows_are_blended_with_gaussian_weights():
  """Two 8 x 8 windows of a 12-row slice, at rows 0 and 4; the fake network says class 1
  with probability (first row of its window) / 4: 0 in the first, 1 in the second.  Where
  they overlap, row r gets g(r - 4) / (g(r) + g(r - 4)), g(n) = exp(-(n - 3.5)^2 / 2): the
  Gaussian of an 8-pixel window has sigma 1."""
  seg = _segmenter("dilated2d", size=(8, 8))
  image = np.broadcast_to(np.arange(12, dtype=np.float32)[:, None, None], (12, 8, 1)).copy()

  def first_row(variables, batch, modality):
    a = jnp.broadcast_to(batch[:, :1, :1, 1] / 4, batch.shape[:3])
    return jnp.stack([1 - a, a, jnp.zeros_like(a)], -1)

  seg._probabilities = first_row
  class_1 = windows.network_probabilities(image, seg.settings, seg.batch_function("ct"))[:, :, 0, 1]

  def g(n):
    return np.exp(-0.5 * (n - 3.5) ** 2)

  rows = np.arange(12)
  expected = np.where(
    rows < 4, 0.0, np.where(rows >= 8, 1.0, g(rows - 4) / (g(rows) + g(rows - 4)))
  )
  np.testing.assert_allclose(class_1, np.broadcast_to(expected[:, None], (12, 8)), atol=1e-6)


# --- a network trained in millimetres ------------------------------------------------------------

_CODES = np.zeros(1000, np.int64)  # MM-WHS codes of the four structures -> class indices
_CODES[[205, 420, 500, 820]] = [1, 2, 3, 4]


def _dice(a, b) -> list[float]:
  return [
    2 * np.sum((a == k) & (b == k)) / max(np.sum(a == k) + np.sum(b == k), 1) for k in (1, 2, 3, 4)
  ]


def _train(config, root, cache):
  """`config.total_steps` steps of the run's own pipeline on CT phantoms; live variables."""
  adapter = adapters.get_adapter("mmwhs", modalities=("ct",))
  settings = config_lib.preprocessing(config)["ct"]
  entries = preprocess.cache_cases(adapter, adapter.cases(root), settings, cache)
  batches = pipeline.make_train_iterator(
    {"ct": entries}, pipeline.Spec.from_config(config), ("ct",), seed=0
  )
  mesh = mesh_lib.make_mesh()
  model = models.build(config.model, config.modalities)
  state = state_lib.create(config, model, models.input_spatial(config), jax.random.key(0), mesh)
  train_step = steps.make_train_step(model, config, mesh)
  try:
    for _ in range(config.total_steps):
      state, _ = train_step(state, next(batches))
  finally:
    batches.close()
  return {"params": state.params, "batch_stats": state.batch_stats}


@pytest.mark.slow
def test_a_network_trained_in_millimetres_predicts_alike_at_0_7_and_1_4_mm(tmp_path):
  """One unseen phantom heart written at 0.7 mm (244 x 244 pixels over its 170 mm field of
  view) and at 1.4 mm (every other pixel: coarse pixel (i, j) is fine pixel (2i, 2j)), the same
  field of view at two matrix sizes as a scanner gives it.  Resampled to the 2.8 mm the
  network was trained at, both reach it at one scale; the predictions are compared on the
  coarse grid.  The control writes the 1.4 mm pixels with the 0.7 mm header: the heart then
  claims half its size, is resampled to half its pixels, and the answers part.

  The network is the suite's tiny demo network at the demo's width 4, trained for 300 steps:
  its Dice against the truth is 0.37-0.59, yet its two answers agree (measured: 0.963-0.984
  per structure, mean 0.975 and 0.979 on cases 9 and 10; at width 2, means 0.944-0.971 from
  run to run).  `benchmarks/spacing_agreement.py` measures the demo's converged network."""
  config = importlib.import_module("configs.demo").get_config("tiny")
  config.modalities = ("ct",)
  config.data.spacing = "2.8"
  config.data.size = (32, 32)  # 90 mm windows over the 170 mm field of view
  config.batch_size = 4
  config.total_steps = 300
  config.optim.decay_steps, config.optim.decay_rate = 100, 0.95  # the rate nearly constant
  config.model.num_classes = 5
  config.model.width = 4
  config = config_lib.check(config)
  synthetic.write_mmwhs(tmp_path / "data", n_ct=4, n_mr=0, shape=(64, 64, 12))
  variables = _train(config, str(tmp_path / "data"), str(tmp_path / "cache"))
  seg = infer.Segmenter(config, variables)

  def predict(image, affine):
    vol = volumes.from_array(image.astype(np.float32), affine)
    return vol.to_original(seg.predict_volume(vol, "ct")[0])

  fine = phantoms.make_phantom("cardiac", "ct", (244, 244, 12), index=9)  # not trained on
  coarse_affine = fine.affine @ np.diag([2.0, 2.0, 1.0, 1.0])
  mm = np.linalg.norm(fine.affine[:3, :3], axis=0)
  assert np.allclose(np.linalg.norm(coarse_affine[:3, :3], axis=0), mm * (2, 2, 1))
  at_fine = predict(fine.image, fine.affine)
  agreement = np.mean(_dice(at_fine[::2, ::2], predict(fine.image[::2, ::2], coarse_affine)))
  wrong_header = np.mean(_dice(at_fine[::2, ::2], predict(fine.image[::2, ::2], fine.affine)))
  learned = np.mean(_dice(at_fine, _CODES[fine.label]))
  assert learned > 0.3  # measured 0.37-0.59: the network found the heart
  assert agreement >= 0.95 and wrong_header < 0.5, (agreement, wrong_header)
