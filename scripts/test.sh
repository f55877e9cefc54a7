#!/usr/bin/env bash
# The whole test suite, as CI runs it. Installs what it needs (the test model and llama.cpp's
# tokenizer test vocabularies into models/, Helm and Python packages into .tools/) and runs:
# rustfmt, clippy, every Rust test, the chart checks, a 45-second soak of the worker under hostile
# traffic with a killed rank (scripts/soak.sh), and the real engines (vLLM's and SGLang's
# parsers on every rendered argument list; a real vLLM on CPU through the rendered command:
# scripts/engine-check.sh, which installs them once into .tools/engines, about 6.5 GB).
# Usage: scripts/test.sh            (from anywhere inside the repository)
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step's header shows the disk space left: a CI machine once ran out of it while installing
# the engines, and this tells at a glance which step used what.
step() { printf '\n==> %s   [%s free]\n' "$*" "$(df -h --output=avail . | tail -1 | tr -d ' ')"; }

# pip's HTTP cache would keep a second copy of every wheel (torch and its CUDA libraries alone are
# about 3.5 GB) that no later step reads: the installs below are once per checkout.
export PIP_NO_CACHE_DIR=1

# One full build per run: incremental caches would add about 1 GB to target/ for nothing (CI builds
# from scratch). Set CARGO_INCREMENTAL=1 to keep them when iterating locally.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo clippy -p tessera-worker --features cuda (the CUDA path; builds without a CUDA toolkit)"
cargo clippy -p tessera-worker --features cuda --all-targets --locked -- -D warnings

step "test model (scripts/fetch-model.sh)"
scripts/fetch-model.sh

step "tokenizer test vocabularies (scripts/fetch-vocab.sh)"
scripts/fetch-vocab.sh

step "cargo test --workspace"
cargo test --workspace --locked

if [ -x scripts/chart-test.sh ]; then
  step "chart and manifest checks"
  scripts/chart-test.sh
fi

step "soak: hostile traffic, a killed rank and a restarted group, 45 s (scripts/soak.sh)"
SOAK_SECONDS="${SOAK_SECONDS:-45}" scripts/soak.sh

step "soak through the prefill/decode router: the same traffic and a killed replica, 30 s (local --prefill 1 --decode 1)"
SOAK_SECONDS=30 SOAK_PREFILL=1 SOAK_DECODE=1 SOAK_TP=1 scripts/soak.sh

# The engines take about 7 GB once installed (torch with its CUDA libraries, vLLM, SGLang, the
# routers) and a few GB more while installing. The test executables (about 3 GB) are not read again
# by any later step: when the disk is short, drop them rather than fail the install half-way.
if [ ! -f .tools/engines/.installed ]; then
  free_kb=$(df -k --output=avail . | tail -1 | tr -d ' ')
  if [ "$free_kb" -lt $((12 * 1024 * 1024)) ]; then
    target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
    echo "only $((free_kb / 1024 / 1024)) GB free before installing the engines: removing the test executables in $target_dir/debug/deps (rebuilt by the next cargo test)"
    find "$target_dir/debug/deps" -maxdepth 1 -type f -perm -u+x ! -name '*.so' -delete
  fi
fi

step "engines: vLLM and SGLang parsers, a real vLLM on CPU (scripts/engine-check.sh)"
scripts/engine-check.sh

step "all checks passed"
