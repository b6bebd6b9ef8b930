"""How much the libraries ukd runs on (Orbax, JAX, absl, Python warnings) say on the terminal.

Kept apart from what a run itself reports (`ukd.train.writers`): this is set once per command line,
before anything runs.
"""

import warnings

from absl import logging


def quiet_libraries() -> None:
  """Keeps library chatter (Orbax notices at every checkpoint load, deprecation warnings) off
  the user's terminal, which then shows the project's own lines only; `--verbosity` (any
  value) leaves logging as absl sets it."""
  logging.set_verbosity(logging.ERROR)
  warnings.simplefilter("ignore")
