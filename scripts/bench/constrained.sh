#!/usr/bin/env bash
# What constrained decoding costs, with `tandem bench`: Tandem and llama.cpp's llama-server on
# the same model and workload, each without and with `response_format: json_schema`
# (bench/schemas/record30.json: 30 required properties), in one run:
#   tpot: 32 concurrent streams of ~250-token prompts and 128 output tokens, ROUNDS times each
#         (default 3), plain and schema alternating (the machine is shared and noisy), each run
#         with prompts of its own (a seed per run: no run hits another's prefix cache);
#   ttft: one request at a time, the same prompts, 8 output tokens (one warm-up request
#         compiles and caches the grammar first).
# Results land in bench-results/constrained-<server>-<scenario>-<plain|schema>-<round>/; the
# ratios are printed. SERVERS picks the servers (default "tandem llama-server"); llama-server is
# built by ../shared/tools/build-llama-cpp.sh (10-20 minutes the first time) unless LLAMA_BIN
# points at its bin directory.
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
SERVERS=${SERVERS:-tandem llama-server}
ROUNDS=${ROUNDS:-3}
THREADS=$(nproc)

wait_up() { for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && return 0; sleep 0.5; done; echo "server did not come up" >&2; return 1; }
SERVER=
stop() { [ -n "$SERVER" ] && { kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true; }; SERVER=; }
trap stop EXIT
start() {
  case $1 in
    tandem) $T up --model "$MODEL" --port $PORT "${@:2}" >/dev/null 2>&1 & SERVER=$! ;;
    llama-server)
      LLAMA_BIN=${LLAMA_BIN:-$(bash ../shared/tools/build-llama-cpp.sh | tail -n 1)}
      # 32 slots of 512 tokens: a ~250-token prompt and 128 output tokens fit.
      "$LLAMA_BIN/llama-server" -m "$MODEL" --port $PORT -t "$THREADS" -np 32 -c 16384 --log-disable >/dev/null 2>&1 & SERVER=$! ;;
  esac
  wait_up
}
bench() { $T bench --base-url "http://127.0.0.1:$PORT" --model SmolLM2-135M-Instruct --tokenizer "$MODEL" --quiet \
  --endpoint /v1/chat/completions --dataset-name random --random-input-len 250 "$@"; }

for server in $SERVERS; do
  if [ "$server" = tandem ]; then start tandem "$@"; else start "$server"; fi
  # Warm the server (and its allocator) once before anything is measured.
  bench --random-output-len 32 --num-prompts 32 --max-concurrency 32 --seed 999 --label warm --result-dir $OUT/constrained-warm
  for round in $(seq 1 "$ROUNDS"); do
    for kind in plain schema; do
      extra=(); [ $kind = schema ] && extra=(--json-schema $SCHEMA)
      seed=$((round * 10 + ${#kind}))
      bench --random-output-len 128 --num-prompts 64 --max-concurrency 32 --seed $seed "${extra[@]}" \
        --label tpot-$kind --result-dir $OUT/constrained-$server-tpot-$kind-$round
      bench --random-output-len 8 --num-prompts 12 --max-concurrency 1 --num-warmups 1 --seed $((seed + 100)) \
        "${extra[@]}" --label ttft-$kind --result-dir $OUT/constrained-$server-ttft-$kind-$round
    done
  done
  stop
done

python3 - $OUT "$ROUNDS" $SERVERS <<'PY'
import json, sys, statistics
out, rounds, servers = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def s(srv, scen, kind, r):
    return json.load(open(f"{out}/constrained-{srv}-{scen}-{kind}-{r}/summary.json"))
med = {}
for srv in servers:
    print(f"\n{srv}\n")
    print("| round | TPOT p50 plain | TPOT p50 schema | ratio | out tok/s plain | schema | TTFT p50 plain | schema | +ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    ratios, adds, tp_s, tp_p = [], [], [], []
    for r in range(1, rounds + 1):
        tp, ts = s(srv, "tpot", "plain", r), s(srv, "tpot", "schema", r)
        fp, fs = s(srv, "ttft", "plain", r), s(srv, "ttft", "schema", r)
        ratio = ts["median_tpot_ms"] / tp["median_tpot_ms"]
        add = fs["median_ttft_ms"] - fp["median_ttft_ms"]
        ratios.append(ratio); adds.append(add)
        tp_s.append(ts["median_tpot_ms"]); tp_p.append(tp["median_tpot_ms"])
        print(f"| {r} | {tp['median_tpot_ms']:.1f} ms | {ts['median_tpot_ms']:.1f} ms | {ratio:.3f}x | "
              f"{tp['output_throughput']:.0f} | {ts['output_throughput']:.0f} | "
              f"{fp['median_ttft_ms']:.1f} ms | {fs['median_ttft_ms']:.1f} ms | {add:+.1f} |")
    med[srv] = (statistics.median(tp_p), statistics.median(tp_s))
    print(f"\n{srv}: median TPOT ratio {statistics.median(ratios):.3f}x; median TTFT added {statistics.median(adds):+.1f} ms")
if "tandem" in med and "llama-server" in med:
    t, l = med["tandem"], med["llama-server"]
    print(f"\nmedian TPOT, plain: Tandem {t[0]:.1f} ms, llama-server {l[0]:.1f} ms ({l[0]/t[0]:.2f}x Tandem's)")
    print(f"median TPOT, schema: Tandem {t[1]:.1f} ms, llama-server {l[1]:.1f} ms ({l[1]/t[1]:.2f}x Tandem's)")
PY
