#!/usr/bin/env bash
# Seeded outputs of one tandem binary in three set-ups — `tandem up` (1 prefill + 1 decode),
# `tandem up --kv-transport tcp` and `tandem up --colocated` — written as one JSON file per
# set-up, so that two builds can be compared byte for byte (a refactor must not change them):
#
#   scripts/check/seeded_outputs.sh target/release/tandem /tmp/after
#   scripts/check/seeded_outputs.sh /tmp/old/tandem /tmp/before
#   diff -r /tmp/before /tmp/after && echo identical
#
# Each set-up answers the same 12 chat and completion requests (seeded sampling at
# temperature 0.8, greedy, logprobs), sent 4 at a time so they share batches.
set -euo pipefail
BIN=${1:?tandem binary}
OUT=${2:?output directory}
PORT=${PORT:-18431}
mkdir -p "$OUT"
run() {
  local name=$1; shift
  "$BIN" up --port "$PORT" "$@" > "$OUT/$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    kill -0 $pid 2>/dev/null || { cat "$OUT/$name.log"; exit 1; }
    sleep 0.2
  done
  python3 "$(dirname "$0")/seeded_requests.py" "http://127.0.0.1:$PORT" > "$OUT/$name.json"
  kill -TERM $pid; wait $pid || true
  rm -f "$OUT/$name.log"
}
run disaggregated
run disaggregated-tcp --kv-transport tcp
run colocated --colocated
sha256sum "$OUT"/*.json
