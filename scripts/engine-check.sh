#!/usr/bin/env bash
# The engines for real (run by scripts/test.sh):
# 1. every vLLM and SGLang argument list that `tessera-operator plan -o yaml` renders for
#    examples/engines and examples/disaggregation is fed to the engine's own parser, and the
#    prefill/decode routers' arguments to sglang-router's and vllm-router's parsers
#    (tests/engines/check_engine_args.py; the routers from scripts/routers-setup.sh);
# 2. a real vLLM end to end on CPU (tests/engines/vllm_e2e.py): with the model URI of
#    examples/engines/smollm2-135m-vllm.yaml pointed at a loopback HTTP server over the test model
#    converted into a Hugging Face directory (cached in models/), the rendered model-fetch init
#    container (`tessera-worker fetch`) downloads it, then the leader command runs as a local
#    process on what was fetched (only addresses and paths substituted);
#    the official OpenAI client asks the France question; `tessera-operator scrape` reads vLLM's
#    real /metrics under load and must decide to scale up.
# The engines are installed once into .tools/engines (scripts/engines-setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh >/dev/null
scripts/engines-setup.sh
scripts/routers-setup.sh
VENV=.tools/engines
HF=models/SmolLM2-135M-Instruct-hf
if [ ! -f "$HF/model.safetensors" ]; then
  echo "converting the test model into $HF ..."
  "$VENV/bin/python" tests/engines/gguf_to_hf.py models/SmolLM2-135M-Instruct.Q4_1.gguf "$HF" 2>&1 \
    | grep -v -E 'it/s\]|^\s*$' || true
  [ -f "$HF/model.safetensors" ] || { echo "engine-check: the conversion failed" >&2; exit 1; }
fi
cargo build --quiet --locked -p tessera-operator -p tessera-worker
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
operator="$target_dir/debug/tessera-operator"
worker="$target_dir/debug/tessera-worker"
quiet() { grep -v -E '^(W[0-9]{4}|INFO|WARNING) |^Triton is installed' || true; }
echo "== engine argument lists through the engines' own parsers"
set -o pipefail
TESSERA_OPERATOR="$operator" VLLM_TARGET_DEVICE=cpu \
  SGLANG_ROUTER_PYTHON=.tools/routers/sglang/bin/python VLLM_ROUTER_PYTHON=.tools/routers/vllm/bin/python \
  "$VENV/bin/python" tests/engines/check_engine_args.py 2>&1 | quiet
echo "== vLLM end to end on CPU"
"$VENV/bin/python" tests/engines/vllm_e2e.py "$operator" "$HF" "$VENV/bin" "$worker"
