//! GPU metrics in dcgm-exporter's names and labels, so existing Grafana dashboards work.
//!
//! Metric names follow dcgm-exporter's default counters (`DCGM_FI_DEV_GPU_UTIL`,
//! `DCGM_FI_DEV_FB_USED`, ...) with its labels `gpu`, `UUID`, `modelName`, `Hostname` (plus
//! `pci_bus_id` and `device`, as dcgm-exporter adds them). `tessera_nvml_up` is 1 when NVML
//! answered and 0 otherwise. Encoding is prometheus-client's text encoder.
//!
//! dcgm-exporter types `DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL` and the ECC totals as counters
//! without a `_total` suffix; prometheus-client appends `_total` to counters, so to keep the
//! names dashboards query we expose them as gauges of the same cumulative value (`rate()`
//! works the same on them).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{Gpu, Snapshot};

type Labels = Vec<(String, String)>;
type GaugeF = Gauge<f64, AtomicU64>;

/// One dcgm-style metric: name, help and how to read it from a GPU.
struct Def {
    name: &'static str,
    help: &'static str,
    value: fn(&Gpu) -> Option<f64>,
}

const DEFS: &[Def] = &[
    Def {
        name: "DCGM_FI_DEV_GPU_UTIL",
        help: "GPU utilization (in %).",
        value: |g| g.gpu_utilization_percent.map(f64::from),
    },
    Def {
        name: "DCGM_FI_DEV_MEM_COPY_UTIL",
        help: "Memory utilization (in %).",
        value: |g| g.memory_utilization_percent.map(f64::from),
    },
    Def {
        name: "DCGM_FI_DEV_FB_USED",
        help: "Framebuffer memory used (in MiB).",
        value: |g| Some(g.memory_used_mib as f64),
    },
    Def {
        name: "DCGM_FI_DEV_FB_FREE",
        help: "Framebuffer memory free (in MiB).",
        value: |g| Some(g.memory_free_mib as f64),
    },
    Def {
        name: "DCGM_FI_DEV_POWER_USAGE",
        help: "Power draw (in W).",
        value: |g| g.power_draw_watts,
    },
    Def {
        name: "DCGM_FI_DEV_POWER_MGMT_LIMIT",
        help: "Enforced power limit (in W).",
        value: |g| g.power_limit_watts,
    },
    Def {
        name: "DCGM_FI_DEV_GPU_TEMP",
        help: "GPU temperature (in C).",
        value: |g| g.temperature_celsius.map(f64::from),
    },
    Def {
        name: "DCGM_FI_DEV_SM_CLOCK",
        help: "SM clock frequency (in MHz).",
        value: |g| g.sm_clock_mhz.map(f64::from),
    },
    Def {
        name: "DCGM_FI_DEV_PCIE_TX_THROUGHPUT",
        help: "PCIe transmit throughput (in KB/s).",
        value: |g| g.pcie_tx_kib_per_second.map(f64::from),
    },
    Def {
        name: "DCGM_FI_DEV_PCIE_RX_THROUGHPUT",
        help: "PCIe receive throughput (in KB/s).",
        value: |g| g.pcie_rx_kib_per_second.map(f64::from),
    },
    Def {
        name: "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
        help: "Total number of single-bit volatile ECC errors.",
        value: |g| g.ecc.map(|e| e.corrected as f64),
    },
    Def {
        name: "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        help: "Total number of double-bit volatile ECC errors.",
        value: |g| g.ecc.map(|e| e.uncorrected as f64),
    },
    Def {
        name: "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
        help: "Total number of NVLink bandwidth counters for all lanes (KiB sent and received).",
        value: |g| {
            let sum: Option<u64> = g
                .nvlinks
                .iter()
                .filter_map(|l| Some(l.tx_kib? + l.rx_kib?))
                .reduce(|a, b| a + b);
            sum.map(|s| s as f64)
        },
    },
];

fn labels(g: &Gpu, hostname: &str) -> Labels {
    vec![
        ("gpu".into(), g.index.to_string()),
        ("UUID".into(), g.uuid.clone()),
        ("pci_bus_id".into(), g.pci_bus_id.clone()),
        ("device".into(), format!("nvidia{}", g.index)),
        ("modelName".into(), g.name.clone()),
        ("Hostname".into(), hostname.to_owned()),
    ]
}

/// Build a registry holding the snapshot's GPU gauges and `tessera_nvml_up`.
pub fn register(registry: &mut Registry, snapshot: &Snapshot, hostname: &str) {
    let up: Gauge = Gauge::default();
    up.set(i64::from(snapshot.available));
    registry.register(
        "tessera_nvml_up",
        "Whether NVML answered (1) or GPU telemetry is unavailable (0)",
        up,
    );
    for def in DEFS {
        let family = Family::<Labels, GaugeF>::default();
        let mut any = false;
        for g in &snapshot.gpus {
            if let Some(v) = (def.value)(g) {
                family.get_or_create(&labels(g, hostname)).set(v);
                any = true;
            }
        }
        if any {
            registry.register(def.name, def.help, family);
        }
    }
}

/// The snapshot as Prometheus text exposition.
pub fn render(snapshot: &Snapshot, hostname: &str) -> String {
    let mut registry = Registry::default();
    register(&mut registry, snapshot, hostname);
    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String cannot fail");
    out
}
