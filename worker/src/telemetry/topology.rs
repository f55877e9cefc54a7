//! NVLink domains and bandwidth from the NVLink matrix.
//!
//! A domain is a set of GPUs that reach each other over NVLink, directly (NVLink bridges, HGX
//! boards without NVSwitch) or through NVSwitch (every GPU with an active link to a switch is in
//! the node's one switch domain; HGX boards have a single NVSwitch fabric). GPUs without an
//! active link are domains of their own, which is how the planner sees PCIe parts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Gpu, Remote, normalize_bus_id};

/// Per-direction GB/s of one link when the driver does not report the speed, by NVLink
/// generation (spec): NVLink 1 (P100) 20; 2 (V100) 25; 3 (A100) 25; 4 (H100, H800, H20, H200)
/// 25; 5 (B200) 50.
pub fn link_gbps_for_version(version: Option<u32>) -> f64 {
    match version {
        Some(1) => 20.0,
        Some(5) => 50.0,
        _ => 25.0,
    }
}

/// NVLink topology of one node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Topology {
    /// GPU indices per NVLink domain, each sorted, domains ordered by their first GPU.
    pub domains: Vec<Vec<u32>>,
    /// Per GPU (by index): active links x per-link per-direction GB/s.
    pub nvlink_gbps: BTreeMap<u32, f64>,
}

impl Topology {
    /// The slowest GPU's NVLink bandwidth, GB/s per direction (0 without NVLink).
    pub fn min_nvlink_gbps(&self) -> f64 {
        self.nvlink_gbps
            .values()
            .copied()
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.min(v))))
            .unwrap_or(0.0)
    }

    /// Domains as a label value: ranges joined by `_` inside a domain, domains joined by `.`,
    /// for example `0-7`, `0-3.4-7`, `0.1.2.3` (four GPUs without NVLink).
    pub fn domains_label(&self) -> String {
        self.domains
            .iter()
            .map(|d| runs(d))
            .collect::<Vec<_>>()
            .join(".")
    }
}

fn runs(sorted: &[u32]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join("_")
}

/// Compute domains and bandwidth from the GPUs' links.
pub fn compute(gpus: &[Gpu]) -> Topology {
    let n = gpus.len();
    // Union-find over GPUs plus one virtual node for the NVSwitch fabric.
    let switch = n;
    let mut parent: Vec<usize> = (0..=n).collect();
    fn find(p: &mut [usize], mut x: usize) -> usize {
        while p[x] != x {
            p[x] = p[p[x]];
            x = p[x];
        }
        x
    }
    let by_bus: BTreeMap<String, usize> = gpus
        .iter()
        .enumerate()
        .map(|(i, g)| (normalize_bus_id(&g.pci_bus_id), i))
        .collect();
    let mut nvlink_gbps = BTreeMap::new();
    for (i, gpu) in gpus.iter().enumerate() {
        let mut gbps = 0.0;
        for link in gpu.nvlinks.iter().filter(|l| l.active) {
            gbps += link
                .speed_gbps
                .unwrap_or_else(|| link_gbps_for_version(link.version));
            let peer = match &link.remote {
                Remote::Gpu { pci_bus_id } => by_bus.get(&normalize_bus_id(pci_bus_id)).copied(),
                Remote::Switch => Some(switch),
                Remote::Unknown => None,
            };
            if let Some(peer) = peer {
                let (a, b) = (find(&mut parent, i), find(&mut parent, peer));
                parent[a] = b;
            }
        }
        nvlink_gbps.insert(gpu.index, gbps);
    }
    let mut groups: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
    for (i, gpu) in gpus.iter().enumerate() {
        let root = find(&mut parent, i);
        groups.entry(root).or_default().push(gpu.index);
    }
    let mut domains: Vec<Vec<u32>> = groups
        .into_values()
        .map(|mut d| {
            d.sort_unstable();
            d
        })
        .collect();
    domains.sort();
    Topology {
        domains,
        nvlink_gbps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_compress_ranges() {
        assert_eq!(runs(&[0, 1, 2, 3]), "0-3");
        assert_eq!(runs(&[0, 2, 3, 5]), "0_2-3_5");
        assert_eq!(runs(&[4]), "4");
    }

    #[test]
    fn gpus_without_links_are_their_own_domains() {
        let gpus: Vec<Gpu> = (0..4)
            .map(|i| Gpu {
                index: i,
                pci_bus_id: format!("00000000:{:02x}:00.0", i + 1),
                ..Gpu::default()
            })
            .collect();
        let t = compute(&gpus);
        assert_eq!(t.domains, vec![vec![0], vec![1], vec![2], vec![3]]);
        assert_eq!(t.domains_label(), "0.1.2.3");
        assert_eq!(t.min_nvlink_gbps(), 0.0);
    }
}
