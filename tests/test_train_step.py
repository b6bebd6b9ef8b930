import os

import jax
import numpy as np
import pytest
from helpers import on_devices, tiny_config, toy_batch

from ukd import models
from ukd.runtime import mesh as mesh_lib
from ukd.train import optimizer, steps
from ukd.train import state as state_lib

HERE = os.path.dirname(__file__)


SPATIAL = (16, 16)


def _setup(config, devices=None):
  model = models.build(config.model, config.modalities)
  mesh = mesh_lib.make_mesh(devices)
  state = state_lib.create(config, model, SPATIAL, jax.random.key(config.seed), mesh)
  return model, mesh, state


@pytest.fixture(scope="module")
def trained():
  """The tiny 2D network's compiled step, run for 30 steps on a toy problem (compiled once)."""
  config = tiny_config()
  config.optim.lr = 3e-3
  model, mesh, state = _setup(config)
  initial = jax.device_get(state)
  step = steps.make_train_step(model, config, mesh)
  history = []
  for i in range(30):
    state, metrics = step(state, mesh_lib.to_global_batch(toy_batch(config, SPATIAL, seed=i), mesh))
    history.append(jax.device_get(metrics))
  return config, model, initial, state, history


def test_gradients_reach_shared_kernels_and_every_modalitys_norms(trained):
  config, model, initial, _, _ = trained
  batch = toy_batch(config, SPATIAL)
  config = config.copy_and_resolve_references()
  config.loss.l2 = 0.0  # only the data terms, so a non-zero kernel gradient comes from them
  grad_fn = jax.jit(
    jax.grad(
      lambda p: steps.loss_terms(model, config, p, initial.batch_stats, batch, jax.random.key(0))[0]
    )
  )
  grads = grad_fn(initial.params)
  assert float(np.abs(grads["stem"]["shared"]["kernel"]).sum()) > 0
  assert float(np.abs(grads["head"]["shared"]["kernel"]).sum()) > 0
  norm = grads["stage1_0"]["ModalityNorm_0"]
  for m in ("ct", "mr"):
    assert float(np.abs(norm[m]["scale"]).sum()) > 0
    assert float(np.abs(norm[m]["bias"]).sum()) > 0


def test_train_step_updates_each_modalitys_statistics_and_reports_terms(trained):
  config, _, initial, state, history = trained
  assert int(state.step) == 30
  first = history[0]
  for key in ("loss", "dice/ct", "dice/mr", "ce/ct", "ce/mr", "kd", "l2", "grad_norm", "lr"):
    assert np.isfinite(first[key]), key
  for m in ("ct", "mr"):
    old = initial.batch_stats["stage1_0"]["ModalityNorm_0"][m]["mean"]
    new = state.batch_stats["stage1_0"]["ModalityNorm_0"][m]["mean"]
    assert not np.allclose(old, new)
  assert float(first["lr"]) == pytest.approx(config.optim.lr)
  # The total is the weighted sum of its terms.
  w = config.loss
  expected = sum(first[f"dice/{m}"] + first[f"ce/{m}"] for m in ("ct", "mr"))
  expected += w.kd * first["kd"] + w.l2 * first["l2"]
  assert float(first["loss"]) == pytest.approx(float(expected), rel=1e-5)


def test_loss_falls_on_a_toy_problem(trained):
  losses = [float(m["loss"]) for m in trained[4]]
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


def test_bfloat16_predictions_of_trained_weights_agree_with_float32(trained):
  """Mixed precision changes rounding inside the convolutions only: on trained weights the
  bf16 network labels >= 99 % of voxels as the float32 one does (the GPU check of two whole
  trainings, benchmarks/precision_agreement.py, is in benchmarks/RESULTS.md)."""
  config, model, _, state, _ = trained
  bf16 = tiny_config()
  bf16.model.dtype = "bfloat16"
  model16 = models.build(bf16.model, bf16.modalities)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  agree = []
  for m in config.modalities:
    images = toy_batch(config, SPATIAL, seed=99)[m]["image"]
    labels32 = np.argmax(model.apply(variables, images, modality=m), -1)
    labels16 = np.argmax(np.asarray(model16.apply(variables, images, modality=m), np.float32), -1)
    agree.append(np.mean(labels32 == labels16))
  assert min(agree) >= 0.99, agree


def test_schemes_without_kd_have_no_kd_term():
  config = tiny_config(scheme="separate_norm")
  model, _, state = _setup(config)
  _, (terms, _) = jax.eval_shape(
    lambda: steps.loss_terms(
      model, config, state.params, state.batch_stats, toy_batch(config, SPATIAL), jax.random.key(0)
    )
  )
  assert "kd" not in terms and "l2" in terms


def test_learning_rate_staircase():
  config = tiny_config()
  config.optim.decay_steps = 10
  lr = optimizer.learning_rate(config)
  assert float(lr(9)) == pytest.approx(1e-3)
  assert float(lr(10)) == pytest.approx(1e-3 * 0.95)
  assert float(lr(25)) == pytest.approx(1e-3 * 0.95**2)


def test_batch_not_divisible_by_devices_is_a_clear_error():
  config = tiny_config()
  config.batch_size = 3
  mesh = mesh_lib.make_mesh()

  class FakeMesh:
    shape = {"data": 2}

  mesh_lib.check_batch_size(config.batch_size, mesh)  # one CPU device divides anything
  with pytest.raises(ValueError, match="batch_size=3"):
    mesh_lib.check_batch_size(config.batch_size, FakeMesh())


@pytest.mark.slow
def test_four_devices_equal_one_device():
  """One step on 4 simulated CPU devices equals the step on 1 device (loss, params, stats)."""
  result = on_devices(4, os.path.join(HERE, "multidevice_step.py"))
  assert result["devices"] == 4
  assert result["loss_diff"] < 1e-5
  assert result["params_diff"] < 1e-5
  assert result["stats_diff"] < 1e-5


def test_the_batch_reaches_the_devices_by_explicit_transfers_only():
  """`to_global_batch` under a guard that refuses implicit transfers: the rows arrive intact."""
  mesh = mesh_lib.make_mesh()
  rows = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  with jax.transfer_guard("disallow"):
    batch = mesh_lib.to_global_batch({"image": rows}, mesh)["image"]
  assert batch.sharding == mesh_lib.batch_sharding(mesh)
  np.testing.assert_array_equal(jax.device_get(batch), rows)
