#!/usr/bin/env bash
# Writes a new cluster secret (256 random bits, hex) for deploy/compose.yaml: mode 0600, owned
# by user 65532, as which Tandem's containers run (compose mounts the file as it is).
#
# usage: deploy/compose-secret.sh [FILE]      (default: deploy/cluster-secret)
set -euo pipefail
FILE=${1:-$(dirname "$0")/cluster-secret}
[ -e "$FILE" ] && { echo "$FILE exists; remove it first" >&2; exit 1; }
(umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$FILE")
chown 65532:65532 "$FILE" 2>/dev/null || echo "note: could not chown $FILE to 65532 (run as root, or chmod 644 it)" >&2
echo "$FILE"
