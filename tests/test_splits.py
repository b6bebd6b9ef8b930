"""Train / val / test splits of ukd.data.splits."""

import json

import pytest

from ukd import config as config_lib
from ukd.data.adapters import Case
from ukd.data.splits import adapter_for, cases_by_split, cases_for, load_or_make_splits
from ukd.errors import ConfigError, DataError


def _cases(ct=10, mr=3):
  return [Case(f"ct{i:02d}", "ct", "", "") for i in range(ct)] + [
    Case(f"mr{i}", "mr", "", "") for i in range(mr)
  ]


def test_splits_are_disjoint_complete_and_sized(tmp_path):
  splits = load_or_make_splits(tmp_path, _cases(), seed=0)
  assert [len(splits["ct"][s]) for s in ("train", "val", "test")] == [6, 2, 2]
  assert [len(splits["mr"][s]) for s in ("train", "val", "test")] == [1, 1, 1]
  for modality, count in (("ct", 10), ("mr", 3)):
    ids = [i for s in ("train", "val", "test") for i in splits[modality][s]]
    assert len(ids) == len(set(ids)) == count
  with open(tmp_path / "splits.json") as f:
    assert json.load(f) == splits


def test_splits_are_deterministic_and_seed_dependent(tmp_path):
  first = load_or_make_splits(tmp_path / "a", _cases(ct=20), seed=3)
  again = load_or_make_splits(tmp_path / "b", list(reversed(_cases(ct=20))), seed=3)
  other = load_or_make_splits(tmp_path / "c", _cases(ct=20), seed=4)
  assert first == again
  assert first["ct"] != other["ct"]


def test_saved_split_is_reused_and_checked(tmp_path):
  first = load_or_make_splits(tmp_path, _cases(), seed=0)
  assert load_or_make_splits(tmp_path, _cases(), seed=99) == first
  with pytest.raises(DataError, match=r"splits.json: ct case ids not in the dataset: \['ct09'\]"):
    load_or_make_splits(tmp_path, _cases(ct=9), seed=0)


def test_user_split_file_is_validated_and_used(tmp_path):
  user = {
    "ct": {"train": ["ct00", "ct01"], "val": ["ct02"], "test": ["ct03"]},
    "mr": {"train": ["mr0"], "val": ["mr1"], "test": ["mr2"]},
  }
  path = tmp_path / "mine.json"
  path.write_text(json.dumps(user))
  splits = load_or_make_splits(tmp_path / "w", _cases(ct=4), seed=0, split_file=path)
  assert splits == user
  assert json.loads((tmp_path / "w" / "splits.json").read_text()) == user

  user["ct"]["test"].append("ct01")
  path.write_text(json.dumps(user))
  with pytest.raises(DataError, match="mine.json: ct has case ids in more than one split"):
    load_or_make_splits(tmp_path / "x", _cases(ct=4), seed=0, split_file=path)


def test_split_fractions_must_sum_to_one(tmp_path):
  with pytest.raises(DataError, match="fractions"):
    load_or_make_splits(tmp_path, _cases(), seed=0, fractions=(0.5, 0.2, 0.2))


class _Listing:
  """An adapter that only lists the given cases."""

  def __init__(self, cases):
    self.listed = cases

  def cases(self, root):
    return list(self.listed)


def test_cases_by_split_hands_out_the_cases_of_the_split(tmp_path):
  listed = _cases(ct=10, mr=3)
  by_split = cases_by_split(_Listing(listed), "root", ("ct",), tmp_path, seed=0)
  saved = json.loads((tmp_path / "splits.json").read_text())
  assert set(by_split) == set(saved) == {"ct"}
  for split in ("train", "val", "test"):
    assert [c.id for c in by_split["ct"][split]] == saved["ct"][split]
    assert all(c in listed and c.modality == "ct" for c in by_split["ct"][split])
  again = cases_by_split(_Listing(list(reversed(listed))), "root", ("ct",), tmp_path, seed=5)
  assert again == by_split


def test_cases_by_split_refuses_a_modality_without_cases(tmp_path):
  message = r"config.modalities lists \['pet'\] but root has no such cases \(found \['ct', 'mr'\]\)"
  with pytest.raises(ConfigError, match=message):
    cases_by_split(_Listing(_cases()), "root", ("ct", "pet"), tmp_path, seed=0)
  assert not (tmp_path / "splits.json").exists()


def test_cases_for_follows_a_saved_split_else_the_work_dirs(tmp_path):
  """A checkpoint's recorded split wins over the work dir's; without one the work dir's
  split is made from the config's seed and fractions."""
  config = config_lib.default()
  config.modalities = ("mr",)
  config.data.split_fractions = (0.0, 0.0, 1.0)
  listing = _Listing(_cases(ct=2, mr=3))
  made = cases_for(config, listing, "root", tmp_path)
  assert [c.id for c in made["mr"]["test"]] == ["mr0", "mr1", "mr2"]
  assert json.loads((tmp_path / "splits.json").read_text())["mr"]["test"] == ["mr0", "mr1", "mr2"]
  saved = {"mr": {"train": ["mr2"], "val": [], "test": ["mr0"]}}
  by_record = cases_for(config, listing, "root", tmp_path, saved=saved, source="record")
  assert {s: [c.id for c in cs] for s, cs in by_record["mr"].items()} == saved["mr"]
  with pytest.raises(DataError, match=r"^record: mr test cases \['mr7'\] are no longer"):
    cases_for(config, listing, "root", tmp_path, saved={"mr": {"test": ["mr7"]}}, source="record")


def test_adapter_for_builds_the_configs_dataset_with_its_options():
  config = config_lib.default()
  config.data.dataset = "folder"
  config.data.options.modalities = {"ct": "images_ct"}
  adapter = adapter_for(config)
  assert type(adapter).__name__ == "FolderAdapter" and adapter.modalities == {"ct": "images_ct"}
