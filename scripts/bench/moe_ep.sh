#!/usr/bin/env bash
# Expert parallelism, one run: a random MoE with SmolLM2-135M's geometry (8 experts, top-2,
# `tandem model make-moe --skew S --falloff F`: the busiest expert takes S of the tokens, the
# router's bias falls as (1 - e/7)^F over the others) measured (a) in one process, (b) with its
# experts on 2 `tandem expert` processes split evenly, (c) placed by EPLB from (b)'s measured
# load with up to 2 redundant experts (static; a replicated expert's rows split per layer and
# step to level the workers), (c0) the same plan without replicas, (d) started as (b) with EPLB at run time (a plan
# every 8 steps), (b2)/(c2) with 2 microbatches, (b-tcp) as (b) with rows on the socket instead
# of shared memory: decode at batch 64, a 2,000-token prefill, a decode step's dispatch +
# combine share, each worker's load (summed and per layer), the fitted cost of an expert run,
# how long (d)'s switch took (`tandem model ep-bench`). The logits of every setup must be
# bit-identical or the run fails.
# Usage: scripts/bench/moe_ep.sh [tandem binary] [skew] [falloff] [steps]
set -euo pipefail
cd "$(dirname "$0")/../.."
T=${1:-target/release/tandem}
SKEW=${2:-0.97}
FALLOFF=${3:-0.5}
STEPS=${4:-48}
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
"$T" model make-moe --out "$DIR/moe.gguf" --num-experts 8 --top-k 2 --skew "$SKEW" \
  --falloff "$FALLOFF" --seed 1
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
"$T" model ep-bench --model "$DIR/moe.gguf" --experts 2 --expert-threads 1 --batch 64 \
  --steps "$STEPS" --prompt 2000 --redundant-experts 2 --eplb-interval 8
