import importlib

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime
import pytest
from helpers import tiny_config

from ukd import config as config_lib
from ukd import models
from ukd.models import conv_grads
from ukd.serve import onnx_graph as onnx_export

TOLERANCE = 1e-5  # max abs difference, onnxruntime vs JAX


def _random_variables(model, config):
  """The network's variables with random values, without running (compiling) `init`:
  kernels at lecun-normal scale, batch norms far from the identity (statistics, scale and
  offset all random), so that folding them into constants is checked too."""
  spatial = models.input_spatial(config)
  shapes = jax.eval_shape(
    lambda: models.init_variables(model, config.model, spatial, jax.random.key(0))
  )
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    kind = path[-1].key
    if kind == "kernel":
      value = rng.normal(0, 1 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)
    elif kind in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:  # bias, mean
      value = rng.normal(0, 0.3, leaf.shape)
    return value.astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _config(name):
  if name == "dilated2d":
    config = importlib.import_module("configs.demo").get_config("tiny")
    config.model.pad = "reference"  # the paper config's mirror padding (split, flip, concat)
    # As the paper config: on a CPU the wide convolution before the depth-to-space (here
    # 64 -> 640 channels, 3x3) runs as an im2col matmul (`lax.platform_dependent`).
    config.model.conv_grads = "cpu_matmul"
    config.model.upsample_mult = 2
    return config
  config = tiny_config("unet3d")
  config.data.patch = (16, 16, 8)
  config.model.conv_grads = "cpu_matmul"  # some convolutions inside a jax.custom_vjp
  return config


@pytest.fixture(scope="module", params=["dilated2d", "unet3d"])
def network(request):
  """(fn, a batch of 3 inputs, the ONNX model exported from the first input alone)."""
  config = config_lib.check(_config(request.param))
  model = models.build(config.model, config.modalities)
  variables = _random_variables(model, config)
  eval_step = models.make_eval_step(model)
  fn = lambda x: jax.nn.softmax(eval_step(variables, x, "ct").astype(jnp.float32), axis=-1)
  channels = 3 if models.DIMS[config.model.name] == 2 else 1
  shape = (3, *models.input_spatial(config), channels)
  x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  return fn, x, onnx_export.to_onnx(fn, x[:1])


def _run(model, x):
  options = onnxruntime.SessionOptions()
  options.intra_op_num_threads = 1
  session = onnxruntime.InferenceSession(
    model.SerializeToString(), options, providers=["CPUExecutionProvider"]
  )
  return session.run(None, {"input": x})[0]


def _max_diff(model, fn, x):
  """The max abs difference to JAX over batch sizes 1 and 3 of one model."""
  want = np.asarray(jax.jit(fn)(x))
  got = [_run(model, x[:n]) for n in (1, 3)]
  assert [g.shape for g in got] == [want[:1].shape, want.shape]
  return max(float(np.abs(g - want[: len(g)]).max()) for g in got)


def test_network_matches_jax_for_any_batch_size(network):
  fn, x, model = network
  assert _max_diff(model, fn, x) < TOLERANCE


def test_network_model_is_valid_with_a_symbolic_batch(network):
  _, x, model = network
  onnx.checker.check_model(model, full_check=True)
  (input_,) = model.graph.input
  (output,) = model.graph.output
  dims = lambda value: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
  assert dims(input_) == ["batch", *x.shape[1:]]
  assert dims(output)[0] == "batch"
  assert len(model.graph.initializer) > 0


@pytest.mark.parametrize("batch_dynamic", [True, False])
def test_platform_dependent_wide_convolution_exports_either_branch(batch_dynamic):
  """A wide convolution with matmul gradients chooses its forward pass by platform: the
  graph holds the default branch (a Conv) where the trace keeps the choice, the CPU one
  (im2col: slices, a concatenation, a MatMul) where JAX resolved it already."""
  rng = np.random.default_rng(3)
  w = rng.normal(size=(3, 3, 2, 24)).astype(np.float32)
  numbers = conv_grads._channels_last(4)
  fn = lambda x: conv_grads.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=numbers)
  x = rng.normal(size=(3, 6, 5, 2)).astype(np.float32)
  model = onnx_export.to_onnx(fn, x[:1], batch_dynamic=batch_dynamic)
  assert {node.op_type for node in model.graph.node} & {"Conv", "MatMul"}
  sizes = (1, 3) if batch_dynamic else (1,)
  for n in sizes:
    np.testing.assert_allclose(_run(model, x[:n]), np.asarray(fn(x[:n])), rtol=1e-5, atol=1e-5)


WEIGHTS = np.random.default_rng(2).normal(size=(6, 4)).astype(np.float32)


def _more_primitives(x):
  """[N, 2, 3] -> [N, 8] through the supported primitives the networks do not use."""
  h = x.reshape(x.shape[0], 6) @ WEIGHTS
  h = jax.checkpoint(jax.nn.relu)(h) + jnp.ones_like(h)  # >= 1
  h = jnp.where(h > 1.5, h**2, -jnp.log(h))
  h = jnp.minimum(h, jnp.abs(jnp.tanh(h)) + jax.nn.sigmoid(h) / jnp.sqrt(h + 2))
  h = h * jax.lax.rsqrt(h * h + 1) - (h <= 0.5) + (h < -1) * 2 - (h == 0)
  h = jnp.concatenate([h, jax.lax.pad(h, 0.5, ((0, 0, 0), (1, -1, 0)))], axis=1)
  h = jnp.squeeze(h[:, None], 1).reshape(-1, 2, 4).transpose(0, 2, 1).reshape(-1, 8)
  strided = jax.lax.slice(h, (0, 0), (h.shape[0], 8), (1, 4))
  h = jnp.concatenate([jax.lax.slice_in_dim(h, 1, 7, axis=1), strided], axis=1)  # static slices
  return h - h.min(axis=1, keepdims=True) + h.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("batch_dynamic, opset", [(True, 17), (False, 18)])
def test_more_primitives_match_jax(batch_dynamic, opset):
  x = np.random.default_rng(3).normal(size=(3, 2, 3)).astype(np.float32)
  example = x[:1] if batch_dynamic else x
  model = onnx_export.to_onnx(_more_primitives, example, batch_dynamic=batch_dynamic, opset=opset)
  onnx.checker.check_model(model, full_check=True)
  if batch_dynamic:
    assert _max_diff(model, _more_primitives, x) < TOLERANCE
  else:
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    assert np.abs(_run(model, x) - np.asarray(_more_primitives(x))).max() < TOLERANCE


@pytest.mark.parametrize(
  "fn, primitive",
  [(lambda x: jnp.sort(x, axis=1), "sort"), (lambda x: jax.lax.cumsum(x, axis=1), "cumsum")],
)
def test_unsupported_primitive_is_named(fn, primitive):
  with pytest.raises(NotImplementedError, match=f"'{primitive}'"):
    onnx_export.to_onnx(fn, np.zeros((1, 4), np.float32))
