//! The node agent (`tessera-worker agent`, a DaemonSet): publishes the node's GPU and NVLink
//! topology as Node labels for the planner, and serves the node's GPU metrics.
//!
//! This is the only module of the worker that talks to Kubernetes; the inference path does not
//! use it. Writes are server-side apply under the field manager [`FIELD_MANAGER`], so the agent
//! owns exactly its labels and annotation and nothing else on the Node. The planner reads
//! these labels in preference to GPU Feature Discovery's and to its catalog.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::telemetry::{Snapshot, Telemetry, fake::FakeTelemetry, nvml, server};

/// Field manager of the agent's server-side applies.
pub const FIELD_MANAGER: &str = "tessera-node-agent";
/// Label: GPU product, GFD spelling (`NVIDIA-H100-80GB-HBM3`).
pub const LABEL_PRODUCT: &str = "tessera.dev/gpu.product";
/// Label: number of GPUs.
pub const LABEL_COUNT: &str = "tessera.dev/gpu.count";
/// Label: memory per GPU in MiB (the smallest, if they differ).
pub const LABEL_MEMORY: &str = "tessera.dev/gpu.memory-mib";
/// Label: NVLink domains, for example `0-3.4-7` (see `Topology::domains_label`).
pub const LABEL_DOMAINS: &str = "tessera.dev/nvlink.domains";
/// Label: per-GPU NVLink bandwidth, GB/s per direction (the slowest GPU's), `0` without NVLink.
pub const LABEL_GBPS: &str = "tessera.dev/nvlink.gbps";
/// Annotation: the full topology as JSON.
pub const ANNOTATION_TOPOLOGY: &str = "tessera.dev/topology";

/// Flags of `tessera-worker agent`.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Node this agent runs on (set from the downward API: spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Seconds between refreshes of the labels.
    #[arg(long, default_value_t = 300, env = "TESSERA_AGENT_INTERVAL_SECONDS")]
    pub interval_seconds: u64,
    /// Address of the GPU /metrics endpoint (dcgm-exporter names; 9400 is dcgm-exporter's port).
    #[arg(
        long,
        default_value = "0.0.0.0:9400",
        env = "TESSERA_AGENT_METRICS_ADDR"
    )]
    pub metrics_addr: SocketAddr,
    /// Read telemetry from this JSON fixture instead of NVML (demos and tests).
    #[arg(long)]
    pub fake: Option<PathBuf>,
    /// Publish once and exit.
    #[arg(long)]
    pub once: bool,
}

/// Make a label value valid: at most 63 characters of `[A-Za-z0-9._-]`, starting and ending
/// alphanumeric.
pub fn label_value(raw: &str) -> String {
    let cleaned: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut v: String = cleaned.chars().take(63).collect();
    while v.ends_with(|c: char| !c.is_ascii_alphanumeric()) {
        v.pop();
    }
    v.trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

/// The labels the agent publishes for a snapshot. Empty when the node has no readable GPUs,
/// which removes labels this agent published earlier (server-side apply drops fields the
/// manager no longer sets).
pub fn node_labels(s: &Snapshot) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let Some(first) = s.gpus.first() else {
        return labels;
    };
    if !s.available {
        return labels;
    }
    let memory = s.gpus.iter().map(|g| g.memory_total_mib).min().unwrap_or(0);
    labels.insert(
        LABEL_PRODUCT.into(),
        label_value(&first.name.replace(' ', "-")),
    );
    labels.insert(LABEL_COUNT.into(), s.gpus.len().to_string());
    labels.insert(LABEL_MEMORY.into(), memory.to_string());
    let domains = s.topology.domains_label();
    // Very fragmented domains on very large nodes may not fit a label; the annotation has them.
    if domains.len() <= 63 {
        labels.insert(LABEL_DOMAINS.into(), domains);
    }
    labels.insert(
        LABEL_GBPS.into(),
        format!("{}", s.topology.min_nvlink_gbps().floor() as u64),
    );
    labels
}

/// The topology annotation (JSON), or `None` without GPUs.
pub fn topology_annotation(s: &Snapshot) -> Option<String> {
    if !s.available || s.gpus.is_empty() {
        return None;
    }
    let gpus: Vec<_> = s
        .gpus
        .iter()
        .map(|g| {
            json!({
                "index": g.index,
                "uuid": g.uuid,
                "name": g.name,
                "pciBusId": g.pci_bus_id,
                "memoryMiB": g.memory_total_mib,
                "activeNvlinks": g.nvlinks.iter().filter(|l| l.active).count(),
                "nvlinkGBps": s.topology.nvlink_gbps.get(&g.index).copied().unwrap_or(0.0),
            })
        })
        .collect();
    Some(
        json!({
            "driverVersion": s.driver_version,
            "domains": s.topology.domains,
            "gpus": gpus,
        })
        .to_string(),
    )
}

/// The server-side apply body for the node: exactly the fields the agent owns.
pub fn apply_body(node_name: &str, s: &Snapshot) -> serde_json::Value {
    let annotations: BTreeMap<&str, String> = topology_annotation(s)
        .map(|a| (ANNOTATION_TOPOLOGY, a))
        .into_iter()
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node_name,
            "labels": node_labels(s),
            "annotations": annotations,
        }
    })
}

/// Whether the node already carries exactly what we would apply (then the agent writes nothing).
pub fn up_to_date(node: &Node, s: &Snapshot) -> bool {
    let want = node_labels(s);
    let have = node.metadata.labels.clone().unwrap_or_default();
    let labels_ok = want.iter().all(|(k, v)| have.get(k) == Some(v))
        && [
            LABEL_PRODUCT,
            LABEL_COUNT,
            LABEL_MEMORY,
            LABEL_DOMAINS,
            LABEL_GBPS,
        ]
        .iter()
        .all(|k| want.contains_key(*k) || !have.contains_key(*k));
    let have_ann = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_TOPOLOGY));
    labels_ok && have_ann == topology_annotation(s).as_ref()
}

/// Run the agent until SIGTERM (or once, with `--once`).
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let telemetry: Arc<dyn Telemetry> = match &args.fake {
        Some(path) => Arc::new(FakeTelemetry::from_file(path)?),
        None => Arc::from(nvml::detect()),
    };
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster service account or kubeconfig)")?;
    let nodes: Api<Node> = Api::all(client);

    if !args.once {
        let router = server::router(telemetry.clone(), args.node_name.clone());
        let listener = tokio::net::TcpListener::bind(args.metrics_addr)
            .await
            .with_context(|| format!("binding the metrics address {}", args.metrics_addr))?;
        tracing::info!(addr = %args.metrics_addr, "serving GPU metrics on /metrics");
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
    }

    let mut said_no_gpus = false;
    loop {
        let t = telemetry.clone();
        let snapshot = tokio::task::spawn_blocking(move || t.snapshot()).await?;
        if snapshot.gpus.is_empty() {
            if !said_no_gpus {
                tracing::info!(
                    node = %args.node_name,
                    reason = snapshot.reason.as_deref().unwrap_or("no GPUs found"),
                    "no readable NVIDIA GPUs on this node; publishing no GPU labels"
                );
                said_no_gpus = true;
            }
        } else {
            said_no_gpus = false;
        }
        if let Err(e) = publish(&nodes, &args.node_name, &snapshot).await {
            tracing::warn!(node = %args.node_name, error = %format!("{e:#}"), "publishing topology failed; will retry");
        }
        if args.once {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(args.interval_seconds)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// Read the node and, unless it is up to date, apply the agent's labels and annotation.
/// Returns whether it wrote.
pub async fn publish(nodes: &Api<Node>, name: &str, s: &Snapshot) -> anyhow::Result<bool> {
    let node = nodes
        .get(name)
        .await
        .with_context(|| format!("reading node {name}"))?;
    if up_to_date(&node, s) {
        tracing::debug!(node = name, "labels up to date; nothing to write");
        return Ok(false);
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    nodes
        .patch(name, &params, &Patch::Apply(apply_body(name, s)))
        .await
        .with_context(|| format!("applying topology labels to node {name}"))?;
    tracing::info!(node = name, labels = ?node_labels(s), "published GPU topology");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_sanitised() {
        assert_eq!(
            label_value("NVIDIA H100 80GB HBM3"),
            "NVIDIA-H100-80GB-HBM3"
        );
        assert_eq!(label_value("--x--"), "x");
        assert_eq!(label_value(&"a".repeat(80)).len(), 63);
        assert_eq!(label_value("GPU (rev a1)"), "GPU--rev-a1");
    }

    #[test]
    fn no_gpus_means_no_labels_and_no_annotation() {
        let s = Snapshot::unavailable("none", "no driver");
        assert!(node_labels(&s).is_empty());
        assert_eq!(topology_annotation(&s), None);
        let body = apply_body("cpu-1", &s);
        assert_eq!(body["metadata"]["labels"], json!({}));
    }
}
