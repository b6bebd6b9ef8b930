#!/usr/bin/env bash
# Train on several GPU nodes under SLURM: one process per node, each using all its GPUs.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm.sh configs/mmwhs.py:pod /shared/runs/mmwhs \
#       --config.data.root=/shared/data/MMWHS
#
# jax.distributed.initialize() reads SLURM's variables (UKD_DISTRIBUTED=1 asks ukd.main to
# call it), so every process knows the coordinator, the process count and its own rank.
# The work dir must be on a file system every node shares. --signal sends SIGTERM two minutes
# before the time limit or on preemption: the run saves a checkpoint at the next step on every
# node and stops; --requeue starts the same job again, which resumes from that checkpoint.
#SBATCH --job-name=ukd
#SBATCH --ntasks-per-node=1
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=ukd-%j.log
set -euo pipefail
config=${1:?usage: sbatch launch/slurm.sh CONFIG WORKDIR [overrides]}
workdir=${2:?usage: sbatch launch/slurm.sh CONFIG WORKDIR [overrides]}
shift 2
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
UKD_DISTRIBUTED=1 srun python -m ukd.main --config="$config" --workdir="$workdir" "$@"
