"""Every case of a dataset read once before anything trains on it.

A broken validation or test case (a truncated download, a label on another grid, a stray
label code, a header in metres) would otherwise surface at the first validation, hours into
a run, or not until the final evaluation.  `check_cases` reads each case once through its
adapter, whose `read` refuses exactly those (`ukd.data.io.volumes`, `ukd.data.adapters`), and
collects every broken case rather than stopping at the first.  Training runs it on all
splits before preprocessing; `python -m ukd.main --mode=check --config=...` runs it alone
and prints what it found per modality: cases, spacing and shape ranges, and the classes
(with the dataset's label codes) that occur.
"""

import concurrent.futures

import numpy as np

from ukd.data import splits
from ukd.errors import DataError, error


def _inspect(adapter, case) -> dict | str:
  """What one case holds, or the one-line problem that makes it unusable."""
  try:
    image, label = adapter.read(case)
    if label is None:
      raise error(DataError, case.image, "has no label; training and evaluation need one")
    if label.array.shape != image.array.shape:
      raise error(
        DataError, label.source, f"label shape {label.array.shape} != image {image.array.shape}"
      )
  except DataError as problem:
    return str(problem)
  return dict(
    shape=image.array.shape,
    spacing=image.spacing,
    classes=[int(k) for k in np.unique(label.array)],
  )


def check_cases(adapter, cases, workers: int = 2) -> dict:
  """Reads every case once; {modality: {'cases', 'shape', 'spacing', 'classes'}}.

  'shape' and 'spacing' are (min, max) per canonical axis, 'classes' counts the cases each
  class index occurs in.  Broken cases raise one DataError: the first one's problem (it names
  the file) and the ids of the others.
  """
  cases = list(cases)
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    found = list(pool.map(lambda case: _inspect(adapter, case), cases))
  broken = [(case, f) for case, f in zip(cases, found) if isinstance(f, str)]
  if broken:
    others = [f"{case.modality}/{case.id}" for case, _ in broken[1:]]
    more = f" ({len(others)} more broken cases: {', '.join(others)})" if others else ""
    raise DataError(broken[0][1] + more)
  report = {}
  for modality in dict.fromkeys(case.modality for case in cases):
    seen = [f for case, f in zip(cases, found) if case.modality == modality]
    ranges = {}
    for key in ("shape", "spacing"):
      values = np.array([s[key] for s in seen])
      ranges[key] = [(lo.item(), hi.item()) for lo, hi in zip(values.min(0), values.max(0))]
    counts = np.bincount(np.concatenate([s["classes"] for s in seen]))
    classes = {k: int(c) for k, c in enumerate(counts) if c}
    report[modality] = dict(cases=len(seen), **ranges, classes=classes)
  return report


def _ranges(pairs, digits=None) -> str:
  def show(v):
    return f"{v:.{digits}f}" if digits is not None else str(v)

  return " x ".join(show(lo) if lo == hi else f"{show(lo)}-{show(hi)}" for lo, hi in pairs)


def format_report(report, adapter) -> str:
  """Two lines per modality: cases, spacing and shape ranges; each class's name, label code
  and the number of cases it occurs in (classes that never occur say so)."""
  lines = []
  for modality, entry in report.items():
    n = entry["cases"]
    lines.append(
      f"{modality}: {n} cases, spacing {_ranges(entry['spacing'], 2)} mm, "
      f"shape {_ranges(entry['shape'])}"
    )
    codes = adapter.label_codes(modality)
    classes = [
      f"{name} ({code}) in {entry['classes'].get(k, 0)}/{n}"
      for k, (name, code) in enumerate(zip(adapter.classes, codes))
      if k > 0
    ]
    lines.append("  classes: " + ", ".join(classes))
  return "\n".join(lines)


def check_dataset(config, root) -> dict:
  """`--mode=check`: every case of the (checked) config's modalities at `root`, whatever its
  split; prints `format_report` and returns the report."""
  adapter = splits.adapter_for(config)
  report = check_cases(adapter, splits.list_cases(adapter, root, tuple(config.modalities)))
  print(f"{root}: every case read")
  print(format_report(report, adapter))
  return report
