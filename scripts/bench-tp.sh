#!/usr/bin/env bash
# Tensor parallelism over loopback TCP on the test model: decode tokens/s at TP=1 and TP=3 (each
# rank a process of its own), the share of TP=3 decode time spent in all-reduce, the measured
# all-reduce time per call for the model's hidden size (576 floats) and a 64-token prefill
# message against the planner's cost model (ring: 2(n-1)/n x bytes / bandwidth + 2(n-1) x
# latency; and the leader star this worker uses: 2(n-1) x bytes / bandwidth + 2 x latency) with
# loopback bandwidth and latency measured in the same run, and peak RSS (VmHWM) per rank.
#
# Usage: scripts/bench-tp.sh [DECODE_TOKENS] [TP1_THREADS] [TP3_THREADS_PER_RANK] [CALLS]
#   defaults: 64 tokens, 2 threads at TP=1, 1 thread per rank at TP=3, 2000 all-reduces.
#
# Pipeline parallelism instead: scripts/bench-tp.sh --pp P [DECODE_TOKENS] [TP1_THREADS]
#   [THREADS_PER_RANK]: prefill and decode tokens/s of TP=1 against TP=1 x PP=P (P processes,
#   one stage each) and peak RSS per rank; defaults: 64 tokens, 2 threads, 1 thread per rank.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--pp" ]; then
  PP=${2:?--pp needs the number of stages}
  TOKENS=${3:-64}
  T1=${4:-2}
  TR=${5:-1}
  MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
  BIN=$CARGO_TARGET_DIR/release/examples/bench_tp
  scripts/fetch-model.sh >/dev/null
  cargo build --release -p tessera-worker --example bench_tp --quiet
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$BIN" rank --rank 0 --world 1 --port 0 --model "$MODEL" --threads "$T1" --tokens "$TOKENS" \
    --calls 0 >"$out/tp1.json"
  pids=()
  for ((r = 0; r < PP; r++)); do
    "$BIN" rank --rank $r --world "$PP" --pp "$PP" --port "$port" --model "$MODEL" \
      --threads "$TR" --tokens "$TOKENS" --calls 0 >"$out/pp-$r.json" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  python3 - "$out" "$PP" <<'EOF'
import json, sys, os
d, pp = sys.argv[1], int(sys.argv[2])
load = lambda f: json.load(open(os.path.join(d, f)))
tp1 = load("tp1.json")
ranks = [load(f"pp-{r}.json") for r in range(pp)]
lead = ranks[0]
print(f"| | TP=1 | TP=1 x PP={pp} ({pp} processes) |")
print("|---|---|---|")
print(f"| threads per rank | {tp1['threads']} | {lead['threads']} |")
print(f"| prefill tokens/s ({tp1['prompt_tokens']} tokens) | {tp1['prefill_tokens_per_s']:.1f} | {lead['prefill_tokens_per_s']:.1f} |")
print(f"| decode tokens/s ({tp1['decode_tokens']} tokens) | {tp1['decode_tokens_per_s']:.1f} | {lead['decode_tokens_per_s']:.1f} |")
rss = ", ".join(f"{r['vm_hwm_kib'] / 1024:.0f}" for r in ranks)
print(f"| peak RSS per rank (VmHWM, MiB) | {tp1['vm_hwm_kib'] / 1024:.0f} | {rss} |")
EOF
  exit 0
fi

TOKENS=${1:-64}
T1=${2:-2}
T3=${3:-1}
CALLS=${4:-2000}
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
BIN=$CARGO_TARGET_DIR/release/examples/bench_tp

scripts/fetch-model.sh >/dev/null
cargo build --release -p tessera-worker --example bench_tp --quiet

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

"$BIN" net >"$out/net.json"

"$BIN" rank --rank 0 --world 1 --port 0 --model "$MODEL" --threads "$T1" --tokens "$TOKENS" \
  --calls "$CALLS" >"$out/tp1.json"

port=$(free_port)
pids=()
for r in 0 1 2; do
  "$BIN" rank --rank $r --world 3 --port "$port" --model "$MODEL" --threads "$T3" \
    --tokens "$TOKENS" --calls "$CALLS" >"$out/tp3-$r.json" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done

python3 - "$out" <<'EOF'
import json, sys, os
d = sys.argv[1]
load = lambda f: json.load(open(os.path.join(d, f)))
net, tp1 = load("net.json"), load("tp1.json")
tp3 = [load(f"tp3-{r}.json") for r in range(3)]
lat, bw = net["latency_s"], net["bandwidth_bytes_per_s"]
n = 3
def ring(b): return 2 * (n - 1) / n * b / bw + 2 * (n - 1) * lat
def star(b): return 2 * (n - 1) * b / bw + 2 * lat
us = lambda s: f"{s * 1e6:.1f} us"
lead = tp3[0]
print(f"loopback: latency {us(lat)} (half round trip, median of 5 batches; best {us(net['latency_best_s'])}), bandwidth {bw / 1e9:.2f} GB/s")
print()
print("| | TP=1 | TP=3 (3 processes) |")
print("|---|---|---|")
print(f"| threads per rank | {tp1['threads']} | {lead['threads']} |")
print(f"| prefill tokens/s ({tp1['prompt_tokens']} tokens) | {tp1['prefill_tokens_per_s']:.1f} | {lead['prefill_tokens_per_s']:.1f} |")
print(f"| decode tokens/s ({tp1['decode_tokens']} tokens) | {tp1['decode_tokens_per_s']:.1f} | {lead['decode_tokens_per_s']:.1f} |")
share = lead["decode_allreduce_s"] / lead["decode_s"]
calls = lead["decode_allreduce_calls"]
print(f"| decode time in all-reduce (rank 0) | - | {100 * share:.1f} % ({calls} calls, {us(lead['decode_allreduce_s'] / max(calls, 1))} each) |")
rss = ", ".join(f"{r['vm_hwm_kib'] / 1024:.0f}" for r in tp3)
print(f"| peak RSS per rank (VmHWM, MiB) | {tp1['vm_hwm_kib'] / 1024:.0f} | {rss} |")
res = lambda r: (r["mapped_rss_kib"] * 1024 + r["copied_weight_bytes"]) / 2**20
one = res(tp1)
print(f"| weights resident per rank after decode (mapped pages + copies, MiB) | {one:.1f} | "
      + ", ".join(f"{res(r):.1f} ({res(r) / one:.2f}x)" for r in tp3) + " |")
print()
h = lead["hidden"]
print("| all-reduce, 3 ranks | bytes | measured per call | cost model: ring | leader star |")
print("|---|---|---|---|---|")
for name, key, b in [(f"hidden size ({h} floats)", "allreduce_hidden_s", 4 * h),
                     (f"64-token prefill ({64 * h} floats)", "allreduce_64_tokens_s", 4 * 64 * h)]:
    print(f"| {name} | {b} | {us(lead[key])} | {us(ring(b))} | {us(star(b))} |")
EOF
