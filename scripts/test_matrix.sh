#!/usr/bin/env bash
# Run the test suite under several seeds and thread counts, to show no verdict hangs on one random stream,
# one set of tiny weights or one kernel's rounding:
#   bash scripts/test_matrix.sh [SEEDS] [THREADS] [PYTEST ARGS...]
#   bash scripts/test_matrix.sh "0 1 2" "1 2" -q
# Each cell sets LIGHTNING_PPO_TEST_SEED (every test's draws, the CLI runs' seed and the tiny assets'
# build seed) and OMP_NUM_THREADS; a line per cell says its counts and time, the logs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
SEEDS=${1:-"0 1 2"}
THREADS=${2:-"1 2"}
shift $(( $# < 2 ? $# : 2 ))
OUT=${OUT:-test-matrix}
mkdir -p "$OUT"
status=0
for seed in $SEEDS; do
  for threads in $THREADS; do
    log="$OUT/seed${seed}-threads${threads}.log"
    start=$(date +%s)
    LIGHTNING_PPO_TEST_SEED=$seed OMP_NUM_THREADS=$threads python -m pytest -p no:cacheprovider "$@" >"$log" 2>&1
    code=$?
    [ $code -ne 0 ] && status=1
    echo "seed $seed, OMP_NUM_THREADS=$threads: exit $code, $(tail -n 1 "$log") ($(( $(date +%s) - start )) s)"
  done
done
exit $status
