#!/usr/bin/env bash
# The cost of containers and of TCP: the compose cluster (deploy/compose.yaml — 2 prefill and
# 2 decode containers, one compute thread each, KV over TCP between containers) against
# `tandem up` on the host with the same topology and threads, KV over shared memory (its
# default) and over TCP. Same machine, same workload, rounds alternating between the three.
#
#   workload: /v1/completions, random 256-token prompts, 64 tokens out, 24 requests, at
#   concurrency 1 (latency alone) and 8 (under load), all prompts disaggregated
#   (--disagg-min-tokens 16 everywhere).
#
# usage: scripts/bench/compose.sh     (ROUNDS=2; images built here first)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-2}
cargo build --release -q -p tandem
T=./target/release/tandem
MODEL=$($T model fetch 2>/dev/null)
OUT=bench-results/compose
PORT=18190
rm -rf $OUT && mkdir -p $OUT
bash deploy/build-image.sh --model default tandem:bench >/dev/null
bash deploy/etcd/build-image.sh tandem-etcd:bench >/dev/null
SECRET=$(mktemp -u /tmp/tandem-bench-secret.XXXXXX)
bash deploy/compose-secret.sh "$SECRET" >/dev/null
export TANDEM_IMAGE=tandem:bench ETCD_IMAGE=tandem-etcd:bench TANDEM_SECRET_FILE=$SECRET TANDEM_PORT=$PORT TANDEM_DISAGG_MIN_TOKENS=16
if docker compose version >/dev/null 2>&1; then DC=(docker compose); else DC=(docker-compose); fi
DC+=(-f deploy/compose.yaml -p tandem-bench)
SERVER=
stop() {
  [ -n "$SERVER" ] && { kill -TERM "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null; SERVER=; }
  "${DC[@]}" down -t 10 >/dev/null 2>&1 || true
}
trap 'stop; rm -f "$SECRET"' EXIT
# Ready: the API answers and lists 2 prefill and 2 decode workers, all healthy.
wait_up() {
  for _ in $(seq 1 600); do
    curl -s "http://127.0.0.1:$PORT/health" 2>/dev/null | python3 -c "
import json, sys
w = json.load(sys.stdin).get('workers') or []
sys.exit(0 if len(w) == 4 and all(x['healthy'] for x in w) else 1)" 2>/dev/null && return 0
    sleep 0.5
  done
  echo "the server did not come up" >&2; return 1
}
start() {
  case $1 in
    compose) "${DC[@]}" up -d >/dev/null 2>&1 ;;
    up-shm) $T up --model "$MODEL" --port $PORT --prefill 2 --decode 2 --threads 1 --disagg-min-tokens 16 \
              --served-model-name SmolLM2-135M-Instruct >/dev/null 2>&1 & SERVER=$! ;;
    up-tcp) $T up --model "$MODEL" --port $PORT --prefill 2 --decode 2 --threads 1 --disagg-min-tokens 16 \
              --kv-transport tcp --served-model-name SmolLM2-135M-Instruct >/dev/null 2>&1 & SERVER=$! ;;
  esac
  wait_up
}
for round in $(seq 1 "$ROUNDS"); do
  for server in up-shm up-tcp compose; do
    start $server
    for c in 1 8; do
      $T bench --base-url "http://127.0.0.1:$PORT" --model SmolLM2-135M-Instruct --tokenizer "$MODEL" --quiet \
        --endpoint /v1/completions --dataset-name random --random-input-len 256 --random-output-len 64 \
        --num-prompts 24 --max-concurrency $c --request-rate inf --num-warmups 2 --seed $round \
        --label "$server-c$c" --result-dir "$OUT/$server-c$c-r$round" >/dev/null
    done
    stop
  done
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, sys, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
def get(server, c, r):
    v = json.load(open(f"{out}/{server}-c{c}-r{r}/summary.json"))
    return v[0] if isinstance(v, list) else v
keys = [("median_ttft_ms", "TTFT p50 ms"), ("p99_ttft_ms", "TTFT p99 ms"), ("median_tpot_ms", "TPOT p50 ms"),
        ("output_throughput", "out tok/s")]
print("| concurrency | server | failed | " + " | ".join(h for _, h in keys) + " | TTFT p50 / up-shm | TPOT p50 / up-shm | tok/s / up-shm |")
print("|---|---|---|" + "---|" * (len(keys) + 3))
for c in (1, 8):
    for server in ("up-shm", "up-tcp", "compose"):
        rows = [get(server, c, r) for r in range(1, rounds + 1)]
        base = [get("up-shm", c, r) for r in range(1, rounds + 1)]
        cells = [f"{statistics.median(x[k] for x in rows):.{2 if 'tpot' in k else 1}f}" for k, _ in keys]
        # Ratios per round (same round: the host's load is shared), then their median.
        ratio = lambda k: statistics.median(x[k] / b[k] for x, b in zip(rows, base))
        failed = sum(x.get("failed", 0) for x in rows)
        print(f"| {c} | {server} | {failed} | " + " | ".join(cells)
              + f" | {ratio('median_ttft_ms'):.3f}x | {ratio('median_tpot_ms'):.3f}x | {ratio('output_throughput'):.3f}x |")
PY
