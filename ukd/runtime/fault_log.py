"""`<workdir>/ukd.log`: the full detail of faults the terminal shows in one line.

A damaged checkpoint makes Orbax and TensorStore raise errors hundreds of lines long (a
TensorStore spec, nested asyncio tracebacks, errors logged again from its reading threads),
which bury the one line the user needs.  The terminal gets that line (`reason`), naming this
log; the log keeps everything, for a bug report.
"""

import contextlib
import datetime
import logging
import os
import re
import sys
import threading
import traceback

from ukd import files

LOG = "ukd.log"  # <workdir>/ukd.log
_SPEC = re.compile(r"\s*\[tensorstore_spec=.*$")
_UNREADABLE = re.compile(r"\b(OUT_OF_RANGE|DATA_LOSS|NOT_FOUND): ")


def path(workdir) -> str:
  return os.fspath(files.path(workdir) / LOG)


def reason(error: BaseException, limit: int = 300) -> str:
  """The first line of the innermost cause of `error` (Orbax wraps TensorStore's error,
  which says what is wrong, in one that says only where), without TensorStore's spec."""
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
  lines = str(error).strip().splitlines() or [type(error).__name__]
  line = _SPEC.sub("", lines[0])
  return line if len(line) <= limit else line[: limit - 3] + "..."


def unreadable(error: BaseException) -> bool:
  """Whether `error` says files could not be read (missing, cut short, corrupt), rather than
  that they hold something else: an OSError, or TensorStore's status for those, anywhere in
  its chain of causes."""
  while error is not None:
    if isinstance(error, OSError) or _UNREADABLE.search(str(error)):
      return True
    error = error.__cause__ or error.__context__
  return False


def record(workdir, what: str, error: BaseException) -> str:
  """Appends `what` and `error`'s whole traceback to the work dir's log, if it can be written
  (`evaluate` may read a read-only work dir).

  Returns:
    `reason(error)`, for the terminal's line.
  """
  _append_quietly(workdir, f"{what}:\n{''.join(traceback.format_exception(error))}")
  return reason(error)


def details(workdir) -> str:
  """'; details in <log>' for the end of a line, or '' when there is no log to name."""
  log = files.path(workdir) / LOG
  return f"; details in {log}" if log.exists() else ""


def _append(workdir, text: str) -> None:
  """Appends a dated entry; on an object store, which cannot append, the log is rewritten."""
  entry = f"--- {datetime.datetime.now().astimezone().isoformat(timespec='seconds')} {text}\n"
  log = files.path(workdir) / LOG
  if files.is_remote(log):
    log.write_text((log.read_text() if log.exists() else "") + entry)
    return
  with open(log, "a") as f:
    f.write(entry)


@contextlib.contextmanager
def background_errors(workdir):
  """Within the body, errors raised in threads (Orbax's readers and writers), asyncio's
  reports of failed tasks and Orbax's own error reports (through absl's logger, a traceback
  from each thread a failed save ran in) go to the work dir's log instead of the terminal,
  where several threads failing at once interleave their tracebacks."""
  reports = logging.getLogger("asyncio")
  handler = _LogHandler(workdir)
  orbax = _OrbaxRecords(workdir)
  hook, propagate = threading.excepthook, reports.propagate
  threading.excepthook = lambda args: _append_quietly(
    workdir,
    f"in thread {getattr(args.thread, 'name', '?')}:\n"
    + "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)),
  )
  reports.addHandler(handler)
  reports.propagate = False
  logging.getLogger("absl").addFilter(orbax)
  _route_late_reports(workdir)
  try:
    yield
  finally:
    threading.excepthook = hook
    reports.removeHandler(handler)
    reports.propagate = propagate
    logging.getLogger("absl").removeFilter(orbax)


_late = {}  # {'workdir': where reports from TensorStore's threads go}, once routed


def _route_late_reports(workdir) -> None:
  """TensorStore reports an error in a callback from its own threads (`sys.unraisablehook`,
  or `sys.excepthook` through PyErr_Print), and late: reads that a failed restore abandoned
  finish after Orbax closed their event loop ('Event loop is closed'), up to the process's
  exit, and the writes a failed save abandoned are closed as the interpreter shuts down.
  From the first restore on, such reports from threads other than the main one, and any
  made while the interpreter shuts down, go to the log."""
  if not _late:
    shown, unraisable = sys.excepthook, sys.unraisablehook

    def to_log(kind, value, tb) -> bool:
      if not _late_now():
        return False
      _append_quietly(_late["workdir"], "".join(traceback.format_exception(kind, value, tb)))
      return True

    sys.excepthook = lambda *report: to_log(*report) or shown(*report)
    sys.unraisablehook = lambda u: to_log(u.exc_type, u.exc_value, u.exc_traceback) or unraisable(u)
    # asyncio's 'Future exception was never retrieved', for a failed save's abandoned writes.
    logging.getLogger("asyncio").addFilter(_LateRecords())
  _late["workdir"] = workdir


def _late_now() -> bool:
  """Whether a report comes late: from a thread other than the main one, or while the
  interpreter shuts down."""
  return threading.current_thread() is not threading.main_thread() or sys.is_finalizing()


class _LateRecords(logging.Filter):
  """Moves late records (`_late_now`) to the log of the last work dir routed."""

  def filter(self, record_: logging.LogRecord) -> bool:
    if not _late_now():
      return True
    _append_quietly(_late["workdir"], logging.Formatter().format(record_))
    return False


def _append_quietly(workdir, text: str) -> None:
  """`_append`, for reports made while something else failed: a log that cannot be written
  (a full disk), or one reached while the interpreter shuts down, must not replace the error
  being reported."""
  with contextlib.suppress(Exception):
    _append(workdir, text)


class _OrbaxRecords(logging.Filter):
  """Moves Orbax's records (warnings and worse) from absl's logger to the work dir's log."""

  def __init__(self, workdir):
    super().__init__()
    self.workdir = workdir
    self.format = logging.Formatter().format

  def filter(self, record_: logging.LogRecord) -> bool:
    if f"{os.sep}orbax{os.sep}" not in record_.pathname or record_.levelno < logging.WARNING:
      return True
    _append_quietly(self.workdir, self.format(record_))
    return False


class _LogHandler(logging.Handler):
  """Appends each logging record (warnings and worse) to the work dir's log."""

  def __init__(self, workdir):
    super().__init__(logging.WARNING)
    self.workdir = workdir

  def emit(self, record_: logging.LogRecord) -> None:
    _append_quietly(self.workdir, self.format(record_))
