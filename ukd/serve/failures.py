"""How prediction meets a case's failure: one line per failed case, and the stop when a
refused write would fail every case after it (a full or read-only output), so that the same
failure is not printed once per remaining case."""

import errno
import logging
import os

from ukd import files
from ukd.errors import DataError, WriteError

# Refusals that every later case would meet too: the output's file system is full or
# read-only.  A refused permission counts when the output folder is not writable.
EVERY_CASE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
FORBIDDEN = (errno.EACCES, errno.EPERM)


def hits_every_case(e: Exception, folder: str) -> bool:
  """Whether the failed write `e` into the output `folder` would fail every case after it,
  so that going on would print the same failure once per remaining case."""
  code = files.refused_errno(e)
  if code in FORBIDDEN and not files.is_remote(folder):
    return not os.access(folder, os.W_OK)
  return code in EVERY_CASE


def stopped(e: Exception, folder: str, reached: int, failed: int, total: int) -> WriteError:
  """The run's one last line when a write refused for every case stopped it after `reached`
  of `total` cases, `failed` of them failed."""
  return WriteError(
    f"{folder}: cannot write: {files.refused_cause(e)}; stopped after {reached} of {total} "
    f"cases ({reached - failed} written); once fixed, the same command with --continue "
    "predicts the rest"
  )


def case_error(source: str, stage: str, e: Exception) -> DataError:
  """A case's failure as its one line: a DataError as it is; a refused write by its own
  line (it names the file and the cause); anything else named by the case, the stage and the
  exception (its traceback in the log, shown with --verbosity)."""
  if isinstance(e, DataError):
    return e
  if isinstance(e, WriteError):
    wrapped = DataError(f"{source}: {stage} failed: {e}")
    wrapped.__cause__ = e
    return wrapped
  logging.getLogger(__name__).info("%s: %s failed", source, stage, exc_info=e)
  text = " ".join(str(e).split()) or "no message"
  wrapped = DataError(f"{source}: {stage} failed ({type(e).__name__}: {text})")
  wrapped.__cause__ = e
  return wrapped
