"""The paper's networks, built from `config.model` with a sharing scheme."""

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ukd.errors import ConfigError
from ukd.models import dilated2d, layers, unet3d
from ukd.models.dilated2d import Dilated2D
from ukd.models.schemes import SCHEMES, Scheme, Sharing, get_scheme
from ukd.models.unet3d import UNet3D

NETWORKS = {"dilated2d": Dilated2D, "unet3d": UNet3D}
# Number of spatial dimensions of each network's input (its slices / patches).
DIMS = {"dilated2d": 2, "unet3d": 3}
# How many stages at each end `model.x_split` may make per modality in each network.
END_STAGES = {"dilated2d": dilated2d.END_STAGES, "unet3d": unet3d.END_STAGES}


def check_x_split(model_config) -> None:
  """`model.x_split` is a whole number from 1 to the network's `END_STAGES` (an unknown
  network is `build`'s error)."""
  value, most = model_config.x_split, END_STAGES.get(model_config.name, 0)
  whole = isinstance(value, int) and not isinstance(value, bool)
  if most and not (whole and 1 <= value <= most):
    raise ConfigError(
      f"config.model.x_split={value!r} must be a whole number from 1 to {most} "
      f"(stages at each end of {model_config.name})"
    )


def build(model_config, modalities):
  """Returns the Linen module described by `config.model` for the given modality names."""
  name = model_config.name
  if name not in NETWORKS:
    raise ConfigError(
      f"config.model.name={name!r} is not a network; choose one of {sorted(NETWORKS)}"
    )
  if model_config.init not in layers.KERNEL_INITS:
    raise ConfigError(
      f"config.model.init={model_config.init!r} is not an initialiser; "
      f"choose one of {sorted(layers.KERNEL_INITS)}"
    )
  if model_config.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"config.model.dtype={model_config.dtype!r} must be 'float32' or 'bfloat16'")
  check_x_split(model_config)
  kwargs = dict(
    num_classes=model_config.num_classes,
    modalities=tuple(modalities),
    scheme=get_scheme(model_config.scheme, model_config.x_split),
    width=model_config.width,
    # The initialisers and the convolution as callables: the networks take them as they are.
    kernel_init=layers.KERNEL_INITS[model_config.init],
    dtype=model_config.dtype,
    conv=layers.CONV_GRADS[model_config.get("conv_grads", "xla")],  # older configs: none
    head_bias=model_config.head_bias,
  )
  if name == "dilated2d":
    kwargs.update(
      dropout=model_config.dropout,
      upsample_mult=model_config.upsample_mult,
      pad=model_config.pad,
    )
  return NETWORKS[name](**kwargs)


def input_spatial(config) -> tuple[int, ...]:
  """The spatial shape of one training input: a 2D slice or a 3D patch."""
  return tuple(config.data.size) if DIMS[config.model.name] == 2 else tuple(config.data.patch)


def input_channels(model_config) -> int:
  """Channels of one input: a 2D slice with its two neighbours, or a 3D patch's one."""
  return 3 if DIMS[model_config.name] == 2 else 1


def example_input(model_config, spatial, batch: int = 1):
  """A zero input of the shape the network takes, e.g. for `init`."""
  return jnp.zeros((batch, *spatial, input_channels(model_config)), jnp.float32)


def init_variables(model, model_config, spatial, rng):
  """Creates params and batch_stats; every modality's branch is initialised."""
  return model.init(
    rng, example_input(model_config, spatial), modality=model.modalities[0], train=False
  )


def count_params(model_config, modalities, spatial=None) -> dict:
  """Parameter counts of a network under its scheme, without allocating the weights."""
  model = build(model_config, modalities)
  spatial = spatial or ((64, 64) if DIMS[model_config.name] == 2 else (16, 16, 8))
  shapes = jax.eval_shape(lambda: init_variables(model, model_config, spatial, jax.random.key(0)))
  counts = {"params": 0, "kernels": 0, "batch_stats": 0}
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
    size = int(np.prod(leaf.shape))
    collection = path[0].key
    counts[collection] += size
    if collection == "params" and path[-1].key == "kernel":
      counts["kernels"] += size
  return counts


__all__ = [
  "build",
  "count_params",
  "input_spatial",
  "init_variables",
  "example_input",
  "SCHEMES",
  "Scheme",
  "Sharing",
  "get_scheme",
  "DIMS",
  "END_STAGES",
  "check_x_split",
]


def make_eval_step(model: nn.Module) -> Callable[[dict, jax.Array, str], jax.Array]:
  """`eval_step(variables, image, modality)`: logits with the norms' running statistics;
  compiled once per (modality, input shape)."""

  @functools.partial(jax.jit, static_argnames="modality")
  def eval_step(variables, image, modality):
    return model.apply(variables, image, modality=modality, train=False)

  return eval_step
