"""`ukd.models.conv`: the same convolution gradients as XLA's, computed as matmuls on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ukd.models import conv


def _grads(conv_fn, x, w, dilation, padding):
  dn = conv._channels_last(x.ndim)
  ones = (1,) * (x.ndim - 2)

  def loss(x, w):
    y = conv_fn(x, w, ones, padding, rhs_dilation=dilation, dimension_numbers=dn)
    return jnp.sum(jnp.sin(y.astype(jnp.float32)))

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)


def _uses_matmul_grads(x, w):
  jaxpr = jax.make_jaxpr(
    lambda x, w: conv.conv_general_dilated(
      x, w, (1,) * (x.ndim - 2), "SAME", dimension_numbers=conv._channels_last(x.ndim)
    )
  )(x, w)
  return "custom_vjp_call" in str(jaxpr)


@pytest.mark.parametrize(
  "spatial, kernel, cin, cout, dilation, padding",
  [
    ((8, 8), (3, 3), 4, 64, 1, "SAME"),  # like the 2D network's conv before depth-to-space
    ((8, 8), (3, 3), 4, 64, 2, "SAME"),
    ((6, 7), (5, 3), 2, 40, 1, "SAME"),
    ((8, 8), (3, 3), 4, 64, 1, "VALID"),
    ((4, 4, 4), (3, 3, 3), 2, 64, 1, "SAME"),
    ((8, 8), (1, 1), 8, 8, 1, "SAME"),
    ((16, 12), (5, 5), 40, 5, 1, "SAME"),  # narrow: like the 2D network's head
    ((16, 12), (3, 3), 40, 5, 2, "SAME"),
    ((6, 6, 4), (1, 1, 1), 16, 5, 1, "SAME"),
    ((9, 8), (4, 2), 40, 5, 1, "SAME"),  # uneven padding
    ((12, 12), (5, 5), 40, 5, 1, "VALID"),
  ],
)
def test_custom_gradients_match_xla(spatial, kernel, cin, cout, dilation, padding):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (3, *spatial, cin))
  w = jax.random.normal(kw, (*kernel, cin, cout))
  assert _uses_matmul_grads(x, w)
  dilation = (dilation,) * len(spatial)
  value, (dx, dw) = _grads(conv.conv_general_dilated, x, w, dilation, padding)
  ref_value, (ref_dx, ref_dw) = _grads(lax.conv_general_dilated, x, w, dilation, padding)
  assert value == ref_value  # the forward pass is XLA's convolution itself
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref_dx))))
  np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref_dw))))


def test_bfloat16_gradients_keep_dtypes():
  kx, kw = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (2, 8, 8, 4), jnp.bfloat16)
  w = jax.random.normal(kw, (3, 3, 4, 64), jnp.bfloat16)
  _, (dx, dw) = _grads(conv.conv_general_dilated, x, w, (1, 1), "SAME")
  _, (ref_dx, ref_dw) = _grads(lax.conv_general_dilated, x, w, (1, 1), "SAME")
  assert dx.dtype == dw.dtype == jnp.bfloat16
  for got, ref in ((dx, ref_dx), (dw, ref_dw)):
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


def test_other_convs_and_xla_gradients_context_stay_xla():
  x = jnp.ones((2, 8, 8, 8))
  assert not _uses_matmul_grads(x, jnp.ones((3, 3, 8, 8)))  # 72 patch values > 8 features
  assert _uses_matmul_grads(x, jnp.ones((3, 3, 8, 72)))
  assert _uses_matmul_grads(x, jnp.ones((3, 3, 8, 3)))  # 9 taps x 3 <= 4 x 8
  with conv.xla_gradients():
    assert not _uses_matmul_grads(x, jnp.ones((3, 3, 8, 72)))
  strided = conv.conv_general_dilated(
    x, jnp.ones((3, 3, 8, 72)), (2, 2), "SAME", dimension_numbers=conv._channels_last(4)
  )
  assert strided.shape == (2, 4, 4, 72)


def test_narrow_kernel_gradient_is_the_same_in_chunks_of_samples():
  kx, kg = jax.random.split(jax.random.key(2))
  x = jax.random.normal(kx, (4, 10, 10, 12))
  g = jax.random.normal(kg, (4, 10, 10, 3))
  w = jnp.zeros((3, 3, 12, 3))
  pads = ((1, 1), (1, 1))
  whole = conv._narrow_kernel_grad(x, w, g, (1, 1), pads)
  one_by_one = conv._narrow_kernel_grad(x, w, g, (1, 1), pads, chunk_bytes=1)
  ref = jax.vjp(lambda w: conv._conv(x, w, (1, 1), pads), w)[1](g)[0]
  np.testing.assert_allclose(whole, ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(one_by_one, ref, rtol=1e-5, atol=1e-4)
