//! Planner benchmarks (docs/benchmarks.md, section "Planner"):
//! - full plan of 1,000 ModelDeployments (about 4,000 replicas) on 10,000 nodes / 80,000 GPUs;
//! - re-plan of one deployment in a full cluster (the others' GPUs in use).
//!
//! Run: `cargo bench -p tessera-operator --bench planner`

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use k8s_openapi::api::core::v1::Pod;
use serde_json::json;
use tessera_operator::planner::catalog::Catalog;
use tessera_operator::planner::inventory::{DEFAULT_TOPOLOGY_KEYS, Inventory};
use tessera_operator::planner::{ExistingPlacement, PlanOptions, plan, synthetic};

fn keys() -> Vec<String> {
    DEFAULT_TOPOLOGY_KEYS
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
}

fn bench(c: &mut Criterion) {
    let nodes = synthetic::cluster(10_000);
    let fleet = synthetic::fleet(1_000, 7);
    let inv = Inventory::from_nodes(&nodes, &[], &Catalog::builtin(), &keys());
    let opts = PlanOptions::default();
    let full = plan(&inv, &fleet, &[], &opts);
    let replicas: i32 = fleet.iter().map(|d| d.spec.replicas).sum();
    let placed: usize = full.deployments.iter().map(|d| d.placed.len()).sum();
    let gpus: i32 = full
        .deployments
        .iter()
        .flat_map(|d| &d.placed)
        .map(|r| r.tensor_parallel * r.pipeline_parallel)
        .sum();
    eprintln!(
        "fleet: {} deployments, {replicas} replicas, {placed} placed on {gpus} of {} GPUs",
        fleet.len(),
        inv.nodes.iter().map(|n| n.allocatable).sum::<u32>()
    );

    let mut g = c.benchmark_group("planner");
    g.sample_size(10).measurement_time(Duration::from_secs(15));
    g.bench_function("inventory_10k_nodes", |b| {
        b.iter(|| Inventory::from_nodes(black_box(&nodes), &[], &Catalog::builtin(), &keys()))
    });
    g.bench_function("full_plan_1000_deployments_10k_nodes", |b| {
        b.iter(|| plan(black_box(&inv), black_box(&fleet), &[], &opts))
    });
    // The same fleet with every fifth deployment a mixture of experts (Mixtral 8x7B,
    // Qwen3-235B-A22B, DeepSeek-V3 in turn), expert parallelism left to the planner.
    let moe_fleet = synthetic::fleet_with_moe(1_000, 7, 5);
    let moe_plan = plan(&inv, &moe_fleet, &[], &opts);
    let ep: usize = moe_plan
        .deployments
        .iter()
        .flat_map(|d| &d.placed)
        .filter(|r| r.expert_parallel.is_some())
        .count();
    eprintln!(
        "MoE fleet: {} of {} replicas placed, {ep} expert-parallel",
        moe_plan
            .deployments
            .iter()
            .map(|d| d.placed.len())
            .sum::<usize>(),
        moe_fleet.iter().map(|d| d.spec.replicas).sum::<i32>()
    );
    g.bench_function("full_plan_1000_deployments_200_moe_10k_nodes", |b| {
        b.iter(|| plan(black_box(&inv), black_box(&moe_fleet), &[], &opts))
    });
    let existing = full.existing();
    g.bench_function("replan_all_with_existing_10k_nodes", |b| {
        b.iter(|| {
            plan(
                black_box(&inv),
                black_box(&fleet),
                black_box(&existing),
                &opts,
            )
        })
    });
    g.finish();

    // Re-plan one deployment: every other deployment's GPUs are in use (as pods).
    let pick = full
        .deployments
        .iter()
        .find(|d| d.name.ends_with("-70b") && d.placed.len() >= 2)
        .expect("a placed 70b deployment");
    let mut pods = Vec::new();
    for d in &full.deployments {
        if d.name == pick.name && d.namespace == pick.namespace {
            continue;
        }
        for r in &d.placed {
            for s in &r.stages {
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": format!("{}-r{}-s{}", d.name, r.replica, s.stage), "namespace": d.namespace},
                    "spec": {"nodeName": s.node, "containers": [{"name": "w",
                        "resources": {"limits": {"nvidia.com/gpu": s.gpus.to_string()}}}]},
                    "status": {"phase": "Running"}
                }))
                .unwrap();
                pods.push(pod);
            }
        }
    }
    let busy = Inventory::from_nodes(&nodes, &pods, &Catalog::builtin(), &keys());
    let one: Vec<_> = fleet
        .iter()
        .filter(|d| d.metadata.name.as_deref() == Some(pick.name.as_str()))
        .cloned()
        .collect();
    let mine: Vec<ExistingPlacement> = existing
        .iter()
        .filter(|e| e.name == pick.name && e.namespace == pick.namespace)
        .cloned()
        .collect();
    let mut g = c.benchmark_group("planner_replan");
    g.sample_size(50);
    g.bench_function("replan_one_deployment_full_cluster", |b| {
        b.iter(|| plan(black_box(&busy), black_box(&one), black_box(&mine), &opts))
    });
    g.bench_function("plan_one_new_deployment_full_cluster", |b| {
        b.iter(|| plan(black_box(&busy), black_box(&one), &[], &opts))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
