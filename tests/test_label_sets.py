"""Modalities whose labels hold different structures, end to end: two nnU-Net folders (CT
labels A and B, MR labels C and B) train one network on the union of their classes, and
evaluation scores each modality only on what its references hold."""

import json
import os

import numpy as np
import pytest
from helpers import tiny_config, write_folder_dataset

from ukd import commands
from ukd import config as config_lib
from ukd.errors import ConfigError

SHAPE = (16, 16, 4)
# MR's dataset.json names C first and shares B with CT: classes are matched by name.
LABELS = {
  "ct": {"background": 0, "A": 1, "B": 2},
  "mr": {"background": 0, "C": 1, "B": 2},
}


def _case(modality, k):
  """Two boxes, codes 1 and 2 of the modality's own dataset.json, on a bright image."""
  label = np.zeros(SHAPE, np.uint8)
  label[2:7, 2:7] = 1
  label[9:14, 8 + k % 2 : 14] = 2
  image = label * 100.0 + np.random.default_rng(k).normal(0, 10, SHAPE)
  return image.astype(np.float32), label


def test_two_folders_that_label_different_structures_train_and_evaluate(tmp_path, capsys):
  root, workdir = str(tmp_path / "data"), str(tmp_path / "run")
  write_folder_dataset(root, ("ct", "mr"), 5, _case, np.eye(4), labels=LABELS)
  config = tiny_config(num_classes=4)
  config.data.dataset, config.data.root = "folder", root
  config.data.options.modalities = {"ct": "ct", "mr": "mr"}
  config.data.size = SHAPE[:2]
  config.data.workers = 0
  config.total_steps = config.checkpoint_every = 2
  config.log_every = 1
  config.overlays = 0
  config.infer.batch_size = 8

  result = commands.train_and_evaluate(config, workdir)

  # Validation scored each modality on its own classes (background, A, B, C in the network).
  assert "val_dice/mr/C" in result["val"] and "val_dice/mr/A" not in result["val"]
  assert "val_dice/ct/A" in result["val"] and "val_dice/ct/C" not in result["val"]
  test = result["test"]
  assert test["not_scored"] == {"ct": ["C"], "mr": ["A"]}
  assert set(test["summary"]["ct"]) == {"A", "B", "mean"}
  assert set(test["summary"]["mr"]) == {"B", "C", "mean"}
  with open(os.path.join(test["dir"], "metrics.json")) as f:
    assert json.load(f)["not_scored"] == {"ct": ["C"], "mr": ["A"]}
  printed = capsys.readouterr().out
  assert "mr: not scored (its references do not label them): A" in printed
  assert "ct: not scored (its references do not label them): C" in printed


def test_data_labelled_narrows_a_modality_and_is_resolved_to_indices():
  classes = ("background", "MYO", "LAC", "LVC", "AA")
  config = tiny_config(num_classes=5)
  config.data.labelled = "mr=MYO+LVC"
  resolved = config_lib.resolve(config, root="/data", classes=classes)
  assert resolved.data.label_sets.to_dict() == {"mr": (0, 1, 3)}
  masks = config_lib.label_masks(resolved)
  assert list(masks) == ["mr"] and masks["mr"].tolist() == [True, True, False, True, False]
  # What the dataset holds narrows it too: CT holds MYO and LAC only here.
  held = {"ct": ("background", "MYO", "LAC")}
  config.data.labelled = "LAC+LVC+MYO"  # every modality
  sets = config_lib.resolve(config, root="/data", classes=classes, held=held).data.label_sets
  assert sets.to_dict() == {"ct": (0, 1, 2), "mr": (0, 1, 2, 3)}
  config.data.labelled = ""
  assert config_lib.resolve(config, root="/data", classes=classes).data.label_sets.to_dict() == {}


@pytest.mark.parametrize(
  "text, message",
  [
    ("mr=MYO+Heart", "'Heart' is not a class of the dataset"),
    ("pet=MYO", "names modality 'pet'"),
    ("mr=MYO+MYO", "distinct class names"),
  ],
)
def test_data_labelled_names_known_modalities_and_classes(text, message):
  config = tiny_config(num_classes=5)
  config.data.labelled = text
  with pytest.raises(ConfigError, match=message):
    config_lib.resolve(config, root="/data", classes=("background", "MYO", "LAC", "LVC", "AA"))
