#!/usr/bin/env bash
# A multi-host cluster on one machine: the scheduler, a prefill worker and a decode worker each
# in its own network namespace with its own address (10.77.0.1, .2, .3), joined through a
# bridge in a fourth namespace, every link rate-limited to 1 Gbit/s (tc tbf), KV over the TCP
# data plane (namespaces share /dev/shm and the boot id, so `auto` would pick shared memory),
# every internal connection authenticated with a cluster secret. Nothing but these namespaces'
# addresses and loopback is used. Needs root (CI runs as root).
#
#   scripts/check/multihost.sh target/release/tandem
#
# Checks, each failing the script:
#   1. the 12 seeded requests of seeded_requests.py give byte-identical answers to
#      `tandem up --colocated` on loopback;
#   2. a seeded stream during which the decode worker is killed with SIGKILL (and restarted, as
#      a supervisor would) completes with the same text as without the fault;
#   3. a scheduler holding another secret is refused by both workers: its requests fail, none
#      is served, and the workers log the refusals;
#   4. a worker asked to listen on a namespace address without a secret exits with status 2.
set -euo pipefail
BIN=$(realpath "${1:?tandem binary}")
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d /tmp/tandem-multihost.XXXXXX)
NS=(tnd-sched tnd-pre tnd-dec)
IP=(10.77.0.1 10.77.0.2 10.77.0.3)
SW=tnd-switch
log() { echo "multihost: $*"; }

cleanup() {
  set +e
  for ns in "${NS[@]}" $SW; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
  done
  [ -n "${COLO:-}" ] && kill "$COLO" 2>/dev/null
  if [ "${KEEP:-}" != 1 ]; then rm -rf "$WORK"; else echo "logs in $WORK"; fi
}
trap cleanup EXIT
cleanup_stale() { for ns in "${NS[@]}" $SW; do ip netns del "$ns" 2>/dev/null || true; done; }
cleanup_stale

MODEL=$("$BIN" model fetch)
log "model $MODEL"

# The network: a bridge in its own namespace, a veth pair per node, 1 Gbit/s each way.
ip netns add $SW
ip -n $SW link add br0 type bridge
ip -n $SW link set br0 up
for i in 0 1 2; do
  ns=${NS[$i]}
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip link add "tv$i" netns "$ns" type veth peer name "p$i" netns $SW
  ip -n "$ns" link set "tv$i" name eth0
  ip -n "$ns" addr add "${IP[$i]}/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n $SW link set "p$i" master br0
  ip -n $SW link set "p$i" up
  ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate 1gbit burst 256kb latency 20ms
  ip netns exec $SW tc qdisc add dev "p$i" root tbf rate 1gbit burst 256kb latency 20ms
done
log "namespaces up: ${NS[*]} over a 1 Gbit/s bridge"

SECRET=$WORK/secret
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$SECRET"
chmod 600 "$SECRET"
WRONG=$WORK/wrong-secret
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$WRONG"
chmod 600 "$WRONG"

# 4. No secret, not loopback: exit 2 before loading anything.
set +e
ip netns exec tnd-dec "$BIN" decode --model "$MODEL" --listen 10.77.0.3:50099 > "$WORK/open.log" 2>&1
rc=$?
set -e
[ "$rc" = 2 ] || { cat "$WORK/open.log"; log "FAIL: an open decode worker exited $rc, not 2"; exit 1; }
log "ok: a worker listening on 10.77.0.3 without a secret exits 2"

start_decode() {
  ip netns exec tnd-dec setsid "$BIN" decode --model "$MODEL" --listen 10.77.0.3:50061 \
    --cluster-secret-file "$SECRET" >> "$WORK/decode.log" 2>&1 < /dev/null &
}
start_decode
ip netns exec tnd-pre "$BIN" prefill --model "$MODEL" --listen 10.77.0.2:50051 \
  --cluster-secret-file "$SECRET" > "$WORK/prefill.log" 2>&1 &
ip netns exec tnd-sched "$BIN" scheduler --model "$MODEL" --host 10.77.0.1 --port 8000 \
  --prefill 10.77.0.2:50051 --decode 10.77.0.3:50061 --kv-transport tcp \
  --disagg-min-tokens 16 --cluster-secret-file "$SECRET" > "$WORK/scheduler.log" 2>&1 &
# The reference: one colocated process on loopback.
"$BIN" up --colocated --model "$MODEL" --port 18433 > "$WORK/colocated.log" 2>&1 &
COLO=$!

healthy() { # ns url
  for _ in $(seq 1 600); do
    if ip netns exec "$1" curl -sf "$2/health" 2>/dev/null | grep -q '"healthy":true' \
      && ! ip netns exec "$1" curl -sf "$2/health" | grep -q '"healthy":false'; then return 0; fi
    sleep 0.2
  done
  log "FAIL: $2 never became healthy"; tail -20 "$WORK"/*.log; exit 1
}
healthy tnd-sched http://10.77.0.1:8000
for _ in $(seq 1 600); do curl -sf http://127.0.0.1:18433/health >/dev/null && break; sleep 0.2; done
log "cluster up: scheduler 10.77.0.1, prefill 10.77.0.2, decode 10.77.0.3"

# 1. Seeded outputs against colocated.
ip netns exec tnd-sched python3 "$HERE/seeded_requests.py" http://10.77.0.1:8000 > "$WORK/multihost.json"
python3 "$HERE/seeded_requests.py" http://127.0.0.1:18433 > "$WORK/colocated.json"
if ! cmp -s "$WORK/multihost.json" "$WORK/colocated.json"; then
  diff "$WORK/multihost.json" "$WORK/colocated.json" | head -20
  log "FAIL: multi-host answers differ from colocated"; exit 1
fi
TRANSFERS=$(ip netns exec tnd-sched curl -sf http://10.77.0.1:8000/metrics | grep '^tandem_kv_transfers_total{transport="tcp"}' | awk '{print $2}')
[ "${TRANSFERS:-0}" -gt 0 ] || { log "FAIL: no KV moved over TCP"; exit 1; }
log "ok: 12 seeded requests identical to colocated ($(sha256sum < "$WORK/colocated.json" | cut -c1-12)), $TRANSFERS KV transfers over TCP"

# 2. kill -9 the decode worker mid-stream; a supervisor restarts it.
python3 "$HERE/stream_fault.py" http://127.0.0.1:18433 > "$WORK/stream-colocated.json"
export BIN MODEL SECRET WORK
ip netns exec tnd-sched python3 "$HERE/stream_fault.py" http://10.77.0.1:8000 \
  "for p in \$(ip netns pids tnd-dec); do kill -9 \$p; done; sleep 0.5; ip netns exec tnd-dec setsid \"\$BIN\" decode --model \"\$MODEL\" --listen 10.77.0.3:50061 --cluster-secret-file \"\$SECRET\" >> \"\$WORK/decode.log\" 2>&1 < /dev/null &" \
  > "$WORK/stream-multihost.json"
if ! cmp -s "$WORK/stream-multihost.json" "$WORK/stream-colocated.json"; then
  diff "$WORK/stream-multihost.json" "$WORK/stream-colocated.json" | head; log "FAIL: the stream changed across the kill"; exit 1
fi
RESUMED=$(ip netns exec tnd-sched curl -sf http://10.77.0.1:8000/metrics | grep '^tandem_stream_resumes_total' | awk '{print $2}')
[ "${RESUMED:-0}" -ge 1 ] || { log "FAIL: no stream was resumed"; exit 1; }
log "ok: decode worker killed with SIGKILL mid-stream; the stream resumed on its restart, text identical ($RESUMED resumed)"

# 3. A scheduler with the wrong secret.
healthy tnd-sched http://10.77.0.1:8000
ip netns exec tnd-sched "$BIN" scheduler --model "$MODEL" --host 10.77.0.1 --port 8001 \
  --prefill 10.77.0.2:50051 --decode 10.77.0.3:50061 --kv-transport tcp --hold-secs 2 \
  --cluster-secret-file "$WRONG" > "$WORK/wrong.log" 2>&1 &
for _ in $(seq 1 300); do ip netns exec tnd-sched curl -s http://10.77.0.1:8001/health >/dev/null && break; sleep 0.2; done
sleep 1
served=0
for i in 1 2 3; do
  code=$(ip netns exec tnd-sched curl -s -o /dev/null -w '%{http_code}' http://10.77.0.1:8001/v1/completions \
    -H 'Content-Type: application/json' -d '{"model":"SmolLM2-135M-Instruct","prompt":"Hello","max_tokens":4}')
  [ "$code" = 200 ] && served=$((served + 1))
done
[ "$served" = 0 ] || { log "FAIL: $served requests served with the wrong secret"; exit 1; }
if ip netns exec tnd-sched curl -s http://10.77.0.1:8001/health | grep -q '"healthy":true'; then
  log "FAIL: a worker looks healthy to the wrong-secret scheduler"; exit 1
fi
grep -q "internal connection refused" "$WORK/decode.log" || { log "FAIL: the decode worker logged no refusal"; exit 1; }
grep -q "internal connection refused" "$WORK/prefill.log" || { log "FAIL: the prefill worker logged no refusal"; exit 1; }
log "ok: a scheduler with another secret: 0 of 3 requests served, both workers refused it"
log "passed"
