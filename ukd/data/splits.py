"""Train / val / test splits of a dataset's cases, fixed for the life of a work dir.

`load_or_make_splits` makes (seeded) or reads `<workdir>/splits.json`; `cases_by_split`
lists a dataset's cases and hands them out by modality and split.  `adapter_for` and
`cases_for` do both from a config: the one way training, evaluation and the dataset check
(`ukd.check`) build a config's adapter and find its cases.
"""

from __future__ import annotations

import json
import os
import random

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


def _make_splits(ids: dict[str, list[str]], seed: int, fractions) -> dict:
  """Seeded shuffle per modality; string seeds keep it identical across processes."""
  splits = {}
  for modality, names in ids.items():
    order = list(names)
    random.Random(f"{seed}/{modality}").shuffle(order)
    sizes = _split_sizes(len(order), fractions)
    bounds = np.cumsum([0] + sizes)
    splits[modality] = {
      split: sorted(order[bounds[i] : bounds[i + 1]]) for i, split in enumerate(SPLIT_NAMES)
    }
  return splits


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
  workdir, cases, *, seed: int, fractions=(0.6, 0.2, 0.2), split_file=None
) -> dict:
  """{modality: {'train': ids, 'val': ids, 'test': ids}}, fixed for the life of a workdir.

  The split is saved as <workdir>/splits.json and reused, so a resumed or re-evaluated run
  can never test on cases it trained on. A user `split_file` is validated and copied
  there; it must agree with a split the workdir already holds.
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
    return _load_splits(saved, ids)
  else:
    splits = _make_splits(ids, seed, fractions)
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


def cases_by_split(
  adapter, root, modalities, workdir, *, seed: int, fractions=(0.6, 0.2, 0.2), split_file=None
) -> dict:
  """{modality: {split: [Case]}} for `modalities` of the dataset at `root`, by the work dir's
  split (`load_or_make_splits`); each split's cases in the order of their ids.

  A listed modality the dataset has no cases of is a ConfigError; the dataset's other
  modalities are left out of the split.
  """
  modalities = tuple(modalities)
  listed = list_cases(adapter, root, modalities)
  splits = load_or_make_splits(
    workdir, listed, seed=seed, fractions=fractions, split_file=split_file
  )
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
  """The adapter `config.data.dataset` names, built with `config.data.options`."""
  return adapters.get_adapter(config.data.dataset, **config.data.options.to_dict())


def cases_for(config, adapter, root, workdir, *, saved=None, source=None) -> dict:
  """{modality: {split: [Case]}} of `config.modalities` at `root`: by `saved`, a split recorded
  elsewhere ({modality: {split: ids}}, a checkpoint's; `source` names it in errors), when
  given; else by the work dir's own split (`cases_by_split`: `config.seed`,
  `config.data.split_fractions`, `config.data.split_file`)."""
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
  )
