"""Training losses of the paper: soft Dice, class-weighted cross-entropy, KD and L2.

Conventions shared by every function here: `logits` are float arrays [..., C]
(any number of leading batch / spatial axes), `labels` are integer class indices
with the same leading shape. Every loss reduces over ALL voxels of the batch at
once, as the reference implementation does, so that a class seen in only one
image of the batch still gets a well-defined statistic.

All functions are pure jax.numpy without Python branching on array values, so
they can be traced under `jax.jit` and differentiated. Inputs are promoted to
float32 first: the statistics (sums over a whole batch, logs of small
probabilities) lose too much precision in bfloat16.

Partial label sets. A modality whose labels hold only some classes passes
`labelled`, a boolean [C] mask of the classes its labels hold. Its label 0 then
means "background OR one of the unlabelled classes", so the segmentation losses
score background and the unlabelled classes as ONE merged class, with the merged
probability p_bg + sum_{unlabelled k} p_k (the marginal, label-set losses of
Fidon et al., MICCAI 2021): moving probability between background and an
unlabelled organ changes nothing, so the network is never taught that an organ
the labels do not mark is background. `labelled=None` (every class labelled)
computes exactly what the functions computed before label sets existed.
"""

import itertools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Keeps the Dice ratio finite for a class that is neither present nor predicted.
DICE_EPS = 1e-7
# Lower clip of the probabilities in the cross-entropy, as in the reference code:
# it bounds -log(p) (at about 5.3) so a few confidently wrong voxels cannot dominate.
CE_MIN_PROB = 0.005

KD_DISTANCES = ("kl", "l2")
# What KD does with a class absent from a modality's batch (see `kd_loss`).
KD_ABSENT = ("mask", "uniform")
# The reference code's guard in the class means' denominator, sum / (count + eps).
REFERENCE_KD_EPS = 1e-6
# Which parameters the L2 penalty covers: conv kernels (2D reference) or every one (3D reference).
L2_SCOPES = ("kernels", "all")


def merge_unlabelled(values: jax.Array, labelled: jax.Array | np.ndarray) -> jax.Array:
  """[..., C] per-class values with the unlabelled classes folded into class 0.

  Column 0 becomes value_0 + sum of the unlabelled columns, the unlabelled columns
  become 0, the labelled ones stay. Applied to probabilities it gives the merged
  class's probability; applied to one-hot labels it sends a voxel that carries an
  unlabelled class's index (labels that hold more than the run declares) to the
  merged class, which is what it is to a loss that does not use that class.
  Class 0 always stays: it is the merged class.
  """
  keep = jnp.asarray(labelled, bool).at[0].set(True)
  folded = jnp.sum(jnp.where(keep, 0.0, values), axis=-1)
  return jnp.where(keep, values, 0.0).at[..., 0].add(folded)


def _probs_and_onehot(logits, labels, labelled=None):
  """Softmax probabilities and one-hot labels, both float32 [..., C]; with a `labelled`
  mask both are merged (`merge_unlabelled`)."""
  logits = jnp.asarray(logits, jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  if labelled is None:
    return probs, onehot
  return merge_unlabelled(probs, labelled), merge_unlabelled(onehot, labelled)


def _voxel_axes(x):
  """All axes but the trailing class axis: the sums run over the whole batch."""
  return tuple(range(x.ndim - 1))


def dice_loss(
  logits: jax.Array | np.ndarray,
  labels: jax.Array | np.ndarray,
  labelled: jax.Array | np.ndarray | None = None,
) -> jax.Array:
  """Soft Dice loss, 1 - mean over classes of the per-class soft Dice.

  dice_c = 2 sum(p_c g_c) / (sum(p_c^2) + sum(g_c) + eps), sums over every voxel
  of the batch; the mean runs over ALL C classes, background included, as in the
  paper's reference code (the squared-probability denominator also comes from
  there). Why "1 - mean" rather than "-mean": the loss is 0 for a perfect
  prediction, which makes logged values readable; the gradient is the same.

  A class absent from the batch has numerator 0 and therefore dice_c ~ 0 and no
  gradient: it adds a constant 1/C to the loss rather than pushing the network
  towards predicting it.

  With `labelled`, the Dice runs over the merged classes (module docstring): the
  merged background and the labelled classes, the mean over those alone, as if the
  network had only the classes the labels can tell apart.

  Args:
    logits: [..., C] network outputs.
    labels: [...] class indices.
    labelled: [C] booleans, the classes the labels hold; None: all of them.

  Returns:
    The loss, a float32 scalar.
  """
  probs, onehot = _probs_and_onehot(logits, labels, labelled)
  axes = _voxel_axes(probs)
  intersection = jnp.sum(probs * onehot, axis=axes)
  denominator = jnp.sum(probs * probs, axis=axes) + jnp.sum(onehot, axis=axes) + DICE_EPS
  dice = 2.0 * intersection / denominator
  if labelled is None:
    return 1.0 - jnp.mean(dice)
  keep = jnp.asarray(labelled, bool).at[0].set(True)
  return 1.0 - jnp.sum(jnp.where(keep, dice, 0.0)) / jnp.sum(keep)


def weighted_ce_loss(
  logits: jax.Array | np.ndarray,
  labels: jax.Array | np.ndarray,
  labelled: jax.Array | np.ndarray | None = None,
) -> jax.Array:
  """Class-weighted cross-entropy, mean over voxels of -sum_c w_c g_c log(p_c).

  w_c = 1 - (voxels of class c / all voxels) in this batch, so rare structures
  weigh more than the background that fills most of a slice. The weights are
  statistics of the labels, not something to optimise, hence stop_gradient.
  Probabilities are clipped to [CE_MIN_PROB, 1] before the log (reference code).

  With `labelled`, the merged class is one class of this rule (module docstring):
  its probability is the merged one and its weight 1 - (voxels labelled background
  or an unlabelled class / all voxels), the share of the voxels it covers, so it
  weighs no more than the background it mostly is.

  Args:
    logits: [..., C] network outputs.
    labels: [...] class indices.
    labelled: [C] booleans, the classes the labels hold; None: all of them.

  Returns:
    The loss, a float32 scalar.
  """
  probs, onehot = _probs_and_onehot(logits, labels, labelled)
  axes = _voxel_axes(onehot)
  class_fraction = jnp.sum(onehot, axis=axes) / (onehot.size // onehot.shape[-1])
  weights = jax.lax.stop_gradient(1.0 - class_fraction)
  log_probs = jnp.log(jnp.clip(probs, CE_MIN_PROB, 1.0))
  return jnp.mean(-jnp.sum(weights * onehot * log_probs, axis=-1))


def _class_log_distributions(logits, labels, temperature, absent):
  """Per-class soft predictions of one modality: log p^c [C, C] and presence [C].

  Row c is log softmax(mean of the logits over the voxels labelled c / T). The
  voxel sums are one matmul between the one-hot labels and the logits. An absent
  class gets a zero mean, i.e. a uniform distribution: with absent='mask' through
  a safe divide (the caller leaves the row out), with absent='uniform' through the
  reference code's divide by (count + 1e-6), kept exactly.
  """
  logits = jnp.asarray(logits, jnp.float32)
  num_classes = logits.shape[-1]
  flat_logits = logits.reshape(-1, num_classes)
  onehot = jax.nn.one_hot(jnp.asarray(labels).reshape(-1), num_classes, dtype=jnp.float32)
  # HIGHEST: accelerators otherwise run float32 matmuls with bfloat16 passes.
  sums = jnp.einsum("nc,nk->ck", onehot, flat_logits, precision=jax.lax.Precision.HIGHEST)
  counts = jnp.sum(onehot, axis=0)
  if absent == "uniform":
    means = sums / (counts + REFERENCE_KD_EPS)[:, None]
  else:
    means = sums / jnp.maximum(counts, 1.0)[:, None]
  return jax.nn.log_softmax(means / temperature, axis=-1), counts > 0


def _pair_distance(log_p, log_q, distance):
  """Per-class distance [C] between two modalities' class distributions."""
  p, q = jnp.exp(log_p), jnp.exp(log_q)
  if distance == "kl":
    # Symmetric KL, 1/2 [KL(p||q) + KL(q||p)], from log-softmax values, which
    # are always finite, so no log(0) can appear.
    return 0.5 * jnp.sum((p - q) * (log_p - log_q), axis=-1)
  return jnp.sum((p - q) ** 2, axis=-1)


def kd_loss(
  logits: Mapping[str, jax.Array | np.ndarray],
  labels: Mapping[str, jax.Array | np.ndarray],
  *,
  temperature: float | jax.Array,
  distance: str,
  absent: str,
  labelled: Mapping[str, jax.Array | np.ndarray] | None = None,
) -> jax.Array:
  """Knowledge-distillation loss aligning modalities' class-wise predictions.

  For each modality m and class c, p_m^c = softmax(mean of the logits over the
  voxels labelled c, whole batch / temperature): what the network "thinks" a
  typical voxel of class c looks like in that modality. The loss is the mean over
  unordered pairs of modalities of a per-pair mean over classes.
  Every step is NaN-free in value and gradient, whatever `absent` says.

  Args:
    logits: modality -> [..., C] network outputs; at least two modalities, the
      same C for all.
    labels: modality -> [...] class indices; the same modalities as `logits`.
    temperature: the softmax temperature T (> 0) the class means are divided by.
    distance: 'kl', the paper's symmetric KL, 1/2 [KL(p_a||p_b) + KL(p_b||p_a)],
      or 'l2', its squared-Euclidean alternative, sum_k (p_a,k - p_b,k)^2.
    absent: 'mask' (ukd's default) averages over the classes present in BOTH
      modalities' batches, and a pair with no shared class contributes 0: an
      absent class would otherwise pull the other modality's class towards a
      uniform "no idea". 'uniform' is the reference code exactly: an absent class
      keeps its uniform distribution and the sum over classes is divided by C.
    labelled: modality -> [C] booleans, the classes its labels hold (None: every
      class in every modality). Each pair then averages, with either `absent`
      rule, only over the classes BOTH modalities label (a pair without one
      contributes 0): a class one modality never labels has no class mean there to
      align. Background counts only in a modality that labels every class, since
      elsewhere its label 0 also covers the unlabelled organs, whose logits would
      pull its class mean away from the other modality's true background.

  Returns:
    The loss, a float32 scalar.

  Raises:
    ValueError: an unknown `distance` or `absent`, a temperature <= 0, fewer than
      two modalities, or modalities that disagree (keys, number of classes).
  """
  if distance not in KD_DISTANCES:
    raise ValueError(f"kd_loss: unknown distance {distance!r}, expected one of {KD_DISTANCES}")
  if absent not in KD_ABSENT:
    raise ValueError(f"kd_loss: unknown absent-class rule {absent!r}, expected one of {KD_ABSENT}")
  if isinstance(temperature, int | float) and temperature <= 0:
    raise ValueError(f"kd_loss: temperature must be positive, got {temperature}")
  if set(logits) != set(labels):
    raise ValueError(
      f"kd_loss: logits and labels have different modalities: {sorted(logits)} vs {sorted(labels)}"
    )
  if len(logits) < 2:
    raise ValueError(f"kd_loss needs at least 2 modalities, got {sorted(logits)}")
  num_classes = {m: logits[m].shape[-1] for m in logits}
  if len(set(num_classes.values())) != 1:
    raise ValueError(f"kd_loss: modalities disagree on the number of classes: {num_classes}")

  per_modality = {
    m: _class_log_distributions(logits[m], labels[m], temperature, absent) for m in logits
  }
  exact = {m: _kd_classes(labelled[m]) for m in logits} if labelled is not None else None
  pair_losses = []
  for a, b in itertools.combinations(logits, 2):
    (log_pa, present_a), (log_pb, present_b) = per_modality[a], per_modality[b]
    per_class = _pair_distance(log_pa, log_pb, distance)
    if absent == "uniform" and exact is None:
      pair_losses.append(jnp.mean(per_class))
      continue
    shared = exact[a] & exact[b] if exact is not None else True
    if absent == "mask":
      shared = shared & present_a & present_b
    per_class = jnp.where(shared, per_class, 0.0)
    pair_losses.append(jnp.sum(per_class) / jnp.maximum(jnp.sum(shared), 1))
  return jnp.mean(jnp.stack(pair_losses))


def _kd_classes(labelled):
  """The classes whose class mean KD may align ([C] booleans): the labelled ones, and
  background only when every class is labelled (see `kd_loss`)."""
  labelled = jnp.asarray(labelled, bool)
  return labelled.at[0].set(jnp.all(labelled))


def _is_kernel(path):
  """True when a tree path ends in 'kernel' (a dict key, or an attribute name for dataclass trees)."""
  last = path[-1]
  return getattr(last, "key", getattr(last, "name", None)) == "kernel"


def l2_loss(params: Any, scope: str = "kernels") -> jax.Array:
  """0.5 * sum of squares of the parameters the reference code penalises.

  The caller multiplies by the weight (1e-4) and ADDS the result to the loss, so it
  goes through Adam's normalisation like any other gradient: this is the paper's L2
  regularisation, not decoupled weight decay (AdamW).

  Args:
    params: the trainable parameters, any pytree of arrays (nested dicts, or
      dataclasses).
    scope: 'kernels': leaves whose path ends in 'kernel' (Conv, ConvTranspose);
      biases and normalization scales/offsets do not count, as in the reference 2D
      code. 'all': every trainable parameter, as the reference 3D code penalises.

  Returns:
    The penalty, a float32 scalar (0 for a tree without such leaves).
  """
  if scope not in L2_SCOPES:
    raise ValueError(f"l2_loss: unknown scope {scope!r}, expected one of {L2_SCOPES}")
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  squares = [
    jnp.sum(jnp.square(jnp.asarray(leaf, jnp.float32)))
    for path, leaf in leaves
    if scope == "all" or _is_kernel(path)
  ]
  return 0.5 * sum(squares, jnp.zeros((), jnp.float32))
