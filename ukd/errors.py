"""The errors a user can fix, in one place.

Everything ukd reports about the user's own input (a config, a dataset, a work dir) or about
a run that cannot go on raises a `UkdError` with a one-line message that names the setting or
file first.  The command line (`ukd.cli`) catches exactly `UkdError` and prints it as
`ukd: error: <message>` without a traceback; any other exception is a bug and keeps its
traceback.  Keeping the classes here, rather than next to the code that raises them, lets
every module raise them without importing the others, and lets the command line catch them
without importing JAX.

The subclasses also derive from ValueError (bad input) or RuntimeError (a run that stops), so
callers that catch those keep working.
"""

import importlib
import sys


class UkdError(Exception):
  """A problem for the user to fix, with a one-line message; shown without a traceback."""

  exit_code = 2  # the command line's exit status


class ConfigError(UkdError, ValueError):
  """A config or command line that cannot run; the message names the field or flag."""


class DataError(UkdError, ValueError):
  """Bad input data or dataset layout; the message names the file and the problem."""


class MissingExtra(ConfigError):
  """A mode, flag or input that needs an optional extra which is not installed."""


def import_extra(module: str, extra: str, what: str):
  """`module`, imported where the job that needs it runs: the optional extras (DICOM, ONNX,
  OpenVINO, cloud storage) are never imported at start-up, so a bare install runs every mode
  that needs none, and one that needs one stops before any work with the command to fix it."""
  try:
    return importlib.import_module(module)
  except ImportError:
    raise MissingExtra(f"{what} needs the '{extra}' extra: pip install 'ukd[{extra}]'") from None


class CheckpointError(UkdError, ValueError):
  """A work dir or checkpoint that cannot be used, with a one-line reason."""


class WorkdirInUse(UkdError, RuntimeError):
  """Another training run holds the work dir (`ukd.runtime.lock`); the message names it."""


class WriteError(UkdError, OSError):
  """A file that cannot be written (a full disk, a quota, a read-only or forbidden folder);
  the message names the path and the cause.  Exits 74, EX_IOERR of BSD's sysexits, so a
  script can tell it from a bad input; nothing partial is left under the final name, and the
  same command goes on once the cause is fixed."""

  exit_code = 74


class TrainingError(UkdError, RuntimeError):
  """A run that cannot go on (e.g. a non-finite loss), with a one-line reason."""

  exit_code = 3


class Preempted(UkdError):
  """SIGTERM (Cloud TPU or SLURM preemption, Kubernetes eviction) stopped training after a
  checkpoint of the step reached was saved; the same command resumes from it. Exits 143
  (128 + SIGTERM), as a process ended by that signal does, so schedulers requeue it."""

  exit_code = 143

  def __init__(self, step: int):
    super().__init__(f"preempted at step {step}; checkpoint saved, the same command resumes")
    self.step = step


def error(cls: type[UkdError], source, problem) -> UkdError:
  """`cls("<source>: <problem>")` on one line, so logs show the file and its problem together."""
  return cls(f"{source}: {' '.join(str(problem).split())}")


def exit_with(e: UkdError) -> None:
  """The command lines' ending for a UkdError: one `ukd: error: ...` line (`ukd: stopped:`
  for a preemption) on stderr, no traceback, and the error's exit status."""
  kind = "stopped" if isinstance(e, Preempted) else "error"
  print(f"ukd: {kind}: {e}", file=sys.stderr)
  sys.exit(e.exit_code)
