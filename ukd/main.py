"""Command line: train, evaluate or predict.

  python -m ukd.main --config=configs/demo.py --workdir=/tmp/ukd_demo
  python -m ukd.main --config=configs/mmwhs.py --workdir=runs/mmwhs --config.data.root=/data/MMWHS
  python -m ukd.main --mode=evaluate --workdir=runs/mmwhs
  python -m ukd.main --mode=predict --workdir=runs/mmwhs --input=scans/ --output=preds/ --modality=ct

Training resumes automatically from the work dir's latest checkpoint.  Errors in
the user's input end the program with one line naming the file or setting.
"""

import importlib.util
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ukd import errors

config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/mmwhs.py[:arg].", lock_config=True
)
flags.DEFINE_string("workdir", None, "Work dir: checkpoints, logs, splits, cache, evaluation.")
flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "evaluate", "predict"],
  "train (then evaluate on the test split), evaluate, or predict.",
)
flags.DEFINE_string("step", "best", "Checkpoint for evaluate / predict: best, latest or a step.")
flags.DEFINE_string("input", None, "predict: a NIfTI file or a folder of them.")
flags.DEFINE_string("output", None, "predict: the folder for the predicted label maps.")
flags.DEFINE_string("modality", None, "predict: the modality of the inputs, e.g. ct or mr.")
flags.DEFINE_bool("probabilities", False, "predict: also write class probabilities.")
flags.mark_flag_as_required("workdir")

FLAGS = flags.FLAGS


def run(argv):
  del argv
  # Imported here so that `--help` and flag errors answer without loading JAX.
  import jax

  from ukd import evaluate, infer, train

  if os.environ.get("UKD_DISTRIBUTED"):
    jax.distributed.initialize()  # multi-host: peers found from the cluster's metadata
  if FLAGS.mode == "train":
    try:
      config = FLAGS.config
      if config is not None:
        config.keys()  # a config file that failed to load raises on first use
    except (OSError, SyntaxError, AttributeError, ImportError) as e:
      reason = str(e).strip().splitlines()[-1].strip()
      raise errors.ConfigError(f"cannot load --config: {reason}") from None
    if config is None:
      raise errors.ConfigError(
        "--config is required for --mode=train, e.g. --config=configs/demo.py"
      )
    train.train_and_evaluate(config, FLAGS.workdir)
  elif FLAGS.mode == "evaluate":
    evaluate.evaluate(FLAGS.workdir, step=FLAGS.step)
  else:
    for name in ("input", "output", "modality"):
      if not getattr(FLAGS, name):
        raise errors.ConfigError(f"--{name} is required for --mode=predict")
    segmenter = infer.load(FLAGS.workdir, step=FLAGS.step)
    written = infer.predict_paths(
      segmenter, FLAGS.input, FLAGS.output, FLAGS.modality, probabilities=FLAGS.probabilities
    )
    print(f"wrote {len(written)} prediction(s) to {FLAGS.output}")


def main(argv):
  if not FLAGS["verbosity"].present:
    # Libraries log every checkpoint at INFO; the run's own progress is printed. -v 0 shows all.
    logging.set_verbosity(logging.WARNING)
  try:
    run(argv)
  except errors.UkdError as e:  # the user's to fix: one line, no traceback
    logging.flush()
    print(f"ukd: error: {e}", file=sys.stderr)
    sys.exit(3 if isinstance(e, errors.TrainingError) else 2)


def _packaged_configs(argv):
  """Lets `--config=configs/x.py` find the installed copy when run outside a checkout."""
  here = importlib.util.find_spec("ukd.configs").submodule_search_locations[0]
  out = []
  for arg in argv:
    if arg.startswith("--config=configs/"):
      path, _, suffix = arg[len("--config=") :].partition(":")
      packaged = os.path.join(here, os.path.basename(path))
      if not os.path.exists(path) and os.path.exists(packaged):
        arg = f"--config={packaged}" + (f":{suffix}" if suffix else "")
    out.append(arg)
  return out


def _parse_flags(argv):
  """absl's parser, with a broken config (file, unknown key, wrong type) as one line."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    message = str(e)
  except (AttributeError, KeyError, TypeError, ValueError, SyntaxError, OSError) as e:
    message = (
      f"no such config field {e}"
      if isinstance(e, (AttributeError, KeyError))
      else f"{type(e).__name__}: {e}"
    )
  print(f"ukd: error: bad flag or config override: {' '.join(message.split())}", file=sys.stderr)
  sys.exit(2)


def cli():
  app.run(main, argv=_packaged_configs(sys.argv), flags_parser=_parse_flags)


if __name__ == "__main__":
  cli()
