"""Abuse of a Tandem OpenAI endpoint, as a hostile or broken client would:

1. slowloris: SOCKETS connections that send half a request's headers and then a byte now and
   then; meanwhile /health is timed (it must answer within 1 s every time);
2. REQUESTS random requests, 32 at a time, half well formed (random but valid parameters,
   few tokens) and half malformed (broken JSON, wrong types, out-of-range values, unknown
   model or route, oversized or non-UTF-8 bodies): no status 5xx but 503 (backpressure) may
   come back, and the server must still be up at the end;
3. the peak resident memory (VmHWM) of the processes named by --pids.

    python3 scripts/check/http_abuse.py http://127.0.0.1:8000 --sockets 1000 --requests 10000 \
        --pids $(pgrep -d, -f 'tandem (up|scheduler|prefill|decode)')

Prints one JSON line of figures; exits 1 when a check fails."""
import argparse
import json
import random
import resource
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

ap = argparse.ArgumentParser()
ap.add_argument("base")
ap.add_argument("--sockets", type=int, default=1000)
ap.add_argument("--hold", type=float, default=15.0, help="seconds the slowloris sockets are held")
ap.add_argument("--requests", type=int, default=10000)
ap.add_argument("--pids", default="")
ap.add_argument("--model", default="SmolLM2-135M-Instruct")
ap.add_argument("--seed", type=int, default=1)
a = ap.parse_args()
rng = random.Random(a.seed)
host, port = a.base.split("//")[1].split(":")
port = int(port.split("/")[0])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
failures = []


def health_latency():
    t = time.monotonic()
    try:
        with urllib.request.urlopen(a.base + "/health", timeout=5) as r:
            r.read()
            ok = r.status == 200
    except Exception as e:  # noqa: BLE001
        ok = False
    return time.monotonic() - t, ok


# 1. slowloris
socks, refused = [], 0
for i in range(a.sockets):
    try:
        s = socket.create_connection((host, port), timeout=2)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        socks.append(s)
    except OSError:
        refused += 1
health = []
end = time.monotonic() + a.hold
while time.monotonic() < end:
    for s in socks:
        try:
            s.send(b"X-Slow: 1\r\n")
        except OSError:
            pass
    health.append(health_latency())
    time.sleep(0.5)
dropped = 0
for s in socks:
    try:
        s.settimeout(0.01)
        if s.recv(1) == b"":
            dropped += 1
    except socket.timeout:
        pass
    except OSError:
        dropped += 1
    s.close()
worst = max(t for t, _ in health)
if not all(ok for _, ok in health) or worst >= 1.0:
    failures.append(f"/health during slowloris: worst {worst:.3f} s, ok {sum(ok for _, ok in health)}/{len(health)}")


# 2. random and malformed requests
def valid():
    chat = rng.random() < 0.5
    body = {"model": a.model, "max_tokens": rng.randint(1, 8)}
    if rng.random() < 0.5:
        body["temperature"] = round(rng.uniform(0, 2), 3)
        body["seed"] = rng.randint(0, 2**63)
    if rng.random() < 0.3:
        body["top_p"] = round(rng.uniform(0.05, 1), 3)
    if rng.random() < 0.2:
        body["stop"] = ["".join(rng.choice("abc .") for _ in range(rng.randint(1, 5)))]
    if rng.random() < 0.2:
        body["n"] = rng.randint(1, 3)
    if rng.random() < 0.2:
        body["stream"] = True
    words = " ".join(rng.choice(["the", "sea", "light", "keeper", "why", "ünï", "🙂"]) for _ in range(rng.randint(1, 40)))
    if chat:
        body["messages"] = [{"role": "user", "content": words}]
        if rng.random() < 0.2:
            body["logprobs"] = True
            body["top_logprobs"] = rng.randint(0, 5)
        return "/v1/chat/completions", json.dumps(body).encode(), "application/json"
    body["prompt"] = words if rng.random() < 0.8 else [words, words[::-1]]
    if rng.random() < 0.2:
        body["logprobs"] = rng.randint(0, 5)
    if rng.random() < 0.1:
        body["echo"] = True
    return "/v1/completions", json.dumps(body).encode(), "application/json"


def malformed():
    path, body, ctype = valid()
    kind = rng.randrange(12)
    d = json.loads(body)
    if kind == 0:
        body = body[: rng.randint(0, len(body) - 1)]
    elif kind == 1:
        d["max_tokens"] = rng.choice([-1, 0, 2**40, "ten", {}, 1.5])
        body = json.dumps(d).encode()
    elif kind == 2:
        d["temperature"] = rng.choice([-1, 1e9, "hot", [], float("nan")]) if rng.random() < 0.8 else 3.5
        body = json.dumps(d).encode()
    elif kind == 3:
        d["model"] = rng.choice(["gpt-4", "", 7, None])
        body = json.dumps(d).encode()
    elif kind == 4:
        d.pop("messages", None)
        d.pop("prompt", None)
        body = json.dumps(d).encode()
    elif kind == 5:
        body = bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
    elif kind == 6:
        body = b"{" * rng.randint(1, 5000)
    elif kind == 7:
        d["stop"] = ["x" * 10000] if rng.random() < 0.5 else ["a"] * 1000
        body = json.dumps(d).encode()
    elif kind == 8:
        d["n"] = rng.choice([0, -3, 10**6])
        body = json.dumps(d).encode()
    elif kind == 9:
        path = rng.choice(["/v1/embeddings", "/v1/chat/completions/x", "/%00", "/v1/models/" + "a" * 5000])
    elif kind == 10:
        ctype = rng.choice(["text/plain", "application/x-www-form-urlencoded", ""])
    else:
        body = json.dumps({"model": a.model, "prompt": "x " * 2_000_000}).encode()  # over the body limit
    return path, body, ctype


def send(i):
    path, body, ctype = valid() if i % 2 == 0 else malformed()
    req = urllib.request.Request(a.base + path, body, {"Content-Type": ctype} if ctype else {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code
    except Exception as e:  # noqa: BLE001
        return f"transport: {type(e).__name__}"


t0 = time.monotonic()
with ThreadPoolExecutor(32) as pool:
    codes = Counter(pool.map(send, range(a.requests)))
took = time.monotonic() - t0
bad = {str(k): v for k, v in codes.items() if not isinstance(k, int) or (k >= 500 and k != 503)}
if bad:
    failures.append(f"server errors or broken connections: {bad}")
after, ok = health_latency()
if not ok:
    failures.append("the server is down after the load")

rss = {}
for pid in filter(None, a.pids.split(",")):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    rss[pid] = int(line.split()[1]) // 1024
    except OSError:
        rss[pid] = None
print(json.dumps({
    "slowloris": {"sockets": a.sockets, "refused_at_connect": refused, "dropped_by_server": dropped,
                  "health_checks": len(health), "health_worst_s": round(worst, 4)},
    "requests": {"sent": a.requests, "seconds": round(took, 1), "status": {str(k): v for k, v in sorted(codes.items(), key=str)}},
    "peak_rss_mib": rss,
    "failures": failures,
}))
sys.exit(1 if failures else 0)
