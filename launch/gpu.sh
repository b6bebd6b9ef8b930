#!/usr/bin/env bash
# Train on every GPU of one machine (data parallel over all visible devices).
#   launch/gpu.sh configs/mmwhs.py runs/mmwhs --config.data.root=/data/MMWHS
# Re-running the same command resumes from the work dir's latest checkpoint.
set -euo pipefail
config=${1:?usage: launch/gpu.sh CONFIG WORKDIR [--config.key=value ...]}
workdir=${2:?usage: launch/gpu.sh CONFIG WORKDIR [--config.key=value ...]}
shift 2
# Let XLA take GPU memory as it needs it rather than 75% up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
exec python -m ukd.main --config="$config" --workdir="$workdir" "$@"
