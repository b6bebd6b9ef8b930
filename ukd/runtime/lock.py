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

Object stores (`gs://...`) have no such lock: a run there takes none and two trainings on
one remote work dir are not prevented (a lease the holder refreshes would be needed);
each checkpoint Orbax commits is still whole.

In a multi-process job process 0 holds the lock for the job.  The modes that only read a
work dir (evaluate, predict, export) take no lock; what they write is written atomically
under unique temporary names (`ukd.files`).
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket

from ukd import files
from ukd.errors import WorkdirInUse

LOCK = ".lock"  # <workdir>/.lock


@contextlib.contextmanager
def training(workdir, *, main_process: bool = True):
  """Holds the work dir's training lock for the body (see the module docstring).

  Args:
    workdir: the run's work dir, an existing local folder or a `gs://...` URL (not locked).
    main_process: whether this process takes the lock (process 0 of a job); others don't.

  Raises:
    WorkdirInUse: another process holds it; the message names it.
  """
  if not main_process or files.is_remote(workdir):
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
  me = dict(
    host=socket.gethostname(),
    process=os.getpid(),
    started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
  )
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)


def _holder(fd: int) -> str:
  """'host H, process P, started T' from the lock file; 'holder unknown' when it holds no
  record yet (the holder is between taking the lock and writing it) or an unreadable one."""
  try:
    record = json.loads(os.pread(fd, 4096, 0))
    return f"host {record['host']}, process {record['process']}, started {record['started']}"
  except (ValueError, KeyError, TypeError):
    return "holder unknown"
