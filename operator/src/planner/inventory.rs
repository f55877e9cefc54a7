//! Inventory: what GPUs the cluster has, where, how they are linked and how many are free.
//!
//! Built from Node objects (and optionally Pods) as plain data. Per node:
//! - product, count and memory: node-agent labels (`tessera.dev/gpu.product`, `.count`,
//!   `.memory-mib`) win over GPU Feature Discovery's (`nvidia.com/gpu.product`, `.count`,
//!   `.memory`);
//! - allocatable GPUs: `status.allocatable["nvidia.com/gpu"]`;
//! - NVLink domains: the agent's `tessera.dev/nvlink.domains` (`0-3.4-7`), otherwise the catalog
//!   (SXM: one domain of all GPUs; PCIe: one domain per GPU);
//! - NVLink bandwidth per GPU per direction: the agent's `tessera.dev/nvlink.gbps`, otherwise
//!   the catalog's;
//! - fabric position: the values of an ordered list of topology label keys, outermost first;
//! - schedulability: cordoned, NotReady and taints (checked per deployment, see [`Eligibility`]).
//!
//! GPUs requested by bound pods that are Running or Pending are in use. Which GPU indices the
//! device plugin gives them is unknown here, so used GPUs are assumed to fill the node's NVLink
//! domains densely in domain order (domain 0 first); this keeps whole domains free where possible.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::core::v1::{Node, Pod, Taint, Toleration};

use super::catalog::{Catalog, FormFactor, GpuModel};
use crate::api::PlacementSpec;

/// Resource name of NVIDIA GPUs.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Default topology keys, outermost first.
pub const DEFAULT_TOPOLOGY_KEYS: [&str; 3] = [
    "topology.kubernetes.io/zone",
    "tessera.dev/fabric.block",
    "tessera.dev/fabric.rack",
];

/// One GPU product present in the cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuType {
    /// The node product string (`NVIDIA-H100-80GB-HBM3`), the type's identity in plans.
    pub product: String,
    /// Catalog numbers, with memory taken from the nodes' labels where they report it.
    pub model: GpuModel,
    /// Whether the catalog knows the product (otherwise conservative defaults are used).
    pub known: bool,
}

impl GpuType {
    /// Short name for messages (`H100`).
    pub fn short(&self) -> &str {
        &self.model.name
    }
}

/// One GPU node.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuNode {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Index into [`Inventory::types`].
    pub gpu_type: usize,
    /// Allocatable GPUs.
    pub allocatable: u32,
    /// Sizes of the NVLink domains (sum = allocatable).
    pub domains: Vec<u32>,
    /// Free GPUs per domain.
    pub free: Vec<u32>,
    /// NVLink bandwidth per GPU per direction, GB/s (0 without NVLink).
    pub nvlink_gbps: f64,
    /// Values of the topology keys, outermost first.
    pub topology: Vec<Option<String>>,
    /// Ready condition is True (or absent).
    pub ready: bool,
    /// `spec.unschedulable` (cordoned).
    pub unschedulable: bool,
    /// NoSchedule and NoExecute taints.
    pub taints: Vec<Taint>,
}

impl GpuNode {
    /// Free GPUs on the node.
    pub fn free_total(&self) -> u32 {
        self.free.iter().sum()
    }
}

/// The cluster's GPUs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Inventory {
    /// GPU nodes, sorted by name.
    pub nodes: Vec<GpuNode>,
    /// GPU products present, sorted by product.
    pub types: Vec<GpuType>,
    /// Topology label keys, outermost first.
    pub topology_keys: Vec<String>,
    /// Things the planner could not read and worked around.
    pub warnings: Vec<String>,
}

fn parse_u32(s: &str) -> Option<u32> {
    s.trim().parse().ok()
}

/// Parse `0-3.4-7` (GPU index ranges joined by `.`) into domain sizes.
pub fn parse_domains(s: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    for part in s.split('.') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (parse_u32(a)?, parse_u32(b)?),
            None => {
                let a = parse_u32(part)?;
                (a, a)
            }
        };
        if b < a {
            return None;
        }
        out.push(b - a + 1);
    }
    (!out.is_empty()).then_some(out)
}

/// GPUs a pod holds on its node: max(sum over containers, max over init containers) of
/// max(request, limit) of `nvidia.com/gpu`.
pub fn pod_gpus(pod: &Pod) -> u32 {
    let Some(spec) = &pod.spec else { return 0 };
    let one = |c: &k8s_openapi::api::core::v1::Container| -> u32 {
        let Some(r) = &c.resources else { return 0 };
        let get = |m: &Option<
            BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
        >| {
            m.as_ref()
                .and_then(|m| m.get(GPU_RESOURCE))
                .and_then(|q| parse_u32(&q.0))
                .unwrap_or(0)
        };
        get(&r.limits).max(get(&r.requests))
    };
    let main: u32 = spec.containers.iter().map(one).sum();
    let init = spec
        .init_containers
        .iter()
        .flatten()
        .map(one)
        .max()
        .unwrap_or(0);
    main.max(init)
}

/// GPUs in use per node from a pod list: bound pods that are not Succeeded or Failed.
pub fn used_gpus(pods: &[Pod]) -> HashMap<String, u32> {
    let mut used = HashMap::new();
    for p in pods {
        let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.as_ref()) else {
            continue;
        };
        let n = pod_gpus(p);
        if n > 0 {
            *used.entry(node.clone()).or_insert(0) += n;
        }
    }
    used
}

impl Inventory {
    /// Build the inventory from Nodes and Pods.
    pub fn from_nodes(
        nodes: &[Node],
        pods: &[Pod],
        catalog: &Catalog,
        topology_keys: &[String],
    ) -> Inventory {
        Self::from_nodes_and_use(nodes, &used_gpus(pods), catalog, topology_keys, None)
    }

    /// Build the inventory from Nodes (owned or shared, e.g. the `Arc`s of a watch cache) and
    /// the GPUs in use per node name (see [`used_gpus`]), without copying the nodes. With
    /// `keep_labels`, each [`GpuNode::labels`] holds only those keys: enough to plan the
    /// deployments whose [`labels_read`] they are, without a copy of every label of every
    /// node (GPU feature discovery and NFD set dozens per node).
    pub fn from_nodes_and_use<N: Borrow<Node>>(
        nodes: &[N],
        used: &HashMap<String, u32>,
        catalog: &Catalog,
        topology_keys: &[String],
        keep_labels: Option<&BTreeSet<String>>,
    ) -> Inventory {
        let mut warnings = Vec::new();
        let mut sorted: Vec<&Node> = nodes.iter().map(Borrow::borrow).collect();
        sorted.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        let mut type_ids: BTreeMap<String, usize> = BTreeMap::new();
        let mut types: Vec<GpuType> = Vec::new();
        let mut label_memory: Vec<Option<f64>> = Vec::new();
        let mut out = Vec::new();
        for node in sorted {
            let Some(name) = node.metadata.name.clone() else {
                warnings.push("a Node without metadata.name was skipped".into());
                continue;
            };
            // Borrowed until the node is known to hold GPUs (most nodes of a cluster may not).
            let node_labels = node.metadata.labels.as_ref();
            let label = |k: &str| node_labels.and_then(|l| l.get(k)).map(String::as_str);
            let product = label("tessera.dev/gpu.product").or(label("nvidia.com/gpu.product"));
            let allocatable = node
                .status
                .as_ref()
                .and_then(|s| s.allocatable.as_ref())
                .and_then(|a| a.get(GPU_RESOURCE))
                .map(|q| q.0.clone());
            let allocatable = match allocatable {
                None => {
                    if product.is_some() {
                        warnings.push(format!(
                            "node {name}: has a GPU product label but no allocatable {GPU_RESOURCE}; skipped"
                        ));
                    }
                    continue;
                }
                Some(q) => match parse_u32(&q) {
                    Some(n) => n,
                    None => {
                        warnings.push(format!(
                            "node {name}: allocatable {GPU_RESOURCE} {q:?} is not a whole number; skipped"
                        ));
                        continue;
                    }
                },
            };
            if allocatable == 0 {
                continue;
            }
            let Some(product) = product else {
                warnings.push(format!(
                    "node {name}: {allocatable} GPUs but no nvidia.com/gpu.product label; skipped"
                ));
                continue;
            };
            let count = label("tessera.dev/gpu.count")
                .or(label("nvidia.com/gpu.count"))
                .and_then(parse_u32)
                .unwrap_or(allocatable);
            let memory_mib = label("tessera.dev/gpu.memory-mib")
                .or(label("nvidia.com/gpu.memory"))
                .and_then(|s| s.trim().parse::<f64>().ok())
                .filter(|m| *m > 0.0);
            let t = *type_ids.entry(product.to_owned()).or_insert_with(|| {
                let (model, known) = match catalog.lookup(product) {
                    Some(m) => (m.clone(), true),
                    None => {
                        warnings.push(format!(
                            "GPU product {product:?} is not in the catalog; using conservative defaults \
                             (no NVLink, 300 GB/s memory, 50 TFLOPS); add it with --catalog"
                        ));
                        (GpuModel::unknown(product, memory_mib), false)
                    }
                };
                types.push(GpuType {
                    product: product.to_owned(),
                    model,
                    known,
                });
                label_memory.push(None);
                types.len() - 1
            });
            if let Some(mem) = memory_mib {
                // The smallest memory any node of the type reports wins over the catalog.
                let seen = &mut label_memory[t];
                *seen = Some(seen.map_or(mem, |s: f64| s.min(mem)));
                types[t].model.memory_mib = seen.unwrap_or(mem);
            }
            let model = &types[t].model;
            let mut domains = match label("tessera.dev/nvlink.domains") {
                Some(s) => match parse_domains(s) {
                    Some(d) => d,
                    None => {
                        warnings.push(format!(
                            "node {name}: tessera.dev/nvlink.domains {s:?} is not like 0-3.4-7; using the catalog"
                        ));
                        default_domains(model, count)
                    }
                },
                None => default_domains(model, count),
            };
            // Reconcile the domains with what the device plugin offers.
            let mut total: u32 = domains.iter().sum();
            while total > allocatable {
                let last = domains.last_mut().expect("total > 0");
                let cut = (*last).min(total - allocatable);
                *last -= cut;
                total -= cut;
                if *last == 0 {
                    domains.pop();
                }
            }
            while total < allocatable {
                domains.push(1);
                total += 1;
            }
            let nvlink_gbps = match label("tessera.dev/nvlink.gbps") {
                Some(s) => match s.trim().parse::<f64>() {
                    Ok(v) if v.is_finite() && v >= 0.0 => v,
                    _ => {
                        warnings.push(format!(
                            "node {name}: tessera.dev/nvlink.gbps {s:?} is not a number; using the catalog"
                        ));
                        model.nvlink_per_direction_gbps()
                    }
                },
                None => model.nvlink_per_direction_gbps(),
            };
            let mut free = domains.clone();
            let mut in_use = used.get(&name).copied().unwrap_or(0);
            if in_use > allocatable {
                warnings.push(format!(
                    "node {name}: pods request {in_use} GPUs but only {allocatable} are allocatable"
                ));
            }
            for f in &mut free {
                let take = (*f).min(in_use);
                *f -= take;
                in_use -= take;
            }
            let status = node.status.as_ref();
            let ready = status
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
                .is_none_or(|c| c.status == "True");
            let spec = node.spec.as_ref();
            let unschedulable = spec.and_then(|s| s.unschedulable).unwrap_or(false);
            let taints = spec
                .and_then(|s| s.taints.clone())
                .unwrap_or_default()
                .into_iter()
                .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
                .collect();
            let labels: BTreeMap<String, String> = match (node_labels, keep_labels) {
                (None, _) => BTreeMap::new(),
                (Some(l), None) => l.clone(),
                (Some(l), Some(keep)) => keep
                    .iter()
                    .filter_map(|k| l.get_key_value(k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            };
            let topology = topology_keys
                .iter()
                .map(|k| node_labels.and_then(|l| l.get(k)).cloned())
                .collect();
            out.push(GpuNode {
                name,
                labels,
                gpu_type: t,
                allocatable,
                domains,
                free,
                nvlink_gbps,
                topology,
                ready,
                unschedulable,
                taints,
            });
        }
        // Renumber types in product order so that plans do not depend on node order.
        let mut order: Vec<usize> = (0..types.len()).collect();
        order.sort_by(|&a, &b| types[a].product.cmp(&types[b].product));
        let mut remap = vec![0; types.len()];
        for (new, &old) in order.iter().enumerate() {
            remap[old] = new;
        }
        let types: Vec<GpuType> = order.iter().map(|&i| types[i].clone()).collect();
        for n in &mut out {
            n.gpu_type = remap[n.gpu_type];
        }
        Inventory {
            nodes: out,
            types,
            topology_keys: topology_keys.to_vec(),
            warnings,
        }
    }
}

/// The node label keys the planner reads to place deployments with these placement specs:
/// their node selectors and pipeline topology keys (the topology keys are read apart, into
/// [`GpuNode::topology`]).
pub fn labels_read<'a>(
    placements: impl IntoIterator<Item = &'a PlacementSpec>,
) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for p in placements {
        keys.extend(p.node_selector.keys().cloned());
        keys.extend(p.pipeline_topology_key.iter().cloned());
    }
    keys
}

fn default_domains(model: &GpuModel, count: u32) -> Vec<u32> {
    if count == 0 {
        return Vec::new();
    }
    if model.form_factor == FormFactor::Sxm && model.nvlink_bidirectional_gbps > 0.0 {
        vec![count]
    } else {
        vec![1; count as usize]
    }
}

/// Kubernetes toleration semantics: empty effect matches every effect; an empty key with
/// `Exists` matches every taint; `Exists` ignores the value; `Equal` (the default) compares it.
pub fn tolerates(tol: &Toleration, taint: &Taint) -> bool {
    if let Some(e) = tol.effect.as_deref().filter(|e| !e.is_empty())
        && e != taint.effect
    {
        return false;
    }
    let exists = tol.operator.as_deref() == Some("Exists");
    match tol.key.as_deref().filter(|k| !k.is_empty()) {
        None => exists,
        Some(k) if k != taint.key => false,
        Some(_) => {
            exists || tol.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
        }
    }
}

/// Which nodes one deployment may use, with counts of why the others are excluded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Eligibility {
    pub ok: Vec<bool>,
    pub not_ready: usize,
    pub cordoned: usize,
    pub tainted: usize,
    pub selector: usize,
    /// First untolerated taint seen, for messages.
    pub example_taint: Option<String>,
}

impl Eligibility {
    /// Evaluate every node against a deployment's placement spec.
    pub fn compute(inv: &Inventory, placement: &PlacementSpec) -> Eligibility {
        let mut e = Eligibility {
            ok: Vec::with_capacity(inv.nodes.len()),
            ..Default::default()
        };
        for n in &inv.nodes {
            let ok = if !n.ready {
                e.not_ready += 1;
                false
            } else if n.unschedulable {
                e.cordoned += 1;
                false
            } else if !placement
                .node_selector
                .iter()
                .all(|(k, v)| n.labels.get(k) == Some(v))
            {
                e.selector += 1;
                false
            } else if let Some(t) = n
                .taints
                .iter()
                .find(|t| !placement.tolerations.iter().any(|tol| tolerates(tol, t)))
            {
                e.tainted += 1;
                if e.example_taint.is_none() {
                    e.example_taint = Some(format!(
                        "{}={}:{}",
                        t.key,
                        t.value.as_deref().unwrap_or(""),
                        t.effect
                    ));
                }
                false
            } else {
                true
            };
            e.ok.push(ok);
        }
        e
    }

    /// Why some nodes are excluded, for messages (`2 NotReady, 1 cordoned`); empty when none are.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if self.not_ready > 0 {
            parts.push(format!("{} NotReady", self.not_ready));
        }
        if self.cordoned > 0 {
            parts.push(format!("{} cordoned", self.cordoned));
        }
        if self.selector > 0 {
            parts.push(format!(
                "{} not matching placement.nodeSelector",
                self.selector
            ));
        }
        if self.tainted > 0 {
            parts.push(format!(
                "{} with untolerated taints (e.g. {})",
                self.tainted,
                self.example_taint.as_deref().unwrap_or("?")
            ));
        }
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taint(key: &str, value: Option<&str>, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            value: value.map(Into::into),
            effect: effect.into(),
            time_added: None,
        }
    }
    fn tol(
        key: Option<&str>,
        op: Option<&str>,
        value: Option<&str>,
        effect: Option<&str>,
    ) -> Toleration {
        Toleration {
            key: key.map(Into::into),
            operator: op.map(Into::into),
            value: value.map(Into::into),
            effect: effect.map(Into::into),
            toleration_seconds: None,
        }
    }

    #[test]
    fn toleration_semantics() {
        let t = taint("gpu", Some("h100"), "NoSchedule");
        assert!(tolerates(&tol(None, Some("Exists"), None, None), &t));
        assert!(!tolerates(&tol(None, None, None, None), &t));
        assert!(tolerates(&tol(Some("gpu"), Some("Exists"), None, None), &t));
        assert!(tolerates(
            &tol(Some("gpu"), Some("Equal"), Some("h100"), None),
            &t
        ));
        assert!(tolerates(
            &tol(Some("gpu"), None, Some("h100"), Some("NoSchedule")),
            &t
        ));
        assert!(!tolerates(
            &tol(Some("gpu"), Some("Equal"), Some("h800"), None),
            &t
        ));
        assert!(!tolerates(
            &tol(Some("gpu"), Some("Exists"), None, Some("NoExecute")),
            &t
        ));
        assert!(!tolerates(
            &tol(Some("other"), Some("Exists"), None, None),
            &t
        ));
        let bare = taint("dedicated", None, "NoExecute");
        assert!(tolerates(
            &tol(Some("dedicated"), Some("Equal"), Some(""), None),
            &bare
        ));
    }

    #[test]
    fn domains_parse() {
        assert_eq!(parse_domains("0-3.4-7"), Some(vec![4, 4]));
        assert_eq!(parse_domains("0-7"), Some(vec![8]));
        assert_eq!(parse_domains("0.1.2-3"), Some(vec![1, 1, 2]));
        assert_eq!(parse_domains("3-1"), None);
        assert_eq!(parse_domains("x"), None);
        assert_eq!(parse_domains(""), None);
    }
}
