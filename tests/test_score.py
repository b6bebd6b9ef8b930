"""Scoring folders of predictions against references (`ukd.evaluation.score`, `--mode=score`)."""

import csv
import json
import os

import jax
import nibabel as nib
import numpy as np
import pytest
from helpers import run_module, tiny_config

from ukd import models
from ukd.data.adapters import get_adapter
from ukd.data.synthetic import generate as synthetic
from ukd.errors import ConfigError, DataError
from ukd.evaluation import evaluate, score
from ukd.runtime import checkpoints
from ukd.serve import predict
from ukd.serve import segmenter as infer


def _save(array, path, affine=None, dtype=np.uint8):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  affine = np.eye(4) if affine is None else affine
  nib.save(nib.Nifti1Image(np.asarray(array, dtype), affine), path)
  return path


def _line(*values):
  """A 1-voxel-thick row of voxels along x, [len, 1, 1]: every voxel is surface."""
  return np.array(values).reshape(-1, 1, 1)


def test_dice_assd_hd95_are_the_hand_computed_ones(tmp_path, capsys):
  """3 mm voxels along x. A: truth x=1..3, predicted x=0..2: Dice 2*2/6; the surfaces are
  all voxels, so the distances are 3 mm (x=0 and x=3) and four zeros: ASSD 6/6 = 1 mm, HD95
  3 mm. B: truth x=5, not predicted: Dice 0, no distance (NaN), so the case mean is NaN."""
  affine = np.diag([3.0, 1.0, 1.0, 1.0])
  refs, preds = tmp_path / "Dataset001", tmp_path / "preds"
  _save(_line(0, 1, 1, 1, 0, 2), f"{refs}/labelsTr/c1.nii.gz", affine)
  (refs / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "A": 1, "B": 2}}))
  _save(_line(1, 1, 1, 0, 0, 0), f"{preds}/c1.nii.gz", affine)
  (preds / "c1.json").write_text("{}")  # predict's sidecar and probabilities: not scored
  (preds / "c1_probabilities.nii.gz").write_bytes(b"not read")

  out = tmp_path / "scores"
  result = score.score(
    preds, refs, out, dataset="folder", modality="mr", classes=refs / "dataset.json"
  )

  a, b = result["cases"]
  assert (a["case"], a["modality"], a["class"]) == ("c1", "mr", "A")
  assert (a["dice"], a["assd"], a["hd95"]) == pytest.approx((2 / 3, 1.0, 3.0))
  assert b["dice"] == 0.0 and np.isnan(b["assd"]) and np.isnan(b["hd95"])
  with open(out / "metrics.json") as f:
    record = json.load(f)
  assert (record["step"], record["split"]) == (None, None)
  assert record["metrics"]["mr"]["A"]["assd"] == {"mean": 1.0, "std": 0.0, "n": 1, "n_empty": 0}
  assert record["metrics"]["mr"]["mean"]["dice"]["mean"] == pytest.approx(1 / 3)
  assert record["metrics"]["mr"]["mean"]["assd"] == {
    "mean": None,
    "std": None,
    "n": 0,
    "n_empty": 1,
  }
  with open(out / "cases.csv", newline="") as f:
    assert [(r["class"], float(r["hd95"])) for r in csv.DictReader(f)][0] == ("A", 3.0)
  printed = capsys.readouterr().out
  assert "| A " in printed and "66.7 ± 0.0" in printed and "1.00 ± 0.00" in printed


def test_mmwhs_codes_score_as_their_classes(tmp_path):
  """205 MYO, 420 LAC, 500 LVC, 820 AA; 550 (RV) is background. Only AA moved, by 2 mm."""
  refs, preds = tmp_path / "mr_train", tmp_path / "preds"
  _save(_line(205, 420, 500, 820, 550, 0), f"{refs}/mr_train_1001_label.nii.gz", dtype=np.uint16)
  _save(_line(9, 9, 9, 9, 9, 9), f"{refs}/mr_train_1001_image.nii.gz", dtype=np.float32)
  _save(_line(205, 420, 500, 0, 550, 820), f"{preds}/mr_train_1001.nii.gz", dtype=np.uint16)

  rows = score.score(preds, refs, tmp_path / "out", dataset="mmwhs", modality="mr")["cases"]

  assert {r["class"]: (r["dice"], r["assd"], r["hd95"]) for r in rows} == {
    "MYO": (1.0, 0.0, 0.0),
    "LAC": (1.0, 0.0, 0.0),
    "LVC": (1.0, 0.0, 0.0),
    "AA": (0.0, 2.0, 2.0),
  }
  _save(_line(205, 421, 500, 0, 0, 820), f"{preds}/mr_train_1001.nii.gz", dtype=np.uint16)
  with pytest.raises(DataError, match=r"mr_train_1001.nii.gz: label codes \[421\] are not codes"):
    score.score(preds, refs, tmp_path / "out", dataset="mmwhs", modality="mr")


def test_unpaired_files_are_reported(tmp_path):
  refs, preds = tmp_path / "refs", tmp_path / "preds"
  for name in ("a", "b_label"):
    _save(_line(0, 1), f"{refs}/{name}.nii.gz")
  _save(_line(0, 1), f"{preds}/a.nii.gz")
  with pytest.raises(DataError, match=r"refs: 1 reference\(s\) without a prediction in .*: b;"):
    score.pair_files(preds, refs)
  assert score.pair_files(preds, refs, allow_missing=True) == [
    score.Pair("a", f"{preds}/a.nii.gz", f"{refs}/a.nii.gz")
  ]
  _save(_line(0, 1), f"{preds}/c.nii.gz")
  with pytest.raises(DataError, match=r"preds: 1 prediction\(s\) without a reference in .*: c$"):
    score.pair_files(preds, refs, allow_missing=True)


def test_a_prediction_on_another_grid_is_a_one_line_error(tmp_path):
  refs, preds = tmp_path / "refs", tmp_path / "preds"
  truth = np.zeros((4, 3, 2), np.uint8)
  truth[0:3, 1, :] = 1  # not symmetric along x: a flip would show
  affine = np.array([[0, 0, 2.0, 5], [1.5, 0, 0, 0], [0, 1.0, 0, -3], [0, 0, 0, 1]])
  _save(truth, f"{refs}/c.nii.gz", affine)
  # The same grid stored with the first axis reversed is the same grid.
  flip = np.eye(4)
  flip[0, 0], flip[0, 3] = -1, truth.shape[0] - 1
  _save(truth[::-1], f"{preds}/c.nii.gz", affine @ flip)
  (row,) = score.score(
    preds, refs, tmp_path / "out", dataset="folder", modality="ct", classes=_classes(tmp_path)
  )["cases"]
  assert row["dice"] == 1.0

  moved = affine.copy()
  moved[0, 3] += 1.0
  _save(truth, f"{preds}/c.nii.gz", moved)
  with pytest.raises(DataError, match=r"c.nii.gz: affine .* differs from .* of the reference"):
    score.score(
      preds, refs, tmp_path / "out", dataset="folder", modality="ct", classes=_classes(tmp_path)
    )
  _save(truth[:3], f"{preds}/c.nii.gz", affine)
  out = run_module(
    "ukd.main",
    "--mode=score",
    f"--predictions={preds}",
    f"--references={refs}",
    f"--output={tmp_path / 'out'}",
    "--dataset=folder",
    "--modality=ct",
    f"--classes={_classes(tmp_path)}",
    check=False,
  )
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
    f"ukd: error: {preds}/c.nii.gz: shape (3, 3, 2) differs from (4, 3, 2) of the reference "
    f"{refs}/c.nii.gz (predictions are not resampled)"
  ]


def _classes(folder):
  path = folder / "dataset.json"
  path.write_text(json.dumps({"labels": {"background": 0, "A": 1}}))
  return path


def _random_variables(config):
  """LeCun-normal kernels drawn with numpy on the network's shapes: a network that predicts
  every class somewhere, without compiling its initialisation."""
  model = models.build(config.model, config.modalities)
  shapes = jax.eval_shape(
    lambda: models.init_variables(
      model, config.model, models.input_spatial(config), jax.random.key(0)
    )
  )
  rng = np.random.default_rng(1)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return rng.normal(0, 1 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape).astype(leaf.dtype)
    return (np.ones if name in ("scale", "var") else np.zeros)(leaf.shape, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def test_scoring_predicted_files_gives_the_evaluation_numbers(tmp_path, monkeypatch):
  """A random network's test-split predictions, written by predict in MM-WHS codes and scored
  against the dataset's label files, score as evaluation scores the checkpoint."""
  root, workdir = tmp_path / "mmwhs", str(tmp_path / "run")
  synthetic.write_mmwhs(root, n_ct=1, n_mr=2, shape=(16, 16, 8))
  config = tiny_config(modalities=("mr",), num_classes=5)  # one modality: one compilation
  config.data.dataset, config.data.root = "mmwhs", str(root)
  config.data.size, config.infer.batch_size = (16, 16), 8
  adapter = get_adapter("mmwhs")
  record = {
    "splits": {"mr": {"train": ["mr_train_1001"], "test": ["mr_train_1002"]}},
    "classes": list(adapter.classes),
    "label_codes": {"mr": list(adapter.label_codes("mr"))},
  }
  mgr = checkpoints.manager(workdir)
  checkpoints.save(mgr, 1, _random_variables(config), config, dataset=record)
  mgr.wait_until_finished()
  mgr.close()
  seg = infer.load(workdir)
  monkeypatch.setattr(infer, "load", lambda *args, **kwargs: seg)  # compiled once for both

  evaluated = evaluate.evaluate(workdir, overlays=False)
  predict.predict_paths(seg, root / "mr_train" / "mr_train_1002_image.nii.gz", tmp_path / "p", "mr")
  # The references folder holds every case and its image: the test case's label is found.
  scored = score.score(
    tmp_path / "p",
    root / "mr_train",
    tmp_path / "s",
    dataset="mmwhs",
    allow_missing=True,
    modality="mr",
  )
  np.testing.assert_equal(scored["cases"], evaluated["cases"])
  np.testing.assert_equal(scored["summary"], evaluated["summary"])
  dice = [r["dice"] for r in scored["cases"]]
  assert len(dice) == 4 and 0 < max(dice) and min(dice) < 1  # neither empty nor perfect


def test_a_dicom_seg_is_scored_on_the_grid_of_its_source_series(tmp_path):
  pytest.importorskip("highdicom")
  from ukd.data.io import dicom_seg, dicom_series
  from ukd.data.synthetic import dicom_write

  affine = np.diag([0.8, 0.7, 2.5, 1.0])
  image = np.arange(6 * 5 * 3, dtype=np.float32).reshape(6, 5, 3)
  dicom_write.write_series(image, tmp_path / "dicom" / "ct", affine=affine)
  (series,) = dicom_series.find_series(tmp_path / "dicom")
  source = dicom_series.read_series(series)
  predicted = np.zeros((6, 5, 3), np.int32)
  predicted[1:4, 1:3, :] = 1  # MYO
  predicted[4, 3, 1] = 4  # AA
  dicom_seg.write_seg(predicted, source, tmp_path / "preds" / "c.dcm", get_adapter("mmwhs").classes)
  truth = predicted.copy()
  truth[1, 1, :] = 0  # three MYO voxels missed: Dice 2*15/(18+15)
  _save(np.array([0, 205, 420, 500, 820])[truth], f"{tmp_path}/refs/c.nii.gz", affine, np.uint16)

  rows = score.score(
    tmp_path / "preds",
    tmp_path / "refs",
    tmp_path / "out",
    dataset="mmwhs",
    modality="ct",
    dicom_reference=tmp_path / "dicom",
  )["cases"]
  assert [(r["class"], r["dice"]) for r in rows] == [
    ("MYO", pytest.approx(30 / 33)),
    ("LAC", 1.0),
    ("LVC", 1.0),
    ("AA", 1.0),
  ]
  with pytest.raises(ConfigError, match=r"c.dcm: a DICOM-SEG needs --dicom_reference"):
    score.score(tmp_path / "preds", tmp_path / "refs", tmp_path / "out", dataset="btcv")
  # Predicted as NIfTI too (--output_format=nifti,dicom_seg): the NIfTI is the one scored.
  _save(np.array([0, 205, 420, 500, 820])[truth], f"{tmp_path}/preds/c.nii.gz", affine, np.uint16)
  rows = score.score(
    tmp_path / "preds", tmp_path / "refs", tmp_path / "out", dataset="mmwhs", modality="ct"
  )["cases"]
  assert [r["dice"] for r in rows] == [1.0] * 4
