"""Command line: train, evaluate, predict, or check a dataset.

  python -m ukd.main --config=configs/demo.py --workdir=/tmp/ukd_demo
  python -m ukd.main --config=configs/mmwhs.py --workdir=runs/mmwhs --config.data.root=/data/MMWHS
  python -m ukd.main --mode=evaluate --workdir=runs/mmwhs
  python -m ukd.main --mode=predict --workdir=runs/mmwhs --input=scans/ --output=preds/ --modality=ct
  python -m ukd.main --mode=check --config=configs/mmwhs.py --workdir=runs/mmwhs --config.data.root=/data/MMWHS

Training resumes automatically from the work dir's latest checkpoint.  Errors in
the user's input end the program with one line naming the file or setting.
"""

import importlib.util
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ukd import errors, writers

config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/mmwhs.py[:arg].", lock_config=True
)
flags.DEFINE_string("workdir", None, "Work dir: checkpoints, logs, splits, cache, evaluation.")
flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "evaluate", "predict", "check"],
  "train (then evaluate on the test split), evaluate, predict, or check (read every case of "
  "the --config's dataset and summarise it).",
)
flags.DEFINE_string(
  "coordinator_address", None, "Multi-process run: HOST:PORT of process 0's coordinator."
)
flags.DEFINE_integer("num_processes", None, "Multi-process run: how many processes in all.")
flags.DEFINE_integer("process_id", None, "Multi-process run: this process's index, 0..N-1.")
flags.DEFINE_string("step", "best", "Checkpoint for evaluate / predict: best, latest or a step.")
flags.DEFINE_string("input", None, "predict: a NIfTI file or a folder of them.")
flags.DEFINE_string("output", None, "predict: the folder for the predicted label maps.")
flags.DEFINE_string("modality", None, "predict: the modality of the inputs, e.g. ct or mr.")
flags.DEFINE_bool("probabilities", False, "predict: also write class probabilities.")
flags.DEFINE_bool("overwrite", False, "predict: replace outputs that already exist.")
flags.DEFINE_enum(
  "label_codes",
  "dataset",
  ["dataset", "index"],
  "predict: write the dataset's own label codes (e.g. MM-WHS 205, 420, ...) or class indices.",
)
flags.mark_flag_as_required("workdir")

FLAGS = flags.FLAGS


def run(argv):
  del argv
  # Imported here so that `--help` and flag errors answer without loading JAX.
  import jax

  from ukd import check, evaluate, infer, train

  start_distributed(jax)
  if FLAGS.mode in ("train", "check"):
    try:
      config = FLAGS.config
      if config is not None:
        config.keys()  # a config file that failed to load raises on first use
    except (OSError, SyntaxError, AttributeError, ImportError) as e:
      reason = str(e).strip().splitlines()[-1].strip()
      raise errors.ConfigError(f"cannot load --config: {reason}") from None
    if config is None:
      raise errors.ConfigError(
        f"--config is required for --mode={FLAGS.mode}, e.g. --config=configs/demo.py"
      )
    if FLAGS.mode == "check":
      check.check_config(config, train.dataset_root(config, FLAGS.workdir))
    else:
      train.train_and_evaluate(config, FLAGS.workdir)
  elif FLAGS.mode == "evaluate":
    evaluate.evaluate(FLAGS.workdir, step=FLAGS.step)
  else:
    for name in ("input", "output", "modality"):
      if not getattr(FLAGS, name):
        raise errors.ConfigError(f"--{name} is required for --mode=predict")
    segmenter = infer.load(FLAGS.workdir, step=FLAGS.step)
    written = infer.predict_paths(
      segmenter,
      FLAGS.input,
      FLAGS.output,
      FLAGS.modality,
      probabilities=FLAGS.probabilities,
      overwrite=FLAGS.overwrite,
      label_codes=FLAGS.label_codes,
    )
    print(f"wrote {len(written)} file(s) to {FLAGS.output}")


def start_distributed(jax) -> None:
  """Joins a multi-process run before JAX touches a device.

  `--coordinator_address/--num_processes/--process_id` work anywhere (several hosts, or
  several processes on one machine); `UKD_DISTRIBUTED=1` lets jax find its peers itself on a
  Cloud TPU pod or under SLURM. CPU processes reduce over gloo (the option only concerns
  the CPU backend, so it is set in every case)."""
  given = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
  if any(v is not None for v in given):
    if any(v is None for v in given):
      raise errors.ConfigError(
        "--coordinator_address, --num_processes and --process_id go together; missing: "
        + ", ".join(
          f"--{n}"
          for n, v in zip(("coordinator_address", "num_processes", "process_id"), given)
          if v is None
        )
      )
    if not 0 <= FLAGS.process_id < FLAGS.num_processes:
      raise errors.ConfigError(
        f"--process_id={FLAGS.process_id} must be in [0, --num_processes={FLAGS.num_processes})"
      )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
    )
  elif os.environ.get("UKD_DISTRIBUTED"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize()  # peers from the TPU metadata or SLURM's variables


def main(argv):
  if not FLAGS["verbosity"].present:
    writers.quiet_libraries()
  try:
    run(argv)
  except errors.UkdError as e:  # the user's to fix: one line, no traceback
    logging.flush()
    errors.exit_with(e)


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
