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


# ---------------------------------------------------------------- label sets

# Two voxels, three classes, class 2 not labelled: voxel 1 (1/2, 1/5, 3/10) labelled
# background, voxel 2 (1/10, 3/5, 3/10) labelled class 1. Merged (background + class 2):
# voxel 1 (4/5, 1/5), voxel 2 (2/5, 3/5).
PARTIAL_PROBS = np.array([[0.5, 0.2, 0.3], [0.1, 0.6, 0.3]], np.float32)
PARTIAL_LABELS = np.array([0, 1], np.int32)
LABELLED = np.array([True, True, False])


def _partial(loss, probs, labels=PARTIAL_LABELS):
  return float(loss(np.log(probs), labels, LABELLED))


def test_label_set_dice_and_ce_worked_example():
  # Dice, merged class: 2 * 4/5 / (16/25 + 4/25 + 1) = 8/9; class 1: 2 * 3/5 / (1/25 + 9/25 +
  # 1) = 6/7; class 2 is not one of the classes: 1 - (8/9 + 6/7) / 2 = 8/63.
  assert _partial(losses.dice_loss, PARTIAL_PROBS) == pytest.approx(8 / 63, rel=1e-5)
  # CE: each merged class holds 1 of 2 voxels, weight 1/2: -(1/2 ln 4/5 + 1/2 ln 3/5) / 2.
  expected = -(0.5 * math.log(0.8) + 0.5 * math.log(0.6)) / 2
  assert _partial(losses.weighted_ce_loss, PARTIAL_PROBS) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("loss", [losses.dice_loss, losses.weighted_ce_loss])
def test_label_set_losses_ignore_moves_between_background_and_an_unlabelled_class(loss):
  before = _partial(loss, PARTIAL_PROBS)
  swapped = np.array([[0.3, 0.2, 0.5], [0.35, 0.6, 0.05]], np.float32)  # bg <-> class 2
  assert _partial(loss, swapped) == pytest.approx(before, rel=1e-6)
  # A label that names the unlabelled class is the merged class too.
  assert _partial(loss, PARTIAL_PROBS, np.array([2, 1], np.int32)) == pytest.approx(before)
  into_labelled = np.array([[0.3, 0.4, 0.3], [0.1, 0.6, 0.3]], np.float32)  # bg -> class 1
  assert _partial(loss, into_labelled) > before + 1e-3
  # Every class labelled: the loss as it always was (class 2 a class of its own).
  full = float(loss(np.log(PARTIAL_PROBS), PARTIAL_LABELS, np.ones(3, bool)))
  assert full == pytest.approx(float(loss(np.log(PARTIAL_PROBS), PARTIAL_LABELS)), rel=1e-6)
  assert abs(full - before) > 1e-3


def test_label_set_losses_have_finite_gradients():
  logits = np.log(PARTIAL_PROBS)
  for loss in (losses.dice_loss, losses.weighted_ce_loss):
    grad = jax.grad(loss)(logits, PARTIAL_LABELS, LABELLED)
    assert np.all(np.isfinite(grad))
    # Nothing pushes probability between background and class 2 of a voxel: their logits'
    # gradients are equal, so the merged probability is all the loss sees.
    np.testing.assert_allclose(
      grad[:, 0] * PARTIAL_PROBS[:, 2], grad[:, 2] * PARTIAL_PROBS[:, 0], atol=1e-6
    )


# 'ct' labels classes 0, 1, 2; 'mr' labels 0 and 1 (its 0 also covers class 2's organ).
KD_LOGITS = {
  "ct": np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]], np.float32),
  "mr": np.array([[0.0, 0.0, 4.0], [0.0, 0.0, 0.0], [2.0, 0.0, 0.0]], np.float32),
}
KD_LABELS = {"ct": np.array([0, 1, 2], np.int32), "mr": np.array([0, 1, 1], np.int32)}
KD_LABELLED = {"ct": np.ones(3, bool), "mr": np.array([True, True, False])}


@pytest.mark.parametrize("absent", ["mask", "uniform"])
def test_kd_averages_over_the_classes_both_modalities_label(absent):
  # Only class 1 is labelled by both: background is not, since MR's 0 also covers class 2.
  # T = 2: p_ct^1 = softmax(0, 1, 0), p_mr^1 = softmax(mean((0,0,0), (2,0,0)) / 2) = softmax(1/2, 0, 0).
  expected = _sym_kl(_softmax([0.0, 1.0, 0.0]), _softmax([0.5, 0.0, 0.0]))
  value = kd_loss(KD_LOGITS, KD_LABELS, absent=absent, labelled=KD_LABELLED)
  assert float(value) == pytest.approx(expected, rel=1e-5)
  # Nor do background's and class 2's class means count: change them, the loss stays.
  moved = {m: v.copy() for m, v in KD_LOGITS.items()}
  moved["ct"][[0, 2]] = 5.0 * moved["ct"][[2, 0]]
  moved["mr"][0] = [0.0, 3.0, 0.0]
  again = kd_loss(moved, KD_LABELS, absent=absent, labelled=KD_LABELLED)
  assert float(again) == pytest.approx(expected, rel=1e-5)
  # No class both label: the pair adds nothing.
  apart = {"ct": np.array([True, False, True]), "mr": KD_LABELLED["mr"]}
  assert float(kd_loss(KD_LOGITS, KD_LABELS, absent=absent, labelled=apart)) == 0.0


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
