#!/usr/bin/env bash
# Tandem's image (deploy/Containerfile), built by deploy/build-image.sh with the default model
# baked in: `--version` runs; the image runs as a non-root user and so do all its processes
# (`tandem up`: scheduler, prefill and decode workers); `tandem up` in the container (the static
# musl build) gives, byte for byte, the seeded outputs the glibc build gives on the host;
# `docker stop` ends it cleanly.
#
# usage: scripts/check/image.sh [TAG] [GLIBC_TANDEM]   (default target/release/tandem)
set -euo pipefail
cd "$(dirname "$0")/../.."
TAG=${1:-tandem:ci}
NAME=tandem-ci-image
PORT=18450
HOST_PORT=18451
OUT=$(mktemp -d)
GLIBC=${2:-target/release/tandem}
[ -x "$GLIBC" ] || cargo build --release -p tandem
HOST_BIN=$(realpath "$GLIBC")
ldd "$HOST_BIN" >/dev/null 2>&1 || { echo "$HOST_BIN is not the glibc build (static)"; exit 1; }
bash deploy/build-image.sh --model default "$TAG"
docker run --rm "$TAG" --version
user=$(docker image inspect -f '{{.Config.User}}' "$TAG")
[ "$user" = "65532:65532" ] || { echo "the image runs as '$user', not 65532"; exit 1; }
echo "image: $(( $(docker image inspect -f '{{.Size}}' "$TAG") / 1048576 )) MiB"

docker rm -f $NAME >/dev/null 2>&1 || true
HOST_PID=
cleanup() {
  docker rm -f $NAME >/dev/null 2>&1 || true
  [ -n "$HOST_PID" ] && { kill -TERM "$HOST_PID" 2>/dev/null || true; wait "$HOST_PID" 2>/dev/null || true; }
  rm -rf "$OUT"
}
trap cleanup EXIT
wait_up() {
  for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0; sleep 0.5; done
  echo "nothing serves on port $1"; return 1
}
# `tandem up` as the image's default command runs it (1 prefill + 1 decode worker, KV over shared
# memory inside the container), under the default model's name (the file is model.gguf).
docker run -d --name $NAME -p 127.0.0.1:$PORT:8000 --shm-size 1g "$TAG" \
  up --host 0.0.0.0 --served-model-name SmolLM2-135M-Instruct >/dev/null
wait_up $PORT || { docker logs $NAME; exit 1; }
# (docker top wants a pid column.)
uids=$(docker top $NAME -eo pid,uid,args | awk 'NR > 1 {print $2}' | sort -u | tr '\n' ' ')
procs=$(docker top $NAME -eo pid,args | grep -c "tandem" || true)
echo "container processes: $procs, uids: $uids"
[ "$uids" = "65532 " ] || { docker top $NAME -eo pid,uid,args; echo "a process runs as another user"; exit 1; }
[ "$procs" -ge 3 ] || { docker top $NAME -eo pid,uid,args; echo "tandem up started no workers"; exit 1; }
python3 scripts/check/seeded_requests.py "http://127.0.0.1:$PORT" > "$OUT/container.json"

"$HOST_BIN" up --port $HOST_PORT --model target/image/models/model.gguf \
  --served-model-name SmolLM2-135M-Instruct > "$OUT/host.log" 2>&1 &
HOST_PID=$!
wait_up $HOST_PORT || { cat "$OUT/host.log"; exit 1; }
python3 scripts/check/seeded_requests.py "http://127.0.0.1:$HOST_PORT" > "$OUT/host.json"
if ! cmp -s "$OUT/container.json" "$OUT/host.json"; then
  diff "$OUT/container.json" "$OUT/host.json" | head -20
  echo "the container's (musl) seeded outputs differ from the glibc build's on the host"; exit 1
fi
echo "seeded outputs: container (musl) = host (glibc) ($(wc -c < "$OUT/host.json") bytes, sha256 $(sha256sum < "$OUT/host.json" | cut -c1-16))"
# A graceful stop: SIGTERM reaches `tandem up` (PID 1), which stops its workers and exits 0.
docker stop -t 30 $NAME >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' $NAME)
[ "$code" = 0 ] || { docker logs $NAME | tail -20; echo "tandem up exited $code on SIGTERM"; exit 1; }
echo "image check passed"
