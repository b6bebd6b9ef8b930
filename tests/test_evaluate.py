"""Evaluation: per-case rows, NaN-aware summaries, written files, the table, a whole work dir."""

import csv
import json
import math
import os
import shutil

import jax
import numpy as np
import pytest
from helpers import tiny_config, write_folder_dataset
from PIL import Image

from ukd import commands, models
from ukd.data import adapters
from ukd.data import splits as splits_lib
from ukd.data.adapters import Case
from ukd.data.io.volumes import from_array
from ukd.errors import DataError
from ukd.evaluation import evaluate
from ukd.runtime import checkpoints

CLASSES = ("background", "A", "B")
SHAPE = (16, 16, 6)
AFFINE = np.diag([2.0, 1.0, 1.5, 1.0])


def _label(a=True, b=True):
  label = np.zeros(SHAPE, np.int32)
  if a:
    label[2:6, 2:6, 1:5] = 1
  if b:
    label[8:12, 6:11, 2:5] = 2
  return label


# Ground truth and prediction per case: ct/c1 perfect; ct/c2 misses B; mr/m1 has no B but
# B is predicted: the surface distances of those two are undefined (NaN).
TRUTH = {
  "c1": (_label(), _label()),
  "c2": (_label(), _label(b=False)),
  "m1": (_label(b=False), _label()),
}
CASES = [
  Case("c1", "ct", "c1.nii.gz", "c1_label.nii.gz"),
  Case("c2", "ct", "c2.nii.gz", "c2_label.nii.gz"),
  Case("m1", "mr", "m1.nii.gz", "m1_label.nii.gz"),
]


class StubAdapter(adapters.Adapter):
  """Reads the cases above from memory."""

  classes = CLASSES

  def read(self, case):
    gt = TRUTH[case.id][0]
    image = from_array(gt * 100.0 + np.arange(SHAPE[0])[:, None, None], AFFINE, source=case.id)
    return image, from_array(gt, AFFINE, source=case.id)


class StubSegmenter:
  """Returns the prediction listed for the case: metrics known in advance, no network."""

  config = tiny_config()
  step = 7

  def predict_volume(self, vol, modality):
    pred = TRUTH[vol.source][1].astype(np.uint8)
    return pred, np.eye(len(CLASSES), dtype=np.float32)[pred]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  out = tmp_path_factory.mktemp("eval")
  return out, evaluate.evaluate_cases(
    StubSegmenter(), StubAdapter(), CASES, out_dir=str(out), split="val"
  )


def test_summary_counts_undefined_distances_instead_of_averaging_them(result):
  _, res = result
  ct, mr = res["summary"]["ct"], res["summary"]["mr"]
  assert ct["A"]["dice"] == {"mean": 1.0, "std": 0.0, "n": 2, "n_empty": 0}
  assert ct["B"]["dice"] == {"mean": 0.5, "std": 0.5, "n": 2, "n_empty": 0}
  assert ct["B"]["assd"] == {"mean": 0.0, "std": 0.0, "n": 1, "n_empty": 1}
  # Per case: mean over classes, then over cases; c2's NaN ASSD makes its mean NaN.
  assert ct["mean"]["dice"] == {"mean": 0.75, "std": 0.25, "n": 2, "n_empty": 0}
  assert ct["mean"]["assd"] == {"mean": 0.0, "std": 0.0, "n": 1, "n_empty": 1}
  assert ct["mean"]["hd95"]["n_empty"] == 1
  assert mr["B"]["dice"]["mean"] == 0.0
  assert math.isnan(mr["B"]["assd"]["mean"]) and mr["B"]["assd"]["n_empty"] == 1


def test_metrics_json_has_the_documented_keys_and_no_nan(result):
  out, _ = result
  with open(out / "metrics.json") as f:
    text = f.read()
  assert "NaN" not in text
  record = json.loads(text)
  assert {k: record[k] for k in ("step", "split")} == {"step": 7, "split": "val"}
  assert set(record) == {"step", "split", "metrics"}
  saved = record["metrics"]
  assert set(saved) == {"ct", "mr"}
  assert set(saved["ct"]) == {"A", "B", "mean"}
  assert set(saved["ct"]["mean"]) == {"dice", "assd", "hd95"}
  assert set(saved["ct"]["mean"]["dice"]) == {"mean", "std", "n", "n_empty"}
  assert saved["ct"]["mean"]["dice"]["mean"] == 0.75
  assert saved["mr"]["B"]["assd"]["mean"] is None


def test_cases_csv_has_a_row_per_case_and_class(result):
  out, res = result
  with open(out / "cases.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [(r["case"], r["modality"], r["class"]) for r in rows] == [
    ("c1", "ct", "A"),
    ("c1", "ct", "B"),
    ("c2", "ct", "A"),
    ("c2", "ct", "B"),
    ("m1", "mr", "A"),
    ("m1", "mr", "B"),
  ]
  assert float(rows[3]["dice"]) == 0.0 and math.isnan(float(rows[3]["assd"]))
  assert len(res["cases"]) == 6


def test_overlays_show_image_truth_and_prediction(result):
  out, res = result
  for name in ("ct/c1", "ct/c2", "mr/m1"):
    with Image.open(out / "overlays" / f"{name}.png") as picture:
      picture.load()
      assert picture.mode == "RGB"
      assert picture.size == (416, 416)  # 3 panels and 3 slices of 16, 2-pixel gaps, x8
      assert np.array_equal(np.asarray(picture), res["overlays"][name])
  pixels = res["overlays"]["ct/c1"][: 16 * 8]
  image, truth, pred = (pixels[:, i * 18 * 8 : i * 18 * 8 + 16 * 8] for i in range(3))
  assert (image[..., 0] == image[..., 1]).all()  # grey
  assert (truth[..., 0] != truth[..., 1]).any()  # coloured classes
  assert np.array_equal(truth, pred)  # c1 is predicted perfectly


def test_overlay_slices_spread_over_the_foreground():
  label = np.zeros((8, 8, 30), np.int32)
  label[2:5, 2:5, 10:22] = 1
  label[3, 3, 15] = 0
  chosen = evaluate._slices_to_show(label, label, axis=2)
  assert len(chosen) == 3 and chosen == sorted(set(chosen))
  assert all(10 <= k < 22 for k in chosen) and 15 not in chosen
  empty = np.zeros_like(label)
  assert len(evaluate._slices_to_show(empty, empty, axis=2)) == 3
  assert evaluate.overlay_image(np.zeros((8, 8, 30)), empty, empty).dtype == np.uint8


def test_format_table_lays_out_structures_by_modality(result):
  _, res = result
  table = evaluate.format_table(res["summary"], CLASSES)
  lines = table.splitlines()
  assert len(lines) == 2 + 3  # header, rule, A, B, Mean
  assert [c.strip() for c in lines[0].split("|")[1:-1]] == [
    "Structure",
    "CT Dice (%)",
    "CT ASSD (mm)",
    "MR Dice (%)",
    "MR ASSD (mm)",
  ]
  cells = {
    line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]
  }
  assert cells["Mean"][0] == "75.0 ± 25.0"
  assert cells["Mean"][1] == "0.00 ± 0.00 (1 n/a)"
  assert cells["B"][3] == "n/a (1 n/a)"
  assert "background" not in table


# --- a whole work dir -------------------------------------------------------------------------


def _write_folder_dataset(root):
  """nnU-Net style folders, three cases each, class names A and B."""
  rng = np.random.default_rng(0)

  def case(modality, k):
    label = _label(b=k != 1)
    image = (label * 200.0 + rng.normal(0, 20, SHAPE)).astype(np.float32)
    return image, label.astype(np.uint8)

  write_folder_dataset(root, ("ct", "mr", "pet"), 3, case, AFFINE)


def _folder_config(root):
  config = tiny_config()
  config.data.size = (16, 16)
  config.infer.batch_size = 8
  config.data.dataset = "folder"
  config.data.root = root
  # The dataset has a modality the network was not trained on: it is left out.
  config.data.options.modalities = {"ct": "ct", "mr": "mr", "pet": "pet"}
  return config


def _zero_checkpoint(workdir, config, dice_by_step=None, dataset=None):
  """Zero weights predict background everywhere: the plumbing is under test, not accuracy."""
  model = models.build(config.model, config.modalities)
  shapes = jax.eval_shape(
    lambda: models.init_variables(model, config.model, (16, 16), jax.random.key(0))
  )
  mgr = checkpoints.manager(workdir)
  for step, dice in (dice_by_step or {2: None}).items():
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    checkpoints.save(mgr, step, zeros, config, val_dice=dice, dataset=dataset)
  mgr.wait_until_finished()
  mgr.close()


def _tested_ids(out_dir):
  with open(os.path.join(out_dir, "cases.csv"), newline="") as f:
    return {(r["modality"], r["case"]) for r in csv.DictReader(f)}


def test_evaluate_scores_the_test_split_of_a_work_dir(tmp_path, capsys):
  _write_folder_dataset(str(tmp_path / "data"))
  config = _folder_config(str(tmp_path / "data"))
  workdir = str(tmp_path / "run")
  _zero_checkpoint(workdir, config, dice_by_step={2: 0.5, 4: 0.4})  # best 2, latest 4

  result = commands.evaluate(workdir)

  with open(os.path.join(workdir, "splits.json")) as f:
    splits = json.load(f)
  assert set(splits) == {"ct", "mr"}
  tested = {m: splits[m]["test"] for m in ("ct", "mr")}
  assert all(len(ids) == 1 for ids in tested.values())
  summary = result["summary"]
  assert set(summary) == {"ct", "mr"} and summary["ct"]["mean"]["dice"]["n"] == 1
  out = os.path.join(workdir, "eval", "test-step2")
  assert (result["dir"], result["step"], result["split"]) == (out, 2, "test")
  with open(os.path.join(out, "metrics.json")) as f:
    record = json.load(f)
  assert (record["step"], record["split"]) == (2, "test")
  assert record["metrics"]["mr"]["A"]["dice"]["n"] == 1
  for m, ids in tested.items():
    assert os.path.exists(os.path.join(out, "overlays", m, f"{ids[0]}.png"))
  printed = capsys.readouterr().out
  assert f"test split, checkpoint step 2, 2 volumes -> {out}" in printed
  assert "| Mean" in printed and "CT Dice (%)" in printed

  # Another step and another split each get their own folder; the first is left as it was.
  before = {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)}
  commands.evaluate(workdir, step="latest")
  commands.evaluate(workdir, split="val", step=4, overlays=False)
  assert sorted(os.listdir(os.path.join(workdir, "eval"))) == [
    "test-step2",
    "test-step4",
    "val-step4",
  ]
  assert {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)} == before
  assert _tested_ids(os.path.join(workdir, "eval", "val-step4")) == {
    (m, i) for m in ("ct", "mr") for i in splits[m]["val"]
  }


def test_evaluation_uses_the_split_its_checkpoint_trained_with(tmp_path):
  """splits.json gone and the dataset grown: a re-split would test on other cases (even on
  ones the network trained on); the checkpoint's own record keeps the test cases."""
  root = str(tmp_path / "data")
  _write_folder_dataset(root)
  config = _folder_config(root)
  parts = {"train": ["case0"], "val": ["case1"], "test": ["case2"]}
  record = {"splits": {"ct": parts, "mr": parts}, "classes": ["background", "A", "B"]}
  workdir = str(tmp_path / "run")
  _zero_checkpoint(workdir, config, dataset=record)
  for m in ("ct", "mr"):  # two more cases per modality, copies of case0
    folder = os.path.join(root, m)
    for k in (3, 4):
      for sub, suffix in (("imagesTr", "_0000"), ("labelsTr", "")):
        source = os.path.join(folder, sub, f"case0{suffix}.nii.gz")
        shutil.copy(source, os.path.join(folder, sub, f"case{k}{suffix}.nii.gz"))
  resplit = splits_lib.load_or_make_splits(
    str(tmp_path / "fresh"),
    adapters.get_adapter("folder", **config.data.options.to_dict()).cases(root),
    seed=config.seed,
  )
  assert any(resplit[m]["test"] != ["case2"] for m in ("ct", "mr"))  # what used to happen

  result = commands.evaluate(workdir)
  assert _tested_ids(result["dir"]) == {("ct", "case2"), ("mr", "case2")}
  assert not os.path.exists(os.path.join(workdir, "splits.json"))

  os.remove(os.path.join(root, "mr", "imagesTr", "case2_0000.nii.gz"))
  os.remove(os.path.join(root, "mr", "labelsTr", "case2.nii.gz"))
  with pytest.raises(DataError, match=r"checkpoints/2/dataset: mr test cases \['case2'\]"):
    commands.evaluate(workdir)


def test_dice_only_evaluation_draws_the_overlays_asked_for_per_modality():
  """Training's validation: Dice alone (no surface distances) and the first case's overlay of
  each modality."""
  res = evaluate.evaluate_cases(
    StubSegmenter(), StubAdapter(), CASES, overlays=1, metric_names=("dice",)
  )
  assert sorted(res["overlays"]) == ["ct/c1", "mr/m1"]
  assert {key for row in res["cases"] for key in row} == {"case", "modality", "class", "dice"}
  # ct: c1 perfect, c2 misses B -> B Dice 1 and 0; case means 1 and 0.5.
  assert res["summary"]["ct"]["B"] == {"dice": {"mean": 0.5, "std": 0.5, "n": 2, "n_empty": 0}}
  assert res["summary"]["ct"]["mean"]["dice"]["mean"] == 0.75
  none = evaluate.evaluate_cases(StubSegmenter(), StubAdapter(), CASES, overlays=0)
  assert none["overlays"] == {} and "hd95" in none["cases"][0]
