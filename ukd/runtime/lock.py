"""One training run per work dir.

Two trainings writing one work dir destroy each other's work without a word: one renames
its metrics.jsonl over the other's, both save checkpoints of the same steps into one folder,
and Orbax, which assumes a single writer, fails in the middle of a save.  So training holds
an exclusive lock on its work dir for its whole life, taken before any work; a second
training is refused at once, naming the holder.

Locally the lock is `fcntl.flock` on `<workdir>/.lock`.  The operating system releases it
when the holder's process ends, however it ends (SIGKILL, a crash, a lost node), so a lock
is never left stale; the file itself stays, holding the last holder's host, process id and
start time.  A holder that ends, even with an error, empties the file, so a non-empty file
found unlocked was left by a run that was killed: the new run takes it over and says so.
The lock is per open file: another training on the same machine, or on another machine
sharing the work dir over NFS (Linux emulates flock there with NFS byte-range locks), is
refused.
File systems without working locks (some FUSE mounts) cannot be guarded this way.

Object stores (`gs://...`) have no lock a dead process releases, so a run there holds a
lease instead: `<workdir>/.lease` names the holder and an expiry `LEASE_SECONDS` ahead,
which a thread of the holder renews every third of that.  A second training finds an
unexpired lease and is refused in one line; a lease its holder stopped renewing (the run was
killed) expires and is taken over with one line.  What it cannot guarantee: an object store
offers no atomic "create if absent" through the file API ukd writes with, so two runs that
start within `SETTLE_SECONDS` of each other both write a lease; each reads it back after that
pause and the one whose lease was overwritten is refused, which covers every start but two
whose writes and reads interleave exactly.  A holder suspended for longer than the lease (a
stopped VM) finds at its next renewal that another run took over and says so in one line; it
cannot stop that run.

In a multi-process job process 0 holds the lock for the job.  The modes that only read a
work dir (evaluate, predict, export) take no lock; what they write is written atomically
under unique temporary names (`ukd.files`).
"""

import contextlib
import datetime
import fcntl
import json
import os
import secrets
import socket
import threading
import time

from ukd import files
from ukd.errors import WorkdirInUse

LOCK = ".lock"  # <workdir>/.lock
LEASE = ".lease"  # <workdir>/.lease, on object stores
LEASE_SECONDS = 120.0
SETTLE_SECONDS = 5.0


@contextlib.contextmanager
def training(workdir, *, main_process: bool = True):
  """Holds the work dir's training lock for the body (see the module docstring).

  Args:
    workdir: the run's work dir, an existing local folder or a `gs://...` URL (not locked).
    main_process: whether this process takes the lock (process 0 of a job); others don't.

  Raises:
    WorkdirInUse: another process holds it; the message names it.
  """
  if not main_process:
    yield
    return
  if files.is_remote(workdir):
    with lease(workdir):
      yield
    return
  path = os.path.join(os.fspath(workdir), LOCK)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    acquire(fd, workdir)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)  # ended, if with an error: nothing to take over
  finally:
    os.close(fd)  # releases the lock


def acquire(fd: int, workdir) -> None:
  """Locks the open lock file `fd` and writes this process into it; a run that died
  holding it (a non-empty, unlocked file) is named in one line."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    raise WorkdirInUse(f"work dir {workdir} is in use by a training run ({_holder(fd)})") from None
  if os.fstat(fd).st_size:
    print(
      f"ukd: took over the lock of work dir {workdir} left by a training run that was killed "
      f"({_holder(fd)})",
      flush=True,
    )
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(_this_process()) + "\n").encode(), 0)


def _this_process() -> dict:
  """What a lock or lease says of its holder."""
  return dict(
    host=socket.gethostname(),
    process=os.getpid(),
    started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
  )


def _holder(fd: int) -> str:
  """'host H, process P, started T' from the lock file; 'holder unknown' when it holds no
  record yet (the holder is between taking the lock and writing it) or an unreadable one."""
  try:
    return _named(json.loads(os.pread(fd, 4096, 0)))
  except ValueError:
    return "holder unknown"


@contextlib.contextmanager
def lease(workdir, *, seconds: float | None = None, settle: float | None = None, clock=time.time):
  """Holds the work dir's lease for the body (the module docstring), renewing it on a thread;
  `seconds` and `settle` default to `LEASE_SECONDS` and `SETTLE_SECONDS`.

  Raises:
    WorkdirInUse: an unexpired lease of another run, or one that overwrote this run's.
  """
  seconds = LEASE_SECONDS if seconds is None else seconds
  settle = SETTLE_SECONDS if settle is None else settle
  path = files.path(workdir) / LEASE
  found = _read_lease(path)
  if found and found["expires"] > clock():
    raise WorkdirInUse(f"work dir {workdir} is in use by a training run ({_named(found)})")
  if found:
    print(
      f"ukd: took over the lease of work dir {workdir} left by a training run that stopped "
      f"renewing it ({_named(found)})",
      flush=True,
    )
  mine = dict(_this_process(), token=secrets.token_hex(8))
  files.write_json(path, dict(mine, expires=clock() + seconds))
  time.sleep(settle)
  now = _read_lease(path)
  if not now or now.get("token") != mine["token"]:
    raise WorkdirInUse(f"work dir {workdir} is in use by a training run ({_named(now or {})})")
  stop = threading.Event()
  renewer = threading.Thread(
    target=_renew, args=(path, mine, seconds, clock, stop, workdir), daemon=True
  )
  renewer.start()
  try:
    yield
  finally:
    stop.set()
    renewer.join()
    if (_read_lease(path) or {}).get("token") == mine["token"]:
      path.unlink()  # ended, if with an error: nothing to take over


def _renew(path, mine: dict, seconds: float, clock, stop: threading.Event, workdir) -> None:
  """Rewrites the lease's expiry every third of its length until `stop`; a lease another run
  took over (this one was suspended past its expiry) is said once and no longer renewed."""
  while not stop.wait(seconds / 3):
    current = _read_lease(path) or {}
    if current.get("token") != mine["token"]:
      print(
        f"ukd: work dir {workdir}: another training run took over this run's expired lease "
        f"({_named(current)}); both now write the work dir",
        flush=True,
      )
      return
    files.write_json(path, dict(mine, expires=clock() + seconds))


def _read_lease(path) -> dict | None:
  """The lease record, or None where there is none (or an unreadable one, taken as none)."""
  try:
    record = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  return record if isinstance(record, dict) and "expires" in record else None


def _named(record) -> str:
  """'host H, process P, started T' of a lock or lease record; 'holder unknown' without one."""
  try:
    return f"host {record['host']}, process {record['process']}, started {record['started']}"
  except (KeyError, TypeError):
    return "holder unknown"
