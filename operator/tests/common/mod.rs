//! Helpers shared by the operator's test crates (each uses some of them).
#![allow(dead_code)]

use k8s_openapi::api::core::v1::Node;
use serde_json::json;

/// One Ready node `h100-1` with 8 H100s, labelled as GPU feature discovery labels it.
pub fn h100_node() -> Node {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "h100-1", "labels": {
            "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count": "8",
            "nvidia.com/gpu.memory": "81559"}},
        "status": {"allocatable": {"nvidia.com/gpu": "8"}, "conditions": [{"type": "Ready", "status": "True"}]}
    }))
    .expect("node")
}
