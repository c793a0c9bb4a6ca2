#!/usr/bin/env bash
# What constrained decoding costs, with `tandem bench`, one server, both set-ups in one run:
#   tpot: 32 concurrent streams of ~250-token prompts and 128 output tokens, without and with
#         `response_format: json_schema` (bench/schemas/record30.json: 30 required properties),
#         ROUNDS times each (default 3), alternating (the machine is shared and noisy), each run with prompts
#         of its own (a seed per run: no run hits another's prefix cache);
#   ttft: one request at a time, the same prompts, 8 output tokens, without and with the schema
#         (one warm-up request compiles and caches the grammar first).
# Results land in bench-results/constrained-<scenario>-<plain|schema>-<round>/; ratios are printed.
#
# usage: scripts/bench/constrained.sh [tandem up flags...]   (default: `tandem up`)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q
T=./target/release/tandem
MODEL=$($T model fetch 2>/dev/null)
PORT=18125
OUT=bench-results
SCHEMA=bench/schemas/record30.json

wait_up() { for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && return 0; sleep 0.5; done; echo "server did not come up" >&2; return 1; }
$T up --model "$MODEL" --port $PORT "$@" >/dev/null 2>&1 & SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
wait_up
bench() { $T bench --base-url "http://127.0.0.1:$PORT" --model SmolLM2-135M-Instruct --tokenizer "$MODEL" --quiet \
  --endpoint /v1/chat/completions --dataset-name random --random-input-len 250 "$@"; }

# Warm the server (and its allocator) once before anything is measured.
bench --random-output-len 32 --num-prompts 32 --max-concurrency 32 --seed 999 --label warm --result-dir $OUT/constrained-warm
ROUNDS=${ROUNDS:-3}
for round in $(seq 1 "$ROUNDS"); do
  for kind in plain schema; do
    extra=(); [ $kind = schema ] && extra=(--json-schema $SCHEMA)
    seed=$((round * 10 + ${#kind}))
    bench --random-output-len 128 --num-prompts 64 --max-concurrency 32 --seed $seed "${extra[@]}" \
      --label tpot-$kind --result-dir $OUT/constrained-tpot-$kind-$round
    bench --random-output-len 8 --num-prompts 12 --max-concurrency 1 --num-warmups 1 --seed $((seed + 100)) \
      "${extra[@]}" --label ttft-$kind --result-dir $OUT/constrained-ttft-$kind-$round
  done
done

python3 - $OUT "$ROUNDS" <<'PY'
import json, sys, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
def s(scen, kind, r):
    return json.load(open(f"{out}/constrained-{scen}-{kind}-{r}/summary.json"))
print("| round | TPOT p50 plain | TPOT p50 schema | ratio | out tok/s plain | schema | TTFT p50 plain | schema | +ms |")
print("|---|---|---|---|---|---|---|---|---|")
ratios, adds = [], []
for r in range(1, rounds + 1):
    tp, ts = s("tpot", "plain", r), s("tpot", "schema", r)
    fp, fs = s("ttft", "plain", r), s("ttft", "schema", r)
    ratio = ts["median_tpot_ms"] / tp["median_tpot_ms"]
    add = fs["median_ttft_ms"] - fp["median_ttft_ms"]
    ratios.append(ratio); adds.append(add)
    print(f"| {r} | {tp['median_tpot_ms']:.1f} ms | {ts['median_tpot_ms']:.1f} ms | {ratio:.3f}x | "
          f"{tp['output_throughput']:.0f} | {ts['output_throughput']:.0f} | "
          f"{fp['median_ttft_ms']:.1f} ms | {fs['median_ttft_ms']:.1f} ms | {add:+.1f} |")
print(f"median TPOT ratio {statistics.median(ratios):.3f}x; median TTFT added {statistics.median(adds):+.1f} ms")
PY
