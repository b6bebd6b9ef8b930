"""Geometry round trips and input validation of ukd.data.io.volumes."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from ukd.data.io import volumes
from ukd.errors import DataError


def _save(path, data, affine, code=1, dtype=None):
  image = nib.Nifti1Image(data, affine, dtype=dtype)
  image.set_sform(affine, code=code)
  image.set_qform(affine, code=code)
  nib.save(image, str(path))
  return str(path)


# LPS storage (as DICOM converters often write): x and y run to patient left/posterior.
LPS = np.array([[-0.5, 0, 0, 10.0], [0, -0.7, 0, 20.0], [0, 0, 2.0, -30.0], [0, 0, 0, 1]])


def _oblique():
  """Voxel axis 0 runs Superior, axis 1 Left, axis 2 Anterior, all tilted by 10 degrees."""
  permute = np.array([[0, -1, 0], [0, 0, 1], [1, 0, 0]], dtype=float)  # columns: S, L, A
  angle = np.deg2rad(10)
  tilt = np.array(
    [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
  )
  affine = np.eye(4)
  affine[:3, :3] = tilt @ permute @ np.diag([2.0, 0.5, 0.8])
  affine[:3, 3] = [5.0, -6.0, 7.0]
  return affine


def _data(shape=(2, 3, 4)):
  return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def test_lps_file_is_flipped_to_ras(tmp_path):
  data = _data()
  volume = volumes.read_image(_save(tmp_path / "lps.nii.gz", data, LPS))
  np.testing.assert_array_equal(volume.array, data[::-1, ::-1, :])
  assert volume.array.dtype == np.float32
  assert volume.spacing == pytest.approx((0.5, 0.7, 2.0))
  assert volume.original_shape == (2, 3, 4)
  np.testing.assert_allclose(volume.affine, LPS, atol=1e-6)


def test_oblique_file_is_transposed_and_flipped(tmp_path):
  data = _data()
  volume = volumes.read_image(_save(tmp_path / "oblique.nii", data, _oblique()))
  # canonical[i, j, k] = data[k, n1 - 1 - i, j]: R <- flipped axis 1, A <- axis 2, S <- axis 0.
  expected = np.transpose(data[:, ::-1, :], (1, 2, 0))
  assert volume.array.shape == (3, 4, 2)
  np.testing.assert_array_equal(volume.array, expected)
  assert volume.spacing == pytest.approx((0.5, 0.8, 2.0))


@pytest.mark.parametrize("affine", [LPS, _oblique()], ids=["lps", "oblique"])
def test_write_like_reproduces_the_original_file(tmp_path, affine):
  data = _data()
  source = _save(tmp_path / "in.nii.gz", data, affine, code=1)
  volume = volumes.read_image(source)
  out = tmp_path / "sub" / "out.nii.gz"
  volumes.write_like(volume.array, volume, out, dtype=np.float32)
  written = nib.load(str(out))
  np.testing.assert_array_equal(written.get_fdata(), data)
  np.testing.assert_array_equal(written.affine, nib.load(source).affine)
  assert written.shape == data.shape
  assert int(written.header["sform_code"]) == 1
  assert int(written.header["qform_code"]) == 1


def test_write_like_label_ignores_input_intensity_scaling(tmp_path):
  """A CT stored as int16 with intercept -1024 must not shift the written labels."""
  image = nib.Nifti1Image(np.zeros((2, 3, 4), np.int16), LPS)
  image.header.set_slope_inter(1.0, -1024.0)
  nib.save(image, str(tmp_path / "ct.nii.gz"))
  volume = volumes.read_image(tmp_path / "ct.nii.gz")
  assert volume.array.max() == -1024.0
  labels = np.zeros(volume.array.shape, np.int32)
  labels[0, 1, 2] = 3
  volumes.write_like(labels, volume, tmp_path / "pred.nii.gz")
  written = nib.load(str(tmp_path / "pred.nii.gz"))
  assert written.get_data_dtype() == np.uint8
  on_disk = np.asanyarray(written.dataobj)
  assert on_disk.dtype == np.uint8
  # Canonical (0, 1, 2) came from disk (1, 1, 2) because x and y are flipped (size 2 and 3).
  assert on_disk[1, 1, 2] == 3 and on_disk.sum() == 3


def test_write_like_probabilities_with_trailing_class_axis(tmp_path):
  data = _data()
  volume = volumes.read_image(_save(tmp_path / "in.nii.gz", data, _oblique()))
  probs = np.stack([volume.array, -volume.array], axis=-1) / 100.0
  volumes.write_like(probs, volume, tmp_path / "probs.nii.gz", dtype=np.float32)
  written = nib.load(str(tmp_path / "probs.nii.gz"))
  assert written.shape == (2, 3, 4, 2)
  np.testing.assert_allclose(written.get_fdata()[..., 0], data / 100.0, rtol=1e-6)
  np.testing.assert_allclose(written.get_fdata()[..., 1], -data / 100.0, rtol=1e-6)


def test_write_like_refuses_values_that_do_not_fit(tmp_path):
  volume = volumes.from_array(np.zeros((2, 2, 2)))
  with pytest.raises(DataError, match="big.nii.gz"):
    volumes.write_like(np.full((2, 2, 2), 300), volume, tmp_path / "big.nii.gz")


def test_from_array_identity_keeps_the_array():
  data = _data()
  volume = volumes.from_array(data)
  np.testing.assert_array_equal(volume.array, data)
  assert volume.spacing == (1.0, 1.0, 1.0)
  assert volume.header is None and volume.source == "<array>"
  np.testing.assert_array_equal(volume.to_original(data), data)


def test_from_array_with_affine_reorients_and_inverts():
  data = _data()
  volume = volumes.from_array(data, LPS)
  np.testing.assert_array_equal(volume.array, data[::-1, ::-1, :])
  np.testing.assert_array_equal(volume.to_original(volume.array), data)


def test_from_array_written_without_header(tmp_path):
  volume = volumes.from_array(_data(), LPS)
  volumes.write_like(volume.array, volume, tmp_path / "a.nii.gz", dtype=np.float32)
  written = nib.load(str(tmp_path / "a.nii.gz"))
  np.testing.assert_array_equal(written.get_fdata(), _data())
  np.testing.assert_allclose(written.affine, LPS, atol=1e-6)


def test_trailing_singleton_axis_is_squeezed(tmp_path):
  path = _save(tmp_path / "one.nii.gz", _data()[..., None], LPS)
  assert volumes.read_image(path).array.shape == (2, 3, 4)


def test_label_is_int32_raw_codes(tmp_path):
  image = volumes.read_image(_save(tmp_path / "img.nii.gz", _data(), LPS))
  codes = np.zeros((2, 3, 4), np.float32)
  codes[0, 0, 0] = 820
  label = volumes.read_label(_save(tmp_path / "lab.nii.gz", codes, LPS), like=image)
  assert label.array.dtype == np.int32
  assert label.array[1, 2, 0] == 820 and label.array.sum() == 820


def test_label_affine_within_tolerance_is_accepted(tmp_path):
  image = volumes.read_image(_save(tmp_path / "img.nii.gz", _data(), LPS))
  nudged = LPS.copy()
  nudged[0, 3] += 1e-5
  label_path = _save(tmp_path / "lab.nii.gz", np.zeros((2, 3, 4), np.uint8), nudged)
  volumes.read_label(label_path, like=image)


def _corrupt(tmp_path):
  path = tmp_path / "corrupt.nii.gz"
  path.write_bytes(b"this is not a nifti file")
  return path


def _truncated(tmp_path):
  good = _save(tmp_path / "good.nii.gz", _data((8, 8, 8)), LPS)
  raw = gzip.decompress(open(good, "rb").read())
  path = tmp_path / "truncated.nii.gz"
  path.write_bytes(gzip.compress(raw)[:-200])
  return path


@pytest.mark.parametrize(
  "make, name, problem",
  [
    (lambda d: d / "missing.nii.gz", "missing.nii.gz", "not found"),
    (_corrupt, "corrupt.nii.gz", "cannot read"),
    (_truncated, "truncated.nii.gz", "cannot read voxel data"),
    (
      lambda d: _save(d / "flat.nii.gz", np.zeros((4, 5), np.float32), np.eye(4)),
      "flat.nii.gz",
      "3D",
    ),
    (
      lambda d: _save(d / "four.nii.gz", np.zeros((2, 2, 2, 2), np.float32), np.eye(4)),
      "four.nii.gz",
      "3D",
    ),
    (
      lambda d: _save(d / "nan.nii.gz", np.full((2, 2, 2), np.nan, np.float32), np.eye(4)),
      "nan.nii.gz",
      "NaN",
    ),
  ],
)
def test_bad_images_raise_one_line_data_error(tmp_path, make, name, problem):
  with pytest.raises(DataError) as info:
    volumes.read_image(make(tmp_path))
  message = str(info.value)
  assert isinstance(info.value, ValueError)
  assert name in message and problem in message
  assert "\n" not in message


@pytest.mark.parametrize(
  "shape, affine, values, problem",
  [
    ((2, 3, 5), LPS, 0.0, "shape"),
    ((2, 3, 4), np.diag([0.5, 0.7, 2.0, 1.0]), 0.0, "affine"),
    ((2, 3, 4), LPS, 0.5, "integers"),
  ],
  ids=["shape", "affine", "fraction"],
)
def test_bad_labels_raise_data_error(tmp_path, shape, affine, values, problem):
  image = volumes.read_image(_save(tmp_path / "img.nii.gz", _data(), LPS))
  label_path = _save(tmp_path / "bad_label.nii.gz", np.full(shape, values, np.float32), affine)
  with pytest.raises(DataError, match=problem) as info:
    volumes.read_label(label_path, like=image)
  assert "bad_label.nii.gz" in str(info.value) and "\n" not in str(info.value)


def test_from_array_rejects_2d():
  with pytest.raises(DataError, match="<array>.*3D"):
    volumes.from_array(np.zeros((3, 3)))


def _sform_only(path, affine, unit="mm"):
  """An sform alone: nibabel cannot store a zero voxel size in a qform."""
  image = nib.Nifti1Image(_data(), None)
  image.set_sform(affine, code=1)
  image.header.set_xyzt_units(xyz=unit)
  nib.save(image, str(path))
  return str(path)


@pytest.mark.parametrize(
  "spacing, problem",
  [
    ((1.0, 0.0, 1.0), r"\[1.0, 0.0, 1.0\] mm is outside \[0.01, 50.0\] mm"),
    ((0.5, 0.5, 0.005), r"0.005\] mm is outside"),
    ((1.0, 60.0, 1.0), r"60.0, 1.0\] mm is outside"),
  ],
  ids=["zero", "below 0.01 mm", "above 50 mm"],
)
def test_implausible_spacing_is_a_one_line_error_naming_the_file(tmp_path, spacing, problem):
  path = _sform_only(tmp_path / "odd.nii.gz", np.diag([*spacing, 1.0]))
  for read in (volumes.read_image, volumes.read_label):
    with pytest.raises(DataError, match=problem) as info:
      read(path)
    assert "odd.nii.gz" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("unit", ["meter", "micron"])
def test_spatial_units_other_than_millimetres_are_refused(tmp_path, unit):
  path = _sform_only(tmp_path / f"{unit}.nii.gz", np.diag([0.5, 0.5, 2.0, 1.0]), unit)
  with pytest.raises(DataError, match=f"{unit}.nii.gz: spatial unit is '{unit}'"):
    volumes.read_image(path)


@pytest.mark.parametrize("unit", ["mm", "unknown"])
def test_millimetres_and_unknown_units_are_read_as_mm(tmp_path, unit):
  path = _sform_only(tmp_path / f"{unit}.nii.gz", np.diag([0.5, 0.5, 2.0, 1.0]), unit)
  assert volumes.read_image(path).spacing == (0.5, 0.5, 2.0)


def test_a_write_that_fails_midway_leaves_the_old_file_whole(tmp_path, monkeypatch):
  ref = volumes.read_image(_save(tmp_path / "img.nii.gz", _data(), LPS))
  out = tmp_path / "pred.nii.gz"
  volumes.write_like(np.ones(ref.array.shape, np.uint8), ref, out)
  old = out.read_bytes()

  def half_then_fail(image, path):
    with open(path, "wb") as f:
      f.write(old[: len(old) // 2])  # what a kill mid-write leaves behind
    raise OSError("disk full")

  monkeypatch.setattr(nib, "save", half_then_fail)
  with pytest.raises(OSError, match="disk full"):
    volumes.write_like(np.zeros(ref.array.shape, np.uint8), ref, out)
  assert out.read_bytes() == old
  assert sorted(p.name for p in tmp_path.iterdir()) == ["img.nii.gz", "pred.nii.gz"]
  with pytest.raises(OSError, match="disk full"):
    volumes.write_like(np.zeros(ref.array.shape, np.uint8), ref, tmp_path / "new.nii.gz")
  assert not (tmp_path / "new.nii.gz").exists()
