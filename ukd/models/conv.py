"""`lax.conv_general_dilated` for `nn.Conv`, with matmul gradients for wide convolutions on CPU.

XLA:CPU differentiates a convolution into two more convolutions (input and kernel
gradients).  For a wide layer, one whose output has more features than its im2col
patch (taps x input features), those run at 60-75% of the CPU's matmul rate; the 2D
network's 128 -> 2560 convolution before depth-to-space is such a layer and does a
third of a train step's FLOPs.  For these layers the same sums are computed here as
two matmuls, at the matmul rate:

  dW = patches(x)^T g           (patches: the im2col matrix, no bigger than the output)
  dx = col2im(g W^T)            (each tap's slice of g W^T added back at its offset)

The forward pass stays XLA's convolution, so inference and the loss are bit-for-bit
unchanged; only the gradients' summation order differs (float rounding).  On GPU and
TPU the gradients stay XLA's own (`lax.platform_dependent`): cuDNN and the TPU
compiler have their own convolution gradients, not measured against this.

XLA's cost analysis counts the im2col matmuls' multiplications by padding zeros, which
its convolutions skip: `xla_gradients()` traces the plain XLA formulation, e.g. to
count a step's FLOPs the way the model defines them.
"""

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_MATMUL_GRADIENTS = [True]


@contextlib.contextmanager
def xla_gradients():
  """Within this context, tracing keeps every convolution's gradients XLA's own."""
  _MATMUL_GRADIENTS.append(False)
  try:
    yield
  finally:
    _MATMUL_GRADIENTS.pop()


def _channels_last(ndim: int) -> lax.ConvDimensionNumbers:
  """Flax's layout: NH..WC inputs and outputs, H..WIO kernels."""
  spatial = tuple(range(1, ndim - 1))
  return lax.ConvDimensionNumbers(
    (0, ndim - 1, *spatial), (ndim - 1, ndim - 2, *range(ndim - 2)), (0, ndim - 1, *spatial)
  )


def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  precision=None,
):
  """Drop-in for `lax.conv_general_dilated` (the arguments `nn.Conv` passes).

  Routes a stride-1, ungrouped, channels-last convolution whose taps x input features
  are at most its output features to `_wide_conv`; everything else to XLA unchanged.
  """
  spatial = lhs.ndim - 2
  ones = (1,) * spatial
  dilation = tuple(rhs_dilation or ones)
  wide = (
    _MATMUL_GRADIENTS[-1]
    and tuple(window_strides) == ones
    and tuple(lhs_dilation or ones) == ones
    and feature_group_count == 1
    and precision is None
    and dimension_numbers == _channels_last(lhs.ndim)
    and math.prod(rhs.shape[:-1]) <= rhs.shape[-1]
  )
  if not wide:
    return lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      precision=precision,
    )
  if isinstance(padding, str):
    window = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:-2], dilation)]
    padding = lax.padtype_to_pads(lhs.shape[1:-1], window, ones, padding)
  return _wide_conv(lhs, rhs, dilation, tuple((int(lo), int(hi)) for lo, hi in padding))


def _conv(x, w, dilation, pads):
  ones = (1,) * (x.ndim - 2)
  return lax.conv_general_dilated(
    x, w, ones, pads, rhs_dilation=dilation, dimension_numbers=_channels_last(x.ndim)
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _wide_conv(x, w, dilation, pads):
  return _conv(x, w, dilation, pads)


def _wide_conv_fwd(x, w, dilation, pads):
  return _conv(x, w, dilation, pads), (x, w)


def _wide_conv_bwd(dilation, pads, residuals, g):
  x, w = residuals

  def xla(x, w, g):
    return jax.vjp(lambda x, w: _conv(x, w, dilation, pads), x, w)[1](g)

  def matmuls(x, w, g):
    return _matmul_grads(x, w, g, dilation, pads)

  return lax.platform_dependent(x, w, g, cpu=matmuls, default=xla)


def _matmul_grads(x, w, g, dilation, pads):
  """(dx, dW) of `_conv` as two matmuls; products accumulate in float32 (as XLA's do)."""
  taps = list(np.ndindex(*w.shape[:-2]))
  cin, cout = w.shape[-2:]
  out_shape = g.shape[1:-1]
  padded = jnp.pad(x, ((0, 0), *pads, (0, 0)))

  def window(tap):  # the input each output position sees through one kernel tap
    return (slice(None), *(slice(t * d, t * d + n) for t, d, n in zip(tap, dilation, out_shape)))

  patches = jnp.concatenate([padded[window(tap)] for tap in taps], axis=-1)
  patches = patches.reshape(-1, len(taps) * cin)
  g2 = g.reshape(-1, cout)
  dw = jnp.dot(patches.T, g2, preferred_element_type=jnp.float32)
  cols = jnp.dot(g2, w.reshape(-1, cout).T, preferred_element_type=jnp.float32)
  cols = cols.reshape(*g.shape[:-1], len(taps), cin)
  # col2im as a sum of zero-padded slices: XLA fuses it into one loop, unlike scatter-adds.
  dpadded = sum(
    jnp.pad(
      cols[..., i, :],
      (
        (0, 0),
        *(
          (t * d, p - t * d - n) for t, d, p, n in zip(tap, dilation, padded.shape[1:-1], out_shape)
        ),
        (0, 0),
      ),
    )
    for i, tap in enumerate(taps)
  )
  inner = tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, x.shape[1:-1]))
  dx = dpadded[(slice(None), *inner)]
  return dx.astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


_wide_conv.defvjp(_wide_conv_fwd, _wide_conv_bwd)
