//! Synthetic clusters and fleets for benchmarks and placement-quality reports (deterministic,
//! seeded). Not used by the planner itself.

use k8s_openapi::api::core::v1::Node;
use serde_json::{Value, json};

use crate::api::{ModelDeployment, parse_model_deployment};

/// A tiny deterministic generator (SplitMix64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// GPU products of synthetic clusters, with memory in MiB and agent NVLink labels.
pub const PRODUCTS: [(&str, u32, Option<&str>); 4] = [
    ("NVIDIA-H100-80GB-HBM3", 81559, None),
    ("NVIDIA-H800", 81559, Some("200")),
    ("NVIDIA-H20", 97871, None),
    ("NVIDIA-L40S", 46068, None),
];

/// One synthetic Node as JSON (the shape `kubectl get nodes -o json` prints).
pub fn node_json(name: &str, product: usize, gpus: u32, zone: u32, block: u32, rack: u32) -> Value {
    let (p, mem, nvlink) = PRODUCTS[product];
    let mut labels = json!({
        "kubernetes.io/hostname": name,
        "nvidia.com/gpu.product": p,
        "nvidia.com/gpu.count": gpus.to_string(),
        "nvidia.com/gpu.memory": mem.to_string(),
        "topology.kubernetes.io/zone": format!("zone-{zone}"),
        "tessera.dev/fabric.block": format!("block-{block}"),
        "tessera.dev/fabric.rack": format!("rack-{rack}"),
    });
    if let Some(g) = nvlink {
        labels["tessera.dev/nvlink.gbps"] = json!(g);
        labels["tessera.dev/nvlink.domains"] = json!(format!("0-{}", gpus - 1));
    }
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {},
        "status": {
            "allocatable": {"nvidia.com/gpu": gpus.to_string(), "cpu": "192", "memory": "2Ti"},
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    })
}

/// A cluster of `nodes` 8-GPU nodes: 40% H100, 25% H800, 20% H20, 15% L40S, 32 nodes per rack,
/// 8 racks per block, 4 blocks per zone. Node types come in whole racks.
pub fn cluster_json(nodes: usize) -> Vec<Value> {
    (0..nodes)
        .map(|i| {
            let rack = i / 32;
            let product = match rack % 20 {
                0..=7 => 0,
                8..=12 => 1,
                13..=16 => 2,
                _ => 3,
            };
            let block = rack / 8;
            node_json(
                &format!("node-{i:05}"),
                product,
                8,
                (block / 4) as u32,
                block as u32,
                rack as u32,
            )
        })
        .collect()
}

/// The cluster as typed Nodes.
pub fn cluster(nodes: usize) -> Vec<Node> {
    cluster_json(nodes)
        .into_iter()
        .map(|v| serde_json::from_value(v).expect("synthetic node"))
        .collect()
}

/// Model shapes: (name, parameters, layers, hidden, heads, kv heads, intermediate).
pub const SHAPES: [(&str, i64, i32, i32, i32, i32, i32); 4] = [
    ("8b", 8_030_261_248, 32, 4096, 32, 8, 14336),
    ("32b", 32_763_876_352, 64, 5120, 40, 8, 27648),
    ("70b", 70_553_706_496, 80, 8192, 64, 8, 28672),
    ("405b", 405_853_388_800, 126, 16384, 128, 8, 53248),
];

/// One synthetic ModelDeployment as JSON.
pub fn deployment_json(i: usize, rng: &mut Rng) -> Value {
    let shape = match rng.below(100) {
        0..=44 => 0,
        45..=69 => 1,
        70..=94 => 2,
        _ => 3,
    };
    let (sname, params, layers, hidden, heads, kv, inter) = SHAPES[shape];
    let types: Vec<&str> = match rng.below(5) {
        0 => vec![],
        1 => vec!["H100", "H800"],
        2 => vec!["H800", "H100", "H20"],
        3 => vec!["H20", "H100"],
        _ => {
            if shape <= 1 {
                vec!["L40S", "H20"]
            } else {
                vec!["H100", "H20"]
            }
        }
    };
    let mut spec = json!({
        "replicas": 1 + rng.below(7),
        "priority": (rng.below(5) as i64) * 100,
        "model": {
            "uri": format!("pvc://models/{sname}"),
            "architecture": {
                "parameters": params, "layers": layers, "hiddenSize": hidden,
                "attentionHeads": heads, "kvHeads": kv, "intermediateSize": inter,
                "vocabSize": 128256, "contextLength": 131072, "bytesPerParameter": 2
            }
        },
        "gpu": {"types": types},
        "serving": {"maxConcurrency": ([8, 16, 32][rng.below(3) as usize]), "contextLength": 8192},
    });
    if shape == 3 {
        spec["placement"] = json!({"pipelineTopologyKey": "tessera.dev/fabric.block"});
    }
    json!({
        "apiVersion": "tessera.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {
            "name": format!("model-{i:04}-{sname}"),
            "namespace": format!("team-{}", i % 20),
            "creationTimestamp": format!("2025-01-01T00:{:02}:{:02}Z", (i / 60) % 60, i % 60),
        },
        "spec": spec,
    })
}

/// `count` synthetic ModelDeployments (about 4 replicas each).
pub fn fleet(count: usize, seed: u64) -> Vec<ModelDeployment> {
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|i| {
            parse_model_deployment(&deployment_json(i, &mut rng)).expect("synthetic deployment")
        })
        .collect()
}

/// Mixture-of-experts shapes for the synthetic fleet: (name, parameters, layers, hidden, heads,
/// KV heads, dense FFN, experts, per token, shared, expert FFN, dense layers, bytes/parameter,
/// MLA latent rank).
#[allow(clippy::type_complexity)]
pub const MOE_SHAPES: [(
    &str,
    i64,
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    f64,
    i32,
); 3] = [
    (
        "mixtral-8x7b",
        46_702_792_704,
        32,
        4096,
        32,
        8,
        14336,
        8,
        2,
        0,
        14336,
        0,
        2.0,
        0,
    ),
    (
        "qwen3-235b-a22b",
        235_093_634_560,
        94,
        4096,
        64,
        4,
        12288,
        128,
        8,
        0,
        1536,
        0,
        1.0,
        0,
    ),
    (
        "deepseek-v3",
        671_026_419_200,
        61,
        7168,
        128,
        128,
        18432,
        256,
        8,
        1,
        2048,
        3,
        1.0,
        512,
    ),
];

/// `count` synthetic ModelDeployments of which every `every`-th is a mixture of experts (the
/// shapes of [`MOE_SHAPES`] in turn, served by SGLang, expert parallelism left to the planner).
pub fn fleet_with_moe(count: usize, seed: u64, every: usize) -> Vec<ModelDeployment> {
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|i| {
            let mut v = deployment_json(i, &mut rng);
            if every > 0 && i % every == 0 {
                let (name, params, layers, hidden, heads, kv, inter, e, k, sh, ei, dense, b, mla) =
                    MOE_SHAPES[(i / every) % MOE_SHAPES.len()];
                let mut arch = json!({
                    "parameters": params, "layers": layers, "hiddenSize": hidden,
                    "attentionHeads": heads, "kvHeads": kv, "intermediateSize": inter,
                    "vocabSize": 129280, "contextLength": 131072, "bytesPerParameter": b,
                    "experts": e, "expertsPerToken": k, "sharedExperts": sh,
                    "expertIntermediateSize": ei, "denseLayers": dense
                });
                if mla > 0 {
                    arch["kvLoraRank"] = json!(mla);
                }
                v["metadata"]["name"] = json!(format!("model-{i:04}-{name}"));
                v["spec"]["model"]["uri"] = json!(format!("pvc://models/{name}"));
                v["spec"]["model"]["architecture"] = arch;
                v["spec"]["replicas"] = json!(1 + rng.below(2));
                v["spec"]["gpu"] = json!({"types": ["H800", "H100", "H20"]});
                v["spec"]["placement"] = json!({});
                // As such models are served: by SGLang, which has data-parallel attention.
                v["spec"]["engine"] = json!({"name": "sglang"});
            }
            parse_model_deployment(&v).expect("synthetic deployment")
        })
        .collect()
}
