#!/usr/bin/env bash
# Check the vLLM and SGLang command lines Tessera renders with the engines' own argument
# parsers: installs SGLang 0.5.23 and vLLM 0.33.0 (without their GPU kernels, --no-deps, plus what
# importing their parsers needs: tests/engines/requirements.txt, about 6 GB with torch) into
# .tools/engines, renders examples/engines with `tessera-operator plan -o yaml` and parses every
# pod's arguments (tests/engines/check_engine_args.py). Not part of scripts/test.sh yet (size).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.tools/engines
stamp="$VENV/.installed"
want="sglang==0.5.23 vllm==0.33.0 $(sha256sum tests/engines/requirements.txt | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing the engines' parsers into $VENV (several GB, once) ..." >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/engines/requirements.txt
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps sglang==0.5.23 vllm==0.33.0
  echo "$want" > "$stamp"
fi
cargo build --quiet --locked -p tessera-operator
target_dir=$(cargo metadata --format-version 1 --no-deps | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
TESSERA_OPERATOR="$target_dir/debug/tessera-operator" "$VENV/bin/python" tests/engines/check_engine_args.py 2>&1 \
  | grep -v -E '^(W[0-9]{4}|INFO|WARNING) '
