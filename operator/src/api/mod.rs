//! The `ModelDeployment` API (`tessera.dev/v1alpha1`).
//!
//! The Rust types here are the single source of the CRD: [`crd()`] derives the schema from them,
//! adds the bounds and CEL rules of [`rules`], and `crds/modeldeployment.yaml` is its committed
//! output (a test fails on drift). Field names are a contract with users, examples and the docs
//! (`docs/api.md`).

// kube-derive repeats `type_` and `name` per printcolumn, which this lint mistakes for duplicates.
#![allow(clippy::duplicated_attributes)]

mod crd;
mod degree;
pub mod rules;
pub mod schema;
mod validate;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, EmptyDirVolumeSource, EnvVar, LocalObjectReference,
    PersistentVolumeClaimVolumeSource, SecretVolumeSource, Toleration, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crd::{crd, crd_yaml, spec_schema};
pub use degree::ParallelDegree;
pub use validate::{
    FieldError, ValidationError, parse_model_deployment, unknown_fields, validate, validate_update,
};

/// API group of every Tessera resource.
pub const GROUP: &str = "tessera.dev";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";
/// Longest `metadata.name` a ModelDeployment may have, so that every derived child name
/// (`NAME-rREPLICA-INCARNATION-sSTAGE`, Services `NAME-workers`) stays a DNS label of at most
/// 63 characters.
pub const MAX_NAME_LENGTH: usize = 45;
/// Upper bound on GPUs in one replica (tensor x pipeline).
pub const MAX_GPUS_PER_REPLICA: u32 = 64;
/// Upper bound on `spec.replicas` and `spec.autoscaling.maxReplicas`.
pub const MAX_REPLICAS: i32 = 512;

/// A fleet of identical LLM inference replicas. Tessera chooses the GPU type and the
/// tensor x pipeline parallel layout, places each replica as an all-or-nothing gang of worker
/// pods, keeps it healthy and scales it with load.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "tessera.dev",
    version = "v1alpha1",
    kind = "ModelDeployment",
    namespaced,
    shortname = "mdep",
    category = "tessera",
    status = "ModelDeploymentStatus",
    derive = "PartialEq",
    doc = "A fleet of LLM inference replicas that Tessera shards, places as gangs of worker pods, heals and scales.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Replicas whose whole worker group is ready"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".spec.replicas",
        description = "Desired replicas"
    ),
    printcolumn(
        name = "GPU",
        type_ = "string",
        json_path = ".status.gpuType",
        description = "GPU type the planner chose"
    ),
    printcolumn(
        name = "TP",
        type_ = "integer",
        json_path = ".status.tensorParallel",
        description = "Tensor-parallel degree"
    ),
    printcolumn(
        name = "PP",
        type_ = "integer",
        json_path = ".status.pipelineParallel",
        description = "Pipeline-parallel degree"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Lifecycle phase"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentSpec {
    /// Desired number of replicas; each replica is one complete copy of the model served by a
    /// group of tensor x pipeline workers. Also the scale subresource's spec path.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 512))]
    pub replicas: i32,

    /// Higher priority deployments are placed first and win GPUs when the cluster is short.
    /// Running replicas are never evicted for a lower priority.
    #[serde(default)]
    #[schemars(range(min = -1000, max = 1000))]
    pub priority: i32,

    /// The model: where its weights are and the architecture facts the planner needs.
    pub model: ModelSpec,

    /// Tensor- and pipeline-parallel degrees; `auto` lets the planner choose.
    #[serde(default)]
    pub parallelism: ParallelismSpec,

    /// Which GPUs the replicas may use.
    #[serde(default)]
    pub gpu: GpuSpec,

    /// Where and how tightly the workers of one replica are placed.
    #[serde(default)]
    pub placement: PlacementSpec,

    /// The serving endpoint and the load each replica must hold.
    #[serde(default)]
    pub serving: ServingSpec,

    /// Built-in autoscaling on load. Leave disabled to drive the scale subresource with HPA or
    /// KEDA instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,

    /// The inference engine the worker pods run: Tessera's own (default), vLLM or SGLang.
    #[serde(default)]
    pub engine: EngineSpec,

    /// The worker pods: image, resources and a small set of pod overrides.
    #[serde(default)]
    pub worker: WorkerSpec,

    /// What happens when a member of a replica fails.
    #[serde(default)]
    pub failure_policy: FailurePolicy,

    /// Replicas of each prefill/decode pool while pools run (`serving.disaggregation` Auto or
    /// On). A pool left unset holds `replicas` units of the planner's prefill:decode ratio;
    /// one set here holds exactly that many replicas, and changing it adds or removes replicas
    /// of that pool only. The built-in autoscaler writes these, each pool on its own signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_replicas: Option<PoolReplicas>,
}

/// Replicas of the prefill and the decode pool (`spec.poolReplicas`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolReplicas {
    /// Prefill replicas; unset: `replicas` units of the planned ratio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 512))]
    pub prefill: Option<i32>,
    /// Decode replicas; unset: `replicas` units of the planned ratio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 512))]
    pub decode: Option<i32>,
}

impl ModelDeploymentSpec {
    /// Replicas of pool `role` (`prefill` or `decode`) with `per_unit` replicas per unit of the
    /// planned ratio: `poolReplicas.<role>` when set, else `replicas` units.
    pub fn pool_size(&self, role: &str, per_unit: i32) -> i32 {
        let set = self.pool_replicas.and_then(|p| match role {
            "prefill" => p.prefill,
            "decode" => p.decode,
            _ => None,
        });
        set.unwrap_or_else(|| self.replicas.max(0).saturating_mul(per_unit.max(0)))
            .max(0)
    }
}

fn default_replicas() -> i32 {
    1
}

/// Where the weights are and what shape they have.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Location of the weights: `file:///path` (inside the worker's model volume, supplied
    /// through `worker.volumes`), `pvc://CLAIM/path` (mounted read-only into every worker) or
    /// `http(s)://...` (downloaded by each worker at start).
    #[schemars(length(min = 1, max = 2048))]
    pub uri: String,

    /// Optional lowercase hex SHA-256 of the weights file; workers refuse a download that does
    /// not match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(equal = 64))]
    pub sha256: Option<String>,

    /// Model name served by the OpenAI API (`model` in requests). Defaults to the
    /// ModelDeployment's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub served_name: Option<String>,

    /// Architecture facts used for the parallelism rules and the cost model.
    pub architecture: ModelArchitecture,
}

/// Architecture of a Llama-family decoder, dense or a mixture of experts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelArchitecture {
    /// Total parameter count (for example 70000000000).
    #[schemars(range(min = 1, max = 100_000_000_000_000i64))]
    pub parameters: i64,
    /// Decoder layers.
    #[schemars(range(min = 1, max = 1024))]
    pub layers: i32,
    /// Hidden (model) dimension.
    #[schemars(range(min = 1, max = 131072))]
    pub hidden_size: i32,
    /// Attention (query) heads.
    #[schemars(range(min = 1, max = 1024))]
    pub attention_heads: i32,
    /// Key/value heads (grouped-query attention); equal to `attentionHeads` without GQA.
    #[schemars(range(min = 1, max = 1024))]
    pub kv_heads: i32,
    /// Feed-forward (SwiGLU) inner dimension.
    #[schemars(range(min = 1, max = 1048576))]
    pub intermediate_size: i32,
    /// Vocabulary size.
    #[schemars(range(min = 1, max = 10_000_000))]
    pub vocab_size: i32,
    /// Longest context the model supports, in tokens.
    #[schemars(range(min = 1, max = 10_000_000))]
    pub context_length: i32,
    /// Bytes per weight as stored: 2 for BF16/FP16, 1 for FP8/INT8, about 0.56 for Q4_1.
    #[schemars(range(min = 0.1, max = 4.0))]
    pub bytes_per_parameter: f64,
    /// Mixture of experts: routed experts per MoE layer (`num_local_experts`, `num_experts` or
    /// `n_routed_experts` in config.json). Set together with `expertsPerToken` and
    /// `expertIntermediateSize`; omit all three for a dense model. `parameters` stays the total
    /// over all experts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 4096))]
    pub experts: Option<i32>,
    /// Experts each token is routed to (`num_experts_per_tok`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub experts_per_token: Option<i32>,
    /// Shared experts every token runs besides its routed ones (`n_shared_experts`; default 0),
    /// each as wide as a routed expert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 64))]
    pub shared_experts: Option<i32>,
    /// Feed-forward (SwiGLU) inner dimension of one expert (`moe_intermediate_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1048576))]
    pub expert_intermediate_size: Option<i32>,
    /// Layers whose feed-forward is dense rather than experts (`first_k_dense_replace`; for
    /// interleaved models such as Llama 4 Maverick, the count of dense layers). Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1023))]
    pub dense_layers: Option<i32>,
    /// Width of one attention head (`head_dim` in config.json) where it is not
    /// `hiddenSize / attentionHeads` (Qwen3, Llama 4 and gpt-oss set it); sizes the KV cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub head_dim: Option<i32>,
    /// Multi-head latent attention (DeepSeek-V2/V3): the compressed KV width cached per token
    /// and layer (`kv_lora_rank`). Set, the KV cache holds `kvLoraRank + qkRopeHeadDim`
    /// elements per token and layer, shared by all heads, instead of keys and values per KV
    /// head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub kv_lora_rank: Option<i32>,
    /// The decoupled rotary key width cached next to the latent (`qk_rope_head_dim`; default 64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 4096))]
    pub qk_rope_head_dim: Option<i32>,
}

impl ModelArchitecture {
    /// Whether the model is a mixture of experts.
    pub fn is_moe(&self) -> bool {
        self.experts.is_some_and(|e| e > 0)
    }

    /// Layers whose feed-forward is a mixture of experts (0 for a dense model).
    pub fn moe_layers(&self) -> i64 {
        if !self.is_moe() {
            return 0;
        }
        i64::from((self.layers - self.dense_layers.unwrap_or(0)).max(0))
    }

    /// Parameters of one expert: a SwiGLU of `expertIntermediateSize` (gate, up, down).
    pub fn expert_parameters(&self) -> i64 {
        3 * i64::from(self.hidden_size) * i64::from(self.expert_intermediate_size.unwrap_or(0))
    }

    /// Parameters of all routed experts of all MoE layers (0 for a dense model).
    pub fn routed_expert_parameters(&self) -> i64 {
        self.moe_layers() * i64::from(self.experts.unwrap_or(0)) * self.expert_parameters()
    }

    /// Parameters every token uses: everything but the routed experts, plus the
    /// `expertsPerToken` experts of each MoE layer. The total for a dense model.
    pub fn active_parameters(&self) -> i64 {
        if !self.is_moe() {
            return self.parameters;
        }
        let routed = self.routed_expert_parameters();
        (self.parameters - routed).max(0)
            + self.moe_layers()
                * i64::from(self.experts_per_token.unwrap_or(1))
                * self.expert_parameters()
    }

    /// Width of one attention head: `headDim`, or `hiddenSize / attentionHeads`.
    pub fn head_width(&self) -> f64 {
        match self.head_dim {
            Some(d) if d > 0 => f64::from(d),
            _ => f64::from(self.hidden_size.max(1)) / f64::from(self.attention_heads.max(1)),
        }
    }

    /// Elements the KV cache holds per token and layer for `kv_heads_per_rank` KV heads: keys
    /// and values per head, or the shared latent of multi-head latent attention.
    pub fn kv_elements_per_token_layer(&self, kv_heads_per_rank: f64) -> f64 {
        match self.kv_lora_rank {
            Some(r) => f64::from(r) + f64::from(self.qk_rope_head_dim.unwrap_or(64)),
            None => 2.0 * kv_heads_per_rank * self.head_width(),
        }
    }
}

/// Tensor- and pipeline-parallel degrees.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParallelismSpec {
    /// Tensor-parallel degree: `auto` (the planner chooses) or a positive integer that divides
    /// the attention heads and divides, or is a multiple of, the KV heads.
    #[serde(default)]
    pub tensor: ParallelDegree,
    /// Pipeline-parallel degree: `auto` (the planner chooses) or a positive integer of at most
    /// the model's layers.
    #[serde(default)]
    pub pipeline: ParallelDegree,
    /// Expert-parallel degree of a mixture-of-experts model: `auto` (the planner chooses), 1
    /// (experts sharded by tensor parallelism like a dense feed-forward) or the GPUs of a
    /// pipeline stage (each GPU holds whole experts; tokens travel to them by all-to-all). It
    /// must divide `model.architecture.experts`. Only for MoE models.
    #[serde(default, skip_serializing_if = "ParallelDegree::is_auto")]
    pub expert: ParallelDegree,
    /// How attention is split inside an expert-parallel stage: `auto`, `tensor` (heads split
    /// over the GPUs, an all-reduce per layer) or `data` (every GPU runs whole attention for
    /// its own share of the sequences and keeps their KV cache: no all-reduce, no KV copies;
    /// vLLM's and SGLang's data-parallel attention). `data` needs expert parallelism.
    #[serde(default, skip_serializing_if = "AttentionParallelism::is_auto")]
    pub attention: AttentionParallelism,
}

/// How attention is split inside a stage of a mixture-of-experts replica.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AttentionParallelism {
    /// The planner chooses (always `tensor` for dense models).
    #[default]
    Auto,
    /// Attention heads split over the stage's GPUs (tensor parallelism).
    Tensor,
    /// Each GPU runs whole attention for its share of the sequences (data parallelism).
    Data,
}

impl AttentionParallelism {
    fn is_auto(&self) -> bool {
        *self == AttentionParallelism::Auto
    }
}

/// Which GPUs a replica may use.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuSpec {
    /// Allowed GPU types in order of preference, as short names (`H100`, `H800`, `H20`, `L40S`)
    /// matched as whole tokens against node GPU products (so `H20` never matches `H200`).
    /// Empty: any GPU type the catalog knows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 8),
        inner(
            length(min = 1, max = 63),
            regex(pattern = r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
        )
    )]
    pub types: Vec<String>,
    /// Only use GPUs with at least this much memory each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub min_memory_gi_b: Option<i32>,
}

/// How far the tensor-parallel group of a replica may spread.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
pub enum TensorParallelScope {
    /// The fastest domain the GPU type has: one NVLink domain where the type has NVLink, one
    /// node (PCIe between the GPUs) where it has none, as people serve 70B models on 4 x L40S.
    #[default]
    Auto,
    /// All GPUs of a TP group share one NVLink domain (NVSwitch board or NVLink island).
    #[serde(rename = "NVLinkDomain")]
    NvLinkDomain,
    /// All GPUs of a TP group are on one node (PCIe between them is acceptable).
    Node,
    /// A TP group may span nodes (over the inter-node fabric); only sensible for small models.
    Any,
}

impl TensorParallelScope {
    /// The scope for a GPU type with (`true`) or without NVLink: `Auto` becomes `NVLinkDomain`
    /// or `Node`; the others are what they say.
    pub fn resolve(self, has_nvlink: bool) -> TensorParallelScope {
        match self {
            TensorParallelScope::Auto if has_nvlink => TensorParallelScope::NvLinkDomain,
            TensorParallelScope::Auto => TensorParallelScope::Node,
            other => other,
        }
    }
}

/// Placement constraints.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlacementSpec {
    /// How far a tensor-parallel group may spread: `Auto` (default: the NVLink domain on GPUs
    /// with NVLink, the node on PCIe-only GPUs), `NVLinkDomain`, `Node` or `Any`.
    #[serde(default)]
    pub tensor_parallel_scope: TensorParallelScope,
    /// Optional Node label key (for example a rack or block label) whose value all pipeline
    /// stages of a replica must share. Without it stages go to the tightest domain with room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 317))]
    pub pipeline_topology_key: Option<String>,
    /// Only nodes with all of these labels are used (valid Kubernetes label keys and values).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations for tainted GPU nodes; also copied onto the worker pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
}

/// The serving endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServingSpec {
    /// Port of the OpenAI-compatible API on each replica leader.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub port: i32,
    /// Concurrent sequences each replica must hold in its KV cache.
    #[serde(default = "default_max_concurrency")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_concurrency: i32,
    /// Context (prompt + output tokens) each sequence may use; sizes the KV-cache budget.
    /// Defaults to the model's `contextLength`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub context_length: Option<i32>,
    /// Element type of the KV cache: `bf16` (default, as the engines default to the model's
    /// dtype) or `fp8` (half the KV memory and KV reads; vLLM and SGLang only). Counted in the
    /// memory fit and the decode prediction, and passed to the engine.
    /// (Left out when `bf16`, so that the pod-template hash of deployments written before this
    /// field existed stays the same and an upgrade rolls nothing.)
    #[serde(default, skip_serializing_if = "KvCacheDtype::is_default")]
    pub kv_cache_dtype: KvCacheDtype,
    /// The typical request: prompt and output tokens. The planner predicts time to first
    /// token, inter-token latency and throughput for it, and decides disaggregation by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadShape>,
    /// Latency targets the planner keeps while maximising tokens/s per GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo: Option<ServingSlo>,
    /// Prefill and decode on separate pools: `Off` (default), `Auto` (only where the plan
    /// predicts more SLO-meeting output tokens/s per GPU than aggregated serving) or `On`.
    /// Needs `workload`.
    #[serde(default, skip_serializing_if = "Disaggregation::is_off")]
    pub disaggregation: Disaggregation,
}

/// A request shape.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadShape {
    /// Prompt tokens of a typical request.
    #[schemars(range(min = 1, max = 10_000_000))]
    pub input_tokens: i32,
    /// Output tokens of a typical request.
    #[schemars(range(min = 1, max = 10_000_000))]
    pub output_tokens: i32,
}

/// Latency targets.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServingSlo {
    /// Time to first token of a typical request, seconds (prefill, and the KV transfer when
    /// disaggregated; queueing excluded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.001, max = 3600.0))]
    pub time_to_first_token_seconds: Option<f64>,
    /// Time between output tokens, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0001, max = 60.0))]
    pub inter_token_latency_seconds: Option<f64>,
}

/// Whether prefill and decode run on separate pools.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
pub enum Disaggregation {
    /// Every replica prefills and decodes (aggregated serving).
    #[default]
    Off,
    /// Separate pools only where they predict more SLO-meeting tokens/s per GPU.
    Auto,
    /// Separate pools whenever a pair meets the SLO.
    On,
}

impl Disaggregation {
    fn is_off(&self) -> bool {
        *self == Disaggregation::Off
    }
}

/// Element type of the KV cache.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheDtype {
    /// 2 bytes per element.
    #[default]
    Bf16,
    /// 1 byte per element (E4M3).
    Fp8,
}

impl KvCacheDtype {
    fn is_default(&self) -> bool {
        *self == KvCacheDtype::Bf16
    }

    /// Bytes per KV-cache element.
    pub fn bytes(self) -> f64 {
        match self {
            KvCacheDtype::Bf16 => 2.0,
            KvCacheDtype::Fp8 => 1.0,
        }
    }
}

fn default_port() -> i32 {
    8000
}
fn default_max_concurrency() -> i32 {
    16
}

impl Default for ServingSpec {
    fn default() -> Self {
        Self {
            port: default_port(),
            max_concurrency: default_max_concurrency(),
            context_length: None,
            kv_cache_dtype: KvCacheDtype::default(),
            workload: None,
            slo: None,
            disaggregation: Disaggregation::default(),
        }
    }
}

/// Load signal the autoscaler tracks.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ScalingMetric {
    /// Waiting plus running requests per replica.
    #[default]
    QueueDepth,
    /// Fraction (0..1) of the KV-cache budget in use, averaged over replicas.
    KvCacheUtilization,
    /// Generated tokens per second per replica.
    TokensPerSecond,
    /// GPU utilisation (0..1) averaged over the replica's GPUs.
    GpuUtilization,
    /// Mean time to first token of the requests since the last scrape, seconds (0 when idle).
    TimeToFirstToken,
    /// Mean time between output tokens since the last scrape, seconds (0 when idle).
    InterTokenLatency,
}

/// What the prefill pool of a disaggregated deployment scales on.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PrefillScalingMetric {
    /// Waiting plus running requests per prefill replica.
    QueueDepth,
    /// Mean time to first token, seconds.
    TimeToFirstToken,
}

/// What the decode pool of a disaggregated deployment scales on.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum DecodeScalingMetric {
    /// Fraction (0..1) of the KV-cache budget in use.
    KvCacheUtilization,
    /// Mean time between output tokens, seconds.
    InterTokenLatency,
}

/// The signal one pool of a disaggregated deployment scales on, and its per-replica target.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolScaling<M> {
    pub metric: M,
    /// Per-replica target of the metric (requests, fraction 0..1, or seconds).
    #[schemars(range(min = 0.001, max = 1_000_000.0))]
    pub target: f64,
}

impl From<PrefillScalingMetric> for ScalingMetric {
    fn from(m: PrefillScalingMetric) -> Self {
        match m {
            PrefillScalingMetric::QueueDepth => ScalingMetric::QueueDepth,
            PrefillScalingMetric::TimeToFirstToken => ScalingMetric::TimeToFirstToken,
        }
    }
}

impl From<DecodeScalingMetric> for ScalingMetric {
    fn from(m: DecodeScalingMetric) -> Self {
        match m {
            DecodeScalingMetric::KvCacheUtilization => ScalingMetric::KvCacheUtilization,
            DecodeScalingMetric::InterTokenLatency => ScalingMetric::InterTokenLatency,
        }
    }
}

/// Built-in autoscaling.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Turn the built-in autoscaler on. Off: `spec.replicas` is left to you (or HPA/KEDA).
    #[serde(default)]
    pub enabled: bool,
    /// Fewest replicas.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 1, max = 512))]
    pub min_replicas: i32,
    /// Most replicas.
    #[schemars(range(min = 1, max = 512))]
    pub max_replicas: i32,
    /// Load signal to track.
    #[serde(default)]
    pub metric: ScalingMetric,
    /// Per-replica target of the metric (requests, fraction 0..1, or tokens/s).
    #[schemars(range(min = 0.001, max = 1_000_000.0))]
    pub target: f64,
    /// Load must stay above target this long before scaling up.
    #[serde(default = "default_scale_up_window")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_up_stabilization_seconds: i32,
    /// Load must stay below target this long before scaling down.
    #[serde(default = "default_scale_down_window")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: i32,
    /// While prefill/decode pools run: what the prefill pool scales on (`queueDepth` or
    /// `timeToFirstToken`). Default: time to first token against
    /// `serving.slo.timeToFirstTokenSeconds` when set, else `metric` and `target`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill: Option<PoolScaling<PrefillScalingMetric>>,
    /// While prefill/decode pools run: what the decode pool scales on (`kvCacheUtilization`
    /// or `interTokenLatency`). Default: inter-token latency against
    /// `serving.slo.interTokenLatencySeconds` when set, else `metric` and `target`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<PoolScaling<DecodeScalingMetric>>,
}

fn default_min_replicas() -> i32 {
    1
}
fn default_scale_up_window() -> i32 {
    30
}
fn default_scale_down_window() -> i32 {
    300
}

/// Image pull policy of the worker container.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    /// The value as Kubernetes spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// CPU and memory of the worker container (GPUs come from the plan).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CpuMemory {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
}

/// Resources of the worker container. GPUs are not set here: the plan decides them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerResources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<CpuMemory>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<CpuMemory>,
}

/// A volume for the worker pods, limited to sources that grant no host access.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerVolume {
    /// Volume name (a DNS label), referenced by `worker.volumeMounts`.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<PersistentVolumeClaimVolumeSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapVolumeSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretVolumeSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_dir: Option<EmptyDirVolumeSource>,
}

/// The worker pods. Deliberately small: no privileged mode, host namespaces or hostPath.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerSpec {
    /// Worker image; defaults to the operator's `--worker-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<WorkerResources>,
    /// Extra environment; names starting with `TESSERA_` are reserved for the operator.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Extra labels on the worker pods: valid Kubernetes label keys and values; keys under
    /// `tessera.dev/` and `app.kubernetes.io/` are reserved (the operator selects pods by them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations on the worker pods (keys must be valid Kubernetes annotation keys).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Priority class of the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
    /// Pull secrets for a private worker image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// Extra volumes (PVC, ConfigMap, Secret or emptyDir only). The names `dshm` and `tmp`, and
    /// `model` for a `pvc://` or `http(s)://` model, belong to the operator's own volumes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<WorkerVolume>,
    /// Mounts of `volumes` into the worker container. A mount may not equal, contain or lie
    /// inside the operator's mount paths: `/dev/shm`, `/tmp`, and `/models` (`pvc://` model) or
    /// `/model-cache` (`http(s)://` model).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
}

/// An inference engine Tessera can launch.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
pub enum EngineName {
    /// `tessera-worker serve`: Tessera's own tensor- and pipeline-parallel core.
    #[default]
    #[serde(rename = "tessera")]
    Tessera,
    /// vLLM's OpenAI server (`vllm serve`), multi-node with its multiprocessing backend.
    #[serde(rename = "vllm")]
    Vllm,
    /// SGLang's server (`python3 -m sglang.launch_server`), multi-node with `--nnodes`.
    #[serde(rename = "sglang")]
    Sglang,
}

impl EngineName {
    /// The name as written in the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineName::Tessera => "tessera",
            EngineName::Vllm => "vllm",
            EngineName::Sglang => "sglang",
        }
    }
}

/// The engine of the worker pods. The planner, gangs, healing and autoscaling are the same for
/// every engine; the pods differ in their command line, probes and metrics.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EngineSpec {
    /// `tessera` (default), `vllm` or `sglang`.
    #[serde(default)]
    pub name: EngineName,
    /// Engine image. Defaults to `worker.image`, then to the operator's image for the engine
    /// (`--worker-image`, `--vllm-image`, `--sglang-image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// Extra arguments appended to the engine's command line (for example
    /// `--gpu-memory-utilization=0.85`). Arguments the operator sets from the plan (parallel
    /// sizes, node rank, addresses, ports, model, served name, concurrency, context length) are
    /// refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 4096)))]
    pub args: Vec<String>,
    /// Extra environment of the engine container (for example `NCCL_SOCKET_IFNAME`), after
    /// `worker.env`; names starting with `TESSERA_`, and `VLLM_HOST_IP`, are reserved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Image of the router in front of the prefill and decode pools of a disaggregated
    /// deployment (`serving.disaggregation`). SGLang: defaults to the engine's image, which
    /// ships sglang-router; vLLM: required, an image with the vllm-router package (vLLM's
    /// image has none). See docs/engines.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub router_image: Option<String>,
}

/// What happens when a member of a replica fails.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailurePolicy {
    /// Recreate the whole replica (a new incarnation) when any member fails. Tensor-parallel
    /// groups cannot survive the loss of a rank, so turning this off only makes sense for
    /// debugging.
    #[serde(default = "default_true")]
    pub recreate_group: bool,
    /// Recreations of one replica before it is marked Degraded and its node avoided.
    #[serde(default = "default_max_restarts")]
    #[schemars(range(min = 0, max = 100))]
    pub max_restarts: i32,
    /// First backoff between recreations; doubles on each further failure (capped at 10 min).
    #[serde(default = "default_backoff_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub backoff_seconds: i32,
}

fn default_true() -> bool {
    true
}
fn default_max_restarts() -> i32 {
    5
}
fn default_backoff_seconds() -> i32 {
    10
}

impl Default for FailurePolicy {
    fn default() -> Self {
        Self {
            recreate_group: true,
            max_restarts: default_max_restarts(),
            backoff_seconds: default_backoff_seconds(),
        }
    }
}

/// Lifecycle phase shown in `kubectl get mdep`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Accepted, not yet planned.
    Pending,
    /// Placed; worker groups are starting or loading the model.
    Progressing,
    /// Every desired replica is ready.
    Ready,
    /// Some replicas serve, others are failing or unplaced.
    Degraded,
    /// No replica can be placed; the Placed condition says why.
    Unschedulable,
    /// The spec is invalid for this cluster or the model cannot be fetched.
    Failed,
}

/// Observed state, written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Placed, Ready, Progressing, Degraded and ScalingLimited, each with a reason and numbers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Replicas that currently have worker pods (scale subresource status path). While
    /// prefill/decode pools run, whole units of the pools (as `spec.replicas` counts them).
    #[serde(default)]
    pub replicas: i32,
    /// Replicas whose whole worker group is ready (with pools: whole units ready).
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the worker pods, for the scale subresource (HPA, KEDA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// GPU type of the current plan (printer column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_type: Option<String>,
    /// Tensor-parallel degree of the current plan (printer column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensor_parallel: Option<i32>,
    /// Pipeline-parallel degree of the current plan (printer column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_parallel: Option<i32>,
    /// Expert-parallel degree of the current plan (MoE models with expert parallelism).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_parallel: Option<i32>,
    /// Prefill/decode disaggregation (`serving.disaggregation` Auto or On): the two pools the
    /// planner chose, with their predictions, and why; empty for aggregated serving.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolStatus>,
    /// Why the deployment serves aggregated or disaggregated (with the figures compared).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disaggregation: Option<String>,
    /// Parameters each token uses (MoE models: all but the routed experts, plus the
    /// `expertsPerToken` experts of each layer), derived from `model.architecture`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_parameters: Option<i64>,
    /// Why the planner chose this layout: the choice and the best alternatives with predictions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alternatives: Vec<LayoutPrediction>,
    /// One entry per placed replica.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placements: Vec<ReplicaPlacement>,
    /// Nodes where replicas kept failing; the planner avoids them for this deployment. Each
    /// entry expires (see `avoidNodesSince`), and a change of the pod template clears them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub avoid_nodes: Vec<String>,
    /// When each node of `avoidNodes` was added.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub avoid_nodes_since: BTreeMap<String, k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Worker groups this deployment has created so far. The next group is number
    /// `incarnations`; its id (in pod names) is derived from the deployment's uid and that
    /// number, and it is written here before any pod is created, so a repeated or stale
    /// reconcile re-applies the same pods instead of creating a second group.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub incarnations: i64,
    /// Hash of the pod template this status was computed for (a change clears `avoidNodes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_hash: Option<String>,
}

fn is_false(v: &bool) -> bool {
    !*v
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

fn is_zero32(v: &i32) -> bool {
    *v == 0
}

/// One pool of a disaggregated deployment.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    /// `prefill` or `decode`.
    pub role: String,
    pub gpu_type: String,
    pub tensor_parallel: i32,
    pub pipeline_parallel: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_parallel: Option<i32>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub data_parallel_attention: bool,
    /// Replicas of this pool: `spec.poolReplicas`, else its replicas per unit times
    /// `spec.replicas`.
    pub replicas: i32,
    /// Replicas of this pool in one unit of the planned prefill:decode ratio.
    #[serde(default, skip_serializing_if = "is_zero32")]
    pub replicas_per_unit: i32,
    /// Nodes its placed replicas use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Concurrent sequences per replica the prediction assumes (decode pool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<i32>,
    /// The link a prompt's KV cache crosses to the decode pool, as placed: `NVLink` or `PCIe`
    /// (every unit's replicas on one node), or `fabric` (prefill pool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_transfer_link: Option<String>,
    /// Time to first token (prefill pool: with the KV transfer over `kvTransferLink`), seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_first_token_seconds: Option<f64>,
    /// Inter-token latency (decode pool), seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inter_token_latency_seconds: Option<f64>,
    /// Requests/s one replica of this pool serves.
    pub requests_per_second_per_replica: f64,
}

impl PoolStatus {
    /// Replicas of this pool in one unit of the planned ratio (read from a status written
    /// before `replicasPerUnit`: its replicas over `units`, `spec.replicas`).
    pub fn per_unit(&self, units: i32) -> i32 {
        if self.replicas_per_unit > 0 {
            return self.replicas_per_unit;
        }
        (self.replicas.max(0) / units.max(1)).max(1)
    }
}

/// Whole units of the pools among replicas with these `roles`: for each pool, its replicas
/// over its replicas per unit, the smallest of the pools (0 without pools).
pub fn whole_units<'a>(
    pools: &[PoolStatus],
    units: i32,
    roles: impl Iterator<Item = Option<&'a str>> + Clone,
) -> i32 {
    pools
        .iter()
        .map(|pool| {
            let n = roles
                .clone()
                .filter(|&r| r == Some(pool.role.as_str()))
                .count();
            i32::try_from(n).unwrap_or(i32::MAX) / pool.per_unit(units)
        })
        .min()
        .unwrap_or(0)
}

/// Lifecycle of one replica (its whole worker group).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ReplicaState {
    /// Pods applied; not all of them observed yet.
    #[default]
    Creating,
    /// Every member pod exists; `ready` says whether the group serves.
    Running,
    /// A member failed; the group was removed and is recreated after a backoff.
    Backoff,
}

/// A candidate layout and what the cost model predicts for it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LayoutPrediction {
    pub gpu_type: String,
    pub tensor_parallel: i32,
    pub pipeline_parallel: i32,
    /// Expert-parallel degree (MoE models with expert parallelism only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_parallel: Option<i32>,
    /// Attention runs data-parallel inside the expert-parallel group.
    #[serde(default, skip_serializing_if = "is_false")]
    pub data_parallel_attention: bool,
    pub predicted: Prediction,
    /// Why it was or was not chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Cost-model predictions for one replica.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Prediction {
    /// Aggregate decode tokens/s of the replica at `serving.maxConcurrency`.
    pub decode_tokens_per_second: f64,
    /// Prefill tokens/s of the replica.
    pub prefill_tokens_per_second: f64,
    /// Time to first token for a prompt of the serving context, in seconds.
    #[serde(default)]
    pub time_to_first_token_seconds: f64,
    /// Per-direction bandwidth of the slowest link in the tensor-parallel ring, GB/s.
    pub all_reduce_g_bps: f64,
    /// MoE with expert parallelism: per-direction bandwidth the expert all-to-all (dispatch and
    /// combine) gets per GPU, GB/s: NVLink inside a domain, the fabric when the group spans
    /// nodes (the slower part of the traffic bounds it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all_to_all_g_bps: Option<f64>,
    /// MoE with expert parallelism: dispatch plus combine time of one MoE layer in a decode
    /// step at `serving.maxConcurrency`, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all_to_all_micros_per_layer: Option<f64>,
    /// What the running fleet measures for this layout (GPU type, TP, PP, engine) over what the
    /// cost model predicts, decode speed (median of recent scrapes; absent until measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_decode_ratio: Option<f64>,
    /// The same for prefill speed (predicted over measured time to first token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_prefill_ratio: Option<f64>,
    /// The same for the tensor-parallel all-reduce (predicted over measured time per call).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured_all_reduce_ratio: Option<f64>,
}

/// Where one replica runs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaPlacement {
    pub replica: i32,
    /// Changes every time the whole group is recreated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<String>,
    pub gpu_type: String,
    pub tensor_parallel: i32,
    pub pipeline_parallel: i32,
    /// Expert-parallel degree (MoE models with expert parallelism only): each GPU of a stage
    /// holds `experts / expertParallel` whole experts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_parallel: Option<i32>,
    /// Attention runs data-parallel inside the expert-parallel group (each GPU serves its own
    /// share of the sequences).
    #[serde(default, skip_serializing_if = "is_false")]
    pub data_parallel_attention: bool,
    pub stages: Vec<StagePlacement>,
    pub predicted: Prediction,
    #[serde(default)]
    pub ready: bool,
    /// Group recreations so far.
    #[serde(default)]
    pub restarts: i32,
    #[serde(default)]
    pub state: ReplicaState,
    /// Hash of the pod template the group was created from (a change rolls the replica).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_hash: Option<String>,
    /// When a member last failed, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
    /// `prefill` or `decode`: the pool of a disaggregated deployment this replica serves in
    /// (absent when it serves whole requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// One pipeline stage of a replica (its tensor-parallel group).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StagePlacement {
    pub stage: i32,
    pub node: String,
    /// GPUs the stage uses on that node.
    pub gpus: i32,
}
