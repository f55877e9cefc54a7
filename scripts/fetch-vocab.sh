#!/usr/bin/env bash
# Fetch llama.cpp's tokenizer test vocabularies (vocabulary-only GGUF files with the strings and
# the token ids the original tokenizers give for them) from the llama-cpp-python source
# distribution on PyPI, and place them in models/vocab/ (git-ignored):
#   ggml-vocab-llama-spm.gguf{,.inp,.out}   Llama 2's SentencePiece vocabulary
#   ggml-vocab-llama-bpe.gguf{,.inp,.out}   Llama 3's byte-level BPE vocabulary
#   ggml-vocab-gpt-2.gguf{,.inp,.out}       GPT-2's byte-level BPE vocabulary
# worker/tests/tokenizer_vocab.rs checks the worker's tokenizer against them. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.3.36
URL=https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-$VERSION.tar.gz
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
NAMES=(llama-spm llama-bpe gpt-2)
dest=models/vocab

present() {
  for n in "${NAMES[@]}"; do
    for ext in "" .inp .out; do [ -s "$dest/ggml-vocab-$n.gguf$ext" ] || return 1; done
  done
}

if present; then
  echo "vocabularies present: $dest"
  exit 0
fi
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "downloading the llama-cpp-python $VERSION source distribution (about 77 MB) ..."
python3 - "$URL" "$tmp/sdist.tar.gz" "$SHA256" <<'PY'
import hashlib, sys, urllib.request
url, out, want = sys.argv[1:]
h = hashlib.sha256()
with urllib.request.urlopen(url, timeout=120) as r, open(out, "wb") as f:
    while chunk := r.read(1 << 20):
        h.update(chunk)
        f.write(chunk)
if h.hexdigest() != want:
    sys.exit(f"fetch-vocab: {url} has sha256 {h.hexdigest()}, expected {want}")
PY
members=()
for n in "${NAMES[@]}"; do
  for ext in "" .inp .out; do
    members+=("llama_cpp_python-$VERSION/vendor/llama.cpp/models/ggml-vocab-$n.gguf$ext")
  done
done
tar -xzf "$tmp/sdist.tar.gz" -C "$tmp" "${members[@]}"
cp "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp/models/"ggml-vocab-* "$dest/"
echo "vocabularies ready: $dest"
