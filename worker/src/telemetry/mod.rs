//! GPU telemetry: one snapshot of every GPU on the node, from NVML or from a JSON fixture.
//!
//! The snapshot feeds three consumers: `tessera-worker telemetry` (printed as JSON), the
//! `/metrics` endpoint (dcgm-exporter's metric names, see [`metrics`]) and the node agent, which
//! turns the NVLink matrix into NVLink domains and bandwidth ([`topology`]) and publishes them as
//! Node labels for the planner.

pub mod fake;
pub mod metrics;
pub mod nvml;
pub mod server;
pub mod topology;

use serde::{Deserialize, Serialize};

pub use topology::Topology;

/// Anything that can take a snapshot of the node's GPUs.
pub trait Telemetry: Send + Sync {
    /// Take one snapshot. Never fails: when no GPUs can be read the snapshot says why
    /// (`available: false`, `reason`).
    fn snapshot(&self) -> Snapshot;
}

/// One reading of every GPU on the node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// Whether GPU telemetry could be read at all.
    pub available: bool,
    /// Why not, when `available` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Where the reading came from (`nvml`, `fake:FILE`, `none`).
    #[serde(default)]
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_driver_version: Option<String>,
    #[serde(default)]
    pub gpus: Vec<Gpu>,
    /// NVLink domains and bandwidth derived from `gpus` (see [`topology::compute`]).
    #[serde(default)]
    pub topology: Topology,
}

impl Snapshot {
    /// A snapshot that says telemetry is unavailable, and why.
    pub fn unavailable(source: &str, reason: impl Into<String>) -> Self {
        Snapshot {
            available: false,
            reason: Some(reason.into()),
            source: source.to_owned(),
            ..Snapshot::default()
        }
    }

    /// Recompute [`Snapshot::topology`] from the GPUs' NVLink state.
    pub fn with_topology(mut self) -> Self {
        self.topology = topology::compute(&self.gpus);
        self
    }
}

/// One GPU. Optional fields are `None` where the device or driver does not report them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Gpu {
    pub index: u32,
    pub uuid: String,
    /// Product name as NVML reports it, for example `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// PCI bus id, `DDDDDDDD:BB:DD.F`, lowercase.
    pub pci_bus_id: String,
    pub memory_total_mib: u64,
    pub memory_used_mib: u64,
    pub memory_free_mib: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_utilization_percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_utilization_percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_draw_watts: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_limit_watts: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_celsius: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sm_clock_mhz: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecc: Option<EccErrors>,
    /// Active clock-throttle reasons, for example `SW_POWER_CAP`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub throttle_reasons: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcie_tx_kib_per_second: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcie_rx_kib_per_second: Option<u32>,
    /// NVLink links of this GPU (empty on parts without NVLink).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nvlinks: Vec<NvLink>,
}

/// Volatile ECC error counts since the driver loaded.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EccErrors {
    pub corrected: u64,
    pub uncorrected: u64,
}

/// One NVLink link.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NvLink {
    pub link: u32,
    pub active: bool,
    /// NVLink generation (3 on A100, 4 on H100/H800/H20/H200, 5 on B200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// Per-direction speed of this link in GB/s, when the driver reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed_gbps: Option<f64>,
    /// What is at the other end.
    #[serde(default)]
    pub remote: Remote,
    /// Cumulative data sent and received over the link, in KiB, where supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_kib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_kib: Option<u64>,
}

/// The far end of an NVLink link.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Remote {
    /// Another GPU, by PCI bus id.
    Gpu {
        #[serde(rename = "pciBusId")]
        pci_bus_id: String,
    },
    /// An NVSwitch.
    Switch,
    /// Not reported (inactive link, or an old driver).
    #[default]
    Unknown,
}

/// Normalise a PCI bus id to lowercase `DDDDDDDD:BB:DD.F` so ids from different NVML calls
/// (which pad the domain to 4 or 8 digits) compare equal.
pub fn normalize_bus_id(id: &str) -> String {
    let id = id.trim().to_ascii_lowercase();
    match id.split_once(':') {
        Some((domain, rest)) if domain.len() < 8 && rest.contains(':') => {
            format!("{domain:0>8}:{rest}")
        }
        Some((domain, rest)) if domain.len() > 8 && rest.contains(':') => {
            format!("{}:{rest}", &domain[domain.len() - 8..])
        }
        _ => id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_ids_normalise() {
        assert_eq!(normalize_bus_id("0000:18:00.0"), "00000000:18:00.0");
        assert_eq!(normalize_bus_id("00000000:9A:00.0"), "00000000:9a:00.0");
        assert_eq!(normalize_bus_id("0000000000:18:00.0"), "00000000:18:00.0");
    }
}
