#!/usr/bin/env python3
"""Write the fake-telemetry fixtures in worker/tests/fixtures/ (what `tessera-worker telemetry`
would print on four node shapes). Deterministic; re-run after changing the snapshot format.

- h100-hgx:        8x H100 SXM, every GPU 18 active NVLink 4 links to the NVSwitch fabric
                   (speed not reported: the per-version default applies) -> one domain, 450 GB/s.
- h800-hgx:        8x H800 SXM, 8 of 18 links active to NVSwitch, 25 GB/s each -> one domain, 200.
- l40s-pcie:       4x L40S, no NVLink -> four single-GPU domains, 0.
- a100-bridge-2x4: 8x A100, two islands of 4 GPUs wired directly (4 links to each peer,
                   NVLink 3, no NVSwitch) -> domains 0-3 and 4-7, 300 GB/s.
"""
import json
import pathlib

OUT = pathlib.Path(__file__).resolve().parent.parent / "worker" / "tests" / "fixtures"


def bus(i):
    return f"00000000:{0x18 + 0x10 * i:02x}:00.0"


def gpu(i, name, mem, links, util=37):
    used = 1024 + 512 * i
    return {
        "index": i,
        "uuid": f"GPU-{i:08x}-0000-4000-8000-{name.split()[1].lower()[:4]:0>12}"[:40],
        "name": name,
        "pciBusId": bus(i),
        "memoryTotalMib": mem,
        "memoryUsedMib": used,
        "memoryFreeMib": mem - used,
        "gpuUtilizationPercent": util + i,
        "memoryUtilizationPercent": 10 + i,
        "powerDrawWatts": 120.5 + i,
        "powerLimitWatts": 700.0,
        "temperatureCelsius": 40 + i,
        "smClockMhz": 1980,
        "ecc": {"corrected": 0, "uncorrected": 0},
        "pcieTxKibPerSecond": 1000 + i,
        "pcieRxKibPerSecond": 2000 + i,
        "nvlinks": links,
    }


def switch_links(active, total, speed=None, version=4):
    links = []
    for l in range(total):
        link = {"link": l, "active": l < active, "version": version,
                "remote": {"type": "switch"} if l < active else {"type": "unknown"}}
        if speed is not None:
            link["speedGbps"] = speed
        if l < active:
            link["txKib"] = 1000 * (l + 1)
            link["rxKib"] = 2000 * (l + 1)
        links.append(link)
    return links


def island_links(i, island, per_peer=4):
    links, n = [], 0
    for peer in island:
        if peer == i:
            continue
        for _ in range(per_peer):
            links.append({"link": n, "active": True, "version": 3,
                          "remote": {"type": "gpu", "pciBusId": bus(peer)}})
            n += 1
    return links


def snapshot(gpus):
    return {"available": True, "source": "nvml", "driverVersion": "570.124.06",
            "cudaDriverVersion": "12.8", "gpus": gpus}


SHAPES = {
    "h100-hgx": snapshot([gpu(i, "NVIDIA H100 80GB HBM3", 81559, switch_links(18, 18)) for i in range(8)]),
    "h800-hgx": snapshot([gpu(i, "NVIDIA H800", 81559, switch_links(8, 18, speed=25.0)) for i in range(8)]),
    "l40s-pcie": snapshot([gpu(i, "NVIDIA L40S", 46068, []) for i in range(4)]),
    "a100-bridge-2x4": snapshot([
        gpu(i, "NVIDIA A100-SXM4-80GB", 81920, island_links(i, range(0, 4) if i < 4 else range(4, 8)))
        for i in range(8)
    ]),
}

OUT.mkdir(parents=True, exist_ok=True)
for name, snap in SHAPES.items():
    (OUT / f"{name}.json").write_text(json.dumps(snap, indent=1) + "\n")
    print(f"wrote {OUT / (name + '.json')}")
