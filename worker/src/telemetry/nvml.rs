//! The NVML backend (nvml-wrapper; `libnvidia-ml.so` is loaded at run time, so this builds and
//! runs on machines without a GPU or driver and simply reports telemetry as unavailable).

use std::os::raw::c_uint;

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{
    Clock, EccCounter, MemoryError, PcieUtilCounter, TemperatureSensor,
};
use nvml_wrapper::struct_wrappers::device::MemoryInfo;
use nvml_wrapper_sys::bindings::{
    NVML_NVLINK_MAX_LINKS, field_id, nvmlFieldValue_t,
    nvmlIntNvLinkDeviceType_enum_NVML_NVLINK_DEVICE_TYPE_GPU,
    nvmlIntNvLinkDeviceType_enum_NVML_NVLINK_DEVICE_TYPE_SWITCH, nvmlIntNvLinkDeviceType_t,
    nvmlReturn_enum_NVML_SUCCESS, nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_INT,
    nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG,
    nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG_LONG,
};

use super::{EccErrors, Gpu, NvLink, Remote, Snapshot, Telemetry, normalize_bus_id};

const MIB: u64 = 1024 * 1024;

/// Reads GPUs through NVML.
pub struct NvmlTelemetry {
    nvml: Nvml,
}

impl std::fmt::Debug for NvmlTelemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlTelemetry").finish_non_exhaustive()
    }
}

impl NvmlTelemetry {
    /// Load and initialise NVML. The error says why (no driver library, no permission, ...).
    pub fn new() -> Result<Self, String> {
        Nvml::init()
            .map(|nvml| Self { nvml })
            .map_err(|e| format!("NVML could not be initialised: {e}"))
    }
}

/// NVML when it loads; otherwise a backend that reports why telemetry is unavailable, after
/// one warning in the log (the worker keeps serving; `/metrics` shows `tessera_nvml_up 0`).
pub fn detect() -> Box<dyn Telemetry> {
    match NvmlTelemetry::new() {
        Ok(t) => Box::new(t),
        Err(reason) => {
            tracing::warn!(%reason, "GPU telemetry unavailable; continuing without it");
            Box::new(Unavailable { reason })
        }
    }
}

/// The backend for machines without NVML: every snapshot says why.
#[derive(Debug, Clone)]
pub struct Unavailable {
    pub reason: String,
}

impl Telemetry for Unavailable {
    fn snapshot(&self) -> Snapshot {
        Snapshot::unavailable("none", self.reason.clone())
    }
}

impl Telemetry for NvmlTelemetry {
    fn snapshot(&self) -> Snapshot {
        let count = match self.nvml.device_count() {
            Ok(c) => c,
            Err(e) => return Snapshot::unavailable("nvml", format!("listing GPUs: {e}")),
        };
        let mut gpus = Vec::with_capacity(count as usize);
        for index in 0..count {
            match self.gpu(index) {
                Ok(g) => gpus.push(g),
                Err(e) => {
                    return Snapshot::unavailable("nvml", format!("reading GPU {index}: {e}"));
                }
            }
        }
        Snapshot {
            available: true,
            reason: None,
            source: "nvml".into(),
            driver_version: self.nvml.sys_driver_version().ok(),
            cuda_driver_version: self
                .nvml
                .sys_cuda_driver_version()
                .ok()
                .map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10)),
            gpus,
            topology: Default::default(),
        }
        .with_topology()
    }
}

impl NvmlTelemetry {
    fn gpu(&self, index: u32) -> Result<Gpu, nvml_wrapper::error::NvmlError> {
        let d = self.nvml.device_by_index(index)?;
        let MemoryInfo {
            total, used, free, ..
        } = d.memory_info()?;
        let util = d.utilization_rates().ok();
        let ecc = match (
            d.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile),
            d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile),
        ) {
            (Ok(corrected), Ok(uncorrected)) => Some(EccErrors {
                corrected,
                uncorrected,
            }),
            _ => None,
        };
        let throttle_reasons = d
            .current_throttle_reasons()
            .map(|r| {
                r.iter_names()
                    .map(|(name, _)| name.to_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let mut nvlinks = Vec::new();
        for link in 0..NVML_NVLINK_MAX_LINKS {
            let l = d.link_wrapper_for(link);
            let Ok(active) = l.is_active() else {
                // Not supported on this link (or on this GPU): there are no more links.
                break;
            };
            let remote = if active {
                match self.remote_device_type(&d, link) {
                    Some(t) if t == nvmlIntNvLinkDeviceType_enum_NVML_NVLINK_DEVICE_TYPE_SWITCH => {
                        Remote::Switch
                    }
                    Some(t) if t == nvmlIntNvLinkDeviceType_enum_NVML_NVLINK_DEVICE_TYPE_GPU => l
                        .remote_pci_info()
                        .map(|p| Remote::Gpu {
                            pci_bus_id: normalize_bus_id(&p.bus_id),
                        })
                        .unwrap_or_default(),
                    _ => Remote::Unknown,
                }
            } else {
                Remote::Unknown
            };
            let [speed_mbps, tx_kib, rx_kib] = self.link_fields(&d, link);
            nvlinks.push(NvLink {
                link,
                active,
                version: l.version().ok(),
                // NVML reports MB/s per direction.
                speed_gbps: speed_mbps.filter(|&s| s > 0).map(|s| s as f64 / 1000.0),
                remote,
                tx_kib,
                rx_kib,
            });
        }
        Ok(Gpu {
            index,
            uuid: d.uuid()?,
            name: d.name()?,
            pci_bus_id: normalize_bus_id(&d.pci_info()?.bus_id),
            memory_total_mib: total / MIB,
            memory_used_mib: used / MIB,
            memory_free_mib: free / MIB,
            gpu_utilization_percent: util.as_ref().map(|u| u.gpu),
            memory_utilization_percent: util.as_ref().map(|u| u.memory),
            power_draw_watts: d.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
            power_limit_watts: d
                .enforced_power_limit()
                .ok()
                .map(|mw| f64::from(mw) / 1000.0),
            temperature_celsius: d.temperature(TemperatureSensor::Gpu).ok(),
            sm_clock_mhz: d.clock_info(Clock::SM).ok(),
            ecc,
            throttle_reasons,
            pcie_tx_kib_per_second: d.pcie_throughput(PcieUtilCounter::Send).ok(),
            pcie_rx_kib_per_second: d.pcie_throughput(PcieUtilCounter::Receive).ok(),
            nvlinks,
        })
    }

    /// The remote end's device type of an NVLink link.
    ///
    /// nvml-wrapper 0.13's `NvLink::remote_device_type` always answers `Unknown`: it passes a
    /// pointer to a temporary (`&mut device_type.as_c()`), so NVML's answer is written into the
    /// temporary and lost. We call the raw `nvmlDeviceGetNvLinkRemoteDeviceType` through the
    /// loaded library instead, and only when the driver exports the symbol.
    fn remote_device_type(
        &self,
        d: &nvml_wrapper::Device<'_>,
        link: u32,
    ) -> Option<nvmlIntNvLinkDeviceType_t> {
        let sym = self
            .nvml
            .lib()
            .nvmlDeviceGetNvLinkRemoteDeviceType
            .as_ref()
            .ok()?;
        let mut out: nvmlIntNvLinkDeviceType_t = 0;
        // SAFETY: `d.handle()` is a live device handle of this `Nvml`, `out` is a valid,
        // writable location for the enum, and the symbol has NVML's documented signature.
        let ret = unsafe { sym(d.handle(), link as c_uint, &mut out) };
        (ret == nvmlReturn_enum_NVML_SUCCESS).then_some(out)
    }

    /// Per-link field values: common link speed (MB/s), and cumulative NVLink TX and RX data
    /// (KiB), where supported. nvml-wrapper's `field_values_for` cannot set the scope (the link),
    /// so this uses the raw `nvmlDeviceGetFieldValues`.
    fn link_fields(&self, d: &nvml_wrapper::Device<'_>, link: u32) -> [Option<u64>; 3] {
        let Ok(sym) = self.nvml.lib().nvmlDeviceGetFieldValues.as_ref() else {
            return [None; 3];
        };
        let ids = [
            field_id::NVML_FI_DEV_NVLINK_SPEED_MBPS_COMMON,
            field_id::NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX,
            field_id::NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX,
        ];
        // SAFETY: nvmlFieldValue_t is plain C data for which all-zero is a valid value.
        let mut values: [nvmlFieldValue_t; 3] = unsafe { std::mem::zeroed() };
        for (v, id) in values.iter_mut().zip(ids) {
            v.fieldId = id;
            v.scopeId = link;
        }
        // SAFETY: the handle is live, and `values` holds exactly the 3 entries we pass.
        let ret = unsafe { sym(d.handle(), values.len() as i32, values.as_mut_ptr()) };
        if ret != nvmlReturn_enum_NVML_SUCCESS {
            return [None; 3];
        }
        values.map(|v| {
            if v.nvmlReturn != nvmlReturn_enum_NVML_SUCCESS {
                return None;
            }
            // SAFETY: the union member read matches `valueType`, as NVML documents.
            unsafe {
                match v.valueType {
                    t if t == nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_INT => {
                        Some(u64::from(v.value.uiVal))
                    }
                    t if t == nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG => {
                        // c_ulong is 64 bits on Linux but 32 on Windows.
                        #[allow(clippy::unnecessary_cast)]
                        Some(v.value.ulVal as u64)
                    }
                    t if t == nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG_LONG => {
                        Some(v.value.ullVal)
                    }
                    _ => None,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detect_reports_gpus_or_says_why_not() {
        let s = detect().snapshot();
        if NvmlTelemetry::new().is_ok() {
            // A GPU machine (scripts/device-check.sh checks the values in detail).
            assert!(s.available, "{s:?}");
            assert!(!s.gpus.is_empty());
            return;
        }
        assert!(!s.available);
        assert!(
            s.reason
                .as_deref()
                .is_some_and(|r| r.starts_with("NVML could not be initialised")),
            "{s:?}"
        );
        assert!(s.gpus.is_empty());
    }
}
