r"""ukd against the same network in PyTorch with torch.compile, side by side, on this machine.

  python -m benchmarks.vs_torch --torch_python=/path/to/torch-venv/bin/python \
      --torch_peer=/path/to/torch_peer.py --rounds=3

The peer (`torch_peer.py`: the paper's 2D network, losses, KD and Adam written in PyTorch) runs
in a Python of its own, since torch is no dependency of ukd.  Each round times, one after the
other, ukd's train step and eval forward (`benchmarks.train_throughput` on `--config`, default
`configs/mmwhs.py` at width 4, 128 px, 8 + 8 slices, float32, its mirror padding) and the
peer's train step and inference forward with the same padding (`--mirror`, `--eval`).
Alternating the two, round after round, spreads whatever else the machine does over both;
the table gives each side's median over the rounds and the ratio torch / ukd (above 1: ukd is
faster).  The load average before and after is printed: other processes on the cores skew
every number.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

from ukd import cli

_TORCH_PYTHON = flags.DEFINE_string("torch_python", None, "A Python with torch installed.")
_TORCH_PEER = flags.DEFINE_string("torch_peer", None, "The path of torch_peer.py.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds of ukd and the peer.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per measurement (median).")
_WIDTH = flags.DEFINE_integer("width", 4, "Base width of both networks.")
_SIZE = flags.DEFINE_integer("size", 128, "Slice size (pixels) of both.")
_BATCH = flags.DEFINE_integer("batch", 8, "Slices per modality per step.")
_PAD = flags.DEFINE_enum("pad", "reference", ["reference", "zeros"], "Padding of both networks.")
_CONFIG = flags.DEFINE_string("config", "configs/mmwhs.py", "ukd's config.")
_XLA_FLAGS = flags.DEFINE_string("xla_flags", None, "XLA_FLAGS for ukd (default: as set).")
_CONV_GRADS = flags.DEFINE_string(
  "conv_grads", None, "ukd's config.model.conv_grads (default: the config's)."
)

_PEER_MS = re.compile(r"median_ms_per_step=([0-9.]+)")


def ukd_ms() -> dict:
  """{'train', 'eval'}: ukd's median milliseconds, through `benchmarks.train_throughput`."""
  with tempfile.TemporaryDirectory() as folder:
    out = os.path.join(folder, "ukd.json")
    env = dict(os.environ)
    if _XLA_FLAGS.value is not None:
      env["XLA_FLAGS"] = _XLA_FLAGS.value
    subprocess.run(
      [
        sys.executable,
        "-m",
        "benchmarks.train_throughput",
        f"--config={_CONFIG.value}",
        f"--config.model.width={_WIDTH.value}",
        f"--config.data.size=({_SIZE.value}, {_SIZE.value})",
        f"--config.batch_size={_BATCH.value}",
        f"--pads={_PAD.value}",
        "--dtypes=float32",
        f"--steps={_STEPS.value}",
        "--matmul_size=512",  # the peak rate is not compared here
        f"--json={out}",
        *([f"--conv_grads={_CONV_GRADS.value}"] if _CONV_GRADS.value else []),
      ],
      check=True,
      capture_output=True,
      env=env,
    )
    with open(out) as f:
      (result,) = json.load(f)["results"]
  return {kind: 1e3 * result[kind]["step_s"] for kind in ("train", "eval")}


def peer_ms(*extra: str) -> float:
  """The peer's median milliseconds per step with `extra` flags."""
  args = [
    _TORCH_PYTHON.value,
    _TORCH_PEER.value,
    f"--base={_WIDTH.value}",
    f"--size={_SIZE.value}",
    f"--batch={_BATCH.value}",
    f"--steps={_STEPS.value}",
    "--compile",
    *(["--mirror"] if _PAD.value == "reference" else []),
    *extra,
  ]
  out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
  return float(_PEER_MS.search(out).group(1))


def main(argv):
  del argv
  if not (_TORCH_PYTHON.value and _TORCH_PEER.value):
    raise app.UsageError("--torch_python and --torch_peer are required")
  load = os.getloadavg()[0]
  times = {"ukd train": [], "ukd eval": [], "torch train": [], "torch eval": []}
  for _ in range(_ROUNDS.value):
    mine = ukd_ms()
    times["ukd train"].append(mine["train"])
    times["ukd eval"].append(mine["eval"])
    times["torch train"].append(peer_ms())
    times["torch eval"].append(peer_ms("--eval"))
  median = {k: statistics.median(v) for k, v in times.items()}
  print(
    f"width {_WIDTH.value}, {_SIZE.value} px, {_BATCH.value} + {_BATCH.value} slices, "
    f"pad {_PAD.value}, float32, conv_grads {_CONV_GRADS.value or 'of the config'}, "
    f"{_ROUNDS.value} rounds; load {load:.2f} -> "
    f"{os.getloadavg()[0]:.2f}; XLA_FLAGS={_XLA_FLAGS.value or os.environ.get('XLA_FLAGS', '')}"
  )
  print("| work | ukd (ms) | torch.compile (ms) | torch / ukd |")
  print("| --- | --- | --- | --- |")
  for kind in ("train", "eval"):
    ukd, torch = median[f"ukd {kind}"], median[f"torch {kind}"]
    spread = ", ".join(
      f"{u:.0f}/{t:.0f}" for u, t in zip(times[f"ukd {kind}"], times[f"torch {kind}"])
    )
    print(f"| {kind} | {ukd:.0f} | {torch:.0f} | {torch / ukd:.2f} (rounds ukd/torch: {spread}) |")


if __name__ == "__main__":
  cli.set_xla_defaults()  # ukd's side runs with the XLA flags of ukd's command lines
  app.run(main)
