#!/usr/bin/env bash
# The edge profile under a hard memory budget:
#  1. a budget too small for the model is refused with exit status 2 and the arithmetic;
#  2. `tandem export-edge` writes a bundle for BUDGET MiB; `tandem edge` serves it;
#  3. 16 concurrent chat requests, all answered (queued when the sequences are busy), while
#     the server's resident memory is sampled: its peak (VmHWM, file-backed weight pages
#     included) must stay within the budget.
# Usage: scripts/check/edge.sh [tandem binary] [budget MiB] [export-edge flags...]
set -euo pipefail
cd "$(dirname "$0")/../.."
T=${1:-target/release/tandem}
BUDGET=${2:-160}
shift $(( $# > 2 ? 2 : $# ))
EXTRA=("$@")
[ ${#EXTRA[@]} -gt 0 ] || EXTRA=(--kv-cache-dtype int8 --context 512)
PORT=${EDGE_PORT:-18790}
DIR=$(mktemp -d)
trap 'kill $PID 2>/dev/null || true; rm -rf "$DIR"' EXIT
PID=

echo "--- a budget that cannot hold the model is refused (exit 2, with the arithmetic)"
set +e
"$T" export-edge --out "$DIR/none" --budget-mib 64 2> "$DIR/refused.txt"
rc=$?
set -e
cat "$DIR/refused.txt"
[ $rc -eq 2 ] || { echo "FAIL: exit status $rc, want 2"; exit 1; }
grep -q "needs --budget-mib" "$DIR/refused.txt" || { echo "FAIL: no arithmetic"; exit 1; }
[ ! -e "$DIR/none/weights.bin" ] || { echo "FAIL: a refused export wrote weights"; exit 1; }

echo "--- export for $BUDGET MiB (${EXTRA[*]})"
"$T" export-edge --out "$DIR/bundle" --budget-mib "$BUDGET" "${EXTRA[@]}"
du -sh "$DIR/bundle"

echo "--- serve it, 16 concurrent requests, resident memory sampled"
start=$(date +%s.%N)
"$T" edge "$DIR/bundle" --port "$PORT" > "$DIR/edge.log" 2>&1 &
PID=$!
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  kill -0 $PID 2>/dev/null || { cat "$DIR/edge.log"; exit 1; }
  sleep 0.02
done
python3 - "$PORT" "$PID" "$BUDGET" "$start" <<'EOF'
import json, sys, threading, time, urllib.request
port, pid, budget, start = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
url = f"http://127.0.0.1:{port}/v1/chat/completions"
model = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models"))["data"][0]["id"]

def status():
    out = {}
    for line in open(f"/proc/{pid}/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out

def ask(i, max_tokens=48):
    body = {"model": model, "messages": [{"role": "user", "content": f"Question {i}: name {i % 5 + 2} uses of a paperclip."}],
            "max_tokens": max_tokens, "seed": i, "temperature": 0.7}
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return r.status, json.load(r)

# Start to first token: the first request alone, timed from the process start.
s, first = ask(0, max_tokens=1)
t_first = time.time() - start
idle = status()
peak = {"VmRSS": 0}
done = threading.Event()
def sample():
    while not done.is_set():
        peak["VmRSS"] = max(peak["VmRSS"], status()["VmRSS"])
        time.sleep(0.01)
sampler = threading.Thread(target=sample); sampler.start()
results = [None] * 16
def worker(i):
    try:
        results[i] = ask(i + 1)
    except Exception as e:
        results[i] = (getattr(e, "code", None) or str(e), None)
t0 = time.time()
threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
for t in threads: t.start()
for t in threads: t.join()
elapsed = time.time() - t0
done.set(); sampler.join()
end = status()
ok = sum(1 for s, b in results if s == 200 and b["choices"][0]["message"]["content"])
tokens = sum(b["usage"]["completion_tokens"] for s, b in results if s == 200)
mib = lambda b: b / (1 << 20)
print(f"start to first token (process start, warm page cache): {t_first * 1e3:.0f} ms")
print(f"idle: RSS {mib(idle['VmRSS']):.1f} MiB (file {mib(idle['RssFile']):.1f}, anon {mib(idle['RssAnon']):.1f})")
print(f"16 concurrent: {ok}/16 answered, {tokens} tokens in {elapsed:.1f} s; peak RSS sampled {mib(peak['VmRSS']):.1f} MiB, "
      f"VmHWM {mib(end['VmHWM']):.1f} MiB (file {mib(end['RssFile']):.1f}, anon {mib(end['RssAnon']):.1f}); budget {budget} MiB")
if ok != 16:
    print("FAIL: not every request was answered:", [s for s, _ in results]); sys.exit(1)
if end["VmHWM"] > budget << 20:
    print("FAIL: peak resident memory over the budget"); sys.exit(1)
EOF
kill -TERM $PID; wait $PID || true
