#!/usr/bin/env bash
# Memory of the controller's Pod and Node caches at scale, as reported in docs/benchmarks.md
# ("Controller caches"): 10,000 GPU nodes and 100,000 pods as the API server returns them, fed
# as a watch's initial list through the same transform and reflector store as
# `tessera-operator run`, then what a reconcile and an autoscaling pass gather, a few times.
# Each mode runs in its own process (peak RSS only grows):
#  1. stripped caches, reads through the caches' Arcs (the controller today; target < 300 MiB);
#  2. whole objects cached (--no-strip);
#  3. the controller before: whole objects and deep copies per reconcile and per pass
#     (--no-strip --copy), at a tenth of the scale unless --full (it needs about 12 GiB).
# Usage: scripts/bench-cache-memory.sh [--full] [-- extra example arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
full=0
if [ "${1:-}" = "--full" ]; then full=1; shift; fi
[ "${1:-}" = "--" ] && shift
cargo build --quiet --locked --release -p tessera-operator --example cache_memory
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
bench="$target_dir/release/examples/cache_memory"

echo "== 1. stripped caches (the controller)"
"$bench" "$@"
echo
echo "== 2. whole objects cached (--no-strip)"
"$bench" --no-strip "$@"
echo
if [ "$full" = 1 ]; then
  echo "== 3. before: whole objects, copies per reconcile (--no-strip --copy)"
  "$bench" --no-strip --copy "$@"
else
  echo "== 3. before, at a tenth of the scale: whole objects, copies per reconcile (--no-strip --copy --nodes 1000 --pods 10000)"
  "$bench" --no-strip --copy --nodes 1000 --pods 10000 "$@"
  echo
  echo "== 3'. the controller at the same tenth (--nodes 1000 --pods 10000)"
  "$bench" --nodes 1000 --pods 10000 "$@"
fi
