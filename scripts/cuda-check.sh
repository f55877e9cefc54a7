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
# TESSERA_CUDA_COMPARE=1 (the GPU run also runs the CPU forward pass and gates on the prompt's
# logits agreeing within 5% of the largest logit: the CPU quantises activations to 8 bits, CUDA
# computes in f16, so identical tokens are reported, not required), checks the GPU answer mentions
# Paris, and reports tokens/s of both. Then the serving path: `tessera-worker local --device cuda`
# (the same `serve` a pod runs; TP=3 over NCCL when 3 GPUs are visible, else TP=1) answers the
# OpenAI chat request with Paris, and 8 concurrent completions of 128 tokens give the serving
# tokens/s. Exit status: 0 when every check passed; 1 when one failed; 2 when there is no GPU
# (nothing was checked: that is not a pass).
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
check "cuda run exits 0 (prompt logits within 5% of the CPU path's)" "$([ "$rc" = 0 ] && echo 1 || echo 0)"
cmp -s "$out/cpu.txt" "$out/cuda.txt" && echo "(info) cuda text equals cpu text" || echo "(info) cuda text differs from cpu text (allowed: see the logits gate)"
check "cuda answer mentions Paris" "$(grep -q Paris "$out/cuda.txt" && echo 1 || echo 0)"

# Decode speed over a longer generation (no comparison).
"$bin" generate --model "$model" --prompt "Write a long story about a lighthouse." --chat \
  --max-tokens 256 --device cuda >/dev/null 2>"$out/speed.err" || true
echo "--- cuda, 256 tokens: $(grep '^load' "$out/speed.err" || cat "$out/speed.err")"

# The serving path: `local` runs `serve` per rank, as a pod does.
gpus=$(nvidia-smi -L | wc -l)
tp=1
[ "$gpus" -ge 3 ] && tp=3
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
TESSERA_SERVED_MODEL_NAME=m "$bin" local --model "$model" --tp "$tp" --port "$port" --device cuda >"$out/local.out" 2>"$out/local.err" &
local_pid=$!
trap 'kill $local_pid 2>/dev/null || true' EXIT
ready=0
for _ in $(seq 1 120); do
  if curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; then ready=1; break; fi
  sleep 1
done
check "serve --device cuda (tp=$tp) becomes ready" "$ready"
grep -E "running the model on|f16 weights on GPU|NCCL" "$out/local.err" | head -8 || true
if [ "$ready" = 1 ]; then
  answer=$(curl -s "http://127.0.0.1:$port/v1/chat/completions" -H 'content-type: application/json' \
    -d "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"$prompt\"}],\"max_tokens\":32,\"temperature\":0}")
  echo "--- serve: $answer"
  check "serve on cuda answers with Paris" "$(echo "$answer" | grep -q Paris && echo 1 || echo 0)"
  start=$(date +%s.%N)
  for i in $(seq 1 8); do
    curl -s "http://127.0.0.1:$port/v1/completions" -H 'content-type: application/json' \
      -d '{"model":"m","prompt":"Once upon a time","max_tokens":128,"temperature":0,"ignore_eos":true}' \
      >"$out/c$i.json" &
  done
  wait $(jobs -p | grep -v "^$local_pid$") 2>/dev/null || true
  end=$(date +%s.%N)
  tokens=$(cat "$out"/c*.json | python3 -c 'import json,sys
n=0
for line in sys.stdin.read().replace("}{","}\n{").splitlines():
    try: n += json.loads(line)["usage"]["completion_tokens"]
    except Exception: pass
print(n)')
  echo "--- serve on cuda (tp=$tp): $tokens tokens from 8 concurrent completions in $(python3 -c "print(f'{$end-$start:.2f}')") s = $(python3 -c "print(f'{$tokens/($end-$start):.1f}')") tokens/s"
  check "serve on cuda completes 8 concurrent requests" "$([ "$tokens" -gt 0 ] && echo 1 || echo 0)"
fi
kill "$local_pid" 2>/dev/null || true
wait "$local_pid" 2>/dev/null || true
tail -5 "$out/local.err"

echo
echo "summary: $fails failed"
[ "$fails" = 0 ]
