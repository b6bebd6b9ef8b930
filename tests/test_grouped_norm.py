"""A per-modality ModalityNorm trained on a mixed batch equals one nn.BatchNorm per part."""

import jax
import jax.numpy as jnp
import numpy as np

from ukd.models import layers


def _apply(norm, variables, x, modality):
  """Output, updated statistics and parameter gradients of sum(norm(x) * weights)."""
  weights = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)

  def loss(params):
    y, updates = norm.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      x,
      modality,
      True,
      mutable=["batch_stats"],
    )
    return jnp.sum(y * weights), (y, updates["batch_stats"])

  (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  return y, stats, grads


def test_mixed_batch_matches_one_batch_norm_per_modality():
  norm = layers.ModalityNorm(("ct", "mr"), shared=False)
  x = jax.random.normal(jax.random.key(0), (6, 5, 4, 8)) * 3.0 + 1.0
  variables = norm.init(jax.random.key(1), x, "ct", False)
  noise = jax.random.key(2)
  variables = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(noise, v.shape), variables)

  y, stats, grads = _apply(norm, variables, x, ("ct", "mr"))  # the grouped path
  for i, m in enumerate(("ct", "mr")):  # one modality at a time: nn.BatchNorm itself
    part = slice(3 * i, 3 * (i + 1))
    y_m, stats_m, _ = _apply(norm, variables, x[part], m)
    np.testing.assert_allclose(y[part], y_m, rtol=1e-5, atol=1e-5)
    for name in ("mean", "var"):
      np.testing.assert_allclose(stats[m][name], stats_m[m][name], rtol=1e-5, atol=1e-6)
    assert jax.tree.structure(stats) == jax.tree.structure(variables["batch_stats"])

  def reference(params):  # the split -> per-part norm -> concatenate formulation
    def per_part(i, m):
      out, _ = norm.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        x[3 * i : 3 * (i + 1)],
        m,
        True,
        mutable=["batch_stats"],
      )
      return out

    y = jnp.concatenate([per_part(0, "ct"), per_part(1, "mr")])
    weights = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)
    return jnp.sum(y * weights)

  ref_grads = jax.jit(jax.grad(reference))(variables["params"])
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, ref_grads
  )


def test_shared_norm_and_evaluation_keep_nn_batch_norm():
  x = jnp.ones((4, 2, 2, 3))
  shared = layers.ModalityNorm(("ct", "mr"), shared=True)
  variables = shared.init(jax.random.key(0), x, "ct", False)
  assert set(variables["params"]) == {"shared"}
  per_modality = layers.ModalityNorm(("ct", "mr"), shared=False)
  variables = per_modality.init(jax.random.key(0), x, "ct", False)
  y = per_modality.apply(variables, x, ("ct", "mr"), False)  # running statistics
  assert y.shape == x.shape
