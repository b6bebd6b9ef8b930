r"""Train-step and inference throughput of a config's network, against the device's matmul rate.

  python -m benchmarks.train_throughput --config=configs/mmwhs.py
  python -m benchmarks.train_throughput --config=configs/mmwhs.py:runlocal \
      --dtypes=float32,bfloat16 --json=/tmp/throughput.json
  python -m benchmarks.train_throughput --config=configs/mmwhs.py --config.model.width=4 \
      --config.data.size="(128, 128)" --conv_grads=cpu_matmul

For each dtype in --dtypes (`config.model.dtype`: the convolutions' compute dtype), the
network, train state and jitted data-parallel train step are built from the config exactly
as `ukd.train.loop` builds them, fed random inputs of the config's shapes (batch_size per
modality x modalities, concatenated in one forward pass), compiled, and timed: the median
of --steps steps after --warmup untimed ones, each blocked on.  The eval forward pass
(`models.make_eval_step`, running statistics) is timed the same way on a batch of the same
number of slices.

Each padding mode in --pads (`config.model.pad`: 'zeros', or the reference's mirror padding
of the 2D network's last two convolutions) is a row of its own, so that a slow path taken by
one of them shows here; the 3D network has no mirror padding and is timed once, with the
config's.

--conv_grads sets `config.model.conv_grads` (default: the config's), the convolutions'
gradients: 'xla' (XLA's own) or 'cpu_matmul' (`ukd.models.conv_grads`).

The FLOPs per step are XLA's own count (cost analysis of the lowered module, see `_flops`),
not a hand count.  The train step's count is taken from the step traced with
`conv_grads='xla'`: with 'cpu_matmul' the CPU step computes wide layers' gradients as im2col
matmuls, which XLA counts with their multiplications by padding zeros (about 3% more at
width 4), and achieved FLOP/s should measure speed, not the formulation; both counts are in
the JSON.  The rate is set against a measured peak: a large square matmul in
the same dtype on the same device (2 n^3 FLOPs), the best rate any op reaches in practice
there, so "% of peak" says how far the network's mix of convolutions, norms and data
movement is from matmul speed.  XLA_FLAGS and the load average (other processes sharing
the cores skew every number) are printed with the results.
"""

import datetime
import functools
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ukd import cli, models
from ukd.models import layers
from ukd.runtime import mesh as mesh_lib
from ukd.train import state as state_lib
from ukd.train import steps

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file (with overrides).")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "config.model.dtype values to time.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_MATMUL = flags.DEFINE_integer(
  "matmul_size", 0, "n of the n x n peak matmul (0: 4096 on CPU, 8192 on accelerators)."
)
_PADS = flags.DEFINE_list(
  "pads", ["zeros", "reference"], "config.model.pad values to time (2D networks)."
)
_EVAL = flags.DEFINE_bool("eval", True, "Also time the eval forward pass.")
_JSON = flags.DEFINE_string("json", "", "Write the numbers to this JSON file.")
_CONV_GRADS = flags.DEFINE_enum(
  "conv_grads", None, ["xla", "cpu_matmul"], "config.model.conv_grads (default: the config's)."
)


def _flops(lowered) -> float:
  """XLA's FLOP count of a lowered (not yet compiled) computation.

  Counted before the backend's rewrites: on a GPU the compiled executable's convolutions are
  cuDNN custom calls that its cost analysis does not count (the H200 run reported 33 GFLOP
  for a ~7 TFLOP step), while the lowered module still holds them as convolutions, counted
  the same way on every backend. Older jax returns one dict per program."""
  analysis = lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    return float(sum(a.get("flops", 0.0) for a in analysis if a))
  return float((analysis or {}).get("flops", 0.0))


def _median_seconds(run, steps: int, warmup: int) -> float:
  """Median wall time of `run()` (which must block on its result) over `steps` calls."""
  for _ in range(warmup):
    run()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_peak(dtype: str, n: int, steps: int = 5) -> dict:
  """FLOP/s of an n x n x n matmul in `dtype`: the device's practical peak for that dtype."""
  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.random.normal(k, (n, n), jnp.float32).astype(dtype) for k in keys)
  matmul = jax.jit(jnp.matmul).lower(a, b).compile()
  seconds = _median_seconds(lambda: matmul(a, b).block_until_ready(), steps, warmup=1)
  return dict(n=n, seconds=seconds, flops_per_s=2.0 * n**3 / seconds)


def _random_batch(config, spatial, rng) -> dict:
  channels = models.example_input(config.model, spatial).shape[-1]
  shape = (config.batch_size, *spatial)
  return {
    m: {
      "image": rng.normal(size=(*shape, channels)).astype(np.float32),
      "label": rng.integers(0, config.model.num_classes, shape).astype(np.int32),
    }
    for m in config.modalities
  }


def _uses_dtype(lowered, dtype: str) -> bool:
  """Whether the lowered program computes in `dtype` at all: catches a config whose
  `model.dtype` the network ignores, which would otherwise time float32 under a bf16 label."""
  name = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}.get(dtype, dtype)
  return f"x{name}>" in lowered.as_text() or f"<{name}>" in lowered.as_text()


def measure(config, pad: str, dtype: str, steps_n: int, warmup: int, with_eval: bool) -> dict:
  """Times one padding mode's and dtype's train step (and eval pass) built from `config`."""
  config = config.copy_and_resolve_references()
  config.model.pad = pad
  config.model.dtype = dtype
  model = models.build(config.model, config.modalities)
  spatial = models.input_spatial(config)
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_batch_size(config.batch_size, mesh)
  state = state_lib.create(config, model, spatial, jax.random.key(config.seed), mesh)
  batch = mesh_lib.to_global_batch(_random_batch(config, spatial, np.random.default_rng(0)), mesh)
  slices = config.batch_size * len(config.modalities)

  start = time.perf_counter()
  lowered = steps.make_train_step(model, config, mesh).lower(state, batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  holder = [state]

  def train_once():
    holder[0], metrics = compiled(holder[0], batch)  # the state is donated: keep the new one
    jax.block_until_ready((holder[0], metrics))

  seconds = _median_seconds(train_once, steps_n, warmup)
  # The model's FLOPs, as XLA counts its own formulation of the gradients.
  xla_model = model.clone(conv=layers.CONV_GRADS["xla"])
  flops = _flops(steps.make_train_step(xla_model, config, mesh).lower(holder[0], batch))
  result = dict(
    pad=pad,
    dtype=dtype,
    computes_in_dtype=_uses_dtype(lowered, dtype),
    slices=slices,
    compile_s=compile_s,
    train=dict(
      step_s=seconds,
      slices_per_s=slices / seconds,
      flops=flops,
      program_flops=_flops(lowered),
      flops_per_s=flops / seconds,
    ),
  )
  if with_eval:
    variables = {"params": holder[0].params, "batch_stats": holder[0].batch_stats}
    images = jnp.concatenate([batch[m]["image"] for m in config.modalities], axis=0)
    modality = config.modalities[0]
    eval_lowered = models.make_eval_step(model).lower(variables, images, modality=modality)
    eval_compiled = eval_lowered.compile()
    run = functools.partial(eval_compiled, variables, images)
    seconds = _median_seconds(lambda: run().block_until_ready(), steps_n, warmup)
    flops = _flops(eval_lowered)
    result["eval"] = dict(
      step_s=seconds, slices_per_s=slices / seconds, flops=flops, flops_per_s=flops / seconds
    )
  return result


def environment() -> dict:
  device = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = f"{names[0]} x {len(names)}" if names else cpu
  except OSError:
    pass
  return dict(
    date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    jax=jax.__version__,
    backend=jax.default_backend(),
    devices=len(jax.devices()),
    device_kind=device.device_kind,
    cpu=cpu,
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    load_average=os.getloadavg()[0],
  )


def table(config, env: dict, results: list, peaks: dict) -> str:
  """The report as fixed-width text: one row per (padding, dtype, pass)."""
  spatial = "x".join(str(s) for s in models.input_spatial(config))
  lines = [
    f"date {env['date']}  jax {env['jax']}  {env['devices']} x {env['device_kind']} "
    f"({env['backend']}; host {env['cpu']})",
    f"XLA_FLAGS={env['xla_flags']!r}  1-min load average {env['load_average']:.2f} at start, "
    f"{env['load_average_end']:.2f} at end",
    f"network {config.model.name} width {config.model.width} "
    f"(conv_grads {config.model.conv_grads}), {config.model.num_classes} "
    f"classes, {spatial}, {config.batch_size} x {len(config.modalities)} "
    f"({'+'.join(config.modalities)}) slices per step",
  ]
  for dtype, peak in peaks.items():
    lines.append(
      f"peak: {peak['n']}^2 {dtype} matmul {peak['flops_per_s'] / 1e9:.1f} GFLOP/s "
      f"({peak['seconds'] * 1e3:.0f} ms)"
    )
  header = f"{'pad':<9} {'dtype':<9} {'pass':<6} {'step ms':>9} {'slices/s':>9} {'GFLOP':>8} "
  header += f"{'GFLOP/s':>9} {'% peak':>7}"
  lines += [header, "-" * len(header)]
  for r in results:
    for kind in ("train", "eval"):
      if kind not in r:
        continue
      m = r[kind]
      pct = 100.0 * m["flops_per_s"] / peaks[r["dtype"]]["flops_per_s"]
      lines.append(
        f"{r['pad']:<9} {r['dtype']:<9} {kind:<6} {m['step_s'] * 1e3:>9.1f} {m['slices_per_s']:>9.1f} "
        f"{m['flops'] / 1e9:>8.1f} {m['flops_per_s'] / 1e9:>9.1f} {pct:>6.1f}%"
      )
    if not r["computes_in_dtype"]:
      lines.append(
        f"  warning: the {r['dtype']} program has no {r['dtype']} values; "
        "does the network read config.model.dtype?"
      )
  return "\n".join(lines)


def main(argv):
  del argv
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/mmwhs.py")
  if _CONV_GRADS.value:
    config.model.conv_grads = _CONV_GRADS.value
  n = _MATMUL.value or (4096 if jax.default_backend() == "cpu" else 8192)
  env = environment()
  pads = _PADS.value if models.DIMS[config.model.name] == 2 else [config.model.pad]
  peaks = {dtype: matmul_peak(dtype, n) for dtype in _DTYPES.value}
  results = [
    measure(config, pad, dtype, _STEPS.value, _WARMUP.value, _EVAL.value)
    for pad in pads
    for dtype in _DTYPES.value
  ]
  for r in results:
    for kind in ("train", "eval"):
      if kind in r:
        r[kind]["pct_of_peak"] = 100.0 * r[kind]["flops_per_s"] / peaks[r["dtype"]]["flops_per_s"]
  env["load_average_end"] = os.getloadavg()[0]
  print(table(config, env, results, peaks))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(dict(env, config=config.to_dict(), peaks=peaks, results=results), f, indent=2)
    print(f"wrote {_JSON.value}")


if __name__ == "__main__":
  cli.set_xla_defaults()  # as every ukd command line: what its users run
  app.run(main)
