"""The train state: everything a train step changes, and how a run creates it.

The optimizer is `ukd.train.optimizer`'s; the mesh the state is replicated on is `ukd.runtime.mesh`'s.
"""

from typing import Any

import flax.struct
import jax

from ukd import models
from ukd.runtime import mesh as mesh_lib
from ukd.train import optimizer


class TrainState(flax.struct.PyTreeNode):
  """Everything a step changes; a plain pytree, so Orbax saves and restores it whole."""

  step: jax.Array
  params: Any
  batch_stats: Any  # one entry per modality for per-modality norms, one for shared ones
  opt_state: Any
  rng: jax.Array  # base key; each step derives its dropout keys from (rng, step)


def seed_key(seed: int) -> jax.Array:
  """The PRNG key of `seed`, made on the device by a jit with the seed as a constant: no
  implicit transfer of the Python int (the test suite runs with transfers guarded)."""
  return jax.jit(jax.random.key, static_argnums=0)(int(seed))


def create(config, model, spatial, rng, mesh=None) -> TrainState:
  """Initialises parameters (every modality's branches), statistics and optimizer state.

  With a mesh, the state is computed by a jit whose output is replicated on the mesh: the
  layout the train step returns, so the step compiles once rather than again on its second
  call. Every process computes the same values from the same key, which is how a mesh that
  spans several processes gets its replicas (a host's arrays cannot be put onto devices of
  other hosts).
  """

  def build(rng):
    init_rng, state_rng = jax.random.split(rng)
    variables = models.init_variables(model, config.model, spatial, init_rng)
    params = variables["params"]
    return TrainState(
      step=jax.numpy.zeros((), jax.numpy.int32),
      params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=optimizer.make_optimizer(config).init(params),
      rng=state_rng,
    )

  if mesh is None:
    return build(rng)
  key_data = jax.device_get(jax.random.key_data(rng))  # a constant, the same in every process
  make = jax.jit(
    lambda: build(jax.random.wrap_key_data(key_data)), out_shardings=mesh_lib.replicated(mesh)
  )
  return make()
