"""The same model through PyTorch/transformers on the GPU (bf16, transformers' GGUF loader
dequantizes it): 2,000-token prefill, single-stream and batch-64 greedy decode, measured as
`tandem model device-check` measures Tandem. Usage: torch_bench.py MODEL.gguf"""
import os, sys, time

import torch
from transformers import AutoModelForCausalLM

path = sys.argv[1]
try:
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path), dtype=torch.bfloat16
    ).cuda().eval()
except Exception as e:  # report what was possible
    print(f"transformers could not load the GGUF: {type(e).__name__}: {e}")
    sys.exit(0)
vocab = model.config.vocab_size
ids = torch.tensor([[(i * 2654435761 >> 7) % vocab for i in range(2000)]], device="cuda")


def timed(f, reps=3):
    best = float("inf")
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        f()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


with torch.no_grad():
    model(ids[:, :32])
    pf = timed(lambda: model(ids))
    gen = lambda x, n: model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    single = timed(lambda: gen(ids[:, :32], 128), reps=2)
    batch = torch.stack([ids[0, i : i + 32] for i in range(64)])
    b64 = timed(lambda: gen(batch, 64), reps=2)
print(f"| PyTorch {torch.__version__}, transformers bf16 | prefill 2000 tokens {pf * 1e3:.1f} ms "
      f"| decode 1 stream {128 / single:.0f} tok/s | decode batch 64 {64 * 64 / b64:.0f} tok/s |")
