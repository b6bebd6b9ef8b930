"""Left and right kept apart: each dataset's left/right pairs, swapped under a flip along the
patient's left-right in training samples and in mirrored test-time augmentation; a flip that
would mirror an unpaired lateral class is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_variables, tiny_config

from ukd import config as config_lib
from ukd.data import adapters, lateral, pipeline
from ukd.data.synthetic import generate
from ukd.errors import ConfigError
from ukd.serve import segmenter as infer
from ukd.train import loop as train

ABDOMINAL = adapters.get_adapter("abdominal")
LR_NAMES = ("left_kidney", "right_kidney")
LEFT, RIGHT = (ABDOMINAL.classes.index(name) for name in LR_NAMES)


class Always:
  """An rng whose every coin says 'flip'."""

  def random(self):
    return 0.0


def _resolved(name="dilated2d", flip=(0, 1), slice_axis=2, adapter=ABDOMINAL):
  """A run's config as `resolve` leaves it, with the adapter's pairs as class indices."""
  config = tiny_config(name, num_classes=len(adapter.classes))
  config.data.update(size=(8, 8), patch=(8, 8, 8), slice_axis=slice_axis)
  config.data.augment.flip = flip
  config.infer.batch_size = 2
  pairs = lateral.pair_indices(adapter.classes, adapter.lateral_pairs)
  return config_lib.resolve(config, root="unused", classes=adapter.classes, lateral_pairs=pairs)


def test_each_dataset_names_its_pairs():
  assert ABDOMINAL.lateral_pairs == (("left_kidney", "right_kidney"),)
  assert adapters.get_adapter("amos").lateral_pairs == (
    ("left_kidney", "right_kidney"),
    ("left_adrenal_gland", "right_adrenal_gland"),
  )
  assert adapters.get_adapter("mmwhs").lateral_pairs == ()
  totalseg = adapters.get_adapter(
    "totalseg", structures="kidney_right,liver,kidney_left,rib_left_1"
  )
  assert totalseg.lateral_pairs == (("kidney_left", "kidney_right"),)  # rib_left_1 has no partner
  assert lateral.pairs_by_name(["Left Kidney", "Right Kidney"]) == (
    ("Left Kidney", "Right Kidney"),
  )
  assert [lateral.is_lateral(n) for n in ("LVC", "bright_spot", "lung_left", "Right lobe")] == [
    False,
    False,
    True,
    True,
  ]


def test_the_left_right_axis_of_network_space():
  # Canonical volumes are RAS; network space moves the slice axis last.
  assert [lateral.lateral_axis(s) for s in (2, 1, 0)] == [0, 0, 2]


def test_phantom_kidneys_lie_apart_along_that_axis_left_at_lower_indices(tmp_path):
  generate.write_amos(tmp_path, 1, 1, shape=(24, 24, 12))
  amos = adapters.get_adapter("amos")
  for case in amos.cases(str(tmp_path)):
    _, label = amos.read(case)
    left, right = (np.argwhere(label.array == amos.classes.index(k)).mean(0) for k in LR_NAMES)
    apart = np.abs(left - right)
    assert apart.argmax() == lateral.lateral_axis(2) and left[0] < right[0], case.id


def _kidneys(shape=(8, 8)):
  """Image and label with the left kidney at rows 1-2 (the patient's left: RAS indices grow
  towards the right) and the right kidney at rows 5-6, a little lower in column."""
  label = np.zeros(shape, np.int32)
  label[1:3, 2:4] = LEFT
  label[5:7, 4:6] = RIGHT
  image = np.stack([label.astype(np.float32)] * 3, axis=-1)
  return image, label


def test_a_left_kidney_stays_left_under_a_flipped_training_sample():
  spec = pipeline.Spec.from_config(_resolved(flip=(0,)))
  assert spec.mirror.axis == 0 and spec.mirror.swap[LEFT] == RIGHT
  image, label = _kidneys()
  flipped_image, flipped = pipeline.augment(image, label, Always(), spec.augment, spec.mirror)
  # The image is mirrored: what was the right kidney now lies on the patient's left ...
  np.testing.assert_array_equal(flipped_image, image[::-1])
  # ... and is labelled the left kidney; left is still the low-index side.
  assert np.argwhere(flipped == LEFT)[:, 0].max() < 4 < np.argwhere(flipped == RIGHT)[:, 0].min()
  np.testing.assert_array_equal(flipped == LEFT, label[::-1] == RIGHT)
  # A flip along another axis swaps nothing.
  spec = pipeline.Spec.from_config(_resolved(flip=(1,)))
  _, same_sides = pipeline.augment(image, label, Always(), spec.augment, spec.mirror)
  np.testing.assert_array_equal(same_sides, label[:, ::-1])


def test_sagittal_slices_swap_sides_when_their_neighbours_are_reversed():
  spec = pipeline.Spec.from_config(_resolved(flip=(2,), slice_axis=0))
  image, label = _kidneys()
  _, got = pipeline.augment(image, label, Always(), spec.augment, spec.mirror)
  np.testing.assert_array_equal(got, np.asarray(spec.mirror.swap)[label])


def test_a_flip_that_would_mirror_an_unpaired_lateral_class_is_refused():
  lone = adapters.get_adapter("totalseg", structures="liver,kidney_left")
  with pytest.raises(ConfigError) as e:
    lateral.check_flip(lone.classes, lone.lateral_pairs, (0, 1), 2, "totalseg")
  assert str(e.value) == (
    "config.data.augment.flip=(0, 1) mirrors axis 0, the patient's left-right, but class "
    "'kidney_left' of dataset 'totalseg' has no left/right partner in its pair table: drop "
    "axis 0 from data.augment.flip"
  )
  lateral.check_flip(lone.classes, lone.lateral_pairs, (1, 2), 2, "totalseg")  # not mirrored
  lateral.check_flip(lone.classes, lone.lateral_pairs, (0, 1), 0, "totalseg")  # sagittal: axis 2
  paired = adapters.get_adapter("totalseg", structures="kidney_right,kidney_left")
  lateral.check_flip(paired.classes, paired.lateral_pairs, (0, 1, 2), 2, "totalseg")


def test_training_refuses_such_a_flip_before_preparing_anything(tmp_path):
  generate.write_totalseg(tmp_path / "data", 2, 2, shape=(16, 16, 8))
  config = tiny_config()
  config.data.update(dataset="totalseg", structures="liver,kidney_left")
  config.data.augment.flip = (0, 1)
  with pytest.raises(ConfigError, match="class 'kidney_left' of dataset 'totalseg'"):
    train.prepare_data(config, str(tmp_path / "data"), tmp_path / "work")
  assert not (tmp_path / "work" / "cache").exists()


def test_a_bad_pair_table_is_refused_when_the_config_is_checked():
  config = _resolved().to_dict()
  config["data"]["lateral_pairs"] = ((3, 3),)
  with pytest.raises(ConfigError, match=r"config.data.lateral_pairs=\[\(3, 3\)\]"):
    config_lib.frozen(config)


def _hand_made_network(monkeypatch, num_classes):
  """Swaps the network for one that reads a kidney wherever the image is 1 and calls it left
  on the low-index half of axis 0, right on the other (what a network that learnt the sides
  predicts), with probability 0.9 + 0.1 / C.  Its logits are log-probabilities, so the
  Segmenter's softmax gives these back."""

  def eval_step(variables, batch, modality):
    kidney = batch[..., 0] > 0.5
    rows = jnp.arange(batch.shape[1]).reshape((1, -1) + (1,) * (batch.ndim - 3))
    side = jnp.where(rows < batch.shape[1] // 2, LEFT, RIGHT)
    p = 0.9 * jax.nn.one_hot(jnp.where(kidney, side, 0), num_classes) + 0.1 / num_classes
    return jnp.log(p)

  monkeypatch.setattr(infer.models, "make_eval_step", lambda model: eval_step)


@pytest.mark.parametrize("pairs", [True, False])
def test_a_left_kidney_stays_left_under_mirrored_tta(monkeypatch, pairs):
  config = _resolved("unet3d", flip=(0, 1, 2))
  if not pairs:  # a table-less config, as saved before the pairs existed
    saved = config.to_dict()
    saved["data"]["lateral_pairs"] = ()
    config = config_lib.frozen(saved)
  _hand_made_network(monkeypatch, len(ABDOMINAL.classes))
  seg = infer.Segmenter(config, random_variables(config), tta=True)
  assert len(seg.flips) == 8
  _, label = _kidneys()
  image = np.repeat((label > 0).astype(np.float32)[:, :, None], 8, axis=2)  # [8, 8, 8]
  batch = np.stack([image[..., None]] * seg.batch_size)
  p = np.asarray(seg.batch_function("ct")(batch))[0]
  left_kidney = np.broadcast_to(label[:, :, None] == LEFT, p.shape[:-1])
  if pairs:  # mirrored predictions swapped back: every mirror agrees
    assert (p.argmax(-1)[left_kidney] == LEFT).all()
    np.testing.assert_allclose(p[left_kidney][:, LEFT], 0.9 + 0.1 / p.shape[-1], atol=1e-5)
  else:  # half the mirrors called it right: the average cannot tell
    np.testing.assert_allclose(p[left_kidney][:, LEFT], p[left_kidney][:, RIGHT], atol=1e-5)
