//! Table tests of the planner on the 28-node example cluster (examples/cluster.yaml).

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Node;
use serde_json::{Value, json};
use tessera_operator::api::{ModelDeployment, parse_model_deployment};
use tessera_operator::plan_cmd::{load_deployments, read_objects};
use tessera_operator::planner::catalog::Catalog;
use tessera_operator::planner::inventory::{DEFAULT_TOPOLOGY_KEYS, Inventory};
use tessera_operator::planner::{Plan, PlanOptions, plan};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn nodes() -> Vec<Node> {
    read_objects(&root().join("examples/cluster.yaml"))
        .unwrap()
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect()
}

fn inventory(nodes: &[Node]) -> Inventory {
    let keys: Vec<String> = DEFAULT_TOPOLOGY_KEYS
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    Inventory::from_nodes(nodes, &[], &Catalog::builtin(), &keys)
}

fn example(name: &str) -> Value {
    let v = read_objects(&root().join(format!("examples/deployments/{name}.yaml"))).unwrap();
    v.into_iter().next().unwrap()
}

fn md(v: &Value) -> ModelDeployment {
    parse_model_deployment(v).unwrap()
}

fn run(nodes: &[Node], deps: &[ModelDeployment]) -> Plan {
    plan(&inventory(nodes), deps, &[], &PlanOptions::default())
}

fn node<'a>(nodes: &'a [Node], name: &str) -> &'a Node {
    nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(name))
        .unwrap()
}

fn label(nodes: &[Node], name: &str, key: &str) -> String {
    node(nodes, name).metadata.labels.as_ref().unwrap()[key].clone()
}

#[test]
fn inventory_of_the_example_cluster() {
    let inv = inventory(&nodes());
    assert_eq!(inv.nodes.len(), 28);
    let products: Vec<&str> = inv.types.iter().map(|t| t.product.as_str()).collect();
    assert_eq!(
        products,
        [
            "NVIDIA-H100-80GB-HBM3",
            "NVIDIA-H20",
            "NVIDIA-H800",
            "NVIDIA-L40S"
        ]
    );
    let h800 = inv.nodes.iter().find(|n| n.name == "h800-1").unwrap();
    assert_eq!(h800.domains, vec![8]);
    assert_eq!(h800.nvlink_gbps, 200.0); // measured by the agent
    let h100 = inv.nodes.iter().find(|n| n.name == "h100-1").unwrap();
    assert_eq!(h100.nvlink_gbps, 450.0); // catalog: 900 GB/s bidirectional
    let l40s = inv.nodes.iter().find(|n| n.name == "l40s-1").unwrap();
    assert_eq!(l40s.domains, vec![1, 1, 1, 1]);
    assert!(inv.warnings.is_empty(), "{:?}", inv.warnings);
}

#[test]
fn all_examples_place_sensibly() {
    let n = nodes();
    let deps = load_deployments(&[root().join("examples/deployments")]).unwrap();
    let p = run(&n, &deps);
    let names: Vec<&str> = p.deployments.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names[0], "llama-405b"); // highest priority first
    for d in &p.deployments {
        assert!(d.unplaced.is_empty(), "{}: {:?}", d.name, d.unplaced);
    }
    // 405B: too big for one node, so PP >= 2 across nodes inside one block.
    let r = &p.deployments[0].placed[0];
    assert_eq!(r.tensor_parallel, 8);
    assert!(r.pipeline_parallel >= 2);
    let blocks: std::collections::BTreeSet<String> = r
        .stages
        .iter()
        .map(|s| label(&n, &s.node, "tessera.dev/fabric.block"))
        .collect();
    assert_eq!(blocks.len(), 1);
    let hosts: std::collections::BTreeSet<&str> =
        r.stages.iter().map(|s| s.node.as_str()).collect();
    assert_eq!(hosts.len(), r.pipeline_parallel as usize);
    // 70B: TP=4 on H100, packed onto one node (best fit keeps other nodes whole).
    let d70 = p
        .deployments
        .iter()
        .find(|d| d.name == "llama-70b")
        .unwrap();
    assert!(
        d70.placed
            .iter()
            .all(|r| r.tensor_parallel == 4 && r.pipeline_parallel == 1)
    );
    assert_eq!(d70.placed[0].stages[0].node, d70.placed[1].stages[0].node);
    assert_eq!(d70.choice.alternatives.len(), 2);
}

#[test]
fn h800_cut_nvlink_shows_in_the_prediction() {
    let n = nodes();
    let mut v = example("llama-70b");
    v["spec"]["parallelism"]["tensor"] = json!(8);
    v["spec"]["replicas"] = json!(1);
    v["spec"]["gpu"]["types"] = json!(["H800"]);
    let on_h800 = run(&n, &[md(&v)]);
    v["spec"]["gpu"]["types"] = json!(["H100"]);
    let on_h100 = run(&n, &[md(&v)]);
    let a = &on_h100.deployments[0].placed[0].predicted;
    let b = &on_h800.deployments[0].placed[0].predicted;
    assert_eq!(a.all_reduce_g_bps, 450.0);
    assert_eq!(b.all_reduce_g_bps, 200.0);
    assert!(b.time_to_first_token_seconds > a.time_to_first_token_seconds * 1.1);
}

#[test]
fn pinned_layouts_are_honoured_or_rejected_with_numbers() {
    let n = nodes();
    let mut v = example("llama-70b");
    v["spec"]["parallelism"]["tensor"] = json!(8);
    v["spec"]["gpu"]["types"] = json!(["L40S"]);
    let p = run(&n, &[md(&v)]);
    let u = &p.deployments[0].unplaced;
    assert_eq!(u.len(), 2);
    assert!(
        u[0].reason
            .contains("tensor=8 needs 8 GPUs in one NVLink domain of L40S but the largest is 1"),
        "{}",
        u[0].reason
    );
    // Memory: 70B at TP=1 PP=1 cannot fit an H100.
    v["spec"]["parallelism"] = json!({"tensor": 1, "pipeline": 1});
    v["spec"]["gpu"]["types"] = json!(["H100"]);
    let p = run(&n, &[md(&v)]);
    let r = &p.deployments[0].unplaced[0].reason;
    assert!(
        r.contains("does not fit: needs") && r.contains("GiB per GPU") && r.contains("x 0.9"),
        "{r}"
    );
}

#[test]
fn falls_back_to_the_next_type_and_says_why() {
    let n = nodes();
    let mut v = example("llama-70b");
    v["spec"]["replicas"] = json!(20); // 16 fit on the H100 nodes at TP=4
    v["spec"]["parallelism"] = json!({"tensor": 4, "pipeline": 1});
    let p = run(&n, &[md(&v)]);
    let d = &p.deployments[0];
    assert_eq!(d.placed.len(), 20);
    let fallback: Vec<_> = d.placed.iter().filter(|r| r.note.is_some()).collect();
    assert_eq!(fallback.len(), 4);
    assert!(fallback.iter().all(|r| r.gpu_type == "NVIDIA-H800"));
    let note = fallback[0].note.as_deref().unwrap();
    assert!(
        note.contains("fell back from H100 TP=4 PP=1 to H800 TP=4 PP=1"),
        "{note}"
    );
    assert!(
        note.contains("needs 4 GPUs in one NVLink domain of H100; none is free"),
        "{note}"
    );
    // With fallbacks off (the benchmark's comparison mode) the 4 extra replicas stay unplaced.
    let inv = inventory(&n);
    let opts = PlanOptions {
        first_choice_only: true,
        ..PlanOptions::default()
    };
    let only = plan(&inv, &[md(&v)], &[], &opts);
    assert_eq!(only.deployments[0].placed.len(), 16);
    assert_eq!(only.deployments[0].unplaced.len(), 4);
    assert!(only.deployments[0].placed.iter().all(|r| r.note.is_none()));
    // Past every type: unplaced with numbers.
    v["spec"]["replicas"] = json!(60);
    let p = run(&n, &[md(&v)]);
    let d = &p.deployments[0];
    assert_eq!(d.placed.len(), 48);
    assert!(
        d.unplaced[0]
            .reason
            .contains("needs 4 GPUs in one NVLink domain of H100"),
        "{}",
        d.unplaced[0].reason
    );
}

#[test]
fn cordoned_tainted_and_selected_nodes() {
    let mut n = nodes();
    for name in ["h100-1", "h100-2", "h100-3"] {
        let node = n
            .iter_mut()
            .find(|x| x.metadata.name.as_deref() == Some(name))
            .unwrap();
        node.spec.get_or_insert_default().unschedulable = Some(true);
    }
    for name in ["h100-4", "h100-5"] {
        let node = n
            .iter_mut()
            .find(|x| x.metadata.name.as_deref() == Some(name))
            .unwrap();
        node.spec.get_or_insert_default().taints = Some(vec![
            serde_json::from_value(json!({"key": "team", "value": "a", "effect": "NoSchedule"}))
                .unwrap(),
        ]);
    }
    let mut v = example("llama-70b");
    v["spec"]["replicas"] = json!(8);
    v["spec"]["gpu"]["types"] = json!(["H100"]);
    let p = run(&n, &[md(&v)]);
    let used: std::collections::BTreeSet<&str> = p.deployments[0]
        .placed
        .iter()
        .map(|r| r.stages[0].node.as_str())
        .collect();
    assert_eq!(used, ["h100-6", "h100-7", "h100-8"].into_iter().collect());
    assert_eq!(p.deployments[0].placed.len(), 6);
    // With a toleration the tainted nodes are usable; with a selector only matching ones.
    v["spec"]["placement"]["tolerations"] =
        json!([{"key": "team", "operator": "Equal", "value": "a"}]);
    v["spec"]["placement"]["nodeSelector"] = json!({"tessera.dev/fabric.rack": "rack-2"});
    let p = run(&n, &[md(&v)]);
    assert_eq!(p.deployments[0].placed.len(), 8);
    assert!(p.deployments[0].placed.iter().all(|r| label(
        &n,
        &r.stages[0].node,
        "tessera.dev/fabric.rack"
    ) == "rack-2"));
}

#[test]
fn replan_keeps_existing_and_moves_off_gone_nodes() {
    let n = nodes();
    let deps = load_deployments(&[root().join("examples/deployments")]).unwrap();
    let first = run(&n, &deps);
    let again = plan(
        &inventory(&n),
        &deps,
        &first.existing(),
        &PlanOptions::default(),
    );
    for (a, b) in first.deployments.iter().zip(&again.deployments) {
        for (x, y) in a.placed.iter().zip(&b.placed) {
            assert_eq!(x.stages, y.stages);
            assert!(y.kept);
        }
    }
    // h100-3 is gone: the 70B replicas there move; the 405B stays.
    let fewer: Vec<Node> = n
        .iter()
        .filter(|x| x.metadata.name.as_deref() != Some("h100-3"))
        .cloned()
        .collect();
    let moved = plan(
        &inventory(&fewer),
        &deps,
        &first.existing(),
        &PlanOptions::default(),
    );
    let d70 = moved
        .deployments
        .iter()
        .find(|d| d.name == "llama-70b")
        .unwrap();
    assert_eq!(d70.placed.len(), 2);
    assert!(
        d70.placed
            .iter()
            .all(|r| !r.kept && r.stages[0].node != "h100-3")
    );
    assert!(moved.deployments[0].placed[0].kept);
    assert!(
        moved
            .warnings
            .iter()
            .any(|w| w.contains("node h100-3 is gone"))
    );
}

#[test]
fn unknown_products_get_defaults_and_a_warning() {
    let mut n = nodes();
    let node = n
        .iter_mut()
        .find(|x| x.metadata.name.as_deref() == Some("l40s-1"))
        .unwrap();
    node.metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("nvidia.com/gpu.product".into(), "Tesla-T4".into());
    let mut v = example("smollm2-135m");
    v["spec"]["gpu"]["types"] = json!([]);
    let p = run(&n, &[md(&v)]);
    assert!(
        p.warnings
            .iter()
            .any(|w| w.contains("Tesla-T4") && w.contains("not in the catalog"))
    );
    assert_eq!(p.deployments[0].placed.len(), 2);
}

/// Llama 3.1 70B in FP8 pinned to TP=4 on the example's L40S nodes (4 PCIe GPUs each), with
/// the placement scope left to its default or set.
fn llama_70b_on_l40s(scope: Option<&str>) -> ModelDeployment {
    let mut v = json!({
        "apiVersion": "tessera.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "llama-70b-l40s", "namespace": "inference"},
        "spec": {
            "replicas": 1,
            "model": {"uri": "pvc://models/llama-3.1-70b-fp8", "architecture": {
                "parameters": 70553706496i64, "layers": 80, "hiddenSize": 8192,
                "attentionHeads": 64, "kvHeads": 8, "intermediateSize": 28672,
                "vocabSize": 128256, "contextLength": 131072, "bytesPerParameter": 1}},
            "parallelism": {"tensor": 4, "pipeline": 1},
            "gpu": {"types": ["L40S"]},
            "serving": {"maxConcurrency": 8, "contextLength": 4096}
        }
    });
    if let Some(s) = scope {
        v["spec"]["placement"] = json!({"tensorParallelScope": s});
    }
    md(&v)
}

#[test]
fn tensor_parallel_on_pcie_gpus_is_placed_by_default_and_refused_for_nvlink_domain() {
    let nodes = nodes();
    let p = run(&nodes, &[llama_70b_on_l40s(None)]);
    let d = &p.deployments[0];
    assert_eq!(d.placed.len(), 1, "{:?}", d.unplaced);
    let r = &d.placed[0];
    assert_eq!((r.tensor_parallel, r.pipeline_parallel), (4, 1));
    assert_eq!(r.stages.len(), 1, "one node: {:?}", r.stages);
    assert!(r.stages[0].node.starts_with("l40s-"), "{:?}", r.stages);
    // The prediction uses the PCIe link the group actually gets (32 GB/s per direction, of
    // which a ring over PCIe achieves the documented fraction).
    let pcie =
        32.0 * tessera_operator::planner::cost::CostConstants::default().pcie_allreduce_efficiency;
    assert!(
        (r.predicted.all_reduce_g_bps - pcie).abs() < 1e-6,
        "{:?}",
        r.predicted
    );
    // An explicit NVLinkDomain still means NVLink: L40S has none.
    let p = run(&nodes, &[llama_70b_on_l40s(Some("NVLinkDomain"))]);
    let d = &p.deployments[0];
    assert!(d.placed.is_empty());
    assert!(
        d.choice
            .reason
            .contains("NVLink domain of L40S but the largest is 1"),
        "{}",
        d.choice.reason
    );
}

/// A plan of the llama-70b example with these measured decode ratios (measured / predicted)
/// for H100 at TP=4: the chosen layout.
fn chosen_with(decode_ratios: &[f64]) -> (String, u32, u32) {
    use tessera_operator::planner::calibration::{Calibration, LayoutKey, Measurement};
    let mut calibration = Calibration::default();
    let key = LayoutKey {
        gpu_type: "H100".into(),
        tensor_parallel: 4,
        pipeline_parallel: 1,
        engine: "tessera".into(),
    };
    for r in decode_ratios {
        calibration.observe(
            &key,
            Measurement {
                predicted_decode_tokens_per_second: 1000.0,
                measured_decode_tokens_per_second: Some(1000.0 * r),
                predicted_time_to_first_token_seconds: 0.5,
                measured_time_to_first_token_seconds: None,
                predicted_allreduce_seconds: 0.0,
                measured_allreduce_seconds: None,
            },
        );
    }
    let mut opts = PlanOptions::default();
    opts.constants.calibration = calibration;
    let nodes = nodes();
    let p = plan(&inventory(&nodes), &[md(&example("llama-70b"))], &[], &opts);
    let c = p.deployments[0].choice.chosen.as_ref().expect("a layout");
    (
        c.gpu_type.clone(),
        c.tensor_parallel as u32,
        c.pipeline_parallel as u32,
    )
}

#[test]
fn a_layout_measured_slower_than_predicted_loses_its_place_but_noise_does_not_move_it() {
    // Uncalibrated: H100 TP=4 (TP=8 is 28% behind per GPU).
    let (gpu, tp, _) = chosen_with(&[]);
    assert!(gpu.contains("H100") && tp == 4, "{gpu} TP={tp}");
    // The fleet measures H100 TP=4 30% below the prediction: TP=8 now serves more per GPU.
    let (gpu, tp, pp) = chosen_with(&[0.7, 0.71, 0.69, 0.7]);
    assert!(
        gpu.contains("H100") && (tp, pp) != (4, 1),
        "{gpu} TP={tp} PP={pp}"
    );
    // Noise and one outlier (a scrape during a restart) leave the choice alone...
    assert_eq!(chosen_with(&[1.02, 0.97, 0.3, 1.0, 0.99]).1, 4);
    // ...and so does a single sample.
    assert_eq!(chosen_with(&[0.5]).1, 4);
}
