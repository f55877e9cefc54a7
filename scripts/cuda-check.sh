#!/usr/bin/env bash
# CUDA path check, for a machine with an NVIDIA GPU, its driver and the CUDA 12 runtime libraries
# (libcuda, libcublas, libnvrtc).
#
#   scripts/cuda-check.sh [TESSERA_WORKER_BINARY] [MODEL]
#
# Without a binary it builds `cargo build --release -p tessera-worker --features cuda`; GPU machines
# without a Rust toolchain take a binary built elsewhere with that command (the CUDA libraries are
# loaded at run time, so it builds without a CUDA toolkit). MODEL defaults to the test model
# (scripts/fetch-model.sh). It runs the France prompt greedily on the CPU and on the GPU, with
# TESSERA_CUDA_COMPARE=1 (the GPU run also runs the CPU forward pass and compares the prompt's
# logits and the greedy tokens), checks that the texts are identical and mention Paris, and reports
# tokens/s of both. Exit status: 0 when every check passed; 1 when one failed; 2 when there is no
# GPU (nothing was checked: that is not a pass).
set -euo pipefail
cd "$(dirname "$0")/.."

bin="${1:-}"
model="${2:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
if [ -z "$bin" ]; then
  cargo build --release -p tessera-worker --features cuda
  bin=target/release/tessera-worker
fi
[ -x "$bin" ] || { echo "cuda-check: $bin is not an executable" >&2; exit 1; }
[ -f "$model" ] || { echo "cuda-check: model $model is missing (scripts/fetch-model.sh)" >&2; exit 1; }

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "cuda-check: NO GPU on this machine (nvidia-smi missing or sees no GPU): nothing was checked" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

out=$(mktemp -d)
prompt="What is the capital of France?"
args=(generate --model "$model" --prompt "$prompt" --chat --max-tokens 32)
fails=0
check() { if [ "$2" = 1 ]; then echo "[PASS] $1"; else echo "[FAIL] $1"; fails=$((fails + 1)); fi; }

"$bin" "${args[@]}" --device cpu >"$out/cpu.txt" 2>"$out/cpu.err" || true
rc=0
TESSERA_CUDA_COMPARE=1 "$bin" "${args[@]}" --device cuda >"$out/cuda.txt" 2>"$out/cuda.err" || rc=$?
echo "--- cpu:  $(cat "$out/cpu.txt")"
grep '^load' "$out/cpu.err" || cat "$out/cpu.err"
echo "--- cuda: $(cat "$out/cuda.txt")"
cat "$out/cuda.err"
check "cuda run exits 0 (tokens identical to the CPU path's)" "$([ "$rc" = 0 ] && echo 1 || echo 0)"
check "cuda text equals cpu text" "$(cmp -s "$out/cpu.txt" "$out/cuda.txt" && echo 1 || echo 0)"
check "cuda answer mentions Paris" "$(grep -q Paris "$out/cuda.txt" && echo 1 || echo 0)"

# Decode speed over a longer generation (no comparison).
"$bin" generate --model "$model" --prompt "Write a long story about a lighthouse." --chat \
  --max-tokens 256 --device cuda >/dev/null 2>"$out/speed.err" || true
echo "--- cuda, 256 tokens: $(grep '^load' "$out/speed.err" || cat "$out/speed.err")"

echo
echo "summary: $fails failed"
[ "$fails" = 0 ]
