"""Damaged checkpoints: resuming goes on from the newest one that restores.

A checkpoint Orbax committed can still be damaged afterwards: a disk error truncates a data
file, a half-finished copy of the work dir misses `_METADATA`.  Resuming must not die on it
when an older checkpoint beside it is whole (Orbax keeps the latest and the best), nor make
the user delete folders by hand.  So a resume tries the checkpoints newest first; each that
fails to restore is moved aside to `checkpoints/damaged/<step>/` (kept, for a look or a
rescue; never deleted) and named in one line with the first line of its error, the whole
error going to `<workdir>/ukd.log` (`ukd.runtime.fault_log`).  When none restores, nothing is moved
(a cause common to all, such as an unreadable mount, is no damage to them) and the run stops
with one line naming each.

Only what fails to restore counts as damaged; a checkpoint of another network
(`checkpoints.check_resumable`) still stops the run, since an older one would not fit either.
"""

import jax
from etils import epath
from jax.experimental import multihost_utils

from ukd.errors import CheckpointError, UkdError
from ukd.runtime import checkpoints, fault_log

DAMAGED = "damaged"  # <workdir>/checkpoints/damaged/<step>


def restore_newest(mgr, config, abstract_state, workdir, *, main_process: bool = True):
  """The newest checkpoint of `mgr` that restores, damaged newer ones moved aside.

  Args:
    mgr: the run's checkpoint manager.
    config: the run's config, checked against each checkpoint's (`check_resumable`).
    abstract_state: the train state's shapes and shardings.
    workdir: the run's work dir (its `ukd.log`).
    main_process: whether this process moves folders and prints (process 0 of a job).

  Returns:
    (step, restored state), or (0, None) when the work dir has no checkpoint.

  Raises:
    CheckpointError: none restores; or a checkpoint holds another network.
  """
  failed = []  # (step, reason), newest first
  with fault_log.background_errors(workdir):
    for step in sorted(mgr.all_steps(), reverse=True):
      try:
        checkpoints.check_resumable(mgr, step, config)
        state = checkpoints.restore_train(mgr, step, abstract_state)
      except UkdError:
        raise
      except Exception as e:  # whatever Orbax or TensorStore raise for a damaged folder
        failed.append((step, fault_log.record(workdir, f"restoring checkpoint {step}", e)))
        continue
      _set_aside(mgr, failed, workdir, main_process)
      return step, state
  if failed:
    each = "; ".join(f"step {step}: {reason}" for step, reason in failed)
    raise CheckpointError(
      f"no checkpoint in {mgr.directory} restores ({each}){fault_log.details(workdir)}"
    )
  return 0, None


def damaged_error(mgr, step, error: Exception, workdir) -> CheckpointError:
  """The one-line error for a checkpoint asked for by name (evaluate, predict, export) that
  fails to restore; nothing is moved, since those modes only read the work dir."""
  reason = fault_log.record(workdir, f"restoring checkpoint {step}", error)
  return CheckpointError(
    f"checkpoint {mgr.directory}/{step} is damaged: {reason}{fault_log.details(workdir)}"
  )


def _set_aside(mgr, failed, workdir, main_process: bool) -> None:
  """Moves each failed step's folder to `damaged/`, one line each, then lets every process's
  manager see the steps that are left."""
  if main_process:
    for step, reason in failed:
      moved = _move(epath.Path(mgr.directory), step)
      print(
        f"ukd: checkpoint {mgr.directory}/{step} is damaged ({reason}); moved to {moved}"
        f"{fault_log.details(workdir)}",
        flush=True,
      )
  if failed:
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("ukd: damaged checkpoints set aside")
    mgr.reload()


def _move(directory: epath.Path, step: int) -> epath.Path:
  """Renames `<directory>/<step>` to `<directory>/damaged/<step>` (`<step>.2`, ... when an
  earlier damaged copy of the step is there)."""
  aside = directory / DAMAGED
  aside.mkdir(parents=True, exist_ok=True)
  target, n = aside / str(step), 1
  while target.exists():
    n += 1
    target = aside / f"{step}.{n}"
  (directory / str(step)).rename(target)
  return target
