//! An in-memory Kubernetes API (a tower Service behind a real `kube::Client`) with fault
//! injection, driving the real reconcile and executor: a converged state makes zero writes, a
//! crash after any write followed by a restart leaves no duplicates and no orphans, and 409
//! conflicts and 5xx errors converge.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use http::{Method, StatusCode};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tessera_operator::api::{ModelDeployment, parse_model_deployment};
use tessera_operator::build::labels;
use tessera_operator::controller::metrics::Metrics;
use tessera_operator::controller::reconcile::{Config, Observed, reconcile};
use tessera_operator::controller::run::{Context, execute};

/// The API server's state: objects by (kind, namespace, name), plus fault injection.
#[derive(Default)]
struct State {
    objects: BTreeMap<(String, String, String), Value>,
    resource_version: u64,
    writes: usize,
    /// Fail the write with this index (0-based, counting every write) with this status.
    fail_at: BTreeMap<usize, u16>,
    /// Fail every write with probability 1/n using this seed (0 = never).
    chaos: Option<(u64, u64)>,
}

impl State {
    fn next_rv(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }

    fn chaos_hit(&mut self) -> Option<u16> {
        let (seed, n) = self.chaos.as_mut()?;
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 33) % *n == 0).then_some(if (*seed >> 20) % 2 == 0 { 409 } else { 503 })
    }
}

fn status_body(code: u16, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code,
           "reason": if code == 409 { "Conflict" } else { "ServiceUnavailable" }, "message": message})
}

/// Route one request.
fn handle(state: &Mutex<State>, method: &Method, path: &str, body: &[u8]) -> (StatusCode, Value) {
    let mut st = state.lock().expect("lock");
    // /api/v1/namespaces/NS/KIND/NAME[/status] or /apis/GROUP/VERSION/namespaces/NS/KIND/NAME[/status]
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let ns_at = parts
        .iter()
        .position(|p| *p == "namespaces")
        .expect("namespaced path");
    let ns = parts[ns_at + 1].to_owned();
    let kind = parts[ns_at + 2].to_owned();
    let name = parts.get(ns_at + 3).map(|s| s.to_string());
    let subresource = parts.get(ns_at + 4).copied();
    let is_write = *method != Method::GET;
    if is_write && kind != "events" {
        let index = st.writes;
        st.writes += 1;
        if let Some(code) = st.fail_at.remove(&index).or_else(|| st.chaos_hit()) {
            return (
                StatusCode::from_u16(code).expect("code"),
                status_body(code, "injected fault"),
            );
        }
    }
    match (method.clone(), name) {
        (Method::POST, None) if kind == "events" => (
            StatusCode::CREATED,
            serde_json::from_slice(body).expect("event"),
        ),
        (Method::PATCH, Some(name)) => {
            let applied: Value = serde_json::from_slice(body).expect("apply body");
            let key = (kind.clone(), ns, name.clone());
            let rv = st.next_rv();
            let obj = if subresource == Some("status") {
                let Some(obj) = st.objects.get_mut(&key) else {
                    return (StatusCode::NOT_FOUND, status_body(404, "not found"));
                };
                // A resourceVersion in the applied object is a precondition.
                if let Some(want) = applied["metadata"]["resourceVersion"].as_str()
                    && obj["metadata"]["resourceVersion"].as_str() != Some(want)
                {
                    return (
                        StatusCode::CONFLICT,
                        status_body(409, "the object has been modified"),
                    );
                }
                obj["status"] = applied["status"].clone();
                obj["metadata"]["resourceVersion"] = json!(rv);
                obj.clone()
            } else {
                let mut obj = applied;
                let old = st.objects.get(&key).cloned();
                obj["metadata"]["resourceVersion"] = json!(rv);
                obj["metadata"]["uid"] = old.as_ref().map_or_else(
                    || json!(format!("uid-{kind}-{name}")),
                    |o| o["metadata"]["uid"].clone(),
                );
                if let Some(status) = old.as_ref().and_then(|o| o.get("status")) {
                    obj["status"] = status.clone();
                }
                st.objects.insert(key, obj.clone());
                obj
            };
            (StatusCode::OK, obj)
        }
        (Method::DELETE, Some(name)) => match st.objects.remove(&(kind, ns, name)) {
            Some(_) => (
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "Status", "status": "Success"}),
            ),
            None => (StatusCode::NOT_FOUND, status_body(404, "not found")),
        },
        (Method::GET, Some(name)) => match st.objects.get(&(kind, ns, name)) {
            Some(o) => (StatusCode::OK, o.clone()),
            None => (StatusCode::NOT_FOUND, status_body(404, "not found")),
        },
        (m, n) => panic!("unexpected request {m} {path} ({n:?})"),
    }
}

fn client(state: Arc<Mutex<State>>) -> kube::Client {
    tessera_tests::recording_api::client_from(move |method, path, _query, body| {
        let (code, v) = handle(&state, method, path, body);
        (code.as_u16(), v)
    })
}

fn context(client: kube::Client) -> Context {
    let mut registry = Registry::default();
    Context::new(
        client.clone(),
        Config::default(),
        reflector::store().0,
        reflector::store().0,
        reflector::store().0,
        reflector::store().0,
        None,
        reflector::store().0,
        Recorder::new(
            client,
            Reporter {
                controller: "tessera-operator".into(),
                instance: None,
            },
        ),
        Metrics::new(&mut registry),
    )
}

fn nodes() -> Vec<Node> {
    (0..2)
        .map(|i| {
            serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": format!("h100-{i}"), "labels": {
                    "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count": "8",
                    "nvidia.com/gpu.memory": "81559"}},
                "status": {"allocatable": {"nvidia.com/gpu": "8"}, "conditions": [{"type": "Ready", "status": "True"}]}
            }))
            .expect("node")
        })
        .collect()
}

fn deployment_json() -> Value {
    let md = parse_model_deployment(&json!({
        "apiVersion": "tessera.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "llama-8b", "namespace": "inference", "uid": "uid-md", "generation": 1},
        "spec": {
            "replicas": 3,
            "model": {"uri": "pvc://models/llama-8b", "architecture": {
                "parameters": 8030261248i64, "layers": 32, "hiddenSize": 4096,
                "attentionHeads": 32, "kvHeads": 8, "intermediateSize": 14336,
                "vocabSize": 128256, "contextLength": 131072, "bytesPerParameter": 2}},
            "parallelism": {"tensor": 2, "pipeline": 1},
            "serving": {"maxConcurrency": 16, "contextLength": 8192}
        }
    }))
    .expect("valid");
    serde_json::to_value(md).expect("json")
}

fn seed_state() -> Arc<Mutex<State>> {
    let mut st = State::default();
    st.objects.insert(
        (
            "modeldeployments".into(),
            "inference".into(),
            "llama-8b".into(),
        ),
        deployment_json(),
    );
    Arc::new(Mutex::new(st))
}

/// The kubelet: every pod runs and is ready.
fn kubelet(state: &Mutex<State>) {
    let mut st = state.lock().expect("lock");
    for ((kind, _, _), obj) in st.objects.iter_mut() {
        if kind == "pods" {
            obj["status"] =
                json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]});
        }
    }
}

/// One reconcile from the API's current state. Returns Err when the executor failed.
async fn reconcile_once(state: &Arc<Mutex<State>>, ctx: &Context) -> Result<(), String> {
    let (md, pods, services) = {
        let st = state.lock().expect("lock");
        let md: ModelDeployment = serde_json::from_value(
            st.objects[&(
                "modeldeployments".into(),
                "inference".into(),
                "llama-8b".into(),
            )]
                .clone(),
        )
        .expect("md");
        let of = |kind: &str| -> Vec<Value> {
            st.objects
                .iter()
                .filter(|((k, _, _), _)| k == kind)
                .map(|(_, v)| v.clone())
                .collect()
        };
        let pods: Vec<Pod> = of("pods")
            .into_iter()
            .map(|v| serde_json::from_value(v).expect("pod"))
            .collect();
        let services: Vec<Service> = of("services")
            .into_iter()
            .map(|v| serde_json::from_value(v).expect("svc"))
            .collect();
        (md, pods, services)
    };
    let nodes = nodes();
    let obs = Observed {
        md: &md,
        pods: &pods,
        services: &services,
        routers: &[],
        nodes: &nodes,
        other_pods: &[],
        reserved: &[],
        now: Timestamp::now(),
    };
    let actions = reconcile(&obs, &ctx.config);
    execute(ctx, &md, actions).await.map_err(|e| e.to_string())
}

fn writes(state: &Mutex<State>) -> usize {
    state.lock().expect("lock").writes
}

/// No replica has pods of two incarnations, every pod has one controller owner, and the
/// replicas in status each have exactly their pod.
fn check_no_duplicates_or_orphans(state: &Mutex<State>) {
    let st = state.lock().expect("lock");
    let md: ModelDeployment = serde_json::from_value(
        st.objects[&(
            "modeldeployments".into(),
            "inference".into(),
            "llama-8b".into(),
        )]
            .clone(),
    )
    .expect("md");
    let mut by_replica: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for ((kind, _, name), obj) in &st.objects {
        if kind != "pods" {
            continue;
        }
        let pod: Pod = serde_json::from_value(obj.clone()).expect("pod");
        let owners = pod.metadata.owner_references.unwrap_or_default();
        assert_eq!(
            owners.iter().filter(|o| o.controller == Some(true)).count(),
            1,
            "{name}"
        );
        let l = pod.metadata.labels.unwrap_or_default();
        by_replica
            .entry(l[labels::REPLICA].clone())
            .or_default()
            .insert(l[labels::INCARNATION].clone());
    }
    for (replica, incs) in &by_replica {
        assert_eq!(
            incs.len(),
            1,
            "replica {replica} has pods of incarnations {incs:?}"
        );
    }
    if let Some(status) = &md.status {
        let placed: BTreeSet<String> = status
            .placements
            .iter()
            .map(|p| p.replica.to_string())
            .collect();
        let with_pods: BTreeSet<String> = by_replica.keys().cloned().collect();
        assert!(
            with_pods.is_subset(&placed),
            "orphan pods of replicas {:?}",
            with_pods.difference(&placed).collect::<Vec<_>>()
        );
    }
}

async fn converge(state: &Arc<Mutex<State>>, ctx: &Context, max: usize) -> usize {
    for round in 1..=max {
        let before = writes(state);
        let ok = reconcile_once(state, ctx).await.is_ok();
        kubelet(state);
        check_no_duplicates_or_orphans(state);
        if ok && writes(state) == before {
            return round;
        }
    }
    panic!("no convergence in {max} rounds");
}

#[tokio::test]
async fn a_converged_state_makes_zero_writes() {
    let state = seed_state();
    let ctx = context(client(state.clone()));
    let rounds = converge(&state, &ctx, 10).await;
    assert!(rounds <= 4, "{rounds}");
    let pods = state
        .lock()
        .expect("lock")
        .objects
        .keys()
        .filter(|k| k.0 == "pods")
        .count();
    assert_eq!(pods, 3);
    let before = writes(&state);
    for _ in 0..5 {
        reconcile_once(&state, &ctx).await.expect("reconcile");
    }
    assert_eq!(
        writes(&state),
        before,
        "a converged reconcile writes nothing"
    );
}

#[tokio::test]
async fn a_crash_after_any_write_then_a_restart_leaves_no_duplicates_or_orphans() {
    // Count the writes of a clean run from scratch, then crash after each one in turn.
    let clean = seed_state();
    let ctx = context(client(clean.clone()));
    converge(&clean, &ctx, 10).await;
    let total = writes(&clean);
    assert!(total >= 6, "{total}");
    for crash_at in 0..total {
        let state = seed_state();
        state.lock().expect("lock").fail_at.insert(crash_at, 500);
        // The "crashed" operator: its reconcile stops at the failing write.
        let first = context(client(state.clone()));
        let _ = reconcile_once(&state, &first).await;
        drop(first);
        // A restarted operator: fresh memory (and a different incarnation counter).
        let restarted = context(client(state.clone()));
        converge(&state, &restarted, 10).await;
        check_no_duplicates_or_orphans(&state);
        let st = state.lock().expect("lock");
        let pods = st.objects.keys().filter(|k| k.0 == "pods").count();
        assert_eq!(pods, 3, "crash at write {crash_at}");
    }
}

#[tokio::test]
async fn conflicts_and_server_errors_converge() {
    for seed in [3u64, 11, 29] {
        let state = seed_state();
        state.lock().expect("lock").chaos = Some((seed, 3));
        let ctx = context(client(state.clone()));
        for _ in 0..30 {
            let _ = reconcile_once(&state, &ctx).await;
            kubelet(&state);
            check_no_duplicates_or_orphans(&state);
        }
        state.lock().expect("lock").chaos = None;
        let rounds = converge(&state, &ctx, 10).await;
        assert!(rounds <= 5, "seed {seed}: {rounds}");
        let st = state.lock().expect("lock");
        assert_eq!(st.objects.keys().filter(|k| k.0 == "pods").count(), 3);
    }
}
