#!/usr/bin/env bash
# Static tests of the Helm chart, the Dockerfiles and the example ModelDeployments (no cluster):
# helm lint --strict, helm template over a matrix of values, Kubernetes JSON-schema validation for
# several Kubernetes versions, security/RBAC/NetworkPolicy assertions, CRD drift and examples.
# Installs Helm into .tools/bin and a venv into .tools/venv on first use.
# Last line of output: "N passed, M failed"; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.tools/venv
REQS=tests/chart/requirements.txt

scripts/install-helm.sh >&2

# (Re)create the venv when the pinned requirements change.
stamp="$VENV/.chart-requirements.sha256"
want=$(sha256sum "$REQS" | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setting up $VENV" >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQS" >&2
  echo "$want" > "$stamp"
fi

# The worker objects `tessera-operator plan -o yaml` prints are validated like the chart's.
cargo build --quiet --locked -p tessera-operator >&2
target_dir=$(cargo metadata --format-version 1 --no-deps | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')

TESSERA_OPERATOR="$target_dir/debug/tessera-operator" HELM="$PWD/.tools/bin/helm" exec "$VENV/bin/python" tests/chart/check_chart.py
