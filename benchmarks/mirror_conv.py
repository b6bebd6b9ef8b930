r"""Formulations of the mirror-padded convolution (`model.pad='reference'`), timed on the CPU.

  python -m benchmarks.mirror_conv
  python -m benchmarks.mirror_conv --conv_grads=cpu_matmul --runs=5

XLA:CPU takes a slow path for a convolution with no padding at all ('VALID'), which is how
the mirror-padded input used to be convolved.  Each formulation here computes the same
output from the same mirror-padded input (`layers.mirror_pad`, numpy's 'symmetric'):

  valid      convolve with padding 'VALID' (the old form)
  same_crop  convolve with 'SAME' zero padding, crop the border the zeros reached
  pad1_crop  convolve with zero padding (1, 1), crop one pixel per side
  pad01_crop convolve with zero padding (0, 1), crop the last pixel per axis
  pad10_crop convolve with zero padding (1, 0), crop the first pixel per axis

for the two mirror-padded layers of the 2D network at the mmwhs recipe (width 4, 128 px,
8 + 8 slices): the 3x3 128 -> 2560 convolution at 1/8 resolution and the 5x5 40 -> 5 head.
Forward alone and forward + backward (gradients of input and kernel), each jitted, the
median of --runs rounds (each form once per round) after one untimed call; the largest difference from 'valid' is
printed too.  The 1-minute load average is printed: other processes skew every number.
"""

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import lax

from ukd.models import layers

_RUNS = flags.DEFINE_integer("runs", 5, "Timed calls per measurement (the median is reported).")
_CONV_GRADS = flags.DEFINE_enum(
  "conv_grads", "xla", ["xla", "cpu_matmul"], "The convolution `nn.Conv` calls."
)

# (name, input [B, H, W, C], kernel size, output features): the recipe's mirror-padded layers.
LAYERS = (
  ("upsample 3x3", (16, 16, 16, 128), 3, 2560),
  ("head 5x5", (16, 128, 128, 40), 5, 5),
)


def _crop(y, pads):
  return lax.pad(
    y, jnp.zeros((), y.dtype), [(0, 0, 0), *((-lo, -hi, 0) for lo, hi in pads)] + [(0, 0, 0)]
  )


def formulations(conv):
  """name -> f(x, w): the mirror-padded convolution of x (spatial size kept)."""
  dn = ("NHWC", "HWIO", "NHWC")

  def run(x, w, padding, crop):
    p = w.shape[0] // 2
    padded = layers.mirror_pad(x, ((p, p), (p, p)))
    y = conv(
      padded,
      w,
      (1, 1),
      padding,
      dimension_numbers=lax.conv_dimension_numbers(padded.shape, w.shape, dn),
    )
    return _crop(y, crop) if crop else y

  return {
    "valid": lambda x, w: run(x, w, "VALID", None),
    "same_crop": lambda x, w: run(x, w, "SAME", ((w.shape[0] // 2,) * 2,) * 2),
    "pad1_crop": lambda x, w: run(x, w, ((1, 1), (1, 1)), ((1, 1), (1, 1))),
    "pad01_crop": lambda x, w: run(x, w, ((0, 1), (0, 1)), ((0, 1), (0, 1))),
    "pad10_crop": lambda x, w: run(x, w, ((1, 0), (1, 0)), ((1, 0), (1, 0))),
  }


def _seconds(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def main(argv):
  del argv
  print(
    f"jax {jax.__version__}, {jax.devices()[0].device_kind}, conv_grads {_CONV_GRADS.value}, "
    f"1-min load average {os.getloadavg()[0]:.2f}"
  )
  conv = layers.CONV_GRADS[_CONV_GRADS.value]
  rng = np.random.default_rng(0)
  print(f"{'layer':<14} {'form':<11} {'fwd ms':>8} {'fwd+bwd ms':>11} {'max |diff|':>11}")
  for name, shape, k, features in LAYERS:
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, shape[-1], features)) * 0.05, jnp.float32)
    g = jnp.asarray(rng.normal(size=(*shape[:-1], features)), jnp.float32)
    compiled = {}
    for form, f in formulations(conv).items():
      # The output is returned with the gradients, so that the forward pass is not pruned.
      both = lambda x, w, g, f=f: (lambda y, vjp: (y, vjp(g)))(*jax.vjp(f, x, w))
      compiled[form] = (jax.jit(f), jax.jit(both))
      jax.block_until_ready([compiled[form][0](x, w), compiled[form][1](x, w, g)])
    # Rounds over all forms, so that a change in the load hits every form alike.
    times = {form: ([], []) for form in compiled}
    for _ in range(_RUNS.value):
      for form, (forward, both) in compiled.items():
        times[form][0].append(_seconds(forward, x, w))
        times[form][1].append(_seconds(both, x, w, g))
    reference = compiled["valid"][0](x, w)
    for form, (forward, _) in compiled.items():
      diff = float(jnp.abs(forward(x, w) - reference).max())
      fwd, fwd_bwd = (1e3 * statistics.median(t) for t in times[form])
      print(f"{name:<14} {form:<11} {fwd:>8.1f} {fwd_bwd:>11.1f} {diff:>11.2e}", flush=True)
  print(f"1-min load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  app.run(main)
