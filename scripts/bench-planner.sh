#!/usr/bin/env bash
# Planner benchmarks, as reported in docs/benchmarks.md ("Planner"):
#  1. criterion: inventory of 10,000 nodes, full plan of 1,000 deployments (about 4,000 replicas)
#     on 10,000 nodes / 80,000 GPUs, re-plans (all with existing placements; one deployment in a
#     full cluster);
#  2. the `plan` CLI end to end (YAML parsing included) on the same synthetic inputs, with its
#     wall time and peak RSS;
#  3. placement quality against a topology-blind baseline and an exhaustive optimum.
# Usage: scripts/bench-planner.sh [--quick]     (--quick: shorter criterion runs)
set -euo pipefail
cd "$(dirname "$0")/.."
quick=()
[ "${1:-}" = "--quick" ] && quick=(-- --quick)

echo "== criterion: cargo bench -p tessera-operator --bench planner"
cargo bench --locked -p tessera-operator --bench planner "${quick[@]}"

echo
echo "== plan CLI on 10,000 nodes and 1,000 deployments"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cargo build --quiet --locked --release -p tessera-operator --bin tessera-operator --example synthetic_cluster --example placement_quality
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
"$target_dir/release/examples/synthetic_cluster" "$dir"
ls -l "$dir"
for i in 1 2 3; do
  /usr/bin/time -f "run $i: %e s wall, %M KiB peak RSS" \
    "$target_dir/release/tessera-operator" plan --nodes "$dir/nodes.yaml" -f "$dir/deployments.yaml" -o json > "$dir/plan.json"
done
python3 - "$dir/plan.json" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))
placed = sum(len(d["placed"]) for d in p["deployments"])
want = sum(d["replicas"] for d in p["deployments"])
print(f"plan: {len(p['deployments'])} deployments, {placed} of {want} replicas placed")
PY

echo
echo "== placement quality: cargo run --release -p tessera-operator --example placement_quality"
"$target_dir/release/examples/placement_quality"
