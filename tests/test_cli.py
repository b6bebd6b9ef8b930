"""The command line end to end on tiny phantoms: train, checkpoint, resume, evaluate, predict."""

import csv
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import ml_collections as mc
import nibabel as nib
import numpy as np
import pytest
from helpers import run_module

from ukd import cli, commands, models
from ukd import config as config_lib
from ukd.errors import ConfigError, UkdError
from ukd.runtime import checkpoints, distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [f"--config={os.path.join(ROOT, 'configs', 'demo.py')}:tiny"]


def ukd(*args, timeout=300, check=True):
  return run_module("ukd.main", *args, timeout=timeout, check=check)


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One tiny run: phantoms generated, 4 steps, validation + checkpoints at 2 and 4, test eval,
  a profiler trace of step 2."""
  workdir = str(tmp_path_factory.mktemp("run"))
  out = ukd(*TINY, f"--workdir={workdir}", "--config.profile=(2, 1)")
  return workdir, out


def test_train_writes_checkpoints_logs_and_evaluation(trained):
  workdir, out = trained
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "4"
  assert set(losses(workdir)) == {1, 2, 3, 4}
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  (scored,) = os.listdir(os.path.join(workdir, "eval"))  # test-step<best>
  record = json.load(open(os.path.join(workdir, "eval", scored, "metrics.json")))
  assert scored == f"test-step{record['step']}" and record["split"] == "test"
  assert record["step"] in (2, 4)
  for m in ("ct", "mr"):
    assert 0.0 <= record["metrics"][m]["mean"]["dice"]["mean"] <= 1.0
    for name in ("MYO", "LAC", "LVC", "AA"):
      assert name in record["metrics"][m]
  assert os.path.exists(os.path.join(workdir, "eval", scored, "cases.csv"))
  # Each checkpoint keeps the split it trained with, and the dataset's classes and codes.
  with open(os.path.join(workdir, "splits.json")) as f:
    split = json.load(f)
  mgr = checkpoints.manager(workdir, read_only=True)
  for step in mgr.all_steps():
    saved = checkpoints.restore_dataset(mgr, step)
    assert saved["splits"] == split
    assert saved["classes"] == ["background", "MYO", "LAC", "LVC", "AA"]
    assert saved["label_codes"] == {m: [0, 205, 420, 500, 820] for m in ("ct", "mr")}
  mgr.close()
  assert "Dice" in out.stdout


def test_train_logs_throughput_and_the_time_of_validations_and_checkpoints(trained):
  workdir, _ = trained
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  rates = [r for r in rows if "perf/steps_per_sec" in r]
  assert [r["step"] for r in rates] == [2, 3, 4]  # step 1 (compilation) only starts the clock
  for r in rates:  # 2 CT + 2 MR samples a step
    assert r["perf/examples_per_sec"] == pytest.approx(4 * r["perf/steps_per_sec"])
  assert [r["step"] for r in rows if "perf/validation_sec" in r] == [2, 4]
  assert [r["step"] for r in rows if "perf/checkpoint_sec" in r] == [2, 4]
  for r in rows:
    if "val_dice/mean" in r:
      assert {"val_dice/ct/MYO", "val_dice/mr/mean"} <= set(r)


def test_profile_writes_a_trace_for_tensorboard_and_perfetto(trained):
  workdir, _ = trained
  (run,) = os.listdir(os.path.join(workdir, "profile", "plugins", "profile"))
  written = os.listdir(os.path.join(workdir, "profile", "plugins", "profile", run))
  assert "perfetto_trace.json.gz" in written
  assert any(name.endswith(".xplane.pb") for name in written), written


def test_evaluate_and_predict_modes(trained, tmp_path):
  workdir, _ = trained
  out = ukd("--mode=evaluate", f"--workdir={workdir}")
  assert "MYO" in out.stdout
  image = os.path.join(workdir, "phantoms", "mr_train", "mr_train_1001_image.nii.gz")
  ukd(
    "--mode=predict",
    f"--workdir={workdir}",
    f"--input={image}",
    f"--output={tmp_path}",
    "--modality=mr",
  )
  written = nib.load(os.path.join(tmp_path, "mr_train_1001.nii.gz"))
  source = nib.load(image)
  assert written.shape == source.shape
  np.testing.assert_allclose(written.affine, source.affine)
  assert written.get_data_dtype() == np.uint16  # MM-WHS codes: 205, 420, 500, 820
  assert set(np.unique(np.asarray(written.dataobj))) <= {0, 205, 420, 500, 820}


@pytest.mark.parametrize(
  "change,expected",
  [
    ({"model.scheme": "nope"}, "config.model.scheme='nope'"),
    ({"batch_size": 0}, "config.batch_size=0"),
    ({"data.crop": "foreground"}, "data.crop='foreground'"),
  ],
)
def test_user_errors_are_one_line(change, expected, tmp_path):
  """In-process, what the command line prints as `ukd: error: <message>`: a UkdError whose
  message is one line (`test_a_user_error_exits_2_with_one_line` runs the command line)."""
  config = importlib.import_module("configs.demo").get_config()
  config.update_from_flattened_dict(change)
  calls = [
    (lambda: models.build(config_lib.check(config).model, config.modalities), expected),
    (
      lambda: commands.train_and_evaluate(
        importlib.import_module("configs.mmwhs").get_config(), tmp_path / "run"
      ),
      "config.data.root is not set",
    ),
    (lambda: commands.evaluate(tmp_path / "empty"), "holds no checkpoints"),
    (lambda: commands.predict(tmp_path, "x.nii.gz", "o", None), "--modality is required"),
  ]
  (tmp_path / "empty").mkdir()
  for call, message in calls:
    with pytest.raises(UkdError) as raised:
      call()
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_user_error_exits_2_with_one_line(tmp_path):
  out = ukd("--config=configs/nope.py", f"--workdir={tmp_path}", check=False)
  assert out.returncode == 2
  assert "cannot load --config" in _one_error_line(out)


@pytest.mark.parametrize(
  "override,expected",
  [
    ("--config.no_such_key=1", "no_such_key"),
    ("--config.batch_size=abc", "batch_size"),
    ("--config.model.widht=3", "no such config field 'widht' (did you mean 'width'?)"),
  ],
)
def test_broken_overrides_are_flag_errors(override, expected, tmp_path):
  out = ukd("--config=configs/demo.py", override, f"--workdir={tmp_path}", check=False)
  assert out.returncode != 0
  assert "Traceback" not in out.stderr
  lines = [line for line in out.stderr.splitlines() if line.startswith("ukd: error:")]
  assert len(lines) == 1 and expected in lines[0], out.stderr[-2000:]


def test_a_misspelt_config_field_reads_plainly_with_the_suggestion():
  config = mc.ConfigDict({"model": {"width": 2}})
  for lookup in (lambda: config.model.widht, lambda: config["model"]["widht"]):
    with pytest.raises((AttributeError, KeyError)) as raised:
      lookup()
    assert cli._no_such_field(raised.value) == (
      "no such config field 'widht' (did you mean 'width'?)"
    )


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(trained, tmp_path):
  """Killed right after its first checkpoint, a run resumes and logs the same losses."""
  workdir, _ = trained
  reference = losses(workdir)
  killed = str(tmp_path / "killed")
  os.makedirs(killed)
  # Same phantoms: only the run itself differs.
  os.symlink(os.path.join(workdir, "phantoms"), os.path.join(killed, "phantoms"))
  args = [sys.executable, "-m", "ukd.main", *TINY, f"--workdir={killed}", "--config.overlays=0"]
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  first = os.path.join(killed, "checkpoints", "2")
  deadline = time.time() + 240
  while not os.path.exists(first) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.exists(first)
  out = ukd(*TINY, f"--workdir={killed}", "--config.overlays=0")
  assert "resumed from step" in out.stderr + out.stdout
  resumed = losses(killed)
  assert set(resumed) == {1, 2, 3, 4}
  for step in range(1, 5):
    assert resumed[step] == pytest.approx(reference[step], abs=1e-5), step


@pytest.mark.slow
def test_nonfinite_loss_stops_with_step_and_term_and_keeps_the_checkpoint(trained):
  """An infinite L2 weight makes the loss infinite at the first step after the resume."""
  workdir, _ = trained
  out = ukd(
    *TINY, f"--workdir={workdir}", "--config.total_steps=6", "--config.loss.l2=inf", check=False
  )
  assert out.returncode != 0 and "Traceback" not in out.stderr
  lines = [line for line in out.stderr.splitlines() if line.startswith("ukd: error:")]
  assert len(lines) == 1, out.stderr[-2000:]
  assert "non-finite loss at step 5" in lines[0] and "loss=inf" in lines[0]
  assert max(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == 4
  assert set(losses(workdir)) == {1, 2, 3, 4}
  assert "MYO" in ukd("--mode=evaluate", f"--workdir={workdir}", "--step=latest").stdout


@pytest.mark.slow
def test_sigterm_saves_the_step_reached_and_the_resumed_run_equals_an_uninterrupted_one(
  trained, tmp_path
):
  """Preemption (SIGTERM) during setup: the run stops after step 1 with step 1 saved, exits
  143, and the same command continues to step 4 with the uninterrupted run's losses."""
  workdir, _ = trained
  reference = losses(workdir)
  preempted = str(tmp_path / "preempted")
  args = [
    sys.executable,
    "-m",
    "ukd.main",
    *TINY,
    f"--workdir={preempted}",
    "--config.overlays=0",
    f"--config.data.root={os.path.join(workdir, 'phantoms')}",
  ]
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while not os.path.exists(preempted) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=240)
  assert proc.returncode == 143, stderr[-3000:]
  assert "ukd: stopped: preempted at step 1" in stderr and "Traceback" not in stderr
  assert sorted(os.listdir(os.path.join(preempted, "checkpoints"))) == ["1"]
  out = ukd(*args[3:])
  assert "resumed from step 1" in out.stdout + out.stderr
  resumed = losses(preempted)
  assert set(resumed) == {1, 2, 3, 4}
  for step in range(1, 5):
    assert resumed[step] == pytest.approx(reference[step], abs=1e-5), step


def _one_error_line(out):
  assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
  lines = [line for line in out.stderr.splitlines() if line.startswith("ukd: error:")]
  assert len(lines) == 1, out.stderr[-3000:]
  return lines[0]


def test_predict_refuses_existing_outputs_unless_overwrite_and_writes_codes_or_indices(
  trained, tmp_path
):
  workdir, _ = trained
  image = os.path.join(workdir, "phantoms", "ct_train", "ct_train_1001_image.nii.gz")
  target = tmp_path / "ct_train_1001.nii.gz"  # the case's label name
  target.write_bytes(b"someone's ground truth")
  args = ["--mode=predict", f"--workdir={workdir}", f"--input={image}", f"--output={tmp_path}"]
  line = _one_error_line(ukd(*args, "--modality=ct", check=False))
  assert (
    line == f"ukd: error: {target}: already exists; pass --overwrite to replace it or --continue"
  )
  assert target.read_bytes() == b"someone's ground truth"
  out = ukd(*args, "--modality=ct", "--overwrite", "--label_codes=index")
  assert f"wrote 2 file(s) to {tmp_path}" in out.stdout
  written = nib.load(target)
  assert written.get_data_dtype() == np.uint8
  assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 3, 4}
  with open(tmp_path / "ct_train_1001.json") as f:
    assert json.load(f)["classes"] == {
      "0": "background",
      "1": "MYO",
      "2": "LAC",
      "3": "LVC",
      "4": "AA",
    }


def test_check_mode_summarises_the_dataset_and_names_a_broken_file(trained, tmp_path):
  workdir, _ = trained
  out = ukd("--mode=check", *TINY, f"--workdir={workdir}")
  assert "ct: 3 cases" in out.stdout and "mr: 3 cases" in out.stdout
  assert "MYO (205) in 3/3" in out.stdout and "AA (820) in 3/3" in out.stdout
  root = str(tmp_path / "phantoms")
  shutil.copytree(os.path.join(workdir, "phantoms"), root)
  broken = os.path.join(root, "mr_train", "mr_train_1002_label.nii.gz")
  with open(broken, "wb") as f:
    f.write(b"not a nifti file")
  line = _one_error_line(
    ukd("--mode=check", *TINY, f"--workdir={tmp_path}", f"--config.data.root={root}", check=False)
  )
  assert line.startswith(f"ukd: error: {broken}: cannot read as NIfTI")


def test_a_batch_the_devices_cannot_share_fails_before_any_data_is_touched(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  out = subprocess.run(
    [sys.executable, "-m", "ukd.main", *TINY, f"--workdir={tmp_path}", "--config.batch_size=3"],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=ROOT,
    env=env,
  )
  line = _one_error_line(out)
  assert line == (
    "ukd: error: config.batch_size=3 (per modality) must be divisible by the 2 devices of "
    "the data mesh"
  )
  # No phantoms generated, nothing cached: only the work dir's lock, taken before any work.
  assert os.listdir(tmp_path) == [".lock"]


def test_evaluation_keeps_the_checkpoints_test_cases_when_the_dataset_grows(trained, tmp_path):
  """splits.json deleted and cases added to the dataset: the test cases stay those of the
  trained checkpoint (a fresh split would have mixed training cases into the test)."""
  workdir, _ = trained
  with open(os.path.join(workdir, "splits.json")) as f:
    tested = {(m, case) for m, parts in json.load(f).items() for case in parts["test"]}
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("phantoms", "cache", "eval"))
  os.remove(os.path.join(copy, "splits.json"))
  phantoms = os.path.join(workdir, "phantoms")  # where the checkpoint's config points
  added = []
  try:
    for m in ("ct", "mr"):
      for number in (1091, 1092, 1093):
        for part in ("image", "label"):
          source = os.path.join(phantoms, f"{m}_train", f"{m}_train_1001_{part}.nii.gz")
          added.append(os.path.join(phantoms, f"{m}_train", f"{m}_train_{number}_{part}.nii.gz"))
          shutil.copy(source, added[-1])
    ukd("--mode=evaluate", f"--workdir={copy}")
  finally:
    for path in added:
      os.remove(path)
  (scored,) = os.listdir(os.path.join(copy, "eval"))
  with open(os.path.join(copy, "eval", scored, "cases.csv")) as f:
    rows = {(r["modality"], r["case"]) for r in csv.DictReader(f)}
  assert rows == tested
  assert not os.path.exists(os.path.join(copy, "splits.json"))


# ---- The command line's own plumbing (ukd.cli, ukd.runtime.distributed), without training ----------


def test_help_answers_without_loading_jax():
  code = (
    "import runpy, sys\n"
    "sys.argv = ['ukd', '--help']\n"
    "try:\n"
    "  runpy.run_module('ukd.main', run_name='__main__')\n"
    "except SystemExit:\n"
    "  pass\n"
    "print('jax' in sys.modules)\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
  )
  assert "--mode" in out.stdout + out.stderr
  assert out.stdout.splitlines()[-1] == "False", out.stdout[-2000:]


def test_help_exits_0():
  """absl's --help exits 1, which a script or package check takes for a failure."""
  for flag in ("--help", "--helpfull"):
    result = run_module("ukd.main", flag, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "modality_overrides_header" in result.stdout


def test_configs_are_found_outside_a_checkout(tmp_path, monkeypatch):
  packaged = os.path.join(
    os.path.dirname(importlib.util.find_spec("ukd.configs").origin), "demo.py"
  )
  # End to end, in a folder without configs/: the packaged file is loaded, and its refusal of
  # the argument is one line.
  out = subprocess.run(
    [sys.executable, "-m", "ukd.main", "--config=configs/demo.py:tine", "--workdir=w"],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=tmp_path,
  )
  assert _one_error_line(out) == (
    f"ukd: error: bad flag or config override: flag --config={packaged}:tine: ConfigError: "
    "config argument 'tine' is not one of ['scheme', 'tiny']"
  )
  assert os.listdir(tmp_path) == []
  monkeypatch.chdir(tmp_path)
  args = ["ukd", "--config=configs/demo.py:tiny", "--config=configs/nope.py", "--mode=train"]
  assert cli.packaged_configs(args) == [
    "ukd",
    f"--config={packaged}:tiny",
    "--config=configs/nope.py",  # no such packaged config: left for the loader to report
    "--mode=train",
  ]
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "demo.py").write_text("")
  assert cli.packaged_configs(args) == args  # a checkout's own file comes first


@pytest.mark.parametrize(
  "given,message",
  [
    (
      dict(num_processes=2),
      "--coordinator_address, --num_processes and --process_id go together; missing: "
      "--coordinator_address, --process_id",
    ),
    (
      dict(coordinator_address="localhost:1", num_processes=2, process_id=2),
      "--process_id=2 must be in [0, --num_processes=2)",
    ),
  ],
)
def test_distributed_settings_are_checked_before_joining(given, message, monkeypatch):
  monkeypatch.delenv("UKD_DISTRIBUTED", raising=False)
  with pytest.raises(ConfigError) as e:
    distributed.initialize(**given)
  assert str(e.value) == message


def test_no_distributed_settings_is_a_single_process_run(monkeypatch):
  monkeypatch.delenv("UKD_DISTRIBUTED", raising=False)
  distributed.initialize()
  assert jax.process_count() == 1


def test_command_lines_set_xla_defaults_unless_the_user_set_them():
  env = {}
  cli.set_xla_defaults(env, jaxlib="0.10.2")
  assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  cli.set_xla_defaults(env, jaxlib="0.10.2")
  assert env["XLA_FLAGS"].split() == [
    "--xla_force_host_platform_device_count=4",
    "--xla_cpu_experimental_ynn_fusion_type=individual_convolution",
  ]
  mine = "--xla_cpu_experimental_ynn_fusion_type=individual_convolution,individual_dot"
  env = {"XLA_FLAGS": mine}
  cli.set_xla_defaults(env, jaxlib="0.10.2")
  assert env["XLA_FLAGS"] == mine
  env = {}
  cli.set_xla_defaults(env, jaxlib="0.11.0")  # not measured there: XLA's own defaults
  assert env == {}
