#!/usr/bin/env bash
# The disaggregated cluster against colocated serving, on this machine, with `tandem bench`:
#   ttft:    one request at a time, 512-token prompts: the TTFT that disaggregation adds at low load
#            (colocated on every core vs `tandem up` 1 prefill + 1 decode, unpinned);
#   goodput: the mixed workload (a fifth ~2000-token prompts, the rest chat turns), SLO TTFT <= 1 s and
#            TPOT <= 100 ms, swept over request rate: `tandem up --pin` (1P+1D, one core each; and with
#            --max-prefill-queue 1) vs colocated on both cores;
#   kv:      `tandem kv bench`, KV_RUNS times (default 5): shm and TCP transfer throughput against memcpy
#            and a raw socket, with a per-run summary of the ratios.
# Results land in bench-results/disagg-<scenario>-<server>/; a table is printed at the end.
#
# usage: scripts/bench/disagg.sh [SCENARIO...]   (ttft goodput kv; default: all)
set -euo pipefail
PORT=18124
source "$(dirname "$0")/lib.sh"
SCENARIOS=${*:-kv ttft goodput}
RATES=${RATES:-0.1,0.2,0.3,0.5}

for s in $SCENARIOS; do
  case $s in
    kv)
      # Several runs of 31 short rounds each: the host's load moves between runs too.
      mkdir -p $OUT/disagg-kv
      for run in $(seq 1 "${KV_RUNS:-5}"); do
        $T kv bench | tee $OUT/disagg-kv/run-$run.md
        tail -1 $OUT/disagg-kv/run-$run.md > $OUT/disagg-kv/run-$run.json
      done
      python3 - $OUT/disagg-kv <<'PY'
import json, sys, glob, statistics
runs = [json.load(open(p)) for p in sorted(glob.glob(sys.argv[1] + "/run-*.json"))]
print(f"\n{len(runs)} runs: each run's median of per-round ratios (best/best in brackets)")
for k in ["shm_vs_memcpy", "private_vs_memcpy", "shm_layers_vs_memcpy", "shm_layers_vs_private_layers", "tcp_vs_socket"]:
    cells = [f"{100*r[k]:.0f}% ({100*r[k+'_best']:.0f}%)" for r in runs]
    print(f"| {k} | " + " | ".join(cells) + f" | median {100*statistics.median(r[k] for r in runs):.0f}% |")
PY
      ;;
    ttft)
      args=(--endpoint /v1/completions --dataset-name random --random-input-len 512 --random-output-len 16
            --num-prompts 16 --max-concurrency 1 --request-rate inf --num-warmups 2)
      for round in 1 2; do  # alternate, twice: the machine is shared and noisy
        start --colocated; bench "${args[@]}" --label colocated --result-dir $OUT/disagg-ttft-colocated-$round; stop
        start; bench "${args[@]}" --label 1p1d --result-dir $OUT/disagg-ttft-1p1d-$round; stop
      done ;;
    goodput)
      args=(--endpoint /v1/completions --dataset-name mixed --mixed-long-len 2000 --mixed-long-fraction 0.2
            --random-output-len 64 --num-prompts 20 --request-rate "$RATES" --goodput ttft:1000 tpot:100)
      start --colocated; bench "${args[@]}" --label colocated --result-dir $OUT/disagg-goodput-colocated; stop
      start --pin; bench "${args[@]}" --label 1p1d-pinned --result-dir $OUT/disagg-goodput-1p1d-pinned; stop
      # Dynamo's rule on top: prefill on the decode worker while the prefill worker is busy.
      start --pin --max-prefill-queue 1; bench "${args[@]}" --label 1p1d-pinned-spill --result-dir $OUT/disagg-goodput-1p1d-pinned-spill; stop
      $T bench compare $OUT/disagg-goodput-1p1d-pinned $OUT/disagg-goodput-colocated --out $OUT/disagg-goodput-compare ;;
    *) echo "unknown scenario $s" >&2; exit 2 ;;
  esac
done
python3 - "$OUT" <<'PY'
import json, sys, os, glob
out = sys.argv[1]
keys = ["request_rate", "completed", "failed", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms",
        "slo_attainment", "request_goodput", "output_throughput"]
rows = sorted(glob.glob(os.path.join(out, "disagg-*", "summary.json")))
if rows:
    print("| run | " + " | ".join(keys) + " |")
    print("|" + "---|" * (len(keys) + 1))
for p in rows:
    v = json.load(open(p))
    for row in (v if isinstance(v, list) else [v]):
        cells = [f"{row.get(k):.2f}" if isinstance(row.get(k), float) else str(row.get(k)) for k in keys]
        print(f"| {os.path.basename(os.path.dirname(p))} | " + " | ".join(cells) + " |")
PY
# The goodput runs by request kind, and SLO attainment under other SLOs (from the same requests).
python3 - "$OUT" <<'PY'
import json, sys, os, glob
out = sys.argv[1]
def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")
slos = [(1000, 100), (3000, 100), (6000, 100), (6000, 25)]
if not glob.glob(os.path.join(out, "disagg-goodput-*", "rate-*")):
    sys.exit()
print()
print("| run | rate | long TTFT p50 ms | chat TTFT p50 ms | chat TPOT p50 / p99 ms | long TPOT p99 ms | " +
      " | ".join(f"attain TTFT<={t/1000:g}s TPOT<={p}ms" for t, p in slos) + " |")
print("|" + "---|" * (6 + len(slos)))
for d in sorted(glob.glob(os.path.join(out, "disagg-goodput-*", "rate-*"))):
    rq = [json.loads(l) for l in open(os.path.join(d, "requests.jsonl"))]
    ok = [r for r in rq if r["success"]]
    long = [r for r in ok if r["kind"] != "chat"]
    chat = [r for r in ok if r["kind"] == "chat"]
    att = [sum(1 for r in ok if r["ttft_ms"] <= t and (r["tpot_ms"] or 0) <= p) / len(rq) for t, p in slos]
    run = os.path.basename(os.path.dirname(d)).replace("disagg-goodput-", "")
    print(f"| {run} | {d.rsplit('-', 1)[1]} | {pct([r['ttft_ms'] for r in long], .5):.0f} | {pct([r['ttft_ms'] for r in chat], .5):.0f} | "
          f"{pct([r['tpot_ms'] for r in chat], .5):.1f} / {pct([r['tpot_ms'] for r in chat], .99):.1f} | {pct([r['tpot_ms'] for r in long], .99):.1f} | "
          + " | ".join(f"{a:.2f}" for a in att) + " |")
PY
