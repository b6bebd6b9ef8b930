"""The study's report: tables, paired tests, CSV and chart from its finished runs.

`ukd.study.runner` trains the runs; this module reads what they left (`RESULT` in each run dir) and
writes study.md, study.csv and study.png, for one study or arm by arm (see `ukd.study.runner`).
"""

import json

import numpy as np
from etils import epath

from ukd import config_fields, files
from ukd.errors import UkdError
from ukd.evaluation import metrics, tables
from ukd.evaluation.metrics import METRICS
from ukd.models.schemes import SCHEMES

RESULT = "study_result.json"  # what a finished run leaves in its run dir


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
  from ukd.evaluation import evaluate

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


def _case_dice(rows, modality: str, structure=None) -> dict:
  """{case: Dice} of one modality: the mean over structures, or of one structure."""
  if structure is None:
    return case_means(rows, modality, "dice")
  return {
    r["case"]: r["dice"] for r in rows if r["modality"] == modality and r["class"] == structure
  }


def paired_tests(results, reference: str, names, by_structure=()) -> list[dict]:
  """Wilcoxon signed-rank per modality: reference vs each variant, over the (seed, test case)
  pairs both have, on the per-case mean Dice over structures; for the modalities in
  `by_structure`, also on each structure's Dice."""
  from scipy import stats

  out = []
  if reference not in results:
    return out
  structures, modalities = _structures_and_modalities(results)
  compared = [(m, None) for m in modalities]
  compared += [(m, s) for m in modalities if m in by_structure for s in structures]
  for name in names:
    if name == reference or name not in results:
      continue
    for m, structure in compared:
      ref, other = [], []
      for seed in sorted(set(results[reference]) & set(results[name])):
        a = _case_dice(results[reference][seed]["rows"], m, structure)
        b = _case_dice(results[name][seed]["rows"], m, structure)
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
          "structure": structure or "mean",
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
      t["structure"],
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
    "Structure",
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
    "Dice over structures of each (seed, test volume) pair, and on each structure's Dice in a",
    "modality trained on only some structures (`data.labelled`):",
    "",
    _tests_table(
      paired_tests(results, study.reference, schemes, _partly_labelled(study)), study.reference
    ),
  ]


def _partly_labelled(study) -> list[str]:
  """The modalities whose training labels hold only some structures (`data.labelled`); their
  test labels may hold all, and the structures never labelled are tested one by one."""
  entries = config_fields.labelled_entries(study.base.data.get("labelled", ""))
  return [m for m in entries if m is not None]


def write_report(study, study_dir: str) -> dict:
  """study.md, study.csv and study.png from every finished run; returns what went in."""
  results = finished_results(study, study_dir)
  if not results:
    raise UkdError(f"{study_dir}: no finished study runs to report")
  schemes = _scheme_order(study)
  ablations = [study.reference, *study.ablations]
  tests = paired_tests(results, study.reference, schemes, _partly_labelled(study))
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


def write_arms_report(study, study_dir: str, subs: dict) -> dict:
  """The study dir's study.md (every arm's tables), study.csv (with an `arm` column) and
  study.png (a panel per arm) from every arm's finished runs; `subs` holds each arm as a study
  of its own (`ukd.study.runner.arm_study`), whose runs are in `<study_dir>/<arm>`."""
  study_dir = epath.Path(study_dir)
  arms = {}
  for arm, sub in subs.items():
    results = finished_results(sub, study_dir / arm)
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
    parts += ["", f"## {arm}", "", study.arms[arm].doc, "", *_scheme_sections(subs[arm], results)]
  files.write_text(study_dir / "study.md", "\n".join(parts) + "\n")
  rows = [{"arm": arm, **row} for arm, results in arms.items() for row in _csv_rows(results)]
  files.write_csv(study_dir / "study.csv", ("arm", *CSV_FIELDS), rows)
  plt = _pyplot()
  fig, axes = plt.subplots(len(arms), 1, figsize=(8.0, 3.6 * len(arms)), squeeze=False)
  for ax, (arm, results) in zip(axes[:, 0], arms.items()):
    _draw_chart(ax, results, [n for n in _scheme_order(subs[arm]) if n in results])
    ax.set_title(f"{arm}: mean test Dice over structures (dots: seeds; bars: mean ± std)")
  _save_figure(fig, study_dir / "study.png")
  return {"arms": arms, "summary": summary}
