//! Which Kubernetes API calls the operator makes, derived by running its real code against a
//! recording in-memory API server: the controller's main loop (`run_with_client`: watches,
//! leader election, reconciles, the executor's writes, Events), the Lease release on shutdown,
//! and autoscaler passes that scale, size prefill/decode pools and set `ScalingLimited`. Both modes: every namespace
//! (a ClusterRole) and one watched namespace (a Role there, plus Nodes cluster-wide).
//!
//! The result must equal `tests/chart/rbac-calls.json`; `scripts/chart-test.sh` holds the
//! rendered chart's RBAC to that file in both modes, verb for verb, so the chart grants what
//! the code calls and nothing more. After a change to the calls, regenerate the file with
//! `UPDATE_RBAC_CALLS=1 cargo test -p tessera-tests --test rbac_calls` and review the diff.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use futures::future::BoxFuture;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tessera_operator::api::{ModelDeployment, parse_model_deployment};
use tessera_operator::autoscale::runner::{Runner, RunnerConfig, Scraper, Snapshot};
use tessera_operator::autoscale::scrape::ScrapeError;
use tessera_operator::cli::{Cli, Command};
use tessera_operator::controller::leader::{self, LeaderConfig};
use tessera_operator::controller::metrics::AutoscalerMetrics;
use tessera_operator::controller::reconcile::{Config, Observed, reconcile};
use tessera_operator::controller::run::{FIELD_MANAGER, run_with_client};
use tessera_tests::recording_api::{Call, FakeApi, client};
use tessera_tests::repo_root;

const WORKLOADS: &str = "inference";
const RELEASE: &str = "tessera-system";
const LEASE: &str = "tessera-operator";
/// Resources whose objects the operator names itself: grants on them are limited to the names
/// recorded (create cannot be; the object does not exist yet).
const NAMED: &[&str] = &["serviceaccounts", "leases", "configmaps"];

/// One permission: API group, resource (with subresource), verb, where, and the object names
/// when they are fixed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Grant {
    group: String,
    resource: String,
    verb: String,
    /// `cluster`, `workloads` (the watched namespace) or `release` (the operator's own).
    scope: String,
    names: Vec<String>,
}

fn deployment() -> ModelDeployment {
    let mut md = parse_model_deployment(&json!({
        "apiVersion": "tessera.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "llama-8b", "namespace": WORKLOADS, "uid": "uid-1",
                     "generation": 1, "resourceVersion": "1"},
        "spec": {
            "replicas": 1,
            "model": {"uri": "pvc://models/llama-8b", "architecture": {
                "parameters": 8030261248i64, "layers": 32, "hiddenSize": 4096,
                "attentionHeads": 32, "kvHeads": 8, "intermediateSize": 14336,
                "vocabSize": 128256, "contextLength": 131072, "bytesPerParameter": 2}},
            "parallelism": {"tensor": 2, "pipeline": 1},
            "serving": {"maxConcurrency": 16, "contextLength": 8192, "port": 8000},
            "autoscaling": {"enabled": true, "minReplicas": 1, "maxReplicas": 8,
                "metric": "queueDepth", "target": 10,
                "scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 0}
        }
    }))
    .expect("valid");
    md.metadata.uid = Some("uid-1".into());
    md
}

/// A deployment whose prefill/decode pools run (SGLang, `disaggregation: On`): its router is
/// applied, and the autoscaler sizes its pools (`spec.poolReplicas`).
fn pooled_deployment() -> Value {
    json!({
        "apiVersion": "tessera.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "chat-pd", "namespace": WORKLOADS, "uid": "uid-2",
                     "generation": 1, "resourceVersion": "1"},
        "spec": {
            "replicas": 1,
            "engine": {"name": "sglang"},
            "model": {"uri": "pvc://models/llama-8b", "architecture": {
                "parameters": 8030261248i64, "layers": 32, "hiddenSize": 4096,
                "attentionHeads": 32, "kvHeads": 8, "intermediateSize": 14336,
                "vocabSize": 128256, "contextLength": 131072, "bytesPerParameter": 2}},
            "serving": {"maxConcurrency": 16, "contextLength": 16384, "port": 8000,
                "workload": {"inputTokens": 8192, "outputTokens": 256},
                "disaggregation": "On"},
            "autoscaling": {"enabled": true, "minReplicas": 1, "maxReplicas": 8,
                "metric": "queueDepth", "target": 10,
                "scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 0}
        }
    })
}

fn node() -> Value {
    node_named("h100-1")
}

fn node_named(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {
            "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count": "8",
            "nvidia.com/gpu.memory": "81559"}},
        "status": {"allocatable": {"nvidia.com/gpu": "8"},
                   "conditions": [{"type": "Ready", "status": "True"}]}})
}

/// Every leader answers with a long queue: the autoscaler wants more replicas than fit.
/// Every leader answers with a long queue (the autoscaler wants more replicas than fit) and
/// latency histograms that move on every scrape (the calibration learns and is saved).
#[derive(Default)]
struct Busy(std::sync::atomic::AtomicU64);
impl Scraper for Busy {
    fn scrape(&self, _addr: SocketAddr) -> BoxFuture<'static, Result<String, ScrapeError>> {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed) as f64 + 1.0;
        Box::pin(async move {
            Ok(format!(
                "# TYPE tessera_requests_waiting gauge\ntessera_requests_waiting 500\n\
                # TYPE tessera_requests_running gauge\ntessera_requests_running 16\n\
                # TYPE sglang:num_queue_reqs gauge\nsglang:num_queue_reqs 500\n\
                # TYPE sglang:num_running_reqs gauge\nsglang:num_running_reqs 16\n\
                # TYPE tessera_inter_token_latency_seconds histogram\n\
                tessera_inter_token_latency_seconds_sum {}\ntessera_inter_token_latency_seconds_count {}\n",
                n * 10.0,
                n * 100.0
            ))
        })
    }
}

/// The calls of one operator configuration (`watch_namespace` set or not).
async fn calls(watch_namespace: Option<&str>) -> BTreeSet<Call> {
    let api = Arc::new(Mutex::new(FakeApi::default()));
    {
        let mut a = api.lock().expect("lock");
        a.put("", "", "nodes", node());
        for n in ["h100-2", "h100-3"] {
            a.put("", "", "nodes", node_named(n));
        }
        a.put(
            "tessera.dev",
            WORKLOADS,
            "modeldeployments",
            pooled_deployment(),
        );
        // A router left from when llama-8b ran pools: the controller deletes it.
        a.put(
            "apps",
            WORKLOADS,
            "deployments",
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "llama-8b-router", "namespace": WORKLOADS, "resourceVersion": "1",
                    "labels": {"tessera.dev/router": "llama-8b",
                               "app.kubernetes.io/managed-by": "tessera-operator"},
                    "ownerReferences": [{"apiVersion": "tessera.dev/v1alpha1", "kind": "ModelDeployment",
                        "name": "llama-8b", "uid": "uid-1", "controller": true}]},
                "spec": {"selector": {"matchLabels": {"tessera.dev/router": "llama-8b"}},
                    "template": {"metadata": {"labels": {"tessera.dev/router": "llama-8b"}},
                        "spec": {"containers": [{"name": "router", "image": "r"}]}}}}),
        );
        a.put(
            "tessera.dev",
            WORKLOADS,
            "modeldeployments",
            serde_json::to_value(deployment()).expect("json"),
        );
        // A pod of the deployment without a replica label: the controller deletes it.
        a.put(
            "",
            WORKLOADS,
            "pods",
            json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "llama-8b-stray", "namespace": WORKLOADS, "resourceVersion": "1",
                    "labels": {"tessera.dev/deployment": "llama-8b",
                               "app.kubernetes.io/managed-by": "tessera-operator"}},
                "spec": {"containers": [{"name": "worker", "image": "w"}]}}),
        );
        // A NetworkPolicy of a replica that no longer exists: the controller deletes it.
        a.put(
            "networking.k8s.io",
            WORKLOADS,
            "networkpolicies",
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "llama-8b-r7", "namespace": WORKLOADS, "resourceVersion": "1",
                    "labels": {"tessera.dev/deployment": "llama-8b",
                               "app.kubernetes.io/managed-by": "tessera-operator"},
                    "ownerReferences": [{"apiVersion": "tessera.dev/v1alpha1", "kind": "ModelDeployment",
                        "name": "llama-8b", "uid": "uid-1", "controller": true}]},
                "spec": {"podSelector": {}}}),
        );
    }
    let mut argv = vec![
        "tessera-operator",
        "run",
        "--leader-elect",
        "--lease-namespace",
        RELEASE,
        "--lease-name",
        LEASE,
        "--metrics-addr",
        "127.0.0.1:0",
        "--health-addr",
        "127.0.0.1:0",
        "--worker-network-policies",
    ];
    if let Some(ns) = watch_namespace {
        argv.extend(["--watch-namespace", ns]);
    }
    let Command::Run(args) = Cli::try_parse_from(argv).expect("arguments").command else {
        panic!("the run command");
    };
    let controller = tokio::spawn(run_with_client(client(api.clone()), args));
    // Until the controller has placed the replica, written its pods and Events and removed
    // the stray pod (or 20 s pass).
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let a = api.lock().expect("lock");
        let did =
            |resource: &str, verb: &str| a.calls.iter().any(|c| c.1 == resource && c.2 == verb);
        if did("pods", "create")
            && did("pods", "delete")
            && did("events", "create")
            && did("modeldeployments/status", "patch")
            && did("networkpolicies", "create")
            && did("networkpolicies", "delete")
            && did("deployments", "patch")
            && did("deployments", "delete")
        {
            break;
        }
    }
    if controller.is_finished() {
        panic!("the controller stopped: {:?}", controller.await);
    }
    controller.abort();
    let _ = controller.await;
    // Shutdown hands the Lease over.
    let leases: Api<Lease> = Api::namespaced(client(api.clone()), RELEASE);
    let held = api
        .lock()
        .expect("lock")
        .objects
        .get(&format!("coordination.k8s.io/{RELEASE}/leases/{LEASE}"))
        .cloned()
        .expect("the controller took the Lease");
    let holder = held["spec"]["holderIdentity"]
        .as_str()
        .expect("holder")
        .to_owned();
    let cfg_holder = LeaderConfig::new(RELEASE, LEASE, holder).expect("config");
    assert!(leader::release(&leases, &cfg_holder).await, "released");
    // The operator publishes Events through kube's Recorder, which patches the series of an
    // Event it publishes again.
    let recorder = Recorder::new(
        client(api.clone()),
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: None,
        },
    );
    let event = Event {
        type_: EventType::Warning,
        reason: "Unschedulable".into(),
        note: Some("1 of 2 replicas placed".into()),
        action: "Reconcile".into(),
        secondary: None,
    };
    let reference = deployment().object_ref(&());
    for _ in 0..2 {
        recorder.publish(&event, &reference).await.expect("event");
    }
    // One autoscaler pass over the placed replica (it scales and sets ScalingLimited) and
    // over the pools of the pooled deployment (it sizes them in its spec).
    let placed = |mut md: ModelDeployment, nodes: &[Node]| {
        let obs = Observed {
            md: &md,
            pods: &[],
            services: &[],
            routers: &[],
            nodes,
            other_pods: &[],
            reserved: &[],
            now: Timestamp::now(),
        };
        let actions = reconcile(&obs, &Config::default());
        md.status = actions.status.clone();
        let pods: Vec<Pod> = actions
            .apply_pods
            .into_iter()
            .map(|mut p| {
                let pinned =
                    tessera_operator::controller::reconcile::pinned_node(&p).map(str::to_owned);
                p.spec.as_mut().expect("spec").node_name = pinned;
                p.status = Some(
                    serde_json::from_value(json!({"phase": "Running", "podIP": "10.0.0.1",
                        "conditions": [{"type": "Ready", "status": "True"}]}))
                    .expect("status"),
                );
                p
            })
            .collect::<Vec<Pod>>();
        (md, pods)
    };
    let node_of = |name: &str| -> Node { serde_json::from_value(node_named(name)).expect("node") };
    let (md, mut pods) = placed(deployment(), &[node_of("h100-1")]);
    let mut pooled: ModelDeployment = parse_model_deployment(&pooled_deployment()).expect("pooled");
    pooled.metadata.uid = Some("uid-2".into());
    let (pooled, pool_pods) = placed(pooled, &[node_of("h100-2"), node_of("h100-3")]);
    assert!(
        pooled
            .status
            .as_ref()
            .is_some_and(|s| s.placements.iter().all(|p| p.role.is_some())),
        "the pools run"
    );
    pods.extend(pool_pods);
    let nodes = vec![node_of("h100-1"), node_of("h100-2"), node_of("h100-3")];
    let mut registry = Registry::default();
    let mut runner = Runner::new(
        client(api.clone()),
        RunnerConfig {
            calibration_namespace: Some(RELEASE.into()),
            ..RunnerConfig::default()
        },
        Config::default(),
        AutoscalerMetrics::new(&mut registry),
    )
    .with_scraper(Arc::new(Busy::default()));
    runner.load_calibration().await;
    let snap = Snapshot {
        nodes,
        pods,
        deployments: vec![md, pooled],
    };
    // Enough passes for the calibration to have its samples, and so to be saved.
    for _ in 0..5 {
        runner.pass(&snap).await;
    }
    assert!(
        !runner.calibration().is_empty(),
        "the passes calibrated the model"
    );
    api.lock().expect("lock").calls.clone()
}

/// Calls as grants: scope from the namespace, names kept for the operator-named resources.
fn grants(calls: &BTreeSet<Call>, namespaced: bool) -> Vec<Grant> {
    let mut by: BTreeMap<(String, String, String, String), BTreeSet<String>> = BTreeMap::new();
    for (group, resource, verb, ns, name) in calls {
        let scope = match ns.as_str() {
            "" => "cluster",
            RELEASE => "release",
            _ if namespaced => "workloads",
            _ => "cluster",
        };
        by.entry((
            group.clone(),
            resource.clone(),
            verb.clone(),
            scope.to_owned(),
        ))
        .or_default()
        .insert(name.clone());
    }
    by.into_iter()
        .map(|((group, resource, verb, scope), names)| {
            let base = resource.split('/').next().unwrap_or_default();
            let named = NAMED.contains(&base)
                && !matches!(verb.as_str(), "create" | "list" | "watch")
                && !names.contains("");
            Grant {
                group,
                resource,
                verb,
                scope,
                names: if named {
                    names.into_iter().collect()
                } else {
                    Vec::new()
                },
            }
        })
        .collect()
}

fn to_json(grants: &[Grant]) -> Value {
    Value::Array(
        grants
            .iter()
            .map(|g| {
                let mut v = json!({"apiGroup": g.group, "resource": g.resource, "verb": g.verb, "scope": g.scope});
                if !g.names.is_empty() {
                    v["resourceNames"] = json!(g.names);
                }
                v
            })
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_calls_the_code_makes_are_the_committed_rbac_list() {
    let cluster = grants(&calls(None).await, false);
    let namespaced = grants(&calls(Some(WORKLOADS)).await, true);
    // In namespaced mode nothing but Nodes is read outside the watched namespace (and the
    // Lease in the operator's own).
    for g in &namespaced {
        assert!(
            g.scope != "cluster" || g.resource == "nodes",
            "a cluster-wide call in namespaced mode: {g:?}"
        );
    }
    let derived = json!({
        "comment": "Derived by tests/tests/rbac_calls.rs from the calls the operator makes; the chart's RBAC must grant exactly these (scripts/chart-test.sh). Regenerate: UPDATE_RBAC_CALLS=1 cargo test -p tessera-tests --test rbac_calls",
        "admission": [{"apiGroup": "tessera.dev", "resource": "modeldeployments/finalizers", "verb": "update",
            "why": "children carry a controller ownerReference with blockOwnerDeletion; the OwnerReferencesPermissionEnforcement admission plugin requires this grant, though no call is made"}],
        "cluster": to_json(&cluster),
        "namespaced": to_json(&namespaced),
    });
    let path = repo_root().join("tests/chart/rbac-calls.json");
    let text = serde_json::to_string_pretty(&derived).expect("json") + "\n";
    if std::env::var_os("UPDATE_RBAC_CALLS").is_some() {
        std::fs::write(&path, &text).expect("write");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == text,
        "the operator's API calls changed; review and regenerate {} with UPDATE_RBAC_CALLS=1 cargo test -p tessera-tests --test rbac_calls\nderived:\n{text}",
        path.display()
    );
}
