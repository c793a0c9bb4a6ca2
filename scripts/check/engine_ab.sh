#!/usr/bin/env bash
# Engine speed of two tandem builds in one run (`tandem model bench`, like llama-bench's pp/tg):
# ROUNDS rounds, the order of the two swapped every round (the first run of a pair measures
# faster on a shared machine), and the median of the per-round ratios B/A.
#
#   scripts/check/engine_ab.sh /tmp/old/tandem target/release/tandem 8
set -euo pipefail
A=${1:?build A}; B=${2:?build B}; ROUNDS=${3:-8}; shift 3 || true
ARGS=("--reps" "3" "$@")
pp=(); tg=()
for r in $(seq 1 "$ROUNDS"); do
  if (( r % 2 )); then first=$A; second=$B; else first=$B; second=$A; fi
  x=$("$first" model bench "${ARGS[@]}" 2>/dev/null | tail -1)
  y=$("$second" model bench "${ARGS[@]}" 2>/dev/null | tail -1)
  if (( r % 2 )); then a=$x; b=$y; else a=$y; b=$x; fi
  read -r rpp rtg < <(python3 -c "import json,sys; a,b=json.loads(sys.argv[1]),json.loads(sys.argv[2]); print(b['pp_tokens_per_s']/a['pp_tokens_per_s'], b['tg_tokens_per_s']/a['tg_tokens_per_s'])" "$a" "$b")
  echo "round $r: pp B/A $rpp, tg B/A $rtg"
  pp+=("$rpp"); tg+=("$rtg")
done
python3 -c "import statistics,sys; n=int(sys.argv[1]); v=list(map(float,sys.argv[2:])); print(f'median B/A over {n} rounds: pp {statistics.median(v[:n]):.3f}, tg {statistics.median(v[n:]):.3f}')" "$ROUNDS" "${pp[@]}" "${tg[@]}"
