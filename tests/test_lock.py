"""One training run per work dir (ukd.runtime.lock): a second is refused, a dead run's lock is taken
over, and the modes that only read take none."""

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


def test_other_processes_of_a_job_and_object_stores_take_no_lock(tmp_path):
  with lock.training(tmp_path):
    with lock.training(tmp_path, main_process=False):
      pass
  with lock.training("gs://bucket/run"):
    pass


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
