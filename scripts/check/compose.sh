#!/usr/bin/env bash
# Tandem's compose cluster (deploy/compose.yaml) under faults: etcd, a scheduler, two prefill
# and two decode workers, each its own container of the FROM scratch images, on a private
# network, discovered through etcd, KV over TCP, the internal plane behind a cluster secret.
#
#   scripts/check/compose.sh [TANDEM_IMAGE] [GLIBC_TANDEM]
#     TANDEM_IMAGE  built by deploy/build-image.sh --model default (default tandem:ci)
#     GLIBC_TANDEM  the host's glibc build, the reference (default target/release/tandem)
#
# Checks, each failing the script:
#   1. the official openai client's smoke test passes against the cluster, and the 12 seeded
#      requests of seeded_requests.py give byte-identical answers to the glibc build's
#      `tandem up --colocated` on the host, with KV moved over TCP;
#   2. `docker kill` of the decode container holding a seeded stream, mid-stream: the stream
#      completes with the same text as without the fault; the container, started again, rejoins;
#   3. `docker network disconnect` of a prefill container: requests keep succeeding (their
#      answers unchanged); reconnected, it is healthy in the routing table again;
#   4. `docker compose down` while streams are open: every stream completes.
# Only container and loopback addresses are used; everything started here is stopped.
set -euo pipefail
cd "$(dirname "$0")/../.."
TANDEM_IMAGE=${1:-tandem:ci}
GLIBC=$(realpath "${2:-target/release/tandem}")
HERE=scripts/check
P=tandem-ci
PORT=18470
COLO_PORT=18471
URL=http://127.0.0.1:$PORT
WORK=$(mktemp -d /tmp/tandem-compose.XXXXXX)
log() { echo "compose: $*"; }
export TANDEM_IMAGE ETCD_IMAGE=tandem-etcd:ci TANDEM_SECRET_FILE=$WORK/secret TANDEM_PORT=$PORT
# Short prompts too go through a prefill worker, so that every seeded request moves KV over TCP.
export TANDEM_DISAGG_MIN_TOKENS=16
# Compose v2 (`docker compose`) where installed, else v1 (`docker-compose`, Debian's).
if docker compose version >/dev/null 2>&1; then DC=(docker compose); else DC=(docker-compose); fi
DC+=(-f deploy/compose.yaml -p $P)
# A service's container, by compose's labels (v1 and v2 name containers differently).
container() { docker ps -aq --filter "label=com.docker.compose.project=$P" --filter "label=com.docker.compose.service=$1"; }
COLO=
cleanup() {
  set +e
  [ "${KEEP:-}" = 1 ] && "${DC[@]}" logs --no-color > "$WORK/compose.log" 2>&1
  "${DC[@]}" down -t 10 >/dev/null 2>&1
  [ -n "$COLO" ] && { kill "$COLO" 2>/dev/null; wait "$COLO" 2>/dev/null; }
  if [ "${KEEP:-}" != 1 ]; then rm -rf "$WORK"; else echo "logs in $WORK"; fi
}
trap cleanup EXIT
"${DC[@]}" down -t 5 >/dev/null 2>&1 || true

bash deploy/etcd/build-image.sh "$ETCD_IMAGE" >/dev/null
bash deploy/compose-secret.sh "$TANDEM_SECRET_FILE" >/dev/null
"${DC[@]}" up -d 2>&1 | tail -6

# Waits until the scheduler lists WANT (a python expression over `workers`) as true.
until_workers() { # what, expr, seconds
  local deadline=$(( $(date +%s) + $3 ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    if curl -s "$URL/health" 2>/dev/null | python3 -c "
import json, sys
workers = json.load(sys.stdin).get('workers') or []
h = {w['addr'].split(':')[0]: w['healthy'] for w in workers}
sys.exit(0 if ($2) else 1)" 2>/dev/null; then return 0; fi
    sleep 0.5
  done
  curl -s "$URL/health"; echo; "${DC[@]}" logs --no-color --tail 20
  log "FAIL: $1"; exit 1
}
ALL4="all(h.get(n) for n in ['prefill-1', 'prefill-2', 'decode-1', 'decode-2'])"
until_workers "the cluster never had 2 prefill and 2 decode workers healthy" "$ALL4" 300
log "up: $("${DC[@]}" ps --services | sort | tr '\n' ' ')"

# The reference: the glibc build, colocated, on the host.
MODEL=$("$GLIBC" model fetch)
"$GLIBC" up --colocated --model "$MODEL" --port $COLO_PORT --served-model-name SmolLM2-135M-Instruct \
  > "$WORK/colocated.log" 2>&1 &
COLO=$!
for _ in $(seq 1 600); do curl -sf http://127.0.0.1:$COLO_PORT/health >/dev/null && break; sleep 0.2; done

# 1. The official client, then seeded answers against the colocated glibc build.
python3 scripts/smoke/openai_python.py "$URL/v1" > "$WORK/smoke.log" || { cat "$WORK/smoke.log"; log "FAIL: openai smoke"; exit 1; }
python3 $HERE/seeded_requests.py "$URL" > "$WORK/compose.json"
python3 $HERE/seeded_requests.py http://127.0.0.1:$COLO_PORT > "$WORK/colocated.json"
if ! cmp -s "$WORK/compose.json" "$WORK/colocated.json"; then
  diff "$WORK/compose.json" "$WORK/colocated.json" | head -20
  log "FAIL: the compose cluster's answers differ from the glibc build's colocated ones"; exit 1
fi
TCP=$(curl -sf "$URL/metrics" | awk '/^tandem_kv_transfers_total\{transport="tcp"\}/ {print $2}')
[ "${TCP:-0}" -gt 0 ] || { log "FAIL: no KV moved over TCP"; exit 1; }
log "ok: openai client smoke; 12 seeded requests identical to the glibc colocated build ($(sha256sum < "$WORK/colocated.json" | cut -c1-12)); $TCP KV transfers over TCP"

# 2. docker kill the decode container that holds the stream.
python3 $HERE/stream_fault.py http://127.0.0.1:$COLO_PORT > "$WORK/stream-colocated.json"
KILL="name=\$(curl -s $URL/health | python3 -c 'import json,sys; print(next(w[\"addr\"].split(\":\")[0] for w in json.load(sys.stdin)[\"workers\"] if w[\"role\"] == \"decode\" and w[\"inflight\"] > 0))'); docker kill \$(docker ps -q --filter label=com.docker.compose.project=$P --filter label=com.docker.compose.service=\$name) > /dev/null; echo \$name > $WORK/killed"
python3 $HERE/stream_fault.py "$URL" "$KILL" > "$WORK/stream-compose.json"
if ! cmp -s "$WORK/stream-compose.json" "$WORK/stream-colocated.json"; then
  diff "$WORK/stream-compose.json" "$WORK/stream-colocated.json" | head; log "FAIL: the stream changed across docker kill"; exit 1
fi
KILLED=$(cat "$WORK/killed")
RESUMED=$(curl -sf "$URL/metrics" | awk '/^tandem_stream_resumes_total/ {print $2}')
[ "${RESUMED:-0}" -ge 1 ] || { log "FAIL: no stream was resumed"; exit 1; }
"${DC[@]}" start "$KILLED" >/dev/null
until_workers "$KILLED did not rejoin after docker start" "$ALL4" 120
log "ok: docker kill $KILLED mid-stream: the stream resumed on the other decode worker, text identical; $KILLED rejoined"

# 3. Cut a prefill container off the network, then reconnect it.
docker network disconnect ${P}_internal "$(container prefill-1)"
t0=$(date +%s)
python3 $HERE/seeded_requests.py "$URL" > "$WORK/cut.json"
cmp -s "$WORK/cut.json" "$WORK/colocated.json" || { log "FAIL: answers changed with prefill-1 cut off"; exit 1; }
until_workers "prefill-1 still looks healthy while cut off" "not h.get('prefill-1') and h.get('prefill-2')" 60
RETRIES=$(curl -sf "$URL/metrics" | awk '/^tandem_prefill_retries_total/ {print $2}')
log "ok: prefill-1 disconnected: 12 requests served, answers unchanged ($(( $(date +%s) - t0 )) s, ${RETRIES:-0} prefill retries)"
docker network connect --alias prefill-1 ${P}_internal "$(container prefill-1)"
until_workers "prefill-1 did not rejoin after reconnecting" "$ALL4" 120
python3 $HERE/seeded_requests.py "$URL" | cmp -s - "$WORK/colocated.json" || { log "FAIL: answers changed after the rejoin"; exit 1; }
log "ok: prefill-1 reconnected: healthy in the routing table again, answers unchanged"

# 4. docker compose down with streams open: the scheduler stops first (it depends on the
# workers) and drains its streams onto workers still running.
python3 $HERE/drain.py "$URL/v1" "${DC[*]} down -t 60 > $WORK/down.log 2>&1" 6 \
  || { cat "$WORK/down.log"; log "FAIL: compose down lost a stream"; exit 1; }
log "ok: compose down drained"
log "passed"
