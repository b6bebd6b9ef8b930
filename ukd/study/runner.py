"""The paper's comparison in one command: every sharing scheme (and ablation) on the same data.

  python -m ukd.study.runner --config=configs/study.py --workdir=runs/study [--only=ukd,single]
                      [--seeds=0,1]

A study config (`configs/study.py`) holds a `base` training config and named variants, each
nested overrides of `base` (`{'loss': {'kd': 0.0}}`): `schemes` (the paper's table) and
`ablations` (the second table); `train` says which of them to train, `seeds` with which seeds,
and `reference` the variant every other one is tested against.  Every (variant, seed) trains
through the same `commands.train_and_evaluate` in its own ordinary work dir,
`<dir>/runs/<name>-seed<k>/`, on the same dataset and, for a given seed, the same split; all
runs share one preprocessing cache.  A run that finished leaves
`study_result.json` (its test rows) and is skipped next time; an interrupted run resumes from
its checkpoint, since `train_and_evaluate` does.

Written to the study dir (`ukd.study.report`), from every finished run the config names:
  study.csv  one row per (variant, seed, modality, structure): dice, assd, hd95
  study.md   the tables (Dice % and ASSD mm per structure, mean +- std over seeds, parameter
             counts) and a paired Wilcoxon signed-rank test per modality between the
             reference variant and each other one, over (seed, test case) pairs
  study.png  mean Dice per variant and modality, one dot per seed, bar = mean over seeds
ASSD is the pooled form (`ukd.evaluation.metrics.assd`).

A study config with `arms` is several such studies in one: each arm is the base with the arm's
own overrides (another phantom set, a scarce modality) and the variants it compares, trained
into `<dir>/<arm>/` with that arm's own phantoms, cache and report.  The study dir's own
study.md then holds every arm's tables and, per arm and modality, the reference against the
best other variant next to the seed spread; study.csv gains an `arm` column and study.png a
panel per arm.  `--arms=mr_scarce` narrows a run to some arms.
"""

import json
import os

import ml_collections as mc
from absl import flags
from etils import epath
from ml_collections import config_flags

from ukd import cli as cli_lib
from ukd import config as config_lib
from ukd import files
from ukd.errors import ConfigError
from ukd.study import report as study_report
from ukd.study.report import RESULT

config_flags.DEFINE_config_file("config", None, "Study config, e.g. configs/study.py[:arg].")
flags.DEFINE_string("workdir", None, "Study dir: runs/, study.md, study.csv, study.png.")
flags.DEFINE_list("only", None, "Train only these variants, e.g. ukd,single.")
flags.DEFINE_list("seeds", None, "Train only these seeds, e.g. 0,1.")
flags.DEFINE_list("arms", None, "Train only these arms of a study with arms, e.g. mr_scarce.")
flags.mark_flag_as_required("workdir")

FLAGS = flags.FLAGS


# ---- Runs ----------------------------------------------------------------------------------


def run_name(name: str, seed: int) -> str:
  return f"{name}-seed{seed}"


def run_config(study, overrides: dict, seed: int, study_dir: str) -> mc.ConfigDict:
  """The base config with a variant's overrides; phantoms and cache shared by every run."""
  config = mc.ConfigDict(study.base.to_dict())
  _override(config, config_lib.plain(overrides), "config")
  config.seed = int(seed)
  if config.data.synthetic.enabled:
    # The study's own folder, made here: training generates phantoms only into a root that
    # exists (a mistyped one is an error there).
    root = epath.Path(study_dir) / "phantoms"
    files.makedirs(root)
    config.data.root = os.fspath(root)
  config.data.cache_dir = os.fspath(epath.Path(study_dir) / "cache")
  return config


def _override(node, overrides: dict, where: str, path: str = "") -> None:
  """Sets nested `overrides` on a ConfigDict; a field it does not have is a ConfigError,
  except in the mappings whose keys a user names (`config.OPEN_MAPPINGS`: modalities, adapter
  options).  `where` names the node in errors, `path` is its place in the training config."""
  for key, value in overrides.items():
    if key not in node and path not in config_lib.OPEN_MAPPINGS:
      raise ConfigError(f"a study variant sets {where}.{key}, which does not exist")
    inner = f"{path}.{key}" if path else key
    if isinstance(value, dict) and isinstance(node.get(key), mc.ConfigDict):
      _override(node[key], value, f"{where}.{key}", inner)
      continue
    try:
      node[key] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"a study variant sets {where}.{key}={value!r}: {e}") from None


def train_run(config, rundir: str) -> dict:
  """Trains and tests one run unless it already finished; returns its saved result."""
  from ukd import commands, models

  result_path = epath.Path(rundir) / RESULT
  if result_path.exists():
    return json.loads(result_path.read_text())
  tested = commands.train_and_evaluate(config, rundir)["test"]
  counts = models.count_params(config.model, tuple(config.modalities))
  result = {
    "rows": tested["cases"],  # the rows of cases.csv
    "step": tested["step"],  # {modality: step} for separate networks chosen each on its own
    "params": counts["params"],
    "kernels": counts["kernels"],
  }
  files.write_text(result_path, json.dumps(result, allow_nan=True))
  return result


def planned_runs(study, only=None, seeds=None) -> list[tuple[str, str, int]]:
  """(table, variant, seed) for every run to train, in order."""
  tables = {"schemes": ("schemes",), "ablations": ("ablations",), "all": ("schemes", "ablations")}
  if study.train not in tables:
    raise ConfigError(f"config.train={study.train!r} must be one of {sorted(tables)}")
  seeds = tuple(seeds if seeds is not None else study.seeds)
  known = set(study.schemes) | set(study.ablations)
  unknown = sorted(set(only or ()) - known)
  if unknown:
    raise ConfigError(f"--only names unknown variants {unknown}; known: {sorted(known)}")
  trained = {n for t in tables[study.train] for n in study[t]} | {study.reference}
  untrained = sorted(set(only or ()) - trained)
  if untrained:
    raise ConfigError(
      f"--only names {untrained}, which config.train={study.train!r} does not train; "
      "use the config's :ablations variant or --config.train=all"
    )
  runs = []
  for table in tables[study.train]:
    names = list(study[table])
    if table == "ablations":
      names = [study.reference, *names]  # the reference row of the ablation table
    for name in names:
      if only and name not in only:
        continue
      runs += [(table, name, s) for s in seeds if (name, s) not in {(n, k) for _, n, k in runs}]
  return runs


def variant_overrides(study, name: str) -> dict:
  return config_lib.plain(study.schemes[name] if name in study.schemes else study.ablations[name])


def arm_study(study, arm: str) -> mc.ConfigDict:
  """One arm of a study with arms, as a study of its own: the base with the arm's overrides,
  the arm's variants as the schemes table, no ablations."""
  spec = study.arms[arm]
  unknown = sorted(set(spec.variants) - set(study.schemes))
  if unknown:
    raise ConfigError(f"config.arms.{arm}.variants names {unknown}, not in config.schemes")
  out = mc.ConfigDict(study.to_dict())
  _override(out.base, config_lib.plain(spec.base), f"arms.{arm}.base")
  out.schemes = {name: study.schemes[name].to_dict() for name in spec.variants}
  out.ablations = {}
  out.train = "schemes"
  out.arms = {}
  return out


def _arms(study, chosen=None) -> list[str]:
  unknown = sorted(set(chosen or ()) - set(study.arms))
  if unknown:
    raise ConfigError(f"--arms names unknown arms {unknown}; known: {sorted(study.arms)}")
  return [arm for arm in study.arms if not chosen or arm in chosen]


def run_study(study, study_dir: str, only=None, seeds=None, arms=None) -> dict:
  """Trains every planned run not yet finished, then writes the report from all finished ones
  (of every arm, for a study with arms)."""
  if study.get("arms"):
    for arm in _arms(study, arms):
      sub = arm_study(study, arm)
      wanted = [name for name in only or () if name in sub.schemes]
      if only and not wanted:
        continue  # --only names none of this arm's variants
      print(f"arm {arm}", flush=True)
      run_study(sub, files.path(study_dir) / arm, wanted or None, seeds)
    subs = {arm: arm_study(study, arm) for arm in study.arms}
    return study_report.write_arms_report(study, study_dir, subs)
  if arms:
    raise ConfigError("--arms: this study config has no arms")
  runs = planned_runs(study, only, seeds)
  study_dir = files.path(study_dir)
  files.makedirs(study_dir / "runs")
  for i, (_, name, seed) in enumerate(runs):
    rundir = study_dir / "runs" / run_name(name, seed)
    done = (rundir / RESULT).exists()
    print(f"[{i + 1}/{len(runs)}] {run_name(name, seed)}{' (done)' if done else ''}", flush=True)
    train_run(run_config(study, variant_overrides(study, name), seed, study_dir), rundir)
  return study_report.write_report(study, study_dir)


# ---- Command line --------------------------------------------------------------------------


def main(argv):
  del argv
  config = cli_lib.required_config(FLAGS.config, "for a study, e.g. --config=configs/study.py")
  try:
    seeds = None if FLAGS.seeds is None else [int(s) for s in FLAGS.seeds]
  except ValueError:
    raise ConfigError(f"--seeds={','.join(FLAGS.seeds)} must be integers") from None
  run_study(config, FLAGS.workdir, only=FLAGS.only, seeds=seeds, arms=FLAGS.arms)
  print(f"wrote {os.path.join(FLAGS.workdir, 'study.md')}, study.csv and study.png")


def cli():
  cli_lib.run(main)


if __name__ == "__main__":
  cli()
