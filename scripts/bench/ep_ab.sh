#!/usr/bin/env bash
# Two builds of `tandem` against each other on expert parallelism's batch-64 decode and
# 2,000-token prefill: `tandem model ep-bench` of each, taken in turn ROUNDS times on the same
# random MoE as scripts/bench/moe_ep.sh, printing each run's (a) one process and (b) even
# placement lines — for a change to the engine's or the expert worker's batched speed
# (scripts/check/engine_ab.sh compares single-stream speed). Ratios across runs: take several
# rounds on this noisy machine.
# Usage: scripts/bench/ep_ab.sh OLD_TANDEM NEW_TANDEM [rounds] [steps]
set -euo pipefail
cd "$(dirname "$0")/../.."
OLD=${1:?old tandem binary}
NEW=${2:?new tandem binary}
ROUNDS=${3:-2}
STEPS=${4:-16}
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
"$NEW" model make-moe --out "$DIR/moe.gguf" --num-experts 8 --top-k 2 --skew 0.97 \
  --falloff 0.5 --seed 1 > /dev/null 2>&1
for r in $(seq "$ROUNDS"); do
  # The order swapped every round (as scripts/check/engine_ab.sh: the first of a pair can
  # measure faster on a shared machine).
  if (( r % 2 )); then pair=("$OLD" "$NEW"); else pair=("$NEW" "$OLD"); fi
  for T in "${pair[@]}"; do
    echo "== $T"
    "$T" model ep-bench --model "$DIR/moe.gguf" --experts 2 --expert-threads 1 --batch 64 \
      --steps "$STEPS" --prompt 2000 2> /dev/null | grep -E '^\| \((a|b)\) (one|even, 2)'
  done
done
