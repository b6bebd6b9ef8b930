import os
import sys

# Tests compile many tiny graphs and run few steps: XLA's cheaper optimisation level
# halves compile time on the CPU. Set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402


def pytest_configure(config):
  # absl flags (grain reads some) must count as parsed outside absl.app.run.
  flags.FLAGS(sys.argv[:1], known_only=True)
  flags.FLAGS.mark_as_parsed()
