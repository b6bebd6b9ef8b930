"""A damaged checkpoint (a truncated data file, a missing _METADATA) never stops a run that
can go on: resuming takes the newest that restores and moves the others aside (ukd.runtime.recovery);
a damaged one asked for by name is one line; one of another network names what differs."""

import glob
import os
import sys
import threading
import types

import jax
import numpy as np
import pytest
from helpers import random_variables, tiny_config

from ukd import config as config_lib
from ukd.errors import CheckpointError
from ukd.runtime import checkpoints, fault_log, recovery
from ukd.serve import segmenter as infer

STATE = {"w": np.arange(1000, dtype=np.float32), "b": np.ones((3, 4), np.float32)}


def _truncate_data(step_dir):
  """Cuts every OCDBT data file of the step's state short, as a disk error would."""
  found = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  assert found
  for path in found:
    with open(path, "r+b") as f:
      f.truncate(10)


def _drop_metadata(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _saved(workdir, config, state=STATE, steps=(2, 4)):
  """Checkpoints of `steps`, each kept (the first is the best, the last the latest)."""
  mgr = checkpoints.manager(workdir)
  for k, step in enumerate(steps):
    checkpoints.save(mgr, step, state, config, val_dice=1.0 - 0.1 * k)
  mgr.wait_until_finished()
  mgr.close()
  return os.path.join(workdir, "checkpoints")


@pytest.mark.parametrize("damage", [_truncate_data, _drop_metadata])
def test_resume_takes_the_newest_checkpoint_that_restores_and_moves_the_damaged_aside(
  damage, tmp_path, capsys
):
  config = tiny_config()
  folder = _saved(str(tmp_path), config)
  damage(os.path.join(folder, "4"))
  mgr = checkpoints.manager(str(tmp_path))
  step, state = recovery.restore_newest(mgr, config, jax.eval_shape(lambda: STATE), tmp_path)
  assert step == 2 and mgr.all_steps() == [2]
  np.testing.assert_array_equal(state["w"], STATE["w"])
  mgr.close()
  assert sorted(os.listdir(folder)) == ["2", "damaged"]
  assert os.listdir(os.path.join(folder, "damaged", "4"))  # kept, not deleted
  log = tmp_path / "ukd.log"
  (line,) = capsys.readouterr().out.splitlines()
  assert line.startswith(f"ukd: checkpoint {folder}/4 is damaged (")
  assert line.endswith(f"); moved to {folder}/damaged/4; details in {log}")
  # The cause is its first line, without TensorStore's spec (a few hundred characters).
  assert "tensorstore_spec" not in line and len(line.replace(str(tmp_path), "")) < 500
  assert "Traceback" in log.read_text()


def test_where_no_checkpoint_restores_one_line_names_each_and_nothing_moves(tmp_path):
  config = tiny_config()
  folder = _saved(str(tmp_path), config)
  for step in ("2", "4"):
    _drop_metadata(os.path.join(folder, step))
  mgr = checkpoints.manager(str(tmp_path))
  with pytest.raises(CheckpointError) as raised:
    recovery.restore_newest(mgr, config, jax.eval_shape(lambda: STATE), tmp_path)
  mgr.close()
  message = str(raised.value)
  assert "\n" not in message
  assert message.startswith(f"no checkpoint in {folder} restores (step 4: Metadata file")
  assert "; step 2: Metadata file" in message
  assert message.endswith(f"; details in {tmp_path / 'ukd.log'}")
  assert sorted(os.listdir(folder)) == ["2", "4"]


def test_a_damaged_step_asked_for_by_name_is_one_line(tmp_path):
  config = config_lib.check(tiny_config())
  folder = _saved(str(tmp_path), config, state=random_variables(config), steps=(3,))
  _truncate_data(os.path.join(folder, "3"))
  with pytest.raises(CheckpointError) as raised:
    infer.Segmenter.load(str(tmp_path), step="3")
  message = str(raised.value)
  assert message.startswith(f"checkpoint {folder}/3 is damaged: ") and "\n" not in message
  assert "does not fit" not in message and "tensorstore_spec" not in message
  assert os.listdir(folder) == ["3"]  # a reader moves nothing


def test_errors_reported_from_background_threads_go_to_the_log(tmp_path, capsys):
  """Orbax's threads (threading.excepthook) and TensorStore's, which report through
  sys.unraisablehook or sys.excepthook even after the restore gave up, write to ukd.log."""

  def fail(report):
    try:
      raise RuntimeError("a late report")
    except RuntimeError:
      report(*sys.exc_info())

  with fault_log.background_errors(tmp_path):
    thread = threading.Thread(target=lambda: 1 / 0)
    thread.start()
    thread.join()
  for report in (
    lambda *info: sys.excepthook(*info),
    lambda kind, value, tb: sys.unraisablehook(
      types.SimpleNamespace(exc_type=kind, exc_value=value, exc_traceback=tb, object=None)
    ),
  ):
    late = threading.Thread(target=fail, args=(report,))
    late.start()
    late.join()
  captured = capsys.readouterr()
  assert "Traceback" not in captured.out + captured.err
  log = (tmp_path / "ukd.log").read_text()
  assert "ZeroDivisionError" in log and log.count("RuntimeError: a late report") == 2


def test_resuming_with_another_network_names_each_field_that_differs(tmp_path):
  config = tiny_config()
  folder = _saved(str(tmp_path), config, steps=(2,))
  changed = tiny_config()
  changed.model.width = 4
  changed.modalities = ("ct",)
  mgr = checkpoints.manager(str(tmp_path))
  with pytest.raises(CheckpointError) as raised:
    recovery.restore_newest(mgr, changed, jax.eval_shape(lambda: STATE), tmp_path)
  mgr.close()
  assert str(raised.value) == (
    f"{folder}/2 was trained with config.modalities=('ct', 'mr'), not ('ct',); "
    "config.model.width=2, not 4; use a new --workdir or the original config"
  )
  assert os.listdir(folder) == ["2"]  # another network is no damage: nothing moved
