"""Writes the file system refuses (a full disk, a quota, a read-only or forbidden folder): one
line naming the path and the cause in every mode, exit status 74, nothing partial under a
final name, the same command going on once the cause is fixed; outputs checked before the
work; and synthetic phantoms never generated at a mistyped data.root."""

import builtins
import contextlib
import errno
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import OBLIQUE_LPS, ROOT, ct_like, random_variables, save_nifti, tiny_config
from test_evaluate import _folder_config, _write_folder_dataset, _zero_checkpoint

from ukd import commands, files
from ukd import config as config_lib
from ukd.data import preprocess
from ukd.errors import ConfigError, WriteError
from ukd.evaluation import score
from ukd.runtime import checkpoints
from ukd.serve import export, predict
from ukd.serve import segmenter as infer
from ukd.train import loop, writers

NO_SPACE = "no space left on device"


def _refusal(code=errno.ENOSPC, name="x"):
  return OSError(code, os.strerror(code), name)


@pytest.fixture
def read_only(monkeypatch):
  """Makes a folder refuse writes as a read-only mount does; returns the cause it gives.
  chmod 0o555 where that stops this process; as root (CI), which chmod does not stop,
  `open` for writing under the folder raises EROFS instead."""
  chmodded = []

  def make(folder) -> str:
    folder = os.path.abspath(folder)
    os.makedirs(folder, exist_ok=True)
    os.chmod(folder, 0o555)
    chmodded.append(folder)
    if not os.access(folder, os.W_OK):
      return "permission denied"
    real = builtins.open

    def refusing(file, mode="r", *args, **kwargs):
      inside = os.path.abspath(os.fspath(file)).startswith(folder + os.sep)
      if inside and any(c in mode for c in "wax+"):
        raise _refusal(errno.EROFS, file)
      return real(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing)
    return "read-only file system"

  yield make
  for folder in chmodded:
    os.chmod(folder, 0o755)


# --- the cache, metrics and TensorBoard ------------------------------------------------------


def test_a_refused_cache_entry_is_one_line_naming_it_and_leaves_nothing(tmp_path):
  final = tmp_path / "cache" / "entry"
  with pytest.raises(WriteError) as raised, files.new_directory(final) as staging:
    np.save(os.path.join(staging, "image.npy"), np.zeros(8))
    raise _refusal(name=os.path.join(staging, "label.npy"))
  assert str(raised.value) == f"{final}: cannot write: {NO_SPACE}"
  assert os.listdir(tmp_path / "cache") == []


def test_a_refused_metrics_line_is_one_line_naming_metrics_jsonl(tmp_path):
  writer = writers.JsonlWriter(tmp_path)

  class Full:
    def write(self, text):
      raise _refusal()

  real, writer.file = writer.file, Full()
  with pytest.raises(WriteError) as raised:
    writer.write_scalars(1, {"train/loss": 0.5})
  real.close()
  assert str(raised.value) == f"{tmp_path / 'metrics.jsonl'}: cannot write: {NO_SPACE}"
  assert raised.value.exit_code == 74


def test_a_refused_tensorboard_flush_is_one_line_naming_its_folder(tmp_path, monkeypatch):
  writer = writers.TensorBoardWriter(tmp_path)
  writer.write_scalars(1, {"train/loss": 0.5})

  def full():
    raise _refusal()

  monkeypatch.setattr(writer.events, "flush", full)
  with pytest.raises(WriteError) as raised:
    writer.flush()
  monkeypatch.undo()
  writer.close()
  assert str(raised.value) == f"{tmp_path / 'tensorboard'}: cannot write: {NO_SPACE}"


# --- checkpoints -----------------------------------------------------------------------------


def _tensorstore_error(folder, step):
  """What Orbax raises for a full disk: TensorStore's status in a ValueError, the OS error
  only in its text."""
  return ValueError(
    f'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file '
    f'"{folder}/{step}.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": '
    "Failed to write 4321280 bytes to file 9: No space left on device [os_error_code='28']"
  )


@pytest.mark.parametrize("where", ["save", "wait_until_finished"])
def test_a_refused_checkpoint_save_is_one_line_with_its_detail_in_the_log(
  where, tmp_path, monkeypatch
):
  """Orbax raises a failed save at the save itself or, saving in the background, at the
  next wait (the next save, `close`): either way one line naming the step's folder."""
  mgr = checkpoints.manager(tmp_path)
  folder = tmp_path / "checkpoints"

  def fail(*args, **kwargs):
    raise _tensorstore_error(folder, 2)

  monkeypatch.setattr(mgr, where, fail)
  state = {"w": np.zeros(4, np.float32)}
  with pytest.raises(WriteError) as raised:
    checkpoints.save(mgr, 2, state, tiny_config())
    checkpoints.close(mgr)
  log = tmp_path / "ukd.log"
  assert str(raised.value) == f"{folder}/2: cannot write: {NO_SPACE}; details in {log}"
  with pytest.raises(WriteError) as again:  # Orbax raises it again at every later wait
    checkpoints.close(mgr)
  assert again.value is raised.value
  assert log.read_text().count("RESOURCE_EXHAUSTED") == 1  # recorded once, with its traceback
  monkeypatch.undo()
  mgr.close()


# --- predict ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seg():
  config = config_lib.check(tiny_config())
  config.data.size = (16, 16)
  return infer.Segmenter(config, random_variables(config))


def _inputs(folder, count):
  os.makedirs(folder)
  for k in range(count):
    save_nifti(ct_like((16, 16, 3), seed=k), OBLIQUE_LPS, os.path.join(folder, f"c{k}.nii.gz"))
  return str(folder)


def _refuse_nifti(monkeypatch, code, which="_probabilities"):
  """NIfTI writes whose name holds `which` fail with `code`, as a full disk fails them."""
  real = predict.volumes.nib.save

  def save(image, path):
    if which in os.path.basename(os.fspath(path)):
      raise _refusal(code, path)
    return real(image, path)

  monkeypatch.setattr(predict.volumes.nib, "save", save)


def test_probabilities_on_a_full_disk_are_one_line_and_leave_nothing(seg, tmp_path, monkeypatch):
  source = _inputs(tmp_path / "in", 1)
  out = tmp_path / "out"
  _refuse_nifti(monkeypatch, errno.ENOSPC)
  with pytest.raises(WriteError) as raised:
    predict.predict_paths(seg, source, out, "ct", probabilities=True, show_progress=False)
  assert str(raised.value).endswith(f"c0_probabilities.nii.gz: cannot write: {NO_SPACE}")
  assert os.listdir(out) == []  # the label map written before it is removed too


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT])
def test_a_write_every_case_would_meet_stops_after_that_cases_line(
  code, seg, tmp_path, monkeypatch, capsys
):
  source = _inputs(tmp_path / "in", 3)
  out = tmp_path / "out"
  _refuse_nifti(monkeypatch, code, which="")
  with pytest.raises(WriteError) as raised:
    predict.predict_paths(seg, source, out, "ct")
  cause = files.refused_cause(_refusal(code))
  assert str(raised.value) == (
    f"{out}: cannot write: {cause}; stopped after 1 of 3 cases (0 written); once fixed, the "
    "same command with --continue predicts the rest"
  )
  printed = capsys.readouterr()
  failures = [line for line in (printed.out + printed.err).splitlines() if "failed" in line]
  assert len(failures) == 1 and "c0.nii.gz: writing failed: " in failures[0]
  assert os.listdir(out) == []


def test_a_file_refused_in_a_writable_folder_fails_its_case_alone(
  seg, tmp_path, monkeypatch, capsys
):
  """Permission refused for one file (the folder is writable): the run goes on to the next
  case, whose full disk then stops it."""
  source = _inputs(tmp_path / "in", 3)
  out = tmp_path / "out"
  real = predict.volumes.nib.save

  def save(image, path):
    # The case is the end of the name: the temporary's random part may hold 'c0' too.
    case = os.path.basename(os.fspath(path)).rsplit("-", 1)[-1]
    if case in ("c0.nii.gz", "c1.nii.gz"):
      raise _refusal(errno.EACCES if case == "c0.nii.gz" else errno.ENOSPC, path)
    return real(image, path)

  monkeypatch.setattr(predict.volumes.nib, "save", save)
  with pytest.raises(WriteError, match=r"; stopped after 2 of 3 cases \(0 written\);"):
    predict.predict_paths(seg, source, out, "ct")
  printed = capsys.readouterr()
  failures = [line for line in (printed.out + printed.err).splitlines() if "failed" in line]
  assert [("c0.nii.gz" in f, "c1.nii.gz" in f) for f in failures] == [(True, False), (False, True)]
  assert "permission denied" in failures[0] and NO_SPACE in failures[1]


# --- outputs checked before the work --------------------------------------------------------


def _never(*args, **kwargs):
  raise AssertionError("the model was loaded before the output was checked")


def test_predict_checks_its_output_before_loading_the_model(tmp_path, read_only, monkeypatch):
  source = _inputs(tmp_path / "in", 1)
  cause = read_only(tmp_path / "out")
  monkeypatch.setattr(export, "load_backend", _never)
  with pytest.raises(WriteError, match=f"^{tmp_path / 'out'}: cannot write: {cause}$"):
    commands.predict("run", source, str(tmp_path / "out"), "ct")


def test_export_checks_its_output_before_loading_the_model(tmp_path, read_only, monkeypatch):
  pytest.importorskip("onnx")
  cause = read_only(tmp_path / "out")
  monkeypatch.setattr(infer, "load", _never)
  with pytest.raises(WriteError, match=f"^{tmp_path / 'out'}: cannot write: {cause}$"):
    export.export("run", str(tmp_path / "out"))


def test_score_checks_its_output_before_reading_any_file(tmp_path, read_only, monkeypatch):
  cause = read_only(tmp_path / "out")
  monkeypatch.setattr(score, "pair_files", _never)
  with pytest.raises(WriteError, match=f"^{tmp_path / 'out'}: cannot write: {cause}$"):
    score.score("p", "r", str(tmp_path / "out"), dataset="mmwhs", modality="ct")


@pytest.fixture
def evaluated_run(tmp_path):
  """A work dir with a checkpoint that records its split (evaluating writes nothing else
  into the work dir)."""
  root = str(tmp_path / "data")
  _write_folder_dataset(root)
  parts = {"train": ["case0"], "val": ["case1"], "test": ["case2"]}
  record = {"splits": {"ct": parts, "mr": parts}, "classes": ["background", "A", "B"]}
  workdir = str(tmp_path / "run")
  _zero_checkpoint(workdir, _folder_config(root), dataset=record)
  return workdir


def test_evaluate_on_a_read_only_work_dir_names_output_and_writes_there(
  evaluated_run, tmp_path, read_only, monkeypatch
):
  cause = read_only(evaluated_run)
  eval_dir = os.path.join(evaluated_run, "eval")
  with monkeypatch.context() as patched:
    patched.setattr(infer, "load", _never)
    with pytest.raises(WriteError) as raised:
      commands.evaluate(evaluated_run, overlays=False)
  assert str(raised.value) == (
    f"{eval_dir}: cannot write: {cause}; pass --output=DIR to write the evaluation elsewhere"
  )
  result = commands.evaluate(evaluated_run, overlays=False, output=str(tmp_path / "evals"))
  assert result["dir"] == str(tmp_path / "evals" / "test-step2")
  assert sorted(os.listdir(result["dir"])) == ["cases.csv", "metrics.json"]


# --- synthetic data at a mistyped root -------------------------------------------------------


def _synthetic(root):
  config = config_lib.default()
  config.data.dataset = "mmwhs"
  config.data.root = root
  config.data.synthetic.update(enabled=True, n_ct=1, n_mr=1, shape=(8, 8, 8))
  return config


def test_synthetic_data_is_never_generated_at_a_root_that_does_not_exist(tmp_path):
  typo = tmp_path / "phantmos"
  with pytest.raises(ConfigError) as raised:
    loop.dataset_root(_synthetic(str(typo)), tmp_path / "run")
  assert str(raised.value).startswith(f"config.data.root={typo} does not exist; ")
  assert not typo.exists()


def test_synthetic_data_fills_an_empty_root_or_the_work_dir(tmp_path):
  (tmp_path / "made").mkdir()
  assert loop.dataset_root(_synthetic(str(tmp_path / "made")), tmp_path) == str(tmp_path / "made")
  assert os.path.exists(tmp_path / "made" / "ct_train")
  unset = loop.dataset_root(_synthetic(""), tmp_path / "run")
  assert unset == str(tmp_path / "run" / "phantoms") and os.path.isdir(unset)


# --- a real full disk ------------------------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(folder, size):
  """A `size` tmpfs mounted at `folder`; the test is skipped where that cannot be done."""
  if os.geteuid() != 0:
    pytest.skip("mounting a small tmpfs to fill needs root (CI runs the tests as root)")
  os.makedirs(folder)
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder])
  if mounted.returncode != 0:
    pytest.skip("mount -t tmpfs is not allowed here (a container without CAP_SYS_ADMIN)")
  try:
    yield folder
  finally:
    subprocess.run(["umount", "-l", folder])


@pytest.mark.slow
def test_a_full_disk_under_the_cache_says_no_space_and_names_the_entry(tmp_path):
  """numpy reports a short write as '316840 requested and 147328 written', without errno."""
  with _tmpfs(str(tmp_path / "disk"), "256k") as disk:
    prepared = preprocess.Prepared(np.zeros((256, 256, 4), np.float32), None, {})
    final = os.path.join(disk, "entry")
    with pytest.raises(WriteError) as raised, files.new_directory(final) as staging:
      preprocess._write_entry(staging, prepared)
    assert str(raised.value) == f"{final}: cannot write: {NO_SPACE}"
    assert os.listdir(disk) == []


@pytest.mark.slow
def test_training_on_a_full_disk_stops_in_one_line_and_resumes_once_there_is_room(tmp_path):
  with _tmpfs(str(tmp_path / "disk"), "3m") as disk:
    workdir = os.path.join(disk, "run")
    command = [
      sys.executable,
      "-m",
      "ukd.main",
      "--config=configs/demo.py:tiny",
      f"--workdir={workdir}",
      "--config.overlays=0",
    ]
    full = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert full.returncode == 74, full.stderr[-3000:]
    folder = os.path.join(workdir, "checkpoints")
    log = os.path.join(workdir, "ukd.log")
    # Which write meets the full disk first depends on timing: the step-2 checkpoint (its
    # detail then in the log) or the TensorBoard flush that follows it.
    (line,) = full.stderr.splitlines()
    assert line in (
      f"ukd: error: {folder}/2: cannot write: {NO_SPACE}; details in {log}",
      f"ukd: error: {workdir}/tensorboard: cannot write: {NO_SPACE}",
    ), line
    if "details in" in line:
      assert "RESOURCE_EXHAUSTED" in open(log).read()
    subprocess.run(["mount", "-o", "remount,size=64m", disk], check=True)
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert max(int(s) for s in os.listdir(folder) if s.isdigit()) == 4  # trained to the end
