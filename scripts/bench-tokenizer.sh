#!/usr/bin/env bash
# Tokenizer speed on hostile 1 MB inputs, side by side with llama.cpp's tokenizer (through
# llama-cpp-python, vocabulary only) when it is installed: the same GGUF vocabulary, the same
# texts, special tokens parsed, one thread each, best and median of RUNS.
#
# Inputs (1 MiB each, generated with a fixed seed):
#   one-word       one 1 MiB "word" of random lowercase letters (BPE merges over the whole piece)
#   same-letter    "aaaa..." (every pair merges; the worst case of the old O(n^2) merge loop)
#   random-chars   random Unicode scalar values (Latin, CJK, emoji, controls, combining marks)
#   random-bytes   random bytes, decoded lossily (what a client sending binary becomes)
#   specials       "<|im_start|>" and "<|im_end|>" repeated, with a letter between some
#   digits         decimal digits (SmolLM2 splits every digit)
#   spaces         spaces and line breaks in long runs
#   prose          English prose repeated
#
# Usage: scripts/bench-tokenizer.sh [RUNS]
#   MODEL=path.gguf                    another GGUF (default: the test model; vocab-only files work)
#   LLAMA_CPP_PYTHON=/path/to/python   a Python with llama_cpp importable (default: python3);
#                                      build it with the CMAKE_ARGS in docs/worker.md.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${1:-3}
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
PY=${LLAMA_CPP_PYTHON:-python3}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}

scripts/fetch-model.sh >/dev/null
cargo build --release -p tessera-worker --example bench_tokenizer --quiet
BIN=$CARGO_TARGET_DIR/release/examples/bench_tokenizer

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
python3 - "$dir" <<'PY'
import random, sys
d = sys.argv[1]
n = 1 << 20
r = random.Random(7)
def put(name, text):
    b = text.encode()[:n]
    open(f"{d}/{name}.txt", "wb").write(b.decode("utf-8", "ignore").encode())
put("one-word", "".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n)))
put("same-letter", "a" * n)
ranges = [(0x20, 0x7e), (0xa0, 0x24f), (0x300, 0x36f), (0x4e00, 0x9fff), (0x1f300, 0x1faff), (0x0, 0x1f)]
chars = []
while len("".join(chars).encode()) < n:
    chars.extend(chr(r.randint(*r.choice(ranges))) for _ in range(4096))
put("random-chars", "".join(chars))
put("random-bytes", bytes(r.getrandbits(8) for _ in range(n)).decode("utf-8", "replace"))
put("specials", "".join(r.choice(["<|im_start|>", "<|im_end|>", "<|im_start|>x"]) for _ in range(n // 10)))
put("digits", "".join(r.choice("0123456789") for _ in range(n)))
put("spaces", "".join(r.choice([" " * 100, "\n", " \n ", "\t" * 50, "x"]) for _ in range(n // 40)))
prose = ("The history of the city of Paris begins about 250 BC, when a tribe of Celtic Senones "
         "known as the Parisii settled on the banks of the Seine. ")
put("prose", prose * (n // len(prose) + 1))
PY
files=("$dir"/*.txt)

have_llama=0
if "$PY" -c 'import llama_cpp' 2>/dev/null; then have_llama=1; fi

echo "tokenizer of $MODEL, $RUNS runs per input, one thread"
printf '%-14s %9s %9s %10s %10s %9s\n' input tokens ours_s llama_tok llama_s ratio
ours=$("$BIN" "$MODEL" "$RUNS" "${files[@]}")
if [ "$have_llama" = 1 ]; then
  theirs=$("$PY" - "$MODEL" "$RUNS" "${files[@]}" <<'PY'
import json, sys, time, llama_cpp
model, runs, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
m = llama_cpp.Llama(model, vocab_only=True, verbose=False)
for f in files:
    text = open(f, "rb").read()
    secs = []
    for _ in range(runs):
        t = time.perf_counter()
        ids = m.tokenize(text, add_bos=False, special=True)
        secs.append(time.perf_counter() - t)
    secs.sort()
    print(json.dumps({"file": f, "tokens": len(ids), "best_s": secs[0]}))
PY
)
else
  theirs=""
  echo "(llama_cpp not importable with $PY: ours only; set LLAMA_CPP_PYTHON)"
fi
python3 - "$ours" "$theirs" <<'PY'
import json, os, sys
ours = [json.loads(l) for l in sys.argv[1].splitlines() if l.strip()]
theirs = {j["file"]: j for j in (json.loads(l) for l in sys.argv[2].splitlines() if l.strip())}
for o in ours:
    name = os.path.basename(o["file"])[:-4]
    t = theirs.get(o["file"])
    if t:
        print(f"{name:<14} {o['tokens']:>9} {o['best_s']:>9.3f} {t['tokens']:>10} {t['best_s']:>10.3f} {t['best_s'] / max(o['best_s'], 1e-9):>8.2f}x")
    else:
        print(f"{name:<14} {o['tokens']:>9} {o['best_s']:>9.3f} {'-':>10} {'-':>10} {'-':>9}")
PY
