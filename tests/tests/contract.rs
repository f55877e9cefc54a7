//! The operator-worker contract, across the crates: every worker pod the controller builds for
//! the example deployments carries the environment the worker's `serve` requires, and the
//! worker reads it back to the same layout (tensor- and pipeline-parallel degree, world size,
//! rank, stage, leader).

use std::path::Path;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use tessera_operator::controller::reconcile::{Config, Observed, reconcile};
use tessera_operator::plan_cmd::{load_deployments, read_objects};
use tessera_worker::serve::{ServeConfig, env};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn example_pods() -> Vec<Pod> {
    let nodes: Vec<Node> = read_objects(&root().join("examples/cluster.yaml"))
        .unwrap()
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
    let deployments = load_deployments(&[root().join("examples/deployments")]).unwrap();
    let cfg = Config::default();
    let mut pods: Vec<Pod> = Vec::new();
    for md in &deployments {
        let obs = Observed {
            md,
            pods: &[],
            services: &[],
            routers: &[],
            nodes: &nodes,
            other_pods: &pods.iter().cloned().map(Into::into).collect::<Vec<_>>(),
            reserved: &[],
            now: Timestamp::now(),
        };
        let actions = reconcile(&obs, &cfg);
        pods.extend(actions.apply_pods);
    }
    pods
}

fn env_of(pod: &Pod) -> std::collections::BTreeMap<String, String> {
    pod.spec.as_ref().unwrap().containers[0]
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect()
}

#[test]
fn every_worker_pod_carries_what_serve_requires_and_serve_reads_it_back() {
    let pods = example_pods();
    assert!(pods.len() >= 6, "{}", pods.len());
    let mut read_back = 0;
    let mut pipelined = 0;
    for pod in &pods {
        let name = pod.metadata.name.clone().unwrap();
        let vars = env_of(pod);
        for k in env::REQUIRED.iter().chain(env::REQUIRED_IN_A_GROUP) {
            assert!(vars.contains_key(*k), "{name}: {k} missing");
        }
        let cfg = ServeConfig::from_lookup(|k| vars.get(k).cloned())
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(cfg.tp.to_string(), vars[env::TP], "{name}");
        assert_eq!(cfg.pp.to_string(), vars[env::PP], "{name}");
        if cfg.pp > 1 {
            pipelined += 1;
        }
        // The worker's stage of this pod's ranks (global rank / TP) is the operator's.
        assert_eq!(
            (cfg.rank_offset / cfg.tp).to_string(),
            vars[env::STAGE],
            "{name}"
        );
        let g = cfg.group_config();
        assert_eq!(
            (g.rank, g.world, g.pp),
            (cfg.rank_offset, cfg.world, cfg.pp)
        );
        assert_eq!(cfg.world.to_string(), vars["TESSERA_WORLD_SIZE"], "{name}");
        assert_eq!(
            cfg.rank_offset.to_string(),
            vars[env::RANK_OFFSET],
            "{name}"
        );
        if cfg.world > 1 {
            assert!(
                vars[env::LEADER_ADDRESS].starts_with(&cfg.leader_host),
                "{name}: {} vs {}",
                vars[env::LEADER_ADDRESS],
                cfg.leader_host
            );
        }
        read_back += 1;
    }
    assert!(read_back >= 6, "{read_back}");
    assert!(
        pipelined >= 1,
        "the examples include a pipeline-parallel deployment"
    );
}
