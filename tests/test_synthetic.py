"""Synthetic phantoms: determinism, on-disk layouts and codes, anatomy, contrasts, geometry."""

import glob
import importlib
import json
import os

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage

from ukd.data.synthetic import generate as synthetic
from ukd.data.synthetic import phantoms
from ukd.errors import DataError

pydicom = pytest.importorskip("pydicom")
Image = pytest.importorskip("PIL.Image")

MMWHS_FOREGROUND = {205: "MYO", 420: "LAC", 500: "LVC", 820: "AA"}
MMWHS_TO_BACKGROUND = (550, 600, 850)
BTCV_FOREGROUND = {1: "spleen", 2: "right kidney", 3: "left kidney", 6: "liver"}
BTCV_TO_BACKGROUND = (4, 7, 8, 9)
ALL_CODES = {
  "cardiac": set(MMWHS_FOREGROUND) | set(MMWHS_TO_BACKGROUND),
  "abdominal": set(BTCV_FOREGROUND) | set(BTCV_TO_BACKGROUND),
}
PHANTOMS = [(a, m) for a in phantoms.ANATOMIES for m in phantoms.MODALITIES]


@pytest.fixture(scope="module")
def mmwhs_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("mmwhs")
  synthetic.write_mmwhs(root, n_ct=2, n_mr=2, seed=3)
  return root


@pytest.fixture(scope="module")
def abdominal_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("abdominal")
  synthetic.write_abdominal(root, n_ct=2, n_mr=2, seed=3)
  return root


def _files(root):
  return sorted(
    os.path.relpath(p, root) for p in glob.glob(f"{root}/**/*", recursive=True) if os.path.isfile(p)
  )


def _centroid_lps(phantom, code):
  """Mean patient (LPS) position of a structure: checks anatomy and affine together."""
  index = np.argwhere(phantom.label == code).mean(axis=0)
  return (np.diag([-1.0, -1.0, 1.0, 1.0]) @ phantom.affine @ np.append(index, 1.0))[:3]


# ------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("anatomy, modality", PHANTOMS)
def test_same_seed_same_arrays_other_seed_or_case_differs(anatomy, modality):
  first = phantoms.make_phantom(anatomy, modality, seed=5, index=1)
  again = phantoms.make_phantom(anatomy, modality, seed=5, index=1)
  for name in ("image", "label", "affine"):
    assert np.array_equal(getattr(first, name), getattr(again, name)), name
  for other in (
    phantoms.make_phantom(anatomy, modality, seed=6, index=1),
    phantoms.make_phantom(anatomy, modality, seed=5, index=2),
  ):
    assert not np.array_equal(first.label, other.label)
    assert not np.array_equal(first.image, other.image)


def test_rewriting_with_the_same_seed_gives_identical_files(tmp_path):
  for run in ("a", "b"):
    synthetic.write_mmwhs(tmp_path / run, 1, 1, seed=2)
    synthetic.write_abdominal(tmp_path / run, 1, 1, seed=2)
  names = _files(tmp_path / "a")
  assert names == _files(tmp_path / "b")
  for name in names:
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_case_does_not_depend_on_how_many_are_written(tmp_path):
  synthetic.write_mmwhs(tmp_path / "one", 1, 0, seed=4)
  synthetic.write_mmwhs(tmp_path / "three", 3, 0, seed=4)
  name = "ct_train/ct_train_1001_label.nii.gz"
  one = np.asarray(nib.load(tmp_path / "one" / name).dataobj)
  three = np.asarray(nib.load(tmp_path / "three" / name).dataobj)
  assert np.array_equal(one, three)


# ------------------------------------------------------------------------ layouts


def test_mmwhs_layout_names_dtypes_and_codes(mmwhs_root):
  expected = [
    f"{m}_train/{m}_train_{n}_{kind}.nii.gz"
    for m in ("ct", "mr")
    for n in (1001, 1002)
    for kind in ("image", "label")
  ]
  assert _files(mmwhs_root) == sorted(expected)
  for modality, image_dtype in (("ct", np.int16), ("mr", np.uint16)):
    for n in (1001, 1002):
      image = nib.load(mmwhs_root / f"{modality}_train" / f"{modality}_train_{n}_image.nii.gz")
      label = nib.load(mmwhs_root / f"{modality}_train" / f"{modality}_train_{n}_label.nii.gz")
      assert image.get_data_dtype() == image_dtype
      assert label.get_data_dtype() == np.uint16
      assert image.shape == label.shape == phantoms.DEFAULT_SHAPE
      np.testing.assert_array_equal(image.affine, label.affine)
      codes = set(np.unique(np.asarray(label.dataobj)).tolist())
      assert codes == {0} | ALL_CODES["cardiac"], (modality, n, codes)


def test_btcv_layout_names_dtypes_and_codes(abdominal_root):
  btcv = [name for name in _files(abdominal_root) if name.startswith("BTCV")]
  assert btcv == [
    "BTCV/img/img0001.nii.gz",
    "BTCV/img/img0002.nii.gz",
    "BTCV/label/label0001.nii.gz",
    "BTCV/label/label0002.nii.gz",
  ]
  for n in (1, 2):
    image = nib.load(abdominal_root / "BTCV" / "img" / f"img{n:04d}.nii.gz")
    label = nib.load(abdominal_root / "BTCV" / "label" / f"label{n:04d}.nii.gz")
    assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(image.affine, label.affine)
    codes = set(np.unique(np.asarray(label.dataobj)).tolist())
    assert codes == {0} | ALL_CODES["abdominal"], codes


def test_chaos_layout_one_dicom_and_one_mask_per_slice(abdominal_root):
  chaos = [name for name in _files(abdominal_root) if name.startswith("CHAOS")]
  slices = phantoms.DEFAULT_SHAPE[2]
  expected = [
    f"CHAOS/Train_Sets/MR/{patient}/T2SPIR/{folder}/IMG-0002-{k:05d}.{ext}"
    for patient in (1, 2)
    for folder, ext in (("DICOM_anon", "dcm"), ("Ground", "png"))
    for k in range(1, slices + 1)
  ]
  assert chaos == sorted(expected)


def test_chaos_dicom_tags_pixels_and_masks_match_the_phantom(abdominal_root):
  phantom = phantoms.make_phantom("abdominal", "mr", seed=3, index=0)
  lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ phantom.affine
  series = abdominal_root / "CHAOS" / "Train_Sets" / "MR" / "1" / "T2SPIR"
  grey = set()
  for k in range(phantom.image.shape[2]):
    stem = f"IMG-0002-{k + 1:05d}"
    ds = pydicom.dcmread(series / "DICOM_anon" / f"{stem}.dcm")
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPClassUID == pydicom.uid.MRImageStorage
    assert (ds.Modality, ds.SeriesDescription, ds.PhotometricInterpretation) == (
      "MR",
      "T2SPIR",
      "MONOCHROME2",
    )
    assert (ds.BitsAllocated, ds.PixelRepresentation, ds.InstanceNumber) == (16, 0, k + 1)
    assert (ds.Rows, ds.Columns) == phantom.image.shape[:2]
    np.testing.assert_array_equal(ds.pixel_array, phantom.image[:, :, k])
    # Patient position of pixel (row 0, column 0) and the row/column steps as DICOM defines them.
    along_row, down_column = np.array(ds.ImageOrientationPatient).reshape(2, 3)
    np.testing.assert_allclose(
      ds.ImagePositionPatient, lps[:3, :3] @ (0, 0, k) + lps[:3, 3], atol=1e-3
    )
    np.testing.assert_allclose(down_column * ds.PixelSpacing[0], lps[:3, 0], atol=1e-3)
    np.testing.assert_allclose(along_row * ds.PixelSpacing[1], lps[:3, 1], atol=1e-3)
    assert float(ds.SliceThickness) == pytest.approx(np.linalg.norm(lps[:3, 2]), abs=1e-3)
    with Image.open(series / "Ground" / f"{stem}.png") as picture:
      assert picture.mode == "L"
      mask = np.asarray(picture)
    assert mask.shape == ds.pixel_array.shape
    expected = np.zeros_like(mask)
    for code, value in synthetic.CHAOS_GREY.items():
      expected[phantom.label[:, :, k] == code] = value
    np.testing.assert_array_equal(mask, expected)
    grey |= set(np.unique(mask).tolist())
  assert grey == {0, 63, 126, 189, 252}


# ------------------------------------------------------------------------ anatomy


@pytest.mark.parametrize("anatomy, modality", PHANTOMS)
def test_structures_are_sizable_single_pieces(anatomy, modality):
  """Each structure is big enough to learn, not dominating, and not cut into fragments."""
  for index in range(3):
    label = phantoms.make_phantom(anatomy, modality, seed=0, index=index).label
    for code in ALL_CODES[anatomy] - {4}:  # the gallbladder is small, as in real scans
      mask = label == code
      assert 50 <= mask.sum() <= 0.1 * label.size, (code, int(mask.sum()))
      pieces, count = scipy.ndimage.label(mask)
      largest = np.bincount(pieces.ravel())[1:].max()
      assert largest >= 0.95 * mask.sum(), (code, count)


def test_myocardium_surrounds_the_left_ventricle():
  label = phantoms.make_phantom("cardiac", "ct", seed=0).label
  lv = label == 500
  ring = scipy.ndimage.binary_dilation(lv, iterations=2) & ~lv
  assert np.mean(label[ring] == 205) > 0.6


@pytest.mark.parametrize("modality", phantoms.MODALITIES)
def test_organs_sit_where_anatomy_puts_them(modality):
  """Checks anatomy and affine together, so a flipped axis in a grid definition fails."""
  for index in range(2):
    heart = phantoms.make_phantom("cardiac", modality, seed=1, index=index)
    lv, la, ra, aa = (_centroid_lps(heart, code) for code in (500, 420, 550, 820))
    assert lv[0] > aa[0] > ra[0]  # LV on the patient's left, aorta between, RA on the right
    assert la[1] > lv[1] and la[2] > lv[2]  # LA behind and above the LV
    belly = phantoms.make_phantom("abdominal", modality, seed=1, index=index)
    liver, spleen, right, left = (_centroid_lps(belly, code) for code in (6, 1, 2, 3))
    assert liver[0] < 0 < spleen[0] and right[0] < 0 < left[0]
    assert right[1] > liver[1] and left[1] > liver[1]  # kidneys posterior


# ------------------------------------------------------------------------ contrasts and geometry


def _mean(phantom, code):
  """Mean intensity away from the edges, where blur mixes tissues."""
  core = scipy.ndimage.binary_erosion(phantom.label == code)
  return float(phantom.image[core].mean())


def test_modalities_have_different_contrasts():
  ct = phantoms.make_phantom("cardiac", "ct", (64, 64, 32), seed=0)
  mr = phantoms.make_phantom("cardiac", "mr", (64, 64, 32), seed=0)
  aa, lv, la, myo = 820, 500, 420, 205
  assert _mean(ct, aa) > _mean(ct, lv) > _mean(ct, la) > _mean(ct, myo)
  assert _mean(mr, lv) > _mean(mr, la) > _mean(mr, aa) > _mean(mr, myo)
  assert _mean(ct, lv) > 200 and _mean(ct, myo) < 200  # contrast-filled blood, HU
  assert ct.image.min() <= -900  # air
  belly_ct = phantoms.make_phantom("abdominal", "ct", (64, 64, 32), seed=0)
  belly_mr = phantoms.make_phantom("abdominal", "mr", (64, 64, 32), seed=0)
  assert _mean(belly_ct, 8) > _mean(belly_ct, 6)  # enhanced aorta brighter than liver in CT
  assert _mean(belly_mr, 8) < _mean(belly_mr, 6)  # flow void in MR
  for phantom in (belly_ct, belly_mr):  # liver < spleen < kidneys: the organs are told apart
    assert _mean(phantom, 6) + 20 < _mean(phantom, 1) < min(_mean(phantom, 2), _mean(phantom, 3))


def test_mr_has_rician_background_and_a_smooth_bias_field():
  mr = phantoms.make_phantom("cardiac", "mr", (64, 64, 32), seed=0)
  air = mr.image[mr.label == 0][:1000]
  assert air.mean() > 5  # Rician noise floor: magnitude noise never averages to zero
  assert mr.image.dtype == np.uint16 and mr.image.max() <= 4095
  field = phantoms._bias_field((32, 32, 16), np.random.default_rng(0))
  assert field.min() > 0 and field.max() / field.min() > 1.1  # shading that matters ...
  assert np.abs(np.diff(np.log(field), axis=0)).max() < 0.05  # ... and varies slowly


def test_ct_and_mr_grids_differ():
  for anatomy in phantoms.ANATOMIES:
    ct = phantoms.make_phantom(anatomy, "ct", seed=0)
    mr = phantoms.make_phantom(anatomy, "mr", seed=0)
    assert nib.aff2axcodes(ct.affine) != nib.aff2axcodes(mr.affine)
    assert not np.allclose(ct.spacing, mr.spacing, rtol=0.05)
  cardiac_mr = phantoms.make_phantom("cardiac", "mr", seed=0).affine[:3, :3]
  off_axis = cardiac_mr[np.abs(cardiac_mr) < 0.5 * np.abs(cardiac_mr).max(axis=0)]
  assert np.abs(off_axis).max() > 0.01  # oblique, as scanners often write MR


def test_shape_is_configurable_and_the_last_axis_is_feet_head():
  phantom = phantoms.make_phantom("abdominal", "mr", (40, 36, 12), seed=0)
  assert phantom.image.shape == phantom.label.shape == (40, 36, 12)
  slice_axis = phantom.affine[:3, 2]
  assert abs(slice_axis[2]) == pytest.approx(np.linalg.norm(slice_axis))


# ------------------------------------------------------------------------ errors and CLI


@pytest.mark.parametrize(
  "call",
  [
    lambda: phantoms.make_phantom("brain", "ct"),
    lambda: phantoms.make_phantom("cardiac", "pet"),
    lambda: phantoms.make_phantom("cardiac", "ct", (48, 48)),
    lambda: phantoms.make_phantom("cardiac", "ct", (48, 48, 2)),
    lambda: synthetic.write_mmwhs("/nonexistent-never-written", -1, 0),
    lambda: synthetic.write_abdominal("/nonexistent-never-written", 1.5, 0),
  ],
)
def test_bad_arguments_raise_data_error(call):
  with pytest.raises(DataError):
    call()


def test_cli_writes_the_requested_layout(tmp_path, capsys):
  importlib.import_module("ukd.data.synthetic.__main__").main(
    [
      "--layout=abdominal",
      f"--out={tmp_path}",
      "--n_ct=1",
      "--n_mr=1",
      "--shape=24,20,8",
      "--seed=1",
    ]
  )
  assert (tmp_path / "BTCV" / "img" / "img0001.nii.gz").is_file()
  masks = glob.glob(str(tmp_path / "CHAOS/Train_Sets/MR/1/T2SPIR/Ground/*.png"))
  assert len(masks) == 8
  assert nib.load(tmp_path / "BTCV" / "label" / "label0001.nii.gz").shape == (24, 20, 8)
  assert "wrote" in capsys.readouterr().out


def test_ensure_generates_once_then_reuses_and_refuses_other_settings(tmp_path):
  cfg = dict(n_ct=1, n_mr=1, shape=(16, 16, 8), seed=0)
  root = tmp_path / "work" / "phantoms"
  assert synthetic.ensure(root, "mmwhs", **cfg) == str(root)
  label = root / "mr_train" / "mr_train_1001_label.nii.gz"
  written = label.stat().st_mtime_ns
  synthetic.ensure(root, "mmwhs", **cfg)  # a resumed run: nothing is rewritten
  assert label.stat().st_mtime_ns == written
  assert os.listdir(tmp_path / "work") == ["phantoms"]  # no staging folder left behind
  cfg["n_ct"] = 2
  with pytest.raises(DataError, match="phantoms made with"):
    synthetic.ensure(root, "mmwhs", **cfg)
  (tmp_path / "real").mkdir()  # a dataset's folder: files, no marker (an empty one is filled)
  (tmp_path / "real" / "dataset.json").write_text("{}")
  with pytest.raises(DataError, match="holds no synthetic dataset"):
    synthetic.ensure(tmp_path / "real", "mmwhs", **cfg)
  with pytest.raises(DataError, match="'nnunet' layout cannot be made"):
    synthetic.ensure(tmp_path / "nnunet", "nnunet", **cfg)
  synthetic.ensure(tmp_path / "belly", "abdominal", **cfg)
  assert len(list((tmp_path / "belly" / "BTCV" / "img").iterdir())) == 2


# ------------------------------------------------------------------------ dataset adapters


def test_mmwhs_adapter_reads_the_phantoms(mmwhs_root):
  from ukd.data.adapters import get_adapter

  adapter = get_adapter("mmwhs")
  cases = adapter.cases(str(mmwhs_root))
  assert sorted((c.modality, c.id) for c in cases) == [
    ("ct", "ct_train_1001"),
    ("ct", "ct_train_1002"),
    ("mr", "mr_train_1001"),
    ("mr", "mr_train_1002"),
  ]
  for case in cases:
    image, label = adapter.read(case)
    assert image.array.dtype == np.float32 and image.array.shape == label.array.shape
    assert set(np.unique(label.array).tolist()) == {0, 1, 2, 3, 4}
    # Canonical RAS (x to the patient's right, y anterior, z up): the aorta lies right of the
    # LV, the LA behind and above it.
    lv, la, aa = (
      np.argwhere(label.array == adapter.classes.index(name)).mean(axis=0)
      for name in ("LVC", "LAC", "AA")
    )
    assert aa[0] > lv[0] and la[1] < lv[1] and la[2] > lv[2], case.id


def test_abdominal_adapter_reads_btcv_and_chaos_phantoms(abdominal_root):
  from ukd.data.adapters import get_adapter

  adapter = get_adapter("abdominal")
  cases = adapter.cases(str(abdominal_root))
  assert sorted(c.modality for c in cases) == ["ct", "ct", "mr", "mr"]
  liver, spleen = adapter.classes.index("liver"), adapter.classes.index("spleen")
  for case in cases:
    image, label = adapter.read(case)
    assert image.array.shape == label.array.shape
    assert set(np.unique(label.array).tolist()) == {0, 1, 2, 3, 4}
    # Canonical RAS: x grows towards the patient's right, where the liver is.
    x = lambda index, label=label: np.argwhere(label.array == index)[:, 0].mean()
    assert x(liver) > x(spleen), case.id
    # Feet-head is the last canonical axis: the liver lies above the kidneys.
    z = lambda index, label=label: np.argwhere(label.array == index)[:, 2].mean()
    assert z(liver) > z(adapter.classes.index("right_kidney")), case.id


def test_cli_writes_folders_of_the_named_contrasts(tmp_path, capsys):
  main = importlib.import_module("ukd.data.synthetic.__main__").main
  base = [f"--out={tmp_path}", "--n_ct=1", "--n_mr=1", "--shape=16,16,8", "--layout=folder"]
  main([*base, "--realism=scanner", "--modalities=ct=ct,t2=mr_t2"])
  assert sorted(os.listdir(tmp_path)) == ["ct", "t2"]
  with open(tmp_path / "t2" / "dataset.json") as f:
    assert json.load(f)["channel_names"] == {"0": "MR"}
  assert (tmp_path / "t2" / "imagesTr" / "t2_001_0000.nii.gz").is_file()
  for bad, message in (("t2", "modality=contrast pairs"), ("t2=mr_t2", "simple set")):
    with pytest.raises(SystemExit):
      main([*base, f"--modalities={bad}"])
    assert message in capsys.readouterr().err
  with pytest.raises(SystemExit):
    main([f"--out={tmp_path / 'heart'}", "--layout=mmwhs", "--modalities=t2=mr_t2"])
  assert "--modalities is for --layout=folder" in capsys.readouterr().err
  main([f"--out={tmp_path / 'two'}", "--n_ct=1", "--n_mr=1", "--shape=16,16,8", "--layout=folder"])
  assert sorted(os.listdir(tmp_path / "two")) == ["ct", "mr"]  # the default pairs
