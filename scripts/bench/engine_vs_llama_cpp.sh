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

llama() { "$LLAMA_BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p 512 -n 128 -r 3 -o json 2>/dev/null; }
# llama-bench runs before and after Tandem; the better of its two runs is the reference (the
# conservative choice on a shared machine whose speed drifts).
llama_before=$(llama)
bench() { ./target/release/tandem model bench --model "$MODEL" --threads "$THREADS" --reps 3 --precision "$1" | tail -n 1; }
w4a8_json=$(bench w4a8)
int8_json=$(bench int8)
f32_json=$(bench f32)
llama_after=$(llama)

python3 - "$w4a8_json" "$int8_json" "$f32_json" "$llama_before" "$llama_after" <<'PY'
import json, sys
runs = [("w4a8 (default)", json.loads(sys.argv[1])), ("int8", json.loads(sys.argv[2])), ("f32", json.loads(sys.argv[3]))]
ls = [json.loads(a) for a in sys.argv[4:6]]
pick = lambda key: [next(r["avg_ts"] for r in l if r[key] > 0) for l in ls]
pps, tgs = pick("n_prompt"), pick("n_gen")
print(f"llama-bench before/after: pp512 {pps[0]:.1f} / {pps[1]:.1f}, tg128 {tgs[0]:.1f} / {tgs[1]:.1f} (the better is the reference)")
lpp, ltg = max(pps), max(tgs)
print("| test | llama.cpp Q4_1 t/s | " + " | ".join(f"tandem {n} t/s (ratio)" for n, _ in runs) + " |")
print("|---|---|" + "---|" * len(runs))
for key, name, ref in [("pp", "pp512", lpp), ("tg", "tg128", ltg)]:
    cells = [f"{r[key + '_tokens_per_s']:.1f} ({r[key + '_tokens_per_s'] / ref:.2f}x)" for _, r in runs]
    print(f"| {name} | {ref:.1f} | " + " | ".join(cells) + " |")
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
