"""Training input pipeline: sample content, batching per modality, determinism, resume, workers."""

import os

import numpy as np
import pytest

from ukd import config as config_lib
from ukd.data import pipeline
from ukd.errors import DataError


def save_entry(directory, name, image, label):
  """A hand-made cache entry, written the way preprocess writes them (slices contiguous)."""
  image_path = os.path.join(directory, f"{name}_image.npy")
  label_path = os.path.join(directory, f"{name}_label.npy")
  np.save(image_path, np.asfortranarray(image.astype(np.float32)))
  np.save(label_path, np.asfortranarray(label.astype(np.uint8)))
  return dict(image=image_path, label=label_path, geometry={}, id=name, modality=name[:2])


def indexed_volume(slices=6, size=8, fg_slice=None):
  """Slice k of the image is the constant k; the label is foreground only in `fg_slice`."""
  image = np.broadcast_to(np.arange(slices, dtype=np.float32), (size, size, slices)).copy()
  label = np.zeros(image.shape, np.uint8)
  if fg_slice is not None:
    label[2:5, 3:6, fg_slice] = 1
  return image, label


@pytest.fixture
def sources(tmp_path):
  rng = np.random.default_rng(0)
  out = {}
  for modality in ("ct", "mr"):
    out[modality] = []
    for i in range(2):
      image = rng.normal(size=(8, 8, 5))
      label = (rng.random((8, 8, 5)) > 0.8).astype(np.uint8) * rng.integers(1, 4)
      out[modality].append(save_entry(tmp_path, f"{modality}_{i}", image, label))
  return out


def make_config(dims=2, batch=4, **data):
  """The default config with small sampling settings; `dims` picks a 2D or 3D network."""
  config = config_lib.default()
  config.batch_size = batch
  config.model.name = {2: "dilated2d", 3: "unet3d"}[dims]
  config.data.update(dict(size=(8, 8), patch=(8, 8, 4), fg_fraction=0.0, workers=0, prefetch=2))
  config.data.update({k: v for k, v in data.items() if k != "augment"})
  if "augment" in data:
    config.data.augment.update(data["augment"])
  return config


def make_iterator(sources, config, seed=0, dims=None, **kwargs):
  spec = pipeline.Spec.from_config(config, dims)
  return pipeline.make_train_iterator(sources, spec, list(sources), seed=seed, **kwargs)


def take(sources, config, n, **kwargs):
  it = make_iterator(sources, config, seed=kwargs.pop("seed", 0), **kwargs)
  try:
    return [next(it) for _ in range(n)]
  finally:
    it.close()


def assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for m in a:
      np.testing.assert_array_equal(a[m]["image"], b[m]["image"])
      np.testing.assert_array_equal(a[m]["label"], b[m]["label"])


@pytest.mark.parametrize(
  "dims, image_shape, label_shape",
  [
    (2, (4, 8, 8, 3), (4, 8, 8)),
    (3, (4, 8, 8, 8, 1), (4, 8, 8, 8)),  # 5 slices padded to a patch of 8
  ],
)
def test_batch_shapes_and_dtypes(sources, dims, image_shape, label_shape):
  config = make_config(dims=dims)
  config.data.patch = (8, 8, 8)
  (batch,) = take(sources, config, 1)
  assert list(batch) == ["ct", "mr"]
  for modality in batch:
    assert batch[modality]["image"].shape == image_shape
    assert batch[modality]["image"].dtype == np.float32
    assert batch[modality]["label"].shape == label_shape
    assert batch[modality]["label"].dtype == np.int32


@pytest.mark.parametrize("name, dims, ndim", [("unet3d", None, 5), ("unet3d", 2, 4)])
def test_dims_follow_the_model_name_unless_given(sources, name, dims, ndim):
  config = make_config()
  config.model.name = name
  (batch,) = take(sources, config, 1, dims=dims)
  assert batch["ct"]["image"].ndim == ndim


def test_neighbours_become_channels_with_edges_replicated(tmp_path):
  image, _ = indexed_volume(slices=4)
  label = np.broadcast_to(np.arange(4, dtype=np.uint8), image.shape)
  entry = save_entry(tmp_path, "ct_0", image, label)
  seen = set()
  for batch in take({"ct": [entry]}, make_config(batch=8), 3):
    for x, y in zip(batch["ct"]["image"], batch["ct"]["label"]):
      k = int(x[0, 0, 1])
      assert np.all(x == np.array([max(k - 1, 0), k, min(k + 1, 3)], np.float32))
      assert np.all(y == k)
      seen.add(k)
  assert seen == {0, 1, 2, 3}


@pytest.mark.parametrize("dims", [2, 3])
def test_foreground_fraction_one_always_hits_foreground(tmp_path, dims):
  entries = [
    save_entry(tmp_path, f"ct_{i}", *indexed_volume(slices=12, fg_slice=3 + i)) for i in range(2)
  ]
  config = make_config(dims=dims, fg_fraction=1.0)
  for batch in take({"ct": entries}, config, 3):
    assert all(label.any() for label in batch["ct"]["label"])


def test_uniform_sampling_also_draws_background_slices(tmp_path):
  entry = save_entry(tmp_path, "ct_0", *indexed_volume(slices=12, fg_slice=3))
  labels = np.concatenate([b["ct"]["label"] for b in take({"ct": [entry]}, make_config(), 3)])
  assert not all(label.any() for label in labels)


def test_same_seed_same_batches_and_independent_modalities(tmp_path, sources):
  config = make_config()
  first = take(sources, config, 3)
  assert_same(first, take(sources, config, 3))
  other = take(sources, config, 1, seed=1)[0]
  assert not np.array_equal(other["ct"]["image"], first[0]["ct"]["image"])
  # The same files under two modality names still give two different streams.
  entry = sources["ct"][0]
  (batch,) = take({"ct": [entry], "mr": [entry]}, config, 1)
  assert not np.array_equal(batch["ct"]["image"], batch["mr"]["image"])


def test_hosts_split_the_global_batch(sources):
  config = make_config(batch=4)
  whole = take(sources, config, 2)
  parts = [take(sources, config, 2, shard_index=h, shard_count=2) for h in range(2)]
  for step, batch in enumerate(whole):
    for m in batch:
      for key in ("image", "label"):
        joined = np.concatenate([parts[h][step][m][key] for h in range(2)])
        np.testing.assert_array_equal(joined, batch[m][key])


def test_starting_at_a_step_resumes_exactly(sources):
  """A resumed run starts its dataset at the step it resumes from: the same batches follow."""
  config = make_config()
  whole = take(sources, config, 5, seed=3)
  assert_same(whole[3:], take(sources, config, 2, seed=3, start_step=3))


def test_resume_on_another_number_of_hosts(sources):
  """One host for 2 steps, then 2 hosts from step 2: together they yield the 1-host batches."""
  config = make_config(batch=4)
  whole = take(sources, config, 4, seed=1)
  parts = [
    take(sources, config, 2, seed=1, start_step=2, shard_index=h, shard_count=2) for h in (0, 1)
  ]
  for k in range(2):
    for m in whole[2 + k]:
      joined = np.concatenate([parts[h][k][m]["image"] for h in (0, 1)])
      np.testing.assert_array_equal(joined, whole[2 + k][m]["image"])


def test_worker_processes_give_the_same_batches(sources):
  config = make_config(dims=3, augment=dict(flip=(0, 1), rotate=10.0))
  in_process = take(sources, config, 3)
  config.data.workers = 2
  # Copy out of grain's shared memory before the iterator is closed.
  with_workers = [
    {m: {k: np.array(v) for k, v in b[m].items()} for m in b} for b in take(sources, config, 3)
  ]
  assert_same(in_process, with_workers)


def test_augmentation_moves_image_and_label_together():
  rng = np.random.default_rng(0)
  label = np.zeros((32, 32, 4), np.int32)
  label[4:20, 8:14] = 2
  image = label.astype(np.float32)[..., None]
  aug = dict(flip=(0, 1), rotate=20.0, scale=0.2, intensity=0.0)
  for seed in range(5):
    x, y = pipeline.augment(image, label, np.random.default_rng(seed), aug)
    assert x.shape == image.shape and x.dtype == np.float32
    assert y.shape == label.shape and y.dtype == np.int32
    assert set(np.unique(y)) <= {0, 2}
    assert np.mean((x[..., 0] > 1.0) == (y > 0)) > 0.97
  jittered, same = pipeline.augment(
    image, label, rng, dict(flip=(), rotate=0.0, scale=0.0, intensity=0.1)
  )
  assert np.array_equal(same, label) and not np.array_equal(jittered, image)


def test_augmentation_is_off_by_default(tmp_path):
  image, label = indexed_volume(slices=3, fg_slice=1)
  entry = save_entry(tmp_path, "ct_0", image, label)
  for x in take({"ct": [entry]}, make_config(), 1)[0]["ct"]["image"]:
    assert np.all(x == x[0, 0])


@pytest.mark.parametrize(
  "change, match",
  [
    (dict(batch_size=3, shard_count=2), "batch_size 3 is not divisible by shard_count 2"),
    (dict(patch=(16, 8, 4), dims=3), "data.patch"),
    (dict(augment=dict(flipp=True)), "data.augment has keys"),
    (dict(fg_fraction=1.5), "data.fg_fraction"),
    (dict(model_name="vnet"), "model.name='vnet' is not one of"),
    (dict(augment=dict(scale=1.5)), "data.augment.scale"),
    (dict(empty="mr"), "sources\\['mr'\\] is empty"),
    (dict(unlabelled=True), "training needs a label"),
  ],
)
def test_bad_config_is_named(sources, change, match):
  config = make_config(dims=change.pop("dims", 2))
  config.batch_size = change.pop("batch_size", 4)
  config.model.name = change.pop("model_name", config.model.name)
  shard_count = change.pop("shard_count", 1)
  if change.pop("empty", None):
    sources["mr"] = []
  if change.pop("unlabelled", False):
    sources["ct"][0]["label"] = None
  for key, value in change.items():
    if key == "augment":
      config.data.augment.update(value)
    else:
      config.data[key] = value
  with pytest.raises(DataError, match=match):
    make_iterator(sources, config, seed=0, shard_count=shard_count)


def test_warp_matches_scipy_affine_transform():
  scipy_ndimage = pytest.importorskip("scipy.ndimage")
  rng = np.random.default_rng(4)
  image = rng.random((20, 16, 3)).astype(np.float32)
  label = rng.integers(0, 4, (20, 16))
  angle = np.deg2rad(17.0)
  matrix = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]]) / 1.1
  centre = (np.array([20, 16]) - 1) / 2
  offset = centre - matrix @ centre
  for c in range(3):
    expected = scipy_ndimage.affine_transform(
      image[..., c], matrix, offset=offset, order=1, mode="constant", cval=-1.0
    )
    inside = expected != -1.0  # scipy treats the last half pixel at the border differently
    np.testing.assert_allclose(
      pipeline.warp(image, matrix, 1, -1.0)[..., c][inside], expected[inside], atol=1e-5
    )
  expected = scipy_ndimage.affine_transform(label, matrix, offset=offset, order=0)
  inner = (slice(2, -2), slice(2, -2))
  np.testing.assert_array_equal(pipeline.warp(label, matrix, 0, 0)[inner], expected[inner])


# --- slices larger than data.size (data.spacing) --------------------------------------------


def positional_volume(rows, cols, slices=5):
  """Pixel (r, c) of slice k holds 10000 k + 100 r + c: a sample tells where it was cut."""
  r, c, k = np.meshgrid(np.arange(rows), np.arange(cols), np.arange(slices), indexing="ij")
  return (10000 * k + 100 * r + c).astype(np.float32), np.zeros((rows, cols, slices), np.uint8)


def test_windows_of_data_size_are_cut_from_larger_slices(tmp_path):
  entries = [
    save_entry(tmp_path, "ct_0", *positional_volume(20, 13)),
    save_entry(tmp_path, "ct_1", *positional_volume(8, 30)),
  ]
  origins = set()
  for batch in take({"ct": entries}, make_config(batch=8), 4):
    assert batch["ct"]["image"].shape == (8, 8, 8, 3) and batch["ct"]["label"].shape == (8, 8, 8)
    for x in batch["ct"]["image"]:
      k, r0, c0 = int(x[0, 0, 1]) // 10000, int(x[0, 0, 1]) % 10000 // 100, int(x[0, 0, 1]) % 100
      rows, cols = np.arange(r0, r0 + 8)[:, None], np.arange(c0, c0 + 8)[None, :]
      for channel, j in enumerate((max(k - 1, 0), k, min(k + 1, 4))):
        assert np.array_equal(x[..., channel], 10000 * j + 100 * rows + cols)
      origins.add((r0, c0))
  assert len(origins) > 10  # the windows move over the slices


@pytest.mark.parametrize("dims", [2, 3])
def test_windows_of_larger_slices_hold_foreground_when_it_is_drawn(tmp_path, dims):
  """One foreground pixel per volume, in a corner of one slice: the foreground draw must find
  it inside an 8 x 8 window of a 24 x 24 (or 24 x 40) slice; the uniform draw mostly misses."""
  entries = []
  for i, (cols, pixel) in enumerate([(24, (22, 1)), (40, (3, 37))]):
    image, label = positional_volume(24, cols, slices=6)
    label[pixel[0], pixel[1], 4] = 1
    entries.append(save_entry(tmp_path, f"ct_{i}", image, label))
  hits = {}
  for fg in (1.0, 0.0):
    labels = np.concatenate(
      [b["ct"]["label"] for b in take({"ct": entries}, make_config(dims, 8, fg_fraction=fg), 3)]
    )
    assert labels.shape[1:3] == (8, 8)
    hits[fg] = np.mean([label.any() for label in labels])
  assert hits[1.0] == 1.0 and hits[0.0] < 0.2


def test_slices_smaller_than_data_size_are_refused(sources):
  config = make_config()
  config.data.size = (8, 16)
  with pytest.raises(DataError, match=r"data.size \(8, 16\) is larger in-plane than the prepared"):
    make_iterator(sources, config)
