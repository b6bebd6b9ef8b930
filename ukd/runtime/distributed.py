"""Joining a multi-process run (several hosts, or several processes on one machine).

Each process runs the same command; `jax.distributed` connects them before JAX touches a
device, after which every process sees all devices of the run and the data-parallel mesh
spans them.  Two ways in:
  * explicit: a coordinator address, the number of processes and this process's index,
    the same three values wherever the processes run;
  * `UKD_DISTRIBUTED=1` in the environment: jax finds its peers itself, from the Cloud TPU
    metadata or SLURM's variables.
CPU processes reduce over gloo.  The option only concerns the CPU backend, so it is set in
either case.
"""

import os

from ukd.errors import ConfigError

# The command line's names of the three explicit settings, in `initialize`'s order.
FLAG_NAMES = ("coordinator_address", "num_processes", "process_id")


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Joins the run the arguments (or `UKD_DISTRIBUTED`) describe; with neither, does nothing.

  Args:
    coordinator_address: HOST:PORT of process 0's coordinator.
    num_processes: how many processes in all.
    process_id: this process's index, 0 .. num_processes - 1.

  Raises:
    ConfigError: only some of the three are given, or `process_id` is out of range; the
      message names the command line's flags.
  """
  given = (coordinator_address, num_processes, process_id)
  if all(v is None for v in given) and not os.environ.get("UKD_DISTRIBUTED"):
    return
  if any(v is not None for v in given):
    missing = [f"--{name}" for name, v in zip(FLAG_NAMES, given) if v is None]
    if missing:
      raise ConfigError(
        "--coordinator_address, --num_processes and --process_id go together; missing: "
        + ", ".join(missing)
      )
    if not 0 <= process_id < num_processes:
      raise ConfigError(
        f"--process_id={process_id} must be in [0, --num_processes={num_processes})"
      )
  # Imported here: the command line answers --help and flag errors without loading JAX.
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address is None:
    jax.distributed.initialize()  # peers from the TPU metadata or SLURM's variables
  else:
    jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
    )
