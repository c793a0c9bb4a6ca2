#!/usr/bin/env bash
# The pooled KV store and KV-aware routing against routing by load, one run, one machine:
# `tandem up --prefill 1 --decode 2` with small KV pools (KV_MIB per decode worker) in three
# set-ups —
#   (a) load:      --router-mode load, no store
#   (b) kv:        --router-mode kv, no store
#   (c) kv+store:  --router-mode kv --kv-store (RAM STORE_MIB, disk tier in a temporary dir)
# — under `tandem bench --dataset-name multi-turn`: CONVS conversations of TURNS turns, each
# opening with one of GROUPS shared system prompts of SYS tokens then a context of its own of
# CONV_PREFIX tokens (0: none; a document the conversation is about), user turns of USER tokens,
# answers of OUT_TOKENS, think time THINK s, turns offered at RATE/s. The working set (every
# conversation's history) is several times what the two decode workers' pools hold. Each
# set-up's summary has median TTFT, goodput at TTFT <= SLO_TTFT ms / TPOT <= SLO_TPOT ms, and
# the prefix hit rate against an unbounded cache on the same trace.
#
# usage: scripts/bench/kv_store.sh      (ROUNDS=1; results in bench-results/kv-store/)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-1}
KV_MIB=${KV_MIB:-64} STORE_MIB=${STORE_MIB:-256}
CONVS=${CONVS:-24} TURNS=${TURNS:-4} GROUPS=${GROUPS:-4} SYS=${SYS:-512} CONV_PREFIX=${CONV_PREFIX:-0}
USER=${USER_TOKENS:-96}
OUT_TOKENS=${OUT_TOKENS:-32} THINK=${THINK:-2} RATE=${RATE:-0.6}
SLO_TTFT=${SLO_TTFT:-1000} SLO_TPOT=${SLO_TPOT:-100}
OUT=bench-results/kv-store
PORT=18197
mkdir -p $OUT
cargo build --release -q -p tandem
BIN=target/release/tandem
MODEL=$($BIN model fetch 2>/dev/null)
DISK=$(mktemp -d /tmp/tandem-kv-disk.XXXXXX)
SERVER=
stop() { [ -n "$SERVER" ] && { kill -TERM "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null; SERVER=; }; return 0; }
trap 'stop; rm -rf "$DISK"' EXIT
start() { # extra flags...
  "$BIN" up --model "$MODEL" --port $PORT --prefill 1 --decode 2 --kv-cache-mib "$KV_MIB" \
    --served-model-name SmolLM2-135M-Instruct --slo-ttft-ms "$SLO_TTFT" --slo-tpot-ms "$SLO_TPOT" "$@" \
    > "$OUT/server-$NAME.log" 2>&1 & SERVER=$!
  for _ in $(seq 1 600); do
    curl -s "http://127.0.0.1:$PORT/health" 2>/dev/null | python3 -c "
import json, sys
w = json.load(sys.stdin).get('workers') or []
sys.exit(0 if len(w) == 3 and all(x['healthy'] for x in w) else 1)" 2>/dev/null && return 0
    sleep 0.5
  done
  echo "the server did not come up" >&2; return 1
}
for round in $(seq 1 "$ROUNDS"); do
  for NAME in load kv kv-store; do
    rm -rf "${DISK:?}"/*
    case $NAME in
      load) start --router-mode load ;;
      kv) start --router-mode kv ;;
      kv-store) start --router-mode kv --kv-store --kv-store-ram-mib "$STORE_MIB" --kv-store-disk-dir "$DISK" ;;
    esac
    $BIN bench --base-url "http://127.0.0.1:$PORT" --model SmolLM2-135M-Instruct --tokenizer "$MODEL" \
      --quiet --endpoint /v1/completions --dataset-name multi-turn --num-prompts $((CONVS * TURNS)) \
      --num-turns "$TURNS" --num-prefix-groups "$GROUPS" --shared-prefix-len "$SYS" \
      --conversation-prefix-len "$CONV_PREFIX" \
      --random-input-len "$USER" --random-output-len "$OUT_TOKENS" --think-time "$THINK" \
      --request-rate "$RATE" --seed "$round" --goodput "ttft:$SLO_TTFT tpot:$SLO_TPOT" \
      --label "$NAME" --result-dir "$OUT/$NAME-r$round" >/dev/null
    stop
  done
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, sys, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
def get(s, r):
    v = json.load(open(f"{out}/{s}-r{r}/summary.json"))
    return v[0] if isinstance(v, list) else v
print("| set-up | failed | median TTFT ms | p90 TTFT ms | median TPOT ms | goodput req/s | attainment | prefix hit rate | ideal | hit / ideal | TTFT (a) / this |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for s in ("load", "kv", "kv-store"):
    rows = [get(s, r) for r in range(1, rounds + 1)]
    base = [get("load", r) for r in range(1, rounds + 1)]
    med = lambda k: statistics.median(x.get(k) or 0 for x in rows)
    ratio = statistics.median(b["median_ttft_ms"] / x["median_ttft_ms"] for x, b in zip(rows, base))
    hit, ideal = med("prefix_hit_rate"), med("ideal_prefix_hit_rate")
    print(f"| {s} | {sum(x.get('failed', 0) for x in rows)} | {med('median_ttft_ms'):.0f} | {med('p90_ttft_ms'):.0f} | "
          f"{med('median_tpot_ms'):.1f} | {med('request_goodput'):.3f} | {med('slo_attainment'):.2f} | {hit:.3f} | "
          f"{ideal:.3f} | {hit / max(ideal, 1e-9):.2f} | {ratio:.2f}x |")
PY
