"""Soak and fault harness for `tessera-worker local` (loopback only, bounded in time and requests).

Phase 1 (most of --seconds): client threads send a random mix, every value inside OpenAI's valid
ranges: streaming and non-streaming chat and completions with random sampling parameters over
multilingual prompts, n > 1, logprobs, logit_bias, stop strings; clients that drop the connection
mid-stream; oversized (5 MiB) and malformed bodies; invalid values; prompts far beyond the
context; connections that stay idle without sending a request. Then the load stops and the
server's /metrics must agree with what the clients saw.

With --prefill N --decode M the same runs through `local`'s prefill/decode router (the killed
rank is then a replica behind it).

Phase 2: requests in flight, one rank is killed (SIGKILL). The in-flight requests must end (an
error event, a 503, or a closed connection; none may hang), `local` must exit non-zero naming
the rank, and a new group (restarted as Kubernetes would) must serve again; a short load and the
same checks follow.

Asserts: no 5xx other than 503, and every 429/503 carries Retry-After; every accepted request
completes (a streamed one ends with [DONE]) or was dropped by its client; each phase's
`tessera_requests_total` equals the sequences the clients had accepted; peak RSS of every rank
stays under a bound computed from the model file and the KV budget; idle connections are closed
by the server after its header timeout. Prints a JSON report and a table; exit status 1 when an
assertion failed.

Usage: python3 scripts/soak.py --worker BIN --model GGUF [--seconds 60] [--clients 12]
       [--tp 3] [--max-requests 100000] [--report FILE] [--prefill N --decode M]
"""

import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

PROMPTS = [
    "What is the capital of France?",
    "写一首关于大海的短诗。",
    "Explain 🚀 and 🌍 in one sentence 😀👍🏽",
    "ما هي عاصمة مصر؟",
    "भारत की राजधानी क्या है?",
    "Расскажи короткую историю о коте.",
    "Mélange: naïve café, Übermaß, ½ ⅓ ¼, ∑∫√, \u200b zero width, \ttabs\nnewlines",
    "def fib(n):\n    return",
    "日本の首都はどこですか？ Answer in English.",
    "🙂" * 40,
]
STOPS = ["\n", ".", "。", "Paris", "😀", "the", "END"]
VOCAB = 49152
ALLOWED = {200, 400, 413, 429, 503}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.by_kind = {}
        self.statuses = {}
        self.errors = {}
        self.latency = []  # accepted whole (non-streamed) responses, seconds
        self.stream_total = []  # accepted streams read to [DONE], seconds
        self.refusal = []  # 4xx/5xx answers, seconds
        self.ttft = []  # streamed first content, seconds
        self.accepted_sequences = 0
        self.requests = 0
        self.failures = []
        self.overloaded = {}  # 429 answers by the reason they give

    def add(self, kind, status, latency=None, ttft=None, sequences=0, streamed=False):
        with self.lock:
            self.requests += 1
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
            key = f"{kind}:{status}"
            self.statuses[key] = self.statuses.get(key, 0) + 1
            if latency is not None:
                if status != 200:
                    self.refusal.append(latency)
                elif streamed:
                    self.stream_total.append(latency)
                else:
                    self.latency.append(latency)
            if ttft is not None:
                self.ttft.append(ttft)
            self.accepted_sequences += sequences

    def error(self, kind):
        with self.lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def fail(self, msg):
        with self.lock:
            if len(self.failures) < 50:
                self.failures.append(msg)


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(p / 100 * len(xs)))], 4)


def sampling(rng):
    p = {"temperature": round(rng.uniform(0, 2), 3), "max_tokens": rng.randint(1, 40),
         "seed": rng.randint(0, 2**31)}
    if rng.random() < 0.5:
        p["top_p"] = round(rng.uniform(0.05, 1.0), 3)
    if rng.random() < 0.3:
        p["top_k"] = rng.randint(0, 50)
    if rng.random() < 0.3:
        p["presence_penalty"] = round(rng.uniform(-2, 2), 2)
        p["frequency_penalty"] = round(rng.uniform(-2, 2), 2)
    if rng.random() < 0.3:
        p["stop"] = rng.sample(STOPS, rng.randint(1, 3))
    if rng.random() < 0.15:
        p["logit_bias"] = {str(rng.randrange(VOCAB)): rng.randint(-100, 100)
                           for _ in range(rng.randint(1, 5))}
    return p


def body_for(kind, rng):
    prompt = rng.choice(PROMPTS)
    chat = kind.endswith("chat")
    b = {"model": "m", **sampling(rng)}
    if chat:
        b["messages"] = [{"role": "user", "content": prompt}]
        if rng.random() < 0.2:
            b["logprobs"] = True
            b["top_logprobs"] = rng.randint(0, 5)
    else:
        b["prompt"] = prompt
        if rng.random() < 0.2:
            b["logprobs"] = rng.randint(0, 5)
    if kind.startswith("n_"):
        b["n"] = rng.randint(2, 3)
    return b, ("/v1/chat/completions" if chat else "/v1/completions")


def check_refusal(stats, kind, resp, expect_restart):
    status = resp.status
    if status == 503 and not expect_restart.is_set():
        stats.fail(f"{kind}: HTTP 503 while no rank was lost: {resp.read()[:300]!r}")
        return
    if status >= 500 and status != 503:
        stats.fail(f"{kind}: HTTP {status}: {resp.read()[:300]!r}")
        return
    if status in (429, 503) and not resp.getheader("Retry-After"):
        stats.fail(f"{kind}: HTTP {status} without Retry-After")
    if status == 429:
        try:
            why = json.loads(resp.read())["error"]["message"]
        except (ValueError, KeyError, TypeError, OSError):
            why = "(no OpenAI error body)"
        why = "".join("N" if c.isdigit() else c for c in why)[:160]
        with stats.lock:
            stats.overloaded[why] = stats.overloaded.get(why, 0) + 1
    if status not in ALLOWED:
        stats.fail(f"{kind}: unexpected HTTP {status}")


def one_request(port, kind, rng, stats, expect_restart):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=180)
    t0 = time.time()
    kind_detail = kind
    try:
        if kind == "oversized":
            body = json.dumps({"model": "m", "prompt": "x" * (5 << 20)})
            path = "/v1/completions"
        elif kind == "malformed":
            body = rng.choice(['{"model": "m", "prompt": ', "not json", '{"prompt": 5}',
                               '{"model":"m","messages":"hi"}', "\xff\xfe"])
            path = rng.choice(["/v1/completions", "/v1/chat/completions"])
        elif kind == "invalid":
            b, path = body_for("complete", rng)
            bad = rng.choice([("temperature", 2.5), ("top_p", 1.5), ("max_tokens", 0), ("n", 9),
                              ("presence_penalty", 3), ("logprobs", 6), ("top_k", -2),
                              ("logit_bias", {"999999": 5}), ("stop", ["x"] * 17)])
            b[bad[0]] = bad[1]
            kind_detail = f"invalid {bad[0]}={str(bad[1])[:40]}"
            body = json.dumps(b)
        elif kind == "long_prompt":
            body = json.dumps({"model": "m", "prompt": "a" * 100_000, "max_tokens": 4})
            path = "/v1/completions"
        else:
            b, path = body_for("stream_complete" if kind == "burst" else kind, rng)
            b["stream"] = kind.startswith("stream") or kind in ("disconnect", "burst")
            if kind == "burst":
                b.update(max_tokens=32, ignore_eos=True)
            body = json.dumps(b)
        conn.request("POST", path, body=body.encode("utf-8", "surrogatepass")
                     if isinstance(body, str) else body,
                     headers={"content-type": "application/json"})
        resp = conn.getresponse()
        check_refusal(stats, kind, resp, expect_restart)
        if resp.status != 200:
            resp.read()
            # 429 and 503 (admission, checked before any work) are right for every kind.
            want = {"oversized": 413, "malformed": 400, "invalid": 400, "long_prompt": 400}.get(kind)
            if want and resp.status not in (want, 429, 503):
                stats.fail(f"{kind_detail}: HTTP {resp.status}, expected {want}")
            if kind == "long_prompt" and resp.status == 400 and time.time() - t0 > 5:
                stats.fail(f"long_prompt refused after {time.time() - t0:.1f} s")
            stats.add(kind, resp.status, latency=time.time() - t0)
            return
        if kind in ("oversized", "malformed", "invalid", "long_prompt"):
            stats.fail(f"{kind_detail}: accepted with 200")
        n = b.get("n", 1)
        if not b.get("stream"):
            data = json.loads(resp.read())
            reasons = [c.get("finish_reason") for c in data["choices"]]
            if len(reasons) != n or any(r not in ("stop", "length") for r in reasons):
                stats.fail(f"{kind}: finish reasons {reasons}")
            stats.add(kind, 200, latency=time.time() - t0, sequences=n)
            return
        first = None
        done = False
        events = 0
        while True:
            line = resp.fp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True
                break
            ev = json.loads(payload)
            if "error" in ev:
                if not expect_restart.is_set():
                    stats.fail(f"{kind}: error event {ev['error']}")
                stats.error("stream_error_event")
                break
            events += 1
            if first is None:
                first = time.time() - t0
            if kind == "disconnect" and events >= rng.randint(1, 3):
                conn.sock.shutdown(socket.SHUT_RDWR)
                conn.close()
                stats.add(kind, 200, ttft=first, sequences=n)
                return
        if not done and kind != "disconnect":
            if not expect_restart.is_set():
                stats.fail(f"{kind}: stream ended without [DONE] after {events} events")
            stats.error("stream_cut")
        stats.add(kind, 200, latency=time.time() - t0, ttft=first, sequences=n, streamed=True)
    except (ConnectionError, OSError, http.client.HTTPException) as e:
        if kind == "oversized" and isinstance(e, (BrokenPipeError, ConnectionResetError)):
            # The server answered 413 and closed before the 5 MiB body was all sent: read the
            # answer it left, if the socket still has it.
            try:
                status = conn.getresponse().status
            except (ConnectionError, OSError, http.client.HTTPException):
                status = "closed-early"
            if status not in (413, "closed-early"):
                stats.fail(f"oversized: HTTP {status} after the body was cut off")
            stats.add(kind, status)
            return
        if expect_restart.is_set():
            stats.error(f"connection ({type(e).__name__}) during restart")
            time.sleep(0.2)
        else:
            stats.fail(f"{kind}: {type(e).__name__}: {e}")
            stats.error(type(e).__name__)
    finally:
        conn.close()


KINDS = [("stream_chat", 24), ("stream_complete", 14), ("complete", 18), ("chat", 14),
         ("n_chat", 4), ("disconnect", 8), ("oversized", 2), ("malformed", 5), ("invalid", 7),
         ("long_prompt", 4)]


def client(port, seed, deadline, stats, budget, expect_restart, stop):
    rng = random.Random(seed)
    kinds = [k for k, w in KINDS for _ in range(w)]
    while time.time() < deadline and not stop.is_set():
        with budget["lock"]:
            if budget["left"] <= 0:
                return
            budget["left"] -= 1
        one_request(port, rng.choice(kinds), rng, stats, expect_restart)


def children(pid):
    """Processes whose parent is `pid` (from /proc, no external tool)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces; the parent pid follows it.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(entry))
    return sorted(out)


def status_kib(pid, field):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def metrics(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        out[name] = float(value)
    return out


def wait_ready(port, proc, limit):
    t0 = time.time()
    while time.time() - t0 < limit:
        if proc.poll() is not None:
            raise SystemExit(f"local exited with {proc.returncode} before it was ready")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/readyz")
            if c.getresponse().status == 200:
                return time.time() - t0
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"not ready after {limit} s")


def start_local(args, port, log):
    env = dict(os.environ, TESSERA_SERVED_MODEL_NAME="m", RUST_LOG="warn")
    pools = ["--prefill", str(args.prefill), "--decode", str(args.decode)] if args.prefill else []
    return subprocess.Popen([args.worker, "local", "--model", args.model, "--tp", str(args.tp),
                             "--port", str(port), "--device", "cpu"] + pools, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def settle(port, limit=60):
    """Wait until nothing runs or waits; return the metrics then."""
    t0 = time.time()
    while True:
        m = metrics(port)
        if (m.get("tessera_requests_running", 0) == 0 and m.get("tessera_requests_waiting", 0) == 0) \
                or time.time() - t0 > limit:
            return m
        time.sleep(0.5)


def finished_total(m):
    return sum(v for k, v in m.items() if k.startswith("tessera_requests_total{"))


def burst(port, stats, expect_restart, width=96):
    """`width` streamed requests at once: more than the scheduler runs and queues (8 + 64),
    so some must be answered 429 with Retry-After."""
    def one(i):
        rng = random.Random(10_000 + i)
        one_request(port, "burst", rng, stats, expect_restart)
    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(width)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)


def run_load(port, seconds, clients, stats, budget, expect_restart, seed, rss, pids,
             with_burst=False):
    stop = threading.Event()
    deadline = time.time() + seconds
    threads = [threading.Thread(target=client, daemon=True,
                                args=(port, seed + i, deadline, stats, budget, expect_restart, stop))
               for i in range(clients)]

    def sample():
        while not stop.is_set():
            for p in pids():
                rss[p] = max(rss.get(p, 0), status_kib(p, "VmRSS"))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for t in threads:
        t.start()
    if with_burst:
        time.sleep(seconds / 2)
        burst(port, stats, expect_restart)
    for t in threads:
        t.join(timeout=seconds + 300)
        if t.is_alive():
            stats.fail("a client thread hung past the deadline")
    stop.set()
    sampler.join(timeout=5)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--tp", type=int, default=3)
    ap.add_argument("--max-requests", type=int, default=100_000)
    ap.add_argument("--idle", type=int, default=16)
    ap.add_argument("--prefill", type=int, default=0,
                    help="serve disaggregated: this many prefill replicas behind the router")
    ap.add_argument("--decode", type=int, default=1)
    ap.add_argument("--report")
    args = ap.parse_args()
    port = free_port()
    log = open(os.environ.get("SOAK_LOG", "/dev/null"), "w")
    proc = start_local(args, port, log)
    report = {"tp": args.tp, "clients": args.clients, "seconds": args.seconds,
              "prefill": args.prefill, "decode": args.decode if args.prefill else 0}
    checks = []

    def check(name, ok, detail=""):
        checks.append((name, bool(ok), detail))

    try:
        report["ready_s"] = round(wait_ready(port, proc, 300), 1)
        pids = lambda: children(proc.pid)  # noqa: E731
        model_mib = os.path.getsize(args.model) / 2**20
        # Idle connections: opened now, never send a byte.
        idle = []
        for _ in range(args.idle):
            s = socket.create_connection(("127.0.0.1", port))
            s.settimeout(0.5)
            idle.append(s)
        t_idle = time.time()

        stats = Stats()
        expect_restart = threading.Event()
        budget = {"lock": threading.Lock(), "left": args.max_requests}
        rss = {}
        phase1 = max(10.0, args.seconds * 0.8)
        run_load(port, phase1, args.clients, stats, budget, expect_restart, 1, rss, pids,
                 with_burst=True)
        m1 = settle(port)
        finished1 = finished_total(m1)
        check("phase 1: tessera_requests_total equals the sequences clients had accepted",
              finished1 == stats.accepted_sequences,
              f"metrics {finished1:.0f}, clients {stats.accepted_sequences}")
        closed = 0
        if time.time() - t_idle > 31:
            for s in idle:
                try:
                    closed += s.recv(1) == b""
                except (socket.timeout, OSError) as e:
                    closed += isinstance(e, ConnectionResetError)
            check("idle connections closed by the server after its header timeout",
                  closed == len(idle), f"{closed} of {len(idle)}")
        for s in idle:
            s.close()
        report["idle_closed"] = f"{closed} of {len(idle)}"

        # Phase 2: kill a rank with requests in flight, restart, serve again.
        ranks = pids()
        victim = ranks[-1] if ranks else None
        expect_restart.set()
        inflight = threading.Thread(target=run_load, daemon=True,
                                    args=(port, 8, 4, stats, budget, expect_restart, 1000, rss, pids))
        inflight.start()
        time.sleep(3)
        t_kill = time.time()
        if victim:
            os.kill(victim, signal.SIGKILL)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            rc = None
        report["group_exit_s"] = round(time.time() - t_kill, 1)
        check("a killed rank ends the group (local exits non-zero)", rc not in (None, 0), f"rc {rc}")
        inflight.join(timeout=240)
        check("requests in flight at the kill all ended", not inflight.is_alive())
        peak_before_restart = dict(rss)
        proc = start_local(args, port, log)
        report["restart_ready_s"] = round(wait_ready(port, proc, 300), 1)
        expect_restart.clear()
        before = stats.accepted_sequences
        run_load(port, max(5.0, args.seconds * 0.2), args.clients, stats, budget, expect_restart,
                 2000, rss, pids)
        m2 = settle(port)
        check("after the restart: tessera_requests_total equals the sequences accepted",
              finished_total(m2) == stats.accepted_sequences - before,
              f"metrics {finished_total(m2):.0f}, clients {stats.accepted_sequences - before}")
        # Memory: every rank under its model share plus the KV budget of its sequences.
        kv_per_token = 30 * 3 * 64 * 2 * 4 / args.tp  # test model: layers x kv heads x head dim
        bound_mib = model_mib + 8 * 4096 * kv_per_token / 2**20 + 256
        peak_mib = max(list(rss.values()) + list(peak_before_restart.values()) + [0]) / 1024
        report["peak_rss_mib_per_rank"] = round(peak_mib, 1)
        report["rss_bound_mib"] = round(bound_mib, 1)
        check("peak RSS of every rank within its bound", 0 < peak_mib <= bound_mib,
              f"{peak_mib:.0f} MiB <= {bound_mib:.0f} MiB")
        check("no unexpected status, 5xx other than 503, or refusal without Retry-After",
              not stats.failures, "; ".join(stats.failures[:8]))
        for kind in ("stream_chat", "complete", "oversized", "malformed", "invalid", "long_prompt"):
            check(f"exercised: {kind}", stats.by_kind.get(kind, 0) > 0)
        check("the burst beyond the queue was answered 429 (with Retry-After) in part",
              stats.statuses.get("burst:429", 0) > 0 and stats.statuses.get("burst:200", 0) > 0,
              f"{stats.statuses.get('burst:200', 0)} served, {stats.statuses.get('burst:429', 0)} refused")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()

    report.update({
        "requests": stats.requests,
        "by_kind": stats.by_kind,
        "statuses": dict(sorted(stats.statuses.items())),
        "errors": stats.errors,
        "whole_response_s": {"p50": pct(stats.latency, 50), "p99": pct(stats.latency, 99),
                             "n": len(stats.latency)},
        "stream_to_done_s": {"p50": pct(stats.stream_total, 50),
                             "p99": pct(stats.stream_total, 99), "n": len(stats.stream_total)},
        "ttft_s": {"p50": pct(stats.ttft, 50), "p99": pct(stats.ttft, 99), "n": len(stats.ttft)},
        "refusal_s": {"p50": pct(stats.refusal, 50), "p99": pct(stats.refusal, 99),
                      "n": len(stats.refusal)},
        "accepted_sequences": stats.accepted_sequences,
        "overloaded": stats.overloaded,
        "checks": [{"check": n, "ok": ok, "detail": d} for n, ok, d in checks],
    })
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps({k: v for k, v in report.items() if k != "checks"}, indent=1))
    failed = 0
    for n, ok, d in checks:
        print(f"{'ok  ' if ok else 'FAIL'} {n}{': ' + d if d else ''}")
        failed += not ok
    print(f"{len(checks) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
