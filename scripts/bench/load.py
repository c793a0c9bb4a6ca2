#!/usr/bin/env python3
"""How much of a host's cores a `tandem bench` run's requests need, by the cost profile.

usage: scripts/bench/load.py PROFILE.json REQUESTS.jsonl [--threads N] [--pace-ms P]

For the requests a run sent (each one's prompt and output tokens, from `requests.jsonl`), the
compute the profile's marginal costs give (per token, per attention pair of the prompt and of
each output token) against the span of their arrivals: a load of 1 keeps the cores busy for the
whole span before any step's fixed cost. With --pace-ms, also the fixed cost of one step per
period for as long as a stream decodes in that run (the steps a TPOT bound paced at P needs),
and the sum: above 1, no schedule keeps up with such arrivals for long while it keeps that
pace (the queue grows; a short run may still absorb it within its first-token bound).
"""
import argparse
import json

ap = argparse.ArgumentParser()
ap.add_argument("profile")
ap.add_argument("requests")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--pace-ms", type=float)
a = ap.parse_args()
f = next(x for x in json.load(open(a.profile))["forward"] if x["threads"] == a.threads)
rows = [json.loads(line) for line in open(a.requests)]
work = 0.0
for r in rows:
    n, out = r["client_input_len"], max(1, sum(c[1] for c in r["chunks"]) or r["requested_output_len"])
    work += n * f["per_token_s"] + n * n / 2 * f["per_prefill_pair_s"]
    work += out * f["per_token_s"] + sum(n + k for k in range(out)) * f["per_decode_pair_s"]
span = max(r["sent_s"] for r in rows) - min(r["sent_s"] for r in rows)
print(f"{len(rows)} requests over {span:.1f} s: {work:.2f} s of compute on {a.threads} threads, load {work / span:.2f}")
if a.pace_ms:
    # The seconds during which some stream decodes (the union of first-to-last-token spans).
    spans = sorted((r["chunks"][0][0], r["chunks"][-1][0]) for r in rows if r["chunks"])
    busy, end = 0.0, float("-inf")
    for s, e in spans:
        busy += max(0.0, e - max(s, end))
        end = max(end, e)
    fixed = busy / (a.pace_ms / 1000) * f["fixed_s"]
    print(f"steps at a {a.pace_ms} ms pace while streams decode ({busy:.1f} s): {fixed:.2f} s of fixed cost; "
          f"load with them {(work + fixed) / span:.2f}")
