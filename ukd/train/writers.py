"""What a run reports, one writer per sink behind one interface (`Writer`).

  JsonlWriter        `<workdir>/metrics.jsonl`: one JSON line of scalars per write
  TensorBoardWriter  `<workdir>/tensorboard/`: event files (tensorboardX: no TensorFlow needed)
  ConsoleWriter      progress and validation lines on the terminal
  MultiWriter        hands every call on to several writers

`create` builds a run's writer: every sink on process 0; on the other processes a console
writer at WARNING level alone, so their scalars (process 0's numbers again) are written
nowhere while the loop calls the writer alike on every process.  On resume, lines and events
past the resumed step (written after the last checkpoint by the run that died) are dropped,
so the logs read as one uninterrupted run.

A remote work dir (`gs://...`): an object store cannot append, and tensorboardX writes to one
only through an extra package (google-cloud-storage, for gs:// alone), so metrics.jsonl is
kept in memory and rewritten whole (`files.write_text`, one upload), and the events are
written to a local folder whose changed files are copied to `<workdir>/tensorboard/`.  Both
happen at most every SYNC_SECONDS on writes, whenever the caller flushes (training does at
every checkpoint, so the uploaded logs reach the step a resumed run starts from) and at
`close`.

A write the file system refuses (a full disk, a quota, a read-only work dir) is one
`WriteError` line naming metrics.jsonl or the tensorboard folder (`files.refusals`).
"""

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping

import numpy as np
from etils import epath

from ukd import files

# A remote work dir's logs are uploaded at most this often on writes (and at every flush and
# at the end): each upload rewrites whole files.
SYNC_SECONDS = 60.0


class Writer:
  """The interface of every sink: named values at a step.  A sink ignores what it cannot
  show (the JSON lines hold scalars only), so these defaults do nothing."""

  def write_scalars(self, step: int, values: Mapping[str, float]) -> None:
    """{name: number}, e.g. {'train/loss': 0.4}."""

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """{name: uint8 [H, W, 3]}, e.g. image | ground truth | prediction overlays."""

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """{name: Markdown text}, e.g. the config."""

  def flush(self) -> None:
    """Everything written so far on disk (for a remote work dir: uploaded)."""

  def close(self) -> None:
    """Flushes and releases files; the writer takes nothing more."""


class MultiWriter(Writer):
  """Every call handed on to each of `writers`, in order."""

  def __init__(self, writers: Iterable[Writer]):
    self.writers = tuple(writers)

  def write_scalars(self, step, values):
    for writer in self.writers:
      writer.write_scalars(step, values)

  def write_images(self, step, images):
    for writer in self.writers:
      writer.write_images(step, images)

  def write_texts(self, step, texts):
    for writer in self.writers:
      writer.write_texts(step, texts)

  def flush(self):
    for writer in self.writers:
      writer.flush()

  def close(self):
    for writer in self.writers:
      writer.close()


def create(workdir, *, start_step: int, total_steps: int, main_process: bool) -> Writer:
  """The writer of a run that starts after `start_step` (see the module docstring)."""
  if not main_process:
    return ConsoleWriter(total_steps, level=logging.WARNING)
  return MultiWriter(
    [
      JsonlWriter(workdir, start_step),
      TensorBoardWriter(workdir, start_step),
      ConsoleWriter(total_steps, start_step=start_step),
    ]
  )


class _Every:
  """Says True when `seconds` have passed since it last did (or since it was made)."""

  def __init__(self, seconds: float):
    self.seconds = seconds
    self.last = time.monotonic()

  def __call__(self) -> bool:
    now = time.monotonic()
    if now - self.last < self.seconds:
      return False
    self.last = now
    return True


# --- metrics.jsonl ----------------------------------------------------------------------------


class JsonlWriter(Writer):
  """`<workdir>/metrics.jsonl`: {"step": s, name: value, ...} per write of scalars, appended
  and flushed line by line to a local file; kept and rewritten whole for a remote one."""

  def __init__(self, workdir, start_step: int = 0):
    workdir = epath.Path(workdir)
    self.path = workdir / "metrics.jsonl"
    self.remote = files.is_remote(workdir)
    lines = _truncate_jsonl(self.path, start_step)
    self.lines = lines if self.remote else None
    self.uploaded_lines = len(lines)
    self.file = None
    if not self.remote:
      with files.refusals(self.path):
        self.file = open(self.path, "a")
    self.due = _Every(SYNC_SECONDS)

  def write_scalars(self, step, values):
    line = json.dumps({"step": int(step), **{k: float(v) for k, v in values.items()}}) + "\n"
    if self.remote:
      self.lines.append(line)
      if self.due():
        self.flush()
    else:
      with files.refusals(self.path):
        self.file.write(line)
        self.file.flush()

  def flush(self):
    if self.remote and len(self.lines) != self.uploaded_lines:
      files.write_text(self.path, "".join(self.lines))
      self.uploaded_lines = len(self.lines)

  def close(self):
    if self.remote:
      self.flush()
      return
    with files.refusals(self.path):
      self.file.close()


def _truncate_jsonl(path: epath.Path, last_step: int) -> list[str]:
  """Keeps only the lines up to `last_step`, rewritten atomically; returns them."""
  if not path.exists():
    return []
  keep = []
  for line in path.read_text().splitlines(keepends=True):
    try:
      if json.loads(line)["step"] <= last_step:
        keep.append(line if line.endswith("\n") else line + "\n")
    except (ValueError, KeyError):
      continue  # a line cut short by a kill
  files.write_text(path, "".join(keep))
  return keep


# --- TensorBoard ------------------------------------------------------------------------------


class TensorBoardWriter(Writer):
  """Event files in `<workdir>/tensorboard/`, for `tensorboard --logdir`; for a remote work
  dir written to a local folder and uploaded (see the module docstring)."""

  def __init__(self, workdir, start_step: int = 0):
    from tensorboardX import SummaryWriter

    workdir = epath.Path(workdir)
    self.target = workdir / "tensorboard"
    self.remote = files.is_remote(workdir)
    self.logdir = (
      tempfile.mkdtemp(prefix="ukd-tensorboard-") if self.remote else os.fspath(self.target)
    )
    self.uploaded = {}  # local event file -> (size, mtime) when last uploaded
    self.due = _Every(SYNC_SECONDS)
    # purge_step makes TensorBoard discard events at or after the resumed step.
    with files.refusals(self.logdir):
      self.events = SummaryWriter(self.logdir, purge_step=start_step + 1 if start_step else None)

  def write_scalars(self, step, values):
    for name, value in values.items():
      self.events.add_scalar(name, float(value), step)
    self._sync_if_due()

  def write_images(self, step, images):
    for name, picture in images.items():
      self.events.add_image(name, np.asarray(picture), step, dataformats="HWC")
    self._sync_if_due()

  def write_texts(self, step, texts):
    for name, text in texts.items():
      self.events.add_text(name, text, step)
    self._sync_if_due()

  def flush(self):
    """Events still in tensorboardX's queue follow with the next flush.  Its thread writes
    them; the flush here, in the caller's thread, is where a full disk is heard."""
    with files.refusals(self.logdir):
      self.events.flush()
    if self.remote:
      upload_changes(self.logdir, self.target, self.uploaded)

  def close(self):
    with files.refusals(self.logdir):
      self.events.close()  # writes every queued event
    if self.remote:
      upload_changes(self.logdir, self.target, self.uploaded)
      shutil.rmtree(self.logdir, ignore_errors=True)

  def _sync_if_due(self):
    if self.remote and self.due():
      self.flush()


def upload_changes(local_dir: str, target, uploaded: dict) -> None:
  """Copies each file under `local_dir` to the same place under `target` unless `uploaded`
  ({local path: (size, mtime)}, updated here) shows it unchanged since its last copy."""
  for folder, _, names in os.walk(local_dir):
    for name in names:
      local = os.path.join(folder, name)
      stat = os.stat(local)
      if uploaded.get(local) != (stat.st_size, stat.st_mtime_ns):
        files.upload(local, epath.Path(target) / os.path.relpath(local, local_dir))
        uploaded[local] = (stat.st_size, stat.st_mtime_ns)


# --- console ----------------------------------------------------------------------------------


class ConsoleWriter(Writer):
  """What a person watching the run reads, on stdout.

  Training scalars ('train/loss', with 'perf/steps_per_sec' when measured) move a live bar on
  a terminal; elsewhere they print a line at most every `every_seconds` and at the last step.
  Validation scalars ('val_dice/...', with 'perf/validation_sec') print a line each time.
  These lines are INFO: at `level` WARNING (processes other than 0) the writer shows nothing.
  """

  def __init__(
    self,
    total_steps: int,
    *,
    start_step: int = 0,
    level: int = logging.INFO,
    every_seconds: float = 10.0,
  ):
    self.total = total_steps
    self.shown = level <= logging.INFO
    self.due = _Every(every_seconds)
    self.bar = None
    if self.shown and sys.stdout.isatty():
      from rich import progress

      self.bar = progress.Progress(
        progress.TextColumn("train"),
        progress.BarColumn(),
        progress.MofNCompleteColumn(),
        progress.TextColumn("{task.fields[rate]} steps/s  loss {task.fields[loss]}"),
        progress.TimeRemainingColumn(),
      )
      self.task = self.bar.add_task(
        "train", total=total_steps, completed=start_step, rate="-", loss="-"
      )
      self.bar.start()

  def write_scalars(self, step, values):
    if not self.shown:
      return
    if "train/loss" in values:
      self._progress(step, values)
    if "val_dice/mean" in values:
      self._print(step, _validation_line(values))

  def _progress(self, step, values):
    loss, rate = float(values["train/loss"]), values.get("perf/steps_per_sec")
    if self.bar is not None:
      shown_rate = "-" if rate is None else f"{rate:.2f}"
      self.bar.update(self.task, completed=step, rate=shown_rate, loss=f"{loss:.4f}")
      return
    if not (self.due() or step == self.total):
      return
    text = f"loss {loss:.4f}"
    if rate is not None:
      eta = (self.total - step) / rate if rate > 0 else float("inf")
      text += f"  {rate:.2f} steps/s  ETA {_duration(eta)}"
    self._print(step, text)

  def _print(self, step, text):
    line = f"step {step}/{self.total}  {text}"
    if self.bar is not None:
      self.bar.console.print(line)
    else:
      print(line, flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.stop()


def _validation_line(values) -> str:
  """'validation mean Dice 0.712 (ct 0.701, mr 0.723) in 4.1 s'."""
  parts = [
    f"{key.split('/')[1]} {float(v):.3f}"
    for key, v in values.items()
    if key.startswith("val_dice/") and key.endswith("/mean") and key.count("/") == 2
  ]
  text = f"validation mean Dice {float(values['val_dice/mean']):.3f}"
  if parts:
    text += f" ({', '.join(parts)})"
  if "perf/validation_sec" in values:
    text += f" in {float(values['perf/validation_sec']):.1f} s"
  return text


def _duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
