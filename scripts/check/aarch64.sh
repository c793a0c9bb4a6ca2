#!/usr/bin/env bash
# The AArch64 build, cross-compiled here and run under qemu-user:
#  1. the kernels' property tests at every ARM level the emulated CPU has (qemu's default
#     CPU has FEAT_DotProd: scalar, neon, dotprod), then on a Cortex-A53 (no dotprod: the
#     run-time check must fall back to neon);
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
check "w4a8 dotprod" avx2 dotprod
check "w4a8 neon" avx2 neon
check "int8 dotprod" avx2 dotprod --precision int8
check "int8 neon" avx2 neon --precision int8 --max-tokens 8
# The scalar level is slow under emulation (~100x): a short run.
check "w4a8 scalar" scalar scalar --max-tokens 2 --prompt "Hi"
# Run-time detection: a CPU without dotprod runs neon.
QEMU_CPU=cortex-a53 "${ARM[@]}" model generate --model "$MODEL" --max-tokens 1 --prompt Hi 2>/dev/null > "$OUT/a53.jsonl"
simd=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["simd"])' "$OUT/a53.jsonl")
[ "$simd" = neon ] || { echo "FAIL: a Cortex-A53 ran $simd, not neon"; exit 1; }
echo "ok   detection: Cortex-A53 -> neon, qemu max -> dotprod"
