#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command on every host, one process per host.
#   launch/tpu_pod.sh TPU_NAME ZONE configs/mmwhs.py gs://bucket/runs/mmwhs \
#       --config.data.root=/mnt/data/MMWHS
# The work dir must be shared by all hosts (a GCS bucket or a shared file system);
# the dataset must be readable on every host at the same path.  jax.distributed finds
# its peers from the TPU metadata (UKD_DISTRIBUTED=1 asks ukd.main to call it); each host reads its own slice of every batch.
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU ZONE CONFIG WORKDIR [overrides]}
zone=${2:?}; config=${3:?}; workdir=${4:?}
shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd ukd && UKD_DISTRIBUTED=1 python -m ukd.main --config=$config --workdir=$workdir $*"
