"""Evaluation of a split: per-structure 3D Dice, ASSD and HD95 per volume, tables and pictures.

Metrics are computed on each volume's canonical grid with its own voxel spacing, so surface
distances are in millimetres whatever resolution the network worked at.  Each volume counts
once, and a table cell is the mean ± std over volumes, as in the paper.

Aggregation and empty structures (see `ukd.evaluation.metrics` for the per-volume rules):
  * per structure: `metrics.summarize` over the volumes; a NaN (a structure absent from
    exactly one of prediction and ground truth has no surface distance) is left out of mean
    and std and counted in 'n_empty';
  * 'mean': for each volume the mean over its structures, then summarized over volumes.  A
    volume with a NaN structure has a NaN mean, so it is counted in 'n_empty' rather than
    averaged over its remaining structures, which would hide the miss.

Label sets: a modality's references may hold only some classes (`Adapter.labelled`; BTCV CT
13 organs, CHAOS MR 4).  Predictions carry every class, but each modality is scored only on the
classes its references hold; the others are listed as not scored ('not_scored' in the result
and in metrics.json), never scored as misses.

Outputs of `evaluate_cases(..., out_dir=d)` (`evaluate` uses d = <workdir>/eval/<split>-step<N>):
  d/metrics.json   {'step': checkpoint step, 'split': split scored, 'metrics': m} with
                   m[modality][structure | 'mean'][dice | assd | hd95] =
                   {'mean', 'std', 'n', 'n_empty'}  (NaN written as null), and where a
                   modality leaves classes unscored, 'not_scored': {modality: structures}
  d/cases.csv      case, modality, class, dice, assd, hd95: one row per volume and structure
  d/overlays/<modality>/<case id>.png   image | ground truth | prediction on three slices
                   (per modality: case ids are only unique within one)
With post-processing rules (`ukd.evaluation.postprocess`; `evaluate` takes the work dir's by default) each
prediction is also scored post-processed, without predicting again: metrics.json then holds
'postprocessed': {'rules', 'metrics': m of the post-processed labels} as well, and
d/cases_postprocessed.csv their rows.
"""

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from PIL import Image

from ukd import files
from ukd.data.adapters import Adapter, Case
from ukd.errors import DataError
from ukd.evaluation import metrics, tables
from ukd.evaluation import postprocess as postprocess_lib
from ukd.evaluation.metrics import METRICS

# Distinct colours for classes 1, 2, ... (cycled when there are more classes).
PALETTE = np.array(
  [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
  ],
  np.float32,
)
OVERLAY_ALPHA = 0.5
OVERLAY_SLICES = 3
# Panels smaller than this (in pixels) are enlarged by whole factors, so tiny volumes stay visible.
OVERLAY_MIN_SIZE = 128

# One volume's scores of one structure: {'case', 'modality', 'class', 'dice', 'assd', 'hd95'}.
Row = dict[str, Any]
# {modality: {structure | 'mean': {metric: metrics.summarize(...)}}}
Summary = dict[str, dict[str, dict[str, dict[str, float]]]]


# --- per-case metrics and their summary --------------------------------------------------------


def _case_rows(case, scores) -> list[dict]:
  return [
    dict(case=case.id, modality=case.modality, **{"class": name}, **values)
    for name, values in scores.items()
  ]


def summarize_rows(
  rows: Sequence[Mapping[str, Any]],
  class_names: Sequence[str],
  metric_names: Sequence[str] = METRICS,
) -> Summary:
  """Each structure's and the case means' scores summarized over the volumes, per modality.

  Args:
    rows: one per volume and structure (`Row`).
    class_names: as the adapters give them, background first; background is not scored.
    metric_names: the metrics the rows hold.

  Returns:
    {modality: {structure | 'mean': {metric: metrics.summarize(...)}}}, with the structures
    the modality's rows score (`scored_classes`).
  """
  summary = {}
  for modality in dict.fromkeys(r["modality"] for r in rows):
    mine = [r for r in rows if r["modality"] == modality]
    table = {}
    for name in [n for n in class_names[1:] if any(r["class"] == n for r in mine)]:
      of_class = [r for r in mine if r["class"] == name]
      table[name] = {k: metrics.summarize(r[k] for r in of_class) for k in metric_names}
    table["mean"] = {k: metrics.summarize(case_means(mine, k).values()) for k in metric_names}
    summary[modality] = table
  return summary


def case_means(rows: Iterable[Mapping[str, Any]], metric: str) -> dict[str, float]:
  """{case: mean over structures} of rows of one modality; NaN when any structure is NaN (see
  the module docstring)."""
  by_case = {}
  for r in rows:
    by_case.setdefault(r["case"], []).append(r[metric])
  return {case: float(np.mean(values)) for case, values in by_case.items()}


def scored_classes(adapter: Adapter, modality: str, label_sets=None) -> tuple[str, ...]:
  """The foreground classes evaluation scores in `modality`: those its references hold
  (`adapter.labelled`), and with `label_sets` (a run's resolved `data.label_sets`, for the
  splits whose references hold what training was told: validation) only those of them."""
  held = set(adapter.labelled(modality))
  told = (label_sets or {}).get(modality)
  if told is not None:
    held &= {adapter.classes[k] for k in told}
  return tuple(name for name in adapter.classes[1:] if name in held)


def not_scored(adapter: Adapter, modalities: Iterable[str], label_sets=None) -> dict:
  """{modality: the foreground classes it does not score} of the modalities missing some."""
  missing = {}
  for modality in modalities:
    scored = scored_classes(adapter, modality, label_sets)
    names = [name for name in adapter.classes[1:] if name not in scored]
    if names:
      missing[modality] = names
  return missing


# --- pictures ---------------------------------------------------------------------------------


def _slices_to_show(label, pred, axis: int) -> list[int]:
  """One slice from each third of the slices holding foreground (ground truth, else prediction),
  the one with the most foreground in its third: spread over the structure, not three
  neighbours."""
  other = tuple(a for a in range(3) if a != axis)
  counts = (label > 0).sum(axis=other)
  if not counts.any():
    counts = (pred > 0).sum(axis=other)
  candidates = np.flatnonzero(counts) if counts.any() else np.arange(label.shape[axis])
  parts = np.array_split(candidates, min(OVERLAY_SLICES, len(candidates)))
  return [int(part[np.argmax(counts[part])]) for part in parts]


def _grey(image) -> np.ndarray:
  """Intensities to 0..255 between the 1st and 99th percentile of the whole volume."""
  lo, hi = np.percentile(image, (1, 99))
  return np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1) * 255.0


def _display(plane) -> np.ndarray:
  """Transposed and flipped so the second remaining canonical axis points up: anterior at the
  top for axial slices, superior at the top for coronal and sagittal ones."""
  return np.flipud(np.asarray(plane).T)


def _paint(grey, labels) -> np.ndarray:
  rgb = np.repeat(grey[..., None], 3, axis=-1)
  mask = labels > 0
  colours = PALETTE[(labels[mask] - 1) % len(PALETTE)]
  rgb[mask] = (1 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * colours
  return rgb


def overlay_image(
  image: np.ndarray, label: np.ndarray, pred: np.ndarray, axis: int = 2
) -> np.ndarray:
  """Rows of image | ground truth overlay | prediction overlay for a few slices.

  Args:
    image: a canonical 3D volume.
    label: the ground truth class indices, of the image's shape.
    pred: the predicted class indices, of the image's shape.
    axis: the slice axis.

  Returns:
    A uint8 [H, W, 3] picture.
  """
  grey = _grey(np.asarray(image, np.float32))
  rows = []
  for k in _slices_to_show(label, pred, axis):
    take = lambda a, k=k: _display(np.take(a, k, axis=axis))
    g = take(grey)
    panels = [np.repeat(g[..., None], 3, axis=-1), _paint(g, take(label)), _paint(g, take(pred))]
    gap = np.zeros((g.shape[0], 2, 3), np.float32)
    rows.append(np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1))
  gap = np.zeros((2, rows[0].shape[1], 3), np.float32)
  picture = np.concatenate([part for r in rows for part in (r, gap)][:-1], axis=0)
  factor = max(1, -(-OVERLAY_MIN_SIZE // min(grey.shape[a] for a in range(3) if a != axis)))
  picture = picture.repeat(factor, axis=0).repeat(factor, axis=1)
  return np.round(picture).astype(np.uint8)


# --- evaluation -------------------------------------------------------------------------------


def evaluate_cases(
  seg,
  adapter: Adapter,
  cases: Sequence[Case],
  *,
  out_dir: str | os.PathLike | None = None,
  overlays: int | None = None,
  metric_names: Sequence[str] = METRICS,
  split: str | None = None,
  rules: Mapping | None = None,
  label_sets: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
  """Predicts and scores every case, each on the classes its modality scores
  (`scored_classes`).

  Predictions see the image only, as prediction does (`Segmenter.predict_volume`); the
  label is read for scoring and pictures.

  Args:
    seg: the predictor: `predict_volume(image, modality)`, `config` and `step` (a live
      `Segmenter` or an exported model; evaluation never loads one itself).
    adapter: the dataset's adapter, which reads the cases.
    cases: the labelled cases to score.
    out_dir: where to write the files listed in the module docstring (metrics.json naming
      `seg.step` and `split`); None writes nothing.
    overlays: overlay pictures of every case (None) or of the first `overlays` cases of
      each modality, drawn by process 0, which writes them.
    metric_names: the scores of each row (Dice alone spares the surface distances:
      training validates so).
    split: the split the cases come from, recorded in metrics.json.
    rules: post-processing rules by modality (`ukd.evaluation.postprocess.load_rules`): each prediction
      is also scored post-processed (`seg` should apply none itself).
    label_sets: the run's resolved `data.label_sets` where the cases' references hold what
      training was told (validation); None: what the dataset says they hold.

  Returns:
    {'cases': one row per case and structure, 'summary': `summarize_rows`' result,
    'overlays': '<modality>/<case id>' -> overlay picture, 'not_scored': `not_scored`' result};
    with `rules` also 'postprocessed': {'rules', 'cases', 'summary'} of the post-processed
    labels.
  """
  rows, fixed_rows, pictures = [], [], {}
  modalities = list(dict.fromkeys(c.modality for c in cases))
  scored = {m: scored_classes(adapter, m, label_sets) for m in modalities}
  drawn = dict.fromkeys((c.modality for c in cases), 0)  # pictures per modality so far
  # Several processes share out the cases (each on its own devices) and gather the scores;
  # process 0 writes the files.
  mine = cases[jax.process_index() :: jax.process_count()]
  for i, case in enumerate(mine):
    image, label = adapter.read(case)
    if label is None:
      raise DataError(f"case {case.id}: no label to evaluate against ({case.image})")
    pred, _ = seg.predict_volume(image, case.modality)
    scores = metrics.structure_scores(
      pred, label.array, image.spacing, adapter.classes, metric_names, scored[case.modality]
    )
    rows += _case_rows(case, scores)
    logging.info(
      "[%d/%d] %s %s: %s %s",
      i + 1,
      len(mine),
      case.modality,
      case.id,
      metric_names[0],
      " ".join(f"{name}={s[metric_names[0]]:.3f}" for name, s in scores.items()),
    )
    if rules is not None:  # the same prediction post-processed: no second prediction
      rule = rules.get(case.modality)
      fixed = postprocess_lib.apply(pred, rule, image.spacing) if rule else pred
      fixed_scores = scores
      if rule:
        fixed_scores = metrics.structure_scores(
          fixed, label.array, image.spacing, adapter.classes, metric_names, scored[case.modality]
        )
      fixed_rows += _case_rows(case, fixed_scores)
    wanted = overlays is None or drawn[case.modality] < overlays
    if wanted and jax.process_index() == 0:
      drawn[case.modality] += 1
      pictures[f"{case.modality}/{case.id}"] = overlay_image(
        image.array, label.array, pred, seg.config.data.slice_axis
      )
  order = {(c.modality, c.id): i for i, c in enumerate(cases)}
  by_case = lambda r: order[(r["modality"], r["case"])]
  rows = sorted(gather_rows(rows), key=by_case)
  summary = summarize_rows(rows, adapter.classes, metric_names)
  missing = not_scored(adapter, modalities, label_sets)
  result = {"cases": rows, "summary": summary, "overlays": pictures, "not_scored": missing}
  fixed = None
  if rules is not None:
    fixed_rows = sorted(gather_rows(fixed_rows), key=by_case)
    fixed_summary = summarize_rows(fixed_rows, adapter.classes, metric_names)
    result["postprocessed"] = fixed = dict(rules=rules, cases=fixed_rows, summary=fixed_summary)
  if out_dir is not None and jax.process_index() == 0:
    write_results(
      out_dir,
      rows,
      summary,
      pictures,
      step=seg.step,
      split=split,
      postprocessed=fixed,
      not_scored=missing,
    )
  return result


def gather_rows(rows: list[Row]) -> list[Row]:
  """Every process's rows, on every process (one process: `rows` itself). Rows travel as
  JSON bytes through `process_allgather`, padded to the longest."""
  if jax.process_count() == 1:
    return rows
  data = np.frombuffer(json.dumps(rows).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([data.size], np.int64)).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[: data.size] = data
  everyone = multihost_utils.process_allgather(padded)
  return [r for part, n in zip(everyone, lengths) for r in json.loads(bytes(part[: int(n)]))]


def _json_safe(value):
  """NaN -> None, so metrics.json is standard JSON that every reader accepts."""
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, float) and math.isnan(value):
    return None
  return value


def write_results(
  out_dir: str | os.PathLike,
  rows: Sequence[Row],
  summary: Summary,
  pictures: Mapping[str, np.ndarray],
  *,
  step: int | None = None,
  split: str | None = None,
  postprocessed: Mapping[str, Any] | None = None,
  not_scored: Mapping[str, Sequence[str]] | None = None,
) -> None:
  """The files of the module docstring, each written atomically (`ukd.files`).

  Args:
    out_dir: the folder, local or on cloud storage.
    rows: one per volume and structure, for cases.csv.
    summary: `summarize_rows`' result, for metrics.json.
    pictures: '<modality>/<case id>' -> overlay picture.
    step: the checkpoint scored, recorded in metrics.json.
    split: the split scored, recorded in metrics.json.
    postprocessed: {'rules', 'cases', 'summary'} of the post-processed labels, or None.
    not_scored: {modality: structures its references do not hold}, recorded as such.
  """
  out_dir = epath.Path(out_dir)
  record = {"step": step, "split": split, "metrics": _json_safe(summary)}
  if not_scored:
    record["not_scored"] = dict(not_scored)
  columns = ("case", "modality", "class", *METRICS)
  if postprocessed is not None:
    fixed = _json_safe(postprocessed["summary"])
    record["postprocessed"] = {"rules": postprocessed["rules"], "metrics": fixed}
    files.write_csv(out_dir / "cases_postprocessed.csv", columns, postprocessed["cases"])
  files.write_json(out_dir / "metrics.json", record, allow_nan=False)
  files.write_csv(out_dir / "cases.csv", columns, rows)
  for name, picture in pictures.items():
    with files.replacing(out_dir / "overlays" / f"{name}.png") as tmp:
      Image.fromarray(picture).save(tmp, format="PNG")


def format_table(summary: Summary, class_names: Sequence[str], hd95: bool = False) -> str:
  """A Markdown table laid out like the paper's: a row per structure and the mean, Dice (%) and
  ASSD (mm) columns per modality (`tables`).

  Args:
    summary: `summarize_rows`' result.
    class_names: as the adapters give them, background first.
    hd95: also an HD95 (mm) column per modality, which the paper leaves out but a score of
      someone's predictions (`ukd.evaluation.score`) is often compared by.

  Returns:
    The table, without a final newline.
  """
  modalities = list(summary)
  columns = [("dice", "Dice (%)", 100.0, 1), ("assd", "ASSD (mm)", 1.0, 2)]
  if hd95:
    columns.append(("hd95", "HD95 (mm)", 1.0, 2))
  header = ["Structure"] + [
    f"{m.upper()} {title}" for m in modalities for _, title, _, _ in columns
  ]
  body = []
  for name in [*class_names[1:], "mean"]:
    cells = [name if name != "mean" else "Mean"]
    for m in modalities:
      stats = summary[m].get(name)
      if stats is None:
        cells += [""] * len(columns)
      else:
        cells += [tables.mean_std(stats[key], scale, digits) for key, _, scale, digits in columns]
    body.append(cells)
  return tables.markdown(header, body)


def output_dir(
  workdir: str | os.PathLike, split: str, step: int | str, tta: bool = False, root=None
) -> str:
  """`<workdir>/eval/<split>-step<N>` (`-tta` with test-time augmentation; `step-ct600-mr400`
  for separate networks chosen at their own steps): every evaluation keeps its own folder, so
  scoring another checkpoint, split or way of predicting never mixes its files with an
  earlier one's.  `root` (`--output`, e.g. for a read-only work dir) stands for `eval/`."""
  step = str(step) if str(step).isdigit() else f"-{step}"
  name = f"{split}-step{step}" + ("-tta" if tta else "")
  return os.fspath(epath.Path(root or epath.Path(workdir) / "eval") / name)
