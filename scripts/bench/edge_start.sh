#!/usr/bin/env bash
# Start to first token, warm and cold: process start until a one-token chat completion returns,
# for `tandem edge` (a bundle) and `tandem up --colocated` (the GGUF), and `llama-server` when
# LLAMA_SERVER points at one — the same model, median of REPS runs in one session. Cold: the
# model files and the binaries are evicted from the page cache before each start
# (posix_fadvise DONTNEED; no root needed). Also prints the bundle's size and each server's
# resident memory after the request.
# Usage: scripts/bench/edge_start.sh [tandem binary] [reps]
set -euo pipefail
cd "$(dirname "$0")/../.."
T=${1:-target/release/tandem}
REPS=${2:-5}
PORT=18795
MODEL=$("$T" model fetch)
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
"$T" export-edge "$MODEL" --out "$DIR/bundle" --budget-mib 160 2> /dev/null > /dev/null
echo "bundle: $(du -sb "$DIR/bundle" | cut -f1) bytes; GGUF: $(stat -c %s "$MODEL") bytes"

evict() { # files... : drop them from the page cache
  python3 -c 'import os, sys
for p in sys.argv[1:]:
    fd = os.open(p, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)' "$@"
}

first_token() { # command... -> "ms rss_kib" (the command gets --port PORT appended)
  if [ "$COLD" = 1 ]; then evict "$MODEL" "$DIR/bundle/"* "$T" ${LLAMA_SERVER:+"$LLAMA_SERVER"}; fi
  PORT=$((PORT + 1))
  # Python starts the server itself, so the clock starts at the spawn (not at its own start).
  python3 - "$PORT" "$DIR/log" "$@" <<'EOF'
import json, subprocess, sys, time, urllib.request
port, log, cmd = int(sys.argv[1]), sys.argv[2], sys.argv[3:] + ["--port", sys.argv[1]]
body = json.dumps({"model": "SmolLM2-135M-Instruct", "max_tokens": 1,
                   "messages": [{"role": "user", "content": "Hello!"}]}).encode()
t0 = time.time()
proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
while True:
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                     {"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=60).read()
        break
    except Exception:
        if time.time() - t0 > 120 or proc.poll() is not None:
            sys.exit(f"no answer: {open(log).read()[-2000:]}")
        time.sleep(0.002)
ms = (time.time() - t0) * 1e3
rss = [l.split()[1] for l in open(f"/proc/{proc.pid}/status") if l.startswith("VmRSS")][0]
proc.terminate()
proc.wait()
print(f"{ms:.0f} {rss}")
EOF
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

run() { # name, command...
  local name=$1; shift
  : > "$DIR/times"
  local rss=0
  for _ in $(seq 1 "$REPS"); do
    read -r ms rss < <(first_token "$@")
    echo "$ms" >> "$DIR/times"
  done
  local m
  m=$(median < "$DIR/times")
  echo "$name ($WHICH): start to first token median ${m} ms (runs: $(tr '\n' ' ' < "$DIR/times")), RSS after ${rss} KiB"
  eval "${name//[^a-z]/_}=$m"
}

for COLD in 0 1; do
  WHICH=$([ $COLD = 1 ] && echo cold || echo warm)
  [ $COLD = 0 ] && cat "$MODEL" "$DIR/bundle/"* > /dev/null
  run edge "$T" edge "$DIR/bundle"
  run colocated "$T" up --colocated --model "$MODEL"
  python3 -c "import sys; print(f'edge / colocated ({sys.argv[3]}): {float(sys.argv[1]) / float(sys.argv[2]):.3f}')" "$edge" "$colocated" "$WHICH"
  if [ -n "${LLAMA_SERVER:-}" ]; then
    run llama_server "$LLAMA_SERVER" -m "$MODEL" -t 2
    python3 -c "import sys; print(f'edge / llama-server ({sys.argv[3]}): {float(sys.argv[1]) / float(sys.argv[2]):.3f}')" "$edge" "$llama_server" "$WHICH"
  fi
done
