#!/usr/bin/env bash
# GPU device check for a machine with an NVIDIA GPU and driver.
#
#   scripts/device-check.sh [TESSERA_WORKER_BINARY]
#
# Builds tessera-worker (or uses the given binary, for GPU machines without a Rust toolchain:
# build here with `cargo build --release -p tessera-worker` and carry target/release/tessera-worker),
# runs `tessera-worker telemetry`, checks that real values came back (name, memory, utilisation,
# NVLink state), prints the labels the node agent would publish, and a short report.
# Exit status: 0 when every check passed, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

bin="${1:-}"
if [ -z "$bin" ]; then
  cargo build --release -p tessera-worker
  bin=target/release/tessera-worker
fi
[ -x "$bin" ] || { echo "device-check: $bin is not an executable" >&2; exit 1; }

out=$(mktemp -d)
"$bin" telemetry > "$out/snapshot.json"
"$bin" telemetry --labels > "$out/labels.json"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total,utilization.gpu --format=csv,noheader > "$out/nvidia-smi.csv" || true

python3 - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
snap = json.loads((out / "snapshot.json").read_text())
labels = json.loads((out / "labels.json").read_text())
checks = []
def check(name, ok, detail=""):
    checks.append(ok)
    print(f"[{'PASS' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}")
check("NVML available", snap.get("available") is True, snap.get("reason") or snap.get("driverVersion", ""))
gpus = snap.get("gpus", [])
check("at least one GPU", len(gpus) > 0, f"{len(gpus)} GPU(s)")
for g in gpus:
    i = g["index"]
    check(f"gpu{i} name", bool(g.get("name")), g.get("name", ""))
    check(f"gpu{i} memory total", g.get("memoryTotalMib", 0) > 0, f"{g.get('memoryTotalMib')} MiB")
    check(f"gpu{i} utilisation read", "gpuUtilizationPercent" in g, f"{g.get('gpuUtilizationPercent')}%")
    check(f"gpu{i} power/temperature read", "powerDrawWatts" in g and "temperatureCelsius" in g,
          f"{g.get('powerDrawWatts')} W, {g.get('temperatureCelsius')} C")
    links = g.get("nvlinks", [])
    active = [l for l in links if l.get("active")]
    remotes = sorted({l.get("remote", {}).get("type") for l in active})
    # Single-GPU machines (and PCIe parts) may have no active NVLink; report, don't fail.
    print(f"       gpu{i} nvlink: {len(links)} links reported, {len(active)} active, remote types {remotes}")
print("topology:", json.dumps(snap.get("topology")))
print("labels the agent would publish:", json.dumps(labels, indent=1))
check("agent labels present", "tessera.dev/gpu.product" in labels)
print(f"\nsummary: {sum(checks)} passed, {len(checks) - sum(checks)} failed")
sys.exit(0 if all(checks) else 1)
PY
