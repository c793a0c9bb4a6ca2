# Sourced by the bench scripts that drive `tandem up` with `tandem bench`: builds the release
# binary, fetches the model, and defines
#   start FLAGS...  `tandem up` on $PORT in the background, waiting for /health (its log to
#                   $SERVER_LOG where set);
#   stop            its graceful stop (SIGTERM, then wait);
#   bench ARGS...   `tandem bench` against it.
# The caller sets PORT first; T, MODEL and OUT come from here (TANDEM_BIN: another build's
# binary to drive instead of this checkout's, for an A/B of two commits).
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
cargo build --release -q
T=${TANDEM_BIN:-./target/release/tandem}
MODEL=$($T model fetch 2>/dev/null)
OUT=${OUT:-bench-results}
SERVER=

wait_up() {
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && return 0
    sleep 0.5
  done
  echo "server did not come up" >&2; return 1
}
start() { $T up --model "$MODEL" --port "$PORT" "$@" >/dev/null 2>"${SERVER_LOG:-/dev/null}" & SERVER=$!; wait_up; }
stop() { [ -n "$SERVER" ] || return 0; kill -TERM "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; SERVER=; }
trap stop EXIT
bench() { $T bench --base-url "http://127.0.0.1:$PORT" --model SmolLM2-135M-Instruct --tokenizer "$MODEL" --quiet "$@"; }
