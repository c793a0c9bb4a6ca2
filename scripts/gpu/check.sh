#!/usr/bin/env bash
# The CUDA backend on a machine with an NVIDIA GPU, in one run (bench/RESULTS.md "On a GPU"):
#   1. `tandem model device-check`: CUDA against the CPU (synthetic models' logits, seeded
#      batch invariance; with the model: golden prompts, speed against the device's bounds);
#   2. the cluster on the GPU: `tandem up --device cuda` disaggregated over shared memory, over
#      TCP, and colocated, one greedy request each: the three answers must be equal;
#   3. the same model through PyTorch/transformers (scripts/gpu/torch_bench.py), if it loads.
# Usage: scripts/gpu/check.sh TANDEM_BINARY MODEL.gguf   (a binary built with --features cuda)
set -uo pipefail
BIN=${1:?tandem binary built with --features cuda}
MODEL=${2:?the model file}
cd "$(dirname "$0")/../.."
# CUDA's libraries where pip put them (nvidia-cuda-nvrtc, nvidia-cublas, …).
LIBS=$(python3 - <<'PY'
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for f in glob.glob(os.path.join(sp, "nvidia", "**", "libnvrtc.so*"), recursive=True):
        dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
date -u

echo "=== 1. device-check"
"$BIN" model device-check --model "$MODEL" 2> /tmp/device-check.log
rc=$?
grep -v " INFO " /tmp/device-check.log | tail -20
[ $rc -eq 0 ] || echo "device-check failed: rc=$rc"

echo "=== 2. the cluster on the GPU"
answer() { # $@: extra flags of tandem up
  "$BIN" up --device cuda --model "$MODEL" --served-model-name m --port 18123 "$@" > /tmp/up.log 2>&1 &
  local pid=$! ok=0
  for _ in $(seq 1 240); do
    curl -sf http://127.0.0.1:18123/health > /dev/null && { ok=1; break; }
    kill -0 $pid 2> /dev/null || break
    sleep 0.5
  done
  if [ $ok = 1 ]; then
    curl -s http://127.0.0.1:18123/v1/completions -H 'content-type: application/json' \
      -d '{"model":"m","prompt":"The capital of France is","max_tokens":48,"temperature":0}' |
      python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["choices"][0]["text"].replace("\n","\\n") if "choices" in r else r)'
  else
    echo "(did not start)"; tail -5 /tmp/up.log
  fi
  kill -TERM $pid 2> /dev/null; wait $pid 2> /dev/null
}
a=$(answer); echo "disaggregated, shm: $a"
b=$(answer --kv-transport tcp); echo "disaggregated, tcp: $b"
c=$(answer --colocated); echo "colocated:          $c"
[ "$a" = "$b" ] && [ "$b" = "$c" ] && echo "cluster answers equal: yes" || echo "cluster answers equal: NO"

echo "=== 3. PyTorch/transformers"
timeout 240 python3 scripts/gpu/torch_bench.py "$MODEL" 2>&1 | grep -v Warning | tail -12
