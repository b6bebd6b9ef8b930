#!/usr/bin/env bash
# Train on a Cloud TPU pod slice, from creating it to deleting it.
#
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR CONFIG gs://BUCKET/runs/NAME [--config.key=value ...]
#   launch/tpu_pod.sh ukd-v4 us-central2-b v4-32 configs/mmwhs.py:pod gs://my-bucket/runs/mmwhs \
#       --config.data.root=/mnt/data/MMWHS
#
# Creates the TPU VM slice, copies this checkout to every worker and installs it with JAX for
# TPU, runs the same command on all workers (one process per host; jax finds its peers from
# the TPU metadata, UKD_DISTRIBUTED=1), streams every worker's output here and into
# logs/NAME.log, and deletes the slice when the run ends or this script is interrupted.
# The work dir must be on storage every host shares (a gs:// bucket); the dataset must be
# readable on every host at the same path (a bucket or a disk attached to every worker).
# Preemption: the run saves a checkpoint and stops; run this script again to resume.
set -euo pipefail
usage="usage: launch/tpu_pod.sh NAME ZONE ACCELERATOR CONFIG WORKDIR [overrides]"
name=${1:?$usage}; zone=${2:?$usage}; accelerator=${3:?$usage}; config=${4:?$usage}
workdir=${5:?$usage}
shift 5
runtime=${TPU_RUNTIME:-tpu-ubuntu2204-base}
tpu() { gcloud compute tpus tpu-vm "$@" --zone="$zone"; }

tpu create "$name" --accelerator-type="$accelerator" --version="$runtime"
trap 'tpu delete "$name" --quiet' EXIT
tpu scp --recurse --worker=all "$(cd "$(dirname "$0")/.." && pwd)" "$name":~/ukd
tpu ssh "$name" --worker=all --command="cd ~/ukd && pip install -q -e . 'jax[tpu]'"
mkdir -p logs
overrides=$(printf ' %q' "$@")
tpu ssh "$name" --worker=all --command="cd ~/ukd && UKD_DISTRIBUTED=1 \
  python -m ukd.main --config=$config --workdir=$workdir$overrides" 2>&1 | tee "logs/$name.log"
