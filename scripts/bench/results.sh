#!/usr/bin/env bash
# Tandem vs llama.cpp's llama-server on this machine, with `tandem bench`, for bench/RESULTS.md:
#   1. 16 concurrent chat streams;  2. the mixed workload's goodput curve;  3. the shared-prefix workload;
#   4. streams32: 32 concurrent streams, ~250-token prompts, 128 output tokens (throughput);
#   5. stream1: one stream at a time, same shape (TPOT).
# Each server runs alone on all cores with the same GGUF; results land in bench-results/<scenario>-<server>/.
#
# usage: scripts/bench/results.sh [SCENARIO...]   (chat16 mixed shared-prefix streams32 stream1; default: all)
# needs: llama.cpp built by ../shared/tools/build-llama-cpp.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
LLAMA_BIN=${LLAMA_BIN:-$(bash ../shared/tools/build-llama-cpp.sh | tail -n 1)}
cargo build --release -q
T=./target/release/tandem
MODEL=$($T model fetch 2>/dev/null)
THREADS=$(nproc)
PORT=18123
OUT=bench-results
SCENARIOS=${*:-chat16 mixed shared-prefix streams32 stream1}
TANDEM_ARGS=${TANDEM_ARGS:-}

wait_up() { for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null && return 0; sleep 0.5; done; echo "server did not come up" >&2; return 1; }
# shellcheck disable=SC2086
start_tandem() { $T up --colocated --model "$MODEL" --port $PORT --threads "$THREADS" $TANDEM_ARGS >/dev/null 2>&1 & SERVER=$!; wait_up; }
# llama-server: N parallel slots, each with CTX tokens of context.
start_llama() { "$LLAMA_BIN/llama-server" -m "$MODEL" --port $PORT -t "$THREADS" -np "$1" -c $(( $1 * $2 )) --log-disable >/dev/null 2>&1 & SERVER=$!; wait_up; }
stop() { kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; }
trap stop EXIT
bench() { $T bench --base-url "http://127.0.0.1:$PORT" --model SmolLM2-135M-Instruct --tokenizer "$MODEL" --quiet "$@"; }

for s in $SCENARIOS; do
  case $s in
    chat16)
      args=(--endpoint /v1/chat/completions --dataset-name random --random-input-len 128 --random-output-len 64
            --num-prompts 48 --max-concurrency 16 --request-rate inf --num-warmups 2 --goodput ttft:2000 tpot:200)
      start_tandem; bench "${args[@]}" --label tandem --result-dir $OUT/chat16-tandem; stop
      start_llama 16 1024; bench "${args[@]}" --label llama-server --result-dir $OUT/chat16-llama-server; stop ;;
    mixed)
      args=(--endpoint /v1/completions --dataset-name mixed --mixed-long-len 1000 --mixed-long-fraction 0.25
            --random-output-len 64 --num-prompts 16 --request-rate 0.25,0.5,1 --goodput ttft:2000 tpot:200)
      start_tandem; bench "${args[@]}" --label tandem --result-dir $OUT/mixed-tandem; stop
      start_llama 8 2048; bench "${args[@]}" --label llama-server --result-dir $OUT/mixed-llama-server; stop
      $T bench compare $OUT/mixed-tandem $OUT/mixed-llama-server --out $OUT/mixed-compare ;;
    shared-prefix)
      args=(--endpoint /v1/chat/completions --dataset-name shared-prefix --num-prefix-groups 2 --shared-prefix-len 600
            --random-input-len 48 --random-output-len 32 --num-prompts 24 --max-concurrency 4 --request-rate inf
            --goodput ttft:2000 tpot:200)
      start_tandem; bench "${args[@]}" --label tandem --result-dir $OUT/shared-prefix-tandem; stop
      start_llama 4 2048; bench "${args[@]}" --label llama-server --result-dir $OUT/shared-prefix-llama-server; stop ;;
    streams32)
      args=(--endpoint /v1/completions --dataset-name random --random-input-len 250 --random-output-len 128
            --num-prompts 64 --max-concurrency 32 --request-rate inf --num-warmups 2)
      start_tandem; bench "${args[@]}" --label tandem --result-dir $OUT/streams32-tandem; stop
      start_llama 32 512; bench "${args[@]}" --label llama-server --result-dir $OUT/streams32-llama-server; stop ;;
    stream1)
      args=(--endpoint /v1/completions --dataset-name random --random-input-len 250 --random-output-len 128
            --num-prompts 8 --max-concurrency 1 --request-rate inf --num-warmups 1)
      start_tandem; bench "${args[@]}" --label tandem --result-dir $OUT/stream1-tandem; stop
      start_llama 1 1024; bench "${args[@]}" --label llama-server --result-dir $OUT/stream1-llama-server; stop ;;
    *) echo "unknown scenario $s" >&2; exit 2 ;;
  esac
done
python3 - "$OUT" $SCENARIOS <<'PY'
import json, sys, os
out = sys.argv[1]
keys = ["request_rate", "completed", "failed", "request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms",
        "median_tpot_ms", "p99_tpot_ms", "slo_attainment", "request_goodput"]
print("| scenario | server | " + " | ".join(keys) + " |")
print("|" + "---|" * (len(keys) + 2))
for s in sys.argv[2:]:
    for srv in ["tandem", "llama-server"]:
        p = os.path.join(out, f"{s}-{srv}", "summary.json")
        if not os.path.exists(p):
            continue
        v = json.load(open(p))
        for row in (v if isinstance(v, list) else [v]):
            cells = [f"{row.get(k):.2f}" if isinstance(row.get(k), float) else str(row.get(k)) for k in keys]
            print(f"| {s} | {srv} | " + " | ".join(cells) + " |")
PY
