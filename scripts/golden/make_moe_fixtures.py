#!/usr/bin/env python3
"""Golden fixtures for Tandem's mixture-of-experts forward pass, from llama.cpp.

`tandem model make-moe` makes a random MoE from the default model (the spec below: 8 experts,
top-2, a skewed router, the first 6 layers); llama.cpp runs an exact F32 copy of it (its `llama`
architecture with `llama.expert_count`: Mixtral's routing), with an f32 KV cache, so it computes
the same arithmetic as Tandem's f32 path. engine/tests/moe_golden.rs makes the same model
in-process, checks that its bytes hash to what is recorded here, and compares.

usage: scripts/golden/make_moe_fixtures.py [target/release/tandem]
needs: llama.cpp built by ../shared/tools/build-llama-cpp.sh (and its llama_cpp bindings' pip needs:
       numpy, diskcache), pip's xxhash, and target/release/tandem built.
"""
import json, os, subprocess, sys, tempfile
from pathlib import Path

import xxhash

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "engine" / "tests" / "fixtures"
PREFIX = Path(os.environ.get("LLAMA_CPP_PREFIX", Path.home() / ".cache" / "tandem" / "llama.cpp"))
BIN = PREFIX / "build" / "bin"
os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(BIN))
sys.path.insert(0, str(PREFIX / "src"))
import numpy as np  # noqa: E402
import llama_cpp  # noqa: E402

TANDEM = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "target" / "release" / "tandem")
# Must match SPEC in engine/tests/moe_golden.rs.
SPEC = {"experts": 8, "top_k": 2, "skew": 0.6, "seed": 7, "layers": 6}
WINDOW = 512

tmp = Path(tempfile.mkdtemp())
moe, f32 = tmp / "moe.gguf", tmp / "moe.F32.gguf"
subprocess.run([TANDEM, "model", "make-moe", "--out", str(moe), "--num-experts", str(SPEC["experts"]),
                "--top-k", str(SPEC["top_k"]), "--skew", str(SPEC["skew"]), "--seed", str(SPEC["seed"]),
                "--layers", str(SPEC["layers"])], check=True)
digest = xxhash.xxh3_64_intdigest(moe.read_bytes())
subprocess.run([TANDEM, "model", "export-f32", str(moe), str(f32)], check=True)

llm = llama_cpp.Llama(str(f32), n_ctx=WINDOW, n_batch=WINDOW, n_ubatch=WINDOW, logits_all=True, verbose=False,
                      n_threads=os.cpu_count(), type_k=0, type_v=0)  # GGML_TYPE_F32 KV cache


def tok(text, special=True):
    return llm.tokenize(text.encode(), add_bos=False, special=special)


def logits_for(tokens):
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


heldout = (FIX / "heldout.txt").read_text()
htoks = tok(heldout, special=False)
prompt = htoks[:500]
L = logits_for(prompt)
probe = sorted(__import__("random").Random(7).sample(range(L.shape[1]), 64))
rows = []
for p in range(len(prompt)):
    row = L[p]
    order = np.argsort(-row, kind="stable")
    rows.append({"argmax": int(order[0]), "gap": float(row[order[0]] - row[order[1]]),
                 "top": [[int(i), float(row[i])] for i in order[:16]], "probe": [float(row[i]) for i in probe]})

greedy = []
for text in ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
             "1, 2, 3, 4, 5,"]:
    ids = tok(text)
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(32):
        nxt = int(np.argmax(np.array(llm.scores[llm.n_tokens - 1])))
        out.append(nxt)
        llm.eval([nxt])
    greedy.append({"text": text, "prompt_ids": ids, "continuation": out})

wins = []
for w in range(len(htoks) // WINDOW):
    t = htoks[w * WINDOW:(w + 1) * WINDOW]
    lg = logits_for(t).astype(np.float64)
    lse = np.log(np.exp(lg - lg.max(axis=1, keepdims=True)).sum(axis=1)) + lg.max(axis=1)
    wins.append(float(sum(lse[i] - lg[i, t[i + 1]] for i in range(WINDOW - 1))))
ppl = float(np.exp(sum(wins) / (len(wins) * (WINDOW - 1))))

(FIX / "moe_golden.json").write_text(json.dumps({
    "spec": SPEC, "xxh3": f"{digest:016x}", "tokens": prompt, "probe_ids": probe, "positions": rows,
    "greedy": greedy, "window": WINDOW, "ppl_tokens": htoks[: len(wins) * WINDOW], "ppl": ppl}))
print(f"moe fixtures: xxh3 {digest:016x}, {len(prompt)} positions, {len(greedy)} greedy prompts, "
      f"{len(wins)} windows, ppl {ppl:.4f}")
