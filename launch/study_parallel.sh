#!/usr/bin/env bash
# A study with arms (configs/study.py) as one process per (arm, seed), all at once on one
# machine, sharing its accelerator; then one last call writes the reports.
#
#   launch/study_parallel.sh STUDY_CONFIG WORKDIR [--only=ukd,single ...]
#   launch/study_parallel.sh configs/study.py runs/study
#
# The study's networks are small: one alone leaves a GPU mostly idle, waiting on the host
# (input, metrics), so several processes in parallel finish the study several times sooner.
# Each process gets an equal share of the GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION) and
# all share one compilation cache, so a network compiled by one run is reused by the others.
# Processes of one arm generate its phantoms concurrently; the first to finish wins and the
# others check they hold the same settings (`ukd.data.synthetic.ensure`).  Logs go to
# WORKDIR/logs/<arm>-seed<k>.log.  Re-running the same command resumes: finished runs are
# skipped, interrupted ones continue from their checkpoints.
set -euo pipefail
usage="usage: launch/study_parallel.sh STUDY_CONFIG WORKDIR [study flags]"
config=${1:?$usage}; workdir=${2:?$usage}
shift 2
# "<arm> <seed>" per line, from the config's arms and seeds.
jobs=$(python - "$config" <<'EOF'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("study_config", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
study = module.get_config()
if not study.arms:
  sys.exit(f"{sys.argv[1]}: this study config has no arms; run python -m ukd.study instead")
for arm in study.arms:
  for seed in study.seeds:
    print(arm, seed)
EOF
)
count=$(wc -l <<<"$jobs")
mkdir -p "$workdir/logs"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-$(python -c "print(round(0.9 / $count, 3))")}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$workdir/jax_cache}
pids=()
while read -r arm seed; do
  python -m ukd.study --config="$config" --workdir="$workdir" --arms="$arm" --seeds="$seed" "$@" \
    >"$workdir/logs/$arm-seed$seed.log" 2>&1 &
  pids+=($!)
done <<<"$jobs"
failed=0
for pid in "${pids[@]}"; do
  wait "$pid" || failed=$((failed + 1))
done
echo "$count processes, $failed failed (logs: $workdir/logs)"
# Every run finished is skipped here: this call only writes the reports.
python -m ukd.study --config="$config" --workdir="$workdir" "$@"
exit $((failed > 0))
