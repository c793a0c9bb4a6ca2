#!/usr/bin/env bash
# Runs the cargo fuzz targets, each for RUNS inputs (default 1,000,000), from seeds made here:
#
#   fuzz/run.sh                     # the documented run (bench/RESULTS.md, "Security and faults")
#   fuzz/run.sh 20000               # CI's short run
#   fuzz/run.sh 100000 gguf         # one target
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). Built with `-s none` (no sanitizer: the code under
# test is safe Rust but for the receiver's scattered reads, whose bounds the sink's slots fix)
# and RUSTC_BOOTSTRAP=1, so the stable toolchain takes cargo fuzz's flags. A crash leaves its
# input under fuzz/artifacts/TARGET/ and fails the script.
set -euo pipefail
cd "$(dirname "$0")"
RUNS=${1:-1000000}
shift || true
TARGETS=${*:-kv_frames gguf request_plan}
export RUSTC_BOOTSTRAP=1
LOGS=${FUZZ_LOGS:-$(mktemp -d /tmp/tandem-fuzz.XXXXXX)}
mkdir -p "$LOGS"
cargo fuzz build -s none -O
mkdir -p corpus/kv_frames corpus/gguf corpus/request_plan
# KV frames: a slabs frame of lease 01…, an end frame, and the same for lease 02….
python3 - <<'PY'
import struct
def frame(kind, lease, a, b, ln):
    return b"TKV3" + bytes([kind, 0, 0, 0]) + bytes([lease] * 16) + struct.pack("<IIII", a, b, ln, 0)
for lease in (1, 2):
    slabs = frame(1, lease, 2, 0, 64) + struct.pack("<II", 0, 3) + bytes(range(64)) * 2
    end = frame(2, lease, 2, 0, 8) + struct.pack("<Q", 12345)
    open(f"corpus/kv_frames/seed-{lease}", "wb").write(slabs + end)
PY
# Requests: the first byte picks the route (even: completions, odd: chat).
printf '\x00{"model":"tiny","prompt":"the cat","max_tokens":3,"seed":1,"temperature":0.7,"logprobs":2,"stop":["a"]}' > corpus/request_plan/seed-completions
printf '\x00{"model":"tiny","prompt":[[5,6,7],[8]],"max_tokens":0,"echo":true,"logprobs":1,"n":2}' > corpus/request_plan/seed-echo
printf '\x01{"model":"tiny","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}],"max_tokens":4,"stream":true,"stream_options":{"include_usage":true},"logprobs":true,"top_logprobs":2}' > corpus/request_plan/seed-chat
status=0
for t in $TARGETS; do
  case $t in
    gguf) export TANDEM_FUZZ_SEED_DIR=$PWD/corpus/gguf; max_len=65536 ;;
    *) unset TANDEM_FUZZ_SEED_DIR; max_len=8192 ;;
  esac
  start=$(date +%s)
  if cargo fuzz run -s none -O "$t" "corpus/$t" -- -runs="$RUNS" -rss_limit_mb=2048 \
      -max_len="$max_len" -timeout=60 -print_final_stats=1 > "$LOGS/$t.log" 2>&1; then
    echo "fuzz $t: $(grep -E '^Done|stat::number_of_executed_units' $LOGS/$t.log | tail -1) in $(( $(date +%s) - start )) s, 0 crashes; $(grep -o 'cov: [0-9]*' $LOGS/$t.log | tail -1)"
  else
    echo "fuzz $t: FAILED (log $LOGS/$t.log)"; grep -E "panicked|ERROR|SUMMARY|artifact" "$LOGS/$t.log" | head; status=1
  fi
done
exit $status
