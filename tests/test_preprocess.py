"""Network-space preparation: normalisation, crop, resize, exact restore and the on-disk cache."""

import collections
import hashlib
import os

import numpy as np
import pytest

from ukd import config as config_lib
from ukd.data import preprocess
from ukd.data.adapters import Adapter
from ukd.data.io.volumes import from_array
from ukd.errors import ConfigError, DataError

Case = collections.namedtuple("Case", "id modality image label")


def make_cfg(**overrides) -> dict:
  """{modality: Preprocessing} of a checked config with these `data` settings."""
  config = config_lib.default()
  config.data.update(
    dict(
      size=(32, 32),
      slice_axis=2,
      crop="none",
      crop_margin=2,
      spacing="",
      norm=dict(
        ct=dict(kind="window", window=(-1000.0, 1000.0)),
        mr=dict(kind="zscore", percentiles=(0.5, 99.5)),
      ),
    )
  )
  config.data.update(overrides)
  return config_lib.preprocessing(config_lib.check(config))


def blob_label(shape=(16, 16, 4)):
  """Two classes in a box off-centre, so crops and axis moves are visible."""
  label = np.zeros(shape, np.int32)
  label[3:9, 5:12, 1:3] = 1
  label[4:6, 6:8, 2] = 2
  return label


def test_window_scales_to_unit_range():
  image = np.linspace(-2000, 2000, 16 * 16 * 4, dtype=np.float32).reshape(16, 16, 4)
  out = preprocess.prepare(from_array(image), None, make_cfg(size=(16, 16))["ct"]).image
  assert out.dtype == np.float32
  assert out.min() == -1.0 and out.max() == 1.0
  assert np.allclose(out, np.clip(image, -1000, 1000) / 1000.0, atol=1e-6)


def test_zscore_clips_outliers_then_standardises():
  rng = np.random.default_rng(0)
  image = rng.normal(100.0, 20.0, (16, 16, 4)).astype(np.float32)
  image[0, 0, 0] = 1e6
  out = preprocess.prepare(from_array(image), None, make_cfg(size=(16, 16))["mr"]).image
  assert abs(out.mean()) < 1e-4 and abs(out.std() - 1.0) < 1e-3
  assert out.max() < 4.0  # the outlier was clipped at the 99.5th percentile


@pytest.mark.parametrize(
  "change, message",
  [
    (
      lambda c: c.data.norm.mr.update(kind="minmax"),
      "config.data.norm.mr.kind='minmax' must be one of ('window', 'zscore')",
    ),
    (
      lambda c: setattr(c.data.norm, "ct", dict(kind="window")),
      "config.data.norm.ct of kind 'window' needs window=(low, high)",
    ),
    (
      lambda c: c.data.norm.ct.update(window=(5.0, 1.0)),
      "config.data.norm.ct.window=(5.0, 1.0) must satisfy low < high",
    ),
    (
      lambda c: c.data.norm.mr.update(percentiles=(1.0, 101.0)),
      "config.data.norm.mr.percentiles=(1.0, 101.0) must satisfy 0 <= low < high <= 100",
    ),
    (
      lambda c: c.data.norm.mr.update(percentiles=(0.5,)),
      "config.data.norm.mr.percentiles=(0.5,) must be two numbers (low, high)",
    ),
    (
      lambda c: setattr(c.data, "crop", "foreground"),
      "config.data.crop='foreground' must be one of ('none', 'body')",
    ),
  ],
)
def test_preprocessing_settings_are_checked_with_the_config(change, message):
  """Preparation reads its settings unchecked: the config check names a bad one first."""
  config = config_lib.default()
  change(config)
  with pytest.raises(ConfigError) as error:
    config_lib.check(config)
  assert str(error.value) == message


def test_body_crop_finds_the_body_without_a_label():
  rng = np.random.default_rng(1)
  image = rng.normal(-1000.0, 5.0, (60, 50, 10)).astype(np.float32)  # air
  image[20:40, 10:30] = 40.0  # soft tissue
  prep = preprocess.prepare(from_array(image), None, make_cfg(crop="body")["ct"])
  assert prep.geometry["crop_box"] == [[18, 42], [8, 32]]


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
@pytest.mark.parametrize("crop", ["none", "body"])
def test_shapes_round_trip_for_any_axis_and_crop(slice_axis, crop):
  rng = np.random.default_rng(2)
  label = blob_label((37, 23, 11))
  image = rng.normal(size=label.shape) + 5 * label
  cfg = make_cfg(size=(24, 40), slice_axis=slice_axis, crop=crop)
  prep = preprocess.prepare(from_array(image), from_array(label), cfg["mr"])
  slices = label.shape[slice_axis]
  assert prep.image.shape == prep.label.shape == (24, 40, slices)
  assert prep.label.dtype == np.int32
  assert set(np.unique(prep.label)) <= {0, 1, 2}
  assert preprocess.restore(prep.label, prep.geometry, is_label=True).shape == label.shape
  probs = np.zeros(prep.label.shape + (3,), np.float32)
  assert preprocess.restore(probs, prep.geometry, is_label=False).shape == label.shape + (3,)


@pytest.mark.parametrize("slice_axis", [0, 2])
def test_integer_upsampling_restores_the_label_exactly(slice_axis):
  label = blob_label()
  cfg = make_cfg(size=(32, 32) if slice_axis == 2 else (32, 16), slice_axis=slice_axis)
  prep = preprocess.prepare(from_array(label.astype(np.float32)), from_array(label), cfg["ct"])
  assert set(np.unique(prep.label)) == {0, 1, 2}
  assert np.array_equal(preprocess.restore(prep.label, prep.geometry, is_label=True), label)
  one_hot = np.eye(3, dtype=np.float32)[prep.label]
  probs = preprocess.restore(one_hot, prep.geometry, is_label=False)
  assert np.array_equal(probs.argmax(-1), label)


def test_cropped_away_region_is_background_with_probability_one():
  image = np.full((40, 30, 4), -1000.0, np.float32)  # air
  image[5:15, 8:20] = 40.0  # the body
  prep = preprocess.prepare(from_array(image), None, make_cfg(crop="body", crop_margin=0)["ct"])
  assert prep.geometry["crop_box"] == [[5, 15], [8, 20]]
  probs = np.full(prep.image.shape + (3,), 1 / 3, np.float32)
  restored = preprocess.restore(probs, prep.geometry, is_label=False)
  (r0, r1), (c0, c1) = prep.geometry["crop_box"]
  outside = np.ones(image.shape, bool)
  outside[r0:r1, c0:c1] = False
  assert np.all(restored[outside] == [1.0, 0.0, 0.0])
  assert np.allclose(restored[~outside], 1 / 3)


def test_restore_rejects_a_wrong_shape():
  prep = preprocess.prepare(from_array(np.zeros((8, 8, 3))), None, make_cfg()["ct"])
  with pytest.raises(DataError, match="restore expects labels"):
    preprocess.restore(np.zeros((32, 32, 4)), prep.geometry, is_label=True)


class NpyAdapter(Adapter):
  """Reads .npy pairs and counts reads, so tests can see cache hits."""

  classes = ("background", "a", "b")

  def __init__(self, **options):
    super().__init__(**options)
    self.reads = 0

  def read(self, case):
    self.reads += 1
    label = None if case.label is None else from_array(np.load(case.label))
    return from_array(np.load(case.image), source=case.image), label


def write_case(tmp_path, name="ct_1", labelled=True):
  label = blob_label()
  image_path = os.path.join(tmp_path, f"{name}_image.npy")
  np.save(image_path, 100.0 * label.astype(np.float32))
  label_path = None
  if labelled:
    label_path = os.path.join(tmp_path, f"{name}_label.npy")
    np.save(label_path, label)
  return Case(name, "ct", image_path, label_path)


def test_cache_writes_entry_and_reuses_it(tmp_path):
  case, adapter, cache = write_case(tmp_path), NpyAdapter(), str(tmp_path / "cache")
  first = preprocess.cache_case(adapter, case, make_cfg()[case.modality], cache)
  assert first["id"] == "ct_1" and first["modality"] == "ct"
  assert np.load(first["image"]).shape == (32, 32, 4)
  assert np.load(first["label"]).max() == 2
  second = preprocess.cache_case(adapter, case, make_cfg()[case.modality], cache)
  assert adapter.reads == 1
  assert second == first
  assert os.listdir(cache) == [os.path.basename(os.path.dirname(first["image"]))]


def test_cache_misses_when_a_setting_or_the_file_changes(tmp_path):
  case, adapter, cache = write_case(tmp_path), NpyAdapter(), str(tmp_path / "cache")
  first = preprocess.cache_case(adapter, case, make_cfg()[case.modality], cache)
  other = preprocess.cache_case(adapter, case, make_cfg(size=(16, 16))[case.modality], cache)
  assert adapter.reads == 2 and other["image"] != first["image"]
  norm = dict(
    ct=dict(kind="window", window=(-500.0, 500.0)), mr=dict(kind="zscore", percentiles=(0.5, 99.5))
  )
  preprocess.cache_case(adapter, case, make_cfg(norm=norm)[case.modality], cache)
  assert adapter.reads == 3
  stat = os.stat(case.image)
  os.utime(case.image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  preprocess.cache_case(adapter, case, make_cfg()[case.modality], cache)
  assert adapter.reads == 4


def test_unlabelled_case_has_no_label_entry(tmp_path):
  case = write_case(tmp_path, labelled=False)
  entry = preprocess.cache_case(
    NpyAdapter(), case, make_cfg()[case.modality], str(tmp_path / "cache")
  )
  assert entry["label"] is None and os.path.exists(entry["image"])


def test_failed_write_leaves_no_entry(tmp_path, monkeypatch):
  case, cache = write_case(tmp_path), str(tmp_path / "cache")

  def write_half_then_fail(directory, prepared):
    np.save(os.path.join(directory, "image.npy"), prepared.image)
    raise KeyboardInterrupt

  monkeypatch.setattr(preprocess, "_write_entry", write_half_then_fail)
  with pytest.raises(KeyboardInterrupt):
    preprocess.cache_case(NpyAdapter(), case, make_cfg()[case.modality], cache)
  assert os.listdir(cache) == []


def test_cache_cases_keeps_order(tmp_path):
  cases = [write_case(tmp_path, f"ct_{i}") for i in range(3)]
  entries = preprocess.cache_cases(
    NpyAdapter(), cases, make_cfg()[cases[0].modality], str(tmp_path / "c"), workers=2
  )
  assert [e["id"] for e in entries] == ["ct_0", "ct_1", "ct_2"]


def test_a_label_rewritten_with_the_same_size_and_mtime_is_not_reused(tmp_path):
  case, adapter, cache = write_case(tmp_path), NpyAdapter(), str(tmp_path / "cache")
  first = preprocess.cache_case(adapter, case, make_cfg()[case.modality], cache)
  before = os.stat(case.label)
  edited = blob_label()
  edited[edited == 2] = 1  # same dtype and shape: the file keeps its size
  np.save(case.label, edited)
  os.utime(case.label, ns=(before.st_atime_ns, before.st_mtime_ns))
  after = os.stat(case.label)
  assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
  second = preprocess.cache_case(adapter, case, make_cfg()[case.modality], cache)
  assert adapter.reads == 2 and second["label"] != first["label"]
  assert np.load(first["label"]).max() == 2 and np.load(second["label"]).max() == 1


def test_large_files_are_fingerprinted_by_their_first_and_last_mib(tmp_path, monkeypatch):
  monkeypatch.setattr(preprocess, "_SAMPLE_BYTES", 4)
  path = tmp_path / "f.bin"
  path.write_bytes(b"head" + b"middle" + b"tail")
  key = preprocess._fingerprint(str(path))
  assert key[2] == hashlib.sha256(b"headtail").hexdigest()
  path.write_bytes(b"head" + b"MIDDLE" + b"tail")  # the middle is not read
  assert preprocess._fingerprint(str(path))[2] == key[2]
  path.write_bytes(b"head" + b"middle" + b"TAIL")
  assert preprocess._fingerprint(str(path))[2] != key[2]
  path.write_bytes(b"headtail")  # up to twice the sample: the whole file
  assert preprocess._fingerprint(str(path))[2] == hashlib.sha256(b"headtail").hexdigest()


def test_the_label_code_table_and_unknown_label_rule_are_part_of_the_key(tmp_path):
  case = write_case(tmp_path)
  keys = {preprocess.cache_key(NpyAdapter(), case, make_cfg()[case.modality])}
  keys.add(
    preprocess.cache_key(NpyAdapter(ignore_unknown_labels=True), case, make_cfg()[case.modality])
  )

  class Recoded(NpyAdapter):
    def code_table(self, modality):
      return {0: 0, 1: 2, 2: 1}

  keys.add(preprocess.cache_key(Recoded(), case, make_cfg()[case.modality]))
  assert len(keys) == 3


@pytest.mark.parametrize("crop, spacing", [("none", ""), ("body", ""), ("none", "0.8x2.5")])
def test_chunked_restore_and_argmax_equal_the_whole_volume_at_once(crop, spacing, monkeypatch):
  rng = np.random.default_rng(0)
  image = from_array(rng.normal(0, 300, (20, 7, 13)).astype(np.float32))
  cfg = make_cfg(size=(8, 6), slice_axis=1, crop=crop, spacing=spacing)
  prep = preprocess.prepare(image, None, cfg["ct"])
  # 20 x 13 mm at 0.8 x 2.5 mm: 25 x 5 pixels, the columns padded to 6.
  assert prep.geometry["plane"] == ([25, 6] if spacing else [8, 6])
  probs = rng.dirichlet(np.ones(4), size=(*prep.geometry["plane"], 7)).astype(np.float32)
  whole = preprocess.restore(probs, prep.geometry, is_label=False)
  # 20 x 13 voxels x 4 classes x 4 bytes per slice: 3 slices per run, the last run shorter.
  monkeypatch.setattr(preprocess, "RESTORE_CHUNK_BYTES", 3 * 20 * 13 * 4 * 4)
  labels, kept = preprocess.restore_labels(probs, prep.geometry, probabilities=True)
  assert np.array_equal(kept, whole)
  assert labels.dtype == np.uint8 and np.array_equal(labels, np.argmax(whole, -1))
  assert preprocess.restore_labels(probs, prep.geometry)[1] is None


# --- data.spacing: millimetres per pixel -------------------------------------------------------


def test_spacing_resamples_the_crop_box_and_pads_up_to_size():
  """10 x 6 pixels of 2 x 3 mm at 1 x 1.5 mm: 20 x 12 pixels, centred in the 32 x 32 plane."""
  label = np.zeros((10, 6, 3), np.int32)
  label[2:7, 1:4, 1] = 2
  image = np.where(label > 0, 500.0, -200.0).astype(np.float32)
  affine = np.diag([2.0, 3.0, 1.0, 1.0])
  prep = preprocess.prepare(
    from_array(image, affine), from_array(label, affine), make_cfg(spacing="1x1.5")["ct"]
  )
  g = prep.geometry
  assert (g["plane"], g["content_box"], g["size"]) == ([32, 32], [[6, 26], [10, 22]], [32, 32])
  assert g["target_spacing"] == [1.0, 1.5] and g["crop_box"] == [[0, 10], [0, 6]]
  assert prep.image.shape == prep.label.shape == (32, 32, 3)
  inside = np.zeros((32, 32), bool)
  inside[6:26, 10:22] = True
  # Padding: the volume's minimum (-200 HU -> -0.2) and background; each pixel doubled inside.
  assert np.all(prep.image[~inside] == prep.image.min()) and np.isclose(prep.image.min(), -0.2)
  assert not prep.label[~inside].any()
  assert np.array_equal(prep.label[6:26, 10:22], label.repeat(2, 0).repeat(2, 1))
  assert np.array_equal(preprocess.restore(prep.label, g, is_label=True), label)
  probs = preprocess.restore(np.eye(3, dtype=np.float32)[prep.label], g, is_label=False)
  assert probs.shape == label.shape + (3,) and np.array_equal(probs.argmax(-1), label)


def test_a_plane_larger_than_size_is_kept_and_sizes_round_half_up():
  """40 x 30 pixels of 1 mm at 4 x 0.5 mm: 10 rows (padded to 16) by 60 columns (kept);
  5 rows at 2 mm would be 2.5 pixels, rounded up to 3."""
  label = np.zeros((40, 30, 2), np.int32)
  label[8:20, 5:17] = 1  # row blocks of 4: the 4x coarser rows still hold the label exactly
  cfg = make_cfg(size=(16, 16), spacing="4x0.5")
  prep = preprocess.prepare(from_array(label.astype(np.float32)), from_array(label), cfg["ct"])
  g = prep.geometry
  assert (g["plane"], g["content_box"]) == ([16, 60], [[3, 13], [0, 60]])
  assert prep.image.shape == (16, 60, 2)
  assert np.array_equal(preprocess.restore(prep.label, g, is_label=True), label)
  small = preprocess.prepare(from_array(np.zeros((5, 4, 1))), None, make_cfg(spacing="2")["ct"])
  assert small.geometry["content_box"] == [[14, 17], [15, 17]]  # 3 x 2 pixels, centred in 32


def test_images_shrunk_in_plane_are_smoothed_first_so_their_noise_does_not_alias():
  """White noise at 0.7 mm resampled to 2.8 mm. A linear resize alone averages the 2 x 2
  pixels around each output centre: std 1/2 of the input's. Smoothing first with a Gaussian
  of sigma (4 - 1) / 2 = 1.5 pixels leaves 1 / (2 sqrt(pi) 1.5) = 0.188 of it; neighbours are
  then correlated by exp(-1 / (4 sigma^2)) = 0.895, so the 2 x 2 average keeps (1 + 0.895) / 2
  of the variance per axis: 0.188 x 0.947 = 0.178 in all. The slice axis is not smoothed."""
  noise = np.random.default_rng(0).normal(0.0, 100.0, (400, 400, 3)).astype(np.float32)
  noise[..., 1] = 0.0  # a slice without noise stays without: slices are not mixed
  affine = np.diag([0.7, 0.7, 2.0, 1.0])
  prep = preprocess.prepare(from_array(noise, affine), None, make_cfg(spacing="2.8")["ct"])
  assert prep.geometry["plane"] == [100, 100]
  kept = prep.image[5:-5, 5:-5].std(axis=(0, 1)) / (noise / 1000.0).std(axis=(0, 1)).clip(1e-9)
  assert kept[1] == 0.0
  np.testing.assert_allclose(kept[[0, 2]], 0.178, rtol=0.06)


def test_spacing_applies_to_the_body_box_and_per_modality():
  image = np.full((60, 50, 4), -1000.0, np.float32)
  image[20:40, 10:30] = 40.0  # a 20 x 20 pixel body of 0.5 mm: 10 mm
  affine = np.diag([0.5, 0.5, 3.0, 1.0])
  cfg = make_cfg(crop="body", crop_margin=0, size=(8, 8), spacing="ct=0.25,mr=2")
  ct = preprocess.prepare(from_array(image, affine), None, cfg["ct"]).geometry
  assert ct["crop_box"] == [[20, 40], [10, 30]] and ct["plane"] == [40, 40]
  mr = preprocess.prepare(from_array(image, affine), None, cfg["mr"]).geometry
  assert mr["plane"] == [8, 8] and mr["content_box"] == [[1, 6], [1, 6]]


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
@pytest.mark.parametrize("crop", ["none", "body"])
def test_spacing_shapes_round_trip_for_any_axis_and_crop(slice_axis, crop):
  """Factors that are not whole numbers still come back onto exactly the input grid."""
  rng = np.random.default_rng(2)
  label = blob_label((37, 23, 11))
  image = rng.normal(size=label.shape) + 5 * label
  affine = np.diag([0.7, 1.3, 2.5, 1.0])
  cfg = make_cfg(size=(16, 16), slice_axis=slice_axis, crop=crop, spacing="1.1")
  prep = preprocess.prepare(from_array(image, affine), from_array(label, affine), cfg["mr"])
  slices = label.shape[slice_axis]
  assert prep.image.shape == prep.label.shape == (*prep.geometry["plane"], slices)
  if crop == "none":  # e.g. slice axis 2: 37 x 0.7 / 1.1 = 23.5 -> 24, 23 x 1.3 / 1.1 = 27.2 -> 27
    planes = {0: [27, 25], 1: [24, 25], 2: [24, 27]}  # 11 x 2.5 / 1.1 = 25
    assert prep.geometry["plane"] == planes[slice_axis]
  assert preprocess.restore(prep.label, prep.geometry, is_label=True).shape == label.shape
  probs = np.zeros(prep.label.shape + (3,), np.float32)
  assert preprocess.restore(probs, prep.geometry, is_label=False).shape == label.shape + (3,)


def test_the_cache_key_covers_the_spacing_of_the_cases_modality(tmp_path):
  case = write_case(tmp_path)  # a ct case
  key = {
    s: preprocess.cache_key(NpyAdapter(), case, make_cfg(spacing=s)[case.modality])
    for s in ("", "1", "ct=1,mr=2", "ct=2,mr=1", "1x2")
  }
  assert len({key[""], key["1"], key["ct=2,mr=1"], key["1x2"]}) == 4
  assert key["1"] == key["ct=1,mr=2"]  # the mr spacing does not change a ct entry
