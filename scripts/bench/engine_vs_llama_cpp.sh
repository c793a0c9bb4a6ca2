#!/usr/bin/env bash
# Single-stream prefill (pp512) and decode (tg128) speed of Tandem's engine and of llama.cpp's
# llama-bench on the same GGUF and thread count, measured back to back in one run, reported as
# ratios; then the peak RSS of `tandem up` serving a few requests.
#
# usage: scripts/bench/engine_vs_llama_cpp.sh [THREADS]     (default: all cores)
# needs: llama.cpp built by ../shared/tools/build-llama-cpp.sh (prints its bin dir), python3.
set -euo pipefail
cd "$(dirname "$0")/../.."
THREADS=${1:-$(nproc)}
LLAMA_BIN=${LLAMA_BIN:-$(bash ../shared/tools/build-llama-cpp.sh | tail -n 1)}
cargo build --release -q
MODEL=$(./target/release/tandem model fetch 2>/dev/null)
echo "model: $MODEL, threads: $THREADS, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"

f32_json=$(./target/release/tandem model bench --model "$MODEL" --threads "$THREADS" --reps 3 --precision f32 | tail -n 1)
int8_json=$(./target/release/tandem model bench --model "$MODEL" --threads "$THREADS" --reps 3 --precision int8 | tail -n 1)
llama_json=$("$LLAMA_BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p 512 -n 128 -r 3 -o json 2>/dev/null)

python3 - "$f32_json" "$int8_json" "$llama_json" <<'PY'
import json, sys
f = json.loads(sys.argv[1]); i = json.loads(sys.argv[2]); l = json.loads(sys.argv[3])
lpp = next(r["avg_ts"] for r in l if r["n_prompt"] > 0)
ltg = next(r["avg_ts"] for r in l if r["n_gen"] > 0)
print("| test  | tandem f32 t/s | tandem int8 t/s | llama.cpp Q4_1 t/s | f32 / llama.cpp | int8 / llama.cpp |")
print("|---|---|---|---|---|---|")
for key, name, ref in [("pp", "pp512", lpp), ("tg", "tg128", ltg)]:
    a, b = f[f"{key}_tokens_per_s"], i[f"{key}_tokens_per_s"]
    print(f"| {name} | {a:.1f} | {b:.1f} | {ref:.1f} | {a/ref:.2f}x | {b/ref:.2f}x |")
PY

# Peak RSS of `tandem up` after a few chat requests.
PORT=${PORT:-8097}
./target/release/tandem up --model "$MODEL" --port "$PORT" --threads "$THREADS" 2>/dev/null &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.2; done
for i in 1 2 3 4; do
  curl -sf "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' \
    -d "{\"model\":\"SmolLM2-135M-Instruct\",\"messages\":[{\"role\":\"user\",\"content\":\"Tell me a story number $i.\"}],\"max_tokens\":64}" >/dev/null
done
echo "tandem up peak RSS: $(awk '/VmHWM/ {printf "%.0f MiB", $2/1024}' /proc/$PID/status)"
