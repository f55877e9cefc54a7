//! Command-line surface of `tessera-operator`.

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand};

use crate::logging::LogFormat;

/// Tessera: places LLM inference fleets on mixed GPU clusters with a bandwidth-aware planner.
#[derive(Debug, Parser)]
#[command(name = "tessera-operator", version, about, long_about = None)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "TESSERA_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process; boxing buys nothing
pub enum Command {
    /// Print the ModelDeployment CustomResourceDefinition as YAML (what crds/ holds).
    Crd,
    /// Run the controller against the cluster in the current kubeconfig or service account.
    Run(RunArgs),
    /// Plan ModelDeployments against a cluster snapshot without touching a cluster: GPU type,
    /// tensor x pipeline layout and nodes for every replica, with predictions and reasons.
    Plan(crate::plan_cmd::PlanArgs),
    /// Replay a load trace (CSV `t,demand`) through the autoscaler's decision code and print the
    /// replicas it would choose, row by row (docs/autoscaling.md).
    SimulateAutoscaling(crate::simulate_cmd::SimulateArgs),
    /// Predict one layout for one workload with the planner's cost model, without a cluster:
    /// time to first token, inter-token latency, output tokens/s per replica and per GPU, and
    /// the concurrency that fits (docs/cost-model.md).
    Predict(crate::predict_cmd::PredictArgs),
    /// Read a running replica leader's /metrics through the autoscaler's scrape code (the
    /// engine's own series) and print the sample and the decision it would take, as JSON.
    Scrape(crate::scrape_cmd::ScrapeArgs),
}

/// Flags of `tessera-operator run`. The Helm chart sets these; keep docs/operator.md in step.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Elect a leader on a Lease so that only one replica of the operator writes.
    #[arg(long, env = "TESSERA_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "tessera-operator", env = "TESSERA_LEASE_NAME")]
    pub lease_name: String,
    /// This replica's identity in the Lease; by default the pod name (POD_NAME, else HOSTNAME).
    #[arg(long, env = "POD_NAME")]
    pub leader_identity: Option<String>,
    /// Namespace of the Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "tessera-system")]
    pub lease_namespace: String,
    /// Watch ModelDeployments in this namespace only (namespaced mode); all namespaces if unset.
    #[arg(long, env = "TESSERA_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Address of the Prometheus /metrics endpoint.
    #[arg(long, default_value = "0.0.0.0:8080", env = "TESSERA_METRICS_ADDR")]
    pub metrics_addr: SocketAddr,
    /// Address of the /healthz and /readyz endpoints.
    #[arg(long, default_value = "0.0.0.0:8081", env = "TESSERA_HEALTH_ADDR")]
    pub health_addr: SocketAddr,
    /// Worker image used when a ModelDeployment sets no worker.image.
    #[arg(long, env = "TESSERA_WORKER_IMAGE", default_value = concat!("tessera-worker:", env!("CARGO_PKG_VERSION")))]
    pub worker_image: String,
    /// File holding the key that rank-group secrets are derived from (the chart mounts a Secret
    /// here): every incarnation of a Tessera replica gets its own TESSERA_GROUP_SECRET, which
    /// its ranks prove they hold when they join. Unset: groups run without a secret (only the
    /// incarnation id is checked).
    #[arg(long, env = "TESSERA_GROUP_KEY_FILE")]
    pub group_key_file: Option<std::path::PathBuf>,
    /// Image of `engine: vllm` pods that set no `engine.image` or `worker.image`.
    #[arg(long, env = "TESSERA_VLLM_IMAGE", default_value = crate::build::DEFAULT_VLLM_IMAGE)]
    pub vllm_image: String,
    /// Image of `engine: sglang` pods that set no `engine.image` or `worker.image`.
    #[arg(long, env = "TESSERA_SGLANG_IMAGE", default_value = crate::build::DEFAULT_SGLANG_IMAGE)]
    pub sglang_image: String,
    /// Node label keys that describe the fabric, outermost first (zone, block, rack).
    #[arg(
        long,
        value_delimiter = ',',
        env = "TESSERA_TOPOLOGY_KEYS",
        default_value = "topology.kubernetes.io/zone,tessera.dev/fabric.block,tessera.dev/fabric.rack"
    )]
    pub topology_keys: Vec<String>,
    /// RDMA devices, as NAME=COUNT (repeat, or separate with commas), that every worker pod
    /// moving KV caches or expert tokens between nodes requests: prefill/decode pool pods and
    /// the pods of an expert-parallel group over nodes. Those containers also get the IPC_LOCK
    /// capability. Example: --rdma-resource rdma/rdma_shared_device_a=1. Unset: such traffic
    /// goes over TCP (the engines fall back to it).
    #[arg(
        long = "rdma-resource",
        value_delimiter = ',',
        env = "TESSERA_RDMA_RESOURCES"
    )]
    pub rdma_resources: Vec<String>,
    /// Create a NetworkPolicy per replica so that workers accept collective and rendezvous
    /// traffic only from their own replica group.
    #[arg(long, env = "TESSERA_WORKER_NETWORK_POLICIES")]
    pub worker_network_policies: bool,
    /// Label selector of the namespaces whose pods may call the workers' OpenAI API (empty:
    /// only the ModelDeployment's own namespace).
    #[arg(long, default_value = "", env = "TESSERA_API_NAMESPACE_SELECTOR")]
    pub api_namespace_selector: String,
    /// Namespace of the Prometheus that scrapes worker /metrics.
    #[arg(
        long,
        default_value = "monitoring",
        env = "TESSERA_MONITORING_NAMESPACE"
    )]
    pub monitoring_namespace: String,
    /// Labels of the operator's own pods (`k=v,...`), admitted to the workers' HTTP port by the
    /// worker NetworkPolicies so the autoscaler can scrape replica leaders.
    #[arg(
        long,
        default_value = "app.kubernetes.io/name=tessera,app.kubernetes.io/component=operator",
        env = "TESSERA_OPERATOR_POD_SELECTOR"
    )]
    pub operator_pod_selector: String,
    /// Seconds between autoscaling passes (scrape every ready replica leader, decide, scale).
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600), env = "TESSERA_AUTOSCALE_INTERVAL_SECONDS")]
    pub autoscale_interval_seconds: u64,
    /// Timeout of one /metrics scrape, seconds.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60), env = "TESSERA_AUTOSCALE_SCRAPE_TIMEOUT_SECONDS")]
    pub autoscale_scrape_timeout_seconds: u64,
}
