"""Atomic file writes: a file ukd writes is either its old self or complete, never half of one.

A run can be killed at any moment (a full disk, a pre-empted machine, Ctrl-C), and a truncated
prediction, metrics.json or splits.json under its final name looks like a finished one.  So
every file is written under a temporary name in the same folder (same file system, so the
rename cannot become a copy) and renamed onto its final name with `os.replace`, which is
atomic on POSIX and Windows.  The temporary name holds the process id and a random part, so
two processes (or threads) writing the same file never share one, and it keeps the final
name's extension, so writers that choose a format by extension (nibabel's `.nii.gz`,
Pillow's `.png`) still do.  A write that raises removes its temporary file; one killed
outright leaves a hidden `.tmp-<pid>-*` file, never a truncated file under the final name.
Results made of several files (a cache entry, a phantom dataset) are built in a temporary
folder and renamed the same way (`new_directory`).
"""

import contextlib
import json
import os
import secrets
import shutil


def _temporary(path: str) -> str:
  """A fresh hidden name next to `path`, ending like it.  Named, not created (mkstemp and
  mkdtemp create mode 0600 / 0700): the writer creates it with the user's usual permissions,
  so a prediction is as readable as any other file they write."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  name = f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{os.path.basename(path)}"
  return os.path.join(folder, name)


@contextlib.contextmanager
def replacing(path):
  """Yields a temporary path next to `path`; a clean exit renames it onto `path`.

  `with files.replacing("out.nii.gz") as tmp: nib.save(image, tmp)`.  Missing folders are
  created.  If the body raises, `path` keeps what it held before and the temporary is removed.
  """
  path = os.fspath(path)
  tmp = _temporary(path)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def new_directory(path):
  """Yields an empty temporary folder next to `path`; a clean exit renames it to `path`.

  For results made of several files (a cache entry, a generated dataset): they appear all
  at once or not at all.  If `path` appeared meanwhile (another process finished the same
  work first) theirs is kept and ours removed; a body that raises leaves nothing behind.
  """
  path = os.fspath(path)
  tmp = _temporary(path)
  os.mkdir(tmp)
  try:
    yield tmp
    try:
      os.rename(tmp, path)
    except OSError:
      if not os.path.isdir(path):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # nothing left after a successful rename


def write_text(path, text: str, newline: str | None = None) -> None:
  """Writes `text` to `path` atomically (`newline` as for `open`; '' keeps CSV line ends)."""
  with replacing(path) as tmp, open(tmp, "w", newline=newline) as f:
    f.write(text)


def write_json(path, value, **dump_options) -> None:
  """`value` as indented JSON plus a final newline, written atomically."""
  write_text(path, json.dumps(value, indent=2, **dump_options) + "\n")
