"""Cross-validation folds of ukd.data.splits, their config fields and launch/folds.sh."""

import os
import subprocess

import pytest
from helpers import ROOT

from ukd import config as config_lib
from ukd.data.adapters import Case
from ukd.data.splits import load_or_make_splits, patient_of
from ukd.errors import ConfigError, DataError

K = 4
PATIENTS = r"(p\d+)_.+"


def _cases(ct=17, mr=9):
  return [Case(f"ct{i:02d}", "ct", "", "") for i in range(ct)] + [
    Case(f"mr{i}", "mr", "", "") for i in range(mr)
  ]


def _patient_cases():
  """CT of 14 patients with one to three visits each: 27 case ids."""
  return [Case(f"p{p:02d}_v{v}", "ct", "", "") for p in range(14) for v in range(1 + p % 3)]


def _folds(tmp_path, cases, k=K, **options):
  return [
    load_or_make_splits(tmp_path / f"fold_{f}", cases, seed=3, folds=k, fold=f, **options)
    for f in range(k)
  ]


def test_one_fold_is_the_split_as_it_always_was(tmp_path):
  # Pinned: the split before folds existed, for the same cases and seed.
  expected = {
    "ct": {
      "train": ["ct00", "ct02", "ct03", "ct04", "ct05", "ct08"],
      "val": ["ct06", "ct07"],
      "test": ["ct01", "ct09"],
    },
    "mr": {"train": ["mr2"], "val": ["mr0"], "test": ["mr1"]},
  }
  assert load_or_make_splits(tmp_path / "a", _cases(10, 3), seed=0) == expected
  assert load_or_make_splits(tmp_path / "b", _cases(10, 3), seed=0, folds=1) == expected


def test_folds_share_the_test_split_and_validate_on_disjoint_parts_of_the_rest(tmp_path):
  single = load_or_make_splits(tmp_path / "single", _cases(), seed=3)
  folds = _folds(tmp_path, _cases())
  for modality, count in (("ct", 17), ("mr", 9)):
    test = single[modality]["test"]
    rest = sorted(single[modality]["train"] + single[modality]["val"])
    vals = [f[modality]["val"] for f in folds]
    assert all(f[modality]["test"] == test for f in folds)
    assert sorted(i for v in vals for i in v) == rest  # disjoint, and every non-test case
    assert max(map(len, vals)) - min(map(len, vals)) <= 1  # balanced
    for f in folds:
      assert sorted(f[modality]["train"] + f[modality]["val"]) == rest
    assert len(rest) + len(test) == count


def test_a_patients_cases_never_straddle_folds_or_splits(tmp_path):
  cases = _patient_cases()
  assert patient_of("p03_v1", PATIENTS) == "p03" and patient_of("p03_v1") == "p03_v1"
  single = load_or_make_splits(tmp_path / "single", cases, seed=3, patient_pattern=PATIENTS)
  folds = _folds(tmp_path, cases, patient_pattern=PATIENTS)
  for split in [single, *folds]:
    where = {}
    for part, ids in split["ct"].items():
      for i in ids:
        assert where.setdefault(patient_of(i, PATIENTS), part) == part, i
  vals = [set(f["ct"]["val"]) for f in folds]
  assert sum(map(len, vals)) == len(set().union(*vals)) == 27 - len(single["ct"]["test"])
  assert all(f["ct"]["test"] == single["ct"]["test"] for f in folds)
  with pytest.raises(DataError, match="case id 'x1' does not match"):
    load_or_make_splits(
      tmp_path / "x", [Case("x1", "ct", "", "")], seed=0, patient_pattern=PATIENTS
    )


def test_a_work_dir_keeps_its_fold(tmp_path):
  first = load_or_make_splits(tmp_path, _cases(), seed=3, folds=K, fold=1)
  assert load_or_make_splits(tmp_path, _cases(), seed=3, folds=K, fold=1) == first
  with pytest.raises(DataError, match=r"splits.json: is not fold 2 of data.folds=4"):
    load_or_make_splits(tmp_path, _cases(), seed=3, folds=K, fold=2)


def test_more_folds_than_patients_is_a_config_error(tmp_path):
  with pytest.raises(ConfigError, match=r"config.data.folds=4: mr has only 3 patients"):
    load_or_make_splits(tmp_path, _cases(mr=4), seed=0, folds=K, fold=0)


@pytest.mark.parametrize(
  "fields,message",
  [
    ({"folds": 0}, r"config.data.folds=0 must be a whole number >= 1"),
    ({"folds": 3, "fold": 3}, r"config.data.fold=3 must be a whole number in 0..2"),
    ({"fold": -1}, r"config.data.fold=-1"),
    ({"folds": 2, "split_file": "s.json"}, r"leave data.split_file empty"),
    (
      {"patient_pattern": "p.*"},
      r"config.data.patient_pattern='p.\*' must be a regex with a group",
    ),
    ({"patient_pattern": "(p"}, r"config.data.patient_pattern='\(p'"),
  ],
)
def test_config_check_refuses_bad_folds(fields, message):
  config = config_lib.default()
  config.data.update(fields)
  with pytest.raises(ConfigError, match=message):
    config_lib.check(config)


def test_config_check_accepts_folds():
  config = config_lib.default()
  config.data.update(folds=5, fold=4, patient_pattern=PATIENTS)
  assert config_lib.check(config).data.fold == 4


def test_folds_script_shows_its_usage():
  script = os.path.join(ROOT, "launch", "folds.sh")
  out = subprocess.run(["bash", script], capture_output=True, text=True, timeout=30)
  assert out.returncode != 0 and "usage: launch/folds.sh K CONFIG WORKDIR" in out.stderr
