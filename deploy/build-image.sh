#!/usr/bin/env bash
# Builds Tandem's image: the static musl binary on the host, then `docker build` of
# deploy/Containerfile from the repository root (no base image is pulled; nothing compiles in
# Docker).
#
# usage: deploy/build-image.sh [--model FILE] [TAG]      (default TAG: tandem:latest)
#   --model FILE   bake FILE in as /models/model.gguf (default: none; mount one at run time)
#   --model default  bake in the default model (SmolLM2-135M-Instruct, fetched and verified)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=
if [ "${1:-}" = --model ]; then MODEL=$2; shift 2; fi
TAG=${1:-tandem:latest}
TARGET=x86_64-unknown-linux-musl
rustup target list --installed | grep -qx $TARGET || rustup target add $TARGET
# etcd-client's TLS (ring) compiles C for the target: musl's gcc wrapper.
command -v musl-gcc >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq musl-tools; }
# etcd-client's build script compiles its .proto files with protoc.
command -v protoc >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq protobuf-compiler; }
# etcd discovery built in: the compose cluster and Kubernetes manifests use it.
# No debug info: it is stripped below anyway, and it is a good share of the build's time.
CARGO_PROFILE_RELEASE_DEBUG=0 cargo build --release --target $TARGET -p tandem --features etcd
BIN=target/$TARGET/release/tandem
# Static: no interpreter, no shared libraries.
if file "$BIN" 2>/dev/null | grep -q "dynamically linked"; then echo "$BIN is not static" >&2; exit 1; fi
rm -rf target/image && mkdir -p target/image/models
strip -o target/image/tandem "$BIN"
case "$MODEL" in
  "") ;;
  default) cp "$("$BIN" model fetch)" target/image/models/model.gguf ;;
  *) cp "$MODEL" target/image/models/model.gguf ;;
esac
docker build -q -f deploy/Containerfile -t "$TAG" .
echo "$TAG"
