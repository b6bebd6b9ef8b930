"""A `jax.profiler` trace of a few training steps (`config.profile = (first_step, num_steps)`).

The trace covers steps first_step .. first_step + num_steps - 1, numbered as the logs number
them (the first step is 1; tracing it includes compilation), and lands in
`<workdir>/profile/plugins/profile/<time>/`: `<host>.xplane.pb` for TensorBoard's profile
plugin (`tensorboard --logdir <workdir>/profile`) and `perfetto_trace.json.gz` for
ui.perfetto.dev.  The profiler writes to local files only, so for a remote work dir the trace
goes to a local folder that is uploaded when the trace stops.  A run resumed past first_step
traces nothing.
"""

import os
import shutil
import tempfile

import jax

from ukd import files
from ukd.train import writers

PROFILE = "profile"  # <workdir>/profile


class StepTrace:
  """Starts the trace before `first_step` runs and stops it once the last traced step's
  outputs are ready, so the device work of every traced step is in it."""

  def __init__(self, workdir, profile):
    first_step, num_steps = (int(v) for v in profile)
    self.first, self.last = first_step, first_step + num_steps - 1
    self.enabled = num_steps > 0
    self.target = files.path(workdir) / PROFILE
    self.remote = files.is_remote(self.target)
    self.logdir = None  # set while tracing

  def before(self, step: int) -> None:
    """Call before step `step` (1-based) runs."""
    if self.enabled and step == self.first:
      if self.remote:
        self.logdir = tempfile.mkdtemp(prefix="ukd-profile-")
      else:
        self.logdir = os.fspath(self.target)
        files.makedirs(self.target)
      jax.profiler.start_trace(self.logdir, create_perfetto_trace=True)

  def after(self, step: int, outputs) -> None:
    """Call after step `step` was dispatched, with its outputs."""
    if self.logdir is not None and step == self.last:
      jax.block_until_ready(outputs)
      self.close()

  def close(self) -> None:
    """Stops a trace still running (a run that ended inside the traced steps) and writes it."""
    if self.logdir is None:
      return
    jax.profiler.stop_trace()
    if self.remote:
      writers.upload_changes(self.logdir, self.target, {})
      shutil.rmtree(self.logdir, ignore_errors=True)
    self.logdir = None
