"""Streams one seeded chat completion from an OpenAI-compatible server and prints its text.
With a command as the second argument, runs it (through the shell) once the stream has
delivered FAULT_AFTER chunks — e.g. kill -9 the decode worker mid-stream — and keeps reading:
the text must come out the same as a run without the fault."""
import json
import os
import subprocess
import sys
import urllib.request

base = sys.argv[1]
fault = sys.argv[2] if len(sys.argv) > 2 else None
after = int(os.environ.get("FAULT_AFTER", "12"))

body = {"model": "SmolLM2-135M-Instruct", "seed": 4242, "temperature": 0.8, "max_tokens": 160,
        "stream": True, "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]}
req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                             {"Content-Type": "application/json"})
text, chunks, finish = [], 0, None
with urllib.request.urlopen(req, timeout=600) as r:
    for line in r:
        line = line.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        ev = json.loads(line[6:])
        if "error" in ev:
            sys.exit(f"stream failed: {ev['error']}")
        for c in ev.get("choices", []):
            text.append(c["delta"].get("content") or "")
            finish = c.get("finish_reason") or finish
        chunks += 1
        if fault and chunks == after:
            subprocess.run(fault, shell=True, check=True)
            print(f"fault injected after {chunks} chunks", file=sys.stderr)
if fault and chunks < after:
    sys.exit(f"the stream ended after {chunks} chunks, before the fault")
print(json.dumps({"text": "".join(text), "finish_reason": finish}))
