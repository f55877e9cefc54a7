#!/usr/bin/env python3
"""Draw load and replicas over time for docs/img/autoscaling.svg (Python stdlib only).

Replays traces through `tessera-operator simulate-autoscaling -o json` (the autoscaler's own
decision code) with the example deployment and writes one SVG with a panel per trace. Load is
drawn as "replicas' worth" (demand / target), so it shares the replicas axis: the replica line
should sit on or just above it. Run from the repository root:

    python3 scripts/plot-autoscaling.py [--bin PATH] [--out docs/img/autoscaling.svg]
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DEPLOYMENT = "examples/deployments/llama-8b-autoscaling.yaml"
PANELS = [
    ("diurnal", None, "Diurnal load (a day compressed into 2 h, two days)"),
    ("step", None, "Step from 32 to 96 requests at t = 300 s"),
    ("capacity-capped", 5, "Step to 200 requests with --capacity 5"),
]


def find_bin(given):
    if given:
        return [given]
    for p in ("target/release/tessera-operator", "target/debug/tessera-operator"):
        if os.path.exists(os.path.join(ROOT, p)):
            return [os.path.join(ROOT, p)]
    if shutil.which("cargo"):
        return ["cargo", "run", "-q", "-p", "tessera-operator", "--"]
    sys.exit("error: no tessera-operator binary; build it with cargo build -p tessera-operator")


def spec_number(key):
    with open(os.path.join(ROOT, DEPLOYMENT), encoding="utf-8") as f:
        m = re.search(r"^\s*" + key + r":\s*([0-9.]+)", f.read(), re.M)
    return float(m.group(1))


def replay(cmd, trace, capacity):
    args = cmd + ["simulate-autoscaling", "-f", DEPLOYMENT, "--trace",
                  f"examples/traces/{trace}.csv", "-o", "json"]
    if capacity is not None:
        args += ["--capacity", str(capacity)]
    out = subprocess.run(args, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def panel(rows, title, target, ymax, x0, y0, w, h, capacity):
    t_end = rows[-1]["t"] or 1
    sx = lambda t: x0 + w * t / t_end
    sy = lambda v: y0 + h - h * min(v, ymax) / ymax
    out = [f'<text x="{x0}" y="{y0 - 8}" font-size="13" font-weight="bold">{esc(title)}</text>',
           f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>']
    for v in range(0, int(ymax) + 1, 2):
        y = sy(v)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + w}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{v}</text>')
    step = 1800 if t_end > 3600 else 300
    t = 0
    while t <= t_end:
        x = sx(t)
        label = f"{t / 3600:g} h" if step >= 1800 else f"{t:g} s"
        out.append(f'<text x="{x:.1f}" y="{y0 + h + 14}" font-size="10" text-anchor="middle">{label}</text>')
        t += step
    if capacity is not None:
        y = sy(capacity)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + w}" y2="{y:.1f}" stroke="#d62728" stroke-dasharray="5,4"/>')
        out.append(f'<text x="{x0 + w - 4}" y="{y - 4:.1f}" font-size="10" text-anchor="end" fill="#d62728">capacity {capacity}</text>')
    # Load: demand / target, gaps where samples are missing.
    segs, cur = [], []
    for r in rows:
        if r["demand"] is None:
            if cur:
                segs.append(cur)
                cur = []
            continue
        cur.append(f'{sx(r["t"]):.1f},{sy(r["demand"] / target):.1f}')
    if cur:
        segs.append(cur)
    for s in segs:
        out.append(f'<polyline points="{" ".join(s)}" fill="none" stroke="#1f77b4" stroke-width="1.2"/>')
    # Replicas after each decision, as a step line.
    pts, prev = [], rows[0]["previous"]
    pts.append(f"{sx(0):.1f},{sy(prev):.1f}")
    for r in rows:
        pts.append(f'{sx(r["t"]):.1f},{sy(prev):.1f}')
        pts.append(f'{sx(r["t"]):.1f},{sy(r["replicas"]):.1f}')
        prev = r["replicas"]
    out.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="#ff7f0e" stroke-width="2"/>')
    changes = sum(1 for r in rows if r["replicas"] != r["previous"])
    out.append(f'<text x="{x0 + w}" y="{y0 - 8}" font-size="11" text-anchor="end">{changes} changes</text>')
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", help="tessera-operator binary")
    ap.add_argument("--out", default="docs/img/autoscaling.svg")
    a = ap.parse_args()
    cmd = find_bin(a.bin)
    target = spec_number("target")
    ymax = spec_number("maxReplicas") + 1
    W, ph, left, top, gap = 820, 170, 50, 60, 70
    H = top + len(PANELS) * (ph + gap)
    body = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif">',
            f'<rect width="{W}" height="{H}" fill="white"/>',
            f'<text x="{left}" y="22" font-size="15" font-weight="bold">tessera-operator simulate-autoscaling: {esc(os.path.basename(DEPLOYMENT))} (queueDepth, target {target:g}, 1..{ymax - 1:g} replicas)</text>',
            f'<line x1="{left}" y1="38" x2="{left + 24}" y2="38" stroke="#1f77b4" stroke-width="1.5"/>',
            f'<text x="{left + 30}" y="42" font-size="11">load as replicas\' worth (demand / target; gaps: missing samples)</text>',
            f'<line x1="{left + 380}" y1="38" x2="{left + 404}" y2="38" stroke="#ff7f0e" stroke-width="2"/>',
            f'<text x="{left + 410}" y="42" font-size="11">replicas chosen by the autoscaler</text>']
    for i, (trace, cap, title) in enumerate(PANELS):
        rows = replay(cmd, trace, cap)
        body += panel(rows, title, target, ymax, left, top + 20 + i * (ph + gap), W - left - 20, ph, cap)
    body.append("</svg>")
    path = os.path.join(ROOT, a.out)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(body) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
