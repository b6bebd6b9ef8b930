"""One training run per work dir (ukd.runtime.lock): a second is refused, a dead run's lock is taken
over, and the modes that only read take none."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
from helpers import ROOT, run_module, tiny_config

from ukd import commands
from ukd.errors import WorkdirInUse
from ukd.runtime import lock

HOLDER = rf"host {re.escape(socket.gethostname())}, process {os.getpid()}, started \S+"


def test_a_second_training_is_refused_naming_the_holder(tmp_path):
  # flock locks belong to an open file: the second attempt opens the file again, as
  # another process would.
  with lock.training(tmp_path):
    with pytest.raises(
      WorkdirInUse, match=rf"^work dir {tmp_path} is in use by a training run \({HOLDER}\)$"
    ):
      with lock.training(tmp_path):
        pass


def test_training_takes_the_lock_before_any_work(tmp_path):
  with lock.training(tmp_path), pytest.raises(WorkdirInUse):
    commands.train_and_evaluate(tiny_config(), tmp_path)
  assert os.listdir(tmp_path) == [lock.LOCK]


def test_a_lock_left_by_a_dead_run_is_taken_over_with_one_line(tmp_path, capsys):
  dead = '{"host": "node7", "process": 4242, "started": "2025-01-02T03:04:05+00:00"}\n'
  (tmp_path / lock.LOCK).write_text(dead)
  with lock.training(tmp_path):
    assert str(os.getpid()) in (tmp_path / lock.LOCK).read_text()
  assert capsys.readouterr().out == (
    f"ukd: took over the lock of work dir {tmp_path} left by a training run that was killed "
    "(host node7, process 4242, started 2025-01-02T03:04:05+00:00)\n"
  )
  with pytest.raises(ZeroDivisionError), lock.training(tmp_path):  # an end, if with an error,
    raise ZeroDivisionError  # leaves nothing to take over
  with lock.training(tmp_path):
    pass
  assert capsys.readouterr().out == ""


def test_other_processes_of_a_job_take_no_lock(tmp_path):
  with lock.training(tmp_path):
    with lock.training(tmp_path, main_process=False):
      pass


def test_a_lease_refuses_a_second_run_and_a_lapsed_one_is_taken_over(tmp_path, capsys):
  """The lease object stores get, on a local folder: files.path reaches both alike."""
  path = tmp_path / lock.LEASE
  with lock.lease(tmp_path, settle=0):
    held = json.loads(path.read_text())
    assert held["host"] == socket.gethostname() and held["process"] == os.getpid()
    with pytest.raises(WorkdirInUse, match=rf"^work dir {tmp_path} is in use .*host "):
      with lock.lease(tmp_path, settle=0):
        pass
  assert not path.exists()  # ended: the next run takes it without a word
  path.write_text(json.dumps(dict(held, process=1, expires=time.time() - 1)))
  with lock.lease(tmp_path, settle=0):
    pass
  (line,) = capsys.readouterr().out.splitlines()
  assert line.startswith(f"ukd: took over the lease of work dir {tmp_path} left by a training ")
  assert "process 1," in line


def test_a_lease_overwritten_while_it_settles_is_refused_and_a_held_one_is_renewed(
  tmp_path, monkeypatch
):
  path = tmp_path / lock.LEASE
  other = dict(host="elsewhere", process=7, started="then", token="theirs", expires=1e12)
  monkeypatch.setattr(lock.time, "sleep", lambda _: path.write_text(json.dumps(other)))
  with pytest.raises(WorkdirInUse, match="host elsewhere, process 7"):
    with lock.lease(tmp_path, settle=1):
      pass
  monkeypatch.undo()
  path.unlink()
  with lock.lease(tmp_path, seconds=0.3, settle=0):
    first = json.loads(path.read_text())["expires"]
    time.sleep(0.4)  # at least one renewal, every 0.1 s
    assert json.loads(path.read_text())["expires"] > first


def test_training_on_an_object_store_holds_a_lease(tmp_path, monkeypatch):
  monkeypatch.setattr(lock.files, "is_remote", lambda p: True)
  monkeypatch.setattr(lock, "SETTLE_SECONDS", 0.0)
  with lock.training(tmp_path):
    assert (tmp_path / lock.LEASE).exists() and not (tmp_path / lock.LOCK).exists()


@pytest.mark.slow
def test_a_second_training_process_is_refused_while_the_first_runs_on(tmp_path):
  """Two processes for real: the second exits 2 at once with one line, the first finishes."""
  workdir = str(tmp_path / "run")
  args = [f"--config={os.path.join(ROOT, 'configs', 'demo.py')}:tiny", f"--workdir={workdir}"]
  first = subprocess.Popen(
    [sys.executable, "-m", "ukd.main", *args, "--config.overlays=0"],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  held = os.path.join(workdir, lock.LOCK)
  deadline = time.time() + 120
  while time.time() < deadline and first.poll() is None:
    if os.path.exists(held) and os.path.getsize(held):
      break
    time.sleep(0.05)
  second = run_module("ukd.main", *args, check=False, timeout=120)
  _, first_err = first.communicate(timeout=600)
  assert first.returncode == 0, first_err[-3000:]
  assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
  holder = rf"host {re.escape(socket.gethostname())}, process {first.pid}, started \S+"
  assert re.fullmatch(
    rf"ukd: error: work dir {workdir} is in use by a training run \({holder}\)\n", second.stderr
  ), second.stderr[-3000:]
