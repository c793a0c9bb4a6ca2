"""Opens N seeded streams with the official OpenAI client, runs a command (through the shell)
once every stream has delivered its first token — e.g. `docker compose down` — and reads the
streams to their end: each must finish (finish_reason "length", max_tokens tokens) with no error,
and the command must exit 0. Prints a line of figures."""
import subprocess
import sys
import threading
import time

from openai import OpenAI

base, command = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 6
MAX_TOKENS = 48
client = OpenAI(base_url=base, api_key="unused", timeout=300, max_retries=0)
started = threading.Barrier(n + 1)
results = [None] * n


def stream(i):
    tokens, finish = 0, None
    try:
        s = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", seed=100 + i, temperature=0.7, max_tokens=MAX_TOKENS,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": f"Count slowly from {i} to one hundred."}])
        first = True
        usage = None
        for chunk in s:
            if chunk.usage:
                usage = chunk.usage
            for c in chunk.choices:
                finish = c.finish_reason or finish
            if first and chunk.choices:
                first = False
                started.wait(timeout=300)
        results[i] = ("ok", finish, usage.completion_tokens if usage else None)
    except Exception as e:  # noqa: BLE001 — any failure is the finding
        results[i] = ("error", repr(e), None)
        if started.n_waiting and not started.broken:
            started.abort()


threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
for t in threads:
    t.start()
started.wait(timeout=300)
t0 = time.time()
rc = subprocess.run(command, shell=True).returncode
took = time.time() - t0
for t in threads:
    t.join()
bad = [(i, r) for i, r in enumerate(results) if r is None or r[0] != "ok" or r[1] != "length" or r[2] != MAX_TOKENS]
if rc != 0:
    sys.exit(f"the command exited {rc}")
if bad:
    sys.exit(f"{len(bad)} of {n} streams did not complete: {bad}")
print(f"{n} streams open when the command ran; all completed ({MAX_TOKENS} tokens each); the command took {took:.1f} s")
