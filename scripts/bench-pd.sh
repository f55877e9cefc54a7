#!/usr/bin/env bash
# Prefill/decode disaggregation against aggregated serving on loopback (scripts/bench-pd.py):
# `local --prefill 1 --decode 1` against two aggregated `local --tp 1` replicas behind a
# round-robin (the same two rank processes and threads) and one aggregated replica with the
# threads of both, under the same load of streamed completions of mixed prompt lengths. Prints
# TTFT and inter-token latency p50/p99, output tokens/s, and the KV hand-over time per request
# against bytes / measured loopback bandwidth. Release build; bounded (every request 300 s at
# most; about 3 minutes on 2 cores with the defaults).
#
# Usage: scripts/bench-pd.sh [REQUESTS=32] [CONCURRENCY=8] [MAX_TOKENS=64] [THREADS_PER_RANK=1]
#   BENCH_PD_ONLY=pd-1+1,agg-x2   run only these deployments (agg-x2, pd-1+1, agg-x1)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh >/dev/null
cargo build --quiet --release --locked -p tessera-worker
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
exec python3 scripts/bench-pd.py --worker "$target_dir/release/tessera-worker" \
  --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
  --requests "${1:-32}" --concurrency "${2:-8}" --max-tokens "${3:-64}" --threads "${4:-1}" \
  --only "${BENCH_PD_ONLY:-agg-x2,pd-1+1,agg-x1}"
