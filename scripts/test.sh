#!/usr/bin/env bash
# The whole test suite, as CI runs it. Installs what it needs (the test model and llama.cpp's
# tokenizer test vocabularies into models/, Helm and Python packages into .tools/) and runs:
# rustfmt, clippy, every Rust test, the chart checks, a 45-second soak of the worker under hostile
# traffic with a killed rank (scripts/soak.sh), and the real engines (vLLM's and SGLang's
# parsers on every rendered argument list; a real vLLM on CPU through the rendered command:
# scripts/engine-check.sh, which installs them once into .tools/engines, about 4.5 GB).
# Usage: scripts/test.sh            (from anywhere inside the repository)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

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

step "engines: vLLM and SGLang parsers, a real vLLM on CPU (scripts/engine-check.sh)"
scripts/engine-check.sh

step "all checks passed"
