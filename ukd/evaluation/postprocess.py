"""Connected-component post-processing, chosen on the validation split as nnU-Net chooses it.

Why: a network labels voxel by voxel (a 2D one even slice by slice), so it leaves small
islands of a class far from the organ, which cost Dice and, much more, surface distances.
Removing them is right for a class that is one piece (the aorta, the left ventricle) and wrong
for one that has several (two kidneys), and CT and MR networks err differently, so nothing is
removed by default: `ukd.commands.choose_postprocessing` predicts every validation case once, tries each rule
on those labels in memory, and keeps a rule for a modality and class only where it raises the
mean Dice over that modality's validation cases (strictly: a tie keeps the labels as they are).

Rules of one class (both may be given; the volume threshold is applied first):
  * {"largest_component": true}: only the largest connected component of the class is kept;
  * {"min_volume_mm3": t}: components of the class smaller than t mm^3 are removed.
Removed voxels become background; other classes never change.

Connectivity is full 3D (26 neighbours: faces, edges and corners).  Slices are often thick,
and a thin oblique structure (a vessel, a myocardial wall) whose voxels touch only by an edge
from one slice to the next is still one structure: face connectivity would cut it into pieces
and delete all but one.  Merging by corners only ever keeps more, never removes more.

`<workdir>/postprocessing.json`, written by `ukd.commands.choose_postprocessing`:
  {"rules": {modality: {class index (str): rule}},  what `load_rules` returns
   "step": checkpoint step, "split": "val", "cases": {modality: volumes}, "connectivity": 26,
   "validation": {modality: {class index: {"name", "none": mean Dice as predicted,
                  "largest_component": mean Dice, "min_volume_mm3": {t: mean Dice},
                  "chosen": rule or null}}}}
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from ukd import files
from ukd.errors import ConfigError, DataError, error

FILE = "postprocessing.json"
CONNECTIVITY = 26
_STRUCTURE = ndimage.generate_binary_structure(3, 3)  # 26-connectivity
# Volume thresholds tried on validation: a voxel or two of 1 mm^3 up to a sizeable blob.
MIN_VOLUMES_MM3 = (10, 30, 100, 300, 1000, 3000, 10000)
_RULE_KEYS = ("largest_component", "min_volume_mm3")

# {class index (str): {candidate: Dice}} of one case: 'none', 'largest_component' and
# 'min_volume_mm3' ({threshold (str): Dice}).
CaseScores = dict[str, dict]


# --- applying rules ---------------------------------------------------------------------------


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(component index per voxel, 0 outside the mask; voxel count of components 1..n)."""
  labelled, count = ndimage.label(mask, structure=_STRUCTURE)
  return labelled, np.bincount(labelled.ravel(), minlength=count + 1)[1:]


def _kept(volumes: np.ndarray, rule: Mapping) -> np.ndarray:
  """Which components (by volume in mm^3) a rule keeps: the ones of at least `min_volume_mm3`,
  then of those only the largest when `largest_component`."""
  keep = np.ones(len(volumes), bool)
  if rule.get("min_volume_mm3") is not None:
    keep &= volumes >= float(rule["min_volume_mm3"])
  if rule.get("largest_component") and keep.any():
    keep = np.arange(len(volumes)) == np.argmax(np.where(keep, volumes, -1.0))
  return keep


def apply(labels: np.ndarray, rules: Mapping | None, spacing) -> np.ndarray:
  """The labels with each named class's unwanted components set to background.

  Args:
    labels: class indices [X, Y, Z] on the volume's own grid.
    rules: one modality's rules, {class index (int or str): rule} (the module docstring);
      None or {} changes nothing.
    spacing: the grid's voxel size in mm, three numbers.

  Returns:
    A new array of the labels' shape and dtype.
  """
  out = np.array(labels, copy=True)
  voxel = float(np.prod([float(s) for s in spacing]))
  for key, rule in (rules or {}).items():
    labelled, sizes = _components(labels == int(key))
    if sizes.size:
      drop = np.concatenate([[False], ~_kept(sizes * voxel, rule)])
      out[drop[labelled]] = 0
  return out


# --- choosing rules ---------------------------------------------------------------------------


def candidate_scores(truth, pred, spacing, num_classes: int) -> CaseScores:
  """One case's Dice of every foreground class under every rule tried (`CaseScores`).

  Each class is labelled into components once; a rule's Dice then follows from each
  component's size and overlap with the truth, with `ukd.evaluation.metrics.dice`'s convention (both
  empty: 1).

  Args:
    truth: the ground truth class indices.
    pred: the predicted class indices, of the truth's shape.
    spacing: voxel size in mm.
    num_classes: classes including background.

  Returns:
    {class index (str): {'none', 'largest_component': Dice, 'min_volume_mm3': {t: Dice}}}.
  """
  truth, pred = np.asarray(truth), np.asarray(pred)
  voxel = float(np.prod([float(s) for s in spacing]))
  scores = {}
  for index in range(1, num_classes):
    labelled, sizes = _components(pred == index)
    true = truth == index
    overlap = np.bincount(labelled[true], minlength=sizes.size + 1)[1:]
    total = int(true.sum())

    def dice(rule, sizes=sizes, overlap=overlap, total=total):
      keep = _kept(sizes * voxel, rule)
      denominator = int(sizes[keep].sum()) + total
      return 1.0 if denominator == 0 else 2.0 * int(overlap[keep].sum()) / denominator

    scores[str(index)] = {
      "none": dice({}),
      "largest_component": dice({"largest_component": True}),
      "min_volume_mm3": {str(t): dice({"min_volume_mm3": t}) for t in MIN_VOLUMES_MM3},
    }
  return scores


def decide(
  scores: Mapping[str, Sequence[CaseScores]], class_names: Sequence[str] | None = None
) -> tuple[dict, dict]:
  """Rules from every validation case's `candidate_scores`, by modality.

  For each modality and class the candidate with the highest mean Dice is kept if it beats
  the labels as predicted strictly; candidates are tried in the order largest component,
  then the thresholds from small to large, and the first of equal ones wins.

  Args:
    scores: {modality: one `candidate_scores` per validation case}.
    class_names: names by class index, recorded with the numbers.

  Returns:
    (rules {modality: {class index: rule}}, numbers {modality: {class index: mean Dice of
    each candidate and the rule chosen}}), as postprocessing.json holds them.
  """
  rules, numbers = {}, {}
  for modality, cases in scores.items():
    rules[modality], numbers[modality] = {}, {}
    for key in cases[0] if cases else ():
      (_, baseline), *tried = _mean_dice([case[key] for case in cases])
      best_rule, best = max(tried, key=lambda pair: pair[1])  # the first of equal ones
      chosen = best_rule if best > baseline else None
      if chosen:
        rules[modality][key] = chosen
      numbers[modality][key] = {
        "name": class_names[int(key)] if class_names else key,
        "none": baseline,
        "largest_component": tried[0][1],
        "min_volume_mm3": {str(rule["min_volume_mm3"]): d for rule, d in tried[1:]},
        "chosen": chosen,
      }
  return rules, numbers


def _mean_dice(of_class: Sequence[dict]) -> list[tuple[dict, float]]:
  """(rule, mean Dice over the cases) of one class: no rule ({}), the largest component, then
  each volume threshold."""
  picks = [
    ({}, lambda s: s["none"]),
    ({"largest_component": True}, lambda s: s["largest_component"]),
  ]
  picks += [
    ({"min_volume_mm3": t}, lambda s, t=t: s["min_volume_mm3"][str(t)]) for t in MIN_VOLUMES_MM3
  ]
  return [(rule, float(np.mean([pick(s) for s in of_class]))) for rule, pick in picks]


def choose_rules(cases: Mapping[str, Sequence[tuple]], num_classes: int) -> tuple[dict, dict]:
  """`decide` on labels in memory.

  Args:
    cases: {modality: [(truth, prediction, spacing) per validation case]}.
    num_classes: classes including background.

  Returns:
    `decide`'s (rules, numbers).
  """
  return decide(
    {m: [candidate_scores(t, p, s, num_classes) for t, p, s in of] for m, of in cases.items()}
  )


def describe(rules: Mapping, class_names: Sequence[str] | None = None) -> str:
  """A rules dict on one line, e.g. 'ct: MYO largest component, LVC >= 100 mm^3; mr: none'.

  Args:
    rules: {modality: {class index: rule}}.
    class_names: names by class index; without them classes read 'class <index>'.

  Returns:
    The line.
  """

  def one(key, rule):
    parts = [class_names[int(key)] if class_names else f"class {key}"]
    parts += ["largest component"] if rule.get("largest_component") else []
    parts += [f">= {rule['min_volume_mm3']:g} mm^3"] if "min_volume_mm3" in rule else []
    return " ".join(parts)

  return "; ".join(
    f"{m}: " + (", ".join(one(key, rule) for key, rule in of.items()) or "none")
    for m, of in rules.items()
  )


# --- reading rules ----------------------------------------------------------------------------


def load_rules(workdirs: Sequence, choice: str) -> dict | None:
  """The rules a prediction applies, {modality: {class index: rule}}, or None for none.

  Args:
    workdirs: the work dirs predicting (a work dir, its checkpoints dir or a step dir each);
      several are an ensemble.
    choice: 'none'; 'auto': the one work dir's postprocessing.json where it has one (an
      ensemble's members chose theirs alone, so an ensemble applies none unless a file is
      named); else the path of a postprocessing.json.

  Returns:
    The file's 'rules', or None.
  """
  if choice == "none":
    return None
  if choice == "auto":
    if len(workdirs) != 1:
      # A warning, shown once: `ukd.cli` keeps warnings off the terminal unless --verbosity.
      warnings.warn(
        "ensemble: no work dir's post-processing is applied (--postprocess=<file> names one)",
        stacklevel=2,
      )
      return None
    from ukd.runtime import checkpoints  # here: reading rules needs no orbax otherwise

    path = checkpoints.resolve(workdirs[0], "best")[0] / FILE
    return _read_rules(path) if path.exists() else None
  if not choice:
    raise ConfigError("postprocess must be 'auto', 'none' or the path of a postprocessing.json")
  return _read_rules(files.path(choice))


def _read_rules(path) -> dict:
  """The 'rules' of a postprocessing.json; anything else is a one-line DataError naming it."""
  try:
    with files.Path(path).open() as f:
      record = json.load(f)
  except (OSError, ValueError) as exc:
    raise error(DataError, path, f"cannot read post-processing rules ({exc})") from None
  rules = record.get("rules") if isinstance(record, dict) else None
  problem = _rules_problem(rules)
  if problem:
    raise error(DataError, path, problem)
  return rules


def _rules_problem(rules) -> str | None:
  """What is wrong with a rules dict, or None."""
  if not isinstance(rules, dict):
    return "no 'rules': {modality: {class index: rule}} in it"
  for modality, of in rules.items():
    if not isinstance(of, dict):
      return f"rules.{modality} must map class indices to rules"
    for key, rule in of.items():
      where = f"rules.{modality}.{key}"
      if not (isinstance(key, str) and key.isdigit() and int(key) > 0):
        return f"{where}: class keys must be foreground class indices ('1', '2', ...)"
      if not isinstance(rule, dict) or not set(rule) <= set(_RULE_KEYS):
        return f"{where} must be a dict of {list(_RULE_KEYS)}"
      if not isinstance(rule.get("largest_component", False), bool):
        return f"{where}.largest_component must be true or false"
      volume = rule.get("min_volume_mm3", 0)
      if isinstance(volume, bool) or not isinstance(volume, (int, float)) or not volume >= 0:
        return f"{where}.min_volume_mm3 must be a number >= 0"
  return None
