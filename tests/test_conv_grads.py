"""`config.model.conv_grads`: 'cpu_matmul' gives XLA's convolution gradients (and, for a
wide layer, its forward pass), computed as matmuls on CPU (`ukd.models.conv_grads`); 'xla'
leaves every convolution XLA's own."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config
from jax import lax

from ukd import models
from ukd.models import conv_grads as mcg
from ukd.models import layers


def _grads(conv_fn, x, w, dilation, padding):
  dn = mcg._channels_last(x.ndim)
  ones = (1,) * (x.ndim - 2)

  def loss(x, w):
    y = conv_fn(x, w, ones, padding, rhs_dilation=dilation, dimension_numbers=dn)
    return jnp.sum(jnp.sin(y.astype(jnp.float32)))

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)


def _has_custom_vjp(fn, *args):
  return "custom_vjp_call" in str(jax.make_jaxpr(fn)(*args))


def _routed(x, w):
  """Whether the op gives this layer its own gradients."""
  ones = (1,) * (x.ndim - 2)
  dn = mcg._channels_last(x.ndim)
  return _has_custom_vjp(
    lambda x, w: mcg.conv_general_dilated(x, w, ones, "SAME", dimension_numbers=dn), x, w
  )


@pytest.mark.parametrize(
  "spatial, kernel, cin, cout, dilation, padding",
  [
    ((8, 8), (3, 3), 4, 64, 1, "SAME"),  # wide: like the 2D network's conv before depth-to-space
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
def test_matmul_gradients_match_xla(spatial, kernel, cin, cout, dilation, padding):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (3, *spatial, cin))
  w = jax.random.normal(kw, (*kernel, cin, cout))
  assert _routed(x, w)
  dilation = (dilation,) * len(spatial)
  value, (dx, dw) = _grads(mcg.conv_general_dilated, x, w, dilation, padding)
  ref_value, (ref_dx, ref_dw) = _grads(lax.conv_general_dilated, x, w, dilation, padding)
  if cout >= np.prod(kernel) * cin:  # wide: the forward pass is a matmul too
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    y = mcg.conv_general_dilated(
      x,
      w,
      (1,) * len(spatial),
      padding,
      rhs_dilation=dilation,
      dimension_numbers=mcg._channels_last(x.ndim),
    )
    ref_y = lax.conv_general_dilated(
      x,
      w,
      (1,) * len(spatial),
      padding,
      rhs_dilation=dilation,
      dimension_numbers=mcg._channels_last(x.ndim),
    )
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref_y))))
  else:
    assert value == ref_value  # the forward pass is XLA's convolution itself
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref_dx))))
  np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref_dw))))


def test_bfloat16_gradients_keep_dtypes():
  kx, kw = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (2, 8, 8, 4), jnp.bfloat16)
  w = jax.random.normal(kw, (3, 3, 4, 64), jnp.bfloat16)
  _, (dx, dw) = _grads(mcg.conv_general_dilated, x, w, (1, 1), "SAME")
  _, (ref_dx, ref_dw) = _grads(lax.conv_general_dilated, x, w, (1, 1), "SAME")
  assert dx.dtype == dw.dtype == jnp.bfloat16
  for got, ref in ((dx, ref_dx), (dw, ref_dw)):
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


def test_only_wide_and_narrow_stride_1_convs_are_routed():
  x = jnp.ones((2, 8, 8, 8))
  assert not _routed(x, jnp.ones((3, 3, 8, 8)))  # 72 patch values > 8 features
  assert _routed(x, jnp.ones((3, 3, 8, 72)))
  assert _routed(x, jnp.ones((3, 3, 8, 3)))  # 9 taps x 3 <= 4 x 8
  strided = lambda x, w: mcg.conv_general_dilated(
    x, w, (2, 2), "SAME", dimension_numbers=mcg._channels_last(4)
  )
  w = jnp.ones((3, 3, 8, 72))
  assert not _has_custom_vjp(strided, x, w)
  assert strided(x, w).shape == (2, 4, 4, 72)


def test_narrow_kernel_gradient_is_the_same_in_chunks_of_samples():
  kx, kg = jax.random.split(jax.random.key(2))
  x = jax.random.normal(kx, (4, 10, 10, 12))
  g = jax.random.normal(kg, (4, 10, 10, 3))
  w = jnp.zeros((3, 3, 12, 3))
  pads = ((1, 1), (1, 1))
  whole = mcg._narrow_kernel_grad(x, w, g, (1, 1), pads)
  one_by_one = mcg._narrow_kernel_grad(x, w, g, (1, 1), pads, chunk_bytes=1)
  ref = jax.vjp(lambda w: mcg._conv(x, w, (1, 1), pads), w)[1](g)[0]
  np.testing.assert_allclose(whole, ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(one_by_one, ref, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- through the model field


@pytest.mark.parametrize(
  "kernel, cin, cout",
  [((3, 3), 4, 64), ((5, 5), 20, 3)],  # wide: 36 <= 64; narrow: 25 x 3 <= 4 x 20
)
def test_modality_conv_cpu_matmul_gradients_equal_xla(kernel, cin, cout):
  x = jax.random.normal(jax.random.key(3), (4, 8, 8, cin))

  def grads(conv_grads):
    conv = layers.ModalityConv(
      ("ct", "mr"), True, features=cout, kernel_size=kernel, conv=layers.CONV_GRADS[conv_grads]
    )
    params = conv.init(jax.random.key(4), x, "ct")["params"]
    loss = lambda p, x: jnp.sum(jnp.sin(100.0 * conv.apply({"params": p}, x, ("ct", "mr"))))
    return _has_custom_vjp(loss, params, x), jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

  routed, (dp, dx) = grads("cpu_matmul")
  plain, (ref_dp, ref_dx) = grads("xla")
  assert routed and not plain
  dw, ref_dw = dp["shared"]["kernel"], ref_dp["shared"]["kernel"]
  assert float(jnp.max(jnp.abs(ref_dw))) > 0
  np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref_dw))))
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref_dx))))


@pytest.mark.parametrize("conv_grads", ["xla", "cpu_matmul"])
def test_network_has_custom_gradients_only_with_cpu_matmul(conv_grads):
  config = tiny_config()
  # 64 x 3 x 3 = 576 classes x 64 depth-to-space channels: a wide layer before the head.
  config.model.upsample_mult = 3
  config.model.conv_grads = conv_grads
  model = models.build(config.model, config.modalities)
  variables = models.init_variables(model, config.model, (16, 16), jax.random.key(0))
  x = jnp.ones((2, 16, 16, 3))

  def loss(params):
    logits, _ = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      x,
      ("ct", "mr"),
      train=True,
      mutable=["batch_stats"],
    )
    return jnp.sum(logits)

  assert _has_custom_vjp(loss, variables["params"]) == (conv_grads == "cpu_matmul")
