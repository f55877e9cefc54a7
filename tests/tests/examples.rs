//! Every example ModelDeployment passes the CRD's schema decode and CEL rules, and the example
//! cluster snapshot has the shape the docs promise.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use serde_json::Value;
use tessera_operator::api::parse_model_deployment;
use tessera_tests::repo_root;

fn yaml_file(rel: &str) -> Value {
    let path = repo_root().join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn example_deployments_are_valid() {
    let dir = repo_root().join("examples/deployments");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("examples/deployments exists") {
        let path = entry.expect("dir entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let rel = path.strip_prefix(repo_root()).expect("inside repo");
        let value = yaml_file(rel.to_str().expect("utf-8 path"));
        let md =
            parse_model_deployment(&value).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        names.push(md.metadata.name.expect("named"));
    }
    names.sort();
    assert_eq!(
        names,
        [
            "deepseek-v3",
            "llama-405b",
            "llama-70b",
            "llama-8b",
            "smollm2-135m"
        ]
    );
}

#[test]
fn example_cluster_has_the_promised_nodes() {
    let list = yaml_file("examples/cluster.yaml");
    let items = list["items"].as_array().expect("a List");
    let mut by_product: BTreeMap<String, usize> = BTreeMap::new();
    let mut racks = std::collections::BTreeSet::new();
    for item in items {
        let node: Node = serde_json::from_value(item.clone()).expect("a Node");
        let labels = node.metadata.labels.expect("labels");
        *by_product
            .entry(labels["nvidia.com/gpu.product"].clone())
            .or_default() += 1;
        racks.insert(labels["tessera.dev/fabric.rack"].clone());
        assert!(labels.contains_key("topology.kubernetes.io/zone"));
        assert!(labels.contains_key("tessera.dev/fabric.block"));
    }
    let expected: BTreeMap<String, usize> = [
        ("NVIDIA-H100-80GB-HBM3", 8),
        ("NVIDIA-H800", 8),
        ("NVIDIA-H20", 8),
        ("NVIDIA-L40S", 4),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(by_product, expected);
    assert!(racks.len() >= 2, "{racks:?}");
}
