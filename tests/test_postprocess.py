"""Post-processing: rules applied to label maps, rules chosen on validation, rules read back,
and `--mode=postprocess` on a tiny work dir."""

import json
import os

import jax
import numpy as np
import pytest
from helpers import run_module, tiny_config, write_folder_dataset

from ukd import models
from ukd.data.adapters import Adapter, Case
from ukd.data.io.volumes import from_array
from ukd.errors import DataError
from ukd.evaluation import evaluate, postprocess
from ukd.runtime import checkpoints

SHAPE = (16, 16, 8)
SPACING = (1.0, 1.0, 1.0)


def _organs():
  """Class 1: a 4x4x4 block; class 2: a 3x3x3 block beside it."""
  labels = np.zeros(SHAPE, np.uint8)
  labels[2:6, 2:6, 2:6] = 1
  labels[8:11, 8:11, 2:5] = 2
  return labels


def test_largest_component_removes_an_island_and_leaves_the_organ():
  organs = _organs()
  labels = organs.copy()
  labels[13:16, 14, 7] = 1  # a 3-voxel island of class 1 far from its organ
  out = postprocess.apply(labels, {"1": {"largest_component": True}}, SPACING)
  np.testing.assert_array_equal(out, organs)
  assert out.dtype == np.uint8 and labels[14, 14, 7] == 1  # a new array; the input is kept


def test_components_touching_by_a_corner_are_one_structure():
  labels = np.zeros(SHAPE, np.uint8)
  labels[2:6, 2:6, 2:6] = 1
  labels[6, 6, 6] = 1  # meets the block only at a corner: 26-connectivity keeps it
  out = postprocess.apply(labels, {1: {"largest_component": True}}, SPACING)
  np.testing.assert_array_equal(out, labels)


def test_min_volume_removes_only_components_below_it():
  labels = _organs()
  labels[12:14, 12:14, 6:8] = 1  # 8 voxels of 2 mm^3 = 16 mm^3; the block is 128 mm^3
  labels[0, 15, 0] = 2  # class 2 is not named: its 2 mm^3 speck stays
  out = postprocess.apply(labels, {"1": {"min_volume_mm3": 20}}, (2.0, 1.0, 1.0))
  expected = _organs()
  expected[0, 15, 0] = 2
  np.testing.assert_array_equal(out, expected)
  kept = postprocess.apply(labels, {"1": {"min_volume_mm3": 16}}, (2.0, 1.0, 1.0))
  np.testing.assert_array_equal(kept, labels)  # exactly the threshold: kept
  np.testing.assert_array_equal(postprocess.apply(labels, {}, SPACING), labels)


def _two_kidneys():
  """Class 2 in two separate pieces of similar size, as kidneys are."""
  labels = _organs()
  labels[8:11, 8:11, 2:5] = 0
  labels[8:11, 2:5, 2:5] = 2
  labels[8:11, 11:14, 3:6] = 2
  return labels


def test_rules_are_kept_only_where_they_raise_validation_dice():
  truth = _two_kidneys()
  pred = truth.copy()
  pred[14, 14:16, 7] = 1  # a false island of class 1
  island_in_truth = truth.copy()
  island_in_truth[14, 14:16, 7] = 1  # in MR the "island" is real
  cases = {
    "ct": [(truth, pred, SPACING), (truth, truth, SPACING)],
    "mr": [(island_in_truth, pred, SPACING)],
  }
  rules, numbers = postprocess.choose_rules(cases, num_classes=3)
  # Class 1 in CT: the largest component helps (ties with the 10 mm^3 threshold: the first
  # candidate wins). Class 2 (two pieces) would lose a kidney: left alone. MR: nothing helps.
  assert rules == {"ct": {"1": {"largest_component": True}}, "mr": {}}
  ct = numbers["ct"]
  assert ct["1"]["largest_component"] > ct["1"]["none"]
  assert ct["1"]["min_volume_mm3"]["10"] == ct["1"]["largest_component"]
  assert ct["2"]["largest_component"] < ct["2"]["none"] == 1.0
  assert ct["2"]["chosen"] is None and numbers["mr"]["1"]["chosen"] is None
  assert ct["2"]["min_volume_mm3"]["10"] == 1.0  # no change is no gain: not kept
  assert (
    postprocess.describe(rules, ("background", "A", "B")) == "ct: A largest component; mr: none"
  )


def _workdir(tmp_path, rules=None):
  """A work dir (resolving needs its checkpoints folder), with a postprocessing.json."""
  workdir = tmp_path / "run"
  os.makedirs(workdir / "checkpoints" / "4")
  if rules is not None:
    (workdir / "postprocessing.json").write_text(json.dumps({"rules": rules, "step": 4}))
  return workdir


def test_load_rules_choices(tmp_path):
  rules = {"ct": {"1": {"largest_component": True}}, "mr": {"2": {"min_volume_mm3": 100}}}
  workdir = _workdir(tmp_path, rules)
  assert postprocess.load_rules([str(workdir)], "none") is None
  assert postprocess.load_rules([str(workdir)], "auto") == rules
  step_dir = str(workdir / "checkpoints" / "4")
  assert postprocess.load_rules([step_dir], "auto") == rules
  with pytest.warns(UserWarning, match="ensemble: no work dir's post-processing is applied"):
    assert postprocess.load_rules([str(workdir), step_dir], "auto") is None
  named = str(workdir / "postprocessing.json")
  assert postprocess.load_rules([str(workdir), step_dir], named) == rules
  assert postprocess.load_rules([str(_workdir(tmp_path / "bare"))], "auto") is None


@pytest.mark.parametrize(
  "content,problem",
  [
    (None, "cannot read post-processing rules"),
    ("{not json", "cannot read post-processing rules"),
    ('{"step": 4}', "no 'rules'"),
    ('{"rules": {"ct": {"0": {"largest_component": true}}}}', "rules.ct.0: class keys"),
    ('{"rules": {"ct": {"1": {"biggest": true}}}}', "rules.ct.1 must be a dict of"),
    ('{"rules": {"ct": {"1": {"min_volume_mm3": -1}}}}', "min_volume_mm3 must be a number"),
  ],
)
def test_a_bad_rules_file_is_a_one_line_error_naming_it(tmp_path, content, problem):
  path = tmp_path / "rules.json"
  if content is not None:
    path.write_text(content)
  with pytest.raises(DataError, match=problem) as caught:
    postprocess.load_rules(["unused"], str(path))
  assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


class _Stub(Adapter):
  """Reads and predicts from memory, counting predictions: no network."""

  classes = ("background", "A", "B")
  config = tiny_config()
  step = 4

  def __init__(self):
    self.predicted = 0

  def read(self, case):
    image = from_array(np.zeros(SHAPE, np.float32), np.eye(4), source=case.id)
    return image, from_array(_organs().astype(np.int32), np.eye(4), source=case.id)

  def predict_volume(self, vol, modality):
    self.predicted += 1
    pred = _organs()
    pred[14, 14:16, 7] = 1
    return pred, None


def test_evaluation_scores_raw_and_post_processed_labels_from_one_prediction(tmp_path):
  stub = _Stub()
  cases = [Case("c1", "ct", "", ""), Case("m1", "mr", "", "")]
  rules = {"ct": {"1": {"largest_component": True}}}
  result = evaluate.evaluate_cases(stub, stub, cases, out_dir=str(tmp_path), rules=rules)
  assert stub.predicted == 2
  raw, fixed = result["summary"], result["postprocessed"]["summary"]
  assert raw["ct"]["A"]["dice"]["mean"] < fixed["ct"]["A"]["dice"]["mean"] == 1.0
  assert raw["mr"] == fixed["mr"]  # no MR rules
  with open(tmp_path / "metrics.json") as f:
    record = json.load(f)
  assert record["postprocessed"]["rules"] == rules
  assert record["postprocessed"]["metrics"]["ct"]["A"]["dice"]["mean"] == 1.0
  assert os.path.exists(tmp_path / "cases_postprocessed.csv")


def _folder_dataset(root):
  """nnU-Net style CT and MR folders of three cases: one validation case each."""

  def case(modality, k):
    return _organs().astype(np.float32) * 100, _organs()

  write_folder_dataset(root, ("ct", "mr"), 3, case, np.eye(4))


def test_postprocess_mode_writes_the_rules_of_a_work_dir(tmp_path):
  root, workdir = str(tmp_path / "data"), str(tmp_path / "run")
  _folder_dataset(root)
  config = tiny_config()
  config.data.size = SHAPE[:2]
  config.infer.batch_size = 8
  config.data.dataset, config.data.root = "folder", root
  config.data.options.modalities = {"ct": "ct", "mr": "mr"}
  model = models.build(config.model, config.modalities)
  shapes = jax.eval_shape(
    lambda: models.init_variables(model, config.model, SHAPE[:2], jax.random.key(0))
  )
  mgr = checkpoints.manager(workdir)  # zero weights: background everywhere, plumbing only
  checkpoints.save(mgr, 3, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes), config)
  mgr.wait_until_finished()
  mgr.close()

  out = run_module("ukd.main", "--mode=postprocess", f"--workdir={workdir}")

  with open(os.path.join(workdir, "postprocessing.json")) as f:
    record = json.load(f)
  assert record["rules"] == {"ct": {}, "mr": {}}  # nothing to remove: nothing chosen
  assert (record["step"], record["split"], record["cases"]) == (3, "val", {"ct": 1, "mr": 1})
  assert record["validation"]["ct"]["1"]["name"] == "A"
  assert "post-processing: ct: none; mr: none" in out.stdout
