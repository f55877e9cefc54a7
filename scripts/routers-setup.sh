#!/usr/bin/env bash
# Install the routers Tessera renders in front of prefill/decode pools, each into its own
# Python environment (their dependencies do not mix with the engines'), for
# scripts/engine-check.sh, which feeds them the rendered router arguments:
# - sglang-router 0.3.2 (`python3 -m sglang_router.launch_router --pd-disaggregation`), into
#   .tools/routers/sglang;
# - vllm-router 0.1.17 (`vllm-router --vllm-pd-disaggregation`), into .tools/routers/vllm.
# About 280 MB. Idempotent: a stamp file per environment records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PIP_NO_CACHE_DIR=${PIP_NO_CACHE_DIR:-1}
install() { # DIR PACKAGE==VERSION
  local dir=$1 want=$2
  if [ "$(cat "$dir/.installed" 2>/dev/null)" = "$want" ]; then
    return
  fi
  echo "installing $want into $dir ..." >&2
  [ -x "$dir/bin/python" ] || "$PYTHON" -m venv "$dir"
  "$dir/bin/pip" install --quiet --disable-pip-version-check "$want"
  echo "$want" > "$dir/.installed"
}
install .tools/routers/sglang sglang-router==0.3.2
install .tools/routers/vllm vllm-router==0.1.17
echo "routers present: .tools/routers"
