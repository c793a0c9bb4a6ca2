#!/usr/bin/env bash
# The AArch64 build, cross-compiled here and run under qemu-user:
#  1. the kernels' property tests at every ARM level the emulated CPU has (qemu's default
#     CPU has FEAT_DotProd and FEAT_I8MM: scalar, neon, dotprod, i8mm), then on a Cortex-A53
#     (neither: the run-time check must fall back to neon);
#  2. the default model through `tandem model generate`, greedy and seeded, w4a8 and W8A8, at
#     every ARM level in turn (TANDEM_SIMD): the tokens and a hash of every step's logits must
#     equal the x86-64 build's — bit-identical, not merely close.
# Under an emulator only correctness counts: ARM speed is not measured here.
# Usage: scripts/check/aarch64.sh [x86-64 tandem binary]
set -euo pipefail
cd "$(dirname "$0")/../.."
X86=${1:-target/release/tandem}
T=aarch64-unknown-linux-gnu
if ! command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || ! command -v qemu-aarch64 >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
fi
rustup target list --installed | grep -qx $T || rustup target add $T
# The linker and the qemu runner come from .cargo/config.toml. No debug info: the cross
# build links faster, and nothing here is profiled.
export CARGO_PROFILE_RELEASE_DEBUG=0
QEMU=(qemu-aarch64 -L /usr/aarch64-linux-gnu)

echo "--- kernels: property tests under qemu (default CPU: every ARM level)"
cargo test --release -q --target $T -p kernels
BIN=$(cargo test --release -q --target $T -p kernels --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "kernels" and m["profile"]["test"] and m.get("executable"):
        print(m["executable"])')
echo "--- kernels: property tests on an emulated Cortex-A53 (no dotprod)"
QEMU_CPU=cortex-a53 "${QEMU[@]}" "$BIN" -q --test-threads 2

echo "--- tandem for $T"
cargo build --release -q --target $T -p tandem
ARM=(env "${QEMU[@]}" target/$T/release/tandem)
MODEL=$("$X86" model fetch)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

# Fields that must be equal: mode, tokens, logits hash (the level and arch differ by design).
key() { python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l); print(m["mode"], m["tokens"], m["logits_fnv"])'; }

check() { # name, x86 level, arm level, generate flags...
  local name=$1 xl=$2 al=$3; shift 3
  TANDEM_SIMD=$xl "$X86" model generate --model "$MODEL" --threads 2 "$@" 2>/dev/null > "$OUT/x86.jsonl"
  TANDEM_SIMD=$al "${ARM[@]}" model generate --model "$MODEL" --threads 2 "$@" 2>/dev/null > "$OUT/arm.jsonl"
  local simd
  simd=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["simd"])' "$OUT/arm.jsonl")
  if [ "$simd" != "$al" ]; then echo "FAIL $name: asked for $al, ran $simd"; exit 1; fi
  if ! diff <(key < "$OUT/x86.jsonl") <(key < "$OUT/arm.jsonl"); then
    echo "FAIL $name: aarch64 ($al) differs from x86-64 ($xl)"; exit 1
  fi
  echo "ok   $name: aarch64 $al = x86-64 $xl ($(key < "$OUT/arm.jsonl" | awk '{print $NF}' | tr '\n' ' '))"
}

echo "--- the default model: aarch64 against x86-64, bit for bit"
check "w4a8 i8mm" avx2 i8mm
check "w4a8 dotprod" avx2 dotprod
check "w4a8 neon" avx2 neon --max-tokens 8
check "int8 i8mm" avx2 i8mm --precision int8 --max-tokens 8
check "int8 dotprod" avx2 dotprod --precision int8 --max-tokens 8
check "int8 neon" avx2 neon --precision int8 --max-tokens 8
# The scalar level is slow under emulation (~100x): a short run.
check "w4a8 scalar" scalar scalar --max-tokens 2 --prompt "Hi"
# Run-time detection: each emulated CPU runs the highest level it has.
for cpu_level in cortex-a53:neon neoverse-n1:dotprod max:i8mm; do
  QEMU_CPU=${cpu_level%%:*} "${ARM[@]}" model generate --model "$MODEL" --max-tokens 1 --prompt Hi 2>/dev/null > "$OUT/cpu.jsonl"
  simd=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["simd"])' "$OUT/cpu.jsonl")
  [ "$simd" = "${cpu_level#*:}" ] || { echo "FAIL: an emulated ${cpu_level%%:*} ran $simd, not ${cpu_level#*:}"; exit 1; }
  echo "ok   detection: ${cpu_level%%:*} -> $simd"
done

echo "--- an edge bundle exported on x86-64 for aarch64 serves under qemu, as on x86-64"
"$X86" export-edge "$MODEL" --out "$OUT/bundle" --budget-mib 160 --target aarch64 --context 512 2>/dev/null
ask() { # port -> the greedy answer's token ids, as text
  python3 - "$1" <<'PY'
import json, sys, urllib.request
port = sys.argv[1]
body = {"model": "SmolLM2-135M-Instruct", "prompt": "The three primary colors are", "max_tokens": 12,
        "temperature": 0, "logprobs": 1}
req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                             {"Content-Type": "application/json"})
r = json.load(urllib.request.urlopen(req, timeout=600))
print(json.dumps([r["choices"][0]["text"], r["choices"][0]["logprobs"]["token_logprobs"]]))
PY
}
serve_and_ask() { # port, command... -> the answer
  local port=$1; shift
  "$@" edge "$OUT/bundle" --port "$port" > "$OUT/edge-$port.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && break; sleep 0.2; done
  ask "$port"
  kill -TERM $pid; wait $pid || true
}
x86=$(serve_and_ask 18791 "$X86")
arm=$(serve_and_ask 18792 "${ARM[@]}")
[ "$x86" = "$arm" ] || { echo "FAIL: the bundle under qemu answered $arm, on x86-64 $x86"; exit 1; }
echo "ok   bundle for aarch64: the same text and log-probabilities under qemu as on x86-64: $arm"
