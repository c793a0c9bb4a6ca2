#!/usr/bin/env bash
# The default `tandem up` (1 prefill + 1 decode worker sharing the cores, each prompt placed by
# the cost model against the scenario's SLO) against `tandem up --colocated`, scenario by
# scenario, both set-ups in one run (alternating, ROUNDS times; default 1), with `tandem bench`:
#   streams32: issue 15's table: 32 streams, 250-token prompts, 128 output tokens, 96 requests,
#              SLO TTFT <= 1 s, TPOT <= 100 ms;
#   results1..results5: the five scenarios of bench/RESULTS.md (SLO TTFT <= 2 s, TPOT <= 200 ms);
#   mixed-tight: §5's mixed workload (~1,000-token prompts among chat turns) at TTFT <= 3 s,
#              TPOT <= 25 ms, swept over MIXED_RATES (default 0.5,1,2,3).
# The cost profile is this machine's cached one (`tandem plan profile` first measures a full
# one; otherwise `tandem up` measures a quick one on its first start).
# Results land in bench-results/placement-<scenario>-<setup>-<round>/ (the default's with
# placements.txt: how many prompts each kind of worker prefilled); a table with the
# default/colocated goodput ratios is printed at the end. TRACE=1 keeps the default's log, with
# each paced step's decision and time (TANDEM_LOG=decode_worker=trace), beside its results;
# scripts/bench/step_fit.py reads how well the step-time fit predicted those times.
#
# usage: scripts/bench/placement.sh [SCENARIO...]   (default: all)
set -euo pipefail
PORT=18125
source "$(dirname "$0")/lib.sh"
SCENARIOS=${*:-streams32 results1 results2 results3 results4 results5 mixed-tight}
ROUNDS=${ROUNDS:-1}
[ -z "${TRACE:-}" ] || export TANDEM_LOG=${TANDEM_LOG:-info,decode_worker=trace}

for s in $SCENARIOS; do
  slo=(--slo-ttft-ms 2000 --slo-tpot-ms 200)
  good=(--goodput ttft:2000 tpot:200)
  case $s in
    streams32)
      slo=(--slo-ttft-ms 1000 --slo-tpot-ms 100); good=(--goodput ttft:1000 tpot:100)
      args=(--endpoint /v1/completions --dataset-name random --random-input-len 250 --random-output-len 128
            --num-prompts 96 --max-concurrency 32 --num-warmups 2) ;;
    results1)
      args=(--endpoint /v1/completions --dataset-name random --random-input-len 250 --random-output-len 128
            --num-prompts 64 --max-concurrency 32 --num-warmups 2) ;;
    results2)
      args=(--endpoint /v1/completions --dataset-name random --random-input-len 250 --random-output-len 128
            --num-prompts 8 --max-concurrency 1) ;;
    results3)
      args=(--endpoint /v1/chat/completions --dataset-name random --random-input-len 128 --random-output-len 64
            --num-prompts 48 --max-concurrency 16 --num-warmups 2) ;;
    results4)
      args=(--endpoint /v1/chat/completions --dataset-name shared-prefix --num-prefix-groups 2 --shared-prefix-len 600
            --random-input-len 48 --random-output-len 32 --num-prompts 24 --max-concurrency 4) ;;
    results5)
      args=(--endpoint /v1/completions --dataset-name mixed --mixed-long-len 1000 --mixed-long-fraction 0.25
            --random-output-len 64 --num-prompts 16 --request-rate 0.25,0.5,1) ;;
    mixed-tight)
      slo=(--slo-ttft-ms 3000 --slo-tpot-ms 25); good=(--goodput ttft:3000 tpot:25)
      args=(--endpoint /v1/completions --dataset-name mixed --mixed-long-len 1000 --mixed-long-fraction 0.25
            --random-output-len 64 --num-prompts 24 --request-rate "${MIXED_RATES:-0.5,1,2,3}") ;;
    *) echo "unknown scenario $s" >&2; exit 2 ;;
  esac
  for round in $(seq 1 "$ROUNDS"); do
    start --colocated; bench "${args[@]}" "${good[@]}" --label colocated --result-dir $OUT/placement-$s-colocated-$round; stop
    SERVER_LOG=${TRACE:+$OUT/placement-$s-default-$round.log} start "${slo[@]}"
    bench "${args[@]}" "${good[@]}" --label default --result-dir $OUT/placement-$s-default-$round
    # Where the prompts went (the scheduler's counter), beside the run's results.
    curl -s "http://127.0.0.1:$PORT/metrics" | grep '^tandem_prefill_placements_total' \
      > $OUT/placement-$s-default-$round/placements.txt || true
    stop
  done
done
python3 - "$OUT" $SCENARIOS <<'PY'
import json, sys, os, glob
out, scenarios = sys.argv[1], sys.argv[2:]
keys = ["request_rate", "output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms",
        "slo_attainment", "request_goodput"]
def rows(p):
    v = json.load(open(p))
    return v if isinstance(v, list) else [v]
print("| scenario | round | set-up | " + " | ".join(keys) + " | goodput default/colocated | TTFT p50 default/colocated |")
print("|" + "---|" * (len(keys) + 5))
for s in scenarios:
    for c in sorted(glob.glob(os.path.join(out, f"placement-{s}-colocated-*", "summary.json"))):
        rnd = c.split("-")[-1].split("/")[0]
        d = os.path.join(out, f"placement-{s}-default-{rnd}", "summary.json")
        if not os.path.exists(d):
            continue
        for rc, rd in zip(rows(c), rows(d)):
            for name, r in (("colocated", rc), ("default", rd)):
                cells = [f"{r.get(k):.2f}" if isinstance(r.get(k), float) else str(r.get(k)) for k in keys]
                ratio = ttft = ""
                if name == "default":
                    g = rc.get("request_goodput") or 0
                    ratio = f"{(r.get('request_goodput') or 0) / g:.2f}" if g else ("=" if not r.get("request_goodput") else "inf")
                    ttft = f"{r['median_ttft_ms'] / rc['median_ttft_ms']:.2f}"
                print(f"| {s} | {rnd} | {name} | " + " | ".join(cells) + f" | {ratio} | {ttft} |")
        if len(rows(c)) > 1:
            # A sweep: each set-up's best goodput over its rates, and their ratio.
            best = [max(r.get("request_goodput") or 0 for r in rows(p)) for p in (c, d)]
            print(f"| {s} | {rnd} | best over the sweep | colocated {best[0]:.2f}, default {best[1]:.2f} req/s"
                  + (f": {best[1] / best[0]:.2f}x" if best[0] else "") + " |")
PY
