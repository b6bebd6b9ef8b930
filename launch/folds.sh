#!/usr/bin/env bash
# K-fold cross-validation of a config: folds 0..K-1 trained one after another, each into
# WORKDIR/fold_<i>, then the line that predicts with all of them as an ensemble.
#
#   launch/folds.sh K CONFIG WORKDIR [--config.key=value ...]
#   launch/folds.sh 5 configs/mmwhs.py runs/mmwhs_cv --config.data.root=/data/MMWHS
#
# Every fold is tested on the same cases, the test split a single run has; the other cases
# are dealt by patient into K folds (config.data.folds=K), fold i validating
# (config.data.fold=i) and the others training. Each fold chooses its own post-processing on
# its validation fold. Re-running the same command resumes an unfinished fold; a finished one
# is only evaluated again. The ensemble averages the folds' probabilities:
#
#   python -m ukd.main --mode=predict --workdir=runs/mmwhs_cv/fold_0,runs/mmwhs_cv/fold_1,... \
#       --input=scans/ --output=preds/ --modality=ct
#
# An ensemble applies no fold's post-processing unless --postprocess=<a postprocessing.json>.
set -euo pipefail
usage="usage: launch/folds.sh K CONFIG WORKDIR [overrides]"
folds=${1:?$usage}; config=${2:?$usage}; workdir=${3:?$usage}
shift 3
if [[ ! $folds =~ ^[1-9][0-9]*$ ]]; then
  echo "$usage (K: the number of folds, got '$folds')" >&2
  exit 2
fi
members=()
for ((fold = 0; fold < folds; fold++)); do
  python -m ukd.main --config="$config" --workdir="$workdir/fold_$fold" \
    --config.data.folds="$folds" --config.data.fold="$fold" "$@"
  members+=("$workdir/fold_$fold")
done
ensemble=$(IFS=,; echo "${members[*]}")
echo "the $folds folds predict as an ensemble with:"
echo "  python -m ukd.main --mode=predict --workdir=$ensemble --input=SCANS --output=PREDICTIONS --modality=ct"
