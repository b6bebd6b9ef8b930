import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config, toy_batch

from ukd import config as config_lib
from ukd import models
from ukd.models import layers
from ukd.models.dilated2d import depth_to_space


def _init(config, spatial=(32, 32)):
  model = models.build(config.model, config.modalities)
  variables = models.init_variables(model, config.model, spatial, jax.random.key(0))
  return model, variables


def _branch_keys(tree):
  """{(path to a shared-or-per-modality layer): branch names below it}."""
  out = {}

  def walk(node, path):
    for k, v in node.items():
      if k in ("shared", "ct", "mr", "pet") and isinstance(v, dict):
        out.setdefault(path, set()).add(k)
      elif isinstance(v, dict):
        walk(v, path + (k,))

  walk(tree, ())
  return out


def test_paper_2d_network_kernel_count():
  c = config_lib.default().model
  c.update(name="dilated2d", num_classes=5, scheme="ukd", width=16, upsample_mult=8)
  counts = models.count_params(c, ("ct", "mr"))
  # Hand count: stem 432; blocks 16: 4,608; 32: 13,824; 64x2: 129,024; 128x2: 516,096;
  # 256x2: 2,064,384; 256x2: 2,359,296; 512x2: 8,257,536; dilated: 9,437,184;
  # post convs: 4,718,592; 3x3 conv to 2560: 11,796,480; 5x5 head: 5,000.
  assert counts["kernels"] == 39_302_456
  # Separate networks double every kernel; joint has the ukd kernels with half the statistics.
  c.scheme = "single"
  assert models.count_params(c, ("ct", "mr"))["kernels"] == 2 * 39_302_456
  c.scheme = "joint"
  assert models.count_params(c, ("ct", "mr"))["batch_stats"] * 2 == counts["batch_stats"]


@pytest.mark.parametrize("name", ["dilated2d", "unet3d"])
def test_one_kernel_copy_and_one_norm_per_modality(name):
  config = tiny_config(name, "ukd", modalities=("ct", "mr", "pet"))
  spatial = (32, 32) if name == "dilated2d" else (16, 16, 8)
  _, variables = _init(config, spatial)
  params = variables["params"]
  convs = {
    p: k for p, k in _branch_keys(params).items() if "Norm" not in p[-1] and "norm" not in p[-1]
  }
  norms = {p: k for p, k in _branch_keys(params).items() if p not in convs}
  assert convs and norms
  assert all(keys == {"shared"} for keys in convs.values())
  assert all(keys == {"ct", "mr", "pet"} for keys in norms.values())
  stats = _branch_keys(variables["batch_stats"])
  assert stats.keys() == norms.keys()
  assert all(keys == {"ct", "mr", "pet"} for keys in stats.values())


def test_unknown_modality_and_bad_input_shape():
  config = tiny_config()
  model, variables = _init(config)
  with pytest.raises(ValueError, match="unknown modality 'pet'"):
    model.apply(variables, jnp.zeros((1, 32, 32, 3)), modality="pet")
  with pytest.raises(ValueError, match="divisible by 8"):
    model.apply(variables, jnp.zeros((1, 30, 32, 3)), modality="ct")
  config.model.scheme = "nope"
  with pytest.raises(ValueError, match="config.model.scheme='nope'"):
    models.build(config.model, config.modalities)


@pytest.mark.parametrize("name,spatial", [("dilated2d", (32, 40)), ("unet3d", (16, 24, 8))])
def test_output_shapes_any_batch(name, spatial):
  config = tiny_config(name, num_classes=4)
  model, variables = _init(config, spatial)
  for batch in (1, 3):
    x = models.example_input(config.model, spatial, batch)
    for m in config.modalities:
      assert model.apply(variables, x, modality=m).shape == (batch, *spatial, 4)


def test_modalities_differ_only_through_their_norms():
  config = tiny_config()
  model, variables = _init(config)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  # Fresh norms are identical, so both modalities give the same output ...
  np.testing.assert_allclose(
    model.apply(variables, x, modality="ct"), model.apply(variables, x, modality="mr"), rtol=1e-6
  )
  # ... and changing one modality's norm offset changes only that modality's output.
  params = jax.tree_util.tree_map_with_path(
    lambda p, v: v + 0.5 if any(getattr(k, "key", None) == "mr" for k in p) else v,
    variables["params"],
  )
  moved = dict(variables, params=params)
  np.testing.assert_allclose(
    model.apply(moved, x, modality="ct"), model.apply(variables, x, modality="ct"), rtol=1e-6
  )
  assert not np.allclose(
    model.apply(moved, x, modality="mr"), model.apply(variables, x, modality="mr")
  )


def test_depth_to_space_matches_hand_layout():
  # One pixel with channels 0..7 and block 2 -> 2x2 pixels of 2 channels, row-major blocks.
  x = jnp.arange(8.0).reshape(1, 1, 1, 8)
  y = depth_to_space(x, 2)
  assert y.shape == (1, 2, 2, 2)
  np.testing.assert_array_equal(y[0, :, :, 0], [[0, 2], [4, 6]])
  np.testing.assert_array_equal(y[0, :, :, 1], [[1, 3], [5, 7]])


# ---------------------------------------------------------------- one pass over all modalities


def _first_norm_stats(scheme):
  """(ct images, mr images, stem kernel, updated statistics of the first norm after the stem)."""
  from ukd.train import steps

  config = tiny_config(scheme=scheme)
  model, variables = _init(config, spatial=(16, 16))
  rng = np.random.default_rng(0)
  # CT around +3, MR around -1 with another spread: per-modality and mixed statistics differ.
  batch = {
    "ct": {"image": rng.normal(3.0, 1.0, (4, 16, 16, 3)), "label": np.zeros((4, 16, 16), int)},
    "mr": {"image": rng.normal(-1.0, 2.0, (4, 16, 16, 3)), "label": np.zeros((4, 16, 16), int)},
  }
  batch = jax.tree.map(jnp.asarray, batch)
  _, (_, stats) = steps.loss_terms(
    model, config, variables["params"], variables["batch_stats"], batch, jax.random.key(1)
  )
  stem = variables["params"]["stem"]
  kernel = stem["shared"]["kernel"]
  return batch, kernel, stats["stage1_0"]["ModalityNorm_0"]


def _conv_moments(images, kernel):
  """Per-channel mean and (biased) variance of the stem's output on `images`."""
  out = jax.lax.conv_general_dilated(
    images.astype(jnp.float32), kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  return np.asarray(out.mean(axis=(0, 1, 2))), np.asarray(out.var(axis=(0, 1, 2)))


def test_shared_norm_trains_with_the_statistics_of_the_concatenated_batch():
  batch, kernel, norm = _first_norm_stats("joint")
  mixed = jnp.concatenate([batch["ct"]["image"], batch["mr"]["image"]])
  mean, var = _conv_moments(mixed, kernel)
  # Running averages start at mean 0 and variance 1; one step moves them by (1 - 0.9).
  np.testing.assert_allclose(norm["shared"]["mean"], 0.1 * mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(norm["shared"]["var"], 0.9 + 0.1 * var, rtol=1e-4)
  ct_mean, _ = _conv_moments(batch["ct"]["image"], kernel)
  assert not np.allclose(norm["shared"]["mean"], 0.1 * ct_mean, rtol=1e-2)


def test_per_modality_norms_see_only_their_own_modality_in_the_same_pass():
  batch, kernel, norm = _first_norm_stats("ukd")
  for m in ("ct", "mr"):
    mean, var = _conv_moments(batch[m]["image"], kernel)
    np.testing.assert_allclose(norm[m]["mean"], 0.1 * mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(norm[m]["var"], 0.9 + 0.1 * var, rtol=1e-4)


# ---------------------------------------------------------------- kernel initialisation


def test_reference_initialiser_is_tensorflows_truncated_normal_std_001():
  from ukd.models import layers

  w = np.asarray(layers.KERNEL_INITS["reference"].conv(jax.random.key(0), (400_000,)))
  # TF's truncated_normal_initializer(stddev=0.01): a normal of std 0.01 cut at +-2 std, so
  # the drawn values have std 0.01 * sqrt(1 - 2 * 2 * phi(2) / (2 * Phi(2) - 1)) = 0.008796.
  phi2 = np.exp(-2.0) / np.sqrt(2 * np.pi)
  Phi2m1 = 0.9544997361
  expected = 0.01 * np.sqrt(1 - 4 * phi2 / Phi2m1)
  assert expected == pytest.approx(0.008796, abs=1e-6)
  # Sampling error of a std from 400k draws is about std / sqrt(2n) ~ 1e-5.
  assert w.std() == pytest.approx(expected, abs=5e-5)
  assert np.abs(w).max() <= 0.02 + 1e-7 and abs(w.mean()) < 1e-4


@pytest.mark.parametrize("init", ["reference", "lecun"])
def test_networks_use_the_configured_initialiser(init):
  config = tiny_config()
  config.model.width = 8
  config.model.init = init
  _, variables = _init(config)
  kernels = [
    np.asarray(leaf).ravel()
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
    if path[-1].key == "kernel" and leaf.size > 1000
  ]
  spread = np.concatenate(kernels).std()
  if init == "reference":
    assert spread == pytest.approx(0.008796, rel=0.05)
  else:
    assert spread > 0.018  # lecun-normal: std 1/sqrt(fan_in) >= 1/sqrt(9 * 256) = 0.021 here


def test_unknown_initialiser_is_a_config_error():
  config = tiny_config()
  config.model.init = "xavier"
  with pytest.raises(ValueError, match="config.model.init='xavier'"):
    models.build(config.model, config.modalities)


@pytest.mark.slow
def test_bfloat16_computes_convolutions_in_bf16_and_keeps_everything_else_float32():
  from ukd.train import steps

  config = tiny_config()
  config.model.dtype = "bfloat16"
  model, variables = _init(config, spatial=(16, 16))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  batch = jax.tree.map(jnp.asarray, toy_batch(config, (16, 16)))
  _, (terms, stats) = steps.loss_terms(
    model, config, variables["params"], variables["batch_stats"], batch, jax.random.key(0)
  )
  assert all(v.dtype == jnp.float32 for v in terms.values())
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(stats))
  # The convolutions themselves run in bf16: the lowered step holds bf16 convolutions.
  hlo = (
    jax.jit(lambda v, x: model.apply(v, x, modality="ct"))
    .lower(variables, batch["ct"]["image"])
    .as_text()
  )
  assert "bf16" in hlo and "convolution" in hlo
  f32 = tiny_config()
  _, f32_variables = _init(f32, spatial=(16, 16))
  logits16 = model.apply(variables, batch["ct"]["image"], modality="ct")
  logits32 = models.build(f32.model, f32.modalities).apply(
    f32_variables, batch["ct"]["image"], modality="ct"
  )
  # Same weights (same seed), bf16 rounding only: close, not equal.
  diff = np.abs(np.asarray(logits16, np.float32) - np.asarray(logits32))
  assert 0 < diff.max() < 0.05 * (np.abs(np.asarray(logits32)).max() + 1e-3) + 0.05


# ---------------------------------------------------------------- forward-mode derivatives


@pytest.mark.slow
@pytest.mark.parametrize("name,spatial", [("dilated2d", (16, 16)), ("unet3d", (16, 16, 8))])
def test_forward_mode_derivative_agrees_with_reverse_mode(name, spatial):
  """`jax.jvp` runs through the default model (XLA's convolutions have every derivative), and
  its tangent is the one reverse mode implies: <J t, u> = <t, J^T u> for any t, u."""
  config = tiny_config(name)
  config.model.upsample_mult = 3  # 2D: its last convolution is wide (64 x 9 <= 576 features)
  model, variables = _init(config, spatial)
  x = jax.random.normal(jax.random.key(1), (2, *spatial, 3 if name == "dilated2d" else 1))

  def logits(params, x):  # train mode, mixed batch: batch statistics per modality
    out, _ = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      x,
      ("ct", "mr"),
      train=True,
      mutable=["batch_stats"],
    )
    return out

  primals = (variables["params"], x)
  leaves, treedef = jax.tree.flatten(primals)
  keys = jax.random.split(jax.random.key(2), len(leaves) + 1)
  tangent_leaves = [jax.random.normal(k, v.shape) for k, v in zip(keys, leaves)]
  u = jax.random.normal(keys[-1], (2, *spatial, config.model.num_classes))

  @jax.jit  # one compilation for both modes
  def both(primals, tangents):
    return jax.jvp(logits, primals, tangents)[1], jax.vjp(logits, *primals)[1](u)

  out_dot, cotangents = both(primals, treedef.unflatten(tangent_leaves))
  forward = float(jnp.vdot(out_dot, u))
  reverse = sum(jnp.vdot(t, c) for t, c in zip(tangent_leaves, jax.tree.leaves(cotangents)))
  assert abs(forward) > 1e-3
  assert forward == pytest.approx(float(reverse), rel=1e-4)


@pytest.mark.parametrize("rate", [0.25, 0.5, 0.3, 0.125, 0.0625])
def test_dropout_keeps_each_value_with_the_keep_probability_and_scales_it(rate):
  """0.25 (the reference's) is kept with exactly 3/4 of the 2-bit draws, 0.5 with 1/2 of the
  1-bit ones, 0.875 and 0.9375 with 3 and 4 bits' worth; 0.3 with round(0.7 * 65536) / 65536
  of the 16-bit ones.  Over 2^20 values the kept fraction lies within 5 standard deviations
  (sqrt(p (1 - p) / n) = 0.00042 at p = 0.75) of it."""
  x = jnp.full((4, 256, 256, 4), 2.0)
  drop = layers.Dropout(rate)
  y = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
  kept = np.asarray(y) != 0
  keep = 1.0 - rate
  assert abs(kept.mean() - keep) < 5 * np.sqrt(keep * (1 - keep) / x.size)
  np.testing.assert_allclose(np.asarray(y)[kept], 2.0 / keep, rtol=1e-6)
  other = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
  agree = keep**2 + (1 - keep) ** 2  # independent masks: both keep or both drop
  assert abs(np.mean(kept == (np.asarray(other) != 0)) - agree) < 0.005
  np.testing.assert_array_equal(drop.apply({}, x, deterministic=True), x)


@pytest.mark.parametrize(
  "shared, modality",
  [(False, ("ct", "mr")), (False, ("mr", "ct", "mr")), (False, "mr"), (True, ("ct", "mr"))],
)
def test_modality_norm_equals_one_flax_batch_norm_per_part(shared, modality):
  """The one-pass norm against its definition: split the batch into its modality parts,
  apply each part's `nn.BatchNorm` (the same variables), concatenate; the outputs, the
  running statistics after the step, the gradients, and the eval pass must all agree."""
  groups = (modality,) if isinstance(modality, str) else modality
  x = jax.random.normal(jax.random.key(0), (2 * len(groups), 3, 4, 5)) * 3 + 1
  norm = layers.ModalityNorm(("ct", "mr"), shared)
  variables = norm.init(jax.random.key(1), x, groups, train=True)
  rng = np.random.default_rng(2)
  variables = jax.tree.map(lambda v: v + rng.normal(size=v.shape).astype(np.float32), variables)

  def reference(variables, x, train):
    bn = nn.BatchNorm(
      use_running_average=not train, momentum=layers.BN_MOMENTUM, epsilon=layers.BN_EPSILON
    )
    names = ("shared",) if shared else groups
    parts = (x,) if shared else np.split(x, len(groups))  # a shared norm: the whole batch
    stats = dict(variables["batch_stats"])
    outs = []
    for name, part in zip(names, parts):
      branch = {"params": variables["params"][name], "batch_stats": stats[name]}
      y, new = bn.apply(branch, part, mutable=["batch_stats"])
      stats[name] = new["batch_stats"] if train else stats[name]
      outs.append(y)
    return jnp.concatenate(outs), stats

  for train in (True, False):
    got, new = norm.apply(variables, x, modality, train=train, mutable=["batch_stats"])
    want, want_stats = reference(variables, x, train)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for name, stats in want_stats.items():
      for key in ("mean", "var"):
        np.testing.assert_allclose(new["batch_stats"][name][key], stats[key], rtol=1e-5, atol=1e-6)
  cotangent = jax.random.normal(jax.random.key(3), x.shape)
  loss = lambda f: lambda p, x: jnp.sum(f(p, x) * cotangent)
  ours = lambda p, x: norm.apply(
    {**variables, "params": p}, x, modality, True, mutable=["batch_stats"]
  )[0]
  theirs = lambda p, x: reference({**variables, "params": p}, x, True)[0]
  for g, w in zip(
    jax.grad(loss(ours), (0, 1))(variables["params"], x),
    jax.grad(loss(theirs), (0, 1))(variables["params"], x),
  ):
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
