"""What every ukd command line (`ukd.main`, `ukd.study.runner`) does around its own flags.

`run(main)` is `absl.app.run(main)` with what a user of either command expects:
  * packaged configs: `--config=configs/x.py` names a file of a checkout; run anywhere else
    (ukd installed with pip), the same argument finds the copy installed as `ukd.configs`;
  * flag errors on one line: a flag, config argument or config override that absl or
    ml_collections rejects ends the program with one `ukd: error:` line (exit 2) instead of
    absl's usage text or a traceback;
  * the user's errors on one line: a `UkdError` out of `main` is printed by
    `errors.exit_with`; any other exception is a bug and keeps its traceback;
  * library chatter (Orbax notices, deprecation warnings) kept off the terminal, unless
    `--verbosity` is given;
  * `--help` (`-h`, `--helpfull`) prints the usage and exits 0, where absl's exits 1.
Nothing here imports JAX, so `--help` and flag errors answer at once.
"""

import importlib.util
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence

import ml_collections as mc
from absl import app, flags, logging

from ukd import errors

_TRACEBACK = "Traceback (most recent call last)"
_HELP = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull")


# XLA flags every ukd command line sets unless the user's XLA_FLAGS name them.  Matrix
# products on the CPU by Eigen rather than YNNPACK (convolutions stay YNNPACK's): YNNPACK ran
# the 2D network's im2col products at 98-180 GFLOP/s where Eigen ran them at 190-209 on a
# 2-core AMD EPYC (jax 0.10.2), and the recipe's train step at width 4 went from 0.94x to
# 1.02x torch.compile's (`benchmarks/RESULTS.md`).  CPU only; the same products either way.
# The flag is experimental, and XLA stops at a flag it does not know: it is set only for the
# jaxlib releases it was measured with.
XLA_DEFAULTS = {"xla_cpu_experimental_ynn_fusion_type": "individual_convolution"}
XLA_DEFAULTS_JAXLIB = "0.10."


def set_xla_defaults(environ=os.environ, jaxlib=None) -> None:
  """Adds `XLA_DEFAULTS` to XLA_FLAGS, each unless the user's XLA_FLAGS set it, for a jaxlib
  of `XLA_DEFAULTS_JAXLIB` (`jaxlib`: the installed one's version).  XLA reads the variable
  when its first backend starts: call before anything runs on a device."""
  if jaxlib is None:
    from importlib import metadata

    jaxlib = metadata.version("jaxlib")
  if not jaxlib.startswith(XLA_DEFAULTS_JAXLIB):
    return
  given = environ.get("XLA_FLAGS", "")
  extra = [f"--{name}={value}" for name, value in XLA_DEFAULTS.items() if f"--{name}=" not in given]
  if extra:
    environ["XLA_FLAGS"] = " ".join([given, *extra]).strip()


def run(main: Callable[[list[str]], None]) -> None:
  """Parses the flags and runs `main(argv)` as the module docstring says; does not return."""
  set_xla_defaults()

  def guarded(argv):
    if not flags.FLAGS["verbosity"].present:
      quiet_libraries()
    try:
      main(argv)
    except errors.UkdError as e:
      logging.flush()
      errors.exit_with(e)

  if any(arg in _HELP for arg in sys.argv[1:]):
    show_help(full="--helpfull" in sys.argv[1:])
  app.run(guarded, argv=packaged_configs(sys.argv), flags_parser=parse_flags)


def quiet_libraries() -> None:
  """Keeps library chatter (Orbax notices at every checkpoint load, deprecation warnings) off
  the user's terminal, which then shows the project's own lines only; `--verbosity` (any
  value) leaves logging as absl sets it.  Set once per command line, before anything runs."""
  logging.set_verbosity(logging.ERROR)
  warnings.simplefilter("ignore")


def show_help(full: bool = False) -> None:
  """The command's docstring and its flags (`full`: absl's too) on stdout, exit status 0:
  asking for help is no error, but absl's `--help` exits 1, which a script or a package check
  reads as a failure."""
  app.usage(shorthelp=not full, writeto_stdout=True)
  sys.exit(0)


def packaged_configs(argv: Sequence[str]) -> list[str]:
  """`argv` with each `--config=configs/<name>.py[:arg]` that names no file here pointed at
  the installed `ukd.configs/<name>.py`, when that exists."""
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


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's parser; a flag it rejects, or a broken config (an argument `get_config` refuses,
  an unknown field, a value of the wrong type), exits 2 with one `ukd: error:` line.

  Returns:
    The arguments that are not flags, as absl's own parser does.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = _without_traceback(str(e))
  except (AttributeError, KeyError, TypeError, ValueError, SyntaxError, OSError) as e:
    message = (
      _no_such_field(e) if isinstance(e, (AttributeError, KeyError)) else f"{type(e).__name__}: {e}"
    )
  print(f"ukd: error: bad flag or config override: {' '.join(message.split())}", file=sys.stderr)
  sys.exit(2)


def _no_such_field(e: AttributeError | KeyError) -> str:
  """The line "no such config field 'widht' (did you mean 'width'?)" from ml_collections'
  error, a KeyError (inside an AttributeError) whose text is the quoted name, a newline and
  'Did you mean "width" instead of "widht"?': printed as it is, its quotes came out escaped."""
  while e.args and isinstance(e.args[0], (AttributeError, KeyError)):
    e = e.args[0]
  text = str(e.args[0]) if e.args else str(e)
  first, _, rest = text.partition("\n")
  name = first.strip("'\"")
  message = f"no such config field '{name}'"
  suggestion = re.search(r'Did you mean "([^"]+)"', rest)
  return message + (f" (did you mean '{suggestion.group(1)}'?)" if suggestion else "")


def _without_traceback(message: str) -> str:
  """ml_collections puts the traceback of a config file that raised into the flag's error:
  keep the flag and the exception it ended with, e.g. 'flag --config=configs/demo.py:x:
  ConfigError: config argument 'x' is not one of [...]'."""
  if _TRACEBACK not in message:
    return message
  flag = message.split(": ", 1)[0]
  name, _, text = message.strip().splitlines()[-1].partition(": ")
  return f"{flag}: {name.rpartition('.')[2]}: {text}"


def require_flags(mode: str, *names: str) -> None:
  """A one-line ConfigError naming the first of the flags `names`, which `--mode=<mode>`
  needs, that is not set."""
  for name in names:
    if not flags.FLAGS[name].value:
      raise errors.ConfigError(f"--{name} is required for --mode={mode}")


def required_config(config: mc.ConfigDict | None, usage: str) -> mc.ConfigDict:
  """A `--config` flag's value, checked: a config file that failed to load (ml_collections
  raises only on first use) or no `--config` at all is a one-line ConfigError.

  Args:
    config: the flag's value.
    usage: what needs it, with an example, e.g. 'for --mode=train, e.g. --config=...'.

  Returns:
    `config` itself.
  """
  try:
    if config is not None:
      config.keys()
  except (OSError, SyntaxError, AttributeError, ImportError) as e:
    reason = str(e).strip().splitlines()[-1].strip()
    raise errors.ConfigError(f"cannot load --config: {reason}") from None
  if config is None:
    raise errors.ConfigError(f"--config is required {usage}")
  return config
