#!/usr/bin/env bash
# Builds a FROM scratch etcd image from the host's Debian etcd-server: the binary, the shared
# libraries `ldd` lists (the C library and its loader), /etc/passwd naming user 65532.
#
# usage: deploy/etcd/build-image.sh [TAG]      (default TAG: tandem-etcd:latest)
set -euo pipefail
cd "$(dirname "$0")/../.."
TAG=${1:-tandem-etcd:latest}
if ! command -v etcd >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq etcd-server
fi
ETCD=$(command -v etcd)
STAGE=target/image-etcd
rm -rf $STAGE && mkdir -p $STAGE/rootfs/usr/bin $STAGE/rootfs/etc
cp "$ETCD" $STAGE/rootfs/usr/bin/etcd
# Every library the binary loads, at the path the loader looks for it.
ldd "$ETCD" | grep -o '/[^ ]*' | sort -u | while read -r lib; do
  mkdir -p "$STAGE/rootfs$(dirname "$lib")"
  cp -L "$lib" "$STAGE/rootfs$lib"
done
cp deploy/image/rootfs/etc/passwd deploy/image/rootfs/etc/group $STAGE/rootfs/etc/
docker build -q -f deploy/etcd/Containerfile -t "$TAG" $STAGE
echo "$TAG"
