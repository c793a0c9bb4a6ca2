#!/usr/bin/env bash
# Fuzzes a running `tandem up` against its own /openapi.json with schemathesis (PyPI): requests
# generated from the document (valid and invalid bodies, boundary values, every route), every
# response checked against it. Fails on any server error (5xx but a 503 with Retry-After, which
# the document allows) and on any response the document does not describe (status code,
# content type, headers, body schema).
#
# The cluster is the default one (1 prefill + 1 decode worker) with `--max-model-len 64`, so
# that no generated request generates long (CI's time).
#
# usage: scripts/check/openapi_fuzz.sh TANDEM_BINARY [MAX_EXAMPLES]   (default 50 per operation)
set -euo pipefail
cd "$(dirname "$0")/../.."
T=${1:?usage: openapi_fuzz.sh TANDEM_BINARY [MAX_EXAMPLES]}
N=${2:-50}
PORT=18190
command -v st >/dev/null 2>&1 || python3 -m pip install -q --disable-pip-version-check schemathesis
LOG=$(mktemp)
$T up --port $PORT --max-model-len 64 > "$LOG" 2>&1 &
PID=$!
trap 'kill -TERM $PID 2>/dev/null || true; wait $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $PID 2>/dev/null || { cat "$LOG"; exit 1; }
  sleep 0.5
done
curl -sf "http://127.0.0.1:$PORT/openapi.json" | python3 -c 'import json,sys; d=json.load(sys.stdin); print("openapi", d["openapi"], len(d["paths"]), "paths")'
st run "http://127.0.0.1:$PORT/openapi.json" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance \
  --max-examples "$N" --seed 20261204 --request-timeout 60 --workers 2 \
  --phases examples,coverage,fuzzing --suppress-health-check all
kill -0 $PID 2>/dev/null || { echo "tandem up died under the fuzzing:"; cat "$LOG"; exit 1; }
