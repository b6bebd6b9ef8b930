import os
import sys

# Tests compile many tiny graphs and run few steps: XLA's cheaper optimisation level
# halves compile time on the CPU. Set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Every ukd process the tests start (the command line end to end: train, resume, evaluate,
# predict, score, several processes, the study) inherits this and runs with implicit
# host-to-device and device-to-host transfers disallowed: the library's transfers must all be
# explicit (`jax.device_put`, `jax.device_get`, jitted constants).  In this process the unit
# tests themselves compute with jnp on host values (keys, toy arrays), so here the guard is
# lifted again in `pytest_configure`.
os.environ["JAX_TRANSFER_GUARD"] = "disallow"

from absl import flags  # noqa: E402


def pytest_configure(config):
  import jax

  jax.config.update("jax_transfer_guard", "allow")
  # absl flags (grain reads some) must count as parsed outside absl.app.run.
  flags.FLAGS(sys.argv[:1], known_only=True)
  flags.FLAGS.mark_as_parsed()
