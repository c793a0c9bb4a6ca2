"""Sends a fixed set of seeded requests to an OpenAI-compatible server and prints the answers
as JSON (the fields that must not depend on the build, the topology or the batch)."""
import json
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

base = sys.argv[1]


def post(path, body):
    req = urllib.request.Request(base + path, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)


QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Name three prime numbers.", "Why is the sky blue?"]


def request(i):
    q = QUESTIONS[i % len(QUESTIONS)]
    if i % 3 == 0:
        r = post("/v1/chat/completions", {"model": "SmolLM2-135M-Instruct", "seed": 1000 + i,
                 "temperature": 0.8, "max_tokens": 40,
                 "messages": [{"role": "user", "content": q}]})
        return {"i": i, "text": r["choices"][0]["message"]["content"], "usage": r["usage"]["completion_tokens"]}
    if i % 3 == 1:
        r = post("/v1/chat/completions", {"model": "SmolLM2-135M-Instruct", "temperature": 0,
                 "max_tokens": 40, "logprobs": True, "top_logprobs": 2,
                 "messages": [{"role": "user", "content": q}]})
        c = r["choices"][0]
        return {"i": i, "text": c["message"]["content"],
                "logprobs": [(t["token"], t["logprob"]) for t in c["logprobs"]["content"]]}
    r = post("/v1/completions", {"model": "SmolLM2-135M-Instruct", "seed": 7 * i, "temperature": 0.8,
             "top_p": 0.9, "max_tokens": 40, "prompt": "Once upon a time, " + q})
    return {"i": i, "text": r["choices"][0]["text"]}


with ThreadPoolExecutor(4) as pool:
    print(json.dumps(list(pool.map(request, range(12))), indent=1))
