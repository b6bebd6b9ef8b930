#!/usr/bin/env bash
# Train on N GPUs of one machine (data parallel: one process, the batch sharded over them).
#
#   launch/gpu.sh N CONFIG WORKDIR [--config.key=value ...]
#   launch/gpu.sh 4 configs/mmwhs.py runs/mmwhs --config.data.root=/data/MMWHS
#
# N picks the first N GPUs (CUDA_VISIBLE_DEVICES set beforehand is respected instead).
# config.batch_size is global and must divide by N. Re-running the same command resumes.
set -euo pipefail
usage="usage: launch/gpu.sh N CONFIG WORKDIR [overrides]"
gpus=${1:?$usage}; config=${2:?$usage}; workdir=${3:?$usage}
shift 3
if [[ -z "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  export CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((gpus - 1)))
fi
# Let XLA take GPU memory as it needs it rather than 75% up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
exec python -m ukd.main --config="$config" --workdir="$workdir" "$@"
