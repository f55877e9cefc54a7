//! Planner invariants under proptest: random small clusters (GPU types, NVLink domains, racks and
//! blocks, GPUs in use, cordons and taints) and random deployments.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Node, Pod};
use proptest::prelude::*;
use serde_json::json;
use tessera_operator::api::{ModelDeployment, TensorParallelScope, parse_model_deployment};
use tessera_operator::planner::catalog::Catalog;
use tessera_operator::planner::choose::{self, valid_tp};
use tessera_operator::planner::cost::{CostConstants, Layout, estimate_layout};
use tessera_operator::planner::inventory::{DEFAULT_TOPOLOGY_KEYS, Eligibility, Inventory};
use tessera_operator::planner::{Plan, PlanOptions, plan};

#[derive(Clone, Debug)]
struct NodeGen {
    product: &'static str,
    gpus: u32,
    split: bool,
    used: u32,
    rack: u8,
    block: u8,
    cordoned: bool,
    tainted: bool,
}

fn node_gen() -> impl Strategy<Value = NodeGen> {
    (
        prop::sample::select(vec![
            "NVIDIA-H100-80GB-HBM3",
            "NVIDIA-H800",
            "NVIDIA-L40S",
            "NVIDIA-H20",
        ]),
        prop::sample::select(vec![1u32, 2, 4, 8]),
        any::<bool>(),
        0u32..9,
        0u8..3,
        0u8..2,
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.15),
    )
        .prop_map(
            |(product, gpus, split, used, rack, block, cordoned, tainted)| NodeGen {
                product,
                gpus,
                split: split && gpus >= 4,
                used: used.min(gpus),
                rack,
                block,
                cordoned,
                tainted,
            },
        )
}

fn build_nodes(gens: &[NodeGen]) -> (Vec<Node>, Vec<Pod>) {
    let mut nodes = Vec::new();
    let mut pods = Vec::new();
    for (i, g) in gens.iter().enumerate() {
        let name = format!("n{i}");
        let mut labels = json!({
            "nvidia.com/gpu.product": g.product,
            "nvidia.com/gpu.count": g.gpus.to_string(),
            "topology.kubernetes.io/zone": "z",
            "tessera.dev/fabric.block": format!("b{}", g.block),
            "tessera.dev/fabric.rack": format!("b{}-r{}", g.block, g.rack),
        });
        if g.split {
            labels["tessera.dev/nvlink.domains"] = json!(format!(
                "0-{}.{}-{}",
                g.gpus / 2 - 1,
                g.gpus / 2,
                g.gpus - 1
            ));
        }
        let mut spec = json!({});
        if g.cordoned {
            spec["unschedulable"] = json!(true);
        }
        if g.tainted {
            spec["taints"] = json!([{"key": "dedicated", "value": "x", "effect": "NoSchedule"}]);
        }
        nodes.push(
            serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": labels},
                "spec": spec,
                "status": {"allocatable": {"nvidia.com/gpu": g.gpus.to_string()},
                           "conditions": [{"type": "Ready", "status": "True"}]}
            }))
            .unwrap(),
        );
        if g.used > 0 {
            pods.push(
                serde_json::from_value(json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": format!("p{i}"), "namespace": "x"},
                    "spec": {"nodeName": name, "containers": [{"name": "c",
                        "resources": {"limits": {"nvidia.com/gpu": g.used.to_string()}}}]},
                    "status": {"phase": "Running"}
                }))
                .unwrap(),
            );
        }
    }
    (nodes, pods)
}

#[derive(Clone, Debug)]
struct DepGen {
    shape: usize,
    replicas: i32,
    priority: i32,
    tp: Option<u32>,
    pp: Option<u32>,
    scope: usize,
    types: Vec<&'static str>,
    concurrency: i32,
    context: i32,
    tolerate: bool,
    block_key: bool,
    moe: u8,
    experts: u32,
}

/// (parameters, layers, hidden, heads, kv heads)
const SHAPES: [(i64, i32, i32, i32, i32); 5] = [
    (1_000_000_000, 16, 2048, 16, 4),
    (8_000_000_000, 32, 4096, 32, 8),
    (70_000_000_000, 80, 8192, 64, 8),
    (180_000_000_000, 80, 12288, 96, 8),
    (30_000_000_000, 48, 6144, 48, 48),
];

fn dep_gen() -> impl Strategy<Value = DepGen> {
    (
        0usize..SHAPES.len(),
        0i32..4,
        -2i32..3,
        prop::option::weighted(0.2, prop::sample::select(vec![1u32, 2, 4, 8])),
        prop::option::weighted(0.2, 1u32..4),
        0usize..4,
        prop::sample::subsequence(vec!["H100", "H800", "L40S", "H20"], 0..=3),
        prop::sample::select(vec![1i32, 8, 32]),
        prop::sample::select(vec![2048i32, 8192]),
        any::<bool>(),
        prop::bool::weighted(0.3),
        // 0: dense; 1: a mixture of experts on the tessera engine; 2: on vLLM.
        (
            prop::sample::select(vec![0u8, 0, 0, 0, 1, 2, 2]),
            prop::sample::select(vec![4u32, 8, 16, 64]),
        ),
    )
        .prop_map(
            |(
                shape,
                replicas,
                priority,
                tp,
                pp,
                scope,
                types,
                concurrency,
                context,
                tolerate,
                block_key,
                (moe, experts),
            )| DepGen {
                shape,
                replicas,
                priority,
                tp,
                pp,
                scope,
                types,
                concurrency,
                context,
                tolerate,
                block_key,
                moe,
                experts,
            },
        )
}

fn build_dep(i: usize, d: &DepGen) -> Option<ModelDeployment> {
    let (params, layers, hidden, heads, kv) = SHAPES[d.shape];
    let scope = ["NVLinkDomain", "Node", "Any", "Auto"][d.scope];
    let mut spec = json!({
        "replicas": d.replicas,
        "priority": d.priority,
        "model": {"uri": "pvc://m/x", "architecture": {
            "parameters": params, "layers": layers, "hiddenSize": hidden,
            "attentionHeads": heads, "kvHeads": kv, "intermediateSize": hidden * 3,
            "vocabSize": 32000, "contextLength": 8192, "bytesPerParameter": 2}},
        "parallelism": {
            "tensor": d.tp.map_or(json!("auto"), |t| json!(t)),
            "pipeline": d.pp.map_or(json!("auto"), |p| json!(p)),
        },
        "gpu": {"types": d.types},
        "placement": {"tensorParallelScope": scope},
        "serving": {"maxConcurrency": d.concurrency, "contextLength": d.context},
    });
    if d.tolerate {
        spec["placement"]["tolerations"] = json!([{"key": "dedicated", "operator": "Exists"}]);
    }
    if d.block_key {
        spec["placement"]["pipelineTopologyKey"] = json!("tessera.dev/fabric.block");
    }
    if d.moe > 0 {
        // Routed experts hold about 80% of the parameters.
        let (params, layers, hidden, ..) = SHAPES[d.shape];
        let width = (0.8 * params as f64
            / (f64::from(layers) * f64::from(d.experts) * 3.0 * f64::from(hidden)))
            as i64;
        let arch = &mut spec["model"]["architecture"];
        arch["experts"] = json!(d.experts);
        arch["expertsPerToken"] = json!(2);
        arch["expertIntermediateSize"] = json!(width.max(1));
        if d.moe == 2 {
            spec["engine"] = json!({"name": "vllm"});
        }
    }
    // Pinned values the CEL rules reject are skipped (the API server would refuse them).
    parse_model_deployment(&json!({
        "apiVersion": "tessera.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": format!("d{i}"), "namespace": "ns"},
        "spec": spec,
    }))
    .ok()
}

fn keys() -> Vec<String> {
    DEFAULT_TOPOLOGY_KEYS
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
}

/// Can TP groups of the given sizes be packed into domains with the given free GPUs?
fn packs(groups: &mut Vec<u32>, free: &mut [u32]) -> bool {
    let Some(g) = groups.pop() else { return true };
    for i in 0..free.len() {
        if free[i] >= g {
            free[i] -= g;
            if packs(groups, free) {
                free[i] += g;
                groups.push(g);
                return true;
            }
            free[i] += g;
        }
    }
    groups.push(g);
    false
}

fn check_invariants(
    inv: &Inventory,
    deps: &[ModelDeployment],
    p: &Plan,
) -> Result<(), TestCaseError> {
    let by_name: BTreeMap<String, &ModelDeployment> = deps
        .iter()
        .map(|d| (d.metadata.name.clone().unwrap(), d))
        .collect();
    let mut used: BTreeMap<String, u32> = BTreeMap::new();
    let mut domain_groups: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for d in &p.deployments {
        let md = by_name[&d.name];
        let scope = md.spec.placement.tensor_parallel_scope;
        let elig = Eligibility::compute(inv, &md.spec.placement);
        let stats = choose::type_stats(inv, &elig);
        let ranks = choose::type_ranks(inv, &md.spec);
        let c = CostConstants::default();
        let index: BTreeMap<&str, usize> = inv
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.as_str(), i))
            .collect();
        // Gangs whole or absent: every replica exactly once, placed or unplaced.
        let mut seen = BTreeSet::new();
        for r in &d.placed {
            prop_assert!(seen.insert(r.replica));
        }
        for u in &d.unplaced {
            prop_assert!(seen.insert(u.replica));
            prop_assert!(!u.reason.is_empty());
        }
        prop_assert_eq!(seen, (0..md.spec.replicas).collect::<BTreeSet<_>>());
        for r in &d.placed {
            let (tp, pp) = (r.tensor_parallel as u32, r.pipeline_parallel as u32);
            let layout = Layout {
                tp,
                pp,
                ep: r.expert_parallel.unwrap_or(1) as u32,
                data_attention: r.data_parallel_attention,
            };
            let arch = &md.spec.model.architecture;
            // Expert parallelism only for MoE, over a stage's GPUs, dividing the experts;
            // data-parallel attention only with it and never on the tessera engine.
            if let Some(ep) = r.expert_parallel {
                prop_assert!(arch.is_moe() && ep as u32 == tp && ep > 1, "{:?}", r);
                prop_assert_eq!(arch.experts.unwrap() % ep, 0);
            }
            prop_assert!(!r.data_parallel_attention || r.expert_parallel.is_some());
            if md.spec.engine.name == tessera_operator::api::EngineName::Tessera {
                prop_assert!(!r.data_parallel_attention);
                if arch.is_moe() && tp > 1 {
                    prop_assert_eq!(r.expert_parallel, Some(tp as i32));
                }
            }
            if let Some(t) = md.spec.parallelism.tensor.fixed() {
                prop_assert_eq!(tp, t);
            }
            if let Some(x) = md.spec.parallelism.pipeline.fixed() {
                prop_assert_eq!(pp, x);
            }
            let mut per_stage = vec![0u32; pp as usize];
            let mut nodes_per_stage = vec![BTreeSet::new(); pp as usize];
            for s in &r.stages {
                per_stage[s.stage as usize] += s.gpus as u32;
                nodes_per_stage[s.stage as usize].insert(s.node.clone());
                *used.entry(s.node.clone()).or_insert(0) += s.gpus as u32;
                let node = inv.nodes.iter().find(|n| n.name == s.node).unwrap();
                prop_assert_eq!(&inv.types[node.gpu_type].product, &r.gpu_type);
                // Only on nodes the deployment may use (cordons, taints, selector)...
                prop_assert!(elig.ok[index[s.node.as_str()]], "{} not eligible", s.node);
                // ...of a GPU type its spec allows.
                prop_assert!(ranks[node.gpu_type].is_some(), "{} not allowed", r.gpu_type);
            }
            // The layout fits in memory by the cost model.
            let t = inv
                .types
                .iter()
                .position(|t| t.product == r.gpu_type)
                .unwrap();
            let st = &stats[t];
            // `Auto` is the NVLink domain on NVLink GPUs and the node on PCIe-only ones.
            let scope = scope.resolve(inv.types[t].model.nvlink_bidirectional_gbps > 0.0);
            let links = choose::nominal_links(inv, t, st, tp, pp, &c);
            let e = estimate_layout(
                &md.spec.model.architecture,
                choose::workload(&md.spec),
                &inv.types[t].model,
                layout,
                links,
                &c,
            );
            prop_assert!(e.fits, "{:?} does not fit: {:?}", r, e);
            // Each replica's GPUs add up to TP x PP, TP per stage.
            prop_assert!(per_stage.iter().all(|&g| g == tp), "{:?}", r);
            for (st, ns) in nodes_per_stage.iter().enumerate() {
                // An expert-parallel group with data-parallel attention may span nodes.
                if scope != TensorParallelScope::Any && !r.data_parallel_attention {
                    prop_assert_eq!(ns.len(), 1, "stage {} spans nodes: {:?}", st, r);
                }
            }
            if scope == TensorParallelScope::NvLinkDomain && !r.data_parallel_attention {
                for s in &r.stages {
                    domain_groups
                        .entry(s.node.clone())
                        .or_default()
                        .push(s.gpus as u32);
                }
            }
            if let Some(k) = &md.spec.placement.pipeline_topology_key
                && pp > 1
            {
                let vals: BTreeSet<Option<&String>> = r
                    .stages
                    .iter()
                    .map(|s| {
                        inv.nodes
                            .iter()
                            .find(|n| n.name == s.node)
                            .unwrap()
                            .labels
                            .get(k)
                    })
                    .collect();
                prop_assert_eq!(vals.len(), 1);
            }
        }
    }
    // No GPU promised twice.
    for n in &inv.nodes {
        let u = used.get(&n.name).copied().unwrap_or(0);
        prop_assert!(
            u <= n.free_total(),
            "node {} promised {} of {} free",
            n.name,
            u,
            n.free_total()
        );
        // TP groups that must stay in one NVLink domain fit the node's domains.
        if let Some(groups) = domain_groups.get(&n.name) {
            let mut gs = groups.clone();
            gs.sort_unstable();
            let mut free = n.free.clone();
            prop_assert!(
                packs(&mut gs, &mut free),
                "node {}: groups {:?} vs domains {:?}",
                n.name,
                groups,
                n.free
            );
        }
    }
    Ok(())
}

fn setup(nodes: &[NodeGen], deps: &[DepGen]) -> (Inventory, Vec<ModelDeployment>) {
    let (n, p) = build_nodes(nodes);
    let inv = Inventory::from_nodes(&n, &p, &Catalog::builtin(), &keys());
    let mds = deps
        .iter()
        .enumerate()
        .filter_map(|(i, d)| build_dep(i, d))
        .collect();
    (inv, mds)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold(nodes in prop::collection::vec(node_gen(), 1..9), deps in prop::collection::vec(dep_gen(), 1..5)) {
        let (inv, mds) = setup(&nodes, &deps);
        let opts = PlanOptions::default();
        let p = plan(&inv, &mds, &[], &opts);
        check_invariants(&inv, &mds, &p)?;

        // Same input, same plan; node and deployment order do not matter.
        let again = plan(&inv, &mds, &[], &opts);
        prop_assert_eq!(&p, &again);
        let (mut n, pods) = build_nodes(&nodes);
        n.reverse();
        let inv_rev = Inventory::from_nodes(&n, &pods, &Catalog::builtin(), &keys());
        let mut rev = mds.clone();
        rev.reverse();
        prop_assert_eq!(&p, &plan(&inv_rev, &rev, &[], &opts));

        // Re-planning with the previous plan as existing placements keeps every replica.
        let replanned = plan(&inv, &mds, &p.existing(), &opts);
        check_invariants(&inv, &mds, &replanned)?;
        for (a, b) in p.deployments.iter().zip(&replanned.deployments) {
            prop_assert_eq!(a.placed.len() <= b.placed.len(), true);
            for r in &a.placed {
                let kept = b.placed.iter().find(|x| x.replica == r.replica).unwrap();
                prop_assert!(kept.kept);
                prop_assert_eq!(&kept.stages, &r.stages);
                prop_assert_eq!(&kept.gpu_type, &r.gpu_type);
            }
        }
    }

    #[test]
    fn choice_is_optimal_on_its_type(nodes in prop::collection::vec(node_gen(), 1..7), dep in dep_gen()) {
        let (inv, mds) = setup(&nodes, &[dep]);
        let c = CostConstants::default();
        for md in &mds {
            let elig = Eligibility::compute(&inv, &md.spec.placement);
            let stats = choose::type_stats(&inv, &elig);
            let choice = choose::choose(&md.spec, &inv, &stats, &elig, &c);
            let Some(best) = choice.candidates.first() else { continue };
            let t = best.gpu_type;
            let st = &stats[t];
            let arch = &md.spec.model.architecture;
            let scope = md
                .spec
                .placement
                .tensor_parallel_scope
                .resolve(inv.types[t].model.nvlink_bidirectional_gbps > 0.0);
            let max_tp = match scope {
                TensorParallelScope::NvLinkDomain => st.largest_domain,
                TensorParallelScope::Node => st.largest_node,
                TensorParallelScope::Any | TensorParallelScope::Auto => st.gpus,
            };
            let work = choose::workload(&md.spec);
            // Exhaustive enumeration of every layout on the chosen GPU type: the stage splits
            // the model and engine allow (dense: TP by the head rules), each with every PP.
            for (tp, ep, data_attention) in choose::stage_splits(&md.spec) {
                if !arch.is_moe() {
                    prop_assert!(valid_tp(arch.attention_heads as u32, arch.kv_heads as u32, tp));
                    prop_assert_eq!((ep, data_attention), (1, false));
                }
                if tp > max_tp && !(data_attention && tp <= st.gpus) {
                    continue;
                }
                for pp in 1..=arch.layers as u32 {
                    if tp * pp > 64 || tp * pp > st.gpus {
                        break;
                    }
                    if md.spec.parallelism.pipeline.fixed().is_some_and(|x| x != pp) {
                        continue;
                    }
                    // vLLM runs data-parallel attention with one stage only.
                    if data_attention
                        && pp > 1
                        && md.spec.engine.name == tessera_operator::api::EngineName::Vllm
                    {
                        continue;
                    }
                    let links = choose::nominal_links(&inv, t, st, tp, pp, &c);
                    let layout = Layout { tp, pp, ep, data_attention };
                    let e = estimate_layout(arch, work, &inv.types[t].model, layout, links, &c);
                    if e.fits {
                        let other = e.per_gpu(tp * pp);
                        prop_assert!(other <= best.per_gpu() * (1.0 + 1e-9),
                            "{} gives {} per GPU, chosen {} gives {}", layout.label(), other, best.layout().label(), best.per_gpu());
                    }
                }
            }
        }
    }
}
