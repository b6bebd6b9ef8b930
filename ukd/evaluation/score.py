"""Scoring a folder of predictions against a folder of references (`--mode=score`), as
nnU-Net's `evaluate_folder` does: no checkpoint needed, so predictions of any model, ukd's or
another, get the numbers and reports an evaluation gives (`ukd.evaluation.evaluate`).

Pairing, by case name: a file's name without `.nii`, `.nii.gz` or `.dcm` and without one
trailing `_label`, `_image` or `_0000`.
  * predictions: the NIfTI and DICOM-SEG (`.dcm`) files of the predictions folder, except
    probability and entropy maps (`_probabilities`, `_entropy`); `--mode=predict`'s JSON
    sidecars are not label maps either;
  * references: the NIfTI files of the references folder and of its `labelsTr/`, except
    images (`_image`, `_0000`): MM-WHS keeps images beside the labels, nnU-Net above them.
  So a prediction `X.nii.gz` pairs with `X.nii.gz`, `X_label.nii.gz` or `labelsTr/X.nii.gz`;
  two files of one side with the same case name are an error, except a case predicted both
  as NIfTI and as DICOM-SEG (`--output_format=nifti,dicom_seg`): its NIfTI is scored.
  * A prediction without a reference is an error: it cannot be scored.  A reference without a
    prediction is an error too, as in nnU-Net: a case whose prediction failed would otherwise
    drop out of the average unnoticed.  `allow_missing=True` (nnU-Net's --chill) scores the
    predictions there are, e.g. a test split's against all of a dataset's labels, and logs
    the references left out.

Label codes: both files hold the dataset's own codes (what `--mode=predict` writes), mapped to
classes by the dataset's table (`Adapter.code_table`, `DATASETS`): `mmwhs` (205 MYO, 420 LAC,
500 LVC, 820 AA; its other structures are background), `btcv` (BTCV CT codes), `chaos` (CHAOS
MR grey values), `abdominal` (either, by the modality) and `folder` (class indices, named by an
nnU-Net `dataset.json`; also for predictions written with `--label_codes=index`).  A code the
table does not know is an error naming the file.

Grids: a prediction must lie on its reference's grid, the same voxels in the same place:
shapes and affines are compared after both are made canonical (a file stored with flipped or
permuted axes still matches), affines within `volumes.AFFINE_TOLERANCE`.  Anything else is an
error, never a resample: a resampled label is not the one the model made.  Metrics are those of
`ukd.evaluation.metrics` on the canonical arrays, distances in mm with the reference's voxel spacing.

DICOM-SEG predictions: a SEG holds frames of its source series, not a grid of its own, so
`dicom_reference` names a folder (or .zip) holding the source series, in any layout
(`dicom_series.find_series`).  Each SEG is read onto the series it references
(ReferencedSeriesSequence), each segment becoming the class its label names
(`dicom_seg.read_seg`), and that series' grid must be the NIfTI reference's.

Outputs, written by `evaluate.write_results`, so a score reads like an evaluation:
  out/metrics.json  {'step': None, 'split': None, 'metrics': m}, the record evaluation writes
                    (no checkpoint, no split; nnU-Net names its file summary.json, ukd keeps
                    one name and one format for both)
  out/cases.csv     case, modality, class, dice, assd, hd95: one row per case and structure
The table of `evaluate.format_table` is printed, with HD95 beside Dice and ASSD. An `out` that
already holds files is refused unless `overwrite`; one that cannot be written (read-only,
full) is refused before any file is read.
"""

import dataclasses
import os
import re
from collections.abc import Mapping

import numpy as np
from absl import logging
from etils import epath

from ukd import files
from ukd.data.adapters import get_adapter, map_labels
from ukd.data.adapters.base import require_dir, visible
from ukd.data.adapters.folder import read_dataset_json
from ukd.data.io import dicom_seg, dicom_series, volumes
from ukd.data.io.dicom import import_pydicom
from ukd.errors import ConfigError, DataError, error
from ukd.evaluation import evaluate, metrics

# --dataset -> (adapter, the modality its codes belong to; None: --modality chooses).
DATASETS = {
  "mmwhs": ("mmwhs", None),
  "btcv": ("abdominal", "ct"),
  "chaos": ("abdominal", "mr"),
  "abdominal": ("abdominal", None),
  "folder": ("folder", None),
}

_EXTENSION = re.compile(r"\.(nii|nii\.gz|dcm)$", re.IGNORECASE)
_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_SEG = re.compile(r"\.dcm$", re.IGNORECASE)
_ROLE = re.compile(r"_(label|image|0000)$")
# Stems of files in the folders that are no label maps.
_NOT_PREDICTIONS = re.compile(r"_(probabilities|entropy)$")
_NOT_REFERENCES = re.compile(r"_(probabilities|entropy|image|0000)$")
_LISTED = 5  # names an error lists before '... and N more'


@dataclasses.dataclass(frozen=True)
class LabelTable:
  """How one dataset's files encode its classes."""

  name: str  # how messages name it, e.g. 'mmwhs ct'
  classes: tuple[str, ...]  # background first
  codes: Mapping[int, int]  # code in a file -> class index


@dataclasses.dataclass(frozen=True)
class Pair:
  """A case's prediction (NIfTI or DICOM-SEG) and reference (NIfTI) files."""

  case: str
  prediction: str
  reference: str


def label_table(dataset: str, modality: str | None = None, classes=None) -> tuple[LabelTable, str]:
  """(the label table, the modality) of a `--dataset` (`DATASETS`).

  Args:
    dataset: a key of `DATASETS`.
    modality: labels the scores; `btcv` and `chaos` imply theirs, the others need it.
    classes: for `folder` only: the nnU-Net dataset.json naming the classes.
  """
  if dataset not in DATASETS:
    raise ConfigError(f"--dataset={dataset!r} must be one of {sorted(DATASETS)}")
  adapter_name, implied = DATASETS[dataset]
  if implied and modality not in (None, implied):
    raise ConfigError(f"--dataset={dataset} holds {implied} labels, not --modality={modality}")
  modality = modality or implied
  if not modality:
    raise ConfigError(f"--modality is required for --dataset={dataset}: it labels the scores")
  if adapter_name == "folder":
    if not classes:
      raise ConfigError(
        "--classes is required for --dataset=folder: the dataset.json of its classes"
      )
    names, _ = read_dataset_json(os.fspath(classes))
    return LabelTable(f"{classes}", names, {i: i for i in range(len(names))}), modality
  if classes:
    raise ConfigError(f"--classes is for --dataset=folder; {dataset} names its own classes")
  adapter = get_adapter(adapter_name)
  if modality not in adapter.modalities:
    raise ConfigError(f"--modality={modality!r}: {dataset} has {list(adapter.modalities)}")
  table = adapter.code_table(modality)
  return LabelTable(f"{dataset} {modality}", tuple(adapter.classes), table), modality


def case_name(file_name: str) -> str:
  """`X.nii.gz`, `X_label.nii.gz`, `X_0000.nii`, `X.dcm` -> `X` (the module docstring)."""
  return _ROLE.sub("", _EXTENSION.sub("", file_name))


def _some(names) -> str:
  """The first few of `names`, and how many more."""
  names = list(names)
  shown = ", ".join(names[:_LISTED])
  return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def _by_case(folders, extension, skip) -> dict[str, str]:
  """{case name: path} of the files in `folders` with an `extension` and a stem that `skip`
  does not match."""
  found = {}
  for folder in folders:
    for name in visible(folder):
      stem = extension.sub("", name)
      if stem == name or skip.search(stem):
        continue
      path = os.path.join(folder, name)
      case = case_name(name)
      if case in found:
        raise error(DataError, path, f"same case '{case}' as {found[case]}")
      found[case] = path
  return found


def pair_files(predictions, references, *, allow_missing: bool = False) -> list[Pair]:
  """The (prediction, reference) pairs of two folders, by case name, sorted; unpaired files
  as the module docstring says."""
  predictions, references = os.fspath(predictions), os.fspath(references)
  require_dir(predictions, "predictions folder")
  require_dir(references, "references folder")
  nnunet_labels = os.path.join(references, "labelsTr")
  label_dirs = [references] + ([nnunet_labels] if files.path(nnunet_labels).is_dir() else [])
  # `--output_format=nifti,dicom_seg` writes a case twice: the NIfTI is scored, the same labels.
  predicted = {
    **_by_case([predictions], _SEG, _NOT_PREDICTIONS),
    **_by_case([predictions], _NIFTI, _NOT_PREDICTIONS),
  }
  truth = _by_case(label_dirs, _NIFTI, _NOT_REFERENCES)
  if not predicted:
    raise error(DataError, predictions, "no predictions (.nii, .nii.gz or .dcm files) found")
  orphans = sorted(set(predicted) - set(truth))
  if orphans:
    raise error(
      DataError,
      predictions,
      f"{len(orphans)} prediction(s) without a reference in {references}: {_some(orphans)}",
    )
  missing = sorted(set(truth) - set(predicted))
  if missing and not allow_missing:
    raise error(
      DataError,
      references,
      f"{len(missing)} reference(s) without a prediction in {predictions}: {_some(missing)}; "
      "--allow_missing scores the predictions alone",
    )
  if missing:
    logging.warning(
      "%d reference(s) without a prediction left out: %s", len(missing), _some(missing)
    )
  return [Pair(case, predicted[case], truth[case]) for case in sorted(predicted)]


def to_classes(label: volumes.Volume, table: LabelTable) -> np.ndarray:
  """A label map's codes as class indices; a code `table` lacks is an error naming the file."""
  unknown = set()

  def lookup(code):
    index = table.codes.get(code)
    if index is None:
      unknown.add(code)
    return index

  mapped = map_labels(label, lookup, ignore_unknown=True)
  if unknown:
    raise error(
      DataError, label.source, f"label codes {sorted(unknown)} are not codes of {table.name}"
    )
  return mapped.array


def check_grid(prediction: volumes.Volume, reference: volumes.Volume, source: str) -> None:
  """A one-line DataError naming `source` unless `prediction` lies on `reference`'s grid."""
  shape, affine = prediction.array.shape, prediction.canonical_affine()
  ref_shape, ref_affine = reference.array.shape, reference.canonical_affine()
  if shape != ref_shape:
    problem = f"shape {prediction.original_shape} differs from {reference.original_shape}"
  elif not np.allclose(affine, ref_affine, rtol=0, atol=volumes.AFFINE_TOLERANCE):
    problem = (
      f"affine {np.round(prediction.affine, 4).tolist()} differs from "
      f"{np.round(reference.affine, 4).tolist()}"
    )
  else:
    return
  raise error(
    DataError,
    source,
    f"{problem} of the reference {reference.source} (predictions are not resampled)",
  )


def _is_seg(path: str) -> bool:
  return bool(_SEG.search(path))


def _source_series(folder) -> dict[str, dicom_series.Series]:
  """{SeriesInstanceUID: series} of the DICOM series under `folder`."""
  return {s.series_uid: s for s in dicom_series.find_series(folder) if s.problem is None}


def _read_seg(path: str, series: Mapping, table: LabelTable):
  """(the grid of its source series, class indices) of a DICOM-SEG prediction."""
  pydicom = import_pydicom()
  try:
    with files.local_file(path) as local:
      header = pydicom.dcmread(local, stop_before_pixels=True)
  except Exception as exc:  # pydicom raises many types for broken files
    raise error(DataError, path, f"cannot read DICOM ({type(exc).__name__}: {exc})") from exc
  named = [str(item.SeriesInstanceUID) for item in header.get("ReferencedSeriesSequence", [])]
  found = [series[uid] for uid in named if uid in series]
  if not found:
    raise error(DataError, path, f"its source series {named} is not under --dicom_reference")
  image = dicom_series.read_series(found[0])
  return image.volume, dicom_seg.read_seg(path, image, table.classes)


def score(
  predictions,
  references,
  out_dir,
  *,
  dataset: str,
  modality: str | None = None,
  classes=None,
  dicom_reference=None,
  allow_missing: bool = False,
  overwrite: bool = False,
) -> dict:
  """Scores the predictions in a folder against the references in another, writes the
  outputs of the module docstring into `out_dir` and prints the table.

  Args:
    predictions: the folder of predicted label maps (NIfTI, or DICOM-SEG `.dcm`).
    references: the folder of reference label maps (NIfTI), or an nnU-Net dataset folder.
    out_dir: where metrics.json and cases.csv go, local or on cloud storage.
    dataset: a key of `DATASETS`: how the files' label codes map to classes.
    modality: labels the scores (`label_table`).
    classes: `folder`'s dataset.json.
    dicom_reference: the folder (or .zip) of the DICOM-SEG predictions' source series.
    allow_missing: score the predictions there are, leaving out references without one.
    overwrite: write into an `out_dir` that already holds files (as predict, it is refused
      otherwise: an earlier score's files would be replaced without a word).

  Returns:
    {'cases': one row per case and structure, 'summary': `evaluate.summarize_rows`' result,
    'dir': `out_dir`}.
  """
  if not overwrite and epath.Path(out_dir).is_dir() and any(epath.Path(out_dir).iterdir()):
    raise error(ConfigError, out_dir, "already holds files; pass --overwrite to replace them")
  files.check_writable(files.path(out_dir))  # before minutes of reading and scoring
  table, modality = label_table(dataset, modality, classes)
  pairs = pair_files(predictions, references, allow_missing=allow_missing)
  segs = [p.prediction for p in pairs if _is_seg(p.prediction)]
  if segs and not dicom_reference:
    raise error(ConfigError, segs[0], "a DICOM-SEG needs --dicom_reference, its source series")
  series = _source_series(dicom_reference) if segs else {}
  rows = []
  for i, pair in enumerate(pairs):
    reference = volumes.read_label(pair.reference)
    if _is_seg(pair.prediction):
      grid, predicted = _read_seg(pair.prediction, series, table)
      check_grid(grid, reference, pair.prediction)
    else:
      label = volumes.read_label(pair.prediction)
      check_grid(label, reference, pair.prediction)
      predicted = to_classes(label, table)
    scores = metrics.structure_scores(
      predicted, to_classes(reference, table), reference.spacing, table.classes
    )
    rows += [
      dict(case=pair.case, modality=modality, **{"class": name}, **values)
      for name, values in scores.items()
    ]
    dice = " ".join(f"{name}={s['dice']:.3f}" for name, s in scores.items())
    logging.info("[%d/%d] %s: dice %s", i + 1, len(pairs), pair.case, dice)
  summary = evaluate.summarize_rows(rows, table.classes)
  evaluate.write_results(out_dir, rows, summary, {})
  print(f"{len(pairs)} {modality} case(s): {predictions} against {references} -> {out_dir}")
  print(evaluate.format_table(summary, table.classes, hd95=True))
  return {"cases": rows, "summary": summary, "dir": os.fspath(out_dir)}
