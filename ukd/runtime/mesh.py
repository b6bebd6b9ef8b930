"""The device mesh and the shardings of data parallelism.

Data parallelism is a sharded `jax.jit`: one 1-D mesh axis 'data' over every device, the
batch split along it, parameters and statistics replicated.  XLA then computes batch-norm
statistics and the KD class averages over the GLOBAL batch with no axis names, and the result
equals a single-device step.
"""

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from ukd.errors import ConfigError, error

DATA_AXIS = "data"


def make_mesh(devices=None):
  """A 1-D 'data' mesh over `devices` (default: every device of every process)."""
  devices = list(devices if devices is not None else jax.devices())
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh):
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh):
  """Every device takes an equal slice of the batch.  Unlike the config's own checks
  (`ukd.config.check`) this depends on the devices a run finds, so it is made here."""
  n = mesh.shape[DATA_AXIS]
  if batch_size % n:
    raise ConfigError(
      f"config.batch_size={batch_size} (per modality) must be divisible by "
      f"the {n} devices of the data mesh"
    )


def to_global_batch(batch, mesh):
  """Assembles each process's slice of the batch into arrays sharded over the 'data' axis.

  Every process holds an equal, contiguous block of the global batch (its devices' rows, in
  order).  Each device's rows are put on it with an explicit `jax.device_put`, so the batch
  reaches the devices without an implicit transfer.
  """
  sharding = batch_sharding(mesh)

  def assemble(local):
    local = np.asarray(local)
    shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    rows = {
      device: slice(*index[0].indices(shape[0]))  # slice(None) on one device: all rows
      for device, index in sharding.addressable_devices_indices_map(shape).items()
    }
    first = min(r.start for r in rows.values())
    shards = [
      jax.device_put(local[r.start - first : r.stop - first], device) for device, r in rows.items()
    ]
    return jax.make_array_from_single_device_arrays(shape, sharding, shards)

  return jax.tree.map(assemble, batch)


# --device choices -> the JAX platform that runs them.
DEVICES = {"cpu": "cpu", "gpu": "cuda", "tpu": "tpu"}


def use_device(name: str) -> None:
  """Runs JAX on `name` ('cpu', 'gpu' (CUDA), 'tpu') only; one that is not available is a
  one-line ConfigError. Must come before anything touches a device: once JAX has set up its
  devices, the choice has no effect."""
  if name not in DEVICES:
    raise ConfigError(f"--device={name!r} must be one of {sorted(DEVICES)}")
  jax.config.update("jax_platforms", DEVICES[name])
  try:
    jax.devices()
  except (RuntimeError, AssertionError) as e:  # JAX asserts where no CUDA device is visible
    reason = str(e).split(" (set JAX_PLATFORMS")[0] or f"no {DEVICES[name]} device found"
    raise error(ConfigError, f"--device={name}", f"not available to JAX here: {reason}") from None
