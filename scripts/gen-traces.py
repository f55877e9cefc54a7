#!/usr/bin/env python3
"""Generate the synthetic load traces in examples/traces/ (CSV `t,demand`).

`demand` is the deployment's total load in the metric's unit; for the example deployment
(examples/deployments/llama-8b-autoscaling.yaml: queueDepth, target 16 per replica, 1..8
replicas) it is waiting + running requests over all replicas. One row every 15 s, the operator's
default autoscaling interval. Deterministic (fixed seed); run from the repository root:

    python3 scripts/gen-traces.py
"""

import math
import os
import random

STEP = 15
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "traces")


def noisy(rng, v, pct=0.04):
    return max(0.0, v * (1.0 + rng.uniform(-pct, pct)))


def write(name, rows, comment):
    path = os.path.join(OUT, name + ".csv")
    with open(path, "w", encoding="utf-8") as f:
        for line in comment.strip().splitlines():
            f.write("# " + line + "\n")
        f.write("t,demand\n")
        for t, d in rows:
            f.write(f"{t},{'' if d is None else f'{d:.1f}'}\n")


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = random.Random(6)
    n = 120  # 30 minutes

    write("steady", [(i * STEP, noisy(rng, 32)) for i in range(n)],
          "steady: 32 requests (2 replicas at target 16), +-4% noise, 30 min")

    write("ramp", [(i * STEP, noisy(rng, 16 + (112 * min(i, 80) / 80))) for i in range(n)],
          "ramp: 16 -> 128 requests over 20 min, then flat")

    write("step", [(i * STEP, noisy(rng, 32 if i * STEP < 300 else 96)) for i in range(n)],
          "step: 32 requests, then 96 from t=300 s (target: 6 replicas)")

    write("spike", [(i * STEP, noisy(rng, 200 if 600 <= i * STEP < 630 else 32)) for i in range(n)],
          "spike: 32 requests with a 30 s burst to 200 at t=600 s")

    write("flapping", [(i * STEP, noisy(rng, 64 if (i // 4) % 2 else 16)) for i in range(n)],
          "flapping: 16 and 64 requests alternating every 60 s")

    m = 960  # 4 hours: two compressed days of 2 h each
    write("diurnal",
          [(i * STEP, noisy(rng, 64 - 56 * math.cos(2 * math.pi * i * STEP / 7200))) for i in range(m)],
          "diurnal: 8..120 requests, a day compressed into 2 h, two days")

    rows = []
    for i in range(n):
        t = i * STEP
        if 600 <= t < 1200:
            rows.append((t, None))
        elif t < 600:
            rows.append((t, noisy(rng, 64)))
        else:
            rows.append((t, noisy(rng, 16)))
    write("missing", rows, "missing: 64 requests, no samples for 10 min from t=600 s, then 16 requests")

    write("capacity-capped", [(i * STEP, noisy(rng, 32 if i * STEP < 300 else 200)) for i in range(n)],
          "capacity-capped: 32, then 200 requests from t=300 s; replay with --capacity 5")


if __name__ == "__main__":
    main()
