"""Per-modality training budgets (`data.train_fraction`), and separate networks (`single`)
each chosen at its own modality's best validation step."""

import jax
import numpy as np
import pytest
from helpers import random_variables, tiny_config

from ukd import config as config_lib
from ukd import config_fields
from ukd.data.adapters import Case
from ukd.data.synthetic import generate as synthetic
from ukd.errors import ConfigError
from ukd.evaluation import evaluate
from ukd.runtime import checkpoints
from ukd.serve import segmenter as infer
from ukd.train import loop as train

RECORD = {
  "splits": {"ct": {"train": ["a"], "val": ["b"], "test": ["c"]}},
  "classes": ["background", "MYO", "AA"],
  "label_codes": {"ct": [0, 205, 820], "mr": [0, 63, 126]},
}


@pytest.mark.parametrize(
  "text,ct,mr",
  [("1", 1.0, 1.0), ("0.25", 0.25, 0.25), ("ct=1,mr=0.25", 1.0, 0.25), ("mr=0.5", 1.0, 0.5)],
)
def test_train_fraction_is_read_per_modality(text, ct, mr):
  assert config_fields.train_fraction_for(text, "ct") == ct
  assert config_fields.train_fraction_for(text, "mr") == mr


def test_a_number_saved_by_an_older_checkpoint_still_reads():
  assert config_fields.train_fraction_for(0.5, "mr") == 0.5


@pytest.mark.parametrize(
  "text,message",
  [
    ("0", r"data.train_fraction='0' must be 'F' or 'ct=F,mr=F' with each F in \(0, 1\]"),
    ("ct=1.5", r"data.train_fraction='ct=1.5' must be"),
    ("ct=0.5,ct=1", r"must be"),
    ("us=0.5", r"names modality 'us', not one of \('ct', 'mr'\)"),
  ],
)
def test_a_bad_budget_is_one_line_naming_the_setting(text, message):
  config = tiny_config()
  config.data.train_fraction = text
  with pytest.raises(ConfigError, match=message):
    config_lib.check(config)


def test_a_budget_takes_the_first_cases_of_the_seeded_split_and_nests():
  cases = [Case(f"c{i}", "mr", f"{i}.nii.gz", f"{i}_label.nii.gz") for i in range(12)]
  quarter = train.training_subset(cases, 0.25)
  assert [c.id for c in quarter] == ["c0", "c1", "c2"]  # round(0.25 * 12) = 3
  half = train.training_subset(cases, 0.5)
  assert half[:3] == quarter and len(half) == 6
  assert len(train.training_subset(cases[:2], 0.1)) == 1  # never none


def test_a_run_records_the_cases_each_modality_trained_on(tmp_path):
  config = tiny_config()
  config.data.dataset = "mmwhs"
  config.data.root = str(tmp_path / "data")
  synthetic.write_mmwhs(config.data.root, n_ct=5, n_mr=5, shape=(24, 24, 8))
  config.data.split_fractions = (0.8, 0.2, 0.0)
  config.data.train_fraction = "ct=1,mr=0.5"
  config = config_lib.check(config)
  data = train.prepare_data(config, config.data.root, tmp_path / "run")
  record = data.record()
  assert record["trained"]["ct"] == record["splits"]["ct"]["train"]
  assert len(record["splits"]["mr"]["train"]) == 4
  assert record["trained"]["mr"] == record["splits"]["mr"]["train"][:2]
  assert len(data.train_sources["mr"]) == 2 and len(data.train_sources["ct"]) == 4
  # Validation never shrinks with the budget.
  assert len(record["splits"]["mr"]["val"]) == 1


def _config(scheme):
  config = tiny_config()
  config.model.scheme = scheme
  config.model.init = "lecun"
  return config_lib.check(config)


def _save(workdir, config, steps):
  """Saves {step: (variables, {modality: val Dice})} as training would."""
  mgr = checkpoints.manager(workdir, best_of=("ct", "mr"))
  for step, (variables, dice) in steps.items():
    mean = float(np.mean(list(dice.values())))
    checkpoints.save(
      mgr, step, variables, config, val_dice=mean, modality_dice=dice, dataset=RECORD
    )
  mgr.wait_until_finished()
  mgr.close()


def _branch(variables, modality):
  """The leaves of one modality's branches, by path."""
  return {
    jax.tree_util.keystr(path): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables)
    if any(getattr(k, "key", None) == modality for k in path)
  }


def test_separate_networks_are_each_loaded_from_their_own_best_step(tmp_path):
  config = _config("single")
  first, second, third = (random_variables(config, seed) for seed in (0, 1, 2))
  # Mean Dice is best at step 4 (0.6); CT alone is best at 2, MR alone at 6.
  _save(
    tmp_path,
    config,
    {
      2: (first, {"ct": 0.9, "mr": 0.1}),
      4: (second, {"ct": 0.6, "mr": 0.6}),
      6: (third, {"ct": 0.2, "mr": 0.8}),
    },
  )
  # The per-modality best steps outlive the mean's keep_best=1.
  assert sorted(checkpoints.manager(tmp_path, read_only=True).all_steps()) == [2, 4, 6]
  seg = infer.load(tmp_path)
  assert seg.step == {"ct": 2, "mr": 6} and seg.step_name == "ct2-mr6"
  assert evaluate.output_dir("w", "test", seg.step_name).endswith("eval/test-step-ct2-mr6")
  assert evaluate.output_dir("w", "test", 6).endswith("eval/test-step6")
  got = seg.variables[0]
  for modality, source in (("ct", first), ("mr", third)):
    want = _branch(source, modality)
    assert want and set(_branch(got, modality)) == set(want)
    for path, value in _branch(got, modality).items():
      np.testing.assert_array_equal(value, want[path])
  # A step asked for by number, or 'latest', is one step for both.
  assert infer.load(tmp_path, step="latest").step == 6


def test_a_network_with_shared_parameters_keeps_one_best_step(tmp_path):
  config = _config("ukd")
  variables = random_variables(config, 0)
  _save(
    tmp_path,
    config,
    {2: (variables, {"ct": 0.9, "mr": 0.1}), 4: (variables, {"ct": 0.6, "mr": 0.6})},
  )
  assert infer.load(tmp_path).step == 4


def test_only_networks_sharing_nothing_are_split_by_modality():
  assert infer.shares_nothing(random_variables(_config("single")))
  for scheme in ("joint", "separate_norm", "ukd", "x_shape", "y_shape"):
    assert not infer.shares_nothing(random_variables(_config(scheme))), scheme
