"""Dataset layouts and label-code mapping of the adapters in ukd.data.adapters."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from ukd.data import adapters
from ukd.errors import DataError


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
  adapter = adapters.get_adapter("mmwhs")
  assert adapter.classes == ("background", "MYO", "LAC", "LVC", "AA")
  cases = adapter.cases(root)
  assert [(c.id, c.modality) for c in cases] == [("ct_train_1001", "ct"), ("mr_train_1001", "mr")]
  assert cases[0].image.endswith("ct_train/ct_train_1001_image.nii.gz")
  assert cases[0].label.endswith("ct_train/ct_train_1001_label.nii.gz")
  for case in cases:
    assert _labels(adapter, case) == [0, 1, 2, 3, 4, 0, 0, 0]


def test_mmwhs_unknown_code_is_an_error_unless_ignored(tmp_path):
  root = _mmwhs(tmp_path, codes=[0, 205, 421, 999], modalities=("ct",))
  case = adapters.get_adapter("mmwhs", modalities=("ct",)).cases(root)[0]
  with pytest.raises(DataError, match=r"ct_train_1001_label\.nii\.gz.*\[421, 999\]"):
    adapters.get_adapter("mmwhs").read(case)
  lenient = adapters.get_adapter("mmwhs", ignore_unknown_labels=True)
  assert _labels(lenient, case) == [0, 1, 0, 0]


def test_mmwhs_image_without_label(tmp_path):
  root = _mmwhs(tmp_path)
  _nifti(str(tmp_path / "mr_train" / "mr_train_1002_image.nii.gz"), _image_like([0]))
  with pytest.raises(DataError, match="mr_train_1002_image.nii.gz: image has no matching label"):
    adapters.get_adapter("mmwhs").cases(root)


def test_mmwhs_label_without_image(tmp_path):
  root = _mmwhs(tmp_path)
  _nifti(str(tmp_path / "ct_train" / "ct_train_1009_label.nii.gz"), _codes_volume([0]))
  with pytest.raises(DataError, match="ct_train_1009_label.nii.gz: label has no matching image"):
    adapters.get_adapter("mmwhs").cases(root)


def test_mmwhs_modality_without_cases(tmp_path):
  root = _mmwhs(tmp_path, modalities=("ct",))
  os.makedirs(tmp_path / "mr_train")
  with pytest.raises(DataError, match="mr_train: no mr cases found"):
    adapters.get_adapter("mmwhs").cases(root)


def test_missing_root_and_missing_modality_folder(tmp_path):
  with pytest.raises(DataError, match="nowhere: dataset root not found"):
    adapters.get_adapter("mmwhs").cases(str(tmp_path / "nowhere"))
  with pytest.raises(DataError, match="ct_train: ct training folder not found"):
    adapters.get_adapter("mmwhs").cases(str(tmp_path))


def test_label_grid_must_match_image(tmp_path):
  root = _mmwhs(tmp_path, modalities=("ct",))
  _nifti(str(tmp_path / "ct_train" / "ct_train_1001_label.nii.gz"), np.zeros((8, 2, 1), np.int16))
  case = adapters.get_adapter("mmwhs", modalities=("ct",)).cases(root)[0]
  with pytest.raises(DataError, match="ct_train_1001_label.nii.gz: label shape"):
    adapters.get_adapter("mmwhs").read(case)


def test_get_adapter_rejects_unknown_names_and_options():
  with pytest.raises(DataError, match="unknown adapter"):
    adapters.get_adapter("nope")
  with pytest.raises(DataError, match="colour"):
    adapters.get_adapter("mmwhs", colour="red")
  with pytest.raises(DataError, match="modalities"):
    adapters.get_adapter("mmwhs", modalities=("pet",))


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
  adapter = adapters.get_adapter("abdominal", modalities=("ct",))
  assert adapter.classes == ("background", "liver", "right_kidney", "left_kidney", "spleen")
  (case,) = adapter.cases(str(tmp_path))
  assert (case.id, case.modality) == ("btcv_0001", "ct")
  assert _labels(adapter, case) == BTCV_CLASSES


def test_btcv_configurable_folder_and_missing_folder(tmp_path):
  base = os.path.join(tmp_path, "ct_data")
  _nifti(os.path.join(base, "img", "img0003.nii.gz"), _image_like([0]))
  _nifti(os.path.join(base, "label", "label0003.nii.gz"), _codes_volume([0]))
  adapter = adapters.get_adapter("abdominal", ct_dir="ct_data", modalities=("ct",))
  assert [c.id for c in adapter.cases(str(tmp_path))] == ["btcv_0003"]
  with pytest.raises(DataError, match="BTCV: no BTCV img"):
    adapters.get_adapter("abdominal", modalities=("ct",)).cases(str(tmp_path))


def test_unexpected_nifti_name_is_reported(tmp_path):
  base = os.path.join(tmp_path, "BTCV")
  _nifti(os.path.join(base, "img", "img0001.nii.gz"), _image_like([0]))
  _nifti(os.path.join(base, "img", "scan7.nii.gz"), _image_like([0]))
  _nifti(os.path.join(base, "label", "label0001.nii.gz"), _codes_volume([0]))
  with pytest.raises(DataError, match="scan7.nii.gz: unexpected file name"):
    adapters.get_adapter("abdominal", modalities=("ct",)).cases(str(tmp_path))


# ----------------------------------------------------------------------------------------
# Abdominal: CHAOS MR
# ----------------------------------------------------------------------------------------

CHAOS_CODES = [0, 63, 55, 70, 126, 110, 189, 200, 252, 240]
CHAOS_CLASSES = [0, 1, 1, 1, 2, 2, 3, 3, 4, 4]


def test_chaos_nifti_codes(tmp_path):
  base = os.path.join(tmp_path, "CHAOS")
  _nifti(os.path.join(base, "images", "p1.nii.gz"), _image_like(CHAOS_CODES))
  _nifti(os.path.join(base, "labels", "p1.nii.gz"), _codes_volume(CHAOS_CODES))
  adapter = adapters.get_adapter("abdominal", modalities=("mr",))
  (case,) = adapter.cases(str(tmp_path))
  assert (case.id, case.modality) == ("chaos_p1", "mr")
  assert _labels(adapter, case) == CHAOS_CLASSES


def test_chaos_nifti_out_of_range_value(tmp_path):
  base = os.path.join(tmp_path, "CHAOS")
  _nifti(os.path.join(base, "images", "p1.nii.gz"), _image_like([0, 1, 100]))
  _nifti(os.path.join(base, "labels", "p1.nii.gz"), _codes_volume([0, 1, 100]))
  (case,) = adapters.get_adapter("abdominal", modalities=("mr",)).cases(str(tmp_path))
  with pytest.raises(DataError, match=r"p1.nii.gz: unknown label codes \[1, 100\]"):
    adapters.get_adapter("abdominal").read(case)


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
  adapter = adapters.get_adapter("folder", modalities={"ct": "Dataset001_CT", "mr": absolute})
  cases = adapter.cases(str(tmp_path))
  assert [(c.id, c.modality) for c in cases] == [("a", "ct"), ("b", "ct"), ("c", "mr")]
  assert adapter.classes == ("background", "liver", "tumour")
  assert cases[2].image.endswith(os.path.join("Task02_MR", "imagesTr", "c_0000.nii.gz"))
  assert _labels(adapter, cases[0]) == [0, 1, 2]


def test_folders_that_label_different_structures_train_their_union(tmp_path):
  """Classes are matched by name: background, CT's in its order, then MR's new ones; each
  modality's codes are its own dataset.json indices, and it holds only its own names."""
  _nnunet(
    str(tmp_path / "ct"), {"background": 0, "liver": 1, "spleen": 2, "aorta": 3}, codes=(0, 1, 2, 3)
  )
  _nnunet(str(tmp_path / "mr"), {"background": 0, "kidney": 1, "liver": 2}, codes=(0, 1, 2))
  # Given MR first: modalities still come in the order of their names.
  adapter = adapters.get_adapter("folder", modalities={"mr": "mr", "ct": "ct"})
  ct, mr = adapter.cases(str(tmp_path))
  assert adapter.classes == ("background", "liver", "spleen", "aorta", "kidney")
  assert adapter.labelled("ct") == ("background", "liver", "spleen", "aorta")
  assert adapter.labelled("mr") == ("background", "kidney", "liver")
  assert _labels(adapter, ct) == [0, 1, 2, 3]
  assert _labels(adapter, mr) == [0, 4, 1]  # MR kidney (1) and liver (2) as union classes
  # Predictions carry every class, no code twice: MR writes aorta with CT's code 3, which
  # is free in MR, and spleen, whose CT code 2 is MR's liver, with the next free code, 4;
  # CT writes kidney with 4, above its own codes, since MR's code for it, 1, is CT's liver.
  assert adapter.label_codes("mr") == (0, 2, 4, 3, 1)
  assert adapter.label_codes("ct") == (0, 1, 2, 3, 4)


def test_abdominal_all_ct_organs_trains_btcvs_13_with_chaos_4(tmp_path):
  adapter = adapters.get_adapter("abdominal", organs="all_ct")
  assert len(adapter.classes) == 14 and adapter.classes[6] == "liver"
  assert adapter.labelled("mr") == ("background", "liver", "right_kidney", "left_kidney", "spleen")
  assert adapter.labelled("ct") == adapter.classes
  # CT codes are BTCV's own; CHAOS grey values land on the same organs.
  assert adapter.label_codes("ct") == tuple(range(14))
  table = adapter.code_table("mr")
  assert [table[v] for v in (0, 63, 126, 189, 252)] == [0, 6, 2, 3, 1]
  assert adapter.label_codes("mr") == (0, 252, 126, 189, 4, 5, 63, 7, 8, 9, 10, 11, 12, 13)
  with pytest.raises(DataError, match="organs='every'"):
    adapters.get_adapter("abdominal", organs="every")


def test_folder_label_value_beyond_classes(tmp_path):
  _nnunet(str(tmp_path / "ct"), V2, codes=(0, 1, 3))
  adapter = adapters.get_adapter("folder", modalities={"ct": "ct"})
  (case,) = adapter.cases(str(tmp_path))
  with pytest.raises(DataError, match=r"liver_001.nii.gz: unknown label codes \[3\]"):
    adapter.read(case)


def test_folder_unreadable_dataset_json(tmp_path):
  _nnunet(str(tmp_path / "ct"), V2)
  (tmp_path / "ct" / "dataset.json").write_text("{not json")
  with pytest.raises(DataError, match="dataset.json: cannot read"):
    adapters.get_adapter("folder", modalities={"ct": "ct"}).cases(str(tmp_path))


def test_folder_empty_dataset(tmp_path):
  _nnunet(str(tmp_path / "ct"), V2, cases=())
  os.makedirs(tmp_path / "ct" / "imagesTr")
  os.makedirs(tmp_path / "ct" / "labelsTr")
  with pytest.raises(DataError, match="ct: no ct cases found"):
    adapters.get_adapter("folder", modalities={"ct": "ct"}).cases(str(tmp_path))


def test_folder_classes_need_cases_first():
  with pytest.raises(DataError, match="cases"):
    _ = adapters.get_adapter("folder", modalities={"ct": "ct"}).classes


# ----------------------------------------------------------------------------------------
# Label codes predictions are written with
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "name, modality, codes",
  [
    ("mmwhs", "ct", (0, 205, 420, 500, 820)),
    ("mmwhs", "mr", (0, 205, 420, 500, 820)),
    # BTCV: 6 liver, 2 right kidney, 3 left kidney, 1 spleen (classes in that order).
    ("abdominal", "ct", (0, 6, 2, 3, 1)),
    ("abdominal", "mr", (0, 63, 126, 189, 252)),
  ],
)
def test_label_codes_are_the_datasets_own_and_read_back_as_their_class(name, modality, codes):
  adapter = adapters.get_adapter(name)
  assert adapter.label_codes(modality) == codes
  table = adapter.code_table(modality)
  assert [table[code] for code in codes] == list(range(len(adapter.classes)))


def test_folder_label_codes_are_the_dataset_json_values(tmp_path):
  _nnunet(str(tmp_path / "ct"), {"background": 0, "liver": 1, "tumour": 2})
  adapter = adapters.get_adapter("folder", modalities={"ct": "ct"})
  adapter.cases(str(tmp_path))
  assert adapter.label_codes("ct") == (0, 1, 2)
