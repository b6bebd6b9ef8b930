"""Layers that are either shared by all modalities or kept one per modality.

A `ModalityConv` or `ModalityNorm` holds a single submodule named 'shared' when
shared, else one submodule per modality name.  During `init` every branch runs,
so the variables tree holds every modality's parameters and statistics from the
start (applying a modality never seen at init would otherwise fail).

The `modality` argument is static: one name (the whole batch is that modality),
or a tuple of names, meaning the batch is the concatenation of equal parts in
that order.  With a tuple, a shared layer runs ONCE on the whole mixed batch and a
per-modality layer runs each branch on its own part.  That is what makes a shared
batch norm train as it is tested: its statistics cover every modality's samples
of the step, exactly like the running average it uses at evaluation, while a
per-modality norm still sees only its own modality.
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ukd.models import conv_grads

# The reference implementation's batch-norm settings (TensorFlow's decay 0.9, epsilon 1e-3).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-3


class KernelInits(NamedTuple):
  """The initialisers of a network's convolution kernels and of its transposed ones."""

  conv: Callable
  transpose: Callable


# Kernel initialisers by `config.model.init`: 'reference' is the authors' TensorFlow code,
# truncated_normal_initializer(stddev=0.01) for convolutions (a normal of std 0.01 cut at
# 2 std, so the drawn weights have std 0.01 * 0.8796) and, in their 3D code, an uncut
# random_normal_initializer(stddev=0.01) for the transposed convolutions; 'lecun' is
# Flax's default, lecun-normal, for both.
KERNEL_INITS = {
  "reference": KernelInits(
    nn.initializers.truncated_normal(stddev=0.01), nn.initializers.normal(stddev=0.01)
  ),
  "lecun": KernelInits(nn.initializers.lecun_normal(), nn.initializers.lecun_normal()),
}


# The convolution `nn.Conv` calls, by `config.model.conv_grads`: 'xla' is XLA's own (every
# derivative, any platform); 'cpu_matmul' computes some layers' gradients, and a wide layer's
# forward pass, as matmuls on CPU (see `ukd.models.conv_grads`; reverse mode only: no
# `jax.jvp` through the model).
CONV_GRADS = {
  "xla": lax.conv_general_dilated,
  "cpu_matmul": conv_grads.conv_general_dilated,
}


def leaky_relu(x):
  return jax.nn.leaky_relu(x, negative_slope=0.2)


class _PerModality(nn.Module):
  """Base: builds the branch modules and routes an input to the right one."""

  modalities: tuple[str, ...]
  shared: bool

  def _branch_names(self):
    return ("shared",) if self.shared else tuple(self.modalities)

  def _groups(self, modality) -> tuple[str, ...]:
    """The modality parts of the batch, in order: one name, or a tuple of names."""
    groups = (modality,) if isinstance(modality, str) else tuple(modality)
    unknown = [m for m in groups if m not in self.modalities]
    if unknown or not groups:
      raise ValueError(f"unknown modality {modality!r}; this model knows {tuple(self.modalities)}")
    return groups

  def _route(self, make: Callable[[str], nn.Module], x, modality, **kwargs) -> Any:
    groups = self._groups(modality)
    branches = {name: make(name) for name in self._branch_names()}
    if self.is_initializing():
      for branch in branches.values():
        branch(x, **kwargs)
    if self.shared:
      return branches["shared"](x, **kwargs)
    if len(groups) == 1:
      return branches[groups[0]](x, **kwargs)
    parts = jnp.split(x, len(groups), axis=0)
    return jnp.concatenate([branches[m](p, **kwargs) for m, p in zip(groups, parts)], axis=0)


class ModalityConv(_PerModality):
  """A convolution (or transposed convolution) shared by modalities or per modality."""

  features: int = 0
  kernel_init: KernelInits = KERNEL_INITS["reference"]
  dtype: str = "float32"  # computation dtype; parameters stay float32
  conv: Callable = lax.conv_general_dilated  # a value of CONV_GRADS
  kernel_size: tuple[int, ...] = (3, 3)
  strides: int | tuple[int, ...] = 1
  dilation: int = 1
  use_bias: bool = False
  transpose: bool = False
  mirror: bool = False  # pad by mirroring the border (see `mirror_pad`), not with zeros

  @nn.compact
  def __call__(self, x, modality):
    inits = self.kernel_init
    dtype = jnp.dtype(self.dtype)
    padding = "SAME"
    if self.mirror:
      if self.transpose or _tuple(self.strides, x) != (1,) * (x.ndim - 2):
        raise ValueError("mirror padding is for stride-1 convolutions, not strided or transposed")
      x = mirror_pad(x, _same_pads(self.kernel_size, self.dilation))
      padding = _mirror_conv_padding((*self.kernel_size, x.shape[-1], self.features))

    def make(name):
      if self.transpose:
        return nn.ConvTranspose(
          self.features,
          self.kernel_size,
          strides=_tuple(self.strides, x),
          padding="SAME",
          use_bias=self.use_bias,
          kernel_init=inits.transpose,
          dtype=dtype,
          param_dtype=jnp.float32,
          name=name,
        )
      return nn.Conv(
        self.features,
        self.kernel_size,
        strides=self.strides,
        padding=padding,
        kernel_dilation=self.dilation,
        use_bias=self.use_bias,
        kernel_init=inits.conv,
        dtype=dtype,
        param_dtype=jnp.float32,
        conv_general_dilated=self.conv,
        name=name,
      )

    y = self._route(make, x, modality)
    return crop(y, padding) if self.mirror and padding != "VALID" else y


class Dropout(nn.Module):
  """Inverted dropout (kept values scaled by 1 / keep) whose keep decisions take as few
  random bits as the keep probability needs, many from every 32-bit word drawn, where
  `nn.Dropout` draws a 32-bit uniform per value.  Drawing the words is most of dropout's cost
  on a CPU (threefry): 16 x 128 x 128 x 16 values took 50 ms one way and 6 ms with 8 bits a
  decision, and dropout was about a tenth of the 2D network's train step.  The reference's
  keep 0.75 = 3/4 takes 2 bits (16 decisions a word); a keep probability that is a multiple
  of 1/2^n, n <= 16, is kept exactly with n bits; another is rounded to the nearest multiple
  of 1/65536."""

  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = keep_mask(self.make_rng("dropout"), x.shape, keep)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


def keep_mask(rng, shape, keep: float) -> jax.Array:
  """Booleans, each True with probability `keep` (see `Dropout`), from packed random bits:
  n-bit fields of 32-bit words, each compared with keep x 2^n."""
  bits = next((n for n in (1, 2, 4, 8, 16) if float(keep * 2**n).is_integer()), 16)
  per_word = 32 // bits
  count = math.prod(shape)
  words = jax.random.bits(rng, (-(-count // per_word), 1), jnp.uint32)
  shifts = jnp.arange(0, 32, bits, dtype=jnp.uint32)
  fields = (words >> shifts) & jnp.uint32(2**bits - 1)
  return (fields < round(keep * 2**bits)).reshape(-1)[:count].reshape(shape)


class ModalityNorm(_PerModality):
  """Batch normalization with scale, offset and running statistics per modality (or shared).

  The formulas, variables and running-average updates are `nn.BatchNorm`'s (momentum 0.9,
  epsilon 1e-3, the variance as E[x^2] - E[x]^2, statistics in float32), computed on a
  [modality part, values, features] view of the batch, so that every part is normalised
  with its own statistics in one pass.  Splitting the batch, normalising each part and
  concatenating them again, as `_route` does for convolutions, made XLA:CPU copy every
  part and the concatenation: at the 2D network's 2560-feature layer those copies cost
  about as much as the normalisation, and the train step at width 4 ran 4-5 % slower.
  """

  @nn.compact
  def __call__(self, x, modality, train: bool):
    groups = self._groups(modality)
    branches = {
      name: _BatchNormVariables(x.shape[-1], name=name)() for name in self._branch_names()
    }
    if self.shared:
      variables, parts = [branches["shared"]], x.reshape(1, -1, x.shape[-1])
    else:
      variables, parts = [branches[m] for m in groups], x.reshape(len(groups), -1, x.shape[-1])
    parts = parts.astype(jnp.float32)
    if train:
      mean = parts.mean(axis=1)
      var = jnp.maximum(0.0, jnp.square(parts).mean(axis=1) - jnp.square(mean))
      if not self.is_initializing():
        # A modality that is several parts of the batch updates its statistics once per part.
        for (_, _, ra_mean, ra_var), m, v in zip(variables, mean, var):
          ra_mean.value = BN_MOMENTUM * ra_mean.value + (1 - BN_MOMENTUM) * m
          ra_var.value = BN_MOMENTUM * ra_var.value + (1 - BN_MOMENTUM) * v
    else:
      mean, var = (jnp.stack([v[i].value for v in variables]) for i in (2, 3))
    scale, bias = (jnp.stack([v[i] for v in variables]) for i in (0, 1))
    mul = lax.rsqrt(var + BN_EPSILON) * scale
    return ((parts - mean[:, None]) * mul[:, None] + bias[:, None]).reshape(x.shape)


class _BatchNormVariables(nn.Module):
  """`nn.BatchNorm`'s variables (names, shapes, initial values): checkpoints keep its layout."""

  features: int

  @nn.compact
  def __call__(self):
    shape = (self.features,)
    scale = self.param("scale", nn.initializers.ones, shape, jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, shape, jnp.float32)
    mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(shape, jnp.float32))
    var = self.variable("batch_stats", "var", lambda: jnp.ones(shape, jnp.float32))
    return scale, bias, mean, var


def _mirror_conv_padding(kernel_shape):
  """The padding a mirror-padded convolution with this kernel (spatial..., in, out) takes:
  'VALID' (the mirrored input already holds every tap's input) where the layer is wide
  (`conv_grads.is_wide`: the 2D network's 3x3 128 -> 2560 before the depth-to-space), else one
  zero at the end of each axis, whose one reached output `crop` removes.  XLA:CPU's
  convolution (YNNPACK, jax 0.10) takes a slow path for some unpadded convolutions with
  few outputs: the 5x5 40 -> 5 head ran 6-8x slower forward, 2.5-3x forward and backward,
  'VALID' than with any padding.  The wide layer is 5-15 % faster 'VALID', and its matmul
  gradients (`conv_grads='cpu_matmul'`) then cover 16 x 16 outputs rather than 17 x 17
  (`benchmarks.mirror_conv`).  Both forms give the same sums, to float32 rounding."""
  if conv_grads.is_wide(kernel_shape):
    return "VALID"
  return ((0, 1),) * (len(kernel_shape) - 2)


def _tuple(strides, x):
  if isinstance(strides, int):
    return (strides,) * (x.ndim - 2)
  return tuple(strides)


def _same_pads(kernel_size, dilation: int) -> tuple[tuple[int, int], ...]:
  """The (low, high) padding per spatial axis that keeps the size, split as 'SAME' splits it."""
  totals = [dilation * (k - 1) for k in kernel_size]
  return tuple((t // 2, t - t // 2) for t in totals)


def mirror_pad(x, pads):
  """Pads the spatial axes of [B, *spatial, C] by mirroring, the border value included
  (TensorFlow's and numpy's 'symmetric': 1 2 3 -> 2 1 | 1 2 3 | 3 2), with (low, high) per
  axis.  The reference pads its last two 2D convolutions this way, so the logits at the
  image border come from mirrored features rather than from zeros.  Built from split, flip
  and concatenate, which `ukd.serve.onnx_graph` translates."""
  for axis, (low, high) in enumerate(pads, start=1):
    size = x.shape[axis]
    if max(low, high) > size:
      raise ValueError(f"cannot mirror-pad {max(low, high)} pixels of an axis of {size}")
    first = jnp.split(x, [low], axis=axis)[0]
    last = jnp.split(x, [size - high], axis=axis)[1]
    x = jnp.concatenate([jnp.flip(first, axis), x, jnp.flip(last, axis)], axis=axis)
  return x


def crop(x, pads):
  """Removes (low, high) pixels per spatial axis of [B, *spatial, C]: the outputs that a
  convolution's zero padding reached.  Built from split, which `ukd.serve.onnx_graph`
  translates into one ONNX Split."""
  for axis, (low, high) in enumerate(pads, start=1):
    x = jnp.split(x, [low, x.shape[axis] - high], axis=axis)[1]
  return x


def pad_channels(x, features: int):
  """Zero-pads the channel axis: the parameter-free shortcut used where the width grows."""
  extra = features - x.shape[-1]
  if extra < 0:
    raise ValueError(f"cannot pad {x.shape[-1]} channels down to {features}")
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])
