"""Prefill/decode disaggregation against aggregated serving, on loopback (standard library only).

The same load goes to three deployments of the test model, one after another:

  agg-x2    two `local --tp 1 --threads T` replicas behind a round-robin in this client
            (2 rank processes, T threads each)
  pd-1+1    `local --prefill 1 --decode 1 --threads T` (2 rank processes, T threads each, and
            the router in the launcher's process)
  agg-x1    one `local --tp 1 --threads 2T` replica (1 rank process, the same cores)

Load: --requests streamed text completions from --concurrency clients, prompts of three lengths
in a fixed mix (short, medium and long; long prompts exceed a prefill chunk of 512 tokens),
temperature 0 and ignore_eos, so each request generates exactly --max-tokens tokens.

Per deployment: time to first token (client-side, to the first text chunk) p50/p99, inter-token
latency (gaps between text chunks) p50/p99, output tokens/s (generated tokens / wall time of the
whole load), mean request latency. For pd-1+1 also the KV hand-over of each request (from the
router's x-tessera-kv-bytes and x-tessera-kv-seconds headers) by prompt length, against a
prediction: bytes / loopback bandwidth, measured here with one TCP stream of 4 MiB writes.

Usage: python3 scripts/bench-pd.py --worker BIN --model GGUF [--requests 32] [--concurrency 8]
       [--max-tokens 64] [--threads 1] [--only agg-x2,pd-1+1,agg-x1]
"""

import argparse
import http.client
import json
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

SHORT = "Write a short story about a lighthouse keeper."
MEDIUM = ("The history of the city of Paris begins about 250 BC, when a tribe of Celtic Senones "
          "known as the Parisii settled on the banks of the Seine. ") * 5 + "Summarise this:"
LONG = ("The history of the city of Paris begins about 250 BC, when a tribe of Celtic Senones "
        "known as the Parisii settled on the banks of the Seine. ") * 22 + "Summarise this:"
MIX = [("short", SHORT), ("medium", MEDIUM), ("long", LONG), ("short", SHORT),
       ("medium", MEDIUM), ("short", SHORT), ("long", LONG), ("medium", MEDIUM)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_bandwidth(total=512 << 20, piece=4 << 20):
    """Bytes/s of one loopback TCP stream of `piece`-byte writes (median of three)."""
    results = []
    for _ in range(3):
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        got = [0]

        def sink():
            c, _ = srv.accept()
            buf = bytearray(piece)
            view = memoryview(buf)
            while True:
                n = c.recv_into(view)
                if n == 0:
                    break
                got[0] += n
            c.close()

        t = threading.Thread(target=sink)
        t.start()
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        data = b"\0" * piece
        t0 = time.perf_counter()
        sent = 0
        while sent < total:
            s.sendall(data)
            sent += piece
        s.shutdown(socket.SHUT_WR)
        t.join()
        dt = time.perf_counter() - t0
        s.close()
        srv.close()
        results.append(got[0] / dt)
    return statistics.median(results)


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class Deployment:
    """`tessera-worker local` processes and the ports to send requests to."""

    def __init__(self, worker, model, runs):
        self.procs, self.ports = [], []
        for args in runs:
            port = free_port()
            p = subprocess.Popen([worker, "local", "--model", model, "--port", str(port), *args],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
            self.procs.append(p)
            self.ports.append(port)
        deadline = time.time() + 180
        for port, p in zip(self.ports, self.procs):
            while True:
                if p.poll() is not None:
                    raise SystemExit(f"local on port {port} exited with {p.returncode}")
                try:
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                    c.request("GET", "/readyz")
                    if c.getresponse().status == 200:
                        break
                except OSError:
                    pass
                if time.time() > deadline:
                    raise SystemExit(f"local on port {port} not ready within 180 s")
                time.sleep(0.2)

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def one(port, model, prompt, max_tokens):
    """One streamed completion: (start, first text time, text chunk times, end, tokens,
    kv bytes, kv seconds, prefill seconds)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise SystemExit(f"HTTP {r.status}: {r.read()[:300]!r}")
    kv = (r.getheader("x-tessera-kv-bytes"), r.getheader("x-tessera-kv-seconds"),
          r.getheader("x-tessera-prefill-seconds"))
    chunks, usage, done = [], None, False
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        if line == b"data: [DONE]":
            done = True
            continue
        ev = json.loads(line[6:])
        if "error" in ev:
            raise SystemExit(f"error event: {ev}")
        if ev["choices"] and ev["choices"][0]["text"]:
            chunks.append(time.perf_counter())
        if ev.get("usage"):
            usage = ev["usage"]
    end = time.perf_counter()
    c.close()
    if not done or usage is None:
        raise SystemExit("a stream ended without usage or [DONE]")
    return {"start": t0, "first": chunks[0] if chunks else end, "chunks": chunks, "end": end,
            "tokens": usage["completion_tokens"], "prompt_tokens": usage["prompt_tokens"],
            "kv_bytes": int(kv[0]) if kv[0] else None,
            "kv_seconds": float(kv[1]) if kv[1] else None,
            "prefill_seconds": float(kv[2]) if kv[2] else None}


def load(dep, model, requests, concurrency, max_tokens):
    jobs = queue.Queue()
    for i in range(requests):
        cls, prompt = MIX[i % len(MIX)]
        # A distinct first word per request: no two prompts are the same.
        jobs.put((i, cls, f"{i}. {prompt}"))
    results, lock = [], threading.Lock()

    def client():
        while True:
            try:
                i, cls, prompt = jobs.get_nowait()
            except queue.Empty:
                return
            port = dep.ports[i % len(dep.ports)]
            r = one(port, model, prompt, max_tokens)
            r["class"] = cls
            with lock:
                results.append(r)

    # Warm-up: one short request per port.
    for port in dep.ports:
        one(port, model, SHORT, 4)
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return results, wall


def summarise(name, results, wall):
    ttft = [r["first"] - r["start"] for r in results]
    itl = [b - a for r in results for a, b in zip(r["chunks"], r["chunks"][1:])]
    tokens = sum(r["tokens"] for r in results)
    lat = statistics.mean(r["end"] - r["start"] for r in results)
    return {"deployment": name, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99), "latency_mean": lat,
            "prompt_tokens": {c: statistics.mean(r["prompt_tokens"] for r in results
                                                 if r["class"] == c)
                              for c in ("short", "medium", "long")}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="agg-x2,pd-1+1,agg-x1")
    a = ap.parse_args()
    model_name = os.path.splitext(os.path.basename(a.model))[0]
    t = str(a.threads)
    configs = {
        "agg-x2": [["--tp", "1", "--threads", t], ["--tp", "1", "--threads", t]],
        "pd-1+1": [["--prefill", "1", "--decode", "1", "--threads", t]],
        "agg-x1": [["--tp", "1", "--threads", str(2 * a.threads)]],
    }
    bw = loopback_bandwidth()
    print(f"loopback bandwidth (one TCP stream, 4 MiB writes, median of 3): {bw / 1e9:.2f} GB/s")
    print(f"load: {a.requests} streamed completions, {a.concurrency} clients, {a.max_tokens} "
          f"tokens each, prompt mix {'/'.join(c for c, _ in MIX)}")
    rows, kv = [], None
    for name in a.only.split(","):
        dep = Deployment(a.worker, a.model, configs[name])
        try:
            results, wall = load(dep, model_name, a.requests, a.concurrency, a.max_tokens)
        finally:
            dep.stop()
        rows.append(summarise(name, results, wall))
        if name == "pd-1+1":
            kv = results
    pt = rows[0]["prompt_tokens"]
    print(f"prompt tokens: short {pt['short']:.0f}, medium {pt['medium']:.0f}, "
          f"long {pt['long']:.0f}")
    print(f"{'deployment':<10} {'tok/s':>7} {'wall s':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'ITL p50':>8} {'ITL p99':>8} {'latency':>8}")
    for r in rows:
        print(f"{r['deployment']:<10} {r['tokens_per_s']:>7.1f} {r['wall_s']:>7.1f} "
              f"{r['ttft_p50']:>9.3f} {r['ttft_p99']:>9.3f} {r['itl_p50'] * 1e3:>6.1f}ms "
              f"{r['itl_p99'] * 1e3:>6.1f}ms {r['latency_mean']:>7.2f}s")
    if kv:
        print("KV hand-over per request (pd-1+1), by prompt length; predicted = bytes / loopback "
              "bandwidth:")
        print(f"{'prompt':<7} {'n':>3} {'tokens':>6} {'MiB':>7} {'measured ms':>11} "
              f"{'predicted ms':>12} {'ratio':>6} {'prefill call s':>14}")
        for c in ("short", "medium", "long"):
            rs = [r for r in kv if r["class"] == c and r["kv_bytes"] is not None]
            if not rs:
                continue
            b = statistics.mean(r["kv_bytes"] for r in rs)
            s = statistics.median(r["kv_seconds"] for r in rs)
            pred = b / bw
            print(f"{c:<7} {len(rs):>3} {statistics.mean(r['prompt_tokens'] for r in rs):>6.0f} "
                  f"{b / (1 << 20):>7.2f} {s * 1e3:>11.2f} {pred * 1e3:>12.2f} {s / pred:>6.1f} "
                  f"{statistics.median(r['prefill_seconds'] for r in rs):>14.2f}")
    print(json.dumps({"loopback_bytes_per_s": bw, "rows": rows}), file=sys.stderr)


if __name__ == "__main__":
    main()
