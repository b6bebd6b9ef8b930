"""Paths, local or on cloud storage, and atomic file writes.

Paths.  A work dir, dataset root, prediction folder or study dir may be a local path or a URL
of an object store (`gs://bucket/run`; s3://, az:// and hf:// as well): `path` turns what the
user gave into an `etils.epath.Path` (a local path made absolute, as `os.path.abspath` does;
a URL as given), and every file ukd reads or writes goes through epath, so one code path
serves both.  Functions further down take the paths they are handed as they are
(`files.Path(p)`); only `path` resolves.  Readers that need a local file (nibabel, pydicom,
Pillow) get one from `local_file`.

Atomic writes: a file ukd writes is either its old self or complete, never half of one.
A run can be killed at any moment (a full disk, a pre-empted machine, Ctrl-C), and a truncated
prediction, metrics.json or splits.json under its final name looks like a finished one.

Locally, every file is written under a temporary name in the same folder (same file system,
so the rename cannot become a copy) and renamed onto its final name with `os.replace`, which
is atomic on POSIX and Windows.  The temporary name holds the process id and a random part, so
two processes (or threads) writing the same file never share one, and it keeps the final
name's extension, so writers that choose a format by extension (nibabel's `.nii.gz`,
Pillow's `.png`) still do.  A write that raises removes its temporary file; one killed
outright leaves a hidden `.tmp-<pid>-*` file, never a truncated file under the final name.
Results made of several files (a cache entry, a phantom dataset) are built in a temporary
folder and renamed the same way (`new_directory`).

An object store has no rename, but it creates an object only when its upload completes: a
file is written to a local temporary file and copied to its name in one upload (`upload`),
so a kill leaves the old object or none, never a truncated one.
"""

import contextlib
import csv
import errno
import importlib.util
import io
import json
import os
import posixpath
import re
import secrets
import shutil
import tempfile

try:
  from etils.epath import Path
except ImportError:  # an exported model's runner on local files (`ukd.exported`) needs no more
  from pathlib import Path

from ukd.errors import ConfigError, WriteError, error, import_extra

# The URL schemes epath reads and writes: through TensorFlow's gfile where it is installed,
# else fsspec (gcsfs for gs://).
REMOTE_SCHEMES = ("gs", "s3", "az", "hf")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_remote(p) -> bool:
  """Whether `p` names an object store (`gs://...`) rather than a local file."""
  match = _URL.match(os.fspath(p))
  return match is not None and match.group(1) in REMOTE_SCHEMES


def path(p) -> Path:
  """A user's path as a `Path` (etils' where installed): local paths made absolute, `gs://...` left as it is.

  Without this, `os.path.abspath("gs://bucket/run")` is a local folder named `gs:`.  A URL
  of a scheme epath cannot write to is refused rather than taken for a local name.
  """
  text = os.fspath(p)
  match = _URL.match(text)
  if match is None:
    return Path(os.path.abspath(text))
  if match.group(1) not in REMOTE_SCHEMES:
    schemes = ", ".join(f"{s}://" for s in REMOTE_SCHEMES)
    raise error(ConfigError, text, f"unsupported storage {match.group(1)}://; use {schemes}")
  import_extra("etils", "gcs", text)  # remote paths are epath's
  if match.group(1) == "gs" and importlib.util.find_spec("tensorflow") is None:
    import_extra("gcsfs", "gcs", text)  # epath reaches gs:// through gcsfs without TensorFlow
  return Path(text)


def makedirs(folder) -> None:
  """Creates a local folder and its parents; on an object store, where folders do not
  exist (an object's name holds its whole path), there is nothing to create."""
  if not is_remote(folder):
    os.makedirs(folder, exist_ok=True)


def walk(folder):
  """(folder, subfolders, file names) below `folder`, top down, as `os.walk` gives them; on
  an object store through epath."""
  if is_remote(folder):
    return ((os.fspath(top), dirs, names) for top, dirs, names in Path(folder).walk())
  return os.walk(os.fspath(folder))


def join(folder, name: str) -> str:
  """`folder`/`name` as a string, for a local folder or a URL alike."""
  return os.fspath(Path(folder) / name)


def glob(folder, pattern: str) -> list[str]:
  """Paths (as strings) of `folder`'s entries matching `pattern`, sorted; [] when there is
  no such folder."""
  return sorted(os.fspath(p) for p in Path(folder).glob(pattern))


def upload(local, dst) -> None:
  """Copies the local file `local` to `dst` on an object store in one upload: the object
  appears when the upload completes, whole."""
  Path(local).copy(Path(dst), overwrite=True)


@contextlib.contextmanager
def _local_stand_in(p):
  """A local path with `p`'s file name (readers and writers that go by the extension still
  do), in a temporary folder removed afterwards."""
  with tempfile.TemporaryDirectory(prefix="ukd-") as staging:
    yield os.path.join(staging, posixpath.basename(os.fspath(p)))


@contextlib.contextmanager
def local_file(p):
  """Yields a local path holding the file `p`: `p` itself when local, else a temporary copy
  with the same name, removed afterwards."""
  if not is_remote(p):
    yield os.fspath(p)
    return
  with _local_stand_in(p) as local:
    Path(p).copy(local)
    yield local


def _temporary(path: str) -> str:
  """A fresh hidden name next to `path`, ending like it.  Named, not created (mkstemp and
  mkdtemp create mode 0600 / 0700): the writer creates it with the user's usual permissions,
  so a prediction is as readable as any other file they write."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  name = f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{os.path.basename(path)}"
  return os.path.join(folder, name)


_TEMPORARY = re.compile(r"^\.tmp-(\d+)-[0-9a-f]{8}-")


def remove_stale_temporaries(folder) -> list[str]:
  """Removes the temporary files and folders (`_temporary`) that processes no longer running
  left in the local `folder` when they were killed; returns their paths.

  A temporary's name holds its writer's process id: one still running on this machine keeps
  its temporaries, so two runs writing one folder do not break each other's writes.  (A
  writer on another machine sharing the folder cannot be told from a dead one.)
  """
  if is_remote(folder) or not os.path.isdir(folder):
    return []  # an object store's temporaries are local ones, removed with their folder
  removed = []
  for name in sorted(os.listdir(folder)):
    match = _TEMPORARY.match(name)
    if match and not _running(int(match.group(1))):
      stale = os.path.join(folder, name)
      if os.path.isdir(stale) and not os.path.islink(stale):
        shutil.rmtree(stale)
      else:
        os.remove(stale)
      removed.append(stale)
  return removed


def _running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # another user's process
  return True


@contextlib.contextmanager
def replacing(path):
  """Yields a temporary local path; a clean exit puts it in place as `path`.

  `with files.replacing("out.nii.gz") as tmp: nib.save(image, tmp)`.  Locally the temporary
  sits next to `path` and is renamed onto it; for a remote `path` it sits in a local
  temporary folder and is uploaded (`upload`).  Missing folders are created.  If the body
  raises, `path` keeps what it held before and the temporary is removed.
  """
  path = os.fspath(path)
  if is_remote(path):
    with _local_stand_in(path) as tmp:
      yield tmp
      upload(tmp, path)
    return
  tmp = None
  try:
    with refusals(path):
      tmp = _temporary(path)
      yield tmp
      os.replace(tmp, path)
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def refusals(path):
  """Within the body, an OSError saying the file system refused a write under the local
  `path` (a file, or a folder being written) is a one-line `WriteError` naming `path`
  (`raise_if_refused`); any other error passes as it is."""
  try:
    yield
  except OSError as e:
    raise_if_refused(path, _explained(e, os.path.dirname(os.path.abspath(path))))
    raise


_CANNOT_WRITE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
# TensorStore (under Orbax's checkpoints) gives the OS error only in its message.
_OS_ERROR_CODE = re.compile(r"\[os_error_code='(\d+)'\]")


def refused_errno(e: BaseException) -> int | None:
  """The errno (ENOSPC, EDQUOT, EROFS, EACCES, EPERM) when `e` or an error in its chain of
  causes says the file system refused a write; None for any other error.  Libraries wrap
  the OS error (Orbax in a ValueError holding TensorStore's status), so the chain is
  searched, and a message's `[os_error_code='28']` counts."""
  while e is not None:
    code = e.errno if isinstance(e, OSError) else None
    if code is None and (found := _OS_ERROR_CODE.search(str(e))):
      code = int(found.group(1))
    if code in _CANNOT_WRITE:
      return code
    e = e.__cause__ or e.__context__
  return None


def refused_cause(e: BaseException) -> str | None:
  """'no space left on device' (or the read-only, quota or permission cause) for a refused
  write (`refused_errno`); None for any other error."""
  code = refused_errno(e)
  if code is None:
    return None
  cause = os.strerror(code)
  return cause[:1].lower() + cause[1:]


def raise_if_refused(path, e: OSError) -> None:
  """Raises `e` as a one-line `WriteError` naming `path` and the cause ('no space left on
  device') when it says the file system refused the write; returns for any other error."""
  cause = refused_cause(e)
  if cause is not None and not isinstance(e, WriteError):
    raise WriteError(f"{path}: cannot write: {cause}") from e


def check_writable(folder) -> None:
  """Writes a small hidden file into `folder` (made if missing) and removes it: an output
  folder that is read-only, full or forbidden is one `WriteError` line naming it before
  the model loads, not a traceback after minutes of work.  A few bytes, not an empty file:
  a full disk still creates empty files."""
  probe = f"{os.fspath(folder).rstrip('/')}/.tmp-{os.getpid()}-{secrets.token_hex(4)}-check"
  if is_remote(folder):
    Path(probe).write_bytes(bytes(_CHECK_BYTES))
    Path(probe).unlink()
    return
  with refusals(folder):
    os.makedirs(folder, exist_ok=True)
    try:
      with open(probe, "wb") as f:
        f.write(bytes(_CHECK_BYTES))
    finally:
      if os.path.exists(probe):
        os.remove(probe)


_CHECK_BYTES = 4096  # one page: what a write needs the file system to find room for
_PROBE_CHUNKS = 16  # a short write is explained by writing at most this many 64 KiB chunks


def _explained(e: OSError, folder) -> OSError:
  """`e`, or for a short write, which carries no errno (numpy's `tofile`, under `np.save`,
  says only '316840 requested and 147328 written'), the error a write in `folder` gets now
  (the same file system): the full disk or the quota the short write ran into, while its
  partial file still fills it.  Without this the user learns neither the cause nor the file."""
  if e.errno is not None or isinstance(e, WriteError) or not os.path.isdir(folder):
    return e
  try:
    with tempfile.TemporaryFile(dir=folder, buffering=0) as probe:
      for _ in range(_PROBE_CHUNKS):
        probe.write(bytes(1 << 16))
  except OSError as found:
    return found
  return e


@contextlib.contextmanager
def new_directory(path):
  """Yields an empty temporary local folder; a clean exit makes it `path`.

  For results made of several files (a cache entry, a generated dataset).  Locally the
  folder is renamed to `path`, so the files appear all at once or not at all.  An object
  store has no folders to rename: each file is uploaded whole (`upload`), one after another,
  hidden files (names starting with '.') last, so a marker file written into the folder
  (the phantoms' `.ukd_synthetic.json`) appears only once everything else is there.  If
  `path` appeared meanwhile (another process finished the same work first) theirs is kept
  and ours removed; a body that raises leaves nothing behind, and one the file system
  refuses (a full disk) is a `WriteError` naming `path` (`raise_if_refused`).
  """
  path = os.fspath(path)
  if is_remote(path):
    with tempfile.TemporaryDirectory(prefix="ukd-") as staging:
      yield staging
      if not Path(path).exists():
        _upload_tree(staging, path)
    return
  tmp = _temporary(path)
  try:
    with refusals(path):
      os.mkdir(tmp)
      yield tmp
      try:
        os.rename(tmp, path)
      except OSError:
        if not os.path.isdir(path):
          raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # nothing left after a successful rename


def _upload_tree(folder: str, dst: str) -> None:
  """Every file under the local `folder` to the same relative name under `dst`, hidden
  files last (`new_directory`)."""
  found = [
    os.path.relpath(os.path.join(root, name), folder)
    for root, _, names in os.walk(folder)
    for name in names
  ]
  for relative in sorted(found, key=lambda r: (os.path.basename(r).startswith("."), r)):
    upload(os.path.join(folder, relative), Path(dst) / relative)


def write_text(path, text: str, newline: str | None = None) -> None:
  """Writes `text` to `path` atomically (`newline` as for `open`; '' keeps CSV line ends)."""
  with replacing(path) as tmp, open(tmp, "w", newline=newline) as f:
    f.write(text)


def write_bytes(path, data: bytes) -> None:
  """Writes `data` to `path` atomically."""
  with replacing(path) as tmp, open(tmp, "wb") as f:
    f.write(data)


def write_json(path, value, **dump_options) -> None:
  """`value` as indented JSON plus a final newline, written atomically."""
  write_text(path, json.dumps(value, indent=2, **dump_options) + "\n")


def write_csv(path, fieldnames, rows) -> None:
  """`rows` (dicts keyed by `fieldnames`) as CSV under a header line, written atomically in
  the csv module's dialect (fields quoted where needed, CRLF line ends, as RFC 4180 has it)."""
  table = io.StringIO(newline="")
  writer = csv.DictWriter(table, fieldnames=fieldnames)
  writer.writeheader()
  writer.writerows(rows)
  write_text(path, table.getvalue(), newline="")
