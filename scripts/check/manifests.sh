#!/usr/bin/env bash
# The deployment files, checked offline: every Kubernetes overlay renders (`kubectl kustomize`)
# and is valid against the Kubernetes API schemas, strictly (PyPI kubernetes-validate: no
# unknown field anywhere); every flag and environment variable the manifests and the compose
# file pass exists in the --help of the program they run (scripts/check/manifest_flags.py).
#
# usage: scripts/check/manifests.sh [TANDEM_BIN]      (default target/release/tandem)
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-target/release/tandem}
K8S_VERSION=${K8S_VERSION:-1.32.0}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
command -v kubernetes-validate >/dev/null 2>&1 || python3 -m pip install -q --disable-pip-version-check kubernetes-validate
command -v etcd >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq etcd-server; }
for dir in deploy/kubernetes/overlays/*/; do
  name=$(basename "$dir")
  kubectl kustomize "$dir" > "$OUT/$name.yaml"
  kubernetes-validate --strict -k "$K8S_VERSION" --quiet "$OUT/$name.yaml"
  echo "manifests: overlay $name: $(grep -c '^kind:' "$OUT/$name.yaml") objects, valid against Kubernetes $K8S_VERSION (strict)"
done
# The overlay `tandem plan --pods --emit-kustomize` writes (pool sizes, threads, SLO, the cost
# profile as a ConfigMap), planned from a quick profile of this machine.
MODEL=$("$BIN" model fetch 2>/dev/null)
"$BIN" plan profile --quick --threads 1 --model "$MODEL" --out "$OUT/profile.json" 2>/dev/null >/dev/null
"$BIN" plan --pods --profile "$OUT/profile.json" --isl 900-1100:0.25,32-256:0.75 --osl 64 --rate 4 \
  --slo-ttft-ms 3000 --slo-tpot-ms 25 --max-pods 4 --emit-kustomize "$OUT/planned" 2>/dev/null
kubectl kustomize "$OUT/planned" > "$OUT/planned.yaml"
kubernetes-validate --strict -k "$K8S_VERSION" --quiet "$OUT/planned.yaml"
grep -q -- "--slo-tpot-ms=25" "$OUT/planned.yaml" && grep -q "TANDEM_COST_PROFILE" "$OUT/planned.yaml" \
  && grep -q "name: tandem-cost-profile-" "$OUT/planned.yaml" \
  || { echo "manifests: the planned overlay lacks the SLO or the cost profile"; exit 1; }
echo "manifests: planned overlay ($(sed -n 's/^#   plan: //p' "$OUT/planned/kustomization.yaml")): $(grep -c '^kind:' "$OUT/planned.yaml") objects, valid (strict)"
python3 scripts/check/manifest_flags.py "$BIN" "$(command -v etcd)" "$OUT"/*.yaml deploy/compose.yaml
