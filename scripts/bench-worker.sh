#!/usr/bin/env bash
# Prompt (prefill) and decode speed of tessera-worker's CPU core on the test model, side by side
# with llama.cpp (through llama-cpp-python) when it is installed: same GGUF, same thread count,
# same prompt tokens, greedy, the same number of decode steps (end-of-sequence tokens do not stop
# either), alternating runs; plus peak RSS of each.
#
# Usage: scripts/bench-worker.sh [THREADS] [DECODE_TOKENS] [RUNS]
#   MODEL=path.gguf                    another GGUF (default: the test model)
#   LLAMA_CPP_PYTHON=/path/to/python   a Python with llama_cpp importable (default: python3);
#                                      build it with the CMAKE_ARGS in docs/worker.md.
# Prints one line per run and the medians; results go to docs/worker.md by hand.
set -euo pipefail
cd "$(dirname "$0")/.."

THREADS=${1:-2}
TOKENS=${2:-128}
RUNS=${3:-3}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
PY=${LLAMA_CPP_PYTHON:-python3}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
BIN=$CARGO_TARGET_DIR/release/tessera-worker

scripts/fetch-model.sh >/dev/null
cargo build --release -p tessera-worker --quiet

PROMPT="The history of the city of Paris begins about 250 BC, when a tribe of Celtic Senones known as the Parisii settled on the banks of the Seine. In 52 BC, a Roman army defeated them and founded a town called Lutetia. Over the following centuries the town grew into a Gallo-Roman city with a forum, baths and an amphitheatre. Write a short story about a young merchant who arrives in the city during that time:"

have_llama=0
if "$PY" -c 'import llama_cpp' 2>/dev/null; then have_llama=1; fi

rss() { awk -F': ' '/Maximum resident set size/ {printf "%.0f", $2/1024}' "$1"; }

tessera_run() {
  local log; log=$(mktemp)
  /usr/bin/time -v "$BIN" generate --model "$MODEL" --prompt "$PROMPT" --max-tokens "$TOKENS" \
    --threads "$THREADS" --ignore-eos >/dev/null 2>"$log"
  # "prompt N tokens in S s (P tokens/s); generated G tokens, D decode steps in T s (R tokens/s)"
  local line; line=$(grep '^load ' "$log")
  local pp dd
  pp=$(sed -E 's/.*prompt ([0-9]+) tokens in [0-9.]+ s \(([0-9.]+) tokens\/s\).*/\2 (\1 tokens)/' <<<"$line")
  dd=$(sed -E 's/.*generated ([0-9]+) tokens, [0-9]+ decode steps in [0-9.]+ s \(([0-9.]+) tokens\/s\).*/\2 (\1 tokens)/' <<<"$line")
  echo "tessera   prefill ${pp} tok/s  decode ${dd} tok/s  peak RSS $(rss "$log") MiB"
  rm -f "$log"
}

llama_run() {
  local log; log=$(mktemp)
  /usr/bin/time -v "$PY" - "$MODEL" "$THREADS" "$TOKENS" "$PROMPT" >"$log.out" 2>"$log" <<'PY'
import sys, time, llama_cpp
model, threads, n, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
m = llama_cpp.Llama(model, n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
                    verbose=False)
ids = m.tokenize(prompt.encode(), add_bos=False, special=False)
m.reset()
t = time.perf_counter(); m.eval(ids); prefill = time.perf_counter() - t
out = []
t = time.perf_counter()
for i in range(n):
    tok = int(m.scores[m.n_tokens - 1].argmax())
    if i == n - 1:  # past end-of-sequence tokens too, as tessera's --ignore-eos
        out.append(tok)
        break
    out.append(tok)
    m.eval([tok])
decode = time.perf_counter() - t
steps = len(out) - 1
print(f"{len(ids) / prefill:.1f} ({len(ids)} tokens) {steps / max(decode, 1e-9):.1f} ({len(out)} tokens)")
PY
  read -r p pn _ d dn _ <"$log.out"
  echo "llama.cpp prefill ${p} ${pn} tokens) tok/s  decode ${d} ${dn} tokens) tok/s  peak RSS $(rss "$log") MiB"
  rm -f "$log" "$log.out"
}

echo "model $MODEL, $THREADS threads, $TOKENS decode tokens, $RUNS runs each (alternating)"
results=$(mktemp)
for _ in $(seq "$RUNS"); do
  tessera_run | tee -a "$results"
  if [ "$have_llama" = 1 ]; then llama_run | tee -a "$results"; fi
done
if [ "$have_llama" = 0 ]; then
  echo "(llama_cpp not importable by $PY: comparison skipped; set LLAMA_CPP_PYTHON)"
fi
echo "--- medians"
python3 - "$results" <<'PY'
import re, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name = line.split()[0] + ("" if line.startswith("tessera") else "")
    nums = re.findall(r"prefill ([0-9.]+).*decode ([0-9.]+).*RSS ([0-9]+)", line)[0]
    rows.setdefault(line.split(" prefill")[0].strip(), []).append([float(x) for x in nums])
med = {k: [statistics.median(c) for c in zip(*v)] for k, v in rows.items()}
for k, (p, d, r) in med.items():
    print(f"{k:10} prefill {p:7.1f} tok/s  decode {d:6.1f} tok/s  peak RSS {r:.0f} MiB")
if "tessera" in med and "llama.cpp" in med:
    t, l = med["tessera"], med["llama.cpp"]
    print(f"tessera / llama.cpp: prefill {t[0] / l[0]:.2f}x  decode {t[1] / l[1]:.2f}x")
PY
rm -f "$results"
