"""Losses against numbers worked out by hand on tiny arrays.

Logits are chosen so that the softmax is exact: [ln 3, 0] -> (3/4, 1/4),
[0, 0] -> (1/2, 1/2). Expected values are written with plain `math` from the
formulas in the paper, not with the library's code.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ukd.train import losses

# The paper's KD settings; a test overrides the one it is about.
kd_loss = functools.partial(losses.kd_loss, temperature=2.0, distance="kl", absent="mask")

LN3 = math.log(3.0)
# Four voxels, two classes: probabilities (3/4, 1/4), (1/2, 1/2), (1/4, 3/4), (1/4, 3/4).
LOGITS = np.array([[LN3, 0.0], [0.0, 0.0], [0.0, LN3], [0.0, LN3]], np.float32)
LABELS = np.array([0, 0, 1, 0], np.int32)


def _softmax(values):
  exps = [math.exp(v) for v in values]
  return [e / sum(exps) for e in exps]


def _kl(p, q):
  return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _sym_kl(p, q):
  return 0.5 * (_kl(p, q) + _kl(q, p))


def _sq_dist(p, q):
  return sum((pi - qi) ** 2 for pi, qi in zip(p, q))


# ---------------------------------------------------------------- dice


def test_dice_perfect_prediction_is_near_zero():
  labels = np.array([0, 1, 2, 1, 0, 2], np.int32)
  logits = 30.0 * np.eye(3, dtype=np.float32)[labels]
  assert float(losses.dice_loss(logits, labels)) == pytest.approx(0.0, abs=1e-6)


def test_dice_worked_example():
  # class 0: g = (1,1,0,1); sum p g = 3/4 + 1/2 + 1/4 = 1.5; sum p^2 = 9/16+4/16+1/16+1/16 = 0.9375; sum g = 3
  # class 1: g = (0,0,1,0); sum p g = 3/4;                 sum p^2 = 1/16+4/16+9/16+9/16 = 1.4375; sum g = 1
  dice0 = 2 * 1.5 / (0.9375 + 3 + 1e-7)
  dice1 = 2 * 0.75 / (1.4375 + 1 + 1e-7)
  expected = 1 - (dice0 + dice1) / 2
  assert float(losses.dice_loss(LOGITS, LABELS)) == pytest.approx(expected, rel=1e-6)


def test_dice_sums_over_the_whole_batch():
  # The same four voxels arranged as a batch of 2 images of 2 voxels: one global sum.
  batched = losses.dice_loss(LOGITS.reshape(2, 2, 2), LABELS.reshape(2, 2))
  assert float(batched) == pytest.approx(float(losses.dice_loss(LOGITS, LABELS)), rel=1e-6)


def test_dice_gradient_finite_with_absent_class():
  labels = np.zeros((2, 3), np.int32)  # classes 1 and 2 absent
  grad = jax.grad(losses.dice_loss)(jnp.zeros((2, 3, 3)), labels)
  assert np.all(np.isfinite(grad))


# ---------------------------------------------------------------- weighted CE


def test_weighted_ce_worked_example_with_clip():
  # Last voxel: logits (0, ln 999) -> p = (1/1000, 999/1000); its true class 0 has
  # p = 0.001 < 0.005, so the clip turns -log(0.001) into -log(0.005).
  logits = LOGITS.copy()
  logits[3] = [0.0, math.log(999.0)]
  # Class 0 fills 3 of 4 voxels, class 1 one: w0 = 1 - 3/4, w1 = 1 - 1/4.
  w0, w1 = 0.25, 0.75
  expected = (
    -w0 * math.log(0.75)  # voxel 0, class 0, p = 3/4
    - w0 * math.log(0.5)  # voxel 1, class 0, p = 1/2
    - w1 * math.log(0.75)  # voxel 2, class 1, p = 3/4
    - w0 * math.log(0.005)  # voxel 3, class 0, p = 1/1000 clipped
  ) / 4
  assert float(losses.weighted_ce_loss(logits, LABELS)) == pytest.approx(expected, rel=1e-5)


def test_weighted_ce_gradient_finite_with_absent_class():
  labels = np.zeros((4,), np.int32)
  grad = jax.grad(losses.weighted_ce_loss)(jnp.zeros((4, 3)), labels)
  assert np.all(np.isfinite(grad))


# ---------------------------------------------------------------- KD

# Modality 'a': class 0 voxels have logits (2, 0), (0, 0) -> mean (1, 0); class 1 voxel (0, 2).
A_LOGITS = np.array([[2.0, 0.0], [0.0, 0.0], [0.0, 2.0]], np.float32)
A_LABELS = np.array([0, 0, 1], np.int32)
# Modality 'b': class 0 voxel (0, 0); class 1 voxels (0, 0), (2, 0) -> mean (1, 0).
B_LOGITS = np.array([[0.0, 0.0], [0.0, 0.0], [2.0, 0.0]], np.float32)
B_LABELS = np.array([0, 1, 1], np.int32)
# With T = 2: p_a^0 = softmax(0.5, 0), p_a^1 = softmax(0, 1), p_b^0 = (1/2, 1/2), p_b^1 = softmax(0.5, 0).
PA = [_softmax([0.5, 0.0]), _softmax([0.0, 1.0])]
PB = [[0.5, 0.5], _softmax([0.5, 0.0])]


def test_kd_worked_two_class_example():
  expected = (_sym_kl(PA[0], PB[0]) + _sym_kl(PA[1], PB[1])) / 2
  value = kd_loss({"a": A_LOGITS, "b": B_LOGITS}, {"a": A_LABELS, "b": B_LABELS})
  assert float(value) == pytest.approx(expected, rel=1e-5)


def test_kd_temperature_divides_the_class_means():
  # T = 1: p_a^0 = softmax(1, 0), p_a^1 = softmax(0, 2), p_b^0 uniform, p_b^1 = softmax(1, 0).
  expected = (
    _sym_kl(_softmax([1.0, 0.0]), [0.5, 0.5]) + _sym_kl(_softmax([0.0, 2.0]), _softmax([1.0, 0.0]))
  ) / 2
  value = kd_loss({"a": A_LOGITS, "b": B_LOGITS}, {"a": A_LABELS, "b": B_LABELS}, temperature=1.0)
  assert float(value) == pytest.approx(expected, rel=1e-5)


def test_kd_l2_distance_worked_example():
  expected = (_sq_dist(PA[0], PB[0]) + _sq_dist(PA[1], PB[1])) / 2
  value = kd_loss({"a": A_LOGITS, "b": B_LOGITS}, {"a": A_LABELS, "b": B_LABELS}, distance="l2")
  assert float(value) == pytest.approx(expected, rel=1e-5)


def test_kd_identical_distributions_is_zero():
  # Different voxels, same class-wise means: (1, 3) and (3, 1) average to (2, 2) in 'b' as in 'a'.
  a_logits = np.array([[2.0, 2.0], [0.0, 1.0]], np.float32)
  b_logits = np.array([[1.0, 3.0], [3.0, 1.0], [0.0, 1.0]], np.float32)
  value = kd_loss({"a": a_logits, "b": b_logits}, {"a": np.array([0, 1]), "b": np.array([0, 0, 1])})
  assert float(value) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("distance", ["kl", "l2"])
def test_kd_is_symmetric(distance):
  ab = kd_loss({"a": A_LOGITS, "b": B_LOGITS}, {"a": A_LABELS, "b": B_LABELS}, distance=distance)
  ba = kd_loss({"b": B_LOGITS, "a": A_LOGITS}, {"b": B_LABELS, "a": A_LABELS}, distance=distance)
  swapped = kd_loss(
    {"a": B_LOGITS, "b": A_LOGITS}, {"a": B_LABELS, "b": A_LABELS}, distance=distance
  )
  assert float(ab) == pytest.approx(float(ba), rel=1e-6)
  assert float(ab) == pytest.approx(float(swapped), rel=1e-6)


def _three_class_case():
  """'a' has classes 0, 1, 2; 'b' only 0 and 1: class 2 must be left out."""
  a_logits = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 4.0]], np.float32)
  a_labels = np.array([0, 1, 2], np.int32)
  b_logits = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 2.0]], np.float32)
  b_labels = np.array([0, 1], np.int32)
  return {"a": a_logits, "b": b_logits}, {"a": a_labels, "b": b_labels}


def test_kd_class_absent_in_one_modality_is_excluded():
  logits, labels = _three_class_case()
  # Only classes 0 and 1 are shared. T = 2:
  # p_a^0 = softmax(.5, 0, 0), p_b^0 = uniform; p_a^1 = softmax(0, 1, 0), p_b^1 = softmax(0, 0, 1).
  expected = (
    _sym_kl(_softmax([0.5, 0.0, 0.0]), [1 / 3] * 3)
    + _sym_kl(_softmax([0.0, 1.0, 0.0]), _softmax([0.0, 0.0, 1.0]))
  ) / 2
  assert float(kd_loss(logits, labels)) == pytest.approx(expected, rel=1e-5)


def test_kd_gradients_finite_with_absent_classes():
  logits, labels = _three_class_case()
  grads = jax.grad(kd_loss)(logits, labels)
  for grad in grads.values():
    assert np.all(np.isfinite(grad))
  # The voxel of class 2, absent in 'b', must not be pulled anywhere.
  np.testing.assert_array_equal(grads["a"][2], 0.0)


def test_kd_no_shared_class_is_zero_with_finite_gradient():
  logits = {"a": jnp.array([[1.0, 0.0], [3.0, 0.0]]), "b": jnp.array([[0.0, 5.0]])}
  labels = {"a": jnp.array([0, 0]), "b": jnp.array([1])}
  value, grads = jax.value_and_grad(kd_loss)(logits, labels)
  assert float(value) == 0.0
  for grad in grads.values():
    np.testing.assert_array_equal(grad, 0.0)


def test_kd_three_modalities_average_over_three_pairs():
  # 'c': class 0 voxel (2, 0) -> p_c^0 = softmax(1, 0); class 1 voxel (0, 0) -> uniform.
  c_logits = np.array([[2.0, 0.0], [0.0, 0.0]], np.float32)
  c_labels = np.array([0, 1], np.int32)
  pc = [_softmax([1.0, 0.0]), [0.5, 0.5]]

  def pair(p, q):
    return (_sym_kl(p[0], q[0]) + _sym_kl(p[1], q[1])) / 2

  expected = (pair(PA, PB) + pair(PA, pc) + pair(PB, pc)) / 3
  value = kd_loss(
    {"a": A_LOGITS, "b": B_LOGITS, "c": c_logits}, {"a": A_LABELS, "b": B_LABELS, "c": c_labels}
  )
  assert float(value) == pytest.approx(expected, rel=1e-5)


def test_kd_under_jit_with_spatial_axes():
  # [B, H, W, C] inputs: the class means run over every voxel of the batch.
  logits = {"a": A_LOGITS.reshape(1, 3, 1, 2), "b": B_LOGITS.reshape(3, 1, 1, 2)}
  labels = {"a": A_LABELS.reshape(1, 3, 1), "b": B_LABELS.reshape(3, 1, 1)}
  expected = (_sym_kl(PA[0], PB[0]) + _sym_kl(PA[1], PB[1])) / 2
  assert float(jax.jit(kd_loss)(logits, labels)) == pytest.approx(expected, rel=1e-5)


def test_kd_rejects_bad_arguments():
  logits, labels = {"a": A_LOGITS, "b": B_LOGITS}, {"a": A_LABELS, "b": B_LABELS}
  with pytest.raises(ValueError, match="distance"):
    kd_loss(logits, labels, distance="cosine")
  with pytest.raises(ValueError, match="at least 2 modalities"):
    kd_loss({"a": A_LOGITS}, {"a": A_LABELS})
  with pytest.raises(ValueError, match="different modalities"):
    kd_loss(logits, {"a": A_LABELS, "c": B_LABELS})
  with pytest.raises(ValueError, match="temperature"):
    kd_loss(logits, labels, temperature=0.0)
  with pytest.raises(ValueError, match="absent"):
    kd_loss(logits, labels, absent="drop")
  with pytest.raises(ValueError, match="number of classes"):
    kd_loss({"a": A_LOGITS, "b": np.zeros((3, 3), np.float32)}, labels)


def _reference_kd(logits, labels, num_classes, temperature=2.0):
  """A numpy transcription of the reference code's KD term (two modalities): per class,
  sum(logits * mask) / (sum(mask) + 1e-6), softmax(/ T), symmetric KL over the classes
  summed and divided by the number of classes, absent classes included."""

  def probs(x, y, c):
    mask = (y == c).astype(np.float64)[:, None]
    avg = (x * mask).sum(axis=0) / (mask.sum() + 1e-6)
    e = np.exp(avg / temperature - (avg / temperature).max())
    return e / e.sum()

  total = 0.0
  for c in range(num_classes):
    s, t = probs(logits["a"], labels["a"], c), probs(logits["b"], labels["b"], c)
    total += (np.sum(s * np.log(s / t)) + np.sum(t * np.log(t / s))) / 2.0
  return total / num_classes


def test_kd_uniform_absent_equals_the_reference_formula():
  logits, labels = _three_class_case()
  expected = _reference_kd(logits, labels, 3)
  value = kd_loss(logits, labels, absent="uniform")
  assert float(value) == pytest.approx(expected, rel=1e-5)
  # Class 2 is absent from 'b' and counts there, so the value differs from the masked form.
  assert abs(float(value) - float(kd_loss(logits, labels))) > 1e-3
  grads = jax.grad(functools.partial(kd_loss, absent="uniform"))(logits, labels)
  assert all(np.all(np.isfinite(g)) for g in grads.values())


def test_kd_uniform_absent_on_random_batches():
  rng = np.random.default_rng(0)
  logits = {m: rng.normal(size=(50, 4)).astype(np.float32) for m in "ab"}
  labels = {"a": rng.integers(0, 4, 50), "b": rng.integers(0, 3, 50)}  # class 3 absent in 'b'
  expected = _reference_kd(logits, labels, 4, temperature=2.0)
  assert float(kd_loss(logits, labels, absent="uniform")) == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------- L2


def test_l2_counts_only_kernels():
  params = {
    "conv": {"kernel": np.ones((2, 2), np.float32), "bias": np.ones((2,), np.float32)},
    "norm": {"scale": np.full((4,), 5.0, np.float32), "bias": np.ones((4,), np.float32)},
    "block": {"deconv": {"kernel": np.full((3,), 2.0, np.float32)}},
  }
  # 0.5 * (4 * 1^2 + 3 * 2^2) = 8
  assert float(losses.l2_loss(params)) == pytest.approx(8.0)
  # Every parameter (the reference 3D code): + 0.5 * (2 * 1 + 4 * 25 + 4 * 1) = 8 + 53 = 61.
  assert float(losses.l2_loss(params, scope="all")) == pytest.approx(61.0)
  # No kernel at all: nothing to penalise, and still a float32 scalar.
  none = losses.l2_loss({"norm": params["norm"]})
  assert none.shape == () and none.dtype == jnp.float32 and float(none) == 0.0


def test_l2_on_a_flax_module():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(2, (3, 3))(x)
      return nn.BatchNorm(use_running_average=True)(x)

  variables = Net().init(jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 1)))
  kernel = variables["params"]["Conv_0"]["kernel"]
  expected = 0.5 * float(np.sum(np.square(kernel)))
  assert float(losses.l2_loss(variables["params"])) == pytest.approx(expected, rel=1e-6)
