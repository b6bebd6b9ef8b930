"""Which parameters each sharing scheme keeps per modality, and the reference-recipe options
of the networks (head bias, mirror padding, transposed-convolution initialisation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from ukd import config as config_lib
from ukd import models
from ukd.errors import ConfigError
from ukd.models import layers

SPATIAL = {"dilated2d": (32, 32), "unet3d": (16, 16, 8)}

# Each network's top-level layers by stage, written out by hand from the papers' layouts (not
# read from the code): encoder stages by resolution level from the input, decoder stages
# counted from the output.
STAGES = {
  "dilated2d": {
    "enc1": ("stem", "stage1_0"),
    "enc2": ("stage2_0",),
    "enc3": ("stage3_0", "stage3_1"),
    "enc4": (
      *(f"stage{k}_{i}" for k in (4, 5, 6, 7) for i in (0, 1)),
      "dilated_0",
      "dilated_1",
    ),
    "dec3": ("post_norm_0", "post_conv_0"),
    "dec2": ("post_norm_1", "post_conv_1"),
    "dec1": ("upsample_conv", "upsample_norm", "head"),
  },
  "unet3d": {
    "enc1": ("enc1_0", "enc1_1"),
    "enc2": ("enc2_0", "enc2_1"),
    "enc3": ("enc3_0", "enc3_1"),
    "enc4": ("bottom_0", "bottom_1"),
    "dec3": ("dec3_up", "dec3_0", "dec3_1"),
    "dec2": ("dec2_up", "dec2_0", "dec2_1"),
    "dec1": ("dec1_up", "dec1_0", "dec1_1", "head"),
  },
}
ENCODER = ("enc1", "enc2", "enc3", "enc4")
EVERY = (*ENCODER, "dec3", "dec2", "dec1")
BOTH = ("conv", "norm")


def _x_shape(split):
  return [f"enc{k}" for k in range(1, split + 1)] + [f"dec{k}" for k in range(1, split + 1)]


# (scheme, x_split) -> (stages kept per modality, which of their layers: kernels and/or norms).
PER_MODALITY = {
  ("single", 2): (EVERY, BOTH),
  ("joint", 2): ((), BOTH),
  ("separate_norm", 2): (EVERY, ("norm",)),
  ("ukd", 2): (EVERY, ("norm",)),
  ("y_shape", 2): (ENCODER, BOTH),
  ("x_shape", 1): (_x_shape(1), BOTH),
  ("x_shape", 2): (_x_shape(2), BOTH),
  ("x_shape", 3): (_x_shape(3), BOTH),
}


def _shapes(config):
  model = models.build(config.model, config.modalities)
  spatial = SPATIAL[config.model.name]
  return jax.eval_shape(
    lambda: models.init_variables(model, config.model, spatial, jax.random.key(0))
  )


def _layers(tree) -> dict:
  """{(top-level layer, 'conv' or 'norm'): branch names ('shared' or modalities)}."""
  out = {}
  for path, _ in jax.tree_util.tree_leaves_with_path(tree):
    keys = [p.key for p in path]
    i = next(i for i, k in enumerate(keys) if k in ("shared", "ct", "mr"))
    kind = "norm" if any("norm" in k.lower() for k in keys[:i]) else "conv"
    out.setdefault((keys[0], kind), set()).add(keys[i])
  return out


@pytest.mark.parametrize("name", sorted(STAGES))
@pytest.mark.parametrize("scheme,x_split", sorted(PER_MODALITY))
def test_schemes_keep_per_modality_exactly_the_stages_they_name(name, scheme, x_split):
  config = tiny_config(name, scheme)
  config.model.x_split = x_split
  variables = _shapes(config)
  found = _layers(variables["params"])
  stage_of = {top: stage for stage, tops in STAGES[name].items() for top in tops}
  assert {top for top, _ in found} == set(stage_of)  # the hand map covers the network
  stages, kinds = PER_MODALITY[(scheme, x_split)]
  expected = {(top, kind) for top, kind in found if stage_of[top] in stages and kind in kinds}
  per_modality = {layer for layer, branches in found.items() if branches == {"ct", "mr"}}
  assert per_modality == expected
  assert all(found[layer] == {"shared"} for layer in set(found) - per_modality)
  stats = _layers(variables["batch_stats"])
  assert {layer for layer, branches in stats.items() if branches == {"ct", "mr"}} == {
    layer for layer in per_modality if layer[1] == "norm"
  }


@pytest.mark.parametrize("name", sorted(STAGES))
def test_x_split_moves_stages_from_the_shared_middle_to_the_modalities(name):
  config = tiny_config(name, "x_shape")
  counts = []
  for split in (1, 2, 3):
    config.model.x_split = split
    counts.append(models.count_params(config.model, config.modalities)["params"])
  config.model.scheme = "joint"
  joint = models.count_params(config.model, config.modalities)["params"]
  config.model.scheme = "single"
  single = models.count_params(config.model, config.modalities)["params"]
  assert joint < counts[0] < counts[1] < counts[2] < single


@pytest.mark.parametrize("value", [0, 4, -1, True])
def test_x_split_out_of_range_is_a_one_line_config_error(value):
  config = tiny_config(scheme="x_shape")
  config.model.x_split = value
  for call in (config_lib.check, lambda c: models.build(c.model, c.modalities)):
    with pytest.raises(ConfigError, match=r"config\.model\.x_split=.* from 1 to 3") as error:
      call(config)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- the reference recipe's options


@pytest.mark.parametrize("name", sorted(STAGES))
def test_head_bias_is_a_switch(name):
  config = tiny_config(name, "joint")
  for bias in (False, True):
    config.model.head_bias = bias
    head = _shapes(config)["params"]["head"]["shared"]
    assert set(head) == ({"kernel", "bias"} if bias else {"kernel"})


def _symmetric_conv(x, kernel):
  """The reference's convolution by hand: numpy's symmetric pad, then a VALID correlation."""
  kh, kw = kernel.shape[:2]
  padded = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)), mode="symmetric")
  _, h, w, _ = x.shape
  out = np.zeros((x.shape[0], h, w, kernel.shape[-1]))
  for i in range(h):
    for j in range(w):
      out[:, i, j] = np.einsum("bhwc,hwco->bo", padded[:, i : i + kh, j : j + kw], kernel)
  return out


@pytest.mark.parametrize("size", [(3, 3), (5, 5)])
def test_mirror_padded_convolution_equals_the_hand_computed_symmetric_one(size):
  x = np.random.default_rng(0).normal(size=(2, 4, 5, 3)).astype(np.float32)
  conv = layers.ModalityConv(("ct", "mr"), True, features=2, kernel_size=size, mirror=True)
  variables = conv.init(jax.random.key(0), x, "ct")
  kernel = np.asarray(variables["params"]["shared"]["kernel"])
  got = np.asarray(conv.apply(variables, x, "ct"))
  np.testing.assert_allclose(got, _symmetric_conv(x, kernel), rtol=1e-5, atol=1e-7)
  zeros = layers.ModalityConv(("ct", "mr"), True, features=2, kernel_size=size)
  assert not np.allclose(np.asarray(zeros.apply(variables, x, "ct")), got)


def test_mirror_pad_is_numpys_symmetric_pad_up_to_the_whole_axis():
  x = jnp.arange(2 * 3 * 4 * 1, dtype=jnp.float32).reshape(2, 3, 4, 1)
  for pads in [((1, 1), (2, 2)), ((3, 0), (0, 4)), ((0, 0), (1, 3))]:
    expected = np.pad(np.asarray(x), ((0, 0), *pads, (0, 0)), mode="symmetric")
    np.testing.assert_array_equal(layers.mirror_pad(x, pads), expected)
  with pytest.raises(ValueError, match="cannot mirror-pad 4"):
    layers.mirror_pad(x, ((4, 0), (0, 0)))


def test_reference_padding_changes_only_the_border_of_the_2d_logits():
  config = tiny_config("dilated2d", "joint")
  zeros = models.build(config.model, config.modalities)
  variables = models.init_variables(zeros, config.model, (32, 32), jax.random.key(0))
  config.model.pad = "reference"
  mirrored = models.build(config.model, config.modalities)
  x = jax.random.normal(jax.random.key(1), (1, 32, 32, 3))
  a = np.asarray(zeros.apply(variables, x, modality="ct"))
  b = np.asarray(mirrored.apply(variables, x, modality="ct"))
  # The 3x3 conv at 1/8 resolution pads around 4x4 cells: its border cells are the outer 8
  # pixels after the depth-to-space, and the 5x5 head reaches 2 pixels further in.
  np.testing.assert_allclose(a[:, 10:22, 10:22], b[:, 10:22, 10:22], rtol=1e-5, atol=1e-7)
  assert not np.allclose(a[:, :8], b[:, :8]) and not np.allclose(a[:, :, -8:], b[:, :, -8:])


def test_3d_transposed_convolutions_start_from_the_references_uncut_normal():
  config = tiny_config("unet3d", "joint")
  config.model.width = 8
  model = models.build(config.model, config.modalities)
  params = models.init_variables(model, config.model, (16, 16, 8), jax.random.key(0))["params"]
  up, conv = [], []
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if path[-1].key == "kernel" and leaf.size > 1000:
      (up if path[0].key.endswith("_up") else conv).append(np.asarray(leaf).ravel())
  up, conv = np.concatenate(up), np.concatenate(conv)
  # tf.random_normal_initializer(stddev=0.01): std 0.01, values beyond 2 std (about 4.6 %).
  assert up.std() == pytest.approx(0.01, rel=0.03)
  assert np.mean(np.abs(up) > 0.02) == pytest.approx(0.0455, abs=0.005)
  # The convolutions keep the truncated normal: std 0.01 * 0.8796, nothing beyond 2 std.
  assert conv.std() == pytest.approx(0.008796, rel=0.03) and np.abs(conv).max() <= 0.02 + 1e-7
