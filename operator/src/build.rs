//! Desired child objects of a ModelDeployment, built from its placements (pure: plain data in,
//! Kubernetes objects out). The controller applies exactly these with server-side apply, and
//! `tessera-operator plan -o yaml` prints them. The names, labels and environment are the
//! contract with the worker (`docs/contract.md`).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    ObjectFieldSelector, PersistentVolumeClaimVolumeSource, Pod, PodAffinityTerm, PodAntiAffinity,
    PodSecurityContext, PodSpec, Probe, ResourceRequirements, SeccompProfile, SecurityContext,
    Service, ServiceAccount, ServicePort, ServiceSpec, Volume, VolumeMount,
    WeightedPodAffinityTerm,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta, OwnerReference,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub use crate::planner::inventory::GPU_RESOURCE;
use kube::Resource;

use crate::api::{EngineName, ModelDeployment, ReplicaPlacement, WorkerVolume};

/// Label keys and values shared with the worker and the scale selector.
pub mod labels {
    pub const DEPLOYMENT: &str = "tessera.dev/deployment";
    pub const REPLICA: &str = "tessera.dev/replica";
    pub const STAGE: &str = "tessera.dev/stage";
    pub const ROLE: &str = "tessera.dev/role";
    pub const INCARNATION: &str = "tessera.dev/incarnation";
    pub const ROLE_LEADER: &str = "leader";
    pub const ROLE_WORKER: &str = "worker";
    pub const NAME: &str = "app.kubernetes.io/name";
    pub const INSTANCE: &str = "app.kubernetes.io/instance";
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    pub const WORKER_NAME: &str = "tessera-worker";
    pub const MANAGER: &str = "tessera-operator";
    /// The pool of a disaggregated deployment's worker pod: `prefill` or `decode` (absent in
    /// aggregated serving). `tessera.dev/role` stays `leader` or `worker`.
    pub const POOL: &str = "tessera.dev/pool";
    /// The router pods of a disaggregated deployment carry the deployment's name under this key
    /// (and no `tessera.dev/deployment`, which selects worker pods).
    pub const ROUTER: &str = "tessera.dev/router";
    /// `app.kubernetes.io/name` of the router pods.
    pub const ROUTER_NAME: &str = "tessera-router";
}

/// Environment variables the worker reads (`docs/contract.md`).
pub mod env {
    pub const DEPLOYMENT: &str = "TESSERA_DEPLOYMENT";
    pub const NAMESPACE: &str = "TESSERA_NAMESPACE";
    pub const REPLICA: &str = "TESSERA_REPLICA";
    pub const INCARNATION: &str = "TESSERA_INCARNATION";
    pub const STAGE: &str = "TESSERA_STAGE";
    pub const TP: &str = "TESSERA_TP";
    pub const PP: &str = "TESSERA_PP";
    pub const WORLD_SIZE: &str = "TESSERA_WORLD_SIZE";
    pub const RANK_OFFSET: &str = "TESSERA_RANK_OFFSET";
    pub const LOCAL_RANKS: &str = "TESSERA_LOCAL_RANKS";
    pub const LEADER_ADDRESS: &str = "TESSERA_LEADER_ADDRESS";
    pub const RENDEZVOUS_PORT: &str = "TESSERA_RENDEZVOUS_PORT";
    pub const PORT: &str = "TESSERA_PORT";
    pub const MODEL_URI: &str = "TESSERA_MODEL_URI";
    pub const MODEL_PATH: &str = "TESSERA_MODEL_PATH";
    pub const MODEL_SHA256: &str = "TESSERA_MODEL_SHA256";
    pub const GROUP_SECRET: &str = "TESSERA_GROUP_SECRET";
    pub const SERVED_MODEL_NAME: &str = "TESSERA_SERVED_MODEL_NAME";
    pub const MAX_CONCURRENCY: &str = "TESSERA_MAX_CONCURRENCY";
    pub const CONTEXT_LENGTH: &str = "TESSERA_CONTEXT_LENGTH";

    /// Every variable the operator sets on every worker (the optional checksum aside).
    pub const REQUIRED: &[&str] = &[
        DEPLOYMENT,
        NAMESPACE,
        REPLICA,
        INCARNATION,
        STAGE,
        TP,
        PP,
        WORLD_SIZE,
        RANK_OFFSET,
        LOCAL_RANKS,
        LEADER_ADDRESS,
        RENDEZVOUS_PORT,
        PORT,
        MODEL_URI,
        MODEL_PATH,
        SERVED_MODEL_NAME,
        MAX_CONCURRENCY,
        CONTEXT_LENGTH,
    ];
}

/// Port of the ranks' rendezvous and collective traffic.
pub const RENDEZVOUS_PORT: i32 = 29500;
/// ServiceAccount of the worker pods (no token mounted).
pub const WORKER_SERVICE_ACCOUNT: &str = "tessera-worker";
/// The uid every Tessera container runs as.
pub const RUN_AS_USER: i64 = 65532;

/// Default image of `engine: vllm` (vLLM's OpenAI server image; the version docs/engines.md names).
pub const DEFAULT_VLLM_IMAGE: &str = "vllm/vllm-openai:v0.32.0";
/// Default image of `engine: sglang`.
pub const DEFAULT_SGLANG_IMAGE: &str = "lmsysorg/sglang:v0.5.23";

/// SGLang's KV-cache transfer backend between the pools of a disaggregated deployment
/// (`--disaggregation-transfer-backend`): Mooncake's transfer engine (RDMA, TCP without it),
/// SGLang's default and the one its published prefill/decode deployments use; its image ships
/// it. A default `engine.args` may override (for example with `nixl`; the last one wins).
pub const SGLANG_TRANSFER_BACKEND: &str = "mooncake";
/// Port of the KV bootstrap server on the leader of each SGLang prefill replica
/// (`--disaggregation-bootstrap-port`, SGLang's default); the router hands it to the decode side.
pub const SGLANG_BOOTSTRAP_PORT: i32 = 8998;
/// vLLM's `--kv-transfer-config` on both pools: the NIXL connector, every instance able to send
/// and receive (the router's requests decide who prefills).
pub const VLLM_KV_TRANSFER_CONFIG: &str = r#"{"kv_connector":"NixlConnector","kv_role":"kv_both"}"#;
/// vLLM's NIXL side-channel (handshake) port, `VLLM_NIXL_SIDE_CHANNEL_PORT`'s default.
pub const VLLM_NIXL_SIDE_CHANNEL_PORT: i32 = 5600;
/// Prometheus port of the prefill/decode router (both routers' default).
pub const ROUTER_METRICS_PORT: i32 = 29000;
/// Router pods of a disaggregated deployment: two, preferably on different nodes, so losing a
/// node or rolling the router leaves one serving (the routers keep no shared state).
pub const ROUTER_REPLICAS: i32 = 2;
/// How long the router waits for the pools to come up before it exits (and is restarted).
pub const ROUTER_STARTUP_TIMEOUT_SECONDS: i32 = 1800;

/// Settings of the object builder that come from the operator, not the ModelDeployment.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// Image used when `spec.worker.image` is unset.
    pub default_worker_image: String,
    /// Image of `engine: vllm` pods without `engine.image` or `worker.image`.
    pub default_vllm_image: String,
    /// Image of `engine: sglang` pods without `engine.image` or `worker.image`.
    pub default_sglang_image: String,
    /// Build one NetworkPolicy per replica (`--worker-network-policies`).
    pub network_policies: Option<NetworkPolicyOptions>,
    /// The operator's key for rank-group secrets (`--group-key-file`): each incarnation of a
    /// Tessera replica gets `TESSERA_GROUP_SECRET` derived from it ([`group_secret`]).
    pub group_key: Option<GroupKey>,
    /// RDMA devices for the pods that move data between nodes (`--rdma-resource`).
    pub rdma: Option<RdmaOptions>,
}

/// The RDMA devices (extended resources of an RDMA device plugin, for example
/// `rdma/rdma_shared_device_a` or `nvidia.com/hostdev`) that every pod moving KV caches or
/// expert tokens between nodes requests: the pods of prefill/decode pools (Mooncake's or NIXL's
/// transfer) and the pods of an expert-parallel group spread over nodes (DeepEP). Those
/// containers also get the `IPC_LOCK` capability, which RDMA memory registration needs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RdmaOptions {
    pub resources: BTreeMap<String, Quantity>,
}

impl RdmaOptions {
    /// Parse `--rdma-resource` values (`NAME=COUNT`, each a qualified extended resource name
    /// and a positive whole count); `None` when there are none. The error names the flag, the
    /// value, the rule and an example.
    pub fn parse(values: &[String]) -> Result<Option<Self>, String> {
        let mut resources = BTreeMap::new();
        for v in values.iter().map(|v| v.trim()).filter(|v| !v.is_empty()) {
            let example = "use for example --rdma-resource rdma/rdma_shared_device_a=1";
            let Some((name, count)) = v.split_once('=') else {
                return Err(format!("--rdma-resource {v:?}: not NAME=COUNT; {example}"));
            };
            let (name, count) = (name.trim(), count.trim());
            let qualified = name.split_once('/').is_some_and(|(domain, n)| {
                !domain.is_empty()
                    && !n.is_empty()
                    && domain != "kubernetes.io"
                    && !domain.ends_with(".kubernetes.io")
                    && domain
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
            });
            if !qualified {
                return Err(format!(
                    "--rdma-resource {v:?}: {name:?} is not an extended resource name (DOMAIN/NAME outside kubernetes.io, as the RDMA device plugin advertises it on nodes); {example}"
                ));
            }
            if !count.parse::<u32>().is_ok_and(|n| n > 0) {
                return Err(format!(
                    "--rdma-resource {v:?}: the count {count:?} must be a whole number of at least 1 (extended resources are not overcommitted); {example}"
                ));
            }
            resources.insert(name.to_owned(), Quantity(count.to_owned()));
        }
        Ok((!resources.is_empty()).then_some(RdmaOptions { resources }))
    }
}

/// A key that does not print itself.
#[derive(Clone, PartialEq, Eq)]
pub struct GroupKey(pub Vec<u8>);

impl std::fmt::Debug for GroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GroupKey({} bytes)", self.0.len())
    }
}

/// The secret the ranks of one incarnation share (lowercase hex HMAC-SHA256 of the
/// deployment's namespace, name, uid and the incarnation id under the operator's key): the
/// same on every pass and every operator replica (deterministic, so a pod created again for
/// the same incarnation matches its peers), different for every incarnation and deployment,
/// and useless for deriving the key or another incarnation's secret.
pub fn group_secret(key: &GroupKey, md: &ModelDeployment, incarnation: &str) -> String {
    use hmac::Mac;
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key.0).expect("HMAC takes any key");
    for part in [
        md.metadata.namespace.as_deref().unwrap_or("default"),
        md.metadata.name.as_deref().unwrap_or_default(),
        md.metadata.uid.as_deref().unwrap_or_default(),
        incarnation,
    ] {
        m.update(part.as_bytes());
        m.update(&[0]);
    }
    m.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl BuildOptions {
    /// The image of an engine's pods when the spec names none.
    pub fn default_image(&self, engine: EngineName) -> &str {
        match engine {
            EngineName::Tessera => &self.default_worker_image,
            EngineName::Vllm => &self.default_vllm_image,
            EngineName::Sglang => &self.default_sglang_image,
        }
    }
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            default_worker_image: concat!("tessera-worker:", env!("CARGO_PKG_VERSION")).into(),
            default_vllm_image: DEFAULT_VLLM_IMAGE.into(),
            default_sglang_image: DEFAULT_SGLANG_IMAGE.into(),
            network_policies: None,
            group_key: None,
            rdma: None,
        }
    }
}

/// Who may reach worker pods besides the members of their own replica group.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NetworkPolicyOptions {
    /// Namespaces (by label) whose pods may call the OpenAI API; empty: only the
    /// ModelDeployment's own namespace.
    pub api_namespace_selector: BTreeMap<String, String>,
    /// Namespace of the Prometheus that scrapes worker `/metrics`.
    pub monitoring_namespace: String,
    /// Labels of the operator's pods (they scrape the replica leaders for the autoscaler).
    pub operator_pod_labels: BTreeMap<String, String>,
}

impl NetworkPolicyOptions {
    /// Parse `--api-namespace-selector` (`k=v,k2=v2`); the error names the bad part.
    pub fn parse_selector(text: &str) -> Result<BTreeMap<String, String>, String> {
        let mut out = BTreeMap::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((k, v)) = part.split_once('=') else {
                return Err(format!(
                    "--api-namespace-selector: {part:?} is not key=value; use for example team=ml,env=prod"
                ));
            };
            out.insert(k.trim().to_owned(), v.trim().to_owned());
        }
        Ok(out)
    }
}

/// A replica to materialise: its placement and its incarnation id.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaToBuild<'a> {
    pub placement: &'a ReplicaPlacement,
    pub incarnation: &'a str,
}

/// The half of a disaggregated deployment a replica serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PoolRole {
    /// Prefills prompts and hands their KV caches over.
    Prefill,
    /// Takes the KV caches over and decodes.
    Decode,
}

impl PoolRole {
    /// `prefill` or `decode`, as in the plan (`placed[].role`) and the `tessera.dev/pool` label.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolRole::Prefill => "prefill",
            PoolRole::Decode => "decode",
        }
    }

    /// The role a plan names (`prefill` or `decode`).
    pub fn parse(role: &str) -> Option<Self> {
        match role {
            "prefill" => Some(PoolRole::Prefill),
            "decode" => Some(PoolRole::Decode),
            _ => None,
        }
    }
}

/// A replica of a disaggregated deployment to materialise: its pool and the replica.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolReplicaToBuild<'a> {
    pub role: PoolRole,
    pub replica: ReplicaToBuild<'a>,
    /// Requests the replica runs at once when its pool was sized for a batch (the decode
    /// pool: the largest batch whose decode step meets the inter-token target and whose KV
    /// cache fits), instead of `serving.maxConcurrency`: the pools' ratio counts on it.
    pub max_concurrency: Option<i32>,
}

/// Everything the controller applies for one ModelDeployment.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Children {
    pub service_account: Option<ServiceAccount>,
    pub services: Vec<Service>,
    pub pods: Vec<Pod>,
    /// The router in front of the pools of a disaggregated deployment.
    pub router: Option<Deployment>,
}

/// Name of the headless rendezvous Service.
pub fn workers_service_name(deployment: &str) -> String {
    format!("{deployment}-workers")
}

/// Name of the Service over the leaders of one pool of a disaggregated deployment.
pub fn pool_service_name(deployment: &str, role: PoolRole) -> String {
    format!("{deployment}-{}", role.as_str())
}

/// Name of the router Deployment of a disaggregated deployment.
pub fn router_name(deployment: &str) -> String {
    format!("{deployment}-router")
}

/// Name of a worker pod (also its hostname).
pub fn pod_name(
    deployment: &str,
    replica: i32,
    incarnation: &str,
    stage: i32,
    part: usize,
) -> String {
    if part == 0 {
        format!("{deployment}-r{replica}-{incarnation}-s{stage}")
    } else {
        format!("{deployment}-r{replica}-{incarnation}-s{stage}p{part}")
    }
}

/// The label selector of a deployment's replica leaders (the scale subresource's selector).
pub fn leader_selector(deployment: &str) -> String {
    format!(
        "{}={deployment},{}={}",
        labels::DEPLOYMENT,
        labels::ROLE,
        labels::ROLE_LEADER
    )
}

/// A short, DNS-safe incarnation id derived from a seed (for example the time and replica).
pub fn incarnation_id(seed: u64) -> String {
    // 5 base-36 characters: 60 million values, plenty to never repeat within one replica.
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (seed >> 29);
    let mut out = String::with_capacity(5);
    for _ in 0..5 {
        out.push(ALPHABET[(x % 36) as usize] as char);
        x /= 36;
    }
    out
}

fn owner_reference(md: &ModelDeployment) -> Option<OwnerReference> {
    md.controller_owner_ref(&())
}

fn common_labels(md: &ModelDeployment) -> BTreeMap<String, String> {
    let name = md.metadata.name.clone().unwrap_or_default();
    BTreeMap::from([
        (labels::NAME.to_owned(), labels::WORKER_NAME.to_owned()),
        (labels::INSTANCE.to_owned(), name.clone()),
        (labels::MANAGED_BY.to_owned(), labels::MANAGER.to_owned()),
        (labels::DEPLOYMENT.to_owned(), name),
    ])
}

fn meta(md: &ModelDeployment, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: md.metadata.namespace.clone(),
        labels: Some(labels),
        owner_references: owner_reference(md).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// Where the weights end up inside the pod, and the volume and mount that put them there.
struct ModelDelivery {
    path: String,
    volume: Option<Volume>,
    mount: Option<VolumeMount>,
    /// What an http(s) URI names: `Some(true)` a model directory (it ends in `/`),
    /// `Some(false)` one file; `None` for a volume model.
    download: Option<bool>,
}

fn model_delivery(md: &ModelDeployment) -> ModelDelivery {
    let uri = md.spec.model.uri.as_str();
    if let Some(rest) = uri.strip_prefix("pvc://") {
        let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
        ModelDelivery {
            path: format!("/models/{path}"),
            volume: Some(Volume {
                name: "model".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.to_owned(),
                    read_only: Some(true),
                }),
                ..Volume::default()
            }),
            mount: Some(VolumeMount {
                name: "model".into(),
                mount_path: "/models".into(),
                read_only: Some(true),
                ..VolumeMount::default()
            }),
            download: None,
        }
    } else if uri.starts_with("http://") || uri.starts_with("https://") {
        let path_part = uri.split(['?', '#']).next().unwrap_or(uri);
        // A directory URI (ending in /) is a Hugging Face model directory, fetched into
        // `/model-cache/model`; a file keeps its own name.
        let directory = path_part.ends_with('/');
        let file = if directory {
            "model"
        } else {
            path_part
                .rsplit('/')
                .next()
                .filter(|f| !f.is_empty())
                .unwrap_or("model")
        };
        let arch = &md.spec.model.architecture;
        // The whole file, plus 10% headroom for a partial download being resumed.
        let bytes = arch.parameters as f64 * arch.bytes_per_parameter * 1.1;
        let gib = (bytes / (1u64 << 30) as f64).ceil().max(1.0) as u64;
        ModelDelivery {
            path: format!("/model-cache/{file}"),
            volume: Some(Volume {
                name: "model".into(),
                empty_dir: Some(EmptyDirVolumeSource {
                    size_limit: Some(Quantity(format!("{gib}Gi"))),
                    ..EmptyDirVolumeSource::default()
                }),
                ..Volume::default()
            }),
            mount: Some(VolumeMount {
                name: "model".into(),
                mount_path: "/model-cache".into(),
                ..VolumeMount::default()
            }),
            download: Some(directory),
        }
    } else {
        ModelDelivery {
            path: uri.strip_prefix("file://").unwrap_or(uri).to_owned(),
            volume: None,
            mount: None,
            download: None,
        }
    }
}

/// A container's security context under the restricted Pod Security Standard (read-only root,
/// no privilege escalation, no capabilities).
fn restricted() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        ..SecurityContext::default()
    }
}

/// A pod's security context under the restricted Pod Security Standard (non-root user and
/// group, the runtime's default seccomp profile), for worker and router pods alike.
fn restricted_pod() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS_USER),
        run_as_group: Some(RUN_AS_USER),
        fs_group: Some(RUN_AS_USER),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..PodSecurityContext::default()
    }
}

/// The init container that downloads an http(s) model into the cache volume before the engine
/// starts (`tessera-worker fetch`: resumable, checked against `model.sha256`; a URI ending in
/// `/` is a Hugging Face model directory). vLLM and SGLang cannot download it themselves; the
/// Tessera engine downloads a single file itself (`serve`) and needs the init container only
/// for a directory. Its image is the Tessera worker's (`image`, the pod's, for the Tessera
/// engine; the operator's default worker image otherwise).
fn fetch_container(
    md: &ModelDeployment,
    model: &ModelDelivery,
    image: &str,
    opts: &BuildOptions,
) -> Option<Container> {
    let uri = &md.spec.model.uri;
    let directory = model.download?;
    let engine = md.spec.engine.name;
    if engine == EngineName::Tessera && !directory {
        return None;
    }
    let mut args = vec![
        "fetch".to_owned(),
        "--uri".to_owned(),
        uri.clone(),
        "--dest".to_owned(),
        model.path.clone(),
    ];
    if let Some(sha) = &md.spec.model.sha256 {
        args.extend(["--sha256".to_owned(), sha.clone()]);
    }
    let q = |v: &str| Quantity(v.to_owned());
    Some(Container {
        name: "fetch-model".into(),
        image: Some(if engine == EngineName::Tessera {
            image.to_owned()
        } else {
            opts.default_worker_image.clone()
        }),
        image_pull_policy: md
            .spec
            .worker
            .image_pull_policy
            .map(|p| p.as_str().to_owned()),
        args: Some(args),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), q("100m")),
                ("memory".to_owned(), q("128Mi")),
            ])),
            limits: Some(BTreeMap::from([("memory".to_owned(), q("512Mi"))])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(restricted()),
        volume_mounts: model.mount.clone().map(|m| vec![m]),
        termination_message_path: Some("/dev/termination-log".into()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    })
}

fn user_volume(v: &WorkerVolume) -> Volume {
    Volume {
        name: v.name.clone(),
        persistent_volume_claim: v.persistent_volume_claim.clone(),
        config_map: v.config_map.clone(),
        secret: v.secret.clone(),
        empty_dir: v.empty_dir.clone(),
        ..Volume::default()
    }
}

fn env_var(name: &str, value: impl ToString) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_string()),
        value_from: None,
    }
}

/// A variable set from a field of the pod (`status.podIP`).
fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: Some("v1".into()),
                field_path: field_path.into(),
            }),
            ..EnvVarSource::default()
        }),
    }
}

fn tcp_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }
}

fn http_probe(path: &str, port: i32, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(port),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

fn quantity_map(
    cpu_memory: Option<&crate::api::CpuMemory>,
    gpus: Option<i32>,
) -> Option<BTreeMap<String, Quantity>> {
    let mut m = BTreeMap::new();
    if let Some(cm) = cpu_memory {
        if let Some(c) = &cm.cpu {
            m.insert("cpu".to_owned(), c.clone());
        }
        if let Some(mem) = &cm.memory {
            m.insert("memory".to_owned(), mem.clone());
        }
    }
    if let Some(g) = gpus {
        m.insert(GPU_RESOURCE.to_owned(), Quantity(g.to_string()));
    }
    (!m.is_empty()).then_some(m)
}

/// What a pod of one replica needs to know to build its engine's command line.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineLaunch<'a> {
    pub engine: EngineName,
    /// Path of the model inside the pod.
    pub model_path: &'a str,
    pub served_name: &'a str,
    pub tensor_parallel: i32,
    pub pipeline_parallel: i32,
    /// Pods of the replica, and this pod's index among them (0: the leader, which serves HTTP).
    pub nodes: usize,
    pub node_rank: usize,
    /// DNS name of the replica leader (rank 0) inside the cluster.
    pub leader_host: &'a str,
    pub port: i32,
    pub max_concurrency: i32,
    pub context_length: i32,
    /// `serving.kvCacheDtype`.
    pub kv_cache_dtype: crate::api::KvCacheDtype,
    /// `engine.args`, appended last.
    pub extra_args: &'a [String],
    /// Expert parallelism over the `tensor_parallel` GPUs of each pipeline stage (`Some(N)`
    /// with N > 1; `status.placements[].expertParallel`).
    pub expert_parallel: Option<i32>,
    /// Attention runs data-parallel over the expert-parallel group
    /// (`status.placements[].dataParallelAttention`).
    pub data_parallel_attention: bool,
    /// Some pipeline stage of the replica spans more than one pod (node): its expert all-to-all
    /// crosses the fabric.
    pub stage_spans_pods: bool,
    /// GPUs of this pod.
    pub local_gpus: i32,
    /// Global rank of this pod's first GPU (the GPUs of the pods before it in the replica).
    pub first_rank: i32,
    /// The pool of a disaggregated deployment this replica serves (`None`: aggregated).
    pub pool: Option<PoolRole>,
}

/// How an engine runs the experts and attention of one replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeLaunch {
    /// No expert parallelism (a dense model, or experts sharded tensor-parallel).
    None,
    /// Expert parallelism over the N GPUs of each stage, attention tensor-parallel over them.
    TensorAttention { ep: i32 },
    /// Expert parallelism over the N GPUs of the stage, attention data-parallel over them.
    DataAttention { ep: i32 },
}

impl EngineLaunch<'_> {
    /// The MoE launch this engine renders for the placement. vLLM runs data-parallel attention
    /// as data-parallel engines that each hold a whole pipeline (`--data-parallel-size` ranks of
    /// `tensor x pipeline` GPUs on one node), so it cannot keep one pipeline stage's
    /// expert-parallel group on that stage's own nodes: with data-parallel attention and more
    /// than one stage, vLLM gets the same groups with tensor-parallel attention instead.
    pub fn moe(&self) -> MoeLaunch {
        match self.expert_parallel.filter(|&n| n > 1) {
            None => MoeLaunch::None,
            Some(ep) if !self.data_parallel_attention => MoeLaunch::TensorAttention { ep },
            Some(ep) if self.engine == EngineName::Vllm && self.pipeline_parallel > 1 => {
                MoeLaunch::TensorAttention { ep }
            }
            Some(ep) => MoeLaunch::DataAttention { ep },
        }
    }
}

/// The container command and arguments of an engine (`None` command: the image's entrypoint,
/// `tessera-worker`). vLLM: `vllm serve MODEL ...` with the multiprocessing multi-node flags
/// when the replica has several pods (`--headless` on all but rank 0); SGLang:
/// `python3 -m sglang.launch_server ...` with `--nnodes`, `--node-rank` and `--dist-init-addr`.
/// Expert parallelism ([`EngineLaunch::moe`]): vLLM adds `--enable-expert-parallel` to that
/// launch with tensor-parallel attention, and with data-parallel attention runs its
/// data-parallel launch (`--tensor-parallel-size 1 --data-parallel-size N`, and over several
/// pods `--data-parallel-size-local`, `--data-parallel-address`, `--data-parallel-rpc-port`,
/// then `--data-parallel-start-rank` and `--headless` on all but the first); SGLang adds
/// `--ep-size N`, `--attn-dp-size N` for data-parallel attention, and
/// `--moe-a2a-backend deepep` when a stage's group spans pods. In a pool of a disaggregated
/// deployment ([`EngineLaunch::pool`]), vLLM adds `--kv-transfer-config` with the NIXL
/// connector ([`VLLM_KV_TRANSFER_CONFIG`]) and SGLang `--disaggregation-mode prefill|decode`,
/// `--disaggregation-transfer-backend` ([`SGLANG_TRANSFER_BACKEND`]) and, on prefill,
/// `--disaggregation-bootstrap-port` ([`SGLANG_BOOTSTRAP_PORT`]). The operator-owned flags are
/// the ones `api::rules` refuses in `engine.args` (`--moe-a2a-backend` and
/// `--disaggregation-transfer-backend` are defaults the user may override: the last occurrence
/// wins).
pub fn engine_command(l: &EngineLaunch<'_>) -> (Option<Vec<String>>, Vec<String>) {
    let s = |x: &str| x.to_owned();
    let moe = l.moe();
    let (command, mut args) = match l.engine {
        EngineName::Tessera => return (None, vec![s("serve")]),
        EngineName::Vllm => {
            // Data-parallel attention: N single-GPU engines, the experts spread over all of them.
            let (tp, dp) = match moe {
                MoeLaunch::DataAttention { ep } => (1, Some(ep)),
                _ => (l.tensor_parallel, None),
            };
            // `--max-num-seqs` bounds each data-parallel engine; maxConcurrency is the replica's.
            let max_seqs = match dp {
                Some(n) => (l.max_concurrency.max(1) as u32).div_ceil(n.max(1) as u32) as i32,
                None => l.max_concurrency,
            };
            let mut a = vec![
                s("serve"),
                s(l.model_path),
                s("--served-model-name"),
                s(l.served_name),
                s("--tensor-parallel-size"),
                tp.to_string(),
                s("--pipeline-parallel-size"),
                l.pipeline_parallel.to_string(),
            ];
            if let Some(n) = dp {
                a.extend([s("--data-parallel-size"), n.to_string()]);
            }
            if moe != MoeLaunch::None {
                a.push(s("--enable-expert-parallel"));
            }
            a.extend([
                s("--host"),
                s("0.0.0.0"),
                s("--port"),
                l.port.to_string(),
                s("--max-num-seqs"),
                max_seqs.to_string(),
                s("--max-model-len"),
                l.context_length.to_string(),
            ]);
            if l.kv_cache_dtype == crate::api::KvCacheDtype::Fp8 {
                a.extend([s("--kv-cache-dtype"), s("fp8")]);
            }
            if l.nodes > 1 && dp.is_some() {
                // The first pod runs the API server and the engines' coordinator; the others
                // run their engines headless and reach it at the leader's address.
                a.extend([
                    s("--data-parallel-size-local"),
                    l.local_gpus.to_string(),
                    s("--data-parallel-address"),
                    s(l.leader_host),
                    s("--data-parallel-rpc-port"),
                    RENDEZVOUS_PORT.to_string(),
                ]);
                if l.node_rank > 0 {
                    a.extend([
                        s("--data-parallel-start-rank"),
                        l.first_rank.to_string(),
                        s("--headless"),
                    ]);
                }
            } else if l.nodes > 1 {
                a.extend([
                    s("--distributed-executor-backend"),
                    s("mp"),
                    s("--nnodes"),
                    l.nodes.to_string(),
                    s("--node-rank"),
                    l.node_rank.to_string(),
                    s("--master-addr"),
                    s(l.leader_host),
                    s("--master-port"),
                    RENDEZVOUS_PORT.to_string(),
                ]);
                if l.node_rank > 0 {
                    a.push(s("--headless"));
                }
            }
            if l.pool.is_some() {
                a.extend([s("--kv-transfer-config"), s(VLLM_KV_TRANSFER_CONFIG)]);
            }
            (vec![s("vllm")], a)
        }
        EngineName::Sglang => {
            let mut a = vec![
                s("--model-path"),
                s(l.model_path),
                s("--served-model-name"),
                s(l.served_name),
                s("--tp-size"),
                l.tensor_parallel.to_string(),
                s("--pp-size"),
                l.pipeline_parallel.to_string(),
            ];
            match moe {
                MoeLaunch::None => {}
                MoeLaunch::TensorAttention { ep } => a.extend([s("--ep-size"), ep.to_string()]),
                MoeLaunch::DataAttention { ep } => a.extend([
                    s("--ep-size"),
                    ep.to_string(),
                    s("--attn-dp-size"),
                    ep.to_string(),
                ]),
            }
            if moe != MoeLaunch::None && l.stage_spans_pods {
                // DeepEP: the dispatch and combine over RDMA that the plan's all-to-all assumes.
                a.extend([s("--moe-a2a-backend"), s("deepep")]);
            }
            a.extend([
                s("--host"),
                s("0.0.0.0"),
                s("--port"),
                l.port.to_string(),
                s("--enable-metrics"),
                s("--max-running-requests"),
                l.max_concurrency.to_string(),
                s("--context-length"),
                l.context_length.to_string(),
            ]);
            if l.kv_cache_dtype == crate::api::KvCacheDtype::Fp8 {
                a.extend([s("--kv-cache-dtype"), s("fp8_e4m3")]);
            }
            if l.nodes > 1 {
                a.extend([
                    s("--nnodes"),
                    l.nodes.to_string(),
                    s("--node-rank"),
                    l.node_rank.to_string(),
                    s("--dist-init-addr"),
                    format!("{}:{RENDEZVOUS_PORT}", l.leader_host),
                ]);
            }
            if let Some(role) = l.pool {
                a.extend([
                    s("--disaggregation-mode"),
                    s(role.as_str()),
                    s("--disaggregation-transfer-backend"),
                    s(SGLANG_TRANSFER_BACKEND),
                ]);
                if role == PoolRole::Prefill {
                    a.extend([
                        s("--disaggregation-bootstrap-port"),
                        SGLANG_BOOTSTRAP_PORT.to_string(),
                    ]);
                }
            }
            (vec![s("python3"), s("-m"), s("sglang.launch_server")], a)
        }
    };
    args.extend(l.extra_args.iter().cloned());
    (Some(command), args)
}

/// Probes of a pod: (readiness, liveness, startup). Tessera: `/readyz` (group-wide) on the
/// leader, `/healthz` everywhere. vLLM: `/health` on the leader (503 once the engine is dead,
/// which fails liveness); headless ranks serve no HTTP and have no probes (a rank that dies
/// ends its pod, and the controller recreates the group). The same holds for vLLM's
/// data-parallel launch (expert parallelism with data-parallel attention): the first pod runs
/// the API server for every engine, the others are headless. SGLang: `/health` on every rank
/// (ranks above 0 answer a stand-in health server), with or without expert parallelism.
fn engine_probes(
    engine: EngineName,
    leader: bool,
    port: i32,
) -> (Option<Probe>, Option<Probe>, Option<Probe>) {
    // Loading a large model takes minutes; liveness starts after the startup probe passes.
    let startup = |path: &str| Some(http_probe(path, port, 10, 180));
    match (engine, leader) {
        (EngineName::Tessera, _) => (
            Some(http_probe(
                if leader { "/readyz" } else { "/healthz" },
                port,
                5,
                1,
            )),
            Some(http_probe("/healthz", port, 10, 3)),
            startup("/healthz"),
        ),
        (EngineName::Vllm, false) => (None, None, None),
        (EngineName::Vllm | EngineName::Sglang, _) => (
            Some(http_probe("/health", port, 5, 1)),
            Some(http_probe("/health", port, 10, 3)),
            startup("/health"),
        ),
    }
}

/// Environment every vLLM or SGLang pod gets: its own IP for vLLM's workers, and writable
/// cache directories under the `tmp` volume (the root filesystem is read-only).
fn engine_env(engine: EngineName) -> Vec<EnvVar> {
    if engine == EngineName::Tessera {
        return Vec::new();
    }
    let mut env = vec![
        env_var("HOME", "/tmp"),
        env_var("XDG_CACHE_HOME", "/tmp/.cache"),
        env_var("HF_HOME", "/tmp/.cache/huggingface"),
        env_var("HF_HUB_OFFLINE", "1"),
        env_var("TRITON_CACHE_DIR", "/tmp/.cache/triton"),
    ];
    if engine == EngineName::Vllm {
        env.push(field_env("VLLM_HOST_IP", "status.podIP"));
        env.push(env_var("VLLM_CACHE_ROOT", "/tmp/.cache/vllm"));
    }
    env
}

/// The worker pods of one replica (one per stage, or per stage part).
pub fn replica_pods(md: &ModelDeployment, r: &ReplicaToBuild<'_>, opts: &BuildOptions) -> Vec<Pod> {
    pool_replica_pods(md, r, opts, None, None)
}

/// The worker pods of one replica, of a pool of a disaggregated deployment when `pool` is set:
/// labelled `tessera.dev/pool`, with the role's engine flags ([`engine_command`]), vLLM's NIXL
/// side-channel address (`VLLM_NIXL_SIDE_CHANNEL_HOST`, the pod IP) and the ports the pools
/// reach each other on.
pub fn pool_replica_pods(
    md: &ModelDeployment,
    r: &ReplicaToBuild<'_>,
    opts: &BuildOptions,
    pool: Option<PoolRole>,
    max_concurrency: Option<i32>,
) -> Vec<Pod> {
    let name = md.metadata.name.clone().unwrap_or_default();
    let namespace = md
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let spec = &md.spec;
    let p = r.placement;
    let tp = p.tensor_parallel;
    let workers_svc = workers_service_name(&name);
    let leader_host = pod_name(&name, p.replica, r.incarnation, 0, 0);
    let leader_address = format!("{leader_host}.{workers_svc}.{namespace}.svc:{RENDEZVOUS_PORT}");
    let model = model_delivery(md);
    let context_length = spec
        .serving
        .context_length
        .unwrap_or(spec.model.architecture.context_length);
    let served_name = spec
        .model
        .served_name
        .clone()
        .unwrap_or_else(|| name.clone());
    let engine = spec.engine.name;
    let image = spec
        .engine
        .image
        .clone()
        .or_else(|| spec.worker.image.clone())
        .unwrap_or_else(|| opts.default_image(engine).to_owned());
    let leader_dns = format!("{leader_host}.{workers_svc}.{namespace}.svc");
    let resources = spec.worker.resources.clone().unwrap_or_default();
    let max_concurrency = max_concurrency.map_or(spec.serving.max_concurrency, |m| m.max(1));

    // A stage placed over several pods (an expert-parallel group with data-parallel attention
    // over whole nodes) has several entries with its stage number.
    let stage_spans_pods = p
        .stages
        .iter()
        .any(|s| p.stages.iter().filter(|o| o.stage == s.stage).count() > 1);

    let mut pods = Vec::new();
    // Parts of a stage (several entries with the same stage number) are numbered in order.
    let mut part_of_stage: BTreeMap<i32, usize> = BTreeMap::new();
    let mut offset_in_stage: BTreeMap<i32, i32> = BTreeMap::new();
    for stage in &p.stages {
        let part = *part_of_stage
            .entry(stage.stage)
            .and_modify(|n| *n += 1)
            .or_insert(0);
        let in_stage = offset_in_stage.entry(stage.stage).or_insert(0);
        let rank_offset = stage.stage * tp + *in_stage;
        *in_stage += stage.gpus;
        let leader = stage.stage == 0 && part == 0;
        let pod_name = pod_name(&name, p.replica, r.incarnation, stage.stage, part);

        let mut pod_labels = common_labels(md);
        pod_labels.extend(spec.worker.labels.clone());
        pod_labels.insert(labels::REPLICA.into(), p.replica.to_string());
        pod_labels.insert(labels::STAGE.into(), stage.stage.to_string());
        pod_labels.insert(
            labels::ROLE.into(),
            if leader {
                labels::ROLE_LEADER
            } else {
                labels::ROLE_WORKER
            }
            .into(),
        );
        pod_labels.insert(labels::INCARNATION.into(), r.incarnation.to_owned());
        if let Some(role) = pool {
            pod_labels.insert(labels::POOL.into(), role.as_str().into());
        }

        let mut env = vec![
            env_var(env::DEPLOYMENT, &name),
            env_var(env::NAMESPACE, &namespace),
            env_var(env::REPLICA, p.replica),
            env_var(env::INCARNATION, r.incarnation),
            env_var(env::STAGE, stage.stage),
            env_var(env::TP, tp),
            env_var(env::PP, p.pipeline_parallel),
            env_var(env::WORLD_SIZE, tp * p.pipeline_parallel),
            env_var(env::RANK_OFFSET, rank_offset),
            env_var(env::LOCAL_RANKS, stage.gpus),
            env_var(env::LEADER_ADDRESS, &leader_address),
            env_var(env::RENDEZVOUS_PORT, RENDEZVOUS_PORT),
            env_var(env::PORT, spec.serving.port),
            env_var(env::MODEL_URI, &spec.model.uri),
            env_var(env::MODEL_PATH, &model.path),
            env_var(env::SERVED_MODEL_NAME, &served_name),
            env_var(env::MAX_CONCURRENCY, max_concurrency),
            env_var(env::CONTEXT_LENGTH, context_length),
        ];
        if let Some(sha) = &spec.model.sha256 {
            env.push(env_var(env::MODEL_SHA256, sha));
        }
        if let (Some(key), EngineName::Tessera) = (&opts.group_key, engine) {
            env.push(env_var(
                env::GROUP_SECRET,
                group_secret(key, md, r.incarnation),
            ));
        }
        env.extend(engine_env(engine));
        if pool.is_some() && engine == EngineName::Vllm {
            // The NIXL handshake address the prefill side hands to the decode side.
            env.push(field_env("VLLM_NIXL_SIDE_CHANNEL_HOST", "status.podIP"));
        }
        env.extend(spec.worker.env.iter().cloned());
        env.extend(spec.engine.env.iter().cloned());
        let (command, args) = engine_command(&EngineLaunch {
            engine,
            model_path: &model.path,
            served_name: &served_name,
            tensor_parallel: tp,
            pipeline_parallel: p.pipeline_parallel,
            nodes: p.stages.len(),
            node_rank: pods.len(),
            leader_host: &leader_dns,
            port: spec.serving.port,
            max_concurrency,
            context_length,
            kv_cache_dtype: spec.serving.kv_cache_dtype,
            extra_args: &spec.engine.args,
            expert_parallel: p.expert_parallel,
            data_parallel_attention: p.data_parallel_attention,
            stage_spans_pods,
            local_gpus: stage.gpus,
            first_rank: rank_offset,
            pool,
        });
        let (readiness, liveness, startup) = engine_probes(engine, leader, spec.serving.port);

        let mut volumes = vec![
            Volume {
                name: "dshm".into(),
                empty_dir: Some(EmptyDirVolumeSource {
                    medium: Some("Memory".into()),
                    size_limit: Some(Quantity("16Gi".into())),
                }),
                ..Volume::default()
            },
            Volume {
                name: "tmp".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            },
        ];
        let mut mounts = vec![
            VolumeMount {
                name: "dshm".into(),
                mount_path: "/dev/shm".into(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "tmp".into(),
                mount_path: "/tmp".into(),
                ..VolumeMount::default()
            },
        ];
        volumes.extend(model.volume.clone());
        mounts.extend(model.mount.clone());
        volumes.extend(spec.worker.volumes.iter().map(user_volume));
        mounts.extend(spec.worker.volume_mounts.iter().cloned());

        let mut ports = vec![
            tcp_port("http", spec.serving.port),
            tcp_port("rendezvous", RENDEZVOUS_PORT),
        ];
        match (pool, engine) {
            (Some(PoolRole::Prefill), EngineName::Sglang) if leader => {
                ports.push(tcp_port("bootstrap", SGLANG_BOOTSTRAP_PORT));
            }
            (Some(_), EngineName::Vllm) => {
                ports.push(tcp_port("nixl", VLLM_NIXL_SIDE_CHANNEL_PORT));
            }
            _ => {}
        }
        let mut limits = quantity_map(resources.limits.as_ref(), Some(stage.gpus));
        let mut security = restricted();
        // Pods that move KV caches (pools) or expert tokens (an expert-parallel group over
        // nodes) between nodes get the RDMA devices, and IPC_LOCK to register memory with them.
        if let Some(rdma) = &opts.rdma
            && (pool.is_some() || (stage_spans_pods && p.expert_parallel.unwrap_or(1) > 1))
        {
            limits
                .get_or_insert_with(BTreeMap::new)
                .extend(rdma.resources.clone());
            if let Some(caps) = security.capabilities.as_mut() {
                caps.add = Some(vec!["IPC_LOCK".into()]);
            }
        }
        let container = Container {
            name: "worker".into(),
            image: Some(image.clone()),
            image_pull_policy: spec.worker.image_pull_policy.map(|p| p.as_str().to_owned()),
            command,
            args: Some(args),
            env: Some(env),
            ports: Some(ports),
            resources: Some(ResourceRequirements {
                requests: quantity_map(resources.requests.as_ref(), None),
                limits,
                ..ResourceRequirements::default()
            }),
            // Readiness is group-wide on the leader (see `engine_probes`).
            readiness_probe: readiness,
            liveness_probe: liveness,
            startup_probe: startup,
            security_context: Some(security),
            volume_mounts: Some(mounts),
            // The worker writes why it exited here; the controller shows it in status.
            termination_message_path: Some("/dev/termination-log".into()),
            termination_message_policy: Some("FallbackToLogsOnError".into()),
            ..Container::default()
        };

        let annotations =
            (!spec.worker.annotations.is_empty()).then(|| spec.worker.annotations.clone());
        let pod = Pod {
            metadata: ObjectMeta {
                annotations,
                ..meta(md, pod_name.clone(), pod_labels)
            },
            spec: Some(PodSpec {
                hostname: Some(pod_name),
                subdomain: Some(workers_svc.clone()),
                service_account_name: Some(WORKER_SERVICE_ACCOUNT.into()),
                automount_service_account_token: Some(false),
                // A member that exits is not restarted in place: the controller recreates the
                // whole replica (a tensor-parallel group cannot survive a lost rank).
                restart_policy: Some(
                    if spec.failure_policy.recreate_group {
                        "Never"
                    } else {
                        "Always"
                    }
                    .into(),
                ),
                termination_grace_period_seconds: Some(60),
                priority_class_name: spec.worker.priority_class_name.clone(),
                image_pull_secrets: (!spec.worker.image_pull_secrets.is_empty())
                    .then(|| spec.worker.image_pull_secrets.clone()),
                tolerations: (!spec.placement.tolerations.is_empty())
                    .then(|| spec.placement.tolerations.clone()),
                affinity: Some(pinned_to(stage.node.clone())),
                security_context: Some(restricted_pod()),
                init_containers: fetch_container(md, &model, &image, opts).map(|c| vec![c]),
                containers: vec![container],
                volumes: Some(volumes),
                ..PodSpec::default()
            }),
            status: None,
        };
        pods.push(pod);
    }
    pods
}

/// The Services: headless rendezvous and the traffic Service over ready leaders.
pub fn services(md: &ModelDeployment) -> Vec<Service> {
    let name = md.metadata.name.clone().unwrap_or_default();
    let port = md.spec.serving.port;
    let selector_all = BTreeMap::from([(labels::DEPLOYMENT.to_owned(), name.clone())]);
    let mut selector_leaders = selector_all.clone();
    selector_leaders.insert(labels::ROLE.into(), labels::ROLE_LEADER.into());
    let service_port = |pname: &str, p: i32| ServicePort {
        name: Some(pname.into()),
        port: p,
        target_port: Some(IntOrString::Int(p)),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    };
    vec![
        Service {
            metadata: meta(md, workers_service_name(&name), common_labels(md)),
            spec: Some(ServiceSpec {
                cluster_ip: Some("None".into()),
                // Ranks must find each other before any of them is ready.
                publish_not_ready_addresses: Some(true),
                selector: Some(selector_all),
                ports: Some(vec![service_port("rendezvous", RENDEZVOUS_PORT)]),
                ..ServiceSpec::default()
            }),
            status: None,
        },
        Service {
            metadata: meta(md, name.clone(), common_labels(md)),
            spec: Some(ServiceSpec {
                selector: Some(selector_leaders),
                ports: Some(vec![service_port("http", port)]),
                ..ServiceSpec::default()
            }),
            status: None,
        },
    ]
}

/// Name of the NetworkPolicy of one replica group.
pub fn network_policy_name(deployment: &str, replica: i32) -> String {
    format!("{deployment}-r{replica}")
}

/// The NetworkPolicy of one replica group: its pods accept any port (collectives, rendezvous,
/// pipeline stage links) only from members of the same group, and the HTTP port from the API
/// namespaces, the monitoring namespace and the operator (autoscaler scrapes). A replica of a
/// prefill/decode pool (`role`) also accepts any port from the deployment's other pool
/// replicas (KV-cache transfer) and its router. Egress is not restricted.
pub fn replica_network_policy(
    md: &ModelDeployment,
    replica: i32,
    role: Option<PoolRole>,
    opts: &NetworkPolicyOptions,
) -> NetworkPolicy {
    let name = md.metadata.name.clone().unwrap_or_default();
    let group = BTreeMap::from([
        (labels::DEPLOYMENT.to_owned(), name.clone()),
        (labels::REPLICA.to_owned(), replica.to_string()),
    ]);
    let selector = |m: &BTreeMap<String, String>| LabelSelector {
        match_labels: Some(m.clone()),
        ..LabelSelector::default()
    };
    let http = NetworkPolicyPort {
        port: Some(IntOrString::Int(md.spec.serving.port)),
        protocol: Some("TCP".into()),
        ..NetworkPolicyPort::default()
    };
    let api_peer = if opts.api_namespace_selector.is_empty() {
        // Any pod of the ModelDeployment's own namespace.
        NetworkPolicyPeer {
            pod_selector: Some(LabelSelector::default()),
            ..NetworkPolicyPeer::default()
        }
    } else {
        NetworkPolicyPeer {
            namespace_selector: Some(selector(&opts.api_namespace_selector)),
            ..NetworkPolicyPeer::default()
        }
    };
    let monitoring = NetworkPolicyPeer {
        namespace_selector: Some(selector(&BTreeMap::from([(
            "kubernetes.io/metadata.name".to_owned(),
            opts.monitoring_namespace.clone(),
        )]))),
        ..NetworkPolicyPeer::default()
    };
    let mut http_from = vec![api_peer, monitoring];
    if !opts.operator_pod_labels.is_empty() {
        http_from.push(NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector::default()),
            pod_selector: Some(selector(&opts.operator_pod_labels)),
            ..NetworkPolicyPeer::default()
        });
    }
    let mut meta_labels = common_labels(md);
    meta_labels.insert(labels::REPLICA.into(), replica.to_string());
    NetworkPolicy {
        metadata: meta(md, network_policy_name(&name, replica), meta_labels),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(selector(&group)),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(
                vec![
                    NetworkPolicyIngressRule {
                        from: Some(vec![NetworkPolicyPeer {
                            pod_selector: Some(selector(&group)),
                            ..NetworkPolicyPeer::default()
                        }]),
                        ports: None,
                    },
                    NetworkPolicyIngressRule {
                        from: Some(http_from),
                        ports: Some(vec![http]),
                    },
                ]
                .into_iter()
                .chain(role.map(|_| {
                    // A pool replica: the other pool's replicas move KV caches to and from it on
                    // ports the engine picks (SGLang's bootstrap server and Mooncake, vLLM's
                    // NIXL), and the router sends it requests.
                    NetworkPolicyIngressRule {
                        from: Some(vec![
                            NetworkPolicyPeer {
                                pod_selector: Some(LabelSelector {
                                    match_labels: Some(BTreeMap::from([(
                                        labels::DEPLOYMENT.to_owned(),
                                        name.clone(),
                                    )])),
                                    match_expressions: Some(vec![LabelSelectorRequirement {
                                        key: labels::POOL.to_owned(),
                                        operator: "Exists".into(),
                                        values: None,
                                    }]),
                                }),
                                ..NetworkPolicyPeer::default()
                            },
                            NetworkPolicyPeer {
                                pod_selector: Some(selector(&BTreeMap::from([(
                                    labels::ROUTER.to_owned(),
                                    name.clone(),
                                )]))),
                                ..NetworkPolicyPeer::default()
                            },
                        ]),
                        ports: None,
                    }
                }))
                .collect(),
            ),
            egress: None,
        }),
    }
}

/// Annotation with a hash of a policy's spec: a policy whose hash matches is not applied again.
pub const POLICY_HASH: &str = "tessera.dev/policy-hash";

/// FNV-1a: a stable hash of what objects are built from (not std's hasher, whose output may
/// change between Rust releases and would roll every replica after an operator upgrade).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A short stable hash (10 hex digits) of some bytes, for hash annotations.
pub fn short_hash(bytes: &[u8]) -> String {
    format!("{:010x}", fnv1a(bytes) & 0xff_ffff_ffff)
}

/// Server-side apply only what changed: stamp `desired` with the hash of `spec` under the
/// annotation `key` and say whether it must be applied (the `current` object carries another
/// hash, or none, or does not exist).
pub fn stamp_if_changed<S: serde::Serialize>(
    spec: &S,
    desired: &mut ObjectMeta,
    current: Option<&ObjectMeta>,
    key: &str,
) -> bool {
    let h = short_hash(serde_json::to_string(spec).unwrap_or_default().as_bytes());
    let same = current
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(key))
        == Some(&h);
    if !same {
        desired
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(key.into(), h);
    }
    !same
}

/// What to write so that the observed NetworkPolicies of a deployment become `desired`:
/// (policies to apply, with their hash annotation; names to delete).
pub fn network_policy_changes(
    desired: &[NetworkPolicy],
    observed: &[NetworkPolicy],
) -> (Vec<NetworkPolicy>, Vec<String>) {
    let mut apply = Vec::new();
    for d in desired {
        let current = observed.iter().find(|o| o.metadata.name == d.metadata.name);
        let mut p = d.clone();
        if stamp_if_changed(
            &d.spec,
            &mut p.metadata,
            current.map(|o| &o.metadata),
            POLICY_HASH,
        ) {
            apply.push(p);
        }
    }
    let delete = observed
        .iter()
        .filter_map(|o| o.metadata.name.clone())
        .filter(|n| !desired.iter().any(|d| d.metadata.name.as_ref() == Some(n)))
        .collect();
    (apply, delete)
}

/// The worker ServiceAccount of the namespace (no API token is mounted into workers).
pub fn worker_service_account(md: &ModelDeployment) -> ServiceAccount {
    ServiceAccount {
        metadata: ObjectMeta {
            name: Some(WORKER_SERVICE_ACCOUNT.into()),
            namespace: md.metadata.namespace.clone(),
            labels: Some(BTreeMap::from([(
                labels::MANAGED_BY.to_owned(),
                labels::MANAGER.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

/// Required node affinity to exactly `node`, by the Node's name, not the
/// `kubernetes.io/hostname` label, which need not equal it (cloud providers set it otherwise).
/// `controller::reconcile::pinned_node` reads it back.
pub fn pinned_to(node: String) -> Affinity {
    Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_fields: Some(vec![NodeSelectorRequirement {
                        key: "metadata.name".into(),
                        operator: "In".into(),
                        values: Some(vec![node]),
                    }]),
                    ..NodeSelectorTerm::default()
                }],
            }),
            ..NodeAffinity::default()
        }),
        ..Affinity::default()
    }
}

/// The deployment's PodDisruptionBudget: at most one of its worker pods may be evicted at a
/// time. A member's eviction takes its whole replica down (the group is recreated), which
/// leaves that replica's other pods unready and so uses up the budget until the replica is back:
/// drains and cluster scale-downs take one replica at a time, never two. Crash-looping pods do
/// not block a drain (`unhealthyPodEvictionPolicy: AlwaysAllow`).
pub fn disruption_budget(md: &ModelDeployment) -> PodDisruptionBudget {
    let name = md.metadata.name.clone().unwrap_or_default();
    PodDisruptionBudget {
        metadata: meta(md, format!("{name}-workers"), common_labels(md)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([
                    (labels::DEPLOYMENT.to_owned(), name),
                    (labels::MANAGED_BY.to_owned(), labels::MANAGER.to_owned()),
                ])),
                ..LabelSelector::default()
            }),
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}

/// Every child object for these replicas.
pub fn desired_children(
    md: &ModelDeployment,
    replicas: &[ReplicaToBuild<'_>],
    opts: &BuildOptions,
) -> Children {
    Children {
        service_account: Some(worker_service_account(md)),
        services: services(md),
        pods: replicas
            .iter()
            .flat_map(|r| replica_pods(md, r, opts))
            .collect(),
        router: None,
    }
}

/// Every child object of a disaggregated deployment (`serving.disaggregation`, the planner
/// chose pools): the worker pods of both pools ([`pool_replica_pods`]), the Services
/// ([`disaggregated_services`]) and the router in front ([`router_deployment`]). Without a
/// router (the engine cannot be rendered disaggregated, a pool has no replica yet, the router
/// has no image) the second value names the problem and the fix.
pub fn disaggregated_children(
    md: &ModelDeployment,
    replicas: &[PoolReplicaToBuild<'_>],
    opts: &BuildOptions,
) -> (Children, Option<String>) {
    let router = router_deployment(md, replicas, opts);
    let children = Children {
        service_account: Some(worker_service_account(md)),
        services: disaggregated_services(md),
        pods: replicas
            .iter()
            .flat_map(|r| pool_replica_pods(md, &r.replica, opts, Some(r.role), r.max_concurrency))
            .collect(),
        router: router.as_ref().ok().cloned(),
    };
    (children, router.err())
}

/// The URL the router reaches a replica's leader at: its DNS name in the headless workers
/// Service (stable for the incarnation) and the serving port. Each replica is addressed on its
/// own: SGLang's decode side fetches the KV cache from the bootstrap server of the very prefill
/// replica that took the request, which a Service over the pool would not guarantee.
pub fn leader_url(md: &ModelDeployment, r: &ReplicaToBuild<'_>) -> String {
    let name = md.metadata.name.clone().unwrap_or_default();
    let namespace = md.metadata.namespace.as_deref().unwrap_or("default");
    format!(
        "http://{}.{}.{namespace}.svc:{}",
        pod_name(&name, r.placement.replica, r.incarnation, 0, 0),
        workers_service_name(&name),
        md.spec.serving.port
    )
}

/// The router's command and arguments, listening on `port`, in front of these prefill and
/// decode leaders. SGLang: `python3 -m sglang_router.launch_router --pd-disaggregation` (the
/// sglang-router package, in SGLang's image) with each prefill's bootstrap port. vLLM:
/// `vllm-router --vllm-pd-disaggregation --kv-connector nixl` (the vllm-router package, the
/// vLLM project's router): it prefills on one replica and hands the returned
/// `kv_transfer_params` to a decode replica. The Tessera engine has no router here.
pub fn router_command(
    engine: EngineName,
    prefill: &[String],
    decode: &[String],
    port: i32,
) -> Result<(Vec<String>, Vec<String>), String> {
    let s = |x: &str| x.to_owned();
    let (command, mut args) = match engine {
        EngineName::Tessera => return Err(TESSERA_POOLS_NOT_RENDERED.into()),
        EngineName::Sglang => (
            vec![s("python3"), s("-m"), s("sglang_router.launch_router")],
            vec![s("--pd-disaggregation")],
        ),
        EngineName::Vllm => (
            vec![s("vllm-router")],
            vec![
                s("--vllm-pd-disaggregation"),
                s("--kv-connector"),
                s("nixl"),
            ],
        ),
    };
    for url in prefill {
        args.extend([s("--prefill"), url.clone()]);
        if engine == EngineName::Sglang {
            args.push(SGLANG_BOOTSTRAP_PORT.to_string());
        }
    }
    for url in decode {
        args.extend([s("--decode"), url.clone()]);
    }
    args.extend([
        s("--host"),
        s("0.0.0.0"),
        s("--port"),
        port.to_string(),
        s("--prometheus-host"),
        s("0.0.0.0"),
        s("--prometheus-port"),
        ROUTER_METRICS_PORT.to_string(),
        s("--worker-startup-timeout-secs"),
        ROUTER_STARTUP_TIMEOUT_SECONDS.to_string(),
    ]);
    Ok((command, args))
}

/// Why the Tessera engine's pools are not rendered.
pub const TESSERA_POOLS_NOT_RENDERED: &str = "the tessera engine's prefill/decode pools are not rendered yet (its prefill/decode serving runs on one machine as `tessera-worker local --prefill/--decode`); use engine vllm or sglang for disaggregated pools, or serving.disaggregation Off";

/// The labels of a deployment's router pods (no `tessera.dev/deployment`: the worker
/// selectors, the disruption budget and the controller's pod accounting do not see them).
pub fn router_labels(md: &ModelDeployment) -> BTreeMap<String, String> {
    let name = md.metadata.name.clone().unwrap_or_default();
    BTreeMap::from([
        (labels::NAME.to_owned(), labels::ROUTER_NAME.to_owned()),
        (labels::INSTANCE.to_owned(), name.clone()),
        (labels::MANAGED_BY.to_owned(), labels::MANAGER.to_owned()),
        (labels::ROUTER.to_owned(), name),
    ])
}

/// The router's image: `engine.routerImage`; for SGLang, else the engine's image (SGLang's
/// image ships sglang-router). vLLM's image has no router: it must be set.
fn router_image(md: &ModelDeployment, opts: &BuildOptions) -> Result<String, String> {
    let spec = &md.spec;
    if let Some(image) = &spec.engine.router_image {
        return Ok(image.clone());
    }
    match spec.engine.name {
        EngineName::Sglang => Ok(spec
            .engine
            .image
            .clone()
            .or_else(|| spec.worker.image.clone())
            .unwrap_or_else(|| opts.default_sglang_image.clone())),
        EngineName::Vllm => Err("engine.routerImage is unset: vLLM's image has no prefill/decode router; set it to an image with the vllm-router package (for example python:3.12-slim with `pip install vllm-router==0.1.17`)".into()),
        EngineName::Tessera => Err(TESSERA_POOLS_NOT_RENDERED.into()),
    }
}

/// Whether this deployment's pools can be rendered: an engine with disaggregated serving here
/// (vLLM or SGLang) and a router image. The error says what is missing and the fix.
pub fn pools_renderable(md: &ModelDeployment, opts: &BuildOptions) -> Result<(), String> {
    router_image(md, opts).map(|_| ())
}

/// The router in front of the pools: [`ROUTER_REPLICAS`] pods (a Deployment, restarted and
/// rolled by Kubernetes, spread over nodes where it can) running [`router_command`] over every
/// replica's leader ([`leader_url`], replicas in order), serving the deployment's port, ready
/// once the router has healthy workers (`/readiness`). It runs under the restricted Pod
/// Security Standard like the workers, and may run on any node (it needs no GPU).
pub fn router_deployment(
    md: &ModelDeployment,
    replicas: &[PoolReplicaToBuild<'_>],
    opts: &BuildOptions,
) -> Result<Deployment, String> {
    let spec = &md.spec;
    let name = md.metadata.name.clone().unwrap_or_default();
    let image = router_image(md, opts)?;
    let urls = |role: PoolRole| {
        let mut of_role: Vec<&PoolReplicaToBuild<'_>> =
            replicas.iter().filter(|r| r.role == role).collect();
        of_role.sort_by_key(|r| r.replica.placement.replica);
        of_role
            .iter()
            .map(|r| leader_url(md, &r.replica))
            .collect::<Vec<_>>()
    };
    let (prefill, decode) = (urls(PoolRole::Prefill), urls(PoolRole::Decode));
    for (role, urls) in [(PoolRole::Prefill, &prefill), (PoolRole::Decode, &decode)] {
        if urls.is_empty() {
            return Err(format!(
                "the {} pool has no placed replica: the router needs both pools",
                role.as_str()
            ));
        }
    }
    let port = spec.serving.port;
    let (command, args) = router_command(spec.engine.name, &prefill, &decode, port)?;
    let q = |v: &str| Quantity(v.to_owned());
    let container = Container {
        name: "router".into(),
        image: Some(image),
        image_pull_policy: spec.worker.image_pull_policy.map(|p| p.as_str().to_owned()),
        command: Some(command),
        args: Some(args),
        env: Some(vec![env_var("HOME", "/tmp")]),
        ports: Some(vec![
            tcp_port("http", port),
            tcp_port("metrics", ROUTER_METRICS_PORT),
        ]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), q("1")),
                ("memory".to_owned(), q("1Gi")),
            ])),
            limits: Some(BTreeMap::from([("memory".to_owned(), q("4Gi"))])),
            ..ResourceRequirements::default()
        }),
        readiness_probe: Some(http_probe("/readiness", port, 5, 1)),
        liveness_probe: Some(http_probe("/liveness", port, 10, 3)),
        security_context: Some(restricted()),
        volume_mounts: Some(vec![VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..VolumeMount::default()
        }]),
        termination_message_path: Some("/dev/termination-log".into()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    };
    let pod_labels = router_labels(md);
    let selector = BTreeMap::from([(labels::ROUTER.to_owned(), name.clone())]);
    Ok(Deployment {
        metadata: meta(md, router_name(&name), router_labels(md)),
        spec: Some(DeploymentSpec {
            replicas: Some(ROUTER_REPLICAS),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..LabelSelector::default()
            },
            // The old router serves until the new one has healthy workers.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(WORKER_SERVICE_ACCOUNT.into()),
                    automount_service_account_token: Some(false),
                    priority_class_name: spec.worker.priority_class_name.clone(),
                    image_pull_secrets: (!spec.worker.image_pull_secrets.is_empty())
                        .then(|| spec.worker.image_pull_secrets.clone()),
                    tolerations: (!spec.placement.tolerations.is_empty())
                        .then(|| spec.placement.tolerations.clone()),
                    security_context: Some(restricted_pod()),
                    // One router per node where there are nodes enough.
                    affinity: Some(Affinity {
                        pod_anti_affinity: Some(PodAntiAffinity {
                            preferred_during_scheduling_ignored_during_execution: Some(vec![
                                WeightedPodAffinityTerm {
                                    weight: 100,
                                    pod_affinity_term: PodAffinityTerm {
                                        label_selector: Some(LabelSelector {
                                            match_labels: Some(selector),
                                            ..LabelSelector::default()
                                        }),
                                        topology_key: "kubernetes.io/hostname".into(),
                                        ..PodAffinityTerm::default()
                                    },
                                },
                            ]),
                            ..PodAntiAffinity::default()
                        }),
                        ..Affinity::default()
                    }),
                    containers: vec![container],
                    volumes: Some(vec![Volume {
                        name: "tmp".into(),
                        empty_dir: Some(EmptyDirVolumeSource::default()),
                        ..Volume::default()
                    }]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    })
}

/// The Services of a disaggregated deployment: the headless rendezvous Service (as in
/// [`services`]), the traffic Service (the deployment's name) over the router, and one Service
/// per pool over its ready leaders (`NAME-prefill`, `NAME-decode`; the SGLang prefill one also
/// carries the bootstrap port) for clients of one pool (metrics, debugging).
pub fn disaggregated_services(md: &ModelDeployment) -> Vec<Service> {
    let name = md.metadata.name.clone().unwrap_or_default();
    let port = md.spec.serving.port;
    let service_port = |pname: &str, p: i32| ServicePort {
        name: Some(pname.into()),
        port: p,
        target_port: Some(IntOrString::Int(p)),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    };
    let mut out: Vec<Service> = services(md).into_iter().take(1).collect();
    out.push(Service {
        metadata: meta(md, name.clone(), router_labels(md)),
        spec: Some(ServiceSpec {
            selector: Some(BTreeMap::from([(labels::ROUTER.to_owned(), name.clone())])),
            ports: Some(vec![service_port("http", port)]),
            ..ServiceSpec::default()
        }),
        status: None,
    });
    for role in [PoolRole::Prefill, PoolRole::Decode] {
        let mut selector = BTreeMap::from([
            (labels::DEPLOYMENT.to_owned(), name.clone()),
            (labels::ROLE.to_owned(), labels::ROLE_LEADER.to_owned()),
        ]);
        selector.insert(labels::POOL.into(), role.as_str().into());
        let mut meta_labels = common_labels(md);
        meta_labels.insert(labels::POOL.into(), role.as_str().into());
        let mut ports = vec![service_port("http", port)];
        if role == PoolRole::Prefill && md.spec.engine.name == EngineName::Sglang {
            ports.push(service_port("bootstrap", SGLANG_BOOTSTRAP_PORT));
        }
        out.push(Service {
            metadata: meta(md, pool_service_name(&name, role), meta_labels),
            spec: Some(ServiceSpec {
                selector: Some(selector),
                ports: Some(ports),
                ..ServiceSpec::default()
            }),
            status: None,
        });
    }
    out
}
