//! The pure reconcile against what a live cluster does and an in-memory picture does not:
//! repeated and stale reconciles, hundreds of unplaceable replicas, old failures, evictions,
//! deletion in progress, GPUs promised to gangs not yet visible, and Node names that differ
//! from their hostname label.

mod common;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::json;
use tessera_operator::api::schema::status_violations;
use tessera_operator::api::{ModelDeployment, ReplicaState, parse_model_deployment};
use tessera_operator::controller::reconcile::{
    Actions, Config, MAX_MESSAGE, Observed, REPLICA_FAILURE, incarnation_for, reconcile,
    reserved_by_others, set_replica_failure,
};

fn deployment(replicas: i32, tp: u32) -> ModelDeployment {
    let mut md = parse_model_deployment(&json!({
        "apiVersion": "tessera.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "llama-8b", "namespace": "inference"},
        "spec": {
            "replicas": replicas,
            "model": {"uri": "pvc://models/llama-8b", "architecture": {
                "parameters": 8030261248i64, "layers": 32, "hiddenSize": 4096,
                "attentionHeads": 32, "kvHeads": 8, "intermediateSize": 14336,
                "vocabSize": 128256, "contextLength": 131072, "bytesPerParameter": 2}},
            "parallelism": {"tensor": tp, "pipeline": 1},
            "serving": {"maxConcurrency": 16, "contextLength": 8192},
            "failurePolicy": {"maxRestarts": 3, "backoffSeconds": 10}
        }
    }))
    .expect("valid");
    md.metadata.uid = Some("uid-1".into());
    md.metadata.generation = Some(1);
    md
}

fn t0() -> Timestamp {
    "2026-01-01T00:00:00Z".parse().expect("time")
}

fn at(s: i64) -> Timestamp {
    t0().checked_add(SignedDuration::from_secs(s))
        .expect("time")
}

fn decide(md: &ModelDeployment, pods: &[Pod], nodes: &[Node], now: Timestamp) -> Actions {
    let obs = Observed {
        md,
        pods,
        services: &[],
        routers: &[],
        nodes,
        other_pods: &[],
        reserved: &[],
        now,
    };
    reconcile(&obs, &Config::default())
}

/// The pods of `actions` as the kubelet reports them once ready since `since`.
fn ready(actions: &Actions, since: Timestamp) -> Vec<Pod> {
    actions
        .apply_pods
        .iter()
        .cloned()
        .map(|mut p| {
            p.status = Some(
                serde_json::from_value(json!({
                    "phase": "Running",
                    "conditions": [{"type": "Ready", "status": "True",
                        "lastTransitionTime": Time(since)}]
                }))
                .expect("status"),
            );
            p
        })
        .collect()
}

fn names(pods: &[Pod]) -> Vec<String> {
    pods.iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect()
}

#[test]
fn a_repeated_or_stale_reconcile_proposes_the_same_group() {
    let md = deployment(2, 2);
    let nodes = [common::h100_node()];
    let first = decide(&md, &[], &nodes, t0());
    let again = decide(&md, &[], &nodes, at(7));
    let status = first.status.clone().expect("status");
    assert_eq!(status.incarnations, 2, "one number per new group");
    assert_eq!(
        status.placements[0].incarnation.as_deref(),
        Some(incarnation_for("uid-1", 0).as_str())
    );
    // A reconcile from the same (possibly stale) picture proposes exactly the same pods, so
    // applying them twice is harmless, and the status write of the later one carries the same
    // resourceVersion precondition and is refused.
    assert_eq!(names(&first.apply_pods), names(&again.apply_pods));
    // Once the intent is in status but the pod cache shows nothing yet, the same pods are
    // applied again, not a new group.
    let mut written = md;
    written.status = Some(status.clone());
    let lagging = decide(&written, &[], &nodes, at(8));
    assert_eq!(names(&lagging.apply_pods), names(&first.apply_pods));
    assert!(lagging.delete_pods.is_empty());
    assert!(
        lagging
            .status
            .as_ref()
            .is_none_or(|s| s.incarnations == 2 && s.placements == status.placements),
        "no new incarnation from a cache that has not seen the pods"
    );
    // Another deployment uid never shares names with this one.
    assert_ne!(incarnation_for("uid-1", 0), incarnation_for("uid-2", 0));
}

#[test]
fn five_hundred_unplaced_replicas_keep_the_status_within_the_crd() {
    // 8 GPUs for 500 replicas of TP=2: 4 placed, 496 not.
    let md = deployment(500, 2);
    let nodes = [common::h100_node()];
    let actions = decide(&md, &[], &nodes, t0());
    let status = actions.status.expect("status");
    assert_eq!(status.placements.len(), 4);
    let placed = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Placed")
        .expect("Placed");
    assert_eq!(placed.status, "False");
    assert!(
        placed.message.len() <= MAX_MESSAGE,
        "{}",
        placed.message.len()
    );
    assert!(
        placed
            .message
            .starts_with("4 of 500 replicas placed; replicas 4-499 (496): "),
        "{}",
        placed.message
    );
    assert_eq!(status_violations(&status), Vec::<String>::new());
    // Each Event note is bounded too (the executor cuts them at 1 KiB).
    let unschedulable = actions
        .events
        .iter()
        .find(|e| e.reason == "Unschedulable")
        .expect("event");
    assert!(unschedulable.note.len() <= MAX_MESSAGE);
}

#[test]
fn long_failure_messages_are_cut_at_a_character_boundary() {
    let md = deployment(1, 2);
    let nodes = [common::h100_node()];
    let first = decide(&md, &[], &nodes, t0());
    let mut md = md;
    md.status = first.status.clone();
    let mut pods = ready(&first, t0());
    // A worker's exit message of 3,000 characters, multi-byte ones included.
    let message = "模型校验失败 ".repeat(300);
    pods[0].status = Some(
        serde_json::from_value(json!({
            "phase": "Running",
            "containerStatuses": [{"name": "worker", "image": "w", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"terminated": {"exitCode": 3, "message": message}}}]
        }))
        .expect("status"),
    );
    let actions = decide(&md, &pods, &nodes, at(60));
    let status = actions.status.expect("status");
    let failure = status.placements[0]
        .last_failure
        .as_deref()
        .expect("failure");
    assert!(failure.len() <= MAX_MESSAGE, "{}", failure.len());
    assert!(failure.ends_with('…'));
    for c in &status.conditions {
        assert!(
            c.message.len() <= MAX_MESSAGE,
            "{}: {}",
            c.type_,
            c.message.len()
        );
    }
    assert_eq!(status_violations(&status), Vec::<String>::new());
}

#[test]
fn a_deployment_being_deleted_is_left_alone() {
    let mut md = deployment(2, 2);
    md.metadata.deletion_timestamp = Some(Time(t0()));
    let actions = decide(&md, &[], &[common::h100_node()], t0());
    assert_eq!(actions, Actions::default());
}

/// A converged replica whose group failed twice: restarts 2, ready since `ready_at`.
fn recovered_replica(ready_at: Timestamp) -> (ModelDeployment, Vec<Pod>) {
    let md = deployment(1, 2);
    let nodes = [common::h100_node()];
    let first = decide(&md, &[], &nodes, t0());
    let mut md = md;
    let mut status = first.status.clone().expect("status");
    status.placements[0].restarts = 2;
    status.placements[0].last_failure = Some("container worker exited".into());
    status.placements[0].last_failure_time = Some(Time(t0()));
    status.placements[0].state = ReplicaState::Running;
    md.status = Some(status);
    (md, ready(&first, ready_at))
}

#[test]
fn restarts_are_forgotten_after_the_group_has_been_ready_for_a_while() {
    let nodes = [common::h100_node()];
    let (md, pods) = recovered_replica(at(100));
    // Ready for 5 minutes: still counted.
    let early = decide(&md, &pods, &nodes, at(400));
    let early_restarts = early
        .status
        .as_ref()
        .map_or(2, |s| s.placements[0].restarts);
    assert_eq!(early_restarts, 2);
    // Ready for the decay time (10 minutes): forgotten, with an Event.
    let late = decide(&md, &pods, &nodes, at(100 + 600));
    let status = late.status.expect("status changes");
    assert_eq!(status.placements[0].restarts, 0);
    assert_eq!(status.placements[0].last_failure, None);
    assert!(late.events.iter().any(|e| e.reason == "Recovered"));
}

#[test]
fn an_evicted_member_replaces_the_group_without_counting_a_failure() {
    let nodes = [common::h100_node()];
    let (md, mut pods) = recovered_replica(at(100));
    pods[0].status = Some(
        serde_json::from_value(json!({
            "phase": "Running",
            "conditions": [{"type": "DisruptionTarget", "status": "True",
                "reason": "EvictionByEvictionAPI"}]
        }))
        .expect("status"),
    );
    pods[0].metadata.deletion_timestamp = Some(Time(at(110)));
    let actions = decide(&md, &pods, &nodes, at(120));
    let status = actions.status.expect("status");
    let p = &status.placements[0];
    assert_eq!(p.restarts, 2, "an eviction is not a failure");
    assert_eq!(p.state, ReplicaState::Creating);
    assert_ne!(
        p.incarnation,
        md.status.as_ref().expect("s").placements[0].incarnation,
        "placed again as a new group"
    );
    assert!(actions.events.iter().any(|e| e.reason == "Disrupted"));
    assert!(!actions.events.iter().any(|e| e.reason == "MemberFailed"));
    // The same for a pod the kubelet failed with reason Evicted (node pressure).
    let (md, mut pods) = recovered_replica(at(100));
    pods[0].status = Some(
        serde_json::from_value(json!({"phase": "Failed", "reason": "Evicted"})).expect("status"),
    );
    let status = decide(&md, &pods, &nodes, at(120)).status.expect("status");
    assert_eq!(status.placements[0].restarts, 2);
}

/// A deployment whose status avoids `h100-9` since `since`.
fn avoiding(since: Timestamp) -> ModelDeployment {
    let mut md = deployment(1, 2);
    let nodes = [common::h100_node()];
    let mut status = decide(&md, &[], &nodes, t0()).status.expect("status");
    status.avoid_nodes = vec!["h100-9".into()];
    status.avoid_nodes_since = [("h100-9".to_owned(), Time(since))].into();
    md.status = Some(status);
    md
}

#[test]
fn avoided_nodes_expire_and_a_template_change_clears_them() {
    let nodes = [common::h100_node()];
    let cfg = Config::default();
    let md = avoiding(t0());
    let kept = decide(&md, &[], &nodes, at(60));
    let still = kept
        .status
        .as_ref()
        .map_or(md.status.as_ref().expect("s").avoid_nodes.clone(), |s| {
            s.avoid_nodes.clone()
        });
    assert_eq!(still, ["h100-9"]);
    let expired = decide(&md, &[], &nodes, at(cfg.avoid_ttl.as_secs() as i64 + 1));
    let status = expired.status.expect("status");
    assert!(status.avoid_nodes.is_empty());
    assert!(status.avoid_nodes_since.is_empty());
    assert!(
        expired
            .events
            .iter()
            .any(|e| e.reason == "AvoidNodesExpired")
    );
    // A new image: the avoided nodes get another chance at once.
    let mut md = avoiding(at(50));
    md.spec.worker.image = Some("tessera-worker:v2".into());
    let changed = decide(&md, &[], &nodes, at(60));
    let status = changed.status.expect("status");
    assert!(status.avoid_nodes.is_empty(), "{:?}", status.avoid_nodes);
    assert!(
        changed
            .events
            .iter()
            .any(|e| e.reason == "AvoidNodesCleared")
    );
}

#[test]
fn placements_written_but_not_yet_visible_as_pods_hold_their_gpus() {
    // Another deployment wrote its intent (replica 0 on h100-1 with 8 GPUs) but the pod cache
    // shows none of its pods yet: those GPUs are not free.
    let mut other = deployment(1, 8);
    other.metadata.name = Some("other".into());
    other.metadata.uid = Some("uid-other".into());
    let nodes = [common::h100_node()];
    let intent = decide(&other, &[], &nodes, t0());
    other.status = intent.status.clone();
    let reserved = reserved_by_others(std::slice::from_ref(&other), Some("uid-1"), &[]);
    assert_eq!(reserved, [("h100-1".to_owned(), 8)]);
    // Once its pods are visible they count as pods, not as reservations.
    let reserved = reserved_by_others(
        std::slice::from_ref(&other),
        Some("uid-1"),
        &intent.apply_pods,
    );
    assert!(reserved.is_empty(), "{reserved:?}");
    // And the planner of this deployment sees the node full.
    let md = deployment(1, 2);
    let obs = Observed {
        md: &md,
        pods: &[],
        services: &[],
        routers: &[],
        nodes: &nodes,
        other_pods: &[],
        reserved: &reserve_all(&other),
        now: t0(),
    };
    let actions = reconcile(&obs, &Config::default());
    assert!(actions.apply_pods.is_empty());
    let status = actions.status.expect("status");
    assert!(status.placements.is_empty());
}

fn reserve_all(other: &ModelDeployment) -> Vec<(String, u32)> {
    reserved_by_others(std::slice::from_ref(other), Some("uid-1"), &[])
}

#[test]
fn pods_are_pinned_by_node_name_even_when_the_hostname_label_differs() {
    // A cloud node whose hostname label is not its name.
    let mut node = common::h100_node();
    node.metadata
        .labels
        .as_mut()
        .expect("labels")
        .insert("kubernetes.io/hostname".into(), "ip-10-0-0-7".into());
    let md = deployment(1, 2);
    let actions = decide(&md, &[], &[node], t0());
    let pod = &actions.apply_pods[0];
    let term = &pod
        .spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .expect("required affinity")
        .node_selector_terms[0];
    let field = &term.match_fields.as_ref().expect("matchFields")[0];
    assert_eq!(field.key, "metadata.name");
    assert_eq!(field.values.as_deref(), Some(&["h100-1".to_owned()][..]));
    assert!(term.match_expressions.is_none());
    assert_eq!(
        tessera_operator::controller::reconcile::pinned_node(pod),
        Some("h100-1")
    );
}

#[test]
fn replica_failure_holds_while_a_starting_group_misses_pods() {
    let md = deployment(1, 2);
    let nodes = [common::h100_node()];
    let first = decide(&md, &[], &nodes, t0());
    let mut md = md;
    let mut status = first.status.clone().expect("status");
    set_replica_failure(
        &mut status,
        "creating pod x failed (403 Forbidden): exceeded quota: gpu",
        at(1),
    );
    md.status = Some(status);
    // Still no pod: the condition stays, and the same pods are applied again.
    let again = decide(&md, &[], &nodes, at(30));
    assert_eq!(names(&again.apply_pods), names(&first.apply_pods));
    let kept = again
        .status
        .as_ref()
        .unwrap_or(md.status.as_ref().expect("s"));
    assert!(kept.conditions.iter().any(|c| c.type_ == REPLICA_FAILURE));
    // The pods exist: the condition goes.
    let pods = ready(&first, at(40));
    let done = decide(&md, &pods, &nodes, at(60)).status.expect("status");
    assert!(!done.conditions.iter().any(|c| c.type_ == REPLICA_FAILURE));
}

#[test]
fn what_the_fleet_measured_shows_next_to_the_prediction() {
    use tessera_operator::planner::calibration::{LayoutKey, Measurement};
    let md = deployment(1, 2);
    let nodes = [common::h100_node()];
    let first = decide(&md, &[], &nodes, t0());
    let mut md = md;
    md.status = first.status.clone();
    let pods = ready(&first, t0());
    let key = LayoutKey {
        gpu_type: "H100".into(),
        tensor_parallel: 2,
        pipeline_parallel: 1,
        engine: "tessera".into(),
    };
    let mut cfg = Config::default();
    let observe = |cfg: &mut Config, ratio: f64| {
        cfg.plan.constants.calibration.observe(
            &key,
            Measurement {
                predicted_decode_tokens_per_second: 100.0,
                measured_decode_tokens_per_second: Some(100.0 * ratio),
                predicted_time_to_first_token_seconds: 1.0,
                measured_time_to_first_token_seconds: None,
                predicted_allreduce_seconds: 0.0,
                measured_allreduce_seconds: None,
            },
        )
    };
    let run = |cfg: &Config| {
        let obs = Observed {
            md: &md,
            pods: &pods,
            services: &[],
            routers: &[],
            nodes: &nodes,
            other_pods: &[],
            reserved: &[],
            now: at(60),
        };
        reconcile(&obs, cfg)
            .status
            .unwrap_or_else(|| md.status.clone().expect("status"))
    };
    // Two samples: not yet.
    observe(&mut cfg, 0.7);
    observe(&mut cfg, 0.7);
    let p = &run(&cfg).placements[0].predicted;
    assert_eq!(p.measured_decode_ratio, None);
    // Three: the median, rounded, next to the prediction; nothing measured for prefill.
    observe(&mut cfg, 0.71234);
    let p = run(&cfg).placements[0].predicted.clone();
    assert_eq!(p.measured_decode_ratio, Some(0.7));
    assert_eq!(p.measured_prefill_ratio, None);
    assert!(p.decode_tokens_per_second > 0.0);
}

/// A Llama-8B deployment whose workload (long prompts, a tight inter-token target) makes the
/// planner prefer a prefill pool and a decode pool, on `engine`.
fn long_prompt_deployment(engine: &str, units: i32) -> ModelDeployment {
    let mut md = deployment(units, 1);
    let spec = &mut md.spec;
    spec.parallelism = Default::default();
    spec.serving.context_length = Some(16384);
    spec.serving.workload = Some(tessera_operator::api::WorkloadShape {
        input_tokens: 8192,
        output_tokens: 256,
    });
    spec.serving.slo = Some(tessera_operator::api::ServingSlo {
        time_to_first_token_seconds: Some(2.0),
        inter_token_latency_seconds: Some(0.02),
    });
    spec.serving.disaggregation = tessera_operator::api::Disaggregation::Auto;
    spec.engine.name = serde_json::from_value(json!(engine)).expect("engine");
    md
}

fn condition<'a>(
    status: &'a tessera_operator::api::ModelDeploymentStatus,
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {:?}", status.conditions))
}

#[test]
fn pools_the_engine_cannot_run_are_reported_while_replicas_serve_aggregated() {
    // The Tessera engine's pools are not rendered: the controller shows the pools it would
    // run, says why it does not, and places the replicas aggregated (no pod has a role).
    let mut md = long_prompt_deployment("tessera", 1);
    let nodes = [common::h100_node()];
    let actions = decide(&md, &[], &nodes, t0());
    let status = actions.status.expect("status");
    assert_eq!(status.pools.len(), 2, "{status:?}");
    assert_eq!(status.pools[0].role, "prefill");
    assert_eq!(status.pools[1].role, "decode");
    let why = status.disaggregation.as_deref().unwrap();
    assert!(why.starts_with("disaggregated (Auto)"), "{why}");
    let c = condition(&status, "Disaggregated");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "PoolsNotRenderable")
    );
    assert!(
        c.message.contains("cannot run: the tessera engine")
            && c.message.contains("every replica serves whole requests"),
        "{}",
        c.message
    );
    // One aggregated replica, as spec.replicas says.
    assert_eq!(status.placements.len(), 1);
    assert_eq!(status.placements[0].role, None);
    assert!(!actions.apply_pods.is_empty());
    assert!(actions.apply_router.is_none());
    assert!(status_violations(&status).is_empty());
    // With short prompts the verdict is aggregated and the condition says why.
    md.spec.serving.workload = Some(tessera_operator::api::WorkloadShape {
        input_tokens: 256,
        output_tokens: 256,
    });
    let status = decide(&md, &[], &nodes, t0()).status.expect("status");
    assert!(status.pools.is_empty());
    let c = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Disaggregated")
        .expect("condition");
    assert_eq!(c.reason, "AggregatedPredictedBetter");
    assert!(c.message.starts_with("aggregated (Auto)"), "{}", c.message);
}

fn h100_nodes(n: usize) -> Vec<Node> {
    (1..=n)
        .map(|i| {
            let mut node = common::h100_node();
            node.metadata.name = Some(format!("h100-{i}"));
            node
        })
        .collect()
}

fn decide_with_routers(
    md: &ModelDeployment,
    pods: &[Pod],
    routers: &[k8s_openapi::api::apps::v1::Deployment],
    nodes: &[Node],
    now: Timestamp,
) -> Actions {
    let obs = Observed {
        md,
        pods,
        services: &[],
        routers,
        nodes,
        other_pods: &[],
        reserved: &[],
        now,
    };
    reconcile(&obs, &Config::default())
}

fn pool_label(p: &Pod) -> Option<String> {
    p.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("tessera.dev/pool"))
        .cloned()
}

/// (replica, role) of every placement.
fn roles(status: &tessera_operator::api::ModelDeploymentStatus) -> Vec<(i32, Option<String>)> {
    status
        .placements
        .iter()
        .map(|p| (p.replica, p.role.clone()))
        .collect()
}

/// The router's arguments.
fn router_args(router: &k8s_openapi::api::apps::v1::Deployment) -> Vec<String> {
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

/// The router's `--prefill` / `--decode` arguments.
fn router_counts(router: &k8s_openapi::api::apps::v1::Deployment) -> (usize, usize) {
    let args = router_args(router);
    let n = |flag: &str| args.iter().filter(|a| *a == flag).count();
    (n("--prefill"), n("--decode"))
}

#[test]
fn each_pool_grows_and_shrinks_alone_and_the_other_keeps_its_replicas() {
    let nodes = h100_nodes(4);
    let mut md = long_prompt_deployment("sglang", 1);
    let a1 = decide_with_routers(&md, &[], &[], &nodes, t0());
    let s1 = a1.status.clone().expect("status");
    let (prefill, decode) = (s1.pools[0].replicas, s1.pools[1].replicas);
    assert_eq!(
        (s1.pools[0].role.as_str(), s1.pools[1].role.as_str()),
        ("prefill", "decode")
    );
    assert!(prefill >= 2 && decode >= 1, "{:?}", s1.pools);
    assert_eq!(
        (s1.pools[0].replicas_per_unit, s1.pools[1].replicas_per_unit),
        (prefill, decode),
        "one unit"
    );
    md.status = Some(s1.clone());
    let pods = ready(&a1, t0());
    let routers = vec![a1.apply_router.expect("router")];
    let incarnation = |s: &tessera_operator::api::ModelDeploymentStatus, r: i32| {
        s.placements
            .iter()
            .find(|p| p.replica == r)
            .and_then(|p| p.incarnation.clone())
    };

    // The decode pool grows by one: one decode replica is added in the next decode slot, every
    // running replica keeps its index, role and incarnation, the router lists the new one.
    md.spec.pool_replicas = Some(tessera_operator::api::PoolReplicas {
        prefill: None,
        decode: Some(decode + 1),
    });
    let a2 = decide_with_routers(&md, &pods, &routers, &nodes, at(30));
    let s2 = a2.status.clone().expect("status");
    assert_eq!(
        (s2.pools[0].replicas, s2.pools[1].replicas),
        (prefill, decode + 1)
    );
    assert!(a2.delete_pods.is_empty(), "{:?}", a2.delete_pods);
    let added: Vec<(i32, Option<String>)> = roles(&s2)
        .into_iter()
        .filter(|r| !roles(&s1).contains(r))
        .collect();
    // Units of `prefill` prefill replicas then one decode replica: the second decode replica
    // takes the decode slot of the second unit, after its prefill slots.
    assert_eq!(decode, 1, "{:?}", s1.pools);
    let next_decode = (prefill + decode) + prefill;
    assert_eq!(added, vec![(next_decode, Some("decode".to_owned()))]);
    for (r, role) in roles(&s1) {
        assert!(roles(&s2).contains(&(r, role)), "replica {r} moved");
        assert_eq!(
            incarnation(&s2, r),
            incarnation(&s1, r),
            "replica {r} recreated"
        );
    }
    let router2 = a2.apply_router.clone().expect("router rewritten");
    assert_eq!(
        router_counts(&router2),
        (prefill as usize, decode as usize + 1)
    );
    // Whole units: still one (the extra decode replica is no unit of its own).
    assert_eq!(s2.replicas, 1);
    assert!(status_violations(&s2).is_empty());

    // Then the prefill pool shrinks by one: its last replica goes, nothing else moves.
    md.spec.pool_replicas = Some(tessera_operator::api::PoolReplicas {
        prefill: Some(prefill - 1),
        decode: Some(decode + 1),
    });
    md.status = Some(s2.clone());
    let pods2: Vec<Pod> = pods.iter().cloned().chain(ready(&a2, at(30))).collect();
    let routers2 = vec![router2];
    let a3 = decide_with_routers(&md, &pods2, &routers2, &nodes, at(60));
    let s3 = a3.status.clone().expect("status");
    assert_eq!(
        (s3.pools[0].replicas, s3.pools[1].replicas),
        (prefill - 1, decode + 1)
    );
    let gone: Vec<(i32, Option<String>)> = roles(&s2)
        .into_iter()
        .filter(|r| !roles(&s3).contains(r))
        .collect();
    assert_eq!(gone, vec![(prefill - 1, Some("prefill".to_owned()))]);
    assert!(
        a3.apply_pods.is_empty(),
        "nothing placed: {:?}",
        a3.apply_pods
    );
    let gone_inc = incarnation(&s2, prefill - 1).expect("incarnation");
    assert!(!a3.delete_pods.is_empty());
    assert!(
        a3.delete_pods.iter().all(|p| p.contains(&gone_inc)),
        "only the removed replica's pods: {:?}",
        a3.delete_pods
    );
    for p in &s3.placements {
        assert_eq!(incarnation(&s3, p.replica), incarnation(&s2, p.replica));
    }
    assert!(
        a3.events.iter().any(|e| e.reason == "Repooled"
            && e.note
                .contains(&format!("replica {} (prefill) removed", prefill - 1))),
        "{:?}",
        a3.events
    );
    assert_eq!(
        router_counts(&a3.apply_router.expect("router rewritten")),
        (prefill as usize - 1, decode as usize + 1)
    );
}

#[test]
fn sglang_pools_run_as_gangs_behind_a_router_and_stay_put() {
    let nodes = h100_nodes(4);
    let mut md = long_prompt_deployment("sglang", 1);
    // Pass 1: both pools placed, each replica a gang in its role, the router in front.
    let a1 = decide_with_routers(&md, &[], &[], &nodes, t0());
    let s1 = a1.status.clone().expect("status");
    assert_eq!(s1.pools.len(), 2, "{s1:?}");
    let (prefill, decode) = (s1.pools[0].replicas, s1.pools[1].replicas);
    assert!(prefill >= 1 && decode >= 1, "{:?}", s1.pools);
    let c = condition(&s1, "Disaggregated");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "PoolsRunning"),
        "{}",
        c.message
    );
    assert!(c.message.contains("llama-8b-router"), "{}", c.message);
    assert_eq!(s1.placements.len() as i32, prefill + decode);
    // The scale subresource counts units, as spec.replicas does: one unit with pods, none ready.
    assert_eq!((s1.replicas, s1.ready_replicas), (1, 0));
    let count = |role: &str| {
        s1.placements
            .iter()
            .filter(|p| p.role.as_deref() == Some(role))
            .count() as i32
    };
    assert_eq!((count("prefill"), count("decode")), (prefill, decode));
    // Every pod carries its replica's pool; every replica's pods were created.
    for p in &s1.placements {
        let inc = p.incarnation.clone().unwrap();
        let pods: Vec<&Pod> = a1
            .apply_pods
            .iter()
            .filter(|x| x.metadata.name.as_deref().unwrap().contains(&inc))
            .collect();
        assert_eq!(pods.len(), p.stages.len(), "replica {}", p.replica);
        for x in pods {
            assert_eq!(pool_label(x), p.role, "{:?}", x.metadata.name);
        }
    }
    assert!(
        a1.events
            .iter()
            .any(|e| e.reason == "Placed" && e.note.contains("(prefill) placed on"))
    );
    // The decode pool runs at the batch the planner sized it for; prefill at maxConcurrency.
    let decode_batch = s1.pools[1].batch.expect("decode batch");
    assert_ne!(decode_batch, md.spec.serving.max_concurrency);
    for pod in &a1.apply_pods {
        let args = pod.spec.as_ref().unwrap().containers[0]
            .args
            .clone()
            .unwrap();
        let at = args
            .iter()
            .position(|a| a == "--max-running-requests")
            .unwrap();
        let want = match pool_label(pod).as_deref() {
            Some("decode") => decode_batch,
            _ => md.spec.serving.max_concurrency,
        };
        assert_eq!(args[at + 1], want.to_string(), "{:?}", pod.metadata.name);
    }
    let router = a1.apply_router.clone().expect("router applied");
    assert_eq!(router.metadata.name.as_deref(), Some("llama-8b-router"));
    let args = router_args(&router);
    assert!(args.contains(&"--pd-disaggregation".to_owned()), "{args:?}");
    let n_args = |flag: &str| args.iter().filter(|a| *a == flag).count() as i32;
    assert_eq!((n_args("--prefill"), n_args("--decode")), (prefill, decode));
    let svc = |name: &str| {
        a1.apply_services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no Service {name}"))
    };
    let selector = |name: &str| svc(name).spec.as_ref().unwrap().selector.clone().unwrap();
    assert_eq!(
        selector("llama-8b")
            .get("tessera.dev/router")
            .map(String::as_str),
        Some("llama-8b")
    );
    assert_eq!(
        selector("llama-8b-prefill")
            .get("tessera.dev/pool")
            .map(String::as_str),
        Some("prefill")
    );
    assert_eq!(
        selector("llama-8b-decode")
            .get("tessera.dev/pool")
            .map(String::as_str),
        Some("decode")
    );
    assert!(status_violations(&s1).is_empty());

    // Pass 2: pods up, router running: nothing moves, nothing is written but status.
    md.status = Some(s1.clone());
    let pods = ready(&a1, t0());
    let routers = vec![router];
    let a2 = decide_with_routers(&md, &pods, &routers, &nodes, at(30));
    assert!(
        a2.apply_pods.is_empty() && a2.delete_pods.is_empty(),
        "{a2:?}"
    );
    assert!(a2.apply_router.is_none() && a2.delete_routers.is_empty());
    assert!(
        !a2.events.iter().any(|e| e.reason == "Repooled"),
        "{:?}",
        a2.events
    );
    let s2 = a2.status.unwrap_or_else(|| s1.clone());
    assert_eq!(roles(&s2), roles(&s1));
    assert!(s2.placements.iter().all(|p| p.ready));
    assert_eq!((s2.replicas, s2.ready_replicas), (1, 1));

    // Pass 3: two units: the pools double, every running replica keeps its index and role, and
    // the router is rewritten with the new leaders.
    md.spec.replicas = 2;
    md.status = Some(s2.clone());
    let a3 = decide_with_routers(&md, &pods, &routers, &nodes, at(60));
    let s3 = a3.status.clone().expect("status");
    assert_eq!(s3.placements.len() as i32, 2 * (prefill + decode), "{s3:?}");
    assert_eq!((s3.replicas, s3.ready_replicas), (2, 1));
    for (replica, role) in roles(&s2) {
        let now = s3.placements.iter().find(|p| p.replica == replica).unwrap();
        assert_eq!(now.role, role, "replica {replica} changed pool");
        assert_eq!(
            now.incarnation,
            s2.placements
                .iter()
                .find(|p| p.replica == replica)
                .unwrap()
                .incarnation
        );
    }
    assert!(a3.delete_pods.is_empty(), "{:?}", a3.delete_pods);
    let router3 = a3.apply_router.expect("router rewritten");
    assert_eq!(router_counts(&router3).1 as i32, 2 * decode);

    // Pass 4: disaggregation Off: every pool replica is placed again aggregated, the router goes.
    md.spec.replicas = 1;
    md.spec.serving.disaggregation = tessera_operator::api::Disaggregation::Off;
    md.status = Some(s2);
    let a4 = decide_with_routers(&md, &pods, &routers, &nodes, at(90));
    let s4 = a4.status.clone().expect("status");
    assert_eq!(s4.placements.len(), 1, "{s4:?}");
    assert_eq!(s4.placements[0].role, None);
    assert_eq!(a4.delete_routers, vec!["llama-8b-router".to_owned()]);
    assert!(a4.events.iter().any(|e| e.reason == "Repooled"));
    assert!(a4.apply_pods.iter().all(|p| pool_label(p).is_none()));
    assert_eq!(
        a4.delete_pods.len(),
        pods.len(),
        "every pool pod goes: {:?}",
        a4.delete_pods
    );
}
