"""Dataset layouts, label-code mapping, DICOM geometry and splits of ukd.data.datasets."""

import json
import os
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from ukd.data import datasets
from ukd.data.datasets import Case, DataError


def _nifti(path, data, affine=None):
  """Tiny NIfTI; identity affine keeps canonical == on-disk, so expectations stay simple."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), path)
  return path


def _codes_volume(codes):
  """One voxel per code along the first axis: shape [len(codes), 1, 1]."""
  return np.array(codes, np.int16).reshape(-1, 1, 1)


def _image_like(codes):
  return np.zeros((len(codes), 1, 1), np.float32)


def _labels(adapter, case):
  image, label = adapter.read(case)
  assert image.array.dtype == np.float32 and label.array.dtype == np.int32
  return label.array.ravel().tolist()


# ----------------------------------------------------------------------------------------
# MM-WHS
# ----------------------------------------------------------------------------------------

MMWHS_CODES = [0, 205, 420, 500, 820, 550, 600, 850]


def _mmwhs(root, codes=MMWHS_CODES, modalities=("ct", "mr"), number=1001):
  for m in modalities:
    stem = os.path.join(root, f"{m}_train", f"{m}_train_{number}")
    _nifti(stem + "_image.nii.gz", _image_like(codes))
    _nifti(stem + "_label.nii.gz", _codes_volume(codes))
  return str(root)


def test_mmwhs_lists_cases_and_maps_codes(tmp_path):
  root = _mmwhs(tmp_path)
  adapter = datasets.get_adapter("mmwhs")
  assert adapter.classes == ("background", "MYO", "LAC", "LVC", "AA")
  cases = adapter.cases(root)
  assert [(c.id, c.modality) for c in cases] == [("ct_train_1001", "ct"), ("mr_train_1001", "mr")]
  assert cases[0].image.endswith("ct_train/ct_train_1001_image.nii.gz")
  assert cases[0].label.endswith("ct_train/ct_train_1001_label.nii.gz")
  for case in cases:
    assert _labels(adapter, case) == [0, 1, 2, 3, 4, 0, 0, 0]


def test_mmwhs_unknown_code_is_an_error_unless_ignored(tmp_path):
  root = _mmwhs(tmp_path, codes=[0, 205, 421, 999], modalities=("ct",))
  case = datasets.get_adapter("mmwhs", modalities=("ct",)).cases(root)[0]
  with pytest.raises(DataError, match=r"ct_train_1001_label\.nii\.gz.*\[421, 999\]"):
    datasets.get_adapter("mmwhs").read(case)
  lenient = datasets.get_adapter("mmwhs", ignore_unknown_labels=True)
  assert _labels(lenient, case) == [0, 1, 0, 0]


def test_mmwhs_image_without_label(tmp_path):
  root = _mmwhs(tmp_path)
  _nifti(str(tmp_path / "mr_train" / "mr_train_1002_image.nii.gz"), _image_like([0]))
  with pytest.raises(DataError, match="mr_train_1002_image.nii.gz: image has no matching label"):
    datasets.get_adapter("mmwhs").cases(root)


def test_mmwhs_label_without_image(tmp_path):
  root = _mmwhs(tmp_path)
  _nifti(str(tmp_path / "ct_train" / "ct_train_1009_label.nii.gz"), _codes_volume([0]))
  with pytest.raises(DataError, match="ct_train_1009_label.nii.gz: label has no matching image"):
    datasets.get_adapter("mmwhs").cases(root)


def test_mmwhs_modality_without_cases(tmp_path):
  root = _mmwhs(tmp_path, modalities=("ct",))
  os.makedirs(tmp_path / "mr_train")
  with pytest.raises(DataError, match="mr_train: no mr cases found"):
    datasets.get_adapter("mmwhs").cases(root)


def test_missing_root_and_missing_modality_folder(tmp_path):
  with pytest.raises(DataError, match="nowhere: dataset root not found"):
    datasets.get_adapter("mmwhs").cases(str(tmp_path / "nowhere"))
  with pytest.raises(DataError, match="ct_train: ct training folder not found"):
    datasets.get_adapter("mmwhs").cases(str(tmp_path))


def test_label_grid_must_match_image(tmp_path):
  root = _mmwhs(tmp_path, modalities=("ct",))
  _nifti(str(tmp_path / "ct_train" / "ct_train_1001_label.nii.gz"), np.zeros((8, 2, 1), np.int16))
  case = datasets.get_adapter("mmwhs", modalities=("ct",)).cases(root)[0]
  with pytest.raises(DataError, match="ct_train_1001_label.nii.gz: label shape"):
    datasets.get_adapter("mmwhs").read(case)


def test_get_adapter_rejects_unknown_names_and_options():
  with pytest.raises(DataError, match="unknown adapter"):
    datasets.get_adapter("nope")
  with pytest.raises(DataError, match="colour"):
    datasets.get_adapter("mmwhs", colour="red")
  with pytest.raises(DataError, match="modalities"):
    datasets.get_adapter("mmwhs", modalities=("pet",))


# ----------------------------------------------------------------------------------------
# Abdominal: BTCV CT
# ----------------------------------------------------------------------------------------

BTCV_CODES = list(range(14))
# spleen 1 -> 4, right kidney 2 -> 2, left kidney 3 -> 3, liver 6 -> 1, the rest background.
BTCV_CLASSES = [0, 4, 2, 3, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("sub", ["", os.path.join("RawData", "Training")])
def test_btcv_layouts_and_codes(tmp_path, sub):
  base = os.path.join(tmp_path, "BTCV", sub)
  _nifti(os.path.join(base, "img", "img0001.nii.gz"), _image_like(BTCV_CODES))
  _nifti(os.path.join(base, "label", "label0001.nii.gz"), _codes_volume(BTCV_CODES))
  adapter = datasets.get_adapter("abdominal", modalities=("ct",))
  assert adapter.classes == ("background", "liver", "right_kidney", "left_kidney", "spleen")
  (case,) = adapter.cases(str(tmp_path))
  assert (case.id, case.modality) == ("btcv_0001", "ct")
  assert _labels(adapter, case) == BTCV_CLASSES


def test_btcv_configurable_folder_and_missing_folder(tmp_path):
  base = os.path.join(tmp_path, "ct_data")
  _nifti(os.path.join(base, "img", "img0003.nii.gz"), _image_like([0]))
  _nifti(os.path.join(base, "label", "label0003.nii.gz"), _codes_volume([0]))
  adapter = datasets.get_adapter("abdominal", ct_dir="ct_data", modalities=("ct",))
  assert [c.id for c in adapter.cases(str(tmp_path))] == ["btcv_0003"]
  with pytest.raises(DataError, match="BTCV: no BTCV img"):
    datasets.get_adapter("abdominal", modalities=("ct",)).cases(str(tmp_path))


def test_unexpected_nifti_name_is_reported(tmp_path):
  base = os.path.join(tmp_path, "BTCV")
  _nifti(os.path.join(base, "img", "img0001.nii.gz"), _image_like([0]))
  _nifti(os.path.join(base, "img", "scan7.nii.gz"), _image_like([0]))
  _nifti(os.path.join(base, "label", "label0001.nii.gz"), _codes_volume([0]))
  with pytest.raises(DataError, match="scan7.nii.gz: unexpected file name"):
    datasets.get_adapter("abdominal", modalities=("ct",)).cases(str(tmp_path))


# ----------------------------------------------------------------------------------------
# Abdominal: CHAOS MR
# ----------------------------------------------------------------------------------------

CHAOS_CODES = [0, 63, 55, 70, 126, 110, 189, 200, 252, 240]
CHAOS_CLASSES = [0, 1, 1, 1, 2, 2, 3, 3, 4, 4]


def test_chaos_nifti_codes(tmp_path):
  base = os.path.join(tmp_path, "CHAOS")
  _nifti(os.path.join(base, "images", "p1.nii.gz"), _image_like(CHAOS_CODES))
  _nifti(os.path.join(base, "labels", "p1.nii.gz"), _codes_volume(CHAOS_CODES))
  adapter = datasets.get_adapter("abdominal", modalities=("mr",))
  (case,) = adapter.cases(str(tmp_path))
  assert (case.id, case.modality) == ("chaos_p1", "mr")
  assert _labels(adapter, case) == CHAOS_CLASSES


def test_chaos_nifti_out_of_range_value(tmp_path):
  base = os.path.join(tmp_path, "CHAOS")
  _nifti(os.path.join(base, "images", "p1.nii.gz"), _image_like([0, 1, 100]))
  _nifti(os.path.join(base, "labels", "p1.nii.gz"), _codes_volume([0, 1, 100]))
  (case,) = datasets.get_adapter("abdominal", modalities=("mr",)).cases(str(tmp_path))
  with pytest.raises(DataError, match=r"p1.nii.gz: unknown label codes \[1, 100\]"):
    datasets.get_adapter("abdominal").read(case)


def _write_dicom(path, pixels, position, orientation=(1, 0, 0, 0, 1, 0), spacing=(0.8, 0.6)):
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import ImplicitVRLittleEndian, generate_uid

  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ImplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Modality = "MR"
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
  ds.PixelSpacing = list(spacing)
  ds.ImageOrientationPatient = list(orientation)
  ds.ImagePositionPatient = list(position)
  ds.SliceThickness = 3.0
  ds.PixelData = pixels.astype(np.uint16).tobytes()
  ds.save_as(path, enforce_file_format=True)


# File k (1-based) lies at z = Z_OF_FILE[k]: file names do NOT follow anatomy.
Z_OF_FILE = {1: 16.0, 2: 10.0, 3: 13.0}


def _chaos_dicom(root, patient="2"):
  series = os.path.join(root, "CHAOS", "Train_Sets", "MR", patient, "T2SPIR")
  os.makedirs(os.path.join(series, "DICOM_anon"))
  os.makedirs(os.path.join(series, "Ground"))
  pixels, masks = {}, {}
  for k, z in Z_OF_FILE.items():
    rows, cols = np.mgrid[0:3, 0:4]
    pixels[k] = 100 * k + 10 * rows + cols  # pixel (r, c) of file k
    masks[k] = np.zeros((3, 4), np.uint8)
    stem = f"IMG-0004-{k:05d}"
    _write_dicom(os.path.join(series, "DICOM_anon", stem + ".dcm"), pixels[k], (-5.0, 7.0, z))
  masks[2][2, 3] = 126  # right kidney at the canonical origin voxel (see below)
  masks[1][0, 0] = 63
  masks[3][1, 2] = 252
  masks[3][0, 1] = 185
  for k, mask in masks.items():
    Image.fromarray(mask).save(os.path.join(series, "Ground", f"IMG-0004-{k:05d}.png"))
  return pixels, masks, series


def test_chaos_dicom_geometry_and_codes(tmp_path):
  pytest.importorskip("pydicom")
  pixels, masks, series = _chaos_dicom(tmp_path)
  adapter = datasets.get_adapter("abdominal", modalities=("mr",))
  (case,) = adapter.cases(str(tmp_path))
  dicom_dir, ground = os.path.join(series, "DICOM_anon"), os.path.join(series, "Ground")
  assert case == Case("chaos_2", "mr", dicom_dir, ground)
  image, label = adapter.read(case)

  # DICOM rows run along +x (patient left), columns along +y (posterior): in RAS both are
  # negated. Voxel axes on disk are (column, row, slice); slices sorted by z: files 2, 3, 1.
  expected_affine = np.array(
    [[-0.6, 0, 0, 5.0], [0, -0.8, 0, -7.0], [0, 0, 3.0, 10.0], [0, 0, 0, 1]]
  )
  np.testing.assert_allclose(image.affine, expected_affine, atol=1e-9)
  assert image.spacing == pytest.approx((0.6, 0.8, 3.0))
  assert image.array.shape == (4, 3, 3) and image.original_shape == (4, 3, 3)
  # Canonical flips x and y: canonical[i, j, k] = pixels[file of slice k][2 - j, 3 - i].
  assert image.array[0, 0, 0] == 223  # file 2, row 2, column 3
  assert image.array[3, 2, 2] == 100  # file 1 (z=16), row 0, column 0
  expected = np.stack([pixels[k][::-1, ::-1].T for k in (2, 3, 1)], axis=-1)
  np.testing.assert_array_equal(image.array, expected)

  assert label.array[0, 0, 0] == 2  # 126 -> right kidney
  assert label.array[3, 2, 2] == 1  # 63 -> liver
  assert label.array[1, 1, 1] == 4  # file 3 (z=13) row 1 column 2: 252 -> spleen
  assert label.array[2, 2, 1] == 3  # file 3 row 0 column 1: 185 -> left kidney
  assert int(label.array.sum()) == 2 + 1 + 4 + 3
  np.testing.assert_array_equal(label.affine, image.affine)


def test_chaos_dicom_world_position_of_a_voxel(tmp_path):
  """Independent check: canonical voxel (0, 0, 0) is DICOM file 2, row 2, column 3."""
  pytest.importorskip("pydicom")
  _chaos_dicom(tmp_path)
  (case,) = datasets.get_adapter("abdominal", modalities=("mr",)).cases(str(tmp_path))
  image, _ = datasets.get_adapter("abdominal").read(case)
  on_disk = np.array([3, 2, 0, 1])  # (column, row, sorted slice)
  lps = np.array([-5.0 + 3 * 0.6, 7.0 + 2 * 0.8, 10.0])  # position + c*dc*x + r*dr*y
  np.testing.assert_allclose(image.affine @ on_disk, [-lps[0], -lps[1], lps[2], 1.0])


def test_chaos_mask_count_mismatch(tmp_path):
  pytest.importorskip("pydicom")
  _, _, series = _chaos_dicom(tmp_path)
  os.remove(os.path.join(series, "Ground", "IMG-0004-00003.png"))
  (case,) = datasets.get_adapter("abdominal", modalities=("mr",)).cases(str(tmp_path))
  with pytest.raises(DataError, match="Ground: 2 PNG masks for 3 DICOM slices"):
    datasets.get_adapter("abdominal").read(case)


def test_chaos_patient_without_masks(tmp_path):
  pytest.importorskip("pydicom")
  _, _, series = _chaos_dicom(tmp_path)
  for name in os.listdir(os.path.join(series, "Ground")):
    os.remove(os.path.join(series, "Ground", name))
  with pytest.raises(DataError, match="Ground: image has no label"):
    datasets.get_adapter("abdominal", modalities=("mr",)).cases(str(tmp_path))


def test_corrupt_dicom_slice(tmp_path):
  pytest.importorskip("pydicom")
  _, _, series = _chaos_dicom(tmp_path)
  bad = os.path.join(series, "DICOM_anon", "IMG-0004-00002.dcm")
  with open(bad, "wb") as f:
    f.write(b"garbage")
  (case,) = datasets.get_adapter("abdominal", modalities=("mr",)).cases(str(tmp_path))
  with pytest.raises(DataError, match="IMG-0004-00002.dcm: cannot read DICOM"):
    datasets.get_adapter("abdominal").read(case)


def test_missing_pydicom_gives_install_hint(tmp_path, monkeypatch):
  pytest.importorskip("pydicom")
  _, _, series = _chaos_dicom(tmp_path)
  monkeypatch.setitem(sys.modules, "pydicom", None)
  with pytest.raises(DataError, match=r"pip install 'ukd\[dicom\]'"):
    datasets.read_dicom_series(os.path.join(series, "DICOM_anon"))


# ----------------------------------------------------------------------------------------
# Folder (nnU-Net style)
# ----------------------------------------------------------------------------------------


def _nnunet(folder, labels, cases=("liver_001",), codes=(0, 1, 2)):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "dataset.json"), "w") as f:
    json.dump({"labels": labels, "file_ending": ".nii.gz"}, f)
  for case in cases:
    _nifti(os.path.join(folder, "imagesTr", f"{case}_0000.nii.gz"), _image_like(codes))
    _nifti(os.path.join(folder, "labelsTr", f"{case}.nii.gz"), _codes_volume(codes))


V2 = {"background": 0, "liver": 1, "tumour": 2}
V1 = {"0": "background", "1": "liver", "2": "tumour"}


def test_folder_v1_and_v2_with_relative_and_absolute_paths(tmp_path):
  _nnunet(str(tmp_path / "Dataset001_CT"), V2, cases=("a", "b"))
  _nnunet(str(tmp_path / "elsewhere" / "Task02_MR"), V1, cases=("c",))
  absolute = str(tmp_path / "elsewhere" / "Task02_MR")
  adapter = datasets.get_adapter("folder", modalities={"ct": "Dataset001_CT", "mr": absolute})
  cases = adapter.cases(str(tmp_path))
  assert [(c.id, c.modality) for c in cases] == [("a", "ct"), ("b", "ct"), ("c", "mr")]
  assert adapter.classes == ("background", "liver", "tumour")
  assert cases[2].image.endswith(os.path.join("Task02_MR", "imagesTr", "c_0000.nii.gz"))
  assert _labels(adapter, cases[0]) == [0, 1, 2]


def test_folder_class_names_must_agree(tmp_path):
  _nnunet(str(tmp_path / "ct"), V2)
  _nnunet(str(tmp_path / "mr"), {"background": 0, "kidney": 1, "tumour": 2})
  adapter = datasets.get_adapter("folder", modalities={"ct": "ct", "mr": "mr"})
  with pytest.raises(DataError, match=r"mr/dataset.json: classes .*kidney.* differ"):
    adapter.cases(str(tmp_path))


def test_folder_label_value_beyond_classes(tmp_path):
  _nnunet(str(tmp_path / "ct"), V2, codes=(0, 1, 3))
  adapter = datasets.get_adapter("folder", modalities={"ct": "ct"})
  (case,) = adapter.cases(str(tmp_path))
  with pytest.raises(DataError, match=r"liver_001.nii.gz: unknown label codes \[3\]"):
    adapter.read(case)


def test_folder_unreadable_dataset_json(tmp_path):
  _nnunet(str(tmp_path / "ct"), V2)
  (tmp_path / "ct" / "dataset.json").write_text("{not json")
  with pytest.raises(DataError, match="dataset.json: cannot read"):
    datasets.get_adapter("folder", modalities={"ct": "ct"}).cases(str(tmp_path))


def test_folder_empty_dataset(tmp_path):
  _nnunet(str(tmp_path / "ct"), V2, cases=())
  os.makedirs(tmp_path / "ct" / "imagesTr")
  os.makedirs(tmp_path / "ct" / "labelsTr")
  with pytest.raises(DataError, match="ct: no ct cases found"):
    datasets.get_adapter("folder", modalities={"ct": "ct"}).cases(str(tmp_path))


def test_folder_classes_need_cases_first():
  with pytest.raises(DataError, match="cases"):
    _ = datasets.get_adapter("folder", modalities={"ct": "ct"}).classes


# ----------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------


def _cases(ct=10, mr=3):
  return [Case(f"ct{i:02d}", "ct", "", "") for i in range(ct)] + [
    Case(f"mr{i}", "mr", "", "") for i in range(mr)
  ]


def test_splits_are_disjoint_complete_and_sized(tmp_path):
  splits = datasets.load_or_make_splits(tmp_path, _cases(), seed=0)
  assert [len(splits["ct"][s]) for s in ("train", "val", "test")] == [6, 2, 2]
  assert [len(splits["mr"][s]) for s in ("train", "val", "test")] == [1, 1, 1]
  for modality, count in (("ct", 10), ("mr", 3)):
    ids = [i for s in ("train", "val", "test") for i in splits[modality][s]]
    assert len(ids) == len(set(ids)) == count
  with open(tmp_path / "splits.json") as f:
    assert json.load(f) == splits


def test_splits_are_deterministic_and_seed_dependent(tmp_path):
  first = datasets.load_or_make_splits(tmp_path / "a", _cases(ct=20), seed=3)
  again = datasets.load_or_make_splits(tmp_path / "b", list(reversed(_cases(ct=20))), seed=3)
  other = datasets.load_or_make_splits(tmp_path / "c", _cases(ct=20), seed=4)
  assert first == again
  assert first["ct"] != other["ct"]


def test_saved_split_is_reused_and_checked(tmp_path):
  first = datasets.load_or_make_splits(tmp_path, _cases(), seed=0)
  assert datasets.load_or_make_splits(tmp_path, _cases(), seed=99) == first
  with pytest.raises(DataError, match=r"splits.json: ct case ids not in the dataset: \['ct09'\]"):
    datasets.load_or_make_splits(tmp_path, _cases(ct=9), seed=0)


def test_user_split_file_is_validated_and_used(tmp_path):
  user = {
    "ct": {"train": ["ct00", "ct01"], "val": ["ct02"], "test": ["ct03"]},
    "mr": {"train": ["mr0"], "val": ["mr1"], "test": ["mr2"]},
  }
  path = tmp_path / "mine.json"
  path.write_text(json.dumps(user))
  splits = datasets.load_or_make_splits(tmp_path / "w", _cases(ct=4), seed=0, split_file=path)
  assert splits == user
  assert json.loads((tmp_path / "w" / "splits.json").read_text()) == user

  user["ct"]["test"].append("ct01")
  path.write_text(json.dumps(user))
  with pytest.raises(DataError, match="mine.json: ct has case ids in more than one split"):
    datasets.load_or_make_splits(tmp_path / "x", _cases(ct=4), seed=0, split_file=path)


def test_split_fractions_must_sum_to_one(tmp_path):
  with pytest.raises(DataError, match="fractions"):
    datasets.load_or_make_splits(tmp_path, _cases(), seed=0, fractions=(0.5, 0.2, 0.2))
