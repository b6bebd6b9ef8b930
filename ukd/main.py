"""Command line: train, evaluate, predict, score predictions, or check a dataset.

  python -m ukd.main --config=configs/demo.py --workdir=/tmp/ukd_demo
  python -m ukd.main --config=configs/mmwhs.py --workdir=runs/mmwhs --config.data.root=/data/MMWHS
  python -m ukd.main --mode=evaluate --workdir=runs/mmwhs
  python -m ukd.main --mode=evaluate --workdir=/readonly/runs/mmwhs --output=evals/mmwhs
  python -m ukd.main --mode=predict --workdir=runs/mmwhs --input=scans/ --output=preds/ --modality=ct
  python -m ukd.main --mode=predict --workdir=runs/f0,runs/f1,runs/f2 --tta --input=scans/ --output=preds/ --modality=ct
  python -m ukd.main --mode=postprocess --workdir=runs/mmwhs
  python -m ukd.main --mode=export --workdir=runs/mmwhs --output=exported/
  python -m ukd.main --mode=score --predictions=preds/ --references=/data/MMWHS/ct_train --output=scores/ --dataset=mmwhs --modality=ct --allow_missing
  python -m ukd.main --mode=check --config=configs/mmwhs.py --workdir=runs/mmwhs --config.data.root=/data/MMWHS

Training resumes automatically from the work dir's latest checkpoint.  Errors in
the user's input end the program with one line naming the file or setting (`ukd.cli`).
"""

import importlib

from absl import flags
from ml_collections import config_flags

from ukd import cli as cli_lib
from ukd.runtime import distributed

config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/mmwhs.py[:arg].", lock_config=True
)
flags.DEFINE_string(
  "workdir",
  None,
  "Work dir: checkpoints, logs, splits, cache, evaluation; predict: several, comma-separated, "
  "predict as an ensemble (e.g. the folds of a cross-validation).",
)
flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "evaluate", "predict", "score", "check", "postprocess", "export"],
  "train (then choose post-processing and evaluate on the test split), evaluate, predict, "
  "score (a folder of predictions against references, no checkpoint), check (read every case "
  "of the --config's dataset and summarise it), postprocess (choose post-processing on the "
  "validation split) or export (ONNX and StableHLO models with a JSON sidecar).",
)
flags.DEFINE_string(
  "coordinator_address", None, "Multi-process run: HOST:PORT of process 0's coordinator."
)
flags.DEFINE_integer("num_processes", None, "Multi-process run: how many processes in all.")
flags.DEFINE_integer("process_id", None, "Multi-process run: this process's index, 0..N-1.")
flags.DEFINE_string("step", "best", "Checkpoint for evaluate / predict: best, latest or a step.")
flags.DEFINE_string(
  "input",
  None,
  "predict: a NIfTI file or folder of them, a dataset folder (its labels are skipped), or a "
  "folder or .zip of DICOM series (one series, a study, a PACS export).",
)
flags.DEFINE_string(
  "output",
  None,
  "predict: the folder for label maps; score: for the scores; export: for the model; "
  "evaluate: instead of the work dir's eval/ (e.g. for a read-only work dir).",
)
flags.DEFINE_string("modality", None, "predict / score: the modality of the inputs, e.g. ct or mr.")
flags.DEFINE_bool(
  "modality_overrides_header",
  False,
  "predict: with --modality, predict every DICOM series as that modality even where its "
  "Modality tag says another (without it, such a series fails with a line naming both).",
)
flags.DEFINE_bool("probabilities", False, "predict: also write class probabilities.")
flags.DEFINE_bool("overwrite", False, "predict / score: replace outputs that already exist.")
flags.DEFINE_bool(
  "continue", False, "predict: skip cases whose outputs are complete, redo the others."
)
flags.DEFINE_bool(
  "tta",
  None,
  "predict / evaluate / export: average over mirrored inputs (the axes the network was trained "
  "to see flipped); default: the config's infer.tta.",
)
flags.DEFINE_bool(
  "uncertainty", False, "predict: also write <case>_entropy.nii.gz, the voxel-wise entropy."
)
flags.DEFINE_string(
  "postprocess",
  "auto",
  "predict / evaluate / export: auto (the work dir's postprocessing.json where there is one), "
  "none, or the path of a postprocessing.json.",
)
flags.DEFINE_enum(
  "backend",
  "jax",
  ["jax", "onnxruntime", "openvino"],
  "predict: run the network with JAX, or export it and run it with onnxruntime or OpenVINO.",
)
flags.DEFINE_enum(
  "precision", "float32", ["float32", "bf16"], "predict with openvino: bf16 where the CPU has it."
)
flags.DEFINE_string(
  "output_format", "nifti", "predict: nifti, dicom_seg (a DICOM Segmentation) or nifti,dicom_seg."
)
flags.DEFINE_enum("device", None, ["cpu", "gpu", "tpu"], "Run on this device (default: JAX's).")
flags.DEFINE_enum(
  "label_codes",
  "dataset",
  ["dataset", "index"],
  "predict: write the dataset's own label codes (e.g. MM-WHS 205, 420, ...) or class indices.",
)
flags.DEFINE_string("predictions", None, "score: the folder of predicted label maps.")
flags.DEFINE_string("references", None, "score: the folder of reference label maps.")
flags.DEFINE_string(
  "dataset", None, "score: whose label codes the files hold: mmwhs, btcv, chaos or folder."
)
flags.DEFINE_string("classes", None, "score: the dataset.json of --dataset=folder.")
flags.DEFINE_string(
  "dicom_reference",
  None,
  "predict: the DICOM series a NIfTI input's SEG refers to (same grid); "
  "score: the source series of DICOM-SEG predictions.",
)
flags.DEFINE_bool(
  "allow_missing", False, "score: leave out references without a prediction instead of failing."
)

FLAGS = flags.FLAGS


def _lib(name: str):
  """A module of ukd, imported when a mode runs, so that `--help` and flag errors answer
  without loading JAX."""
  return importlib.import_module(f"ukd.{name}")


# {mode: (the flags it requires, what it runs)}.
MODES = {
  "train": (("workdir",), lambda: _lib("commands").train_and_evaluate(_config(), FLAGS.workdir)),
  "check": (("workdir",), lambda: _lib("commands").check(_config(), FLAGS.workdir)),
  "evaluate": (
    ("workdir",),
    lambda: _lib("commands").evaluate(
      FLAGS.workdir,
      step=FLAGS.step,
      tta=FLAGS.tta,
      postprocess=FLAGS.postprocess,
      output=FLAGS.output,
    ),
  ),
  "postprocess": (
    ("workdir",),
    lambda: _lib("commands").postprocess(FLAGS.workdir, step=FLAGS.step),
  ),
  "export": (
    ("workdir", "output"),
    lambda: _lib("serve.export").export(
      FLAGS.workdir, FLAGS.output, step=FLAGS.step, tta=FLAGS.tta, postprocess=FLAGS.postprocess
    ),
  ),
  "score": (
    ("predictions", "references", "output", "dataset"),
    lambda: _lib("evaluation.score").score(
      FLAGS.predictions,
      FLAGS.references,
      FLAGS.output,
      dataset=FLAGS.dataset,
      modality=FLAGS.modality,
      classes=FLAGS.classes,
      dicom_reference=FLAGS.dicom_reference,
      allow_missing=FLAGS.allow_missing,
      overwrite=FLAGS.overwrite,
    ),
  ),
  "predict": (
    ("workdir", "input", "output"),
    lambda: _lib("commands").predict(
      FLAGS.workdir,
      FLAGS.input,
      FLAGS.output,
      FLAGS.modality,
      step=FLAGS.step,
      backend=FLAGS.backend,
      precision=FLAGS.precision,
      tta=FLAGS.tta,
      postprocess=FLAGS.postprocess,
      probabilities=FLAGS.probabilities,
      overwrite=FLAGS.overwrite,
      label_codes=FLAGS.label_codes,
      output_format=FLAGS.output_format,
      dicom_reference=FLAGS.dicom_reference,
      uncertainty=FLAGS.uncertainty,
      resume=FLAGS["continue"].value,
      modality_overrides_header=FLAGS.modality_overrides_header,
    ),
  ),
}


def main(argv):
  del argv
  required, run = MODES[FLAGS.mode]
  cli_lib.require_flags(FLAGS.mode, *required)
  if FLAGS.device:
    from ukd.runtime import mesh

    mesh.use_device(FLAGS.device)  # before anything touches a device
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  run()


def _config():
  """--config, which train and check need."""
  return cli_lib.required_config(
    FLAGS.config, f"for --mode={FLAGS.mode}, e.g. --config=configs/demo.py"
  )


def cli():
  cli_lib.run(main)


if __name__ == "__main__":
  cli()
