#!/usr/bin/env python3
"""Produces Tandem's golden fixtures from llama.cpp, the independent reference.

llama.cpp runs an F32 copy of the default model (every tensor dequantized exactly, f32 KV
cache), so it computes the same exact arithmetic Tandem's f32 path does; on the Q4_1 file it
would quantize activations to 8 bits and drift by up to ~2.6 logits.

usage: scripts/golden/make_fixtures.py          (writes engine/tests/fixtures/*.json)
needs: llama.cpp built by ../shared/tools/build-llama-cpp.sh (its bin dir is found in
       ~/.cache/tandem/llama.cpp or $LLAMA_CPP_PREFIX), and the default model (cargo run --release -- model fetch).
The Python bindings come from the same llama-cpp-python sdist the build script unpacked.
"""
import json, os, random, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "engine" / "tests" / "fixtures"
PREFIX = Path(os.environ.get("LLAMA_CPP_PREFIX", Path.home() / ".cache" / "tandem" / "llama.cpp"))
BIN = PREFIX / "build" / "bin"
os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(BIN))
sys.path.insert(0, str(PREFIX / "src"))
import numpy as np  # noqa: E402
import llama_cpp  # noqa: E402
import jinja2  # noqa: E402

cache = Path(os.environ.get("TANDEM_MODEL_DIR", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tandem" / "models"))
Q41 = cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
F32 = cache / "SmolLM2-135M-Instruct.F32.gguf"
if not F32.exists():
    subprocess.run([str(BIN / "llama-quantize"), "--allow-requantize", str(Q41), str(F32), "F32"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

WINDOW = 512
llm = llama_cpp.Llama(str(F32), n_ctx=WINDOW, n_batch=WINDOW, n_ubatch=WINDOW, logits_all=True, verbose=False,
                      n_threads=os.cpu_count(), type_k=0, type_v=0)  # GGML_TYPE_F32 KV cache


def tok(text, special=True):
    return llm.tokenize(text.encode(), add_bos=False, special=special)


def logits_for(tokens):
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


# 1. Tokenizer corpus: hand-picked hard cases plus seeded random mixes (>= 200 strings).
hand = [
    "", " ", "  ", "\n", "\n\n", " \n \n", "\t", "\t\t x", "Hello world", " Hello world", "  Hello  world  ",
    "hello\n\nworld", "Hello, world! How's it going?", "I'm, you're, they've, we'll, she'd, it's",
    "12345", "3.14159", "1,000,000", "2026-11-24", "x = 42 + 17*3", "version 1.2.3-rc4", "0x1F600",
    "🎉", "🎉🎉 party", "👩‍👩‍👧‍👦 family", "I ❤️ Rust", "naïve café résumé", "Ünïcödé ñ ß", "日本語のテキスト",
    "中文文本，标点。", "한국어 텍스트", "Ελληνικά γράμματα", "русский текст", "עברית", "العربية",
    "हिन्दी", "ไทย", "def f(x):\n    return x * 2\n", "fn main() {\n    println!(\"hi\");\n}",
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }", "<div class=\"x\">&amp;</div>", "SELECT * FROM t WHERE id=1;",
    "   leading spaces", "trailing spaces   ", "mixed \t tabs \t and spaces", "line1\r\nline2\r\n",
    "URL: https://example.com/path?q=1&r=2", "email@example.com", "C:\\Users\\name\\file.txt",
    "$100.00 & 50% off!!!", "((nested (parens)))", "a" * 50, "ab" * 30, " " * 17 + "x", "\n" * 5 + "end",
    "<|im_start|>user\nHi<|im_end|>", "<|im_start|>assistant\n", "text<|endoftext|>more", "<|im_end|><|im_end|>",
    "CamelCaseIdentifier snake_case_name kebab-case-name", "ALL CAPS SENTENCE HERE", "Don't DON'T don'T",
    "’curly quotes’ “double”", "em—dash en–dash", "…ellipsis…", "©®™", "½ ¾ ⅓", "①②③", "٣٤٥ arabic digits",
    "math: ∑ ∫ √ ∞ ≠ ≤", "arrows → ← ↑ ↓", "\u00a0non-breaking\u00a0space", "zero\u200bwidth",
    "tab\tseparated\tvalues", "a\n\tb\n\t\tc", "JSON: {\"key\": [1, 2, {\"n\": null}]}", "    indented code",
    "The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs!",
]
pieces = ["the", " the", "The", " quick", "fox", " 123", "4567", " ", "  ", "\n", "\n\n", "\t", "🎉", "é", "日本",
          "'s", "'ll", " don't", "x=1", "();", "{}", "#!", "--", "...", " ~", "$", "%d", "ß", "Ω", "\u3000",
          " 0", "9", "a1b2", "CAPS", "_", "__init__", "->", "=>", "==", "!=", "<", ">", "|", "\\n", "\"", "'"]
rng = random.Random(20261124)
mixed = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(220 - len(hand))]
corpus = [{"text": t, "ids": tok(t)} for t in hand + mixed]
(FIX / "tokenizer_corpus.json").write_text(json.dumps(corpus, ensure_ascii=False, indent=0))
print(f"tokenizer corpus: {len(corpus)} strings")

# 2. Logits of a 500-token prompt: per position argmax, top-2 gap, top-16, and 256 probe ids.
heldout = (FIX / "heldout.txt").read_text()
htoks = tok(heldout, special=False)
prompt = htoks[:500]
L = logits_for(prompt)
probe = sorted(random.Random(7).sample(range(L.shape[1]), 256))
rows = []
for p in range(len(prompt)):
    row = L[p]
    order = np.argsort(-row, kind="stable")
    rows.append({
        "argmax": int(order[0]),
        "gap": float(row[order[0]] - row[order[1]]),
        "top": [[int(i), float(row[i])] for i in order[:16]],
        "probe": [float(row[i]) for i in probe],
    })
(FIX / "golden_logits.json").write_text(json.dumps({"tokens": prompt, "probe_ids": probe, "positions": rows}))
print(f"logits: {len(prompt)} positions")

# 3. Greedy continuations, raw and chat-templated (template rendered by Jinja2, independently).
template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(llm.metadata["tokenizer.chat_template"])
raw_prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
               "1, 2, 3, 4, 5,"]
chats = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity in one sentence.",
         "List three primary colors."]
greedy = []
for i, text in enumerate(raw_prompts + chats):
    is_chat = i >= len(raw_prompts)
    rendered = template.render(messages=[{"role": "user", "content": text}], add_generation_prompt=True,
                               bos_token="<|im_start|>", eos_token="<|im_end|>") if is_chat else text
    ids = tok(rendered)
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(32):
        nxt = int(np.argmax(np.array(llm.scores[llm.n_tokens - 1])))
        out.append(nxt)
        llm.eval([nxt])
    greedy.append({"chat": is_chat, "message": text, "rendered": rendered, "prompt_ids": ids, "continuation": out})
(FIX / "greedy.json").write_text(json.dumps(greedy, ensure_ascii=False, indent=1))
print(f"greedy: {len(greedy)} prompts x 32 tokens")

# 4. Perplexity over non-overlapping 512-token windows of the held-out text (every token after
#    a window's first is scored).
n_win = len(htoks) // WINDOW
wins = []
for w in range(n_win):
    t = htoks[w * WINDOW:(w + 1) * WINDOW]
    lg = logits_for(t).astype(np.float64)
    lse = np.log(np.exp(lg - lg.max(axis=1, keepdims=True)).sum(axis=1)) + lg.max(axis=1)
    nll = float(sum(lse[i] - lg[i, t[i + 1]] for i in range(WINDOW - 1)))
    wins.append({"nll_sum": nll, "count": WINDOW - 1})
total = sum(w["nll_sum"] for w in wins) / sum(w["count"] for w in wins)
(FIX / "perplexity.json").write_text(json.dumps({"window": WINDOW, "tokens": htoks[: n_win * WINDOW], "windows": wins,
                                                 "ppl": float(np.exp(total))}))
print(f"perplexity: {n_win} windows, {n_win * WINDOW} tokens, ppl {np.exp(total):.4f}")
