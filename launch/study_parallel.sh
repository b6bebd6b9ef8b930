#!/usr/bin/env bash
# A study with arms (configs/study.py) as one process per (arm, seed, variant), PARALLEL of
# them at a time on one machine sharing its accelerator; then one last call writes the reports.
#
#   [PARALLEL=16] launch/study_parallel.sh STUDY_CONFIG WORKDIR [--config.base.key=value ...]
#   launch/study_parallel.sh configs/study.py runs/study
#
# The study's networks are small: one alone leaves a GPU mostly idle, waiting on the host
# (input, metrics, compilation), so many processes at once finish the study many times sooner.
# PARALLEL defaults to the number of CPU cores.  Each process gets an equal share of the GPU's
# memory (XLA_PYTHON_CLIENT_MEM_FRACTION) and all share one compilation cache, so a network
# compiled by one run is reused by the others.  Processes of one arm may generate its phantoms
# and cache entries at the same time; the first to finish wins and the others check and use
# it (`ukd.files.new_directory`).  Logs: WORKDIR/logs/<arm>-<variant>-seed<k>.log.
# Re-running the same command resumes: finished runs are skipped, interrupted ones continue
# from their checkpoints.
set -euo pipefail
usage="usage: launch/study_parallel.sh STUDY_CONFIG WORKDIR [study flags]"
config=${1:?$usage}; workdir=${2:?$usage}
shift 2
parallel=${PARALLEL:-$(nproc)}
# "<arm> <seed> <variant>" per line, from the config's arms, seeds and variants.
python - "$config" >"$workdir.jobs" <<'EOF2'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("study_config", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
study = module.get_config()
if not study.arms:
  sys.exit(f"{sys.argv[1]}: this study config has no arms; run python -m ukd.study.runner instead")
for arm in study.arms:
  for seed in study.seeds:
    for variant in study.arms[arm].variants:
      print(arm, seed, variant)
EOF2
mkdir -p "$workdir/logs"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-$(python -c "print(round(0.9 / $parallel, 3))")}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$workdir/jax_cache}
export config workdir flags="$*"  # the study flags: no spaces inside one
failed=0
# shellcheck disable=SC2016,SC2086
xargs -P "$parallel" -L 1 bash -c '
  log="$workdir/logs/$1-$3-seed$2.log"
  python -m ukd.study.runner --config="$config" --workdir="$workdir" --arms="$1" --seeds="$2" \
    --only="$3" $flags >"$log" 2>&1 || { echo "failed: $1 $3 seed $2 ($log)"; exit 1; }
' _ <"$workdir.jobs" || failed=1
echo "$(wc -l <"$workdir.jobs") runs, $parallel at a time (logs: $workdir/logs)"
# Every run finished is skipped here: this call only writes the reports.
python -m ukd.study.runner --config="$config" --workdir="$workdir" "$@"
exit $failed
