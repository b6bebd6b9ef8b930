"""The 'scanner' phantom set: determinism, the simple set untouched, CT values and noise, MR
geometry, partial volume and ghosting, the MM-WHS layout, settings and config checks."""

import json

import numpy as np
import pytest
import scipy.ndimage

from ukd import config as config_lib
from ukd.data.synthetic import generate as synthetic
from ukd.data.synthetic import phantoms, scanner_phantoms
from ukd.errors import ConfigError, DataError

SHAPE = (48, 48, 24)


def _make(modality, shape=SHAPE, seed=0, index=0):
  return scanner_phantoms.make_phantom("cardiac", modality, shape, seed=seed, index=index)


def _with_tissue(monkeypatch, modality, **kwargs):
  """A phantom and its tissue map (indices into `scanner_phantoms.TISSUES`), which the label
  map alone does not give: most tissues are unlabelled."""
  seen = {}
  name = "_render_ct" if modality == "ct" else "_render_mr"
  render = getattr(scanner_phantoms, name)

  def spy(tissue, *args):
    seen["tissue"] = tissue
    return render(tissue, *args)

  monkeypatch.setattr(scanner_phantoms, name, spy)
  phantom = _make(modality, **kwargs)
  monkeypatch.setattr(scanner_phantoms, name, render)
  return phantom, seen["tissue"]


def _tissue(name):
  return scanner_phantoms.TISSUES.index(name)


# ------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("modality", phantoms.MODALITIES)
def test_same_seed_same_arrays_other_seed_or_case_differs(modality):
  first, again = _make(modality, seed=5, index=1), _make(modality, seed=5, index=1)
  for name in ("image", "label", "affine"):
    assert np.array_equal(getattr(first, name), getattr(again, name)), name
  for other in (_make(modality, seed=6, index=1), _make(modality, seed=5, index=2)):
    assert not np.array_equal(first.label, other.label)
    assert not np.array_equal(first.image, other.image)


def test_the_simple_set_is_the_default_and_unchanged(tmp_path):
  for realism in (None, "simple", "scanner"):
    extra = {} if realism is None else {"realism": realism}
    synthetic.write_mmwhs(tmp_path / str(realism), 1, 1, shape=SHAPE, seed=2, **extra)
  for modality in phantoms.MODALITIES:
    expected = phantoms.make_phantom("cardiac", modality, SHAPE, seed=2)
    stem = f"{modality}_train/{modality}_train_1001"
    for realism in ("None", "simple", "scanner"):
      image = _read(tmp_path / realism / f"{stem}_image.nii.gz")
      label = _read(tmp_path / realism / f"{stem}_label.nii.gz")
      same = np.array_equal(image, expected.image) and np.array_equal(label, expected.label)
      assert same == (realism != "scanner"), (modality, realism)


def _read(path):
  import nibabel as nib

  return np.asarray(nib.load(path).dataobj)


# ------------------------------------------------------------------------ CT


def _ct_range(name):
  """The documented per-case HU range of a tissue."""
  side = scanner_phantoms._BLOOD.get(name)
  low, high = scanner_phantoms.CT_LEFT_BLOOD_HU
  if side == "right":
    return low * scanner_phantoms.CT_RIGHT_TO_LEFT[0], high * scanner_phantoms.CT_RIGHT_TO_LEFT[1]
  return (low, high) if side == "left" else scanner_phantoms.CT_HU[name]


def test_ct_values_of_each_tissue_are_its_table_values(monkeypatch):
  checked = set()
  for index in range(3):
    ct, tissue = _with_tissue(monkeypatch, "ct", seed=0, index=index)
    for i, name in enumerate(scanner_phantoms.TISSUES):
      core = scipy.ndimage.binary_erosion(tissue == i)  # away from the voxel-average blur
      if core.sum() < 20:
        continue
      low, high = _ct_range(name)
      slack = 2.0 + 4.0 * scanner_phantoms.CT_NOISE_HU / np.sqrt(core.sum())
      median = float(np.median(ct.image[core]))
      assert low - slack <= median <= high + slack, (index, name, median, (low, high))
      checked.add(name)
    left, right = (np.median(ct.image[ct.label == code]) for code in (500, 600))
    assert left >= right - 10.0  # LV >= RV: a left-heart-timed scan
  assert {"air", "fat", "muscle", "lung", "myocardium", "left_ventricle", "right_ventricle"} <= (
    checked
  )


def test_ct_noise_in_air_is_the_documented_sigma(monkeypatch):
  ct, tissue = _with_tissue(monkeypatch, "ct", shape=(64, 64, 40), seed=0)
  air = ct.image[scipy.ndimage.binary_erosion(tissue == _tissue("air"))].astype(float)
  assert air.size > 2000
  # Values below -1024 are clipped, as CT stores them: read the spread off the upper half.
  sigma = np.percentile(air, 84.13) - np.median(air)
  assert sigma == pytest.approx(scanner_phantoms.CT_NOISE_HU, rel=0.1)


# ------------------------------------------------------------------------ MR


def test_mr_contrast_is_balanced_ssfp():
  contrast = scanner_phantoms._mr_contrast("mr")
  assert contrast["blood"] == 1.0 and contrast["fat"] > 0.7  # bright blood and fat
  assert contrast["myocardium"] < 0.35 and contrast["lung"] < 0.2 and contrast["air"] == 0.0


def test_second_mr_contrast_is_t2_weighted_black_blood():
  contrast = scanner_phantoms._mr_contrast("mr_t2")
  # By hand, S = (1 - exp(-1800 / T1)) exp(-70 / T2): fat 0.99474 * 0.29911 = 0.29754 (the
  # brightest), myocardium 0.82582 * 0.17377 = 0.14351, blood 0.05 * 0.71325 * 0.78555 = 0.02801.
  assert contrast["fat"] == 1.0
  assert contrast["myocardium"] == pytest.approx(0.14351 / 0.29754, rel=1e-3)
  assert contrast["blood"] == pytest.approx(0.02801 / 0.29754, rel=1e-3)
  assert contrast["liver"] > contrast["myocardium"] > contrast["blood"] > contrast["air"] == 0.0


def test_t2_cases_are_dark_blood_patients_of_their_own(monkeypatch):
  t2, tissue = _with_tissue(monkeypatch, "mr_t2", shape=(64, 64, 40))
  bssfp = _make("mr", shape=(64, 64, 40))
  assert t2.spacing == pytest.approx(bssfp.spacing, rel=0.1)  # the b-SSFP field of view ...
  assert not np.array_equal(t2.label, bssfp.label)  # ... another patient
  # Inside the pools, away from the partial volume of their walls.
  inside = scipy.ndimage.binary_erosion(tissue == _tissue("left_ventricle"), iterations=2)
  blood = np.median(t2.image[inside])
  muscle = np.median(t2.image[tissue == _tissue("myocardium")])
  assert blood < 0.5 * muscle  # the b-SSFP blood contrast inverted
  with pytest.raises(DataError, match="modality in \\('ct', 'mr', 'mr_t2'\\)"):
    scanner_phantoms.make_phantom("cardiac", "t2", (16, 16, 8))


def test_mr_is_anisotropic_and_sees_more_of_the_body_than_ct(monkeypatch):
  ct = _make("ct")
  mr, tissue = _with_tissue(monkeypatch, "mr")
  assert mr.spacing[0] == pytest.approx(mr.spacing[1])
  assert mr.spacing[2] > 1.2 * mr.spacing[0]  # slices coarser than in-plane
  assert (np.array(mr.spacing) > 1.3 * np.array(ct.spacing)).all()  # same voxels, wider view
  unlabelled_tissue = (mr.label == 0) & (tissue != _tissue("air"))
  assert unlabelled_tissue.mean() > 0.3
  liver = tissue == _tissue("liver")
  assert liver.mean() > 0.02  # the liver dome
  air = tissue == _tissue("air")
  assert np.median(mr.image[liver]) > 1.5 * np.median(mr.image[air])


def test_acquire_averages_along_the_coarse_axes_only():
  across_rows = np.zeros((8, 6, 4), np.float32)
  across_rows[3:] = 1.0
  acquired = scanner_phantoms.acquire(across_rows, (2, 1, 2))
  assert ((acquired > 0.1) & (acquired < 0.9)).any()  # partial volume
  np.testing.assert_allclose(acquired.mean(), across_rows.mean(), atol=0.05)
  across_columns = np.zeros((8, 6, 4), np.float32)
  across_columns[:, 3:] = 1.0
  np.testing.assert_array_equal(scanner_phantoms.acquire(across_columns, (2, 1, 2)), across_columns)
  odd = np.ones((9, 5, 7), np.float32)
  np.testing.assert_allclose(scanner_phantoms.acquire(odd, (2, 1, 2)), odd)


def test_mr_is_smoother_along_its_coarsely_acquired_axes(monkeypatch):
  """Against the same case acquired at the reconstruction spacing, the fine detail (the upper
  frequency band along an axis) is lost along the phase-encoding axes (0, 2) far more than
  along the readout (1), where only oblique edges, averaged across rows and slices, lose it."""
  monkeypatch.setattr(scanner_phantoms, "MR_SNR", 1e9)  # no noise: anatomy only
  coarse = _make("mr").image.astype(float)
  monkeypatch.setattr(scanner_phantoms, "MR_ACQUISITION", (1, 1, 1))
  fine = _make("mr").image.astype(float)

  def detail(image, axis):
    power = np.abs(np.fft.fftn(image - image.mean())) ** 2
    upper = np.abs(np.fft.fftfreq(image.shape[axis])) > 0.35  # cycles per voxel
    return power.sum(axis=tuple(a for a in range(3) if a != axis))[upper].sum()

  kept = [detail(coarse, axis) / detail(fine, axis) for axis in range(3)]
  assert kept[0] < 0.6 * kept[1] and kept[2] < 0.6 * kept[1], kept


def test_respiratory_ghost_is_a_faint_copy_half_a_field_of_view_along_phase_encoding(
  monkeypatch,
):
  amplitude = scanner_phantoms.MR_GHOST
  mr, tissue = _with_tissue(monkeypatch, "mr")
  rows = tissue.shape[0]
  air = tissue == _tissue("air")
  under_ghost = np.roll(tissue != _tissue("air"), rows // 2, axis=0)
  image = mr.image.astype(float)
  assert image[air & under_ghost].mean() > 1.1 * image[air & ~under_ghost].mean()
  # Without noise the ghost is exactly the image, scaled and shifted along array axis 0.
  monkeypatch.setattr(scanner_phantoms, "MR_SNR", 1e9)
  ghosted = _make("mr").image.astype(float)
  monkeypatch.setattr(scanner_phantoms, "MR_GHOST", 0.0)
  clean = _make("mr").image.astype(float)
  expected = amplitude * np.roll(clean, rows // 2, axis=0)
  assert np.abs(ghosted - clean - expected).max() <= 1.5  # rounding to integers
  assert (ghosted - clean).max() > 20.0


# ------------------------------------------------------------------------ layout and settings


def test_mmwhs_adapter_reads_a_scanner_root(tmp_path):
  from ukd.data.adapters import get_adapter

  root = tmp_path / "scanner"
  synthetic.ensure(root, "mmwhs", n_ct=1, n_mr=1, shape=(32, 32, 16), seed=0, realism="scanner")
  adapter = get_adapter("mmwhs")
  cases = adapter.cases(str(root))
  assert sorted((c.modality, c.id) for c in cases) == [
    ("ct", "ct_train_1001"),
    ("mr", "mr_train_1001"),
  ]
  for case in cases:
    image, label = adapter.read(case)
    assert image.array.dtype == np.float32 and image.array.shape == label.array.shape
    assert set(np.unique(label.array).tolist()) == {0, 1, 2, 3, 4}, case.id
  assert json.loads((root / ".ukd_synthetic.json").read_text())["realism"] == "scanner"


def test_ensure_keeps_the_two_sets_apart(tmp_path):
  settings = dict(n_ct=1, n_mr=0, shape=(16, 16, 8), seed=0)
  root = tmp_path / "phantoms"
  synthetic.ensure(root, "mmwhs", **settings)
  with pytest.raises(DataError, match="phantoms made with"):
    synthetic.ensure(root, "mmwhs", realism="scanner", **settings)
  # A root generated before there were two sets holds simple phantoms.
  marker = root / ".ukd_synthetic.json"
  old = json.loads(marker.read_text())
  del old["realism"]
  marker.write_text(json.dumps(old))
  synthetic.ensure(root, "mmwhs", realism="simple", **settings)
  with pytest.raises(DataError, match="phantoms made with"):
    synthetic.ensure(root, "mmwhs", realism="scanner", **settings)
  with pytest.raises(DataError, match="only 'simple'"):
    synthetic.ensure(tmp_path / "belly", "abdominal", realism="scanner", **settings)
  assert not (tmp_path / "belly").exists()
  with pytest.raises(DataError, match="cardiac"):
    scanner_phantoms.make_phantom("abdominal", "ct", (16, 16, 8))


def test_config_check_names_the_realism_setting():
  config = config_lib.default()
  config.data.synthetic.realism = "photographic"
  with pytest.raises(ConfigError, match=r"config\.data\.synthetic\.realism='photographic'"):
    config_lib.check(config)
  config.data.synthetic.update(realism="scanner", enabled=True)
  config.data.dataset = "abdominal"
  with pytest.raises(ConfigError, match=r"data\.synthetic\.realism='scanner'.*mmwhs"):
    config_lib.check(config)
  config.data.dataset = "mmwhs"
  assert config_lib.check(config).data.synthetic.realism == "scanner"


def test_folder_layout_holds_ct_and_two_mr_contrasts_that_the_folder_adapter_reads(tmp_path):
  from ukd.data.adapters import get_adapter

  folders = {"ct": "CT", "mr": "bSSFP", "t2": "T2"}
  root = tmp_path / "three"
  synthetic.ensure(
    root, "folder", n_ct=2, n_mr=1, shape=(16, 16, 8), seed=0, realism="scanner",
    folders=folders, contrasts={"t2": "mr_t2"},
  )  # fmt: skip
  adapter = get_adapter("folder", modalities=folders)
  cases = adapter.cases(str(root))
  assert sorted((c.modality, c.id) for c in cases) == [
    ("ct", "ct_001"), ("ct", "ct_002"), ("mr", "mr_001"), ("t2", "t2_001"),
  ]  # fmt: skip
  assert adapter.classes == ("background", "MYO", "LAC", "LVC", "AA")
  t2 = next(c for c in cases if c.modality == "t2")
  _, label = adapter.read(t2)
  made = _make("mr_t2", shape=(16, 16, 8))
  # The written indices are the MM-WHS codes mapped (205 MYO -> 1, ..., 550 RA -> 0).
  index = {0: 0, 205: 1, 420: 2, 500: 3, 820: 4, 550: 0, 600: 0, 850: 0}
  expected = np.vectorize(index.get)(made.label)
  written = np.asarray(synthetic.nib.load(str(root / "T2" / "labelsTr" / "t2_001.nii.gz")).dataobj)
  assert np.array_equal(written, expected) and written.dtype == np.uint8
  image = synthetic.nib.load(str(root / "T2" / "imagesTr" / "t2_001_0000.nii.gz"))
  assert np.array_equal(np.asarray(image.dataobj), made.image)
  assert label.array.shape == made.image.shape
  with pytest.raises(DataError, match="'t2': its phantom contrast 't2' is not one of"):
    synthetic.write_folder(tmp_path / "unnamed", 1, 1, shape=(16, 16, 8), folders={"t2": "T2"})
  with pytest.raises(DataError, match="'mr_t2' is not one of the simple set's"):
    synthetic.write_folder(
      tmp_path / "simple", 1, 1, shape=(16, 16, 8), folders={"t2": "T2"}, contrasts={"t2": "mr_t2"}
    )


def test_config_check_names_the_contrasts_setting():
  config = config_lib.default()
  config.data.synthetic.contrasts = {"t2": "mr_t2"}
  with pytest.raises(ConfigError, match=r"contrasts=\{'t2': 'mr_t2'\}.*only the 'folder' layout"):
    config_lib.check(config)
  config.data.dataset = "folder"
  with pytest.raises(ConfigError, match=r"contrasts\.t2='mr_t2' must be one of \('ct', 'mr'\)"):
    config_lib.check(config)
  config.data.synthetic.realism = "scanner"
  assert config_lib.check(config).data.synthetic.contrasts.t2 == "mr_t2"
