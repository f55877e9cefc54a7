#!/usr/bin/env bash
# Regenerate the committed CRD YAML (top level and the Helm chart's copy) from the Rust types.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet --bin tessera-operator -- crd > crds/modeldeployment.yaml
if [ -d charts/tessera ]; then
  mkdir -p charts/tessera/crds
  cp crds/modeldeployment.yaml charts/tessera/crds/modeldeployment.yaml
fi
echo "wrote crds/modeldeployment.yaml"
