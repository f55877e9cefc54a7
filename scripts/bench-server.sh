#!/usr/bin/env bash
# Aggregate decode tokens/s of the OpenAI-compatible server through HTTP with 1, 4 and 8
# concurrent clients (or the levels given), on the test model.
#
# Usage: scripts/bench-server.sh [THREADS] [MAX_TOKENS] [REQUESTS_PER_CLIENT] [LEVELS...]
#   THREADS              CPU threads of the model (default 2)
#   MAX_TOKENS           tokens generated per request, exactly (ignore_eos; default 64)
#   REQUESTS_PER_CLIENT  requests each client sends one after another (default 2)
#   LEVELS               concurrency levels (default: 1 4 8)
#   TESSERA_URL=http://HOST:PORT  benchmark a server that is already running (for example
#                        `tessera-worker local ... --port P`) instead of starting one.
#
# Without TESSERA_URL the script builds the release binary and starts
# `tessera-worker local --model models/SmolLM2-135M-Instruct.Q4_1.gguf --tp 1` on a free port.
# Each request is a text completion of a fixed prompt with temperature 0 and ignore_eos, so every
# request generates exactly MAX_TOKENS tokens. Printed per level: requests, generated tokens, wall
# time, aggregate tokens/s (generated tokens / wall time), mean per-request latency and mean
# time to first token (from streamed requests).
set -euo pipefail
cd "$(dirname "$0")/.."

THREADS=${1:-2}
TOKENS=${2:-64}
PER_CLIENT=${3:-2}
shift $(( $# < 3 ? $# : 3 ))
LEVELS=${*:-1 4 8}

pid=
cleanup() { if [[ -n $pid ]]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi; }
trap cleanup EXIT

if [[ -z ${TESSERA_URL:-} ]]; then
  scripts/fetch-model.sh >/dev/null
  cargo build --quiet --release --locked -p tessera-worker
  target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$target_dir/release/tessera-worker" local --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
    --tp 1 --port "$port" --threads "$THREADS" >/dev/null 2>&1 &
  pid=$!
  TESSERA_URL=http://127.0.0.1:$port
  for _ in $(seq 300); do
    curl -sf "$TESSERA_URL/readyz" >/dev/null 2>&1 && break
    sleep 0.1
  done
fi
MODEL_NAME=$(curl -sf "$TESSERA_URL/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
echo "server $TESSERA_URL ($MODEL_NAME), $THREADS threads, $TOKENS tokens per request, $PER_CLIENT requests per client"

python3 - "$TESSERA_URL" "$MODEL_NAME" "$TOKENS" "$PER_CLIENT" $LEVELS <<'PY'
import http.client, json, sys, threading, time, urllib.parse

url, model, tokens, per_client = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
levels = [int(x) for x in sys.argv[5:]]
u = urllib.parse.urlparse(url)
PROMPT = ("The history of the city of Paris begins about 250 BC, when a tribe of Celtic Senones "
          "known as the Parisii settled on the banks of the Seine. Write a short story:")

def one(stream):
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
                       "ignore_eos": True, "stream": stream,
                       **({"stream_options": {"include_usage": True}} if stream else {})})
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise SystemExit(f"HTTP {r.status}: {r.read()[:200]!r}")
    ttft, usage = None, None
    if stream:
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ttft is None and ev["choices"] and ev["choices"][0]["text"]:
                ttft = time.perf_counter() - t0
            if ev.get("usage"):
                usage = ev["usage"]
    else:
        usage = json.loads(r.read())["usage"]
    c.close()
    return time.perf_counter() - t0, ttft, usage["completion_tokens"]

one(False)  # warm-up
print(f"{'clients':>7} {'requests':>8} {'tokens':>7} {'wall s':>7} {'agg tok/s':>9} "
      f"{'latency s':>9} {'TTFT s':>7}")
for n in levels:
    results, lock = [], threading.Lock()
    def client(i):
        for j in range(per_client):
            r = one(stream=(j % 2 == 0))
            with lock:
                results.append(r)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads: t.start()
    for t in threads: t.join()
    wall = time.perf_counter() - t0
    gen = sum(r[2] for r in results)
    lat = sum(r[0] for r in results) / len(results)
    ttfts = [r[1] for r in results if r[1] is not None]
    ttft = sum(ttfts) / len(ttfts) if ttfts else float("nan")
    print(f"{n:>7} {len(results):>8} {gen:>7} {wall:>7.2f} {gen / wall:>9.1f} {lat:>9.2f} {ttft:>7.3f}")
PY
