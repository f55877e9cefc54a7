//! Scripted API scenarios (tower-test): the exact requests the controller makes for the create,
//! scale up, scale down, recreate and delete flows, driven through the real reconcile and
//! executor.

mod common;

use common::h100_node as node;

use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::{Node, Pod, PodStatus};
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector;
use prometheus_client::registry::Registry;
use serde_json::json;
use tessera_operator::api::{ModelDeployment, parse_model_deployment};
use tessera_operator::controller::metrics::Metrics;
use tessera_operator::controller::reconcile::{Config, Observed, incarnation_for, reconcile};
use tessera_operator::controller::run::{Context, execute};

/// Name of the first pod of `replica` in the deployment's incarnation number `seq`.
fn pod_of(replica: i32, seq: i64) -> String {
    format!("llama-8b-r{replica}-{}-s0", incarnation_for("uid-1", seq))
}

fn deployment() -> ModelDeployment {
    let mut md = parse_model_deployment(&json!({
        "apiVersion": "tessera.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "llama-8b", "namespace": "inference"},
        "spec": {
            "replicas": 1,
            "model": {"uri": "pvc://models/llama-8b", "architecture": {
                "parameters": 8030261248i64, "layers": 32, "hiddenSize": 4096,
                "attentionHeads": 32, "kvHeads": 8, "intermediateSize": 14336,
                "vocabSize": 128256, "contextLength": 131072, "bytesPerParameter": 2}},
            "parallelism": {"tensor": 2, "pipeline": 1},
            "serving": {"maxConcurrency": 16, "contextLength": 8192}
        }
    }))
    .expect("valid");
    md.metadata.uid = Some("uid-1".into());
    md.metadata.generation = Some(1);
    md
}

/// What the controller sees of `md` on `nodes`, with nothing else in the cluster, now.
fn observe<'a>(
    md: &'a ModelDeployment,
    pods: &'a [Pod],
    services: &'a [k8s_openapi::api::core::v1::Service],
    nodes: &'a [Node],
) -> Observed<'a> {
    Observed {
        md,
        pods,
        services,
        routers: &[],
        nodes,
        other_pods: &[],
        reserved: &[],
        now: Timestamp::now(),
    }
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

struct Seen {
    method: Method,
    path: String,
    query: String,
    content_type: String,
    body: serde_json::Value,
}

/// Answer every request with its own body (what an apply returns) and record it.
async fn serve(
    mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    n: usize,
) -> Vec<Seen> {
    let mut seen = Vec::new();
    for _ in 0..n {
        let (req, send) = handle.next_request().await.expect("a request");
        let (parts, body) = req.into_parts();
        let bytes = body.collect_bytes().await.expect("body").to_vec();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or(json!(null));
        let reply = if parts.method == Method::DELETE {
            json!({"apiVersion": "v1", "kind": "Status", "status": "Success"})
        } else if parts.uri.path().ends_with("/status") {
            // The API server answers a status apply with the whole object.
            let mut whole = serde_json::to_value(deployment()).expect("json");
            whole["status"] = body["status"].clone();
            whole
        } else {
            body.clone()
        };
        send.send_response(
            Response::builder()
                .body(Body::from(serde_json::to_vec(&reply).expect("json")))
                .expect("response"),
        );
        seen.push(Seen {
            method: parts.method,
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().unwrap_or_default().to_owned(),
            content_type: parts
                .headers
                .get("content-type")
                .map(|v| v.to_str().expect("ascii").to_owned())
                .unwrap_or_default(),
            body,
        });
    }
    seen
}

fn assert_apply(s: &Seen, path: &str) {
    assert_eq!(s.method, Method::PATCH, "{path}");
    assert_eq!(s.path, path);
    assert!(
        s.query.contains("fieldManager=tessera-operator"),
        "{}",
        s.query
    );
    assert!(s.query.contains("force=true"), "{}", s.query);
    assert_eq!(s.content_type, "application/apply-patch+yaml");
}

#[tokio::test]
async fn create_flow_applies_account_services_pod_and_status() {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(kube::Client::new(service, "default"));
    let md = deployment();
    let nodes = [node()];
    let obs = observe(&md, &[], &[], &nodes);
    let actions = reconcile(&obs, &ctx.config);
    assert_eq!(actions.apply_pods.len(), 1);
    assert_eq!(actions.apply_services.len(), 2);
    let events = actions.events.len();
    let server = tokio::spawn(serve(handle, 6 + events));
    execute(&ctx, &md, actions).await.expect("executes");
    drop(ctx);
    let seen = server.await.expect("script");
    // Intent first: the placement and its incarnation number, before any pod exists.
    assert_apply(
        &seen[0],
        "/apis/tessera.dev/v1alpha1/namespaces/inference/modeldeployments/llama-8b/status",
    );
    assert_eq!(
        seen[0].body["status"]["placements"][0]["stages"][0]["node"],
        "h100-1"
    );
    assert_eq!(seen[0].body["status"]["incarnations"], 1);
    assert_eq!(
        seen[0].body["status"]["placements"][0]["incarnation"],
        incarnation_for("uid-1", 0)
    );
    assert_eq!(seen[0].body["kind"], "ModelDeployment");
    assert_apply(
        &seen[1],
        "/api/v1/namespaces/inference/serviceaccounts/tessera-worker",
    );
    assert_eq!(seen[1].body["automountServiceAccountToken"], false);
    assert_apply(
        &seen[2],
        "/api/v1/namespaces/inference/services/llama-8b-workers",
    );
    assert_apply(&seen[3], "/api/v1/namespaces/inference/services/llama-8b");
    // The disruption budget: one worker pod (so one replica) evicted at a time.
    assert_apply(
        &seen[4],
        "/apis/policy/v1/namespaces/inference/poddisruptionbudgets/llama-8b-workers",
    );
    assert_eq!(seen[4].body["spec"]["maxUnavailable"], 1);
    assert_eq!(
        seen[4].body["spec"]["selector"]["matchLabels"]["tessera.dev/deployment"],
        "llama-8b"
    );
    assert_apply(
        &seen[5],
        &format!("/api/v1/namespaces/inference/pods/{}", pod_of(0, 0)),
    );
    assert_eq!(
        seen[5].body["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
        "2"
    );
    // Then the Events (events.k8s.io), one per decision.
    for s in &seen[6..] {
        assert_eq!(s.method, Method::POST);
        assert_eq!(s.path, "/apis/events.k8s.io/v1/namespaces/inference/events");
    }
}

#[tokio::test]
async fn recreate_flow_deletes_the_failed_group_then_applies_the_new_incarnation() {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(kube::Client::new(service, "default"));
    let mut md = deployment();
    let nodes = [node()];
    // First pass: place and build.
    let first = {
        let obs = observe(&md, &[], &[], &nodes);
        reconcile(&obs, &ctx.config)
    };
    md.status = first.status.clone();
    let mut pod: Pod = first.apply_pods[0].clone();
    pod.status = Some(PodStatus {
        phase: Some("Failed".into()),
        reason: Some("Error".into()),
        ..PodStatus::default()
    });
    // Second pass: the member failed -> the group is removed (backoff before recreation).
    let obs = observe(
        &md,
        std::slice::from_ref(&pod),
        &first.apply_services,
        &nodes,
    );
    let actions = reconcile(&obs, &ctx.config);
    assert!(
        actions.apply_pods.is_empty(),
        "recreation waits for the backoff"
    );
    assert_eq!(actions.delete_pods, [pod_of(0, 0)]);
    let events = actions.events.len();
    let server = tokio::spawn(serve(handle, 2 + events));
    execute(&ctx, &md, actions).await.expect("executes");
    drop(ctx);
    let seen = server.await.expect("script");
    assert_apply(
        &seen[0],
        "/apis/tessera.dev/v1alpha1/namespaces/inference/modeldeployments/llama-8b/status",
    );
    assert_eq!(seen[0].body["status"]["placements"][0]["state"], "Backoff");
    assert_eq!(seen[0].body["status"]["placements"][0]["restarts"], 1);
    assert_eq!(seen[1].method, Method::DELETE);
    assert_eq!(
        seen[1].path,
        format!("/api/v1/namespaces/inference/pods/{}", pod_of(0, 0))
    );
}

#[test]
fn the_workers_exit_message_reaches_status() {
    let ctx_cfg = Config::default();
    let mut md = deployment();
    let nodes = [node()];
    let first = {
        let obs = observe(&md, &[], &[], &nodes);
        reconcile(&obs, &ctx_cfg)
    };
    md.status = first.status.clone();
    let mut pod: Pod = first.apply_pods[0].clone();
    pod.status = Some(
        serde_json::from_value(json!({
            "phase": "Running",
            "containerStatuses": [{
                "name": "worker", "image": "w", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 3, "reason": "Error",
                    "message": "model: sha256 of /model-cache/llama.gguf is ab12..., expected cd34...\nmore"}}
            }]
        }))
        .expect("status"),
    );
    let obs = observe(
        &md,
        std::slice::from_ref(&pod),
        &first.apply_services,
        &nodes,
    );
    let actions = reconcile(&obs, &ctx_cfg);
    let status = actions.status.expect("status changes");
    let expected = format!(
        "container worker of pod {} exited with code 3 (Error): model: sha256 of /model-cache/llama.gguf is ab12..., expected cd34...",
        pod_of(0, 0)
    );
    assert_eq!(
        status.placements[0].last_failure.as_deref(),
        Some(expected.as_str())
    );
    let degraded = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .expect("Degraded");
    assert_eq!(degraded.status, "True");
    assert!(degraded.message.contains(&expected), "{}", degraded.message);
}

/// A model fetch that failed (an init container) reaches status with its message, even once
/// the kubelet has marked the pod Failed; a completed fetch (exit 0) is no failure.
#[test]
fn a_failed_model_fetch_reaches_status_with_its_message() {
    let ctx_cfg = Config::default();
    let mut md = deployment();
    let nodes = [node()];
    let first = {
        let obs = observe(&md, &[], &[], &nodes);
        reconcile(&obs, &ctx_cfg)
    };
    md.status = first.status.clone();
    let with_status = |status: serde_json::Value| {
        let mut pod: Pod = first.apply_pods[0].clone();
        pod.status = Some(serde_json::from_value(status).expect("status"));
        pod
    };
    let failed = with_status(json!({
        "phase": "Failed",
        "initContainerStatuses": [{
            "name": "fetch-model", "image": "w", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 1, "reason": "Error",
                "message": "downloading the model from https://models.example/m.gguf (--uri): HTTP 404 for https://models.example/m.gguf"}}
        }],
        "containerStatuses": [{
            "name": "worker", "image": "w", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "PodInitializing"}}
        }]
    }));
    let obs = observe(
        &md,
        std::slice::from_ref(&failed),
        &first.apply_services,
        &nodes,
    );
    let status = reconcile(&obs, &ctx_cfg).status.expect("status changes");
    let expected = format!(
        "container fetch-model of pod {} exited with code 1 (Error): downloading the model from https://models.example/m.gguf (--uri): HTTP 404 for https://models.example/m.gguf",
        pod_of(0, 0)
    );
    assert_eq!(
        status.placements[0].last_failure.as_deref(),
        Some(expected.as_str())
    );

    // A completed fetch while the engine starts: nothing failed.
    let starting = with_status(json!({
        "phase": "Running",
        "initContainerStatuses": [{
            "name": "fetch-model", "image": "w", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}
        }],
        "containerStatuses": [{
            "name": "worker", "image": "w", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"running": {}}
        }]
    }));
    let obs = observe(
        &md,
        std::slice::from_ref(&starting),
        &first.apply_services,
        &nodes,
    );
    let actions = reconcile(&obs, &ctx_cfg);
    assert!(actions.delete_pods.is_empty(), "{:?}", actions.delete_pods);
    let st = actions.status.unwrap_or_else(|| md.status.clone().unwrap());
    assert!(
        st.placements[0].last_failure.is_none(),
        "{:?}",
        st.placements[0].last_failure
    );
}

/// A pod of the first pass as the kubelet reports it once its worker is up.
fn running(mut pod: Pod) -> Pod {
    pod.status = Some(
        serde_json::from_value(json!({
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{
                "name": "worker", "image": "w", "imageID": "", "ready": true, "restartCount": 0,
                "state": {"running": {}}
            }]
        }))
        .expect("status"),
    );
    pod.spec.as_mut().expect("spec").node_name = Some("h100-1".into());
    pod
}

/// Reconcile `md` at `replicas` from scratch until it runs: its status and running pods.
fn converged(
    replicas: i32,
    cfg: &Config,
) -> (
    ModelDeployment,
    Vec<Pod>,
    Vec<k8s_openapi::api::core::v1::Service>,
) {
    let mut md = deployment();
    md.spec.replicas = replicas;
    let nodes = [node()];
    let obs = observe(&md, &[], &[], &nodes);
    let first = reconcile(&obs, cfg);
    md.status = first.status.clone();
    let pods = first.apply_pods.into_iter().map(running).collect();
    (md, pods, first.apply_services)
}

#[tokio::test]
async fn scale_up_flow_applies_only_the_new_replica_and_status() {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(kube::Client::new(service, "default"));
    // This operator process applied the namespace's worker ServiceAccount already.
    ctx.service_accounts
        .lock()
        .unwrap()
        .insert("inference".into());
    let (mut md, pods, services) = converged(1, &ctx.config);
    md.spec.replicas = 2;
    md.metadata.generation = Some(2);
    let nodes = [node()];
    let obs = observe(&md, &pods, &services, &nodes);
    let actions = reconcile(&obs, &ctx.config);
    assert_eq!(actions.apply_pods.len(), 1, "{:?}", actions.apply_pods);
    assert!(actions.delete_pods.is_empty());
    assert!(actions.apply_services.is_empty(), "services are unchanged");
    let events = actions.events.len();
    let server = tokio::spawn(serve(handle, 3 + events));
    execute(&ctx, &md, actions).await.expect("executes");
    drop(ctx);
    let seen = server.await.expect("script");
    assert_apply(
        &seen[0],
        "/apis/tessera.dev/v1alpha1/namespaces/inference/modeldeployments/llama-8b/status",
    );
    let placements = seen[0].body["status"]["placements"].as_array().unwrap();
    assert_eq!(placements.len(), 2);
    assert_eq!(seen[0].body["status"]["observedGeneration"], 2);
    assert_eq!(seen[0].body["status"]["incarnations"], 2);
    assert_apply(
        &seen[1],
        "/apis/policy/v1/namespaces/inference/poddisruptionbudgets/llama-8b-workers",
    );
    assert_apply(
        &seen[2],
        &format!("/api/v1/namespaces/inference/pods/{}", pod_of(1, 1)),
    );
    assert_eq!(
        seen[2].body["metadata"]["labels"]["tessera.dev/replica"],
        "1"
    );
}

#[tokio::test]
async fn scale_down_flow_deletes_the_highest_replica_first() {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(kube::Client::new(service, "default"));
    let (mut md, pods, services) = converged(3, &ctx.config);
    assert_eq!(pods.len(), 3);
    md.spec.replicas = 2;
    md.metadata.generation = Some(2);
    let nodes = [node()];
    let obs = observe(&md, &pods, &services, &nodes);
    let actions = reconcile(&obs, &ctx.config);
    assert!(actions.apply_pods.is_empty());
    let replica2 = pods
        .iter()
        .find(|p| p.metadata.labels.as_ref().unwrap()["tessera.dev/replica"] == "2")
        .unwrap();
    assert_eq!(
        actions.delete_pods,
        [replica2.metadata.name.clone().unwrap()]
    );
    let events = actions.events.len();
    let server = tokio::spawn(serve(handle, 2 + events));
    execute(&ctx, &md, actions).await.expect("executes");
    drop(ctx);
    let seen = server.await.expect("script");
    assert_eq!(seen[1].method, Method::DELETE);
    assert_eq!(
        seen[1].path,
        format!(
            "/api/v1/namespaces/inference/pods/{}",
            replica2.metadata.name.as_deref().unwrap()
        )
    );
    let placements = seen[0].body["status"]["placements"].as_array().unwrap();
    assert_eq!(placements.len(), 2);
    assert!(placements.iter().all(|p| p["replica"] != 2));
}

#[tokio::test]
async fn scale_down_removes_an_unready_replica_before_a_higher_ready_one() {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(kube::Client::new(service, "default"));
    let (mut md, mut pods, services) = converged(3, &ctx.config);
    // Replica 0 is not ready (still loading its model).
    let r0 = pods
        .iter_mut()
        .find(|p| p.metadata.labels.as_ref().unwrap()["tessera.dev/replica"] == "0")
        .unwrap();
    r0.status = Some(
        serde_json::from_value(json!({"phase": "Running",
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [{"name": "worker", "image": "w", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"running": {}}}]}))
        .unwrap(),
    );
    let r0_name = r0.metadata.name.clone().unwrap();
    md.spec.replicas = 2;
    let nodes = [node()];
    let obs = observe(&md, &pods, &services, &nodes);
    let actions = reconcile(&obs, &ctx.config);
    assert_eq!(actions.delete_pods, std::slice::from_ref(&r0_name));
    let events = actions.events.len();
    let server = tokio::spawn(serve(handle, 2 + events));
    execute(&ctx, &md, actions).await.expect("executes");
    drop(ctx);
    let seen = server.await.expect("script");
    assert_eq!(seen[1].method, Method::DELETE);
    assert!(seen[1].path.ends_with(&r0_name));
}

/// Deleting a ModelDeployment needs no request from the controller: every child carries a
/// controller owner reference, so the garbage collector removes them.
#[test]
fn delete_flow_relies_on_owner_references_on_every_child() {
    let cfg = Config::default();
    let md = deployment();
    let nodes = [node()];
    let obs = observe(&md, &[], &[], &nodes);
    let actions = reconcile(&obs, &cfg);
    let metas = actions
        .apply_pods
        .iter()
        .map(|p| &p.metadata)
        .chain(actions.apply_services.iter().map(|s| &s.metadata));
    let mut n = 0;
    for m in metas {
        let owners = m.owner_references.as_ref().expect("owner references");
        assert_eq!(owners.len(), 1, "{:?}", m.name);
        assert_eq!(owners[0].kind, "ModelDeployment");
        assert_eq!(owners[0].uid, "uid-1");
        assert_eq!(owners[0].controller, Some(true));
        n += 1;
    }
    assert_eq!(n, 3);
    assert!(
        md.metadata.finalizers.is_none(),
        "no finalizer: nothing outside the cluster to clean"
    );
}

/// With worker NetworkPolicies on, scaling 3 → 2 deletes the removed replica's policy and
/// leaves the others alone (their spec hash is unchanged); a new deployment gets one per
/// replica.
#[tokio::test]
async fn network_policies_follow_the_replica_groups() {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use kube::runtime::watcher;
    use tessera_operator::build::{self, NetworkPolicyOptions};

    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let mut ctx = context(kube::Client::new(service, "default"));
    ctx.config.build.network_policies = Some(NetworkPolicyOptions {
        monitoring_namespace: "monitoring".into(),
        ..NetworkPolicyOptions::default()
    });
    ctx.service_accounts
        .lock()
        .unwrap()
        .insert("inference".into());
    let (mut md, pods, services) = converged(3, &ctx.config);
    // Creating them: one policy per replica group.
    let first = {
        let nodes = [node()];
        let obs = observe(&md, &[], &[], &nodes);
        reconcile(&obs, &ctx.config)
    };
    assert_eq!(first.network_policies.len(), 3);
    let (applied, none) = build::network_policy_changes(&first.network_policies, &[]);
    assert!(none.is_empty());
    // The cluster holds those three; the controller's store sees them.
    let (store, mut writer) = reflector::store::<NetworkPolicy>();
    for p in &applied {
        writer.apply_watcher_event(&watcher::Event::Apply(p.clone()));
    }
    ctx.network_policies = Some(store);

    md.spec.replicas = 2;
    let nodes = [node()];
    let obs = observe(&md, &pods, &services, &nodes);
    let actions = reconcile(&obs, &ctx.config);
    assert_eq!(actions.network_policies.len(), 2);
    let deletes = actions.delete_pods.len();
    let events = actions.events.len();
    let server = tokio::spawn(serve(handle, 1 + deletes + 1 + events));
    execute(&ctx, &md, actions).await.expect("executes");
    drop(ctx);
    let seen = server.await.expect("script");
    // First the status (intent), then the stale policy (after the Services, of which there
    // are none to write)...
    assert!(seen[0].path.ends_with("/status"), "{}", seen[0].path);
    assert_eq!(seen[1].method, Method::DELETE);
    assert_eq!(
        seen[1].path,
        "/apis/networking.k8s.io/v1/namespaces/inference/networkpolicies/llama-8b-r2"
    );
    // ...and no apply of the two unchanged policies anywhere.
    assert!(
        seen.iter()
            .all(|s| !(s.method == Method::PATCH && s.path.contains("networkpolicies"))),
        "unchanged policies were written again"
    );
}
