"""The mirror-padded convolution (`model.pad='reference'`) against its definition.

A wide layer convolves the mirrored input with padding 'VALID'; the others, for which
XLA:CPU's 'VALID' is slow, pad again with zeros and crop.  Both forms, and the layer's
gradients with each
`conv_grads`, are checked here against numpy's 'symmetric' pad (TensorFlow's SYMMETRIC,
the border value repeated) followed by a correlation computed tap by tap in float64.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ukd.models import layers

# (spatial size, kernel size, dilation, input features, output features).  The feature
# counts make `conv_grads='cpu_matmul'` route each layer to its matmul gradients: 'wide'
# (taps x inputs <= outputs) or 'narrow' (taps x outputs <= 4 x inputs).
CASES = {
  "2d 3x3 wide": ((5, 6), (3, 3), 1, 2, 24),
  "2d 5x5 narrow": ((6, 5), (5, 5), 1, 8, 1),
  "2d 3x3 dilation 2": ((7, 6), (3, 3), 2, 3, 4),
  "2d 4x4 uneven pads": ((5, 5), (4, 4), 1, 3, 2),
  "3d 3x3x3 wide": ((4, 3, 5), (3, 3, 3), 1, 2, 56),
  "3d 3x3x3 narrow": ((3, 5, 4), (3, 3, 3), 1, 8, 1),
}


def _case(name):
  spatial, kernel_size, dilation, cin, cout = CASES[name]
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, *spatial, cin)).astype(np.float32)
  kernel = rng.normal(size=(*kernel_size, cin, cout)).astype(np.float32)
  pads = layers._same_pads(kernel_size, dilation)
  return x, kernel, dilation, pads


def _numpy_conv(x, kernel, dilation, pads, mode):
  """np.pad in `mode`, then a 'VALID' correlation as a sum over taps (float64)."""
  padded = np.pad(x.astype(np.float64), ((0, 0), *pads, (0, 0)), mode=mode)
  spatial = x.shape[1:-1]
  out = np.zeros((x.shape[0], *spatial, kernel.shape[-1]))
  for tap in itertools.product(*(range(k) for k in kernel.shape[:-2])):
    window = tuple(slice(t * dilation, t * dilation + n) for t, n in zip(tap, spatial))
    out += padded[(slice(None), *window)] @ kernel[tap].astype(np.float64)
  return out


def _old_form(x, kernel, dilation, pads):
  """What the layer computed before: the symmetric-padded input convolved with 'VALID'."""
  padded = jnp.pad(x, ((0, 0), *pads, (0, 0)), mode="symmetric")
  axes = "HWD"[: x.ndim - 2]
  numbers = lax.conv_dimension_numbers(
    padded.shape, kernel.shape, (f"N{axes}C", f"{axes}IO", f"N{axes}C")
  )
  return lax.conv_general_dilated(
    padded,
    kernel,
    (1,) * len(axes),
    "VALID",
    rhs_dilation=(dilation,) * len(axes),
    dimension_numbers=numbers,
  )


def _layer(kernel, dilation, conv_grads="xla"):
  conv = layers.ModalityConv(
    ("ct", "mr"),
    True,
    features=kernel.shape[-1],
    kernel_size=kernel.shape[:-2],
    dilation=dilation,
    conv=layers.CONV_GRADS[conv_grads],
    mirror=True,
  )
  return lambda x, kernel: conv.apply({"params": {"shared": {"kernel": kernel}}}, x, "ct")


@pytest.mark.parametrize("name", sorted(CASES))
def test_mirror_conv_equals_the_old_valid_form_and_numpys_symmetric_pad(name):
  x, kernel, dilation, pads = _case(name)
  got = np.asarray(jax.jit(_layer(kernel, dilation))(x, kernel))
  old = np.asarray(_old_form(x, kernel, dilation, pads))
  want = _numpy_conv(x, kernel, dilation, pads, "symmetric")
  assert got.shape == old.shape == want.shape == (*x.shape[:-1], kernel.shape[-1])
  np.testing.assert_allclose(got, old, rtol=1e-6, atol=1e-5)  # float32 rounding
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(old, want, rtol=1e-5, atol=1e-5)
  # The inputs tell the padding modes apart: a border copied without its edge value
  # ('reflect', PyTorch's) or zeros would fail the comparisons above.
  for mode in ("reflect", "constant"):
    assert np.abs(_numpy_conv(x, kernel, dilation, pads, mode) - want).max() > 0.1


@pytest.mark.parametrize("conv_grads", sorted(layers.CONV_GRADS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_mirror_conv_gradients_equal_the_old_forms(name, conv_grads):
  x, kernel, dilation, pads = _case(name)
  cotangent = np.random.default_rng(1).normal(size=(*x.shape[:-1], kernel.shape[-1]))
  loss = lambda f: lambda x, kernel: jnp.sum(f(x, kernel) * cotangent)
  got = jax.jit(jax.grad(loss(_layer(kernel, dilation, conv_grads)), (0, 1)))(x, kernel)
  want = jax.grad(loss(lambda x, kernel: _old_form(x, kernel, dilation, pads)), (0, 1))(x, kernel)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-4)


def test_wide_layers_take_valid_and_the_others_pad_once_and_crop():
  # The 2D network's 3x3 128 -> 2560 at width 4, and its 5x5 40 -> 5 head.
  assert layers._mirror_conv_padding((3, 3, 128, 2560)) == "VALID"
  assert layers._mirror_conv_padding((5, 5, 40, 5)) == ((0, 1), (0, 1))
  assert layers._mirror_conv_padding((3, 3, 3, 2, 54)) == "VALID"
  assert layers._mirror_conv_padding((3, 3, 3, 2, 53)) == ((0, 1),) * 3
