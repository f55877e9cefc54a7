//! GPU catalog: the per-GPU numbers the cost model needs, keyed by product.
//!
//! Built-in figures are vendor specifications (DESIGN.md section 4, `docs/cost-model.md`).
//! Node products as GPU Feature Discovery spells them (`NVIDIA-H100-80GB-HBM3`,
//! `NVIDIA-A100-SXM4-80GB`, `NVIDIA-H20`) are matched by whole tokens, so `H20` never matches
//! `H200` and `L4` never matches `L40S`. Entries can be overridden or added from a YAML/JSON
//! file; measured values from the node agent win over the catalog (see `inventory`).

use serde::{Deserialize, Serialize};

/// How the GPUs of a board talk to each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FormFactor {
    /// NVSwitch/NVLink board: all GPUs of the node form one NVLink domain.
    #[serde(rename = "SXM")]
    Sxm,
    /// PCIe cards: every GPU is its own domain; peers talk over PCIe.
    #[serde(rename = "PCIe")]
    Pcie,
}

/// One GPU model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuModel {
    /// Short name used in messages and matched by `gpu.types` (`H100`).
    pub name: String,
    /// Tokens that must all appear in a node's product (case-insensitive, whole tokens).
    #[serde(rename = "match")]
    pub match_tokens: Vec<String>,
    /// Memory per GPU in MiB (as GFD's `nvidia.com/gpu.memory` reports it).
    pub memory_mib: f64,
    /// HBM/GDDR bandwidth, GB/s.
    pub memory_bandwidth_gbps: f64,
    /// NVLink bandwidth per GPU, bidirectional total, GB/s (0: no NVLink).
    pub nvlink_bidirectional_gbps: f64,
    /// Dense BF16 TFLOPS.
    pub bf16_tflops: f64,
    /// Dense FP8 TFLOPS (equal to BF16 where the GPU has no FP8 units).
    pub fp8_tflops: f64,
    /// SXM (NVSwitch board) or PCIe.
    pub form_factor: FormFactor,
    /// PCIe bandwidth per direction, GB/s.
    pub pcie_gbps: f64,
}

impl GpuModel {
    /// NVLink bandwidth per GPU per direction, GB/s (half the bidirectional figure).
    pub fn nvlink_per_direction_gbps(&self) -> f64 {
        self.nvlink_bidirectional_gbps / 2.0
    }

    /// Memory per GPU in GiB.
    pub fn memory_gib(&self) -> f64 {
        self.memory_mib / 1024.0
    }

    /// Conservative stand-in for a product the catalog does not know.
    pub fn unknown(product: &str, memory_mib: Option<f64>) -> Self {
        GpuModel {
            name: product.to_owned(),
            match_tokens: tokens(product),
            memory_mib: memory_mib.unwrap_or(16.0 * 1024.0),
            memory_bandwidth_gbps: 300.0,
            nvlink_bidirectional_gbps: 0.0,
            bf16_tflops: 50.0,
            fp8_tflops: 50.0,
            form_factor: FormFactor::Pcie,
            pcie_gbps: 16.0,
        }
    }
}

/// A partial entry from an override file: fields left out keep the built-in value.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GpuModelOverride {
    pub name: String,
    #[serde(default, rename = "match")]
    pub match_tokens: Option<Vec<String>>,
    #[serde(default)]
    pub memory_mib: Option<f64>,
    #[serde(default)]
    pub memory_bandwidth_gbps: Option<f64>,
    #[serde(default)]
    pub nvlink_bidirectional_gbps: Option<f64>,
    #[serde(default)]
    pub bf16_tflops: Option<f64>,
    #[serde(default)]
    pub fp8_tflops: Option<f64>,
    #[serde(default)]
    pub form_factor: Option<FormFactor>,
    #[serde(default)]
    pub pcie_gbps: Option<f64>,
}

/// The override file: a list of entries, or `{gpus: [...]}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum OverrideFile {
    List(Vec<GpuModelOverride>),
    Wrapped { gpus: Vec<GpuModelOverride> },
}

/// The catalog: an ordered list of models.
#[derive(Clone, Debug, PartialEq)]
pub struct Catalog {
    pub models: Vec<GpuModel>,
}

#[allow(clippy::too_many_arguments)]
fn m(
    name: &str,
    match_tokens: &[&str],
    memory_mib: f64,
    memory_bandwidth_gbps: f64,
    nvlink_bidirectional_gbps: f64,
    bf16_tflops: f64,
    fp8_tflops: f64,
    form_factor: FormFactor,
    pcie_gbps: f64,
) -> GpuModel {
    GpuModel {
        name: name.to_owned(),
        match_tokens: match_tokens
            .iter()
            .map(|t| t.to_ascii_uppercase())
            .collect(),
        memory_mib,
        memory_bandwidth_gbps,
        nvlink_bidirectional_gbps,
        bf16_tflops,
        fp8_tflops,
        form_factor,
        pcie_gbps,
    }
}

impl Default for Catalog {
    fn default() -> Self {
        Self::builtin()
    }
}

impl Catalog {
    /// The built-in catalog (vendor specifications; see docs/cost-model.md).
    pub fn builtin() -> Self {
        use FormFactor::{Pcie, Sxm};
        Catalog {
            models: vec![
                m(
                    "A100",
                    &["A100"],
                    81920.0,
                    2039.0,
                    600.0,
                    312.0,
                    312.0,
                    Sxm,
                    32.0,
                ),
                m(
                    "A100-PCIe",
                    &["A100", "PCIE"],
                    81920.0,
                    1935.0,
                    0.0,
                    312.0,
                    312.0,
                    Pcie,
                    32.0,
                ),
                m(
                    "A800",
                    &["A800"],
                    81920.0,
                    2039.0,
                    400.0,
                    312.0,
                    312.0,
                    Sxm,
                    32.0,
                ),
                m(
                    "H100",
                    &["H100"],
                    81559.0,
                    3350.0,
                    900.0,
                    989.0,
                    1979.0,
                    Sxm,
                    64.0,
                ),
                m(
                    "H100-PCIe",
                    &["H100", "PCIE"],
                    81559.0,
                    2000.0,
                    0.0,
                    756.0,
                    1513.0,
                    Pcie,
                    64.0,
                ),
                m(
                    "H800",
                    &["H800"],
                    81559.0,
                    3350.0,
                    400.0,
                    989.0,
                    1979.0,
                    Sxm,
                    64.0,
                ),
                m(
                    "H20",
                    &["H20"],
                    97871.0,
                    4000.0,
                    900.0,
                    148.0,
                    296.0,
                    Sxm,
                    64.0,
                ),
                m(
                    "H200",
                    &["H200"],
                    143_771.0,
                    4800.0,
                    900.0,
                    989.0,
                    1979.0,
                    Sxm,
                    64.0,
                ),
                m(
                    "B200",
                    &["B200"],
                    183_359.0,
                    8000.0,
                    1800.0,
                    2250.0,
                    4500.0,
                    Sxm,
                    64.0,
                ),
                m(
                    "L40S",
                    &["L40S"],
                    46068.0,
                    864.0,
                    0.0,
                    362.0,
                    733.0,
                    Pcie,
                    32.0,
                ),
                m("L4", &["L4"], 23034.0, 300.0, 0.0, 121.0, 242.0, Pcie, 32.0),
            ],
        }
    }

    /// Merge override entries over this catalog: an entry whose `name` matches (case-insensitive)
    /// an existing model replaces the fields it sets; any other entry is added (and then needs
    /// every number).
    pub fn merge(&mut self, overrides: Vec<GpuModelOverride>) -> Result<(), String> {
        for o in overrides {
            let pos = self
                .models
                .iter()
                .position(|g| g.name.eq_ignore_ascii_case(&o.name));
            let mut g = match pos {
                Some(i) => self.models[i].clone(),
                None => {
                    let missing: Vec<&str> = [
                        ("memoryMib", o.memory_mib.is_none()),
                        ("memoryBandwidthGbps", o.memory_bandwidth_gbps.is_none()),
                        ("bf16Tflops", o.bf16_tflops.is_none()),
                    ]
                    .iter()
                    .filter(|(_, m)| *m)
                    .map(|(n, _)| *n)
                    .collect();
                    if !missing.is_empty() {
                        return Err(format!(
                            "new GPU model {:?} needs {}",
                            o.name,
                            missing.join(", ")
                        ));
                    }
                    GpuModel {
                        name: o.name.clone(),
                        match_tokens: tokens(&o.name),
                        memory_mib: 0.0,
                        memory_bandwidth_gbps: 0.0,
                        nvlink_bidirectional_gbps: 0.0,
                        bf16_tflops: 0.0,
                        fp8_tflops: 0.0,
                        form_factor: FormFactor::Pcie,
                        pcie_gbps: 32.0,
                    }
                }
            };
            if let Some(t) = o.match_tokens {
                g.match_tokens = t.iter().map(|t| t.to_ascii_uppercase()).collect();
            }
            macro_rules! set {
                ($f:ident) => {
                    if let Some(v) = o.$f {
                        if !(v.is_finite() && v >= 0.0) {
                            return Err(format!(
                                "GPU model {:?}: {} must be a non-negative number",
                                o.name,
                                stringify!($f)
                            ));
                        }
                        g.$f = v;
                    }
                };
            }
            set!(memory_mib);
            set!(memory_bandwidth_gbps);
            set!(nvlink_bidirectional_gbps);
            set!(bf16_tflops);
            set!(pcie_gbps);
            match o.fp8_tflops {
                Some(v) => g.fp8_tflops = v,
                None if pos.is_none() => g.fp8_tflops = g.bf16_tflops,
                None => {}
            }
            if let Some(f) = o.form_factor {
                g.form_factor = f;
            }
            if g.match_tokens.is_empty() {
                return Err(format!("GPU model {:?} has no match tokens", o.name));
            }
            if g.memory_bandwidth_gbps <= 0.0 || g.bf16_tflops <= 0.0 || g.memory_mib <= 0.0 {
                return Err(format!(
                    "GPU model {:?}: memory, bandwidth and TFLOPS must be positive",
                    o.name
                ));
            }
            match pos {
                Some(i) => self.models[i] = g,
                None => self.models.push(g),
            }
        }
        Ok(())
    }

    /// Parse an override file (YAML or JSON) and merge it.
    pub fn merge_str(&mut self, text: &str) -> Result<(), String> {
        let parsed: OverrideFile = serde_yaml_ng::from_str(text).map_err(|e| {
            format!("{e}; expected a list of GPU models or {{gpus: [...]}} (see docs/planner.md)")
        })?;
        let list = match parsed {
            OverrideFile::List(l) | OverrideFile::Wrapped { gpus: l } => l,
        };
        self.merge(list)
    }

    /// The model a node product names: every match token of the model must be a whole token of
    /// the product; among several, the one with the most tokens wins (`H100` + `PCIe` beats
    /// `H100`), then the earlier entry.
    pub fn lookup(&self, product: &str) -> Option<&GpuModel> {
        let toks = tokens(product);
        let mut best: Option<&GpuModel> = None;
        for g in &self.models {
            if g.match_tokens.iter().all(|t| toks.contains(t))
                && best.is_none_or(|b| g.match_tokens.len() > b.match_tokens.len())
            {
                best = Some(g);
            }
        }
        best
    }
}

/// Upper-case tokens of a product or short name, split on `-`, `_`, space and `/`.
pub fn tokens(s: &str) -> Vec<String> {
    s.split(['-', '_', ' ', '/'])
        .filter(|t| !t.is_empty())
        .map(str::to_ascii_uppercase)
        .collect()
}

/// Whether a short GPU name from `spec.gpu.types` (`H100`, `h20`, `A100-SXM4`) names a node
/// product: every token of the short name is a whole token of the product.
pub fn short_name_matches(short: &str, product: &str) -> bool {
    let want = tokens(short);
    let have = tokens(product);
    !want.is_empty() && want.iter().all(|t| have.contains(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gfd_spellings_match() {
        let c = Catalog::builtin();
        let name = |p: &str| c.lookup(p).map(|g| g.name.clone());
        assert_eq!(name("NVIDIA-H100-80GB-HBM3").as_deref(), Some("H100"));
        assert_eq!(name("NVIDIA-H100-PCIe").as_deref(), Some("H100-PCIe"));
        assert_eq!(name("NVIDIA-H800").as_deref(), Some("H800"));
        assert_eq!(name("NVIDIA-H20").as_deref(), Some("H20"));
        assert_eq!(name("NVIDIA-H200").as_deref(), Some("H200"));
        assert_eq!(name("NVIDIA H200 141GB HBM3e").as_deref(), Some("H200"));
        assert_eq!(name("NVIDIA-L40S").as_deref(), Some("L40S"));
        assert_eq!(name("NVIDIA-L4").as_deref(), Some("L4"));
        assert_eq!(name("NVIDIA-A100-SXM4-80GB").as_deref(), Some("A100"));
        assert_eq!(name("NVIDIA-A100-PCIE-40GB").as_deref(), Some("A100-PCIe"));
        assert_eq!(name("Tesla-T4"), None);
    }

    #[test]
    fn short_names_are_whole_tokens() {
        assert!(short_name_matches("H20", "NVIDIA-H20"));
        assert!(!short_name_matches("H20", "NVIDIA-H200"));
        assert!(!short_name_matches("H200", "NVIDIA-H20"));
        assert!(short_name_matches("h100", "NVIDIA-H100-80GB-HBM3"));
        assert!(!short_name_matches("L4", "NVIDIA-L40S"));
        assert!(short_name_matches("A100-SXM4", "NVIDIA-A100-SXM4-80GB"));
    }

    #[test]
    fn overrides_merge_over_builtins() {
        let mut c = Catalog::builtin();
        c.merge_str(
            "gpus:\n- name: h800\n  nvlinkBidirectionalGbps: 320\n- name: MI300X\n  memoryMib: 196608\n  memoryBandwidthGbps: 5300\n  bf16Tflops: 1307\n  formFactor: SXM\n  nvlinkBidirectionalGbps: 896\n",
        )
        .unwrap();
        let h800 = c.lookup("NVIDIA-H800").unwrap();
        assert_eq!(h800.nvlink_per_direction_gbps(), 160.0);
        assert_eq!(h800.bf16_tflops, 989.0);
        let mi = c.lookup("AMD-MI300X").unwrap();
        assert_eq!(mi.fp8_tflops, 1307.0);
        assert!(c.merge_str("- name: X1\n").is_err());
        assert!(c.merge_str("not: [a list").is_err());
    }
}
