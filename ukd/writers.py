"""What a run reports: TensorBoard events, a JSON-lines metrics file and a progress display.

Only process 0 writes.  On resume, lines and events past the resumed step (written
after the last checkpoint by the run that died) are dropped, so the logs read as
one uninterrupted run.
"""

import json
import os
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np
from absl import logging
from etils import epath

from ukd import files

# A remote work dir's logs are uploaded at most this often (and at every checkpoint and at
# the end): each upload rewrites whole files.
SYNC_SECONDS = 60.0


class MetricWriter:
  """TensorBoard (tensorboardX: no TensorFlow needed) plus `<workdir>/metrics.jsonl`.

  A local work dir gets both written in place, a line appended per write.  An object store
  (`gs://...`) cannot append, and tensorboardX writes to one only through an extra package
  (google-cloud-storage, for gs:// alone), so for a remote work dir the lines are kept in
  memory and the events written to a local folder, and `flush` uploads them: metrics.jsonl
  rewritten whole (`files.write_text`, one upload) and each changed event file copied to
  `<workdir>/tensorboard/`.  That happens at most every SYNC_SECONDS on writes, whenever the
  caller flushes (training does at every checkpoint, so the uploaded logs reach the step a
  resumed run starts from) and at `close`.
  """

  def __init__(self, workdir, start_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter

    workdir = epath.Path(workdir)
    self.remote = files.is_remote(workdir)
    self.path = workdir / "metrics.jsonl"
    self.lines = _truncate_jsonl(self.path, start_step)
    self.uploaded_lines = len(self.lines)
    self.file = None if self.remote else open(self.path, "a")
    # The events' remote home, and the local folder they are written to meanwhile.
    self.tensorboard = workdir / "tensorboard"
    self.logdir = tempfile.mkdtemp(prefix="ukd-tensorboard-") if self.remote else None
    self.uploaded = {}  # local event file -> (size, mtime) when last uploaded
    self.last_sync = time.monotonic()
    # purge_step makes TensorBoard discard events at or after the resumed step.
    self.tb = SummaryWriter(
      self.logdir or os.fspath(self.tensorboard),
      purge_step=start_step + 1 if start_step else None,
    )

  def write_config(self, config):
    if self.enabled:
      self.tb.add_text("config", "```\n" + str(config) + "\n```", 0)

  def scalars(self, step: int, values: dict):
    if not self.enabled:
      return
    values = {k: float(v) for k, v in values.items()}
    for key, value in values.items():
      self.tb.add_scalar(key, value, step)
    line = json.dumps({"step": step, **values}) + "\n"
    if self.remote:
      self.lines.append(line)
      self._sync_if_due()
    else:
      self.file.write(line)
      self.file.flush()

  def images(self, step: int, pictures: dict):
    """{name: uint8 [H, W, 3]} pictures, e.g. image | ground truth | prediction overlays."""
    if not self.enabled:
      return
    for name, picture in pictures.items():
      self.tb.add_image(f"overlay/{name}", np.asarray(picture), step, dataformats="HWC")
    if self.remote:
      self._sync_if_due()

  def flush(self):
    """Everything written so far on disk (for a remote work dir: uploaded).  Events still in
    tensorboardX's queue follow with the next flush."""
    if not self.enabled:
      return
    self.tb.flush()
    if self.remote:
      self._upload()

  def close(self):
    if not self.enabled:
      return
    self.tb.close()  # writes every queued event
    if self.remote:
      self._upload()
      shutil.rmtree(self.logdir, ignore_errors=True)
    else:
      self.file.close()

  def _sync_if_due(self):
    if time.monotonic() - self.last_sync >= SYNC_SECONDS:
      self.flush()

  def _upload(self):
    """metrics.jsonl and the event files that changed since the last upload."""
    if len(self.lines) != self.uploaded_lines:
      files.write_text(self.path, "".join(self.lines))
      self.uploaded_lines = len(self.lines)
    for folder, _, names in os.walk(self.logdir):
      for name in names:
        local = os.path.join(folder, name)
        stat = os.stat(local)
        if self.uploaded.get(local) != (stat.st_size, stat.st_mtime_ns):
          files.upload(local, self.tensorboard / os.path.relpath(local, self.logdir))
          self.uploaded[local] = (stat.st_size, stat.st_mtime_ns)
    self.last_sync = time.monotonic()


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


class Progress:
  """Steps/s and ETA: a live bar on a terminal, a plain line every few seconds otherwise."""

  def __init__(self, total: int, start: int, enabled: bool = True, every_seconds: float = 10.0):
    self.total, self.enabled = total, enabled
    self.first = None
    self.last_print = time.time()
    self.every = every_seconds
    self.bar = None
    if enabled and sys.stdout.isatty():
      from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeRemainingColumn,
      )
      from rich.progress import (
        Progress as Bar,
      )

      self.bar = Bar(
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} steps/s  loss {task.fields[loss]}"),
        TimeRemainingColumn(),
      )
      self.task = self.bar.add_task("train", total=total, completed=start, rate="-", loss="-")
      self.bar.start()

  def _rate(self, step):
    """Measured from the first step on, so compilation does not skew steps/s and ETA."""
    if self.first is None:
      self.first = (step, time.time())
      return 0.0
    elapsed = max(time.time() - self.first[1], 1e-9)
    return (step - self.first[0]) / elapsed

  def update(self, step: int, metrics: dict):
    if not self.enabled:
      return
    rate = self._rate(step)
    loss = float(metrics["loss"])
    if self.bar is not None:
      self.bar.update(self.task, completed=step, rate=f"{rate:.2f}", loss=f"{loss:.4f}")
    elif time.time() - self.last_print >= self.every or step == self.total:
      self.last_print = time.time()
      eta = (self.total - step) / rate if rate > 0 else float("inf")
      print(
        f"step {step}/{self.total}  loss {loss:.4f}  {rate:.2f} steps/s  ETA {_duration(eta)}",
        flush=True,
      )

  def note(self, step: int, text: str):
    if not self.enabled:
      return
    line = f"step {step}/{self.total}  {text}"
    if self.bar is not None:
      self.bar.console.print(line)
    else:
      print(line, flush=True)

  def close(self):
    if self.bar is not None:
      self.bar.stop()


def _duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def quiet_libraries() -> None:
  """Keeps library chatter (Orbax notices at every checkpoint load, deprecation warnings) off
  the user's terminal, which then shows the project's own lines only; `--verbosity` (any
  value) leaves logging as absl sets it."""
  logging.set_verbosity(logging.ERROR)
  warnings.simplefilter("ignore")
