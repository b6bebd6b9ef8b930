"""`lax.conv_general_dilated` for `nn.Conv`, with matmul gradients on CPU where XLA's are slow.

XLA:CPU differentiates a convolution into two more convolutions (input and kernel
gradients), and two shapes of layer get slow ones:

- wide: more output features than im2col patch values (taps x input features), like the
  2D network's 128 -> 2560 convolution before depth-to-space at width 4 (over half of a
  train step's FLOPs), whose two gradient convolutions run at 60-75% of the CPU's matmul
  rate.  Both are computed as matmuls instead, at the matmul rate, and so is the forward
  pass, which XLA's convolution ran at about 80% of it (the eval forward at width 4 is
  about 8 % faster this way):
    y  = patches(x) W           (patches: the im2col matrix, no bigger than the output)
    dW = patches(x)^T g
    dx = col2im(g W^T)          (each tap's slice of g W^T added back at its offset)
- narrow: few output features (taps x output features <= 4 x input features), like the
  2D network's 5x5 40 -> 5 head, whose kernel gradient XLA runs as a convolution with an
  image-sized window at ~15% of the matmul rate, after transposing the input.  dW is
  computed as one matmul per few samples against the gradient shifted by each tap,
    dW^T = [g shifted by tap 1; g shifted by tap 2; ...] x
  a few samples at a time so that the shifted copies stay in cache; dx stays XLA's.

Other layers' forward pass stays XLA's convolution; a wide layer's and the gradients
differ from XLA's only in summation order (float rounding).  On GPU and TPU everything
stays XLA's own (`lax.platform_dependent`): cuDNN and the TPU compiler have their own
convolutions and gradients, not measured against this.

A routed convolution is a `jax.custom_vjp` on every platform, so it has no forward-mode
derivative (`jax.jvp`, `jax.jacfwd`): that is why the networks use it only when built
with `conv_grads='cpu_matmul'`.  XLA's cost analysis counts the im2col matmuls'
multiplications by padding zeros, which its convolutions skip: to count a step's FLOPs
the way the model defines them, trace it with `conv_grads='xla'`.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


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

  Routes a stride-1, ungrouped, channels-last convolution that is wide or narrow (see
  the module docstring) to `_custom_grad_conv`; everything else to XLA unchanged.
  """
  spatial = lhs.ndim - 2
  ones = (1,) * spatial
  dilation = tuple(rhs_dilation or ones)
  taps, cin, cout = math.prod(rhs.shape[:-2]), rhs.shape[-2], rhs.shape[-1]
  kind = "wide" if is_wide(rhs.shape) else "narrow" if taps * cout <= 4 * cin else None
  plain = (
    tuple(window_strides) == ones
    and tuple(lhs_dilation or ones) == ones
    and feature_group_count == 1
    and precision is None
    and dimension_numbers == _channels_last(lhs.ndim)
  )
  if not (plain and kind):
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
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _custom_grad_conv(lhs, rhs, kind, dilation, pads)


def is_wide(kernel_shape) -> bool:
  """Whether a convolution with this kernel (spatial..., in, out) is wide: at least as many
  output features as im2col patch values (taps x input features)."""
  return math.prod(kernel_shape[:-2]) * kernel_shape[-2] <= kernel_shape[-1]


def _conv(x, w, dilation, pads):
  ones = (1,) * (x.ndim - 2)
  return lax.conv_general_dilated(
    x, w, ones, pads, rhs_dilation=dilation, dimension_numbers=_channels_last(x.ndim)
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _custom_grad_conv(x, w, kind, dilation, pads):
  if kind != "wide":
    return _conv(x, w, dilation, pads)

  def wide(x, w):
    patches, out_shape = _patches(x, w.shape, dilation, pads)
    y = jnp.dot(patches, w.reshape(-1, w.shape[-1]), preferred_element_type=jnp.float32)
    return y.reshape(x.shape[0], *out_shape, w.shape[-1]).astype(x.dtype)

  return lax.platform_dependent(x, w, cpu=wide, default=lambda x, w: _conv(x, w, dilation, pads))


def _custom_grad_conv_fwd(x, w, kind, dilation, pads):
  return _custom_grad_conv(x, w, kind, dilation, pads), (x, w)


def _custom_grad_conv_bwd(kind, dilation, pads, residuals, g):
  x, w = residuals

  def xla(x, w, g):
    return jax.vjp(lambda x, w: _conv(x, w, dilation, pads), x, w)[1](g)

  def wide(x, w, g):
    return _wide_grads(x, w, g, dilation, pads)

  def narrow(x, w, g):
    dx = jax.vjp(lambda x: _conv(x, w, dilation, pads), x)[1](g)[0]
    return dx, _narrow_kernel_grad(x, w, g, dilation, pads)

  return lax.platform_dependent(x, w, g, cpu=wide if kind == "wide" else narrow, default=xla)


def _patches(x, kernel_shape, dilation, pads):
  """(patches, output spatial shape): the im2col matrix of `_conv`, [outputs, taps x input
  features], each row the inputs one output position sees, tap after tap."""
  taps = list(np.ndindex(*kernel_shape[:-2]))
  padded = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  reach = [(k - 1) * d for k, d in zip(kernel_shape[:-2], dilation)]
  out_shape = tuple(p - r for p, r in zip(padded.shape[1:-1], reach))

  def window(tap):  # the input each output position sees through one kernel tap
    return (slice(None), *(slice(t * d, t * d + n) for t, d, n in zip(tap, dilation, out_shape)))

  patches = jnp.concatenate([padded[window(tap)] for tap in taps], axis=-1)
  return patches.reshape(-1, len(taps) * kernel_shape[-2]), out_shape


def _wide_grads(x, w, g, dilation, pads):
  """(dx, dW) of `_conv` as two matmuls; products accumulate in float32 (as XLA's do)."""
  taps = list(np.ndindex(*w.shape[:-2]))
  cin, cout = w.shape[-2:]
  out_shape = g.shape[1:-1]
  patches, _ = _patches(x, w.shape, dilation, pads)
  padded_shape = [n + lo + hi for n, (lo, hi) in zip(x.shape[1:-1], pads)]
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
        *((t * d, p - t * d - n) for t, d, p, n in zip(tap, dilation, padded_shape, out_shape)),
        (0, 0),
      ),
    )
    for i, tap in enumerate(taps)
  )
  inner = tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, x.shape[1:-1]))
  dx = dpadded[(slice(None), *inner)]
  return dx.astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


def _narrow_kernel_grad(x, w, g, dilation, pads, chunk_bytes=16 * 2**20):
  """dW of `_conv` as [g shifted by each tap] x, over chunks of samples (float32 sums).

  dW[tap] = sum_q g[q + low_pad - tap * dilation] x[q] over the input positions q (g zero
  outside): each tap's term is a shifted copy of g the size of x.  g is laid out features
  first, so that every shifted copy is whole rows of the image: copies of image rows rather
  than of a few features at a time, which took XLA:CPU 3 ms a 132 x 132 sample at the 2D
  network's head.  A chunk is as many samples as keep their shifted copies within
  `chunk_bytes` (one at least), so that they are still in cache when the matmul reads them.
  """
  taps = list(np.ndindex(*w.shape[:-2]))
  cin, cout = w.shape[-2:]
  size, out_shape = x.shape[1:-1], g.shape[1:-1]
  reach = [(k - 1) * d for k, d in zip(w.shape[:-2], dilation)]
  widths = [(r, max(0, lo + n - m)) for r, (lo, _), n, m in zip(reach, pads, size, out_shape)]
  per_sample = math.prod(size) * len(taps) * cout * 4
  batch = x.shape[0]
  chunk = max(
    [c for c in range(1, batch + 1) if batch % c == 0 and c * per_sample <= chunk_bytes] or [1]
  )

  def one_chunk(xg):
    xc, gc = xg
    gp = jnp.pad(jnp.moveaxis(gc, -1, 0), ((0, 0), (0, 0), *widths))  # [cout, samples, ...]

    def shifted(tap):  # g[q + low_pad - tap * dilation] for every input position q
      starts = [r + lo - t * d for r, (lo, _), t, d in zip(reach, pads, tap, dilation)]
      return gp[(slice(None), slice(None), *(slice(b, b + n) for b, n in zip(starts, size)))]

    lhs = jnp.stack([shifted(tap) for tap in taps]).reshape(len(taps) * cout, -1)
    return jnp.dot(lhs, xc.reshape(-1, cin), preferred_element_type=jnp.float32)

  chunks = (
    x.reshape(batch // chunk, chunk, *x.shape[1:]),
    g.reshape(batch // chunk, chunk, *g.shape[1:]),
  )
  dw = lax.map(one_chunk, chunks).sum(axis=0)  # [taps * cout, cin]
  dw = dw.reshape(len(taps), cout, cin).transpose(0, 2, 1).reshape(w.shape)
  return dw.astype(w.dtype)


_custom_grad_conv.defvjp(_custom_grad_conv_fwd, _custom_grad_conv_bwd)
