#!/usr/bin/env bash
# Fetch llama.cpp's tokenizer test vocabularies (vocabulary-only GGUF files with the strings and
# the token ids the original tokenizers give for them) from the llama-cpp-python source
# distribution (fetched by name and version with pip), and place them in models/vocab/ (git-ignored):
#   ggml-vocab-llama-spm.gguf{,.inp,.out}   Llama 2's SentencePiece vocabulary
#   ggml-vocab-llama-bpe.gguf{,.inp,.out}   Llama 3's byte-level BPE vocabulary
#   ggml-vocab-gpt-2.gguf{,.inp,.out}       GPT-2's byte-level BPE vocabulary
# worker/tests/tokenizer_vocab.rs checks the worker's tokenizer against them. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.3.36
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
echo "downloading the llama-cpp-python $VERSION source distribution with pip (about 77 MB) ..."
python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
  --disable-pip-version-check "llama-cpp-python==$VERSION" -d "$tmp"
sdist="$tmp/llama_cpp_python-$VERSION.tar.gz"
[ -f "$sdist" ] || { echo "fetch-vocab: pip did not download $sdist" >&2; exit 1; }
echo "$SHA256  $sdist" | sha256sum --check --status || {
  echo "fetch-vocab: $sdist has sha256 $(sha256sum "$sdist" | cut -d' ' -f1), expected $SHA256" >&2
  exit 1
}
members=()
for n in "${NAMES[@]}"; do
  for ext in "" .inp .out; do
    members+=("llama_cpp_python-$VERSION/vendor/llama.cpp/models/ggml-vocab-$n.gguf$ext")
  done
done
tar -xzf "$sdist" -C "$tmp" "${members[@]}"
cp "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp/models/"ggml-vocab-* "$dest/"
echo "vocabularies ready: $dest"
