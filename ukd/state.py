"""Train state, optimizer, device mesh and shardings.

Data parallelism is a sharded `jax.jit`: one 1-D mesh axis 'data' over every
device, the batch split along it, parameters and statistics replicated.  XLA
then computes batch-norm statistics and the KD class averages over the GLOBAL
batch with no axis names, and the result equals a single-device step.
"""

from typing import Any

import flax.struct
import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from ukd import models
from ukd.errors import ConfigError

DATA_AXIS = "data"


class TrainState(flax.struct.PyTreeNode):
  """Everything a step changes; a plain pytree, so Orbax saves and restores it whole."""

  step: jax.Array
  params: Any
  batch_stats: Any  # one entry per modality for per-modality norms, one for shared ones
  opt_state: Any
  rng: jax.Array  # base key; each step derives its dropout keys from (rng, step)


def learning_rate(config):
  """Adam's step size: `lr` multiplied by `decay_rate` every `decay_steps` steps (staircase)."""
  return optax.exponential_decay(
    config.optim.lr,
    transition_steps=config.optim.decay_steps,
    decay_rate=config.optim.decay_rate,
    staircase=True,
  )


def make_optimizer(config):
  return optax.adam(learning_rate(config), eps=config.optim.eps)


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
      opt_state=make_optimizer(config).init(params),
      rng=state_rng,
    )

  if mesh is None:
    return build(rng)
  key_data = np.asarray(jax.random.key_data(rng))  # a constant, the same in every process
  make = jax.jit(lambda: build(jax.random.wrap_key_data(key_data)), out_shardings=replicated(mesh))
  return make()


def make_mesh(devices=None):
  devices = list(devices if devices is not None else jax.devices())
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh):
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh):
  n = mesh.shape[DATA_AXIS]
  if batch_size % n:
    raise ConfigError(
      f"config.batch_size={batch_size} (per modality) must be divisible by "
      f"the {n} devices of the data mesh"
    )


def to_global_batch(batch, mesh):
  """Assembles each process's slice of the batch into arrays sharded over the 'data' axis."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
  )
