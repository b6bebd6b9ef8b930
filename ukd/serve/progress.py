"""Per-case progress of `--mode=predict` for a person at a terminal, plain lines in a log."""

from __future__ import annotations

import sys


class Progress:
  """Per-case progress for a person: a rich bar over the lines of finished cases on a
  terminal, plain lines where stdout is a log or a pipe. Failures go to stderr."""

  def __init__(self, total: int, show: bool = True):
    self.total, self.show, self.count, self.bar = total, show, 0, None
    if show and total and sys.stdout.isatty():
      from rich import progress

      self.bar = progress.Progress(
        progress.TextColumn("predict"),
        progress.BarColumn(),
        progress.MofNCompleteColumn(),
        progress.TimeElapsedColumn(),
      )
      self.task = self.bar.add_task("predict", total=total)
      self.bar.start()

  def _line(self, text: str, stream=None) -> None:
    if not self.show:
      return
    if self.bar is not None:
      self.bar.console.print(text, markup=False, highlight=False)
    else:
      print(text, file=stream or sys.stdout, flush=True)

  def note(self, text: str) -> None:
    self._line(text)

  def done(self, job, seconds: float) -> None:
    self.count += 1
    first = job.nifti or job.seg
    self._line(f"[{self.count}/{self.total}] {job.case.source} -> {first} ({seconds:.1f} s)")
    if self.bar is not None:
      self.bar.advance(self.task)

  def failed(self, job, message: str) -> None:
    self.count += 1
    self._line(f"ukd: failed: {message}", sys.stderr)
    if self.bar is not None:
      self.bar.advance(self.task)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.stop()
