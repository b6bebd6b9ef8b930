"""The optional extras: a bare install runs every mode that needs none, and a mode, flag or
input that needs one stops before any work with one line naming the extra."""

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from helpers import ROOT

from ukd import commands, files
from ukd.errors import MissingExtra, import_extra
from ukd.serve import export

EXTRAS = ("onnx", "onnxruntime", "openvino", "pydicom", "highdicom", "gcsfs")


@pytest.fixture
def bare(monkeypatch):
  """This process as a bare install sees it: importing any optional extra fails."""
  for name in EXTRAS:
    monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError


def test_a_missing_extra_is_one_line_naming_the_extra_and_the_command(bare):
  with pytest.raises(MissingExtra) as caught:
    import_extra("onnx", "export", "--mode=export")
  assert str(caught.value) == "--mode=export needs the 'export' extra: pip install 'ukd[export]'"
  assert import_extra("json", "none", "json") is sys.modules["json"]


def test_each_job_that_needs_an_extra_asks_before_any_work(bare, tmp_path):
  missing = str(tmp_path / "no_such_workdir")  # any work would fail on this first
  with pytest.raises(MissingExtra, match=r"^--mode=export needs the 'export' extra"):
    export.export(missing, tmp_path / "out")
  with pytest.raises(MissingExtra, match=r"^--backend=onnxruntime needs the 'export' extra"):
    export.load_backend(missing, backend="onnxruntime")
  with pytest.raises(MissingExtra, match=r"^--backend=openvino needs the 'openvino' extra"):
    export.load_backend(missing, backend="openvino")
  dicom = tmp_path / "series"
  dicom.mkdir()
  (dicom / "IM0001").write_bytes(b"\0" * 132)
  with pytest.raises(MissingExtra, match=r"^DICOM input needs the 'dicom' extra"):
    commands.predict(missing, str(dicom), str(tmp_path / "o"), None)
  scan = tmp_path / "scan.nii.gz"
  nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), scan)
  with pytest.raises(MissingExtra, match=r"^--output_format=dicom_seg needs the 'dicom' extra"):
    commands.predict(missing, str(scan), str(tmp_path / "o"), "ct", output_format="dicom_seg")
  with pytest.raises(MissingExtra, match=r"^gs://bucket/run needs the 'gcs' extra"):
    files.path("gs://bucket/run")


def test_dicom_input_is_told_from_nifti_input_before_reading(tmp_path):
  from ukd.serve import inputs

  (tmp_path / "nifti").mkdir()
  nib.save(
    nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), tmp_path / "nifti" / "a.nii.gz"
  )
  (tmp_path / "dicom").mkdir()
  (tmp_path / "dicom" / "IM1").write_bytes(b"x")
  assert not inputs.needs_dicom(tmp_path / "nifti")
  assert not inputs.needs_dicom(tmp_path / "nifti" / "a.nii.gz")
  assert inputs.needs_dicom(tmp_path / "dicom")
  assert inputs.needs_dicom(tmp_path / "study.zip") is False  # not there: find_inputs says so
  (tmp_path / "study.zip").write_bytes(b"PK")
  assert inputs.needs_dicom(tmp_path / "study.zip")


# ---- A bare install end to end: every process refuses the extras -----------------------------

_BLOCKER = (
  "import importlib.abc, runpy, sys\n"
  "class Refuse(importlib.abc.MetaPathFinder):\n"
  "  def find_spec(self, name, path=None, target=None):\n"
  f"    if name.split('.')[0] in {EXTRAS!r}:\n"
  "      raise ImportError(f'{name} is not installed here')\n"
  "sys.meta_path.insert(0, Refuse())\n"
  "sys.argv = ['ukd'] + sys.argv[1:]\n"
  "runpy.run_module('ukd.main', run_name='__main__', alter_sys=True)\n"
)


def bare_ukd(*args):
  return subprocess.run(
    [sys.executable, "-c", _BLOCKER, *args],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=ROOT,
  )


@pytest.mark.slow
def test_a_bare_install_trains_evaluates_predicts_and_scores_and_refuses_the_rest(tmp_path):
  workdir = str(tmp_path / "run")
  tiny = f"--config={os.path.join(ROOT, 'configs', 'demo.py')}:tiny"
  out = bare_ukd(tiny, f"--workdir={workdir}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert os.listdir(os.path.join(workdir, "eval"))
  out = bare_ukd("--mode=evaluate", f"--workdir={workdir}")
  assert out.returncode == 0 and "MYO" in out.stdout, out.stderr[-3000:]
  image = os.path.join(workdir, "phantoms", "mr_train", "mr_train_1001_image.nii.gz")
  preds = str(tmp_path / "preds")
  args = [f"--workdir={workdir}", f"--input={image}", f"--output={preds}", "--modality=mr"]
  out = bare_ukd("--mode=predict", *args)
  assert out.returncode == 0, out.stderr[-3000:]
  assert os.path.exists(os.path.join(preds, "mr_train_1001.nii.gz"))
  references = os.path.join(workdir, "phantoms", "mr_train")
  scored = str(tmp_path / "scores")
  out = bare_ukd(
    "--mode=score",
    f"--predictions={preds}",
    f"--references={references}",
    f"--output={scored}",
    "--dataset=mmwhs",
    "--modality=mr",
    "--allow_missing",
  )
  assert out.returncode == 0, out.stderr[-3000:]
  refused = {
    "'export' extra": ["--mode=export", f"--workdir={workdir}", f"--output={tmp_path / 'x'}"],
    "--backend=onnxruntime needs the 'export'": ["--mode=predict", *args, "--backend=onnxruntime"],
    "--backend=openvino needs the 'openvino'": ["--mode=predict", *args, "--backend=openvino"],
    "dicom_seg needs the 'dicom' extra": [
      "--mode=predict",
      *args,
      "--output_format=dicom_seg",
      "--overwrite",
    ],
    "'gcs' extra": ["--mode=evaluate", "--workdir=gs://bucket/run"],
  }
  for expected, argv in refused.items():
    out = bare_ukd(*argv)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and expected in lines[0], (argv, out.stderr)
