"""The dataset check: every case read once, broken ones reported together, before training."""

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from helpers import tiny_config

from ukd.data import adapters, check
from ukd.errors import DataError
from ukd.train import loop as train

# Case k of each modality: shape, voxel size (mm) and whether class B is drawn.
CASES = {
  "ct": [((16, 16, 6), (2.0, 1.0, 1.5), True), ((20, 16, 5), (1.0, 1.0, 3.0), False)],
  "mr": [((12, 14, 4), (1.5, 1.5, 4.0), True)],
}


def _write(root, broken=()):
  """nnU-Net folders per modality; `broken` names cases to spoil, e.g. {'ct/case1': 'nan'}."""
  for modality, cases in CASES.items():
    folder = os.path.join(root, modality)
    for sub in ("imagesTr", "labelsTr"):
      os.makedirs(os.path.join(folder, sub), exist_ok=True)
    with open(os.path.join(folder, "dataset.json"), "w") as f:
      json.dump({"labels": {"background": 0, "A": 1, "B": 2}, "file_ending": ".nii.gz"}, f)
    for k, (shape, spacing, with_b) in enumerate(cases):
      label = np.zeros(shape, np.uint8)
      label[1:4, 1:4, 1:3] = 1
      if with_b:
        label[6:9, 5:8, 2:4] = 2
      image = label * 100.0 + 10.0
      affine = np.diag([*spacing, 1.0])
      problem = dict(broken).get(f"{modality}/case{k}")
      if problem == "nan":
        image[0, 0, 0] = np.nan
      label_affine = affine.copy()
      if problem == "shifted":
        label_affine[0, 3] = 5.0
      name = f"case{k}"
      nib.save(
        nib.Nifti1Image(image.astype(np.float32), affine),
        os.path.join(folder, "imagesTr", f"{name}_0000.nii.gz"),
      )
      nib.save(
        nib.Nifti1Image(label, label_affine), os.path.join(folder, "labelsTr", f"{name}.nii.gz")
      )
  return root


def _adapter(root):
  adapter = adapters.get_adapter("folder", modalities={"ct": "ct", "mr": "mr"})
  return adapter, adapter.cases(root)


def test_a_sound_dataset_is_summarised_per_modality(tmp_path):
  adapter, cases = _adapter(_write(str(tmp_path)))
  report = check.check_cases(adapter, cases)
  assert report == {
    "ct": dict(
      cases=2,
      shape=[(16, 20), (16, 16), (5, 6)],
      spacing=[(1.0, 2.0), (1.0, 1.0), (1.5, 3.0)],
      classes={0: 2, 1: 2, 2: 1},
    ),
    "mr": dict(
      cases=1,
      shape=[(12, 12), (14, 14), (4, 4)],
      spacing=[(1.5, 1.5)] * 2 + [(4.0, 4.0)],
      classes={0: 1, 1: 1, 2: 1},
    ),
  }
  assert check.format_report(report, adapter).splitlines() == [
    "ct: 2 cases, spacing 1.00-2.00 x 1.00 x 1.50-3.00 mm, shape 16-20 x 16 x 5-6",
    "  classes: A (1) in 2/2, B (2) in 1/2",
    "mr: 1 cases, spacing 1.50 x 1.50 x 4.00 mm, shape 12 x 14 x 4",
    "  classes: A (1) in 1/1, B (2) in 1/1",
  ]


def test_every_broken_case_is_reported_in_one_line(tmp_path):
  root = _write(str(tmp_path), {"ct/case1": "nan", "mr/case0": "shifted"})
  adapter, cases = _adapter(root)
  with pytest.raises(DataError) as error:
    check.check_cases(adapter, cases)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"{root}/ct/imagesTr/case1_0000.nii.gz: 1 voxels are NaN or Inf")
  assert message.endswith("(1 more broken cases: mr/case0)")


def test_training_checks_every_split_before_preprocessing(tmp_path):
  """A broken case in any split, validation and test included, stops the run before the
  cache is built; only training cases used to be read before the first validation."""
  root = _write(str(tmp_path / "data"))
  config = tiny_config(modalities=("ct",))
  config.data.dataset, config.data.root = "folder", root
  config.data.options.modalities = {"ct": "ct"}
  config.data.split_fractions = (0.5, 0.5, 0.0)
  config.data.size = (16, 16)
  workdir = str(tmp_path / "run")
  data = train.prepare_data(config, root, workdir)
  with open(os.path.join(workdir, "splits.json")) as f:
    (val_id,) = json.load(f)["ct"]["val"]
  assert [c.id for c in data.cases["ct"]["val"]] == [val_id]
  _write(root, {f"ct/{val_id}": "nan"})
  other = str(tmp_path / "other")  # the same split, an empty cache
  os.makedirs(other)
  shutil.copy(os.path.join(workdir, "splits.json"), other)
  with pytest.raises(DataError, match=f"{val_id}_0000.nii.gz: 1 voxels are NaN"):
    train.prepare_data(config, root, other)
  assert not os.path.exists(os.path.join(other, "cache"))


def test_check_mode_reads_every_case_of_the_configs_modalities_whatever_the_split(tmp_path, capsys):
  root = _write(str(tmp_path))
  config = tiny_config(modalities=("ct",))
  config.data.dataset = "folder"
  config.data.options.modalities = {"ct": "ct", "mr": "mr"}
  config.data.split_fractions = (0.5, 0.5, 0.0)
  report = check.check_dataset(config, root)
  assert list(report) == ["ct"] and report["ct"]["cases"] == 2  # mr is not configured
  assert capsys.readouterr().out.splitlines()[:2] == [
    f"{root}: every case read",
    "ct: 2 cases, spacing 1.00-2.00 x 1.00 x 1.50-3.00 mm, shape 16-20 x 16 x 5-6",
  ]
