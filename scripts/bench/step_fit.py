#!/usr/bin/env python3
"""How well a paced decode worker's step-time fit predicted its steps, from a TRACE=1 log of
`scripts/bench/placement.sh` (the decode worker's "step timed" lines: tokens, work, predicted
and measured time).

usage: scripts/bench/step_fit.py SERVER.log [--period-ms P] [--deep DEEP]

Replays, on the same steps, a decayed least squares of time against the work the worker priced
each step at (`protocol::cores::StepCost`: prompt attention weighed by the cost profile, scaled
by what the worker's fit learned live, `StepFit::scale`) beside the same fit against tokens
alone (the pacer before it weighed attention), each predicting a step before observing it. Prints each fit's mean absolute error, and its mean signed error on decode-only
steps, on steps with prompt chunks near their prompt's start, and on steps with a chunk that
starts DEEP (default 300) positions or more into its prompt: negative is a step that ran longer
than its fit said, the error that breaks a stream's bound. Then the least-squares line of the
whole run's step times against [1, tokens, prompt-chunk attention pairs, decode attention
pairs] (with numpy): the live costs to hold against the profile's, and what even the best such
line errs on each kind of step. Last, a candidate for the worker: the same running fit with the
prompt attention's weight learned live (time against 1, tokens and the profile-weighed pairs,
each term its own coefficient, pulled toward the profile's weight by a small ridge; the fit by
work where that gives a negative coefficient), predicting each step before it sees it.
"""
import argparse
import re

DECAY = 0.98


class Fit:
    def __init__(self):
        self.w = self.x = self.y = self.xx = self.xy = 0.0

    def observe(self, x, y):
        d = DECAY
        self.w = self.w * d + 1
        self.x = self.x * d + x
        self.y = self.y * d + y
        self.xx = self.xx * d + x * x
        self.xy = self.xy * d + x * y

    def seconds(self, x):
        if self.w <= 0 or self.x <= 0:
            return None
        var = self.w * self.xx - self.x * self.x
        if var > 1e-3 * self.w * self.xx:
            c = (self.w * self.xy - self.x * self.y) / var
            a = (self.y - c * self.x) / self.w
            if c > 0 and a >= 0:
                return a + c * x
        return self.y / self.x * x


ap = argparse.ArgumentParser()
ap.add_argument("log")
ap.add_argument("--period-ms", type=float)
ap.add_argument("--deep", type=int, default=300)
a = ap.parse_args()
field = lambda name, line: re.search(rf"\b{name}=([^ ]+)", line)
steps = []
for line in open(a.log):
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    if "step timed" not in line:
        continue
    deepest = field("deepest", line)
    deepest = int(deepest[1]) if deepest else None
    kind = "decode only" if deepest is None else "deep chunk" if deepest >= a.deep else "early chunk"
    steps.append((kind, int(field("tokens", line)[1]), float(field("work", line)[1]),
                  float(field("took_ms", line)[1]),
                  *(float(m[1]) if (m := field(n, line)) else None
                    for n in ("prefill_pairs", "decode_pairs"))))
kinds = ["decode only", "early chunk", "deep chunk"]
fits = {"work": Fit(), "tokens": Fit()}
err = {k: [] for k in fits}
signed = {(k, c): [] for k in fits for c in kinds}
for kind, tokens, work, took, _, _ in steps:
    for k, f in fits.items():
        x = work if k == "work" else tokens
        p = f.seconds(x)
        if p is not None:
            err[k].append(abs(p * 1e3 - took))
            signed[k, kind].append(p * 1e3 - took)
        f.observe(x, took / 1e3)
mean = lambda v: sum(v) / max(1, len(v))
print(f"{len(steps)} steps: " + ", ".join(f"{sum(s[0] == c for s in steps)} {c}" for c in kinds)
      + f" (deep: a chunk from position {a.deep} on)")
for k in fits:
    print(f"fit by {k:6}: mean |error| {mean(err[k]):.2f} ms; mean error "
          + ", ".join(f"{c} {mean(signed[k, c]):+.2f} ms" for c in kinds))
if a.period_ms:
    for c in kinds:
        took = [s[3] for s in steps if s[0] == c]
        print(f"{c}: {sum(t > a.period_ms for t in took)} of {len(took)} steps over the "
              f"{a.period_ms} ms period")
if any(s[4] is None for s in steps):
    raise SystemExit("(a log without the steps' attention pairs: no least-squares line)")
try:
    import numpy as np
except ImportError:
    raise SystemExit("(numpy is not installed: no least-squares line)")
x = np.array([[1.0, s[1], s[4], s[5]] for s in steps])
y = np.array([s[3] for s in steps])
coef = np.linalg.lstsq(x, y, rcond=None)[0]
print(f"least squares over the run: {coef[0]:.2f} ms + {coef[1]:.3f} ms/token + "
      f"{coef[2] * 1e6:.1f} ns/prefill pair + {coef[3] * 1e6:.1f} ns/decode pair; mean error "
      + ", ".join(f"{c} {mean(list((x @ coef - y)[[s[0] == c for s in steps]])):+.2f} ms" for c in kinds))

# The weight the worker ran with: work = tokens + weight x prompt pairs.
weights = [(s[2] - s[1]) / s[4] for s in steps if s[4] and s[4] > 0]
weight = sorted(weights)[len(weights) // 2] if weights else 0.0
gram, rhs, ridge = np.zeros((3, 3)), np.zeros(3), 0.1 * np.array([[0, 0, 0], [0, 1, -1], [0, -1, 1]])
fallback, live, signed_live = Fit(), [], {c: [] for c in kinds}
for kind, tokens, work, took, pp, _ in steps:
    x = np.array([1.0, tokens, weight * pp])
    p = None
    if gram[0, 0] > 0:
        theta = np.linalg.solve(gram + ridge * gram[0, 0] + 1e-12 * np.eye(3), rhs)
        if (theta >= 0).all() and theta[1] > 0:
            p = x @ theta
    if p is None:
        p = fallback.seconds(work)
    if p is not None:
        live.append(abs(p * 1e3 - took))
        signed_live[kind].append(p * 1e3 - took)
    gram, rhs = gram * DECAY + np.outer(x, x), rhs * DECAY + x * took / 1e3
    fallback.observe(work, took / 1e3)
print(f"fit with the weight learned live: mean |error| {mean(live):.2f} ms; mean error "
      + ", ".join(f"{c} {mean(signed_live[c]):+.2f} ms" for c in kinds))
