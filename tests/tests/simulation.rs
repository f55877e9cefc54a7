//! A deterministic, seeded cluster simulation that drives the real reconcile code
//! (`tessera_operator::controller::reconcile`) through faults: member crashes, node loss, a
//! cordon, scale changes, operator restarts and two deployments competing for GPUs.
//!
//! The simulated cluster has an API store (pods with owner references, ModelDeployments with
//! status), a scheduler that honours required node affinity and GPU counts, a kubelet that
//! starts pods (Running after a pull, Ready after model load) and garbage collection by owner.
//! After every step it checks DESIGN.md's invariants; recovery times are printed
//! (`cargo test -p tessera-tests simulation -- --nocapture`).
//!
//! Run all of them with `cargo test --workspace simulation`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, NodeCondition, Pod, PodCondition, PodStatus, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::json;
use tessera_operator::api::{ModelDeployment, Phase, parse_model_deployment};
use tessera_operator::build::labels;
use tessera_operator::controller::reconcile::{
    Actions, Config, Observed, reconcile, reserved_by_others,
};
use tessera_tests::Rng;

const STEP: i64 = 5; // simulated seconds per round
const PULL_SECONDS: i64 = 10; // bound -> Running
const LOAD_SECONDS: i64 = 20; // Running -> Ready

fn node(name: &str, product: &str, gpus: u32, rack: &str) -> Node {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name,
            "nvidia.com/gpu.product": product,
            "nvidia.com/gpu.count": gpus.to_string(),
            "nvidia.com/gpu.memory": "81559",
            "topology.kubernetes.io/zone": "zone-a",
            "tessera.dev/fabric.block": "block-1",
            "tessera.dev/fabric.rack": rack
        }},
        "spec": {},
        "status": {
            "allocatable": {"nvidia.com/gpu": gpus.to_string(), "cpu": "192", "memory": "2000Gi"},
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    }))
    .expect("node")
}

/// Llama 3.1 8B in BF16, pinned to TP=2, on H100s.
fn deployment(name: &str, replicas: i32, priority: i32, tp: u32) -> ModelDeployment {
    let mut md = parse_model_deployment(&json!({
        "apiVersion": "tessera.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": "inference"},
        "spec": {
            "replicas": replicas,
            "priority": priority,
            "model": {"uri": "pvc://models/llama-8b", "architecture": {
                "parameters": 8030261248i64, "layers": 32, "hiddenSize": 4096,
                "attentionHeads": 32, "kvHeads": 8, "intermediateSize": 14336,
                "vocabSize": 128256, "contextLength": 131072, "bytesPerParameter": 2}},
            "parallelism": {"tensor": tp, "pipeline": 1},
            "gpu": {"types": ["H100"]},
            "serving": {"maxConcurrency": 16, "contextLength": 8192},
            "failurePolicy": {"maxRestarts": 3, "backoffSeconds": 10}
        }
    }))
    .expect("valid deployment");
    md.metadata.uid = Some(format!("uid-{name}"));
    md.metadata.generation = Some(1);
    md
}

struct Sim {
    now: Timestamp,
    round: u64,
    nodes: Vec<Node>,
    deployments: Vec<ModelDeployment>,
    pods: BTreeMap<String, Pod>,
    services: BTreeMap<String, Service>,
    /// Router Deployments of prefill/decode pools.
    routers: BTreeMap<String, Deployment>,
    /// When each pod was bound.
    bound_at: BTreeMap<String, Timestamp>,
    cfg: Config,
    writes: usize,
    log: Vec<String>,
}

impl Sim {
    fn new(nodes: Vec<Node>, deployments: Vec<ModelDeployment>) -> Self {
        let cfg = Config {
            node_lost_grace: Duration::from_secs(60),
            gang_timeout: Duration::from_secs(60),
            ..Config::default()
        };
        Sim {
            now: "2026-01-01T00:00:00Z".parse().expect("time"),
            round: 0,
            nodes,
            deployments,
            pods: BTreeMap::new(),
            services: BTreeMap::new(),
            routers: BTreeMap::new(),
            bound_at: BTreeMap::new(),
            cfg,
            writes: 0,
            log: Vec::new(),
        }
    }

    fn deployment_owner(d: &Deployment) -> Option<String> {
        d.metadata
            .owner_references
            .as_ref()
            .and_then(|o| o.iter().find(|o| o.controller == Some(true)))
            .map(|o| o.uid.clone())
    }

    fn owner_uid(p: &Pod) -> Option<String> {
        p.metadata
            .owner_references
            .as_ref()
            .and_then(|o| o.iter().find(|o| o.controller == Some(true)))
            .map(|o| o.uid.clone())
    }

    /// One reconcile of every deployment (priority order), applying the actions. Returns the
    /// number of writes.
    fn reconcile_all(&mut self) -> usize {
        let mut order: Vec<usize> = (0..self.deployments.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(self.deployments[i].spec.priority));
        let mut writes = 0;
        for i in order {
            let md = self.deployments[i].clone();
            let uid = md.metadata.uid.clone();
            let (own, other): (Vec<Pod>, Vec<Pod>) = self
                .pods
                .values()
                .cloned()
                .partition(|p| Self::owner_uid(p) == uid);
            let services: Vec<Service> = self
                .services
                .values()
                .filter(|s| {
                    s.metadata
                        .owner_references
                        .as_ref()
                        .and_then(|o| o.first())
                        .map(|o| &o.uid)
                        == uid.as_ref()
                })
                .cloned()
                .collect();
            let routers: Vec<Deployment> = self
                .routers
                .values()
                .filter(|d| Self::deployment_owner(d) == uid)
                .cloned()
                .collect();
            let reserved = reserved_by_others(&self.deployments, uid.as_deref(), &other);
            let obs = Observed {
                md: &md,
                reserved: &reserved,
                pods: &own,
                services: &services,
                routers: &routers,
                nodes: &self.nodes,
                other_pods: &other.into_iter().map(Into::into).collect::<Vec<_>>(),
                now: self.now,
            };
            let actions = reconcile(&obs, &self.cfg);
            writes += actions.writes();
            self.apply(i, actions);
        }
        self.writes += writes;
        writes
    }

    fn apply(&mut self, i: usize, a: Actions) {
        for e in &a.events {
            self.log.push(format!(
                "t={} {} {}: {}",
                self.t(),
                self.deployments[i].metadata.name.as_deref().unwrap_or(""),
                e.reason,
                e.note
            ));
        }
        for name in a.delete_pods {
            self.pods.remove(&name);
            self.bound_at.remove(&name);
        }
        for mut p in a.apply_pods {
            let name = p.metadata.name.clone().expect("name");
            assert!(
                !self.pods.contains_key(&name),
                "create of an existing pod {name}"
            );
            p.status = Some(PodStatus {
                phase: Some("Pending".into()),
                ..PodStatus::default()
            });
            self.pods.insert(name, p);
        }
        for s in a.apply_services {
            self.services
                .insert(s.metadata.name.clone().expect("name"), s);
        }
        if let Some(r) = a.apply_router {
            self.routers
                .insert(r.metadata.name.clone().expect("name"), r);
        }
        for name in a.delete_routers {
            self.routers.remove(&name);
        }
        if let Some(s) = a.status {
            self.deployments[i].status = Some(s);
        }
    }

    fn t(&self) -> i64 {
        let start: Timestamp = "2026-01-01T00:00:00Z".parse().expect("time");
        self.now.duration_since(start).as_secs()
    }

    fn node_ready(&self, name: &str) -> bool {
        self.nodes.iter().any(|n| {
            n.metadata.name.as_deref() == Some(name)
                && n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
    }

    fn gpus(p: &Pod) -> u32 {
        p.spec.as_ref().expect("spec").containers[0]
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("nvidia.com/gpu"))
            .map_or(0, |q| q.0.parse().expect("gpu count"))
    }

    fn is_foreign(p: &Pod) -> bool {
        p.metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key("foreign"))
    }

    /// Where a pod is (bound) or will be (pinned).
    fn target_node(p: &Pod) -> String {
        p.spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_else(|| Self::pinned_node(p))
    }

    fn pinned_node(p: &Pod) -> String {
        tessera_operator::controller::reconcile::pinned_node(p)
            .expect("worker pods are pinned to a node")
            .to_owned()
    }

    /// Scheduler: bind pending pods whose pinned node is Ready, schedulable and has the GPUs.
    fn schedule(&mut self) {
        let mut used: BTreeMap<String, u32> = BTreeMap::new();
        for p in self.pods.values() {
            if let Some(n) = p.spec.as_ref().and_then(|s| s.node_name.clone()) {
                *used.entry(n).or_default() += Self::gpus(p);
            }
        }
        let names: Vec<String> = self.pods.keys().cloned().collect();
        for name in names {
            let p = &self.pods[&name];
            if p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some() {
                continue;
            }
            let target = Self::target_node(p);
            let Some(node) = self
                .nodes
                .iter()
                .find(|n| n.metadata.name.as_deref() == Some(&target))
            else {
                continue;
            };
            let cordoned = node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true);
            let alloc: u32 = node
                .status
                .as_ref()
                .and_then(|s| s.allocatable.as_ref())
                .and_then(|a| a.get("nvidia.com/gpu"))
                .map_or(0, |q| q.0.parse().expect("n"));
            let need = Self::gpus(p);
            if cordoned
                || !self.node_ready(&target)
                || used.get(&target).copied().unwrap_or(0) + need > alloc
            {
                let now = self.now;
                let st = self
                    .pods
                    .get_mut(&name)
                    .expect("pod")
                    .status
                    .get_or_insert_with(PodStatus::default);
                if st.conditions.is_none() {
                    st.conditions = Some(vec![PodCondition {
                        type_: "PodScheduled".into(),
                        status: "False".into(),
                        reason: Some("Unschedulable".into()),
                        last_transition_time: Some(Time(now)),
                        ..PodCondition::default()
                    }]);
                }
                continue;
            }
            *used.entry(target.clone()).or_default() += need;
            let p = self.pods.get_mut(&name).expect("pod");
            p.spec.as_mut().expect("spec").node_name = Some(target);
            p.status.get_or_insert_with(PodStatus::default).conditions = None;
            self.bound_at.insert(name, self.now);
        }
    }

    /// Kubelet: bound pods become Running after the pull and Ready after the model load; pods on
    /// a NotReady node lose readiness.
    fn kubelet(&mut self) {
        let ready_nodes: BTreeSet<String> = self
            .nodes
            .iter()
            .filter_map(|n| n.metadata.name.clone())
            .filter(|n| self.node_ready(n))
            .collect();
        for (name, p) in &mut self.pods {
            let Some(bound) = self.bound_at.get(name) else {
                continue;
            };
            let node = p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default();
            let st = p.status.get_or_insert_with(PodStatus::default);
            if st.phase.as_deref() == Some("Failed") {
                continue;
            }
            let age = self.now.duration_since(*bound).as_secs();
            if age >= PULL_SECONDS {
                st.phase = Some("Running".into());
            }
            let ready = age >= PULL_SECONDS + LOAD_SECONDS && ready_nodes.contains(&node);
            st.conditions = Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..PodCondition::default()
            }]);
        }
    }

    /// Garbage collection: pods whose owner no longer exists go away.
    fn gc(&mut self) {
        let uids: BTreeSet<String> = self
            .deployments
            .iter()
            .filter_map(|d| d.metadata.uid.clone())
            .collect();
        self.pods.retain(|_, p| {
            Self::is_foreign(p) || Self::owner_uid(p).is_some_and(|u| uids.contains(&u))
        });
        self.services.retain(|_, s| {
            s.metadata
                .owner_references
                .as_ref()
                .and_then(|o| o.first())
                .is_some_and(|o| uids.contains(&o.uid))
        });
    }

    fn step(&mut self) -> usize {
        let writes = self.reconcile_all();
        self.schedule();
        self.kubelet();
        self.gc();
        self.now = self
            .now
            .checked_add(SignedDuration::from_secs(STEP))
            .expect("time");
        self.round += 1;
        self.check_invariants();
        writes
    }

    fn ready_replicas(&self, i: usize) -> i32 {
        self.deployments[i]
            .status
            .as_ref()
            .map_or(0, |s| s.ready_replicas)
    }

    /// Step until `cond` holds; returns (simulated seconds, rounds).
    fn run_until(
        &mut self,
        max_rounds: u64,
        what: &str,
        cond: impl Fn(&Sim) -> bool,
    ) -> (i64, u64) {
        let (t0, r0) = (self.t(), self.round);
        for _ in 0..max_rounds {
            self.step();
            if cond(self) {
                return (self.t() - t0, self.round - r0);
            }
        }
        panic!(
            "{what}: not reached in {max_rounds} rounds\n{}",
            self.log.join("\n")
        );
    }

    /// Every placed replica is running and ready (unplaceable replicas aside).
    fn settled(&self) -> bool {
        self.deployments.iter().all(|d| {
            d.status.as_ref().is_some_and(|st| {
                st.placements
                    .iter()
                    .all(|p| p.ready && p.state == tessera_operator::api::ReplicaState::Running)
            })
        })
    }

    /// Rounds until the fleet is settled and a reconcile pass makes zero writes (converged).
    fn converge(&mut self, max_rounds: u64) -> u64 {
        for r in 1..=max_rounds {
            if self.step() == 0 && self.settled() {
                return r;
            }
        }
        panic!(
            "no convergence within {max_rounds} rounds\n{}",
            self.log.join("\n")
        );
    }

    fn check_invariants(&self) {
        // Every child has exactly one controller owner.
        for p in self.pods.values().filter(|p| !Self::is_foreign(p)) {
            let owners = p.metadata.owner_references.as_ref().map_or(0, |o| {
                o.iter().filter(|o| o.controller == Some(true)).count()
            });
            assert_eq!(owners, 1, "pod {:?}", p.metadata.name);
        }
        // No GPU promised twice: pods pinned to a node (bound or not) fit its GPUs.
        // (Tessera's own promises; a foreign pod that grabs GPUs between plan and bind is the
        // race the gang timeout resolves, and the scheduler never over-binds.)
        let mut pinned: BTreeMap<String, u32> = BTreeMap::new();
        for p in self.pods.values().filter(|p| !Self::is_foreign(p)) {
            *pinned.entry(Self::target_node(p)).or_default() += Self::gpus(p);
        }
        for (node, gpus) in &pinned {
            let alloc: u32 = self
                .nodes
                .iter()
                .find(|n| n.metadata.name.as_deref() == Some(node))
                .and_then(|n| n.status.as_ref())
                .and_then(|s| s.allocatable.as_ref())
                .and_then(|a| a.get("nvidia.com/gpu"))
                .map_or(0, |q| q.0.parse().expect("n"));
            assert!(
                *gpus <= alloc,
                "t={} node {node}: {gpus} GPUs promised, {alloc} allocatable\n{}",
                self.t(),
                self.log.join("\n")
            );
        }
        // No replica serves with members from two incarnations.
        for md in &self.deployments {
            let Some(st) = &md.status else { continue };
            for pl in st.placements.iter().filter(|p| p.ready) {
                let incs: BTreeSet<&str> = self
                    .pods
                    .values()
                    .filter(|p| {
                        p.metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(labels::DEPLOYMENT))
                            == md.metadata.name.as_ref()
                            && p.metadata
                                .labels
                                .as_ref()
                                .and_then(|l| l.get(labels::REPLICA))
                                == Some(&pl.replica.to_string())
                    })
                    .filter_map(|p| {
                        p.metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(labels::INCARNATION))
                            .map(String::as_str)
                    })
                    .collect();
                assert!(
                    incs.len() <= 1,
                    "replica {} of {:?} has members of incarnations {incs:?}",
                    pl.replica,
                    md.metadata.name
                );
            }
            // readyReplicas counts only whole ready groups.
            assert!(st.ready_replicas <= md.spec.replicas.max(st.placements.len() as i32));
        }
    }

    fn crash_member(&mut self, deployment: &str, replica: i32, stage_pod: usize) -> String {
        let name = self
            .pods
            .values()
            .filter(|p| {
                p.metadata.labels.as_ref().is_some_and(|l| {
                    l.get(labels::DEPLOYMENT).map(String::as_str) == Some(deployment)
                        && l.get(labels::REPLICA) == Some(&replica.to_string())
                })
            })
            .nth(stage_pod)
            .and_then(|p| p.metadata.name.clone())
            .expect("member to crash");
        let st = self
            .pods
            .get_mut(&name)
            .expect("pod")
            .status
            .get_or_insert_with(PodStatus::default);
        st.phase = Some("Failed".into());
        st.reason = Some("Error".into());
        name
    }

    fn set_node_ready(&mut self, name: &str, ready: bool) {
        let now = self.now;
        let n = self
            .nodes
            .iter_mut()
            .find(|n| n.metadata.name.as_deref() == Some(name))
            .expect("node");
        n.status.as_mut().expect("status").conditions = Some(vec![NodeCondition {
            type_: "Ready".into(),
            status: if ready { "True" } else { "False" }.into(),
            last_transition_time: Some(Time(now)),
            ..NodeCondition::default()
        }]);
    }
}

fn cluster(n: usize) -> Vec<Node> {
    (0..n)
        .map(|i| {
            node(
                &format!("h100-{i}"),
                "NVIDIA-H100-80GB-HBM3",
                8,
                if i % 2 == 0 { "rack-1" } else { "rack-2" },
            )
        })
        .collect()
}

#[test]
fn simulation_start_converge_and_stay_quiet() {
    let mut sim = Sim::new(cluster(2), vec![deployment("llama-8b", 3, 0, 2)]);
    let (secs, rounds) = sim.run_until(40, "3 ready replicas", |s| s.ready_replicas(0) == 3);
    println!("start: 3 replicas ready after {secs} simulated s, {rounds} rounds");
    let extra = sim.converge(10);
    println!(
        "converged {extra} rounds later; writes so far {}",
        sim.writes
    );
    // A converged state stays converged: 20 more passes make zero writes.
    for _ in 0..20 {
        assert_eq!(sim.step(), 0, "{}", sim.log.join("\n"));
    }
    let st = sim.deployments[0].status.as_ref().expect("status");
    assert_eq!(st.phase, Some(Phase::Ready));
    assert_eq!(st.tensor_parallel, Some(2));
    assert_eq!(sim.pods.len(), 3);
}

#[test]
fn simulation_member_crash_recreates_the_group_exactly_once() {
    let mut sim = Sim::new(cluster(2), vec![deployment("llama-8b", 2, 0, 2)]);
    sim.run_until(40, "ready", |s| s.ready_replicas(0) == 2);
    sim.converge(10);
    let before: BTreeSet<String> = sim.pods.keys().cloned().collect();
    let crashed = sim.crash_member("llama-8b", 1, 0);
    let (secs, rounds) = sim.run_until(60, "replica 1 ready again", |s| s.ready_replicas(0) == 2);
    println!(
        "member crash ({crashed}): replica ready again after {secs} simulated s, {rounds} rounds"
    );
    let st = sim.deployments[0].status.as_ref().expect("status");
    let r1 = st
        .placements
        .iter()
        .find(|p| p.replica == 1)
        .expect("replica 1");
    assert_eq!(r1.restarts, 1, "recreated exactly once");
    let r0 = st
        .placements
        .iter()
        .find(|p| p.replica == 0)
        .expect("replica 0");
    assert_eq!(r0.restarts, 0, "the healthy replica is untouched");
    let after: BTreeSet<String> = sim.pods.keys().cloned().collect();
    assert_eq!(
        before.intersection(&after).count(),
        1,
        "only replica 1's pod changed"
    );
    assert!(!sim.pods.contains_key(&crashed));
    let recreations = sim.log.iter().filter(|l| l.contains("Recreating")).count();
    assert_eq!(recreations, 1, "{}", sim.log.join("\n"));
}

#[test]
fn simulation_crash_loop_is_capped_and_the_node_avoided() {
    let mut sim = Sim::new(cluster(2), vec![deployment("llama-8b", 1, 0, 8)]);
    sim.run_until(40, "ready", |s| s.ready_replicas(0) == 1);
    let first_node = sim.deployments[0].status.as_ref().unwrap().placements[0].stages[0]
        .node
        .clone();
    // The GPU on the first node is bad: every incarnation placed there crashes once running.
    let mut crashes = 0;
    for _ in 0..400 {
        let victim = sim
            .pods
            .values()
            .find(|p| {
                p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(first_node.as_str())
                    && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            })
            .and_then(|p| p.metadata.name.clone());
        if let Some(v) = victim {
            sim.pods.get_mut(&v).unwrap().status.as_mut().unwrap().phase = Some("Failed".into());
            crashes += 1;
        }
        sim.step();
        let st = sim.deployments[0].status.as_ref().unwrap();
        if st.avoid_nodes.contains(&first_node) && st.ready_replicas == 1 {
            break;
        }
    }
    let st = sim.deployments[0].status.as_ref().unwrap();
    assert_eq!(
        st.avoid_nodes,
        vec![first_node.clone()],
        "{}",
        sim.log.join("\n")
    );
    assert_eq!(
        crashes, 4,
        "maxRestarts 3: three recreations, then the fourth failure avoids the node"
    );
    assert_ne!(st.placements[0].stages[0].node, first_node);
    assert_eq!(st.ready_replicas, 1);
    let degraded = st
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(degraded.status, "True");
    assert!(
        degraded
            .message
            .contains(&format!("avoiding nodes {first_node}")),
        "{}",
        degraded.message
    );
}

#[test]
fn simulation_node_loss_replaces_the_replica() {
    let mut sim = Sim::new(cluster(3), vec![deployment("llama-8b", 2, 0, 8)]);
    sim.run_until(40, "ready", |s| s.ready_replicas(0) == 2);
    sim.converge(10);
    let lost = sim.deployments[0].status.as_ref().unwrap().placements[0].stages[0]
        .node
        .clone();
    sim.set_node_ready(&lost, false);
    let (secs, rounds) = sim.run_until(80, "both replicas ready off the lost node", |s| {
        let st = s.deployments[0].status.as_ref().unwrap();
        st.ready_replicas == 2
            && st
                .placements
                .iter()
                .all(|p| p.stages.iter().all(|x| x.node != lost))
    });
    println!(
        "node NotReady ({lost}): replica re-placed and ready after {secs} simulated s, {rounds} rounds (grace 60 s)"
    );
    assert!(secs >= 60, "re-placed only after the grace period");
    sim.converge(10);
}

#[test]
fn simulation_cordon_and_node_deletion_replace_replicas() {
    let mut sim = Sim::new(cluster(4), vec![deployment("llama-8b", 2, 0, 8)]);
    sim.run_until(40, "ready", |s| s.ready_replicas(0) == 2);
    let placements = sim.deployments[0]
        .status
        .as_ref()
        .unwrap()
        .placements
        .clone();
    let cordoned = placements[0].stages[0].node.clone();
    let deleted = placements[1].stages[0].node.clone();
    sim.nodes
        .iter_mut()
        .find(|n| n.metadata.name.as_deref() == Some(cordoned.as_str()))
        .unwrap()
        .spec
        .as_mut()
        .unwrap()
        .unschedulable = Some(true);
    sim.nodes
        .retain(|n| n.metadata.name.as_deref() != Some(deleted.as_str()));
    sim.pods.retain(|_, p| {
        p.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(deleted.as_str())
    });
    let (secs, rounds) = sim.run_until(60, "re-placed", |s| {
        let st = s.deployments[0].status.as_ref().unwrap();
        st.ready_replicas == 2
            && st.placements.iter().all(|p| {
                p.stages
                    .iter()
                    .all(|x| x.node != cordoned && x.node != deleted)
            })
    });
    println!(
        "cordon + node deletion: both replicas re-placed and ready after {secs} simulated s, {rounds} rounds"
    );
}

#[test]
fn simulation_scale_up_down_and_unschedulable_condition() {
    let mut sim = Sim::new(cluster(2), vec![deployment("llama-8b", 1, 0, 8)]);
    sim.run_until(40, "ready", |s| s.ready_replicas(0) == 1);
    sim.deployments[0].spec.replicas = 3; // only 2 nodes of 8 GPUs: one replica cannot fit
    sim.deployments[0].metadata.generation = Some(2);
    sim.run_until(40, "2 ready", |s| s.ready_replicas(0) == 2);
    let st = sim.deployments[0].status.as_ref().unwrap();
    let placed = st.conditions.iter().find(|c| c.type_ == "Placed").unwrap();
    assert_eq!(placed.status, "False");
    assert_eq!(placed.reason, "Unschedulable");
    assert!(
        placed
            .message
            .starts_with("2 of 3 replicas placed; replica 2: "),
        "{}",
        placed.message
    );
    assert!(
        placed.message.contains("8"),
        "the reason carries numbers: {}",
        placed.message
    );
    sim.deployments[0].spec.replicas = 1;
    sim.deployments[0].metadata.generation = Some(3);
    sim.run_until(20, "scaled down", |s| {
        s.pods.len() == 1 && s.deployments[0].status.as_ref().unwrap().placements.len() == 1
    });
    assert_eq!(sim.converge(10), 1);
}

#[test]
fn simulation_operator_restart_does_not_touch_running_groups() {
    let mut sim = Sim::new(cluster(2), vec![deployment("llama-8b", 2, 0, 2)]);
    sim.run_until(40, "ready", |s| s.ready_replicas(0) == 2);
    sim.converge(10);
    let before: BTreeSet<String> = sim.pods.keys().cloned().collect();
    // A restarted operator has no memory but the API objects (incarnation numbers live in
    // status). The first reconcile after the restart must not write anything.
    assert_eq!(sim.step(), 0, "{}", sim.log.join("\n"));
    let after: BTreeSet<String> = sim.pods.keys().cloned().collect();
    assert_eq!(before, after);
}

#[test]
fn simulation_two_deployments_compete_and_priority_wins() {
    // 2 nodes x 8 GPUs; "big" (priority 10) wants 2 x 8 GPUs, "small" wants 2 x 8 too.
    let mut sim = Sim::new(
        cluster(2),
        vec![deployment("small", 2, 0, 8), deployment("big", 2, 10, 8)],
    );
    sim.run_until(60, "big ready", |s| s.ready_replicas(1) == 2);
    sim.converge(10);
    assert_eq!(sim.ready_replicas(0), 0);
    let small = sim.deployments[0].status.as_ref().unwrap();
    assert_eq!(small.phase, Some(Phase::Unschedulable));
    // Deleting "big" frees the GPUs; "small" takes them.
    sim.deployments.remove(1);
    let (secs, rounds) = sim.run_until(60, "small ready", |s| s.ready_replicas(0) == 2);
    println!(
        "competing deployments: the lower priority one ready {secs} simulated s ({rounds} rounds) after the higher one was deleted"
    );
    assert!(
        sim.pods
            .values()
            .all(|p| Sim::owner_uid(p).as_deref() == Some("uid-small")),
        "no orphans"
    );
}

#[test]
fn simulation_random_faults_then_convergence() {
    for seed in [1u64, 7, 42] {
        let mut rng = Rng(seed);
        let mut sim = Sim::new(
            cluster(4),
            vec![deployment("a", 3, 0, 2), deployment("b", 2, 5, 4)],
        );
        sim.run_until(60, "initial", |s| {
            s.ready_replicas(0) == 3 && s.ready_replicas(1) == 2
        });
        for _ in 0..60 {
            match rng.below(10) {
                0 => {
                    let names: Vec<String> = sim.pods.keys().cloned().collect();
                    if !names.is_empty() {
                        let n = &names[rng.below(names.len() as u64) as usize];
                        sim.pods.get_mut(n).unwrap().status.as_mut().unwrap().phase =
                            Some("Failed".into());
                    }
                }
                1 => {
                    let i = rng.below(2) as usize;
                    sim.deployments[i].spec.replicas = 1 + rng.below(3) as i32;
                }
                _ => {}
            }
            sim.step();
        }
        let rounds = sim.converge(120);
        for _ in 0..5 {
            assert_eq!(sim.step(), 0);
        }
        println!(
            "seed {seed}: converged {rounds} rounds after the faults stopped; {} writes in all",
            sim.writes
        );
    }
}

#[test]
fn simulation_half_placed_gang_releases_its_gpus_after_the_timeout() {
    // TP=8 x PP=2: each replica is a gang of two 8-GPU pods on two nodes.
    let mut md = deployment("gang", 1, 0, 8);
    md.spec.parallelism.pipeline = tessera_operator::api::ParallelDegree::Fixed(2);
    let mut sim = Sim::new(cluster(3), vec![md]);
    sim.reconcile_all();
    let stages = sim.deployments[0].status.as_ref().unwrap().placements[0]
        .stages
        .clone();
    assert_eq!(stages.len(), 2);
    // Between planning and binding, another workload takes every GPU of the second node.
    let taken = stages[1].node.clone();
    let foreign: Pod = serde_json::from_value(json!({
        "metadata": {"name": "foreign", "labels": {"foreign": "yes"}},
        "spec": {"nodeName": taken, "containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "8"}}}]},
        "status": {"phase": "Running"}
    }))
    .expect("pod");
    sim.pods.insert("foreign".into(), foreign);
    let (secs, rounds) = sim.run_until(60, "the gang re-placed and ready", |s| {
        let st = s.deployments[0].status.as_ref().unwrap();
        st.ready_replicas == 1 && st.placements[0].stages.iter().all(|x| x.node != taken)
    });
    println!(
        "half-placed gang (member unschedulable on {taken}): released and ready elsewhere after {secs} simulated s, {rounds} rounds (gang timeout 60 s)"
    );
    assert!(secs >= 60, "waited for the gang timeout: {secs}");
    assert!(
        sim.log.iter().any(|l| l.contains("gang timeout")),
        "{}",
        sim.log.join("\n")
    );
    // The member that had started on the first node no longer holds GPUs there unless the new
    // placement uses that node again.
    assert_eq!(sim.pods.values().filter(|p| !Sim::is_foreign(p)).count(), 2);
}

/// Llama 3.1 8B on SGLang with long prompts and a tight inter-token target: the planner runs it
/// as a prefill pool and a decode pool (`disaggregation: Auto`).
fn pooled_deployment(name: &str) -> ModelDeployment {
    let mut md = deployment(name, 1, 0, 1);
    md.spec.parallelism = Default::default();
    md.spec.engine.name = serde_json::from_value(json!("sglang")).expect("engine");
    md.spec.serving.context_length = Some(16384);
    md.spec.serving.workload = Some(tessera_operator::api::WorkloadShape {
        input_tokens: 8192,
        output_tokens: 256,
    });
    md.spec.serving.slo = Some(tessera_operator::api::ServingSlo {
        time_to_first_token_seconds: Some(2.0),
        inter_token_latency_seconds: Some(0.02),
    });
    md.spec.serving.disaggregation = tessera_operator::api::Disaggregation::Auto;
    md
}

/// (replica, role, incarnation) of every placement.
fn pool_roles(sim: &Sim) -> Vec<(i32, Option<String>, Option<String>)> {
    sim.deployments[0]
        .status
        .as_ref()
        .map(|st| {
            st.placements
                .iter()
                .map(|p| (p.replica, p.role.clone(), p.incarnation.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn router_args(sim: &Sim) -> Vec<String> {
    let router = sim.routers.values().next().expect("a router");
    router
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .args
        .clone()
        .unwrap_or_default()
}

#[test]
fn simulation_pools_run_stay_quiet_and_heal_a_lost_decode_node_in_its_role() {
    let mut sim = Sim::new(cluster(3), vec![pooled_deployment("chat")]);
    let (secs, _) = sim.run_until(60, "both pools ready", |s| {
        let st = s.deployments[0].status.as_ref();
        st.is_some_and(|st| {
            !st.pools.is_empty()
                && st.placements.len() as i32 == st.pools.iter().map(|p| p.replicas).sum::<i32>()
                && st.placements.iter().all(|p| p.ready)
        })
    });
    sim.converge(10);
    // Re-planned on every pass, a running pool deployment still makes no writes.
    for _ in 0..20 {
        assert_eq!(sim.step(), 0, "{}", sim.log.join("\n"));
    }
    let st = sim.deployments[0].status.clone().expect("status");
    let (prefill, decode) = (st.pools[0].replicas, st.pools[1].replicas);
    // The scale subresource counts units, as spec.replicas does (HPA compares the two).
    assert_eq!((st.replicas, st.ready_replicas), (1, 1));
    println!("pools {prefill} prefill + {decode} decode ready after {secs} simulated s");
    let before = pool_roles(&sim);
    let args = router_args(&sim);
    let count = |args: &[String], flag: &str| args.iter().filter(|a| *a == flag).count() as i32;
    assert_eq!(
        (count(&args, "--prefill"), count(&args, "--decode")),
        (prefill, decode)
    );
    // The node of the (first) decode replica is lost: that replica is placed again as a decode
    // replica, the others keep their incarnations, and the router follows its new leader.
    let d = st
        .placements
        .iter()
        .find(|p| p.role.as_deref() == Some("decode"))
        .expect("a decode replica");
    let lost = d.stages[0].node.clone();
    sim.set_node_ready(&lost, false);
    let (secs, _) = sim.run_until(80, "every replica ready off the lost node", |s| {
        let st = s.deployments[0].status.as_ref().unwrap();
        st.ready_replicas == 1
            && st.placements.iter().all(|p| p.ready)
            && st
                .placements
                .iter()
                .all(|p| p.stages.iter().all(|x| x.node != lost))
    });
    println!("decode node {lost} lost: its replicas ready again after {secs} simulated s");
    // As for any replica: placed again only after the node's grace period (60 s), not at the
    // first pass whose plan could not reserve the NotReady node.
    assert!(
        secs >= 60,
        "re-placed after {secs} s, before the grace period"
    );
    let after = pool_roles(&sim);
    assert_eq!(after.len(), before.len());
    for ((r0, role0, inc0), (r1, role1, inc1)) in before.iter().zip(&after) {
        assert_eq!((r0, role0), (r1, role1), "a replica changed pool");
        let moved = st
            .placements
            .iter()
            .find(|p| p.replica == *r0)
            .unwrap()
            .stages
            .iter()
            .any(|s| s.node == lost);
        assert_eq!(
            inc0 != inc1,
            moved,
            "replica {r0}: recreated iff it was on {lost}"
        );
    }
    let new_decode = after
        .iter()
        .find(|(r, _, _)| *r == d.replica)
        .and_then(|(_, _, inc)| inc.clone())
        .unwrap();
    assert!(
        router_args(&sim).iter().any(|a| a.contains(&new_decode)),
        "the router lists the new decode leader ({new_decode}): {:?}",
        router_args(&sim)
    );
    sim.converge(10);
}

#[test]
fn simulation_each_pool_resizes_alone_and_the_other_keeps_running() {
    let mut sim = Sim::new(cluster(3), vec![pooled_deployment("chat")]);
    let all_ready = |want: (i32, i32)| {
        move |s: &Sim| {
            let st = s.deployments[0].status.as_ref();
            st.is_some_and(|st| {
                st.pools.len() == 2
                    && (st.pools[0].replicas, st.pools[1].replicas) == want
                    && st.placements.len() as i32 == want.0 + want.1
                    && st.placements.iter().all(|p| p.ready)
            })
        }
    };
    sim.run_until(60, "both pools ready", |s| {
        s.deployments[0].status.as_ref().is_some_and(|st| {
            st.pools.len() == 2
                && st.placements.len() as i32 == st.pools.iter().map(|p| p.replicas).sum::<i32>()
                && st.placements.iter().all(|p| p.ready)
        })
    });
    sim.converge(10);
    let st = sim.deployments[0].status.clone().expect("status");
    let (prefill, decode) = (st.pools[0].replicas, st.pools[1].replicas);
    assert_eq!(
        (st.pools[0].role.as_str(), st.pools[1].role.as_str()),
        ("prefill", "decode")
    );
    assert!(prefill >= 3, "{:?}", st.pools);
    let before = pool_roles(&sim);
    // As the autoscaler does: the decode pool grows by one and the prefill pool shrinks by two,
    // in one write of spec.poolReplicas.
    sim.deployments[0].spec.pool_replicas = Some(tessera_operator::api::PoolReplicas {
        prefill: Some(prefill - 2),
        decode: Some(decode + 1),
    });
    let (secs, _) = sim.run_until(
        60,
        "the resized pools ready",
        all_ready((prefill - 2, decode + 1)),
    );
    println!(
        "pools {prefill}+{decode} resized to {}+{} in {secs} simulated s",
        prefill - 2,
        decode + 1
    );
    let after = pool_roles(&sim);
    // Every replica that stays keeps its index, role and incarnation: the last two prefill
    // replicas went, one decode replica came, nothing else was recreated.
    let kept: Vec<_> = before.iter().filter(|x| after.contains(x)).collect();
    let gone: Vec<(i32, Option<String>)> = before
        .iter()
        .filter(|x| !after.contains(x))
        .map(|(r, role, _)| (*r, role.clone()))
        .collect();
    let prefill_role = Some("prefill".to_owned());
    assert_eq!(
        gone,
        vec![
            (prefill - 2, prefill_role.clone()),
            (prefill - 1, prefill_role)
        ],
        "{}",
        sim.log.join("\n")
    );
    assert_eq!(kept.len(), before.len() - 2);
    let added: Vec<_> = after.iter().filter(|x| !before.contains(x)).collect();
    assert_eq!(added.len(), 1, "{added:?}");
    assert_eq!(added[0].1.as_deref(), Some("decode"));
    let args = router_args(&sim);
    let count = |flag: &str| args.iter().filter(|a| *a == flag).count() as i32;
    assert_eq!(
        (count("--prefill"), count("--decode")),
        (prefill - 2, decode + 1)
    );
    // Quiet again.
    sim.converge(10);
    for _ in 0..10 {
        assert_eq!(sim.step(), 0, "{}", sim.log.join("\n"));
    }
}
