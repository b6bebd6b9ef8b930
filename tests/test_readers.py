"""AMOS22 and per-structure mask (TotalSegmentator) readers, on files the phantom generator
writes in those layouts: cases, classes, the problems they refuse, `--mode=check` and a tiny
training run each."""

import json
import os
import re
import shutil

import nibabel as nib
import numpy as np
import pytest
from helpers import tiny_config

from ukd import commands
from ukd.data import adapters
from ukd.data.adapters.amos import AMOS_CLASSES, modality_of
from ukd.data.synthetic import generate
from ukd.errors import DataError

SHAPE = (16, 16, 8)
STRUCTURES = "liver,spleen,kidney_left,kidney_right"


@pytest.fixture(scope="module")
def amos_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("amos")
  generate.write_amos(root, 3, 3, shape=SHAPE)
  return str(root)


@pytest.fixture(scope="module")
def totalseg_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("totalseg")
  generate.write_totalseg(root, 2, 2, shape=SHAPE)
  return str(root)


def _copy(root, tmp_path):
  return shutil.copytree(root, tmp_path / "data")


# ----------------------------------------------------------------------------------- AMOS22


def test_amos_case_numbers_say_the_modality():
  assert [modality_of(n) for n in (1, 410, 499, 500, 507, 600)] == ["ct"] * 3 + ["mr"] * 3


def test_amos_phantoms_are_written_in_the_release_layout(amos_root):
  assert sorted(os.listdir(amos_root)) == [
    "dataset.json",
    "imagesTr",
    "imagesVa",
    "labelsTr",
    "labelsVa",
  ]
  assert sorted(os.listdir(os.path.join(amos_root, "imagesVa"))) == [
    "amos_0003.nii.gz",
    "amos_0509.nii.gz",
  ]
  with open(os.path.join(amos_root, "dataset.json")) as f:
    meta = json.load(f)
  assert meta["labels"]["8"] == "arota" and len(meta["labels"]) == 16
  assert meta["validation"][0] == {
    "image": "./imagesVa/amos_0003.nii.gz",
    "label": "./labelsVa/amos_0003.nii.gz",
  }


def test_amos_reads_both_parts_and_tells_ct_from_mr_by_number(amos_root):
  adapter = adapters.get_adapter("amos")
  cases = adapter.cases(amos_root)
  assert [(c.id, c.modality) for c in cases] == [
    ("amos_0001", "ct"),
    ("amos_0002", "ct"),
    ("amos_0003", "ct"),
    ("amos_0507", "mr"),
    ("amos_0508", "mr"),
    ("amos_0509", "mr"),
  ]
  assert adapter.classes == AMOS_CLASSES and len(adapter.classes) == 16
  assert adapter.label_codes("mr") == tuple(range(16))
  image, label = adapter.read(cases[-1])
  assert image.array.shape == label.array.shape
  # The phantoms draw 8 of AMOS's 15 organs.
  assert set(np.unique(label.array)) <= {0, 1, 2, 3, 4, 6, 7, 8, 9}
  only_mr = adapters.get_adapter("amos", modalities=("mr",)).cases(amos_root)
  assert {c.modality for c in only_mr} == {"mr"}


def test_amos_accepts_nnunet_channel_suffixes(amos_root, tmp_path):
  root = _copy(amos_root, tmp_path)
  os.rename(root / "imagesTr" / "amos_0001.nii.gz", root / "imagesTr" / "amos_0001_0000.nii.gz")
  (case, *_) = adapters.get_adapter("amos", modalities=("ct",)).cases(str(root))
  assert case.id == "amos_0001" and case.image.endswith("amos_0001_0000.nii.gz")


@pytest.mark.parametrize(
  "spoil,message",
  [
    (lambda r: os.remove(r / "labelsTr" / "amos_0002.nii.gz"), "image has no matching label"),
    (lambda r: os.remove(r / "dataset.json"), "cannot read dataset.json labels"),
    (lambda r: shutil.rmtree(r / "labelsVa"), "AMOS labelsVa folder not found"),
    (
      lambda r: shutil.copy(r / "imagesVa" / "amos_0003.nii.gz", r / "imagesTr"),
      "same case as",
    ),
    (lambda r: (r / "imagesTr" / "case_1.nii.gz").touch(), "unexpected file name"),
  ],
)
def test_amos_layout_problems_are_one_line_errors(amos_root, tmp_path, spoil, message):
  root = _copy(amos_root, tmp_path)
  spoil(root)
  with pytest.raises(DataError, match=message) as e:
    adapters.get_adapter("amos").cases(str(root))
  assert "\n" not in str(e.value)


def test_amos_refuses_a_dataset_json_of_another_label_table(amos_root, tmp_path):
  root = _copy(amos_root, tmp_path)
  (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver"}}))
  with pytest.raises(DataError, match="2 labels; AMOS22 has background and 15 organs"):
    adapters.get_adapter("amos").cases(str(root))


# ------------------------------------------------------------------------- per-structure masks


def test_totalseg_classes_follow_the_structures_named(totalseg_root):
  adapter = adapters.get_adapter("totalseg", structures=STRUCTURES)
  assert adapter.classes == ("background", *STRUCTURES.split(","))
  assert adapter.lateral_pairs == (("kidney_left", "kidney_right"),)
  cases = adapter.cases(totalseg_root)  # meta.csv beside the cases is not one
  assert [(c.id, c.modality) for c in cases] == [
    ("s0000", "ct"),
    ("s0001", "ct"),
    ("s0002", "mr"),
    ("s0003", "mr"),
  ]
  image, label = adapter.read(cases[2])
  for index, structure in enumerate(STRUCTURES.split(","), start=1):
    mask = nib.load(os.path.join(totalseg_root, "s0002", "segmentations", f"{structure}.nii.gz"))
    assert mask.get_fdata().sum() == (label.array == index).sum() > 0
  assert image.array.shape == label.array.shape


def _spoil_mask(root, case, structure, change):
  path = root / case / "segmentations" / f"{structure}.nii.gz"
  mask = nib.load(path)
  array, affine = change(np.asarray(mask.dataobj), mask.affine.copy())
  nib.save(nib.Nifti1Image(array, affine), path)
  return path


def test_totalseg_overlapping_masks_name_both_files(totalseg_root, tmp_path):
  root = _copy(totalseg_root, tmp_path)
  liver = root / "s0001" / "segmentations" / "liver.nii.gz"
  spleen = _spoil_mask(
    root, "s0001", "spleen", lambda a, affine: (np.asarray(nib.load(liver).dataobj), affine)
  )
  adapter = adapters.get_adapter("totalseg", structures=STRUCTURES, modalities=("ct",))
  case = adapter.cases(str(root))[1]
  with pytest.raises(DataError) as e:
    adapter.read(case)
  assert str(e.value).startswith(f"{spleen}: overlaps {liver} in ")
  assert "\n" not in str(e.value)


@pytest.mark.parametrize(
  "change,message",
  [
    (lambda a, affine: (a[:-1], affine), r"label shape \(15, 16, 8\) differs from image shape"),
    (lambda a, affine: (a, affine @ np.diag([2.0, 1, 1, 1])), "label affine .* differs"),
    (lambda a, affine: (a * 2, affine), r"not a binary mask: values \[0, 2\]"),
  ],
)
def test_totalseg_masks_on_another_grid_or_not_binary_are_refused(
  totalseg_root, tmp_path, change, message
):
  root = _copy(totalseg_root, tmp_path)
  path = _spoil_mask(root, "s0000", "kidney_left", change)
  adapter = adapters.get_adapter("totalseg", structures=STRUCTURES, modalities=("ct",))
  with pytest.raises(DataError, match=f"{re.escape(str(path))}: {message}") as e:
    adapter.read(adapter.cases(str(root))[0])
  assert "\n" not in str(e.value)


def test_totalseg_layout_problems_are_one_line_errors(totalseg_root, tmp_path):
  root = _copy(totalseg_root, tmp_path)
  adapter = adapters.get_adapter("totalseg", structures=f"{STRUCTURES},pancreas")
  with pytest.raises(DataError, match=r"pancreas.nii.gz: structure mask missing"):
    adapter.read(adapter.cases(str(root))[0])
  shutil.copy(root / "s0000" / "ct.nii.gz", root / "s0002" / "ct.nii.gz")
  with pytest.raises(DataError, match=r"s0002: holds both ct.nii.gz or mri.nii.gz"):
    adapter.cases(str(root))
  os.makedirs(root / "empty")
  os.remove(root / "s0002" / "ct.nii.gz")
  with pytest.raises(DataError, match=r"empty: holds no ct.nii.gz or mri.nii.gz"):
    adapter.cases(str(root))
  for bad in ("", "liver,liver", "background", "../liver"):
    with pytest.raises(DataError, match="totalseg option structures"):
      adapters.get_adapter("totalseg", structures=bad)


# ------------------------------------------------------- --mode=check and a tiny training run


def _tiny(dataset, flip=(), **data):
  """The smallest 2D run on phantoms written into <workdir>/phantoms in `dataset`'s layout."""
  config = tiny_config()
  config.data.augment.flip = flip
  config.data.dataset = dataset
  config.data.root = ""
  config.data.synthetic.update(enabled=True, n_ct=3, n_mr=3, shape=SHAPE)
  config.data.update(size=(16, 16), workers=0, split_fractions=(0.34, 0.33, 0.33), **data)
  config.update(total_steps=2, log_every=1, eval_every=2, checkpoint_every=2, overlays=0)
  config.infer.batch_size = 8
  return config


@pytest.mark.parametrize(
  "dataset,data,classes",
  [
    ("amos", {}, 16),
    ("totalseg", {"structures": STRUCTURES, "flip": (0, 1)}, 5),
  ],
)
def test_check_mode_then_a_tiny_run_trains_and_evaluates(tmp_path, capsys, dataset, data, classes):
  config = _tiny(dataset, **data)
  report = commands.check(config, tmp_path)
  assert {m: r["cases"] for m, r in report.items()} == {"ct": 3, "mr": 3}
  out = capsys.readouterr().out
  assert "every case read" in out and ("kidney_left (3) in 3/3" in out) == (dataset == "totalseg")
  result = commands.train_and_evaluate(config, tmp_path)
  assert result["step"] == 2
  assert set(result["test"]["summary"]) == {"ct", "mr"}
  from ukd.serve import segmenter

  seg = segmenter.load(str(tmp_path))
  assert seg.config.model.num_classes == classes
  expected = ((3, 4),) if dataset == "totalseg" else ((3, 2), (12, 11))
  assert tuple(map(tuple, seg.config.data.lateral_pairs)) == expected
