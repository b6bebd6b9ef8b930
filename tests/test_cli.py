"""The command line end to end on tiny phantoms: train, checkpoint, resume, evaluate, predict."""

import json
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [f"--config={os.path.join(ROOT, 'configs', 'demo.py')}:tiny"]


def ukd(*args, timeout=300, check=True):
  out = subprocess.run(
    [sys.executable, "-m", "ukd.main", *args],
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=ROOT,
  )
  if check:
    assert out.returncode == 0, out.stderr[-4000:]
  return out


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One tiny run: phantoms generated, 4 steps, validation + checkpoints at 2 and 4, test eval."""
  workdir = str(tmp_path_factory.mktemp("run"))
  out = ukd(*TINY, f"--workdir={workdir}")
  return workdir, out


def test_train_writes_checkpoints_logs_and_evaluation(trained):
  workdir, out = trained
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "4"
  assert set(losses(workdir)) == {1, 2, 3, 4}
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  metrics = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
  for m in ("ct", "mr"):
    assert 0.0 <= metrics[m]["mean"]["dice"]["mean"] <= 1.0
    for name in ("MYO", "LAC", "LVC", "AA"):
      assert name in metrics[m]
  assert os.path.exists(os.path.join(workdir, "eval", "cases.csv"))
  assert os.path.exists(os.path.join(workdir, "splits.json"))
  assert "Dice" in out.stdout


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
  written = nib.load(os.path.join(tmp_path, "mr_train_1001_image.nii.gz"))
  source = nib.load(image)
  assert written.shape == source.shape
  np.testing.assert_allclose(written.affine, source.affine)
  assert written.get_data_dtype() == np.uint8


@pytest.mark.parametrize(
  "args,expected",
  [
    (["--config=configs/mmwhs.py"], "config.data.root is not set"),
    (["--config=configs/nope.py"], "cannot load --config"),
    (["--config=configs/demo.py", "--config.model.scheme=nope"], "config.model.scheme='nope'"),
    (["--config=configs/demo.py", "--config.batch_size=0"], "config.batch_size=0"),
    (["--mode=evaluate"], "holds no checkpoints"),
    (["--mode=predict", "--input=x.nii.gz", "--output=o"], "--modality is required"),
  ],
)
def test_user_errors_are_one_line(args, expected, tmp_path):
  out = ukd(*args, f"--workdir={tmp_path}", check=False)
  assert out.returncode != 0
  assert "Traceback" not in out.stderr
  lines = [line for line in out.stderr.splitlines() if line.startswith("ukd: error:")]
  assert len(lines) == 1 and expected in lines[0], out.stderr[-2000:]


@pytest.mark.parametrize(
  "override,expected",
  [
    ("--config.no_such_key=1", "no_such_key"),
    ("--config.batch_size=abc", "batch_size"),
  ],
)
def test_broken_overrides_are_flag_errors(override, expected, tmp_path):
  out = ukd("--config=configs/demo.py", override, f"--workdir={tmp_path}", check=False)
  assert out.returncode != 0
  assert "Traceback" not in out.stderr
  lines = [line for line in out.stderr.splitlines() if line.startswith("ukd: error:")]
  assert len(lines) == 1 and expected in lines[0], out.stderr[-2000:]


def test_sigkill_then_resume_equals_an_uninterrupted_run(trained, tmp_path):
  """Killed right after its first checkpoint, a run resumes and logs the same losses."""
  workdir, _ = trained
  reference = losses(workdir)
  killed = str(tmp_path / "killed")
  os.makedirs(killed)
  # Same phantoms: only the run itself differs.
  os.symlink(os.path.join(workdir, "phantoms"), os.path.join(killed, "phantoms"))
  args = [sys.executable, "-m", "ukd.main", *TINY, f"--workdir={killed}", "--config.overlays=False"]
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  first = os.path.join(killed, "checkpoints", "2")
  deadline = time.time() + 240
  while not os.path.exists(first) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.exists(first)
  out = ukd(*TINY, f"--workdir={killed}", "--config.overlays=False")
  assert "resumed from step" in out.stderr + out.stdout
  resumed = losses(killed)
  assert set(resumed) == {1, 2, 3, 4}
  for step in range(1, 5):
    assert resumed[step] == pytest.approx(reference[step], abs=1e-5), step


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
