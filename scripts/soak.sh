#!/usr/bin/env bash
# Soak and fault harness (scripts/soak.py): `tessera-worker local` on the test model under a
# random mix of valid, hostile and abandoned requests, a killed rank and a restarted group, on
# loopback only, bounded in time (SOAK_SECONDS, default 60) and requests (SOAK_MAX_REQUESTS).
#
#   scripts/soak.sh                         # 60 s, debug build (what scripts/test.sh runs)
#   SOAK_SECONDS=600 SOAK_RELEASE=1 scripts/soak.sh   # the 10-minute run in docs/benchmarks.md
#   SOAK_PREFILL=1 SOAK_DECODE=1 SOAK_TP=1 scripts/soak.sh  # the same through the prefill/decode
#                                                          # router (local --prefill/--decode)
#
# SOAK_REPORT=FILE keeps the JSON report; SOAK_LOG=FILE keeps the worker's log.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh >/dev/null
profile=debug
flags=()
if [ "${SOAK_RELEASE:-0}" = 1 ]; then profile=release; flags=(--release); fi
cargo build --quiet --locked -p tessera-worker "${flags[@]}"
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
exec python3 scripts/soak.py --worker "$target_dir/$profile/tessera-worker" \
  --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
  --seconds "${SOAK_SECONDS:-60}" --clients "${SOAK_CLIENTS:-12}" --tp "${SOAK_TP:-3}" \
  --max-requests "${SOAK_MAX_REQUESTS:-100000}" ${SOAK_REPORT:+--report "$SOAK_REPORT"} \
  --prefill "${SOAK_PREFILL:-0}" --decode "${SOAK_DECODE:-1}"
