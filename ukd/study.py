"""The paper's comparison in one command: every sharing scheme (and ablation) on the same data.

  python -m ukd.study --config=configs/study.py --workdir=runs/study [--only=ukd,single]
                      [--seeds=0,1]

A study config (`configs/study.py`) holds a `base` training config and named variants, each
nested overrides of `base` (`{'loss': {'kd': 0.0}}`): `schemes` (the paper's table) and
`ablations` (the second table); `train` says which of them to train, `seeds` with which seeds,
and `reference` the variant every other one is tested against.  Every (variant, seed) trains
through the same `train.train_and_evaluate` in its own ordinary work dir,
`<dir>/runs/<name>-seed<k>/`, on the same dataset and, for a given seed, the same split; all
runs share one preprocessing cache.  A run that finished leaves
`study_result.json` (its test rows) and is skipped next time; an interrupted run resumes from
its checkpoint, since `train_and_evaluate` does.

Written to the study dir, from every finished run the config names:
  study.csv  one row per (variant, seed, modality, structure): dice, assd, hd95
  study.md   the tables (Dice % and ASSD mm per structure, mean +- std over seeds, parameter
             counts) and a paired Wilcoxon signed-rank test per modality between the
             reference variant and each other one, over (seed, test case) pairs
  study.png  mean Dice per variant and modality, one dot per seed, bar = mean over seeds
ASSD is the pooled form (`ukd.metrics.assd`).

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
import numpy as np
from absl import flags
from etils import epath
from ml_collections import config_flags

from ukd import cli as cli_lib
from ukd import config as config_lib
from ukd import files, metrics, tables
from ukd.errors import ConfigError, UkdError
from ukd.metrics import METRICS
from ukd.models.schemes import SCHEMES

config_flags.DEFINE_config_file("config", None, "Study config, e.g. configs/study.py[:arg].")
flags.DEFINE_string("workdir", None, "Study dir: runs/, study.md, study.csv, study.png.")
flags.DEFINE_list("only", None, "Train only these variants, e.g. ukd,single.")
flags.DEFINE_list("seeds", None, "Train only these seeds, e.g. 0,1.")
flags.DEFINE_list("arms", None, "Train only these arms of a study with arms, e.g. mr_scarce.")
flags.mark_flag_as_required("workdir")

FLAGS = flags.FLAGS
RESULT = "study_result.json"


# ---- Runs ----------------------------------------------------------------------------------


def run_name(name: str, seed: int) -> str:
  return f"{name}-seed{seed}"


def run_config(study, overrides: dict, seed: int, study_dir: str) -> mc.ConfigDict:
  """The base config with a variant's overrides; phantoms and cache shared by every run."""
  config = mc.ConfigDict(study.base.to_dict())
  _override(config, config_lib.plain(overrides), "config")
  config.seed = int(seed)
  if config.data.synthetic.enabled:
    config.data.root = os.fspath(epath.Path(study_dir) / "phantoms")
  config.data.cache_dir = os.fspath(epath.Path(study_dir) / "cache")
  return config


def _override(node, overrides: dict, where: str) -> None:
  """Sets nested `overrides` on a ConfigDict; a field it does not have is a ConfigError."""
  for key, value in overrides.items():
    if key not in node:
      raise ConfigError(f"a study variant sets {where}.{key}, which does not exist")
    if isinstance(value, dict) and isinstance(node[key], mc.ConfigDict):
      _override(node[key], value, f"{where}.{key}")
      continue
    try:
      node[key] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"a study variant sets {where}.{key}={value!r}: {e}") from None


def train_run(config, rundir: str) -> dict:
  """Trains and tests one run unless it already finished; returns its saved result."""
  from ukd import models, train

  result_path = epath.Path(rundir) / RESULT
  if result_path.exists():
    return json.loads(result_path.read_text())
  tested = train.train_and_evaluate(config, rundir)["test"]
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
    return write_arms_report(study, study_dir)
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
  return write_report(study, study_dir)


# ---- Report --------------------------------------------------------------------------------


def finished_results(study, study_dir: str) -> dict:
  """{variant: {seed: result}} for every finished run of a variant the study names."""
  out = {}
  runs = epath.Path(study_dir) / "runs"
  for entry in sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []:
    name, _, seed = entry.rpartition("-seed")
    path = runs / entry / RESULT
    if seed.isdigit() and (name in study.schemes or name in study.ablations):
      if path.exists():
        out.setdefault(name, {})[int(seed)] = json.loads(path.read_text())
  return out


def case_means(rows, modality: str, metric: str) -> dict:
  """{case: mean over structures} of one modality, as the evaluation report computes it."""
  from ukd import evaluate

  return evaluate.case_means([r for r in rows if r["modality"] == modality], metric)


def _seed_values(results, modality, metric, structure=None) -> list[float]:
  """One number per seed: the mean over test cases (of a structure, or of the case means).
  Cases where a distance is undefined (NaN: exactly one mask empty) are left out."""
  values = []
  for result in results.values():
    if structure is None:
      per_case = list(case_means(result["rows"], modality, metric).values())
    else:
      per_case = [
        r[metric] for r in result["rows"] if r["modality"] == modality and r["class"] == structure
      ]
    values.append(float(np.nanmean(per_case)) if np.isfinite(per_case).any() else float("nan"))
  return values


def _structures_and_modalities(results):
  rows = [r for seeds in results.values() for res in seeds.values() for r in res["rows"]]
  modalities = list(dict.fromkeys(r["modality"] for r in rows))
  structures = list(dict.fromkeys(r["class"] for r in rows))
  return structures, modalities


def metric_table(results, names, metric, scale, digits, with_params=False) -> str:
  """Rows = variants; columns = each structure and the mean, per modality.  A cell is the
  mean ± std over seeds (`tables.mean_std`); a seed without any defined value is left out
  and counted."""
  structures, modalities = _structures_and_modalities(results)
  header = ["Variant", "Seeds"]
  for m in modalities:
    header += [f"{m.upper()} {s}" for s in structures] + [f"{m.upper()} mean"]
  if with_params:
    header.append("Parameters")
  body = []
  for name in names:
    if name not in results:
      continue
    seeds = results[name]
    row = [name, str(len(seeds))]
    for m in modalities:
      row += [_cell(_seed_values(seeds, m, metric, s), scale, digits) for s in structures]
      row.append(_cell(_seed_values(seeds, m, metric), scale, digits))
    if with_params:
      row.append(f"{next(iter(seeds.values()))['params']:,}")
    body.append(row)
  return tables.markdown(header, body)


def _cell(seed_values, scale, digits) -> str:
  return tables.mean_std(metrics.summarize(seed_values), scale, digits)


def paired_tests(results, reference: str, names) -> list[dict]:
  """Wilcoxon signed-rank per modality: reference vs each variant, over the (seed, test case)
  pairs both have, on the per-case mean Dice over structures."""
  from scipy import stats

  out = []
  if reference not in results:
    return out
  _, modalities = _structures_and_modalities(results)
  for name in names:
    if name == reference or name not in results:
      continue
    for m in modalities:
      ref, other = [], []
      for seed in sorted(set(results[reference]) & set(results[name])):
        a = case_means(results[reference][seed]["rows"], m, "dice")
        b = case_means(results[name][seed]["rows"], m, "dice")
        for case in sorted(set(a) & set(b)):
          ref.append(a[case])
          other.append(b[case])
      diff = np.asarray(ref) - np.asarray(other)
      p = float("nan")
      if len(diff) and np.any(diff != 0):
        p = float(stats.wilcoxon(ref, other).pvalue)
      out.append(
        {
          "variant": name,
          "modality": m,
          "pairs": len(diff),
          "mean_diff": float(diff.mean()) if len(diff) else float("nan"),
          "wins": int((diff > 0).sum()),
          "p": p,
        }
      )
  return out


def _tests_table(tests, reference) -> str:
  body = [
    [
      t["variant"],
      t["modality"].upper(),
      str(t["pairs"]),
      f"{t['mean_diff'] * 100:+.1f}",
      f"{t['wins']}/{t['pairs']}",
      "n/a" if not np.isfinite(t["p"]) else f"{t['p']:.3g}",
    ]
    for t in tests
  ]
  header = [
    "Compared with",
    "Modality",
    "Pairs",
    f"{reference} - it (Dice points)",
    f"{reference} better",
    "Wilcoxon p",
  ]
  return tables.markdown(header, body)


CSV_FIELDS = ("variant", "seed", "modality", "structure", *METRICS)


def write_csv(results, path) -> None:
  files.write_csv(path, CSV_FIELDS, _csv_rows(results))


def _csv_rows(results) -> list[dict]:
  """One row per (variant, seed, modality, structure): each metric's mean over the run's test
  cases (NaN cases left out), to 6 significant digits."""
  out = []
  for name, seeds in results.items():
    for seed, result in sorted(seeds.items()):
      by_key = {}
      for r in result["rows"]:
        by_key.setdefault((r["modality"], r["class"]), []).append(r)
      for (modality, structure), rows in by_key.items():
        row = {"variant": name, "seed": seed, "modality": modality, "structure": structure}
        out.append(row | {k: f"{np.nanmean([r[k] for r in rows]):.6g}" for k in METRICS})
  return out


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  return plt


def write_chart(results, names, path) -> None:
  plt = _pyplot()
  names = [n for n in names if n in results]
  fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4.0))
  _draw_chart(ax, results, names)
  ax.set_title("Mean Dice over structures per variant (dots: seeds; bars: mean ± std)")
  _save_figure(fig, path)


def _save_figure(fig, path) -> None:
  fig.tight_layout()
  with files.replacing(path) as tmp:
    fig.savefig(tmp, dpi=120)
  _pyplot().close(fig)


def _draw_chart(ax, results, names) -> None:
  """Bars of mean Dice per variant and modality, a dot per seed, on one axes."""
  _, modalities = _structures_and_modalities(results)
  width = 0.8 / max(1, len(modalities))
  for j, m in enumerate(modalities):
    for i, name in enumerate(names):
      values = np.asarray(_seed_values(results[name], m, "dice")) * 100
      x = i + (j - (len(modalities) - 1) / 2) * width
      ax.bar(x, np.nanmean(values), width, color=f"C{j}", label=m.upper() if i == 0 else None)
      ax.plot([x] * len(values), values, "k.", markersize=4)
      ax.errorbar(x, np.nanmean(values), yerr=np.nanstd(values), color="k", capsize=3)
  ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
  ax.set_ylabel("mean test Dice (%)")
  ax.legend()
  lows = [np.nanmin(_seed_values(results[n], m, "dice")) for n in names for m in modalities]
  ax.set_ylim(max(0.0, min(lows) * 100 - 10), 100)


def _scheme_order(study) -> list[str]:
  """The schemes in the order ukd.models lists them (single first, as in the paper's table)."""
  known = list(SCHEMES)
  return sorted(study.schemes, key=lambda n: known.index(n) if n in known else len(known))


def _scheme_sections(study, results) -> list[str]:
  """The markdown of the schemes' Dice and ASSD tables and paired tests, headings excluded."""
  schemes = _scheme_order(study)
  return [
    "Test Dice (%) per structure and modality: mean ± std over seeds of each run's mean over",
    "its test volumes; `Parameters` counts every trainable parameter.",
    "",
    metric_table(results, schemes, "dice", 100.0, 1, with_params=True),
    "",
    "Test ASSD (mm; pooled over both surfaces, as medpy >= 0.5 and MONAI); a seed whose every",
    "test volume has an undefined distance (one mask empty) is left out and counted, '(1 n/a)':",
    "",
    metric_table(results, schemes, "assd", 1.0, 2),
    "",
    f"Paired Wilcoxon signed-rank tests, `{study.reference}` against each scheme, on the mean",
    "Dice over structures of each (seed, test volume) pair:",
    "",
    _tests_table(paired_tests(results, study.reference, schemes), study.reference),
  ]


def write_report(study, study_dir: str) -> dict:
  """study.md, study.csv and study.png from every finished run; returns what went in."""
  results = finished_results(study, study_dir)
  if not results:
    raise UkdError(f"{study_dir}: no finished study runs to report")
  schemes = _scheme_order(study)
  ablations = [study.reference, *study.ablations]
  tests = paired_tests(results, study.reference, schemes)
  ablation_tests = paired_tests(results, study.reference, list(study.ablations))
  parts = ["# Sharing schemes", "", *_scheme_sections(study, results)]
  if any(name in results for name in study.ablations):
    parts += [
      "",
      "# Ablations",
      "",
      f"Each row changes one setting of `{study.reference}`; test Dice (%):",
      "",
      metric_table(results, ablations, "dice", 100.0, 1),
      "",
      "Test ASSD (mm):",
      "",
      metric_table(results, ablations, "assd", 1.0, 2),
      "",
      _tests_table(ablation_tests, study.reference),
    ]
  study_dir = epath.Path(study_dir)
  files.write_text(study_dir / "study.md", "\n".join(parts) + "\n")
  write_csv(results, study_dir / "study.csv")
  write_chart(results, [*schemes, *study.ablations], study_dir / "study.png")
  return {"results": results, "tests": tests + ablation_tests}


def _against_best(study, results) -> list[list[str]]:
  """Per modality: the reference's mean Dice over seeds, the best other variant's, their
  difference, and the seed spread (the larger of the two standard deviations over seeds):
  a lead smaller than the spread is within what another seed could give."""
  rows = []
  _, modalities = _structures_and_modalities(results)
  ref = study.reference
  others = [n for n in _scheme_order(study) if n != ref and n in results]
  if ref not in results or not others:
    return rows
  for m in modalities:
    seeds = {n: np.asarray(_seed_values(results[n], m, "dice")) * 100 for n in [ref, *others]}
    best = max(others, key=lambda n: np.nanmean(seeds[n]))
    diff = np.nanmean(seeds[ref]) - np.nanmean(seeds[best])
    # One seed has no spread: whether a lead is beyond it cannot be told.
    several = min(len(seeds[ref]), len(seeds[best])) > 1
    spread = max(np.nanstd(seeds[ref]), np.nanstd(seeds[best]))
    rows.append(
      [
        m.upper(),
        f"{np.nanmean(seeds[ref]):.1f}",
        f"{best} {np.nanmean(seeds[best]):.1f}",
        f"{diff:+.1f}",
        f"{spread:.1f}" if several else "n/a (1 seed)",
        ("yes" if abs(diff) > spread else "no") if several else "n/a",
      ]
    )
  return rows


def write_arms_report(study, study_dir: str) -> dict:
  """The study dir's study.md (every arm's tables), study.csv (with an `arm` column) and
  study.png (a panel per arm) from every arm's finished runs."""
  study_dir = epath.Path(study_dir)
  arms = {}
  for arm in study.arms:
    results = finished_results(arm_study(study, arm), study_dir / arm)
    if results:
      arms[arm] = results
  if not arms:
    raise UkdError(f"{study_dir}: no finished study runs to report")
  ref = study.reference
  summary = [[arm, *row] for arm, results in arms.items() for row in _against_best(study, results)]
  parts = [
    "# Sharing schemes, arm by arm",
    "",
    f"Per arm and modality, `{ref}` against the best other variant (mean test Dice % over",
    "seeds); the spread is the larger standard deviation over seeds of the two:",
    "",
    tables.markdown(
      ["Arm", "Modality", ref, "Best other", "Difference", "Seed spread", "Beyond spread"], summary
    ),
  ]
  for arm, results in arms.items():
    sub = arm_study(study, arm)
    parts += ["", f"## {arm}", "", study.arms[arm].doc, "", *_scheme_sections(sub, results)]
  files.write_text(study_dir / "study.md", "\n".join(parts) + "\n")
  rows = [{"arm": arm, **row} for arm, results in arms.items() for row in _csv_rows(results)]
  files.write_csv(study_dir / "study.csv", ("arm", *CSV_FIELDS), rows)
  plt = _pyplot()
  fig, axes = plt.subplots(len(arms), 1, figsize=(8.0, 3.6 * len(arms)), squeeze=False)
  for ax, (arm, results) in zip(axes[:, 0], arms.items()):
    _draw_chart(ax, results, [n for n in _scheme_order(arm_study(study, arm)) if n in results])
    ax.set_title(f"{arm}: mean test Dice over structures (dots: seeds; bars: mean ± std)")
  _save_figure(fig, study_dir / "study.png")
  return {"arms": arms, "summary": summary}


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
