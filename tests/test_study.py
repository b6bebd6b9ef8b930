"""The study runner: the micro study end to end (train, report, resume) and its tables on
hand-made results."""

import csv
import glob
import importlib
import json
import math
import os
import re
import shutil

import numpy as np
import pytest
from helpers import run_module
from PIL import Image
from scipy import stats

from ukd import config as config_lib
from ukd import models
from ukd.errors import ConfigError
from ukd.evaluation import metrics
from ukd.study import report as study_report
from ukd.study import runner as study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = f"--config={os.path.join(ROOT, 'configs', 'study.py')}:micro"
STRUCTURES = ("MYO", "LAC", "LVC", "AA")
MODALITIES = ("ct", "mr")
SCHEMES = ("single", "ukd")


def run_study(*args, timeout=300, check=True):
  return run_module("ukd.study.runner", *args, timeout=timeout, check=check)


def micro_config():
  return importlib.import_module("configs.study").get_config("micro")


def load_result(study_dir, name):
  with open(os.path.join(study_dir, "runs", name, study.RESULT)) as f:
    return json.load(f)


def table(markdown: str, first_header: str) -> tuple[list[str], list[list[str]]]:
  """(header, rows) of the first markdown table whose first header cell is `first_header`."""
  lines = markdown.splitlines()
  cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]
  for i, line in enumerate(lines):
    if line.startswith("|") and cells(line)[0] == first_header:
      body = []
      for row in lines[i + 2 :]:
        if not row.startswith("|"):
          break
        body.append(cells(row))
      return cells(line), body
  raise AssertionError(f"no table starting with {first_header!r} in:\n{markdown}")


def mtime(path):
  return os.stat(path).st_mtime_ns


# ---- The micro study end to end ------------------------------------------------------------


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
  """One micro study: single and ukd, seed 0, 4 steps each, then the report."""
  study_dir = str(tmp_path_factory.mktemp("study"))
  out = run_study(MICRO, f"--workdir={study_dir}")
  return study_dir, out


@pytest.mark.slow
def test_micro_study_writes_csv_with_one_row_per_run_modality_structure(micro):
  study_dir, out = micro
  assert "[1/2] single-seed0" in out.stdout and "[2/2] ukd-seed0" in out.stdout
  with open(os.path.join(study_dir, "study.csv"), newline="") as f:
    lines = f.read().splitlines()
  assert lines[0] == "variant,seed,modality,structure,dice,assd,hd95"
  rows = list(csv.DictReader(lines))
  keys = [(r["variant"], r["seed"], r["modality"], r["structure"]) for r in rows]
  expected = {(v, "0", m, s) for v in SCHEMES for m in MODALITIES for s in STRUCTURES}
  assert len(keys) == 16 and set(keys) == expected
  for r in rows:
    result = load_result(study_dir, f"{r['variant']}-seed0")
    cases = [
      c for c in result["rows"] if c["modality"] == r["modality"] and c["class"] == r["structure"]
    ]
    assert cases
    dice = float(r["dice"])
    assert 0.0 <= dice <= 1.0
    # Each value is the mean over the run's test cases, written to 6 significant digits.
    assert dice == pytest.approx(np.mean([c["dice"] for c in cases]), rel=1e-5, abs=1e-9)
    for metric in ("assd", "hd95"):
      value = float(r[metric])
      per_case = [c[metric] for c in cases]
      if np.isfinite(per_case).any():
        assert math.isfinite(value) and value >= 0.0, r
        assert value == pytest.approx(np.nanmean(per_case), rel=1e-5), r
      else:  # undefined only when a prediction or reference is empty: Dice 0
        assert math.isnan(value) and dice == 0.0, r


@pytest.mark.slow
def test_micro_study_results_hold_every_test_row_and_parameter_counts(micro):
  study_dir, _ = micro
  counts = {}
  for name in SCHEMES:
    result = load_result(study_dir, f"{name}-seed0")
    config = micro_config()
    model = study.run_config(config, study.variant_overrides(config, name), 0, study_dir).model
    assert model.scheme == name
    counts[name] = models.count_params(model, tuple(config.base.modalities))
    assert (result["params"], result["kernels"]) == (
      counts[name]["params"],
      counts[name]["kernels"],
    )
    cases = {(r["case"], r["modality"]) for r in result["rows"]}
    assert {m for _, m in cases} == set(MODALITIES)
    assert len(result["rows"]) == len(cases) * len(STRUCTURES)
  # Two networks against one with shared kernels (and per-modality norms).
  ratio = counts["single"]["params"] / counts["ukd"]["params"]
  assert 1.9 < ratio <= 2.0, counts


@pytest.mark.slow
def test_micro_study_markdown_tables(micro):
  study_dir, _ = micro
  with open(os.path.join(study_dir, "study.md")) as f:
    md = f.read()
  header, body = table(md, "Variant")  # the first one: Dice
  assert header == [
    "Variant",
    "Seeds",
    *[f"{m.upper()} {s}" for m in MODALITIES for s in (*STRUCTURES, "mean")],
    "Parameters",
  ]
  assert [row[0] for row in body] == list(SCHEMES)
  config = micro_config()
  for row in body:
    name = row[0]
    result = load_result(study_dir, f"{name}-seed0")
    assert row[1] == "1"
    cells = dict(zip(header, row, strict=True))
    for m in MODALITIES:
      per_case = {}
      for s in STRUCTURES:
        values = [r["dice"] for r in result["rows"] if r["modality"] == m and r["class"] == s]
        # One seed: std 0.
        assert cells[f"{m.upper()} {s}"] == f"{np.mean(values) * 100:.1f} ± 0.0"
        for r in result["rows"]:
          if r["modality"] == m and r["class"] == s:
            per_case.setdefault(r["case"], []).append(r["dice"])
      mean = np.mean([np.mean(v) for v in per_case.values()])
      assert cells[f"{m.upper()} mean"] == f"{mean * 100:.1f} ± 0.0"
    model = study.run_config(config, study.variant_overrides(config, name), 0, study_dir).model
    params = models.count_params(model, tuple(config.base.modalities))["params"]
    assert cells["Parameters"] == f"{params:,}"
  assert "Test ASSD" in md
  assert "# Ablations" not in md  # micro trains the schemes only

  # Wilcoxon: ukd against single, per modality, over the test cases of seed 0.
  header, body = table(md, "Compared with")
  assert header[2:5] == ["Structure", "Pairs", "ukd - it (Dice points)"]
  rows = {(row[0], row[1]): row[:2] + row[3:] for row in body if row[2] == "mean"}
  assert set(rows) == {("single", "CT"), ("single", "MR")}
  assert len(body) == 2  # no partly labelled modality: the mean Dice only
  ukd_rows = load_result(study_dir, "ukd-seed0")["rows"]
  single_rows = load_result(study_dir, "single-seed0")["rows"]
  for m in MODALITIES:
    ref = study_report.case_means(ukd_rows, m, "dice")
    other = study_report.case_means(single_rows, m, "dice")
    diff = [ref[c] - other[c] for c in sorted(ref)]
    row = rows[("single", m.upper())]
    assert row[2] == str(len(diff))
    assert float(row[3]) == pytest.approx(np.mean(diff) * 100, abs=0.051)
    assert row[4] == f"{sum(d > 0 for d in diff)}/{len(diff)}"
    if any(d != 0 for d in diff):
      p = stats.wilcoxon([ref[c] for c in sorted(ref)], [other[c] for c in sorted(ref)]).pvalue
      assert row[5] == f"{p:.3g}"
    else:
      assert row[5] == "n/a"


@pytest.mark.slow
def test_micro_study_chart_is_a_png(micro):
  study_dir, _ = micro
  path = os.path.join(study_dir, "study.png")
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    assert image.format == "PNG"
    assert image.size[0] > 0 and image.size[1] > 0


# ---- Resume --------------------------------------------------------------------------------


def _run_state(study_dir, name):
  rundir = os.path.join(study_dir, "runs", name)
  checkpoints = os.path.join(rundir, "checkpoints")
  steps = sorted(os.listdir(checkpoints), key=int)
  commits = {s: mtime(os.path.join(checkpoints, s, "commit_success.txt")) for s in steps}
  return {"result": mtime(os.path.join(rundir, study.RESULT)), "checkpoints": commits}


def _train_losses(rundir):
  with open(os.path.join(rundir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f if "train/loss" in json.loads(line)]


def _age(path):
  """Sets a file's mtime to the epoch, so a rewrite shows however coarse the clock."""
  os.utime(path, (0, 0))


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_rewrites_the_report(micro):
  study_dir, _ = micro
  before = {name: _run_state(study_dir, f"{name}-seed0") for name in SCHEMES}
  reports = [os.path.join(study_dir, f) for f in ("study.md", "study.csv", "study.png")]
  with open(reports[1]) as f:
    csv_before = f.read()
  for path in reports:
    _age(path)
  out = run_study(MICRO, f"--workdir={study_dir}")
  assert "[1/2] single-seed0 (done)" in out.stdout
  assert "[2/2] ukd-seed0 (done)" in out.stdout
  assert "resumed from step" not in out.stdout
  assert not re.search(r"step \d+/\d+\s+loss", out.stdout), out.stdout
  assert {name: _run_state(study_dir, f"{name}-seed0") for name in SCHEMES} == before
  for path in reports:
    assert mtime(path) > 0, path
  with open(reports[1]) as f:
    assert f.read() == csv_before


@pytest.mark.slow
def test_interrupted_run_resumes_from_its_checkpoint(micro):
  """A run killed after its last checkpoint but before its result: --only=ukd redoes only it,
  from the checkpoint, and its test rows come out the same."""
  study_dir, _ = micro
  rundir = os.path.join(study_dir, "runs", "ukd-seed0")
  single = _run_state(study_dir, "single-seed0")
  ukd_before = _run_state(study_dir, "ukd-seed0")
  assert list(ukd_before["checkpoints"]) == ["4"]
  old_rows = load_result(study_dir, "ukd-seed0")["rows"]
  os.remove(os.path.join(rundir, study.RESULT))
  shutil.rmtree(os.path.join(rundir, "eval"))
  _age(os.path.join(study_dir, "study.md"))

  out = run_study(MICRO, f"--workdir={study_dir}", "--only=ukd")
  assert "[1/1] ukd-seed0" in out.stdout and "(done)" not in out.stdout
  assert "single-seed0" not in out.stdout
  assert f"resumed from step 4 in {rundir}" in out.stdout
  assert not re.search(r"step \d+/\d+\s+loss", out.stdout), out.stdout  # no step trained
  assert _run_state(study_dir, "single-seed0") == single
  after = _run_state(study_dir, "ukd-seed0")
  assert after["checkpoints"] == ukd_before["checkpoints"]  # step 4 kept, nothing re-saved
  assert _train_losses(rundir) == [1, 2, 3, 4]  # no step logged twice
  # The test split evaluated again (eval/cases.csv or eval/<split>-step<k>/cases.csv).
  assert glob.glob(os.path.join(rundir, "eval", "**", "cases.csv"), recursive=True)
  new_rows = load_result(study_dir, "ukd-seed0")["rows"]
  assert len(new_rows) == len(old_rows)
  for new, old in zip(new_rows, old_rows, strict=True):
    assert (new["case"], new["modality"], new["class"]) == (
      old["case"],
      old["modality"],
      old["class"],
    )
    for metric in metrics.METRICS:
      assert new[metric] == pytest.approx(old[metric], rel=1e-6, nan_ok=True)
  # The report covers every finished run, not only those of --only.
  assert mtime(os.path.join(study_dir, "study.md")) > 0
  with open(os.path.join(study_dir, "study.md")) as f:
    _, body = table(f.read(), "Variant")
  assert [row[0] for row in body] == list(SCHEMES)


# ---- Command line errors -------------------------------------------------------------------


@pytest.mark.parametrize(
  "args,expected",
  [
    (["--only=ukd,nope"], "['nope']"),
    (["--seeds=0,x"], "--seeds=0,x must be integers"),
  ],
)
def test_cli_user_errors_are_one_line(args, expected, tmp_path):
  out = run_study(MICRO, f"--workdir={tmp_path}", *args, timeout=120, check=False)
  assert out.returncode == 2
  assert "Traceback" not in out.stderr
  lines = [line for line in out.stderr.splitlines() if line.startswith("ukd: error:")]
  assert len(lines) == 1 and expected in lines[0], out.stderr[-2000:]
  assert not os.path.exists(os.path.join(tmp_path, "study.md"))


# ---- Tables and tests on hand-made results -------------------------------------------------


def _rows(modality, cases, metric="dice", other=None):
  """Rows of one modality: {case: {structure: value}}; the other metrics from `other` or 1."""
  out = []
  for case, values in cases.items():
    for structure, value in values.items():
      row = {"case": case, "modality": modality, "class": structure}
      row.update({"dice": 0.5, "assd": 1.0, "hd95": 2.0})
      row[metric] = value
      if other:
        for k, v in other.get(case, {}).get(structure, {}).items():
          row[k] = v
      out.append(row)
  return out


def _result(rows, params=100):
  return {"rows": rows, "params": params, "kernels": params - 10}


def test_metric_table_cells_are_mean_and_std_over_seeds():
  nan = float("nan")
  seed0 = _rows(
    "ct",
    {"c1": {"A": 0.8, "B": 0.6}, "c2": {"A": 0.6, "B": 0.4}},
    other={"c1": {"A": {"assd": 2.0}, "B": {"assd": nan}}, "c2": {"A": {"assd": 4.0}}},
  ) + _rows("mr", {"m1": {"A": 0.3, "B": 0.1}})
  seed1 = _rows("ct", {"c1": {"A": 0.9, "B": 0.7}, "c2": {"A": 0.7, "B": 0.5}}) + _rows(
    "mr", {"m1": {"A": 0.5, "B": 0.3}}
  )
  results = {
    "x": {0: _result(seed0, params=1234567), 1: _result(seed1)},
    "y": {0: _result(_rows("ct", {"c1": {"A": 1.0, "B": 1.0}}) + _rows("mr", {"m1": {}}))},
  }
  header, body = table(
    study_report.metric_table(results, ["x", "y", "z"], "dice", 100.0, 1, True), "Variant"
  )
  assert header == [
    "Variant",
    "Seeds",
    "CT A",
    "CT B",
    "CT mean",
    "MR A",
    "MR B",
    "MR mean",
    "Parameters",
  ]
  assert [row[0] for row in body] == ["x", "y"]  # z has no results: no row
  x = dict(zip(header, body[0], strict=True))
  # CT A: seed means over cases 0.7 and 0.8 -> 75.0 +- 5.0; CT B: 0.5 and 0.6.
  # CT mean: case means (0.7, 0.5) -> 0.6 and (0.8, 0.6) -> 0.7.
  # MR A: 0.3 and 0.5 -> 40.0 +- 10.0; MR mean: 0.2 and 0.4.
  assert (x["Seeds"], x["CT A"], x["CT B"], x["CT mean"]) == (
    "2",
    "75.0 ± 5.0",
    "55.0 ± 5.0",
    "65.0 ± 5.0",
  )
  assert (x["MR A"], x["MR B"], x["MR mean"]) == ("40.0 ± 10.0", "20.0 ± 10.0", "30.0 ± 10.0")
  assert x["Parameters"] == "1,234,567"  # the first seed's count
  y = dict(zip(header, body[1], strict=True))
  # y's one seed has no MR rows: no number, and the seed counted as missing.
  assert (y["Seeds"], y["CT A"], y["CT mean"], y["MR A"], y["MR mean"]) == (
    "1",
    "100.0 ± 0.0",
    "100.0 ± 0.0",
    "n/a (1 n/a)",
    "n/a (1 n/a)",
  )

  # ASSD: an undefined distance (NaN) leaves its case out of that seed's mean.
  header, body = table(study_report.metric_table(results, ["x"], "assd", 1.0, 2), "Variant")
  assert "Parameters" not in header
  x = dict(zip(header, body[0], strict=True))
  # CT A: seed 0 (2 + 4) / 2 = 3, seed 1 1 -> 2.00 +- 1.00.  CT B: seed 0 only c2 (1), seed 1 1.
  # CT mean: seed 0 case c1 is NaN, c2 (4 + 1) / 2 = 2.5; seed 1 1 -> 1.75 +- 0.75.
  assert (x["CT A"], x["CT B"], x["CT mean"]) == ("2.00 ± 1.00", "1.00 ± 0.00", "1.75 ± 0.75")

  # A seed whose every case has an undefined distance has no mean: the cell is the other
  # seeds' mean ± std, and says how many seeds it left out.
  results["w"] = {
    0: _result(_rows("ct", {"c1": {"A": nan}, "c2": {"A": nan}}, "assd")),
    1: _result(_rows("ct", {"c1": {"A": 3.0}, "c2": {"A": 1.0}}, "assd")),
    2: _result(_rows("ct", {"c1": {"A": 6.0}}, "assd")),
  }
  header, body = table(study_report.metric_table(results, ["w"], "assd", 1.0, 2), "Variant")
  w = dict(zip(header, body[0], strict=True))
  # Seed means 2 and 6 -> 4.00 +- 2.00; seed 0 left out.
  assert (w["Seeds"], w["CT A"], w["CT mean"]) == (
    "3",
    "4.00 ± 2.00 (1 n/a)",
    "4.00 ± 2.00 (1 n/a)",
  )


def test_paired_tests_match_scipy_wilcoxon_on_the_paired_case_means():
  ref = {
    0: _result(
      _rows("ct", {"a": {"A": 0.9, "B": 0.7}, "b": {"A": 0.6, "B": 0.6}, "only_ref": {"A": 0.1}})
      + _rows("mr", {"a": {"A": 0.5, "B": 0.5}})
    ),
    1: _result(
      _rows("ct", {"a": {"A": 0.8, "B": 0.8}, "b": {"A": 0.75, "B": 0.55}, "c": {"A": 0.4}})
      + _rows("mr", {"a": {"A": 0.4, "B": 0.4}})
    ),
    2: _result(_rows("ct", {"a": {"A": 0.0, "B": 0.0}})),  # no seed 2 in `other`: unpaired
  }
  other = {
    0: _result(
      _rows("ct", {"a": {"A": 0.7, "B": 0.5}, "b": {"A": 0.65, "B": 0.65}})
      + _rows("mr", {"a": {"A": 0.5, "B": 0.5}})
    ),
    1: _result(
      _rows("ct", {"a": {"A": 0.6, "B": 0.7}, "b": {"A": 0.62, "B": 0.62}, "c": {"A": 0.1}})
      + _rows("mr", {"a": {"A": 0.4, "B": 0.4}})
    ),
  }
  results = {"ref": ref, "other": other, "same": ref}
  tests = study_report.paired_tests(results, "ref", ["ref", "other", "same", "missing"])
  assert [(t["variant"], t["modality"]) for t in tests] == [
    ("other", "ct"),
    ("other", "mr"),
    ("same", "ct"),
    ("same", "mr"),
  ]
  ct = tests[0]
  # Pairs in (seed, case) order: seed 0 a, b; seed 1 a, b, c (only_ref and seed 2 unpaired).
  ref_means = [0.8, 0.6, 0.8, 0.65, 0.4]
  other_means = [0.6, 0.65, 0.65, 0.62, 0.1]
  # Differences 0.2, -0.05, 0.15, 0.03, 0.3: ranks of |d| 4, 2, 3, 1, 5; the one negative
  # difference has rank 2, so T = 2, and exactly: p = 2 * #{rank sums <= 2} / 2^5
  # = 2 * 3 / 32 (the empty set, {1}, {2}).
  assert ct["pairs"] == 5
  assert ct["wins"] == 4
  assert ct["mean_diff"] == pytest.approx(0.126)
  assert ct["p"] == pytest.approx(6 / 32, rel=1e-9)
  assert ct["p"] == pytest.approx(stats.wilcoxon(ref_means, other_means).pvalue, rel=1e-12)
  # Identical pairs: no test (p NaN), shown as n/a.
  for t in tests[1:]:
    assert t["mean_diff"] == 0.0 and t["wins"] == 0 and math.isnan(t["p"])
  assert [t["pairs"] for t in tests[1:]] == [2, 7, 2]
  _, body = table(study_report._tests_table(tests, "ref"), "Compared with")
  assert body[0] == ["other", "CT", "mean", "5", "+12.6", "4/5", "0.188"]
  assert body[1] == ["other", "MR", "mean", "2", "+0.0", "0/2", "n/a"]
  assert study_report.paired_tests(results, "absent", ["other"]) == []
  # A partly labelled modality is also tested structure by structure: CT's B pairs are
  # seed 0 a, b and seed 1 a, b (c has no B): 0.7-0.5, 0.6-0.65, 0.8-0.7, 0.55-0.62.
  tests = study_report.paired_tests(results, "ref", ["other"], by_structure=("ct",))
  assert [(t["modality"], t["structure"]) for t in tests] == [
    ("ct", "mean"),
    ("mr", "mean"),
    ("ct", "A"),
    ("ct", "B"),
  ]
  b = tests[3]
  assert (b["pairs"], b["wins"]) == (4, 2)
  assert b["mean_diff"] == pytest.approx((0.2 - 0.05 + 0.1 - 0.07) / 4)
  assert b["p"] == pytest.approx(stats.wilcoxon([0.2, -0.05, 0.1, -0.07]).pvalue, rel=1e-12)


def test_planned_runs_order_and_unknown_only():
  config = micro_config()
  assert study.planned_runs(config) == [("schemes", "single", 0), ("schemes", "ukd", 0)]
  assert study.planned_runs(config, only=["ukd"], seeds=[2, 1]) == [
    ("schemes", "ukd", 2),
    ("schemes", "ukd", 1),
  ]
  config.train = "all"
  # The ablation table's reference row (ukd) is not trained twice.
  assert study.planned_runs(config, seeds=[0, 1]) == [
    ("schemes", "single", 0),
    ("schemes", "single", 1),
    ("schemes", "ukd", 0),
    ("schemes", "ukd", 1),
    ("ablations", "kd_weight_0", 0),
    ("ablations", "kd_weight_0", 1),
  ]
  config.train = "ablations"
  assert study.planned_runs(config) == [("ablations", "ukd", 0), ("ablations", "kd_weight_0", 0)]
  with pytest.raises(ConfigError, match=r"--only names unknown variants \['nope'\]"):
    study.planned_runs(config, only=["ukd", "nope"])
  config.train = "everything"
  with pytest.raises(ConfigError, match="config.train='everything'"):
    study.planned_runs(config)


def test_run_config_applies_nested_overrides(tmp_path):
  config = micro_config()
  base_kd = config.base.loss.kd
  assert base_kd != 0.0
  run = study.run_config(config, study.variant_overrides(config, "kd_weight_0"), 3, str(tmp_path))
  assert run.loss.kd == 0.0
  assert run.loss.temperature == config.base.loss.temperature  # siblings kept
  assert run.model.scheme == config.base.model.scheme
  assert run.seed == 3
  assert run.data.root == os.path.join(str(tmp_path), "phantoms")
  assert run.data.cache_dir == os.path.join(str(tmp_path), "cache")
  assert config.base.loss.kd == base_kd  # the base is not changed
  run = study.run_config(config, {"model": {"scheme": "single"}, "total_steps": 7}, 0, "d")
  assert (run.model.scheme, run.total_steps) == ("single", 7)


@pytest.mark.parametrize(
  "overrides,name",
  [
    ({"loss": {"nope": 1.0}}, "config.loss.nope"),
    ({"nope": 1}, "config.nope"),
    ({"data": {"synthetic": {"nope": 1}}}, "config.data.synthetic.nope"),
  ],
)
def test_run_config_rejects_unknown_fields(overrides, name):
  with pytest.raises(ConfigError, match=re.escape(name) + "(?![.a-z])"):
    study.run_config(micro_config(), overrides, 0, "d")


def test_run_config_rejects_a_mistyped_override():
  with pytest.raises(ConfigError, match="config.loss.kd"):
    study.run_config(micro_config(), {"loss": {"kd": "high"}}, 0, "d")


def test_only_naming_a_variant_the_config_does_not_train_is_an_error():
  with pytest.raises(ConfigError, match=r"--only names \['kd_weight_0'\]"):
    study.planned_runs(micro_config(), only=["kd_weight_0"])


# ---- Arms -----------------------------------------------------------------------------------


def _arms_config():
  config = micro_config()
  config.arms = {
    "plain": {"doc": "All cases.", "base": {}, "variants": ("single", "ukd")},
    "mr_scarce": {
      "doc": "A quarter of the MR cases.",
      "base": {"data": {"train_fraction": "ct=1,mr=0.25"}, "total_steps": 9},
      "variants": ("ukd",),
    },
  }
  return config


def test_an_arm_is_the_base_with_its_overrides_and_its_variants():
  config = _arms_config()
  arm = study.arm_study(config, "mr_scarce")
  assert arm.base.data.train_fraction == "ct=1,mr=0.25" and arm.base.total_steps == 9
  assert arm.base.model.width == config.base.model.width  # the rest of the base is kept
  assert list(arm.schemes) == ["ukd"] and not arm.ablations and not arm.arms
  assert config.base.data.train_fraction == "1"  # the study itself is not changed
  config.arms.plain.variants = ("ukd", "nope")
  with pytest.raises(ConfigError, match=r"config.arms.plain.variants names \['nope'\]"):
    study.arm_study(config, "plain")
  config.arms.plain.variants = ("ukd",)
  config.arms.plain.base = {"data": {"nope": 1}}
  with pytest.raises(ConfigError, match=r"arms.plain.base.data.nope"):
    study.arm_study(config, "plain")


def test_the_default_study_has_the_arms_of_the_comparison():
  config = importlib.import_module("configs.study").get_config()
  assert set(config.arms) == {
    "balanced_simple",
    "balanced_scanner",
    "mr_scarce",
    "ct_scarce",
    "mr_partial",
    "mr_scarce_long",
    "three_modalities",
  }
  for name in ("balanced_simple", "balanced_scanner"):
    assert set(config.arms[name].variants) == set(models.SCHEMES)
  for name in ("mr_scarce", "ct_scarce"):  # and KD with the reference's absent-class rule
    assert set(config.arms[name].variants) == {*models.SCHEMES, "ukd_kd_uniform"}
  partial = study.arm_study(config, "mr_partial").base
  assert set(config.arms.mr_partial.variants) == {*models.SCHEMES, "ukd_kd_mask"}
  assert partial.data.labelled == "mr=MYO+LVC" and partial.loss.kd_absent == "uniform"
  assert (partial.model.pad, partial.model.head_bias) == ("reference", False)
  long = study.arm_study(config, "mr_scarce_long").base
  assert long.total_steps == 5 * config.base.total_steps
  assert set(config.arms.mr_scarce_long.variants) == {"ukd", "separate_norm", "ukd_kd_mask"}
  mr = study.arm_study(config, "mr_scarce").base.data
  ct = study.arm_study(config, "ct_scarce").base.data
  assert (mr.train_fraction, ct.train_fraction) == ("ct=1,mr=0.25", "ct=0.25,mr=1")
  assert mr.synthetic.realism == ct.synthetic.realism == "scanner"
  assert study.arm_study(config, "balanced_simple").base.data.synthetic.realism == "simple"


def test_the_three_modality_arm_is_a_checked_config_of_ct_and_two_mr_contrasts(tmp_path):
  config = importlib.import_module("configs.study").get_config()
  arm = study.arm_study(config, "three_modalities")
  run = config_lib.check(study.run_config(arm, {"model": {"scheme": "ukd"}}, 0, str(tmp_path)))
  assert run.modalities == ("ct", "mr", "t2")
  assert run.data.dataset == "folder" and run.data.synthetic.realism == "scanner"
  assert dict(run.data.options.modalities) == {"ct": "ct", "mr": "mr", "t2": "t2"}
  assert dict(run.data.synthetic.contrasts) == {"t2": "mr_t2"}
  assert run.data.norm.t2.kind == "zscore" and run.data.norm.ct.kind == "window"
  # Keys are added only to the mappings a user fills; a mistyped field is still refused.
  with pytest.raises(ConfigError, match="sets config.data.optoins, which does not exist"):
    study.run_config(arm, {"data": {"optoins": {"x": 1}}}, 0, str(tmp_path))


def _write_result(study_dir, arm, name, seed, result):
  path = os.path.join(study_dir, arm, "runs", study.run_name(name, seed), study.RESULT)
  os.makedirs(os.path.dirname(path))
  with open(path, "w") as f:
    json.dump(result, f)


def test_the_arms_report_holds_every_arm_and_the_lead_over_the_best_other(tmp_path):
  config = _arms_config()
  config.arms.mr_scarce.variants = ("single", "ukd")
  dice = {  # (arm, variant, seed) -> (CT, MR) Dice of the one test case
    ("plain", "ukd", 0): (0.80, 0.70),
    ("plain", "ukd", 1): (0.84, 0.74),
    ("plain", "single", 0): (0.70, 0.73),
    ("plain", "single", 1): (0.72, 0.75),
    ("mr_scarce", "ukd", 0): (0.60, 0.50),
    ("mr_scarce", "single", 0): (0.55, 0.58),
  }
  for (arm, name, seed), (ct, mr) in dice.items():
    rows = _rows("ct", {"c": {"A": ct}}) + _rows("mr", {"m": {"A": mr}})
    _write_result(str(tmp_path), arm, name, seed, _result(rows))
  out = study.run_study(config, str(tmp_path), only=["nothing_here"])
  assert set(out["arms"]) == {"plain", "mr_scarce"}
  md = open(os.path.join(tmp_path, "study.md")).read()
  assert "## plain" in md and "## mr_scarce" in md and "A quarter of the MR cases." in md
  header, body = table(md, "Arm")
  rows = {(r[0], r[1]): dict(zip(header, r, strict=True)) for r in body}
  # plain CT: ukd 82.0 (std 2.0), single 71.0 (std 1.0): +11.0, beyond the spread 2.0.
  ct = rows[("plain", "CT")]
  assert (ct["ukd"], ct["Best other"], ct["Difference"]) == ("82.0", "single 71.0", "+11.0")
  assert (ct["Seed spread"], ct["Beyond spread"]) == ("2.0", "yes")
  # plain MR: ukd 72.0, single 74.0: -2.0 against a spread of 2.0 (std of 0.70, 0.74): not beyond.
  mr = rows[("plain", "MR")]
  assert (mr["Difference"], mr["Seed spread"], mr["Beyond spread"]) == ("-2.0", "2.0", "no")
  # mr_scarce has one seed: no spread, so no verdict.
  one = rows[("mr_scarce", "MR")]
  assert (one["Difference"], one["Seed spread"], one["Beyond spread"]) == (
    "-8.0",
    "n/a (1 seed)",
    "n/a",
  )
  with open(os.path.join(tmp_path, "study.csv")) as f:
    csv_rows = list(csv.DictReader(f))
  assert len(csv_rows) == 2 * len(dice)  # one per run and modality (one structure)
  assert {r["arm"] for r in csv_rows} == {"plain", "mr_scarce"}
  assert Image.open(os.path.join(tmp_path, "study.png")).size[1] > 600  # a panel per arm
  with pytest.raises(ConfigError, match=r"--arms names unknown arms \['nope'\]"):
    study.run_study(config, str(tmp_path), arms=["nope"])


@pytest.mark.slow
def test_the_three_modality_arm_trains_and_reports_ct_and_both_mr_contrasts(tmp_path):
  """The arm as configured (folders of CT, b-SSFP and T2 phantoms, KD over three pairs), at
  a few steps on small phantoms: every modality is tested and reported."""
  config = importlib.import_module("configs.study").get_config()
  config.arms = {"three_modalities": config.arms.three_modalities.to_dict()}
  config.base.data.synthetic.update(n_ct=5, n_mr=5, shape=(32, 32, 16))
  config.base.data.workers = 0
  config.base.update(total_steps=4, eval_every=4, checkpoint_every=4, log_every=2)
  config.seeds = (0,)
  study.run_study(config, str(tmp_path), only=["ukd"])
  with open(tmp_path / "three_modalities" / "study.csv") as f:
    rows = list(csv.DictReader(f))
  assert {r["modality"] for r in rows} == {"ct", "mr", "t2"}
  assert {r["structure"] for r in rows} == {"MYO", "LAC", "LVC", "AA"}
  header, body = table((tmp_path / "three_modalities" / "study.md").read_text(), "Variant")
  assert any("T2" in cell for cell in header) and body[0][0] == "ukd"
  marker = json.loads(
    (tmp_path / "three_modalities" / "phantoms" / ".ukd_synthetic.json").read_text()
  )
  assert marker["contrasts"] == {"t2": "mr_t2"} and marker["layout"] == "folder"
