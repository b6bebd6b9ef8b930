"""Predicting files, folders and DICOM series: label maps in the dataset's own codes out.

`predict_paths` predicts everything one input holds (`ukd.serve.inputs`: NIfTI files,
DICOM series, a dataset's layout) into an output folder, as NIfTI label maps, DICOM
Segmentations, or both, with a JSON sidecar per case naming each code's class and giving the
case's time and each class's volume. Every output name is checked before the first
prediction, so a clash or an existing file fails before minutes of work. One case that
cannot be read (a broken series in a PACS export) is reported in one line and the others
are still predicted; the run then ends with `SomeFailed` (exit status 3).
`predict_file` predicts one NIfTI file to a given name.

Cases flow through three stages so the device never waits on files: a reader thread reads
and prepares the next cases while the network predicts the current one, and a writer thread
restores, post-processes and writes the previous one; at most two cases wait at each hand-off,
so memory stays bounded whatever the input's size.  Outputs are written atomically and the
sidecar last, so a case whose sidecar exists is complete: `resume` (`--continue`) skips those.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import os
import re
import time

import numpy as np

import ukd
from ukd import files
from ukd.data.io import dicom_seg, dicom_series, volumes
from ukd.errors import ConfigError, DataError, WriteError, error
from ukd.serve import failures, windows
from ukd.serve import progress as progress_lib
from ukd.serve.inputs import Case, Inputs, find_inputs, output_name

_NIFTI = re.compile(r"\.nii(\.gz)?$")
OUTPUT_FORMATS = ("nifti", "dicom_seg")
# Cases waiting between two stages (read -> network, network -> write).
IN_FLIGHT = 2


class SomeFailed(DataError):
  """Some cases of an input could not be predicted (each was named in its own line); the
  others were written. Exit status 3, so a script tells it from a run that wrote nothing."""

  exit_code = 3


def sidecar_path(out_path) -> str:
  """`<name>.nii.gz` -> `<name>.json`: where the classes of its codes are named."""
  return _NIFTI.sub("", os.fspath(out_path)) + ".json"


@dataclasses.dataclass
class _Job:
  """One case with its modality and output paths (None: not written)."""

  case: Case
  modality: str | None
  problem: str | None  # known before reading (a Modality tag no trained modality matches)
  nifti: str | None
  seg: str | None
  sidecar: str
  probabilities: str | None
  entropy: str | None = None
  seg_skipped: str | None = None  # why no SEG could be written (set by the reader)

  @property
  def outputs(self) -> list[str]:
    """Every file of the case, the sidecar last: written last, it marks the case complete."""
    made = (self.nifti, self.seg, self.probabilities, self.entropy, self.sidecar)
    return [p for p in made if p]


def predict_file(
  seg, in_path, out_path, modality: str, probabilities=None, label_codes: str = "dataset"
) -> None:
  """NIfTI in, label map out with the input's exact affine and header, in the codes
  `seg.label_table` gives (uint8, or uint16 when a code exceeds 255), and `sidecar_path`
  beside it (classes, seconds, class volumes).  With `probabilities` (a path) also the float32
  class probabilities [X, Y, Z, C], channel k for class index k."""
  in_path, out_path = os.fspath(in_path), os.fspath(out_path)
  case = Case(output_name(in_path), in_path, path=in_path)
  job = _Job(case, modality, None, out_path, None, sidecar_path(out_path), probabilities)
  tables = {modality: seg.label_table(modality, label_codes)}
  _run(seg, [job], tables, None, progress_lib.Progress(0, show=False))


def parse_formats(output_format: str) -> tuple[str, ...]:
  """'nifti', 'dicom_seg' or 'nifti,dicom_seg' -> the formats, in that order."""
  chosen = [f.strip() for f in str(output_format).split(",")]
  if not chosen or not set(chosen) <= set(OUTPUT_FORMATS) or len(set(chosen)) != len(chosen):
    raise ConfigError(
      f"--output_format={output_format!r} must be nifti, dicom_seg or nifti,dicom_seg"
    )
  return tuple(f for f in OUTPUT_FORMATS if f in chosen)


def _exists(path) -> bool:
  """Whether `path` exists; locally a dangling link counts too (a write would replace it)."""
  return files.path(path).exists() if files.is_remote(path) else os.path.lexists(path)


def _plan(seg, inputs: Inputs, output_dir, modality, formats, extras, overwrite, resume, force):
  """(jobs, complete): a job per case, every output name checked: no clash, none replacing an
  input, none existing unless `overwrite`; with `resume` the cases whose outputs all exist are
  complete (left out of the jobs) and the others' leftovers are replaced. A series whose
  Modality tag (or, for MR, sequence: `config.infer.dicom_sequences`) maps to another modality
  than `modality` fails unless `force`."""
  table = dict(seg.config.infer.get("dicom_modalities") or dicom_series.DEFAULT_MODALITY_TABLE)
  sequences = dict(seg.config.infer.get("dicom_sequences") or {})
  jobs, taken, complete = [], set(), 0
  for case in inputs.cases:
    chosen, problem = modality, None
    if chosen is not None and case.series is not None and not force:
      problem = _contradiction(case, chosen, table, sequences)
    if chosen is None:
      try:
        chosen = dicom_series.modality_of(case.series, seg.config.modalities, table, sequences)
      except DataError as e:
        problem = str(e)
    out = os.path.join(os.fspath(output_dir), case.name)
    job = _Job(
      case,
      chosen,
      problem,
      out + ".nii.gz" if "nifti" in formats else None,
      out + ".dcm" if "dicom_seg" in formats else None,
      out + ".json",
      out + "_probabilities.nii.gz" if "probabilities" in extras else None,
      out + "_entropy.nii.gz" if "entropy" in extras else None,
    )
    done = resume and all(_exists(t) for t in job.outputs)
    for target in job.outputs:
      key = files.path(target)
      if key in taken:
        raise error(DataError, case.source, f"its output {target} would overwrite another's")
      if case.path is not None and key == files.path(case.path):
        raise DataError(
          f"{case.path}: the output would overwrite this input; choose another --output"
        )
      if not (overwrite or resume) and _exists(target):
        raise error(
          DataError, target, "already exists; pass --overwrite to replace it or --continue"
        )
      taken.add(key)
    if done:
      complete += 1
    else:
      jobs.append(job)
  return jobs, complete


def _contradiction(case: Case, modality: str, table, sequences) -> str | None:
  """Why `--modality` contradicts a series' header, or None: the header is what the scanner
  recorded, so an MR in a folder of CTs is not silently predicted as CT, nor a T1 series as
  T2. A tag the table does not map (OT, a secondary capture), or an MR series whose sequence
  no single pattern of `sequences` names, leaves the choice to the user."""
  series = case.series
  tag = str(series.modality).strip()
  said = f"DICOM Modality '{tag}'"
  if sequences and tag == dicom_series.MR_TAG:
    try:
      header = dicom_series.match_sequence(series, sequences)
    except DataError:
      return None
    said = f"MR sequence (SeriesDescription {series.description!r})"
  else:
    header = table.get(tag)
  if header is None or header == modality:
    return None
  return (
    f"{case.source}: --modality={modality} contradicts its {said} "
    f"({header}); pass --modality_overrides_header to predict it as {modality} anyway"
  )


def predict_paths(
  seg,
  input_path,
  output_dir,
  modality: str | None = None,
  probabilities: bool = False,
  *,
  overwrite: bool = False,
  label_codes: str = "dataset",
  output_format: str = "nifti",
  dicom_reference=None,
  show_progress: bool = True,
  uncertainty: bool = False,
  resume: bool = False,
  modality_overrides_header: bool = False,
) -> list[str]:
  """Predicts what `input_path` holds (`ukd.serve.inputs`) into `output_dir`; returns
  every path written.

  Per case `<name>`: `<name>.nii.gz` (`output_format` 'nifti') and/or `<name>.dcm` (a
  DICOM Segmentation, 'dicom_seg'), `<name>.json` (class of each code, seconds, volume of
  each class in mm^3; for a series its SeriesInstanceUID, StudyInstanceUID and file count),
  with `probabilities` `<name>_probabilities.nii.gz` (float32 class probabilities), with
  `uncertainty` `<name>_entropy.nii.gz` (the voxel-wise entropy of the averaged softmax, in
  nats: 0 where the network, its mirrors and members agree on one class, ln C at most).
  `resume` leaves out cases whose outputs are complete and removes the temporary files a
  killed run left (`files.remove_stale_temporaries`).
  `label_codes` is 'dataset' (the dataset's own codes) or 'index'. `modality` may be None for
  DICOM: each series is predicted as the modality its Modality tag maps to
  (`config.infer.dicom_modalities`), an MR series as the one whose pattern its sequence tags
  match where `config.infer.dicom_sequences` is set; a series whose header says another than
  `modality` fails unless `modality_overrides_header`. A SEG of a NIfTI input needs
  `dicom_reference`, a folder with one DICOM series on the NIfTI's grid.

  Every problem with the request (flags, names, existing outputs, the reference) raises
  before the first prediction. A case that then fails, reading, predicting or writing, is
  reported in one line and nothing is written for it; if the input held several, the rest
  are predicted and `SomeFailed` is raised at the end, unless the failure was a write every
  later case would meet too (a full or read-only output folder): then the run stops after
  that case's line with one `WriteError` line. A series no SEG can be made of
  (`dicom_seg.seg_problem`) gets its NIfTI and a line saying why it has no SEG (or fails,
  when no NIfTI was asked for).
  """
  formats = parse_formats(output_format)
  if modality is not None:
    seg.check_modality(modality)
    seg.label_table(modality, label_codes)  # a bad choice fails before any work
  inputs = find_inputs(input_path, exclude=files.path(output_dir))
  nifti_inputs = [c.path for c in inputs.cases if c.path is not None]
  if nifti_inputs and modality is None:
    raise ConfigError(
      f"--modality is required for NIfTI input {nifti_inputs[0]} (DICOM takes it from its tags)"
    )
  reference = None
  if "dicom_seg" in formats and nifti_inputs:
    if dicom_reference is None:
      raise ConfigError(
        "--output_format=dicom_seg of a NIfTI input needs --dicom_reference=DIR, a DICOM "
        "series on the same grid, for the SEG to refer to"
      )
    reference = dicom_seg.read_reference(dicom_reference)
  extras = {"probabilities"} if probabilities else set()
  extras |= {"entropy"} if uncertainty else set()
  jobs, complete = _plan(
    seg, inputs, output_dir, modality, formats, extras, overwrite, resume, modality_overrides_header
  )
  stale = files.remove_stale_temporaries(output_dir) if resume else []
  tables = {
    m: seg.label_table(m, label_codes) for m in {j.modality for j in jobs if j.problem is None}
  }
  progress = progress_lib.Progress(len(jobs), show=show_progress)
  if complete:
    progress.note(f"{output_dir}: {complete} case(s) already complete; --continue skips them")
  if stale:
    progress.note(f"{output_dir}: removed {len(stale)} unfinished file(s) of a killed run")
  if inputs.skipped_labels:
    progress.note(
      f"{input_path}: skipped {inputs.skipped_labels} label file(s) ({inputs.label_kind}); "
      "predicting the images only"
    )
  written, failed = _run(seg, jobs, tables, reference, progress)
  if failed:
    rest = len(jobs) - len(failed)
    raise SomeFailed(
      f"{input_path}: {len(failed)} of {len(jobs)} cases failed ({', '.join(failed)}; "
      f"each named above); the other {rest} {'was' if rest == 1 else 'were'} written to "
      f"{output_dir}"
    )
  return written


def class_volumes(labels: np.ndarray, spacing, names) -> dict[str, float]:
  """{class name: volume in mm^3}: voxels of each class times the voxel volume."""
  counts = np.bincount(np.asarray(labels).ravel(), minlength=len(names))
  voxel = float(np.prod([float(s) for s in spacing]))
  return {name: float(count) * voxel for name, count in zip(names, counts)}


@dataclasses.dataclass
class _Loaded:
  """A case between stages: what was read, its network input, and seconds spent on it."""

  vol: volumes.Volume
  image: object  # the DICOM series read (SEG refers to it), or the reference; None for NIfTI
  prepared: object
  seconds: float
  network: np.ndarray | None = None


def _run(seg, jobs: list[_Job], tables, reference, progress) -> tuple[list[str], list[str]]:
  """(paths written, names of failed cases): every job through read -> network -> write, the
  reader and writer on their own threads, at most `IN_FLIGHT` cases waiting at each hand-off.

  A case that fails in any stage is reported in one line and skipped (raised if it is the
  only one): a bad file, a decoder's or highdicom's exception, must not cost the other
  cases of a PACS export. Only an interrupt (not an Exception) stops the run.
  """
  written, failed = [], []

  def collect(job, future):
    try:
      seconds = future.result()
    except Exception as e:
      if len(jobs) == 1 and isinstance(e, WriteError):
        raise
      failure = failures.case_error(job.case.source, "writing", e)
      if len(jobs) == 1:
        raise failure from failure.__cause__
      failed.append(job.case.name)
      progress.failed(job, str(failure))
      folder = os.path.dirname(job.sidecar)
      if failures.hits_every_case(e, folder):
        done = jobs.index(job) + 1
        raise failures.stopped(e, folder, done, len(failed), len(jobs)) from None
      return
    written.extend(job.outputs)
    if job.seg_skipped:
      progress.note(f"{job.case.source}: no DICOM-SEG written: {job.seg_skipped}")
    progress.done(job, seconds)

  with (
    concurrent.futures.ThreadPoolExecutor(1, "ukd-read") as reader,
    concurrent.futures.ThreadPoolExecutor(1, "ukd-write") as writer,
  ):
    ahead = iter(jobs)
    reads, writes = collections.deque(), collections.deque()

    def read_next():
      job = next(ahead, None)
      if job is not None:
        reads.append((job, reader.submit(_read, seg, job, reference, progress)))

    for _ in range(IN_FLIGHT):
      read_next()
    try:
      while reads:
        job, future = reads.popleft()
        read_next()
        try:
          loaded = future.result()
        except Exception as e:  # reported in its turn, after the cases before it
          writes.append((job, _failed(failures.case_error(job.case.source, "reading", e))))
          continue
        start = time.perf_counter()
        try:
          run = seg.batch_function(job.modality)
          loaded.network = windows.network_probabilities(loaded.prepared.image, seg.settings, run)
        except Exception as e:
          writes.append((job, _failed(failures.case_error(job.case.source, "predicting", e))))
          continue
        loaded.seconds += time.perf_counter() - start
        loaded.prepared = dataclasses.replace(loaded.prepared, image=None)  # not needed now
        writes.append((job, writer.submit(_write, seg, job, loaded, tables[job.modality])))
        while len(writes) > IN_FLIGHT:
          collect(*writes.popleft())
      while writes:
        collect(*writes.popleft())
    finally:
      for _, future in list(reads) + list(writes):
        future.cancel()
  return written, failed


def _failed(e: Exception) -> concurrent.futures.Future:
  failed = concurrent.futures.Future()
  failed.set_exception(e)
  return failed


def _read(seg, job: _Job, reference, progress) -> _Loaded:
  """Reader stage: the case's volume and its network input."""
  start = time.perf_counter()
  if job.problem is not None:
    raise DataError(job.problem)
  image = None
  if job.case.series is not None:
    image = dicom_series.read_series(job.case.series)
    vol = image.volume
    if image.skipped:
      prefix = f"{image.source}: "  # one line for all of the series' skipped localizers
      progress.note(prefix + "; ".join(s.removeprefix(prefix) for s in image.skipped))
  else:
    vol = volumes.read_image(job.case.path)
    if job.seg:
      dicom_seg.check_reference_grid(vol, reference, job.case.source)
      image = reference
  if job.seg and (problem := dicom_seg.seg_problem(image)) is not None:
    if not job.nifti:
      raise error(
        DataError,
        job.case.source,
        f"no DICOM-SEG can be written: {problem}; add nifti to --output_format for the labels",
      )
    job.seg, job.seg_skipped = None, problem
  prepared = windows.prepare(vol, job.modality, seg.settings)
  return _Loaded(vol, image, prepared, time.perf_counter() - start)


def _write(seg, job: _Job, loaded: _Loaded, table) -> float:
  """Writer stage: labels on the case's grid, written; returns the case's seconds (its three
  stages, not the time it waited between them). On a failure every output of the case is
  removed, whatever had been written (a writer may leave a partial file), so a failed case
  leaves nothing behind."""
  start = time.perf_counter()
  vol, image = loaded.vol, loaded.image
  need_probs = bool(job.probabilities or job.entropy)
  labels, probs = windows.finish(
    loaded.network, loaded.prepared, vol, job.modality, seg.settings, probabilities=need_probs
  )
  loaded.network = None
  names = [name for _, name in table]
  record = {"classes": {str(code): name for code, name in table}, "modality": job.modality}
  if job.case.series is not None:
    record |= {
      "SeriesInstanceUID": job.case.series.series_uid,
      "StudyInstanceUID": job.case.series.study_uid,
      "source_files": len(image.paths),  # the files of the volume: localizers left out
    }
  record["volumes_mm3"] = class_volumes(labels, vol.spacing, names)
  try:
    if job.seg:
      dicom_seg.write_seg(
        labels,
        image,
        job.seg,
        names,
        dicom_seg.SEG_CODES.get(seg.config.data.dataset),
        algorithm_version=ukd.__version__,
        step=None if seg.step is None else seg.step_name,
      )
    if job.nifti:
      dtype = np.uint8 if max(code for code, _ in table) <= 255 else np.uint16
      codes = np.array([code for code, _ in table], dtype)
      volumes.write_like(codes[labels], vol, job.nifti, dtype=dtype)
    if job.probabilities:
      volumes.write_like(probs, vol, job.probabilities, dtype=np.float32)
    if job.entropy:
      volumes.write_like(windows.entropy(probs), vol, job.entropy, dtype=np.float32)
    seconds = loaded.seconds + time.perf_counter() - start
    files.write_json(job.sidecar, {**record, "seconds": round(seconds, 3)})
  except BaseException:
    for path in job.outputs:
      with contextlib.suppress(OSError):  # a read-only folder refuses this too: keep the cause
        files.path(path).unlink(missing_ok=True)
    raise
  return seconds
