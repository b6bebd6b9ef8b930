"""Atomic writes (ukd.files): a killed or failing write never leaves a truncated file."""

import errno
import os
import subprocess
import sys

import pytest

from ukd import files
from ukd.errors import WriteError

# Writes half of the new content through `files.replacing`, then dies as a kill would.
_KILLED_MIDWAY = """
import os, signal, sys
from ukd import files
from ukd.errors import WriteError
with files.replacing(sys.argv[1]) as tmp:
  with open(tmp, "w") as f:
    f.write("new con")
    f.flush()
  os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_process_killed_midway_leaves_the_old_file_under_its_name(tmp_path):
  path = tmp_path / "splits.json"
  path.write_text("old content")
  out = subprocess.run([sys.executable, "-c", _KILLED_MIDWAY, str(path)], timeout=60)
  assert out.returncode == -9
  assert path.read_text() == "old content"
  (left,) = [p.name for p in tmp_path.iterdir() if p != path]
  assert left.startswith(".tmp-") and left.endswith("-splits.json")  # hidden, never the name


def test_a_write_that_raises_keeps_the_old_file_and_leaves_nothing_else(tmp_path):
  path = tmp_path / "metrics.json"
  path.write_text("old")
  with pytest.raises(RuntimeError, match="midway"):
    with files.replacing(path) as tmp:
      with open(tmp, "w") as f:
        f.write("ne")
      raise RuntimeError("midway")
  assert path.read_text() == "old"
  assert os.listdir(tmp_path) == ["metrics.json"]


def test_written_files_replace_old_ones_with_the_usual_permissions(tmp_path):
  path = tmp_path / "new" / "cases.csv"  # missing folders are made
  files.write_text(path, "a,b\r\n1,2\r\n", newline="")
  assert path.read_bytes() == b"a,b\r\n1,2\r\n"
  files.write_json(path, {"b": [1, 2], "a": None}, sort_keys=True)
  assert path.read_text() == '{\n  "a": null,\n  "b": [\n    1,\n    2\n  ]\n}\n'
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_a_new_directory_appears_whole_or_not_at_all(tmp_path):
  entry = tmp_path / "cache" / "case-1234"
  with pytest.raises(KeyboardInterrupt):
    with files.new_directory(entry) as tmp:
      (tmp_path / "cache" / os.path.basename(tmp) / "image.npy").write_bytes(b"half")
      raise KeyboardInterrupt
  assert os.listdir(tmp_path / "cache") == []
  with files.new_directory(entry) as tmp:
    with open(os.path.join(tmp, "image.npy"), "wb") as f:
      f.write(b"whole")
  # Another process finishing the same entry first: theirs is kept, ours removed.
  with files.new_directory(entry) as tmp:
    with open(os.path.join(tmp, "image.npy"), "wb") as f:
      f.write(b"second")
  assert (entry / "image.npy").read_bytes() == b"whole"
  assert os.listdir(tmp_path / "cache") == ["case-1234"]


@pytest.mark.parametrize(
  "code,cause",
  [
    (errno.ENOSPC, "no space left on device"),
    (errno.EROFS, "read-only file system"),
    (errno.EACCES, "permission denied"),
  ],
)
def test_a_refused_write_is_one_line_naming_the_path_and_cause_and_leaves_the_old_file(
  code, cause, tmp_path, monkeypatch
):
  path = tmp_path / "metrics.json"
  path.write_text("old content")
  real_open = open

  def refusing(name, mode="r", *args, **kwargs):
    if "w" in mode:
      raise OSError(code, os.strerror(code), name)
    return real_open(name, mode, *args, **kwargs)

  monkeypatch.setattr("builtins.open", refusing)
  with pytest.raises(WriteError) as raised:
    files.write_json(path, {"new": 1})
  monkeypatch.undo()
  assert str(raised.value) == f"{path}: cannot write: {cause}"
  assert raised.value.exit_code == 74
  assert path.read_text() == "old content" and os.listdir(tmp_path) == ["metrics.json"]


def test_other_errors_of_a_write_are_not_taken_for_a_refusal(tmp_path):
  with pytest.raises(FileNotFoundError), files.replacing(tmp_path / "x.txt") as tmp:
    open(os.path.join(tmp, "missing", "y"))
