"""Train / val / test splits of a dataset's cases, fixed for the life of a work dir.

`load_or_make_splits` makes (seeded) or reads `<workdir>/splits.json`; `cases_by_split`
lists a dataset's cases and hands them out by modality and split.  `adapter_for` and
`cases_for` do both from a config: the one way training, evaluation and the dataset check
(`ukd.data.check`) build a config's adapter and find its cases.

A patient's cases always share a split (and a fold): with `data.patient_pattern` a case id
names its patient (`patient_of`), else each case is its own patient, as in MM-WHS, BTCV and
CHAOS, which hold one volume per patient and modality.

Folds (`data.folds` = k > 1, nnU-Net style cross-validation): the test split is exactly the
k = 1 split's, whatever the fold, so every fold is tested on the same cases; the other cases
are dealt by patient into k folds, fold `data.fold` validating and the others training.  Each
fold trains in a work dir of its own (`launch/folds.sh`), whose splits.json records that
fold's train / val / test as any split.json does.
"""

from __future__ import annotations

import bisect
import json
import os
import random
import re

import numpy as np
from etils import epath

from ukd import files
from ukd.data import adapters
from ukd.errors import ConfigError, DataError, error

SPLIT_NAMES = ("train", "val", "test")


def _ids_by_modality(cases) -> dict[str, list[str]]:
  ids: dict[str, list[str]] = {}
  for case in cases:
    ids.setdefault(case.modality, []).append(case.id)
  for modality, names in ids.items():
    if len(set(names)) != len(names):
      raise DataError(f"cases: duplicate case ids in modality '{modality}'")
  if not ids:
    raise DataError("cases: the dataset has no cases")
  return {modality: sorted(names) for modality, names in ids.items()}


def _split_sizes(count: int, fractions) -> list[int]:
  """Largest-remainder rounding; with >= 3 cases no requested split is left empty."""
  exact = [count * f for f in fractions]
  sizes = [int(x) for x in exact]
  by_remainder = sorted(range(3), key=lambda i: exact[i] - sizes[i], reverse=True)
  for i in by_remainder[: count - sum(sizes)]:
    sizes[i] += 1
  if count >= 3:
    for i in range(3):
      if sizes[i] == 0 and fractions[i] > 0:
        sizes[sizes.index(max(sizes))] -= 1
        sizes[i] = 1
  return sizes


def patient_of(case_id: str, pattern: str = "") -> str:
  r"""The patient a case belongs to, by its id.

  Args:
    case_id: a case's id, as its adapter names it.
    pattern: `data.patient_pattern`, a regex matching whole ids whose group 1 is the
      patient (e.g. r'(patient\d+)_frame\d+'); '' makes each case its own patient.

  Returns:
    The patient's name; an id the pattern does not match is a DataError.
  """
  if not pattern:
    return case_id
  match = re.fullmatch(pattern, case_id)
  if match is None:
    raise DataError(f"case id {case_id!r} does not match config.data.patient_pattern={pattern!r}")
  return match.group(1)


def _make_splits(
  ids: dict[str, list[str]], seed: int, fractions, folds: int = 1, fold: int = 0, pattern=""
) -> dict:
  """Seeded shuffle of each modality's patients (string seeds keep it identical across
  processes), cut into train / val / test by case counts, each patient going where its first
  case falls; with `folds` > 1 train and val together are dealt into folds (`_deal`)."""
  splits = {}
  for modality, names in ids.items():
    members = {}
    for name in names:
      members.setdefault(patient_of(name, pattern), []).append(name)
    patients = sorted(members)
    random.Random(f"{seed}/{modality}").shuffle(patients)
    bounds = np.cumsum([0] + _split_sizes(len(names), fractions))
    parts, first = [[], [], []], 0
    for patient in patients:
      parts[bisect.bisect_right(bounds, first) - 1].append(patient)
      first += len(members[patient])
    if folds > 1:
      parts[:2] = _deal(parts[0] + parts[1], members, folds, fold, modality)
    splits[modality] = {
      split: sorted(name for patient in part for name in members[patient])
      for split, part in zip(SPLIT_NAMES, parts)
    }
  return splits


def _deal(patients, members, folds: int, fold: int, modality: str):
  """(train, val) patients of fold `fold`: the patients, the largest first (else in their
  shuffled order), each dealt to the fold with the fewest cases so far."""
  if len(patients) < folds:
    raise ConfigError(
      f"config.data.folds={folds}: {modality} has only {len(patients)} patients outside the "
      "test split"
    )
  dealt, counts = [[] for _ in range(folds)], [0] * folds
  for patient in sorted(patients, key=lambda p: -len(members[p])):
    emptiest = counts.index(min(counts))
    dealt[emptiest].append(patient)
    counts[emptiest] += len(members[patient])
  return [p for i, part in enumerate(dealt) if i != fold for p in part], dealt[fold]


def _load_splits(path, ids: dict[str, list[str]]) -> dict:
  """Read a split file and check it covers exactly the current cases, each once."""
  try:
    with epath.Path(path).open() as f:
      splits = json.load(f)
  except (OSError, ValueError) as exc:
    raise error(DataError, path, f"cannot read split file ({type(exc).__name__}: {exc})") from exc
  if not isinstance(splits, dict) or set(splits) != set(ids):
    names = sorted(splits) if isinstance(splits, dict) else type(splits).__name__
    raise error(
      DataError, path, f"split modalities {names} differ from the dataset's {sorted(ids)}"
    )
  result = {}
  for modality, parts in splits.items():
    if not isinstance(parts, dict) or set(parts) != set(SPLIT_NAMES):
      raise error(DataError, path, f"'{modality}' must have exactly the keys {list(SPLIT_NAMES)}")
    listed = [name for split in SPLIT_NAMES for name in parts[split]]
    unknown = sorted(set(listed) - set(ids[modality]))
    if unknown:
      raise error(DataError, path, f"{modality} case ids not in the dataset: {unknown}")
    if len(set(listed)) != len(listed):
      raise error(DataError, path, f"{modality} has case ids in more than one split")
    missing = sorted(set(ids[modality]) - set(listed))
    if missing:
      raise error(DataError, path, f"{modality} cases in no split: {missing}")
    result[modality] = {split: sorted(parts[split]) for split in SPLIT_NAMES}
  return result


def _saved_path(workdir) -> epath.Path:
  return epath.Path(workdir) / "splits.json"


def load_or_make_splits(
  workdir,
  cases,
  *,
  seed: int,
  fractions=(0.6, 0.2, 0.2),
  split_file=None,
  folds: int = 1,
  fold: int = 0,
  patient_pattern: str = "",
) -> dict:
  """{modality: {'train': ids, 'val': ids, 'test': ids}}, fixed for the life of a workdir.

  The split is saved as <workdir>/splits.json and reused, so a resumed or re-evaluated run
  can never test on cases it trained on. A user `split_file` is validated and copied
  there; it must agree with a split the workdir already holds.  With `folds` > 1 the split
  is fold `fold` of a cross-validation (the module docstring), and a work dir that holds
  another split (another fold's) is refused: each fold trains in a work dir of its own.
  """
  ids = _ids_by_modality(cases)
  fractions = tuple(float(f) for f in fractions)
  if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
    raise DataError(f"fractions={fractions}: need three non-negative numbers summing to 1")
  saved = _saved_path(workdir)
  if split_file is not None:
    splits = _load_splits(os.fspath(split_file), ids)
    if saved.exists() and _load_splits(saved, ids) != splits:
      raise error(DataError, saved, f"differs from split_file {split_file}; use a new workdir")
  elif saved.exists():
    splits = _load_splits(saved, ids)
    if folds > 1 and splits != _make_splits(ids, seed, fractions, folds, fold, patient_pattern):
      raise error(
        DataError,
        saved,
        f"is not fold {fold} of data.folds={folds}; train each fold in its own workdir",
      )
    return splits
  else:
    splits = _make_splits(ids, seed, fractions, folds, fold, patient_pattern)
  files.write_json(saved, splits, sort_keys=True)  # atomic: never half a split file
  return splits


def list_cases(adapter, root, modalities) -> list:
  """The dataset's cases of `modalities`; a listed modality without cases is a ConfigError
  (the dataset's other modalities are left out)."""
  listed = adapter.cases(root)
  found = {c.modality for c in listed}
  missing = [m for m in modalities if m not in found]
  if missing:
    raise ConfigError(
      f"config.modalities lists {missing} but {root} has no such cases (found {sorted(found)})"
    )
  return [c for c in listed if c.modality in modalities]


def _hand_out(listed, modalities, splits: dict, source) -> dict:
  """{modality: {split: [Case]}} for the ids of `splits`; an id the dataset lacks names
  `source`, the split that listed it."""
  by_id = {(c.modality, c.id): c for c in listed}
  out = {}
  for m in modalities:
    out[m] = {}
    for split, ids in splits[m].items():
      lost = [i for i in ids if (m, i) not in by_id]
      if lost:
        raise error(DataError, source, f"{m} {split} cases {lost} are no longer in the dataset")
      out[m][split] = [by_id[(m, i)] for i in ids]
  return out


def cases_by_split(adapter, root, modalities, workdir, **options) -> dict:
  """{modality: {split: [Case]}} for `modalities` of the dataset at `root`, by the work dir's
  split (`load_or_make_splits`, which takes `options`: seed, fractions, split_file, folds,
  fold, patient_pattern); each split's cases in the order of their ids.

  A listed modality the dataset has no cases of is a ConfigError; the dataset's other
  modalities are left out of the split.
  """
  modalities = tuple(modalities)
  listed = list_cases(adapter, root, modalities)
  splits = load_or_make_splits(workdir, listed, **options)
  return _hand_out(listed, modalities, splits, _saved_path(workdir))


def cases_of_saved_split(adapter, root, modalities, saved: dict, source) -> dict:
  """{modality: {split: [Case]}} by a split saved elsewhere (a checkpoint's record, `source`):
  cases the dataset gained since are in no split, so a grown dataset evaluates on the same
  test cases; a case it lost is a DataError."""
  modalities = tuple(modalities)
  absent = [m for m in modalities if m not in saved]
  if absent:
    raise error(DataError, source, f"the saved split has no modalities {absent}")
  return _hand_out(list_cases(adapter, root, modalities), modalities, saved, source)


def adapter_for(config) -> adapters.Adapter:
  """The adapter `config.data.dataset` names, built with `config.data.options` and, where set,
  `config.data.structures` (an adapter that takes none refuses it in one line)."""
  options = config.data.options.to_dict()
  if config.data.get("structures", ""):
    options["structures"] = config.data.structures
  return adapters.get_adapter(config.data.dataset, **options)


def cases_for(config, adapter, root, workdir, *, saved=None, source=None) -> dict:
  """{modality: {split: [Case]}} of `config.modalities` at `root`: by `saved`, a split recorded
  elsewhere ({modality: {split: ids}}, a checkpoint's; `source` names it in errors), when
  given; else by the work dir's own split (`cases_by_split`: `config.seed`,
  `config.data.split_fractions`, `config.data.split_file`, `folds`, `fold`, `patient_pattern`)."""
  if saved:
    return cases_of_saved_split(adapter, root, config.modalities, saved, source)
  return cases_by_split(
    adapter,
    root,
    config.modalities,
    workdir,
    seed=config.seed,
    fractions=tuple(config.data.split_fractions),
    split_file=config.data.split_file or None,
    folds=int(config.data.folds),
    fold=int(config.data.fold),
    patient_pattern=config.data.patient_pattern,
  )
