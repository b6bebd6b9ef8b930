import os
import shutil
import sys
import tempfile

# Tests compile many tiny graphs and run few steps: XLA's cheaper optimisation level
# halves compile time on the CPU. Set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most command-line tests start `python -m ukd.main` on the same tiny configs, and compiling
# their train and eval steps is most of each run: one compilation cache, fresh for this
# session and shared by every process it starts, compiles each program once (a tiny run: 82 s
# cold, 24 s warm on a busy 2-core machine).  Executables are looked up by their program and
# compile options, so what runs is what would have been compiled.
_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="ukd_tests_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
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


def pytest_unconfigure(config):
  if _CACHE is not None:
    shutil.rmtree(_CACHE, ignore_errors=True)
