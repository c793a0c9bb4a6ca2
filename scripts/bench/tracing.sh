#!/usr/bin/env bash
# What tracing costs: `tandem up` (1 prefill + 1 decode worker) built from BASE_REV, before any
# span existed, against this tree with tracing off (the default) and on (--otlp-endpoint; spans
# exported to a receiver that is not there: the SDK builds, batches and tries to send every
# span, and drops them). Same machine, same workload, rounds alternating between the three.
#
#   workload: /v1/completions, random IN-token prompts (64), OUT tokens out (256), PROMPTS
#   requests (16) at concurrency CONC (4), every prompt through the prefill worker
#   (--disagg-min-tokens 16): decode-bound, where a per-token cost would show. The base binary
#   is kept in bench-results/tracing/ and reused (BASE_BIN=… to give one).
#
# usage: BASE_REV=2b199ea scripts/bench/tracing.sh      (ROUNDS=5)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
BASE_REV=${BASE_REV:-2b199ea}
ROUNDS=${ROUNDS:-5}
IN=${IN:-64} OUT_TOKENS=${OUT_TOKENS:-256} CONC=${CONC:-4} PROMPTS=${PROMPTS:-16}
OUT=bench-results/tracing
PORT=18195
mkdir -p $OUT
BASE_BIN=${BASE_BIN:-$OUT/tandem-base-$BASE_REV}
if [ ! -x "$BASE_BIN" ]; then
  # The base, built in a worktree (sharing the target directory: only Tandem's crates rebuild).
  WT=$(mktemp -d /tmp/tandem-base.XXXXXX)
  git worktree add -q --detach "$WT" "$BASE_REV"
  (cd "$WT" && CARGO_TARGET_DIR="$ROOT/target" cargo build --release -q -p tandem)
  cp target/release/tandem "$BASE_BIN"
  git worktree remove --force "$WT"
fi
rm -rf $OUT/*-r[0-9]*
cargo build --release -q -p tandem
cp target/release/tandem $OUT/tandem-now
MODEL=$($OUT/tandem-now model fetch 2>/dev/null)
DEAD=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
SERVER=
stop() { [ -n "$SERVER" ] && { kill -TERM "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null; SERVER=; }; return 0; }
trap stop EXIT
start() { # binary, extra flags...
  local bin=$1; shift
  "$bin" up --model "$MODEL" --port $PORT --disagg-min-tokens 16 --served-model-name SmolLM2-135M-Instruct "$@" \
    > "$OUT/server.log" 2>&1 & SERVER=$!
  for _ in $(seq 1 600); do
    curl -s "http://127.0.0.1:$PORT/health" 2>/dev/null | python3 -c "
import json, sys
w = json.load(sys.stdin).get('workers') or []
sys.exit(0 if len(w) == 2 and all(x['healthy'] for x in w) else 1)" 2>/dev/null && return 0
    sleep 0.5
  done
  echo "the server did not come up" >&2; return 1
}
for round in $(seq 1 "$ROUNDS"); do
  for server in base off on; do
    case $server in
      base) start "$BASE_BIN" ;;
      off) start $OUT/tandem-now ;;
      on) start $OUT/tandem-now --otlp-endpoint "http://127.0.0.1:$DEAD" ;;
    esac
    $OUT/tandem-now bench --base-url "http://127.0.0.1:$PORT" --model SmolLM2-135M-Instruct --tokenizer "$MODEL" \
      --quiet --endpoint /v1/completions --dataset-name random --random-input-len $IN --random-output-len $OUT_TOKENS \
      --num-prompts $PROMPTS --max-concurrency $CONC --request-rate inf --num-warmups 2 --seed "$round" \
      --label "$server" --result-dir "$OUT/$server-r$round" >/dev/null
    stop
  done
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, sys, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
def get(s, r):
    v = json.load(open(f"{out}/{s}-r{r}/summary.json"))
    return v[0] if isinstance(v, list) else v
print("| server | failed | median TTFT ms | median TPOT ms | TTFT / base | TPOT / base | rounds (TPOT / base) |")
print("|---|---|---|---|---|---|---|")
for s in ("base", "off", "on"):
    rows = [get(s, r) for r in range(1, rounds + 1)]
    base = [get("base", r) for r in range(1, rounds + 1)]
    tt = [x["median_ttft_ms"] / b["median_ttft_ms"] for x, b in zip(rows, base)]
    tp = [x["median_tpot_ms"] / b["median_tpot_ms"] for x, b in zip(rows, base)]
    print(f"| {s} | {sum(x.get('failed', 0) for x in rows)} | {statistics.median(x['median_ttft_ms'] for x in rows):.1f} | "
          f"{statistics.median(x['median_tpot_ms'] for x in rows):.2f} | {statistics.median(tt):.3f}x | {statistics.median(tp):.3f}x | "
          + ", ".join(f"{v:.3f}" for v in tp) + " |")
PY
