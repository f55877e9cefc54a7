//! `tessera-operator run`: kube-runtime's Controller around the pure [`reconcile`].
//!
//! Watches: ModelDeployments (primary), their Pods and Services (owned), and Nodes (a Node
//! change requeues the deployments placed on it). Reflector stores of Nodes and Pods feed the
//! planner's inventory. Watch errors are logged and retried by the watcher's backoff, so one
//! malformed object never stalls a watch. Writes are server-side apply under the field manager
//! `tessera-operator` (forced), status through the `/status` subresource.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType as KubeEventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use prometheus_client::registry::Registry;

use super::cache;
use super::expect::{Expectations, Promises, Seen};
use super::leader::{self, LeaderConfig};
use super::metrics::{CategoryLabel, Metrics, ResultLabel};
use super::reconcile::{self, Actions, Config, EventType, Observed, reserved_by_others};
use crate::api::{ModelDeployment, ModelDeploymentStatus, ReplicaState};
use crate::build::{self, labels};
use crate::cli::RunArgs;

/// Field manager of every write the controller makes.
pub const FIELD_MANAGER: &str = "tessera-operator";

/// Errors of one reconcile, with a bounded category for metrics and Events.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("serialising {0}")]
    Serialize(#[from] serde_json::Error),
}

impl Error {
    /// A bounded label value.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(e)) if e.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(e)) if e.code == 403 => "forbidden",
            Error::Kube(kube::Error::Api(e)) if e.code == 404 => "not_found",
            Error::Kube(kube::Error::Api(e)) if e.code >= 500 => "server",
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "transport",
            Error::Serialize(_) => "internal",
        }
    }
}

/// A source of the current time (the simulations drive their own).
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// Shared state of the reconciles.
pub struct Context {
    pub client: Client,
    pub config: Config,
    pub nodes: Store<Node>,
    pub pods: Store<Pod>,
    pub services: Store<Service>,
    /// The operator's Deployments: routers in front of prefill/decode pools.
    pub routers: Store<Deployment>,
    /// The operator's NetworkPolicies, when `--worker-network-policies` is on.
    pub network_policies: Option<Store<NetworkPolicy>>,
    pub deployments: Store<ModelDeployment>,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// Consecutive failures per object, for per-object exponential backoff.
    pub failures: Mutex<HashMap<String, u32>>,
    /// Namespaces whose worker ServiceAccount this process has applied.
    pub service_accounts: Mutex<BTreeSet<String>>,
    /// Pods created and deleted that the pod cache does not show yet.
    pub expectations: Mutex<Expectations>,
    /// Placements written to status that the deployment cache does not show yet.
    pub promises: Mutex<Promises>,
    /// Held from planning to the last write of a reconcile: two deployments reconciled at
    /// once would otherwise both be promised the same free GPUs.
    pub planning: tokio::sync::Mutex<()>,
    pub clock: Clock,
    /// The cost model's corrections measured on the fleet by the autoscaler's scrapes, used
    /// by every plan (`planner::calibration`).
    pub calibration: Arc<Mutex<crate::planner::calibration::Calibration>>,
}

impl Context {
    /// A context with empty expectations and promises and the wall clock.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        config: Config,
        nodes: Store<Node>,
        pods: Store<Pod>,
        services: Store<Service>,
        routers: Store<Deployment>,
        network_policies: Option<Store<NetworkPolicy>>,
        deployments: Store<ModelDeployment>,
        recorder: Recorder,
        metrics: Metrics,
    ) -> Self {
        Self {
            client,
            config,
            nodes,
            pods,
            services,
            routers,
            network_policies,
            deployments,
            recorder,
            metrics,
            failures: Mutex::new(HashMap::new()),
            service_accounts: Mutex::new(BTreeSet::new()),
            expectations: Mutex::new(Expectations::default()),
            promises: Mutex::new(Promises::default()),
            planning: tokio::sync::Mutex::new(()),
            clock: Arc::new(Timestamp::now),
            calibration: Arc::default(),
        }
    }
}

/// `namespace/name` of a deployment.
pub fn key(md: &ModelDeployment) -> String {
    format!("{}/{}", md.namespace().unwrap_or_default(), md.name_any())
}

/// How soon a deployment whose expectations are not yet met is looked at again.
pub const EXPECTATIONS_RECHECK: Duration = Duration::from_secs(1);

/// The label selector of a deployment's pods (the same the cache is filtered with).
fn own_pods_selector(name: &str) -> String {
    format!(
        "{}={name},{}={}",
        labels::DEPLOYMENT,
        labels::MANAGED_BY,
        labels::MANAGER
    )
}

/// Same pods at the same versions.
fn same_pods(a: &[Pod], b: &[Pod]) -> bool {
    let versions = |v: &[Pod]| -> BTreeSet<(String, String)> {
        v.iter()
            .map(|p| {
                (
                    p.metadata.name.clone().unwrap_or_default(),
                    p.metadata.resource_version.clone().unwrap_or_default(),
                )
            })
            .collect()
    };
    versions(a) == versions(b)
}

/// Observe, decide, apply.
///
/// Against caches that lag: a deployment whose last creations or deletions the pod cache does
/// not show yet is not reconciled (expectations); planning sees the placements this process
/// wrote even before the deployment cache does (promises) and runs one deployment at a time;
/// a decision that would write anything is checked against a live read of the deployment and
/// its pods, and taken again from them when the cache was stale; the status (the intent) is
/// written first, with the read `resourceVersion` as a precondition, and only then are pods
/// deleted and created, under names derived from the written incarnation numbers.
pub async fn reconcile_one(md: Arc<ModelDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = md.namespace().unwrap_or_default();
    let name = md.name_any();
    let dkey = key(&md);
    if md.metadata.deletion_timestamp.is_some() {
        // Foreground deletion: the garbage collector removes the pods; recreating them would
        // fight it.
        ctx.expectations.lock().expect("lock").forget(&dkey);
        ctx.promises.lock().expect("lock").forget(&dkey);
        ctx.metrics.forget_deployment(&ns, &name);
        return Ok(Action::await_change());
    }
    let _planning = ctx.planning.lock().await;
    ctx.metrics
        .forget_deployments_except(ctx.deployments.state().iter().map(|d| key(d)).collect());
    let satisfied = ctx.expectations.lock().expect("lock").satisfied(
        &dkey,
        |pod| match ctx
            .pods
            .get(&ObjectRef::<Pod>::new(pod).within(&ns))
            .map(|p| p.metadata.deletion_timestamp.is_some())
        {
            None => Seen::Absent,
            Some(false) => Seen::Present,
            Some(true) => Seen::Terminating,
        },
        Instant::now(),
    );
    if !satisfied {
        ctx.metrics.expectations_waits.inc();
        return Ok(Action::requeue(EXPECTATIONS_RECHECK));
    }
    let uid = md.uid();
    // Nothing of the caches is copied but this deployment's own pods and Services (a few):
    // every other pod, every node and deployment is read through the caches' `Arc`s.
    let (own, other) = cache::own_and_other(&ctx.pods, &ns, &name);
    // Copies of the objects in `store` in this namespace that this deployment owns.
    fn owned<K>(store: &Store<K>, ns: &str, uid: Option<&String>) -> Vec<K>
    where
        K: kube::Resource + Clone,
        K::DynamicType: Eq + std::hash::Hash + Clone,
    {
        store
            .state()
            .iter()
            .filter(|o| {
                o.meta().namespace.as_deref() == Some(ns)
                    && o.owner_references().iter().any(|r| Some(&r.uid) == uid)
            })
            .map(|o| (**o).clone())
            .collect()
    }
    let services: Vec<Service> = owned(&ctx.services, &ns, uid.as_ref());
    let routers: Vec<Deployment> = owned(&ctx.routers, &ns, uid.as_ref());
    let nodes: Vec<Arc<Node>> = ctx.nodes.state();
    let deployments: Vec<Arc<ModelDeployment>> = {
        let mut promises = ctx.promises.lock().expect("lock");
        let cached = ctx.deployments.state();
        if promises.is_empty() {
            cached
        } else {
            // Placements written but not yet in the cache: copies with them (rare, and
            // deployments are few next to pods and nodes).
            let mut copies: Vec<ModelDeployment> =
                cached.iter().map(|d| ModelDeployment::clone(d)).collect();
            promises.overlay(&mut copies, key, Instant::now());
            copies.into_iter().map(Arc::new).collect()
        }
    };
    let reserved = reserved_by_others(
        deployments.iter().map(|d| &**d),
        uid.as_deref(),
        other.iter().map(|p| &**p),
    );
    let now = (ctx.clock)();
    let calibrated;
    let config = {
        let calibration = ctx.calibration.lock().expect("lock");
        if calibration.is_empty() {
            &ctx.config
        } else {
            let mut c = ctx.config.clone();
            c.plan.constants.calibration = calibration.clone();
            calibrated = c;
            &calibrated
        }
    };
    let decide = |md: &ModelDeployment, own: &[Pod]| {
        let obs = Observed {
            md,
            pods: own,
            services: &services,
            routers: &routers,
            nodes: &nodes,
            other_pods: &other,
            reserved: &reserved,
            now,
        };
        reconcile::reconcile(&obs, config)
    };
    let decided = Instant::now();
    let mut actions = decide(&md, &own);
    let mut md_used: ModelDeployment = (*md).clone();
    if actions.acts() {
        // Confirm the picture with live reads before writing anything.
        let mds: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &ns);
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
        let Some(live) = mds.get_opt(&name).await? else {
            return Ok(Action::await_change());
        };
        if live.metadata.deletion_timestamp.is_some() {
            return Ok(Action::await_change());
        }
        let live_pods = pods
            .list(
                &ListParams::default()
                    .labels(&own_pods_selector(&name))
                    .fields(POD_FIELD_SELECTOR),
            )
            .await?
            .items;
        let live_pods: Vec<Pod> = live_pods
            .into_iter()
            .map(|mut p| {
                // A list's items carry no namespace filter surprises, but keep them alike.
                p.metadata.namespace.get_or_insert_with(|| ns.clone());
                p
            })
            .collect();
        if live.metadata.resource_version != md.metadata.resource_version
            || !same_pods(&own, &live_pods)
        {
            tracing::debug!(deployment = %dkey, "the cache was behind; deciding from live reads");
            ctx.metrics.stale_decisions.inc();
            actions = decide(&live, &live_pods);
            md_used = live;
        }
    }
    ctx.metrics
        .placement_duration
        .observe(decided.elapsed().as_secs_f64());
    record_replicas(&ctx.metrics, &md_used, &actions);
    execute(&ctx, &md_used, actions.clone()).await?;
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    ctx.metrics
        .reconciles
        .get_or_create(&ResultLabel { result: "ok" })
        .inc();
    ctx.failures.lock().expect("lock").remove(&dkey);
    Ok(match actions.requeue_after {
        Some(d) => Action::requeue(d),
        // Watches drive everything else; a slow resync guards against missed events.
        None => Action::requeue(Duration::from_secs(600)),
    })
}

/// Pods in phase Succeeded hold no GPUs and are not watched.
pub const POD_FIELD_SELECTOR: &str = "status.phase!=Succeeded";

fn record_replicas(m: &Metrics, md: &ModelDeployment, actions: &Actions) {
    let Some(st) = actions.status.as_ref().or(md.status.as_ref()) else {
        return;
    };
    let count = |f: &dyn Fn(&crate::api::ReplicaPlacement) -> bool| {
        st.placements.iter().filter(|p| f(p)).count() as i64
    };
    let ns = md.namespace().unwrap_or_default();
    let dep = md.name_any();
    let set = |state: &'static str, v: i64| {
        m.replica_gauge(&ns, &dep, state).set(v);
    };
    set("ready", count(&|p| p.ready));
    set(
        "starting",
        count(&|p| !p.ready && p.state != ReplicaState::Backoff),
    );
    set("backoff", count(&|p| p.state == ReplicaState::Backoff));
    set(
        "unplaced",
        i64::from(md.spec.replicas)
            .saturating_sub(st.placements.len() as i64)
            .max(0),
    );
}

/// The status as a server-side apply body, guarded by `resource_version` (the API server
/// answers 409 when the object changed since it was read).
fn status_body(
    status: &ModelDeploymentStatus,
    resource_version: Option<&str>,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": ModelDeployment::api_version(&()),
        "kind": ModelDeployment::kind(&()),
        "metadata": {"resourceVersion": resource_version},
        "status": status,
    })
}

/// Apply the decided actions, intent first: the status (placements and incarnation numbers,
/// guarded by the read `resourceVersion`), then Services, deletions, and pods by server-side
/// apply, then Events. A pod the API refuses to create (quota, admission) gets a Warning Event
/// `FailedCreate` and the condition `ReplicaFailure` on the deployment; the next pass applies
/// the same pods again, so failures repeat without ever creating a second group.
pub async fn execute(ctx: &Context, md: &ModelDeployment, actions: Actions) -> Result<(), Error> {
    let ns = md.namespace().unwrap_or_default();
    let dkey = key(md);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let mds: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &ns);
    let mut resource_version = md.metadata.resource_version.clone();
    let mut current_status = md.status.clone().unwrap_or_default();
    if let Some(status) = &actions.status {
        let refused = crate::api::schema::status_violations(status);
        if !refused.is_empty() {
            // A bug: say exactly what, then let the API server answer.
            tracing::error!(deployment = %dkey, violations = ?refused, "the new status breaks the CRD schema");
        }
        let written = mds
            .patch_status(
                &md.name_any(),
                &params,
                &Patch::Apply(&status_body(status, resource_version.as_deref())),
            )
            .await?;
        resource_version = written.metadata.resource_version;
        ctx.promises.lock().expect("lock").record(
            &dkey,
            resource_version.clone().unwrap_or_default(),
            status.placements.clone(),
            Instant::now(),
        );
        current_status = status.clone();
    }
    let new_namespace = ctx
        .service_accounts
        .lock()
        .expect("lock")
        .insert(ns.clone());
    if new_namespace && (!actions.apply_pods.is_empty() || !actions.apply_services.is_empty()) {
        let sa = build::worker_service_account(md);
        let sas: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &ns);
        if let Err(e) = sas
            .patch(build::WORKER_SERVICE_ACCOUNT, &params, &Patch::Apply(&sa))
            .await
        {
            ctx.service_accounts.lock().expect("lock").remove(&ns);
            return Err(e.into());
        }
    }
    for s in &actions.apply_services {
        let name = s.metadata.name.clone().unwrap_or_default();
        services.patch(&name, &params, &Patch::Apply(s)).await?;
    }
    if let Some(store) = &ctx.network_policies {
        let uid = md.uid();
        let observed: Vec<NetworkPolicy> = store
            .state()
            .iter()
            .filter(|p| {
                p.metadata.namespace.as_deref() == Some(ns.as_str())
                    && p.owner_references()
                        .iter()
                        .any(|o| Some(&o.uid) == uid.as_ref())
            })
            .map(|p| (**p).clone())
            .collect();
        let (apply, delete) = build::network_policy_changes(&actions.network_policies, &observed);
        let policies: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &ns);
        for p in &apply {
            let name = p.metadata.name.clone().unwrap_or_default();
            policies.patch(&name, &params, &Patch::Apply(p)).await?;
        }
        for name in &delete {
            match policies.delete(name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    // The router in front of prefill/decode pools: before the pods it routes to (a pass whose
    // router write failed still has those pods to write, so the next pass writes it again).
    let routers: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(router) = &actions.apply_router {
        let name = router.metadata.name.clone().unwrap_or_default();
        routers.patch(&name, &params, &Patch::Apply(router)).await?;
    }
    for name in &actions.delete_routers {
        match routers.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    // With every new group, its deployment's disruption budget (idempotent; restores one that
    // was deleted).
    if !actions.apply_pods.is_empty() {
        let pdbs: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), &ns);
        let pdb = build::disruption_budget(md);
        let name = pdb.metadata.name.clone().unwrap_or_default();
        pdbs.patch(&name, &params, &Patch::Apply(&pdb)).await?;
    }
    // Expect what is about to happen, so the next pass waits for the cache to show it.
    let creates: Vec<String> = actions
        .apply_pods
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    ctx.expectations.lock().expect("lock").expect(
        &dkey,
        creates.iter().cloned(),
        actions.delete_pods.iter().cloned(),
        Instant::now(),
    );
    // Deletions first: stale members (old incarnations, removed replicas) are gone before a new
    // incarnation is created, so no replica ever has members of two incarnations, and their
    // GPUs are released before new pods ask for them. A failed delete stops the pass.
    for name in &actions.delete_pods {
        match pods.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                ctx.expectations.lock().expect("lock").forget(&dkey);
                return Err(e.into());
            }
        }
    }
    for (i, p) in actions.apply_pods.iter().enumerate() {
        let name = p.metadata.name.clone().unwrap_or_default();
        if let Err(e) = pods.patch(&name, &params, &Patch::Apply(p)).await {
            {
                let mut ex = ctx.expectations.lock().expect("lock");
                for n in &creates[i..] {
                    ex.creation_failed(&dkey, n);
                }
            }
            if let kube::Error::Api(api) = &e
                && api.code != 409
                && api.code < 500
            {
                // Refused (quota 403, admission 400/422): say so where users look.
                let message = reconcile::bounded(
                    &format!(
                        "creating pod {name} failed ({} {}): {}",
                        api.code, api.reason, api.message
                    ),
                    reconcile::MAX_MESSAGE,
                );
                publish(
                    ctx,
                    md,
                    &reconcile::EventNote {
                        type_: EventType::Warning,
                        reason: "FailedCreate",
                        note: message.clone(),
                    },
                )
                .await;
                let mut status = current_status.clone();
                reconcile::set_replica_failure(&mut status, &message, (ctx.clock)());
                if let Err(err) = mds
                    .patch_status(
                        &md.name_any(),
                        &params,
                        &Patch::Apply(&status_body(&status, resource_version.as_deref())),
                    )
                    .await
                {
                    tracing::warn!(error = %err, "writing the ReplicaFailure condition failed");
                }
            }
            return Err(e.into());
        }
    }
    for e in &actions.events {
        publish(ctx, md, e).await;
    }
    Ok(())
}

/// Publish one Event on the deployment; best effort (never fails a reconcile).
async fn publish(ctx: &Context, md: &ModelDeployment, e: &reconcile::EventNote) {
    let ev = Event {
        type_: match e.type_ {
            EventType::Normal => KubeEventType::Normal,
            EventType::Warning => KubeEventType::Warning,
        },
        reason: e.reason.to_owned(),
        note: Some(reconcile::bounded(&e.note, 1024)),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&ev, &md.object_ref(&())).await {
        tracing::warn!(error = %err, "publishing an Event failed");
    }
}

/// Per-object exponential backoff for transient errors (kube-runtime has none per object).
fn error_policy(md: Arc<ModelDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    let n = {
        let mut f = ctx.failures.lock().expect("lock");
        let n = f.entry(key(&md)).or_insert(0);
        *n += 1;
        *n
    };
    let wait = Duration::from_secs(1u64 << n.min(8)).min(Duration::from_secs(300));
    ctx.metrics
        .failures
        .get_or_create(&CategoryLabel {
            category: error.category(),
        })
        .inc();
    ctx.metrics
        .reconciles
        .get_or_create(&ResultLabel { result: "error" })
        .inc();
    tracing::warn!(deployment = %key(&md), category = error.category(), attempt = n, retry_in_s = wait.as_secs(), error = %error, "reconcile failed");
    Action::requeue(wait)
}

async fn serve_http(
    addr: SocketAddr,
    router: axum::Router,
    what: &'static str,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the {what} address {addr}: {e}"))?;
    tracing::info!(%addr, "serving {what}");
    axum::serve(listener, router).await?;
    Ok(())
}

/// Run the controller until SIGTERM.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("connecting to the Kubernetes API: {e}"))?;
    run_with_client(client, args).await
}

/// [`run`] with a given client (the tests drive it against an in-memory API server).
pub async fn run_with_client(client: Client, args: RunArgs) -> anyhow::Result<()> {
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let autoscaler_metrics = crate::controller::metrics::AutoscalerMetrics::new(&mut registry);
    let registry = Arc::new(registry);
    let ready = Arc::new(AtomicBool::new(false));

    let metrics_router = axum::Router::new().route(
        "/metrics",
        axum::routing::get({
            let registry = registry.clone();
            move || {
                let registry = registry.clone();
                async move {
                    let mut out = String::new();
                    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        out,
                    )
                }
            }
        }),
    );
    let health_router = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/readyz",
            axum::routing::get({
                let ready = ready.clone();
                move || {
                    let ready = ready.clone();
                    async move {
                        if ready.load(Ordering::Relaxed) {
                            (axum::http::StatusCode::OK, "ready\n")
                        } else {
                            (
                                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                                "caches not synced yet\n",
                            )
                        }
                    }
                }
            }),
        );
    tokio::spawn(serve_http(args.metrics_addr, metrics_router, "metrics"));
    tokio::spawn(serve_http(args.health_addr, health_router, "health"));

    let (mds, pods_api, services_api, routers_api): (
        Api<ModelDeployment>,
        Api<Pod>,
        Api<Service>,
        Api<Deployment>,
    ) = match &args.watch_namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        ),
    };
    // GPU use is cluster-wide: every pod's GPUs count. With a watched namespace the operator
    // may read pods there only (its Role), so other namespaces' GPU use is left to the
    // scheduler: a gang that cannot start is re-placed after the gang timeout.
    let all_pods: Api<Pod> = match &args.watch_namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let nodes_api: Api<Node> = Api::all(client.clone());

    let (node_store, node_writer) = reflector::store();
    let (pod_store, pod_writer) = reflector::store();
    let (svc_store, svc_writer) = reflector::store();
    let (router_store, router_writer) = reflector::store();
    let managed = format!("{}={}", labels::MANAGED_BY, labels::MANAGER);
    let log_errors = |what: &'static str| move |e: &watcher::Error| tracing::warn!(watch = what, error = %e, "watch error; retrying");
    // The Node and Pod caches keep only what the controller reads (see `cache`); pods that
    // hold no GPUs and belong to no deployment are not cached at all.
    tokio::spawn(
        reflector::reflector(
            node_writer,
            cache::nodes(watcher(nodes_api.clone(), watcher::Config::default())),
        )
        .default_backoff()
        .inspect_err(log_errors("nodes"))
        .for_each(|_| futures::future::ready(())),
    );
    tokio::spawn(
        reflector::reflector(
            pod_writer,
            cache::pods(watcher(
                all_pods,
                watcher::Config::default().fields(POD_FIELD_SELECTOR),
            )),
        )
        .default_backoff()
        .inspect_err(log_errors("pods"))
        .for_each(|_| futures::future::ready(())),
    );
    tokio::spawn(
        reflector::reflector(
            svc_writer,
            watcher(
                services_api.clone(),
                watcher::Config::default().labels(&managed),
            ),
        )
        .default_backoff()
        .inspect_err(log_errors("services"))
        .for_each(|_| futures::future::ready(())),
    );
    tokio::spawn(
        reflector::reflector(
            router_writer,
            watcher(
                routers_api.clone(),
                watcher::Config::default().labels(&managed),
            ),
        )
        .default_backoff()
        .inspect_err(log_errors("routers"))
        .for_each(|_| futures::future::ready(())),
    );
    node_store.wait_until_ready().await.ok();
    pod_store.wait_until_ready().await.ok();
    svc_store.wait_until_ready().await.ok();
    router_store.wait_until_ready().await.ok();

    // Per-replica worker NetworkPolicies, only when asked for (the RBAC for them is optional).
    let network_policy_options = if args.worker_network_policies {
        Some(build::NetworkPolicyOptions {
            api_namespace_selector: build::NetworkPolicyOptions::parse_selector(
                &args.api_namespace_selector,
            )
            .map_err(|e| anyhow::anyhow!(e))?,
            monitoring_namespace: args.monitoring_namespace.clone(),
            operator_pod_labels: build::NetworkPolicyOptions::parse_selector(
                &args.operator_pod_selector,
            )
            .map_err(|e| {
                anyhow::anyhow!(e.replace("--api-namespace-selector", "--operator-pod-selector"))
            })?,
        })
    } else {
        None
    };
    let policies_api: Option<Api<NetworkPolicy>> =
        network_policy_options
            .as_ref()
            .map(|_| match &args.watch_namespace {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
            });
    let policy_store = match &policies_api {
        Some(api) => {
            let (store, writer) = reflector::store();
            tokio::spawn(
                reflector::reflector(
                    writer,
                    watcher(api.clone(), watcher::Config::default().labels(&managed)),
                )
                .default_backoff()
                .inspect_err(log_errors("networkpolicies"))
                .for_each(|_| futures::future::ready(())),
            );
            store.wait_until_ready().await.ok();
            Some(store)
        }
        None => None,
    };

    let controller = Controller::new(mds, watcher::Config::default());
    let md_store = controller.store();
    let md_store_for_nodes = md_store.clone();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        },
    );
    let group_key = match &args.group_key_file {
        Some(path) => {
            let key = anyhow::Context::with_context(std::fs::read(path), || {
                format!(
                    "--group-key-file {}: reading the rank-group key",
                    path.display()
                )
            })?;
            anyhow::ensure!(
                key.len() >= 16,
                "--group-key-file {}: the key has {} bytes; use at least 16 random bytes (the chart generates 32)",
                path.display(),
                key.len()
            );
            Some(build::GroupKey(key))
        }
        None => {
            tracing::warn!(
                "no --group-key-file: worker groups run without a secret (only their incarnation id is checked when ranks join)"
            );
            None
        }
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        Config {
            topology_keys: args.topology_keys.clone(),
            build: build::BuildOptions {
                default_worker_image: args.worker_image.clone(),
                default_vllm_image: args.vllm_image.clone(),
                default_sglang_image: args.sglang_image.clone(),
                network_policies: network_policy_options,
                group_key,
                rdma: build::RdmaOptions::parse(&args.rdma_resources)
                    .map_err(|e| anyhow::anyhow!(e))?,
            },
            ..Config::default()
        },
        node_store,
        pod_store,
        svc_store,
        router_store,
        policy_store,
        md_store,
        recorder,
        metrics,
    ));
    // Ready means the caches are synced, not leadership: a standby replica is ready too, so
    // rollouts and drains that wait on the PodDisruptionBudget proceed.
    ready.store(true, Ordering::Relaxed);
    tracing::info!("caches synced");
    let leadership = if args.leader_elect {
        let identity = args
            .leader_identity
            .clone()
            .filter(|s| !s.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| format!("tessera-operator-{}", std::process::id()));
        let cfg = LeaderConfig::new(&args.lease_namespace, &args.lease_name, identity)
            .map_err(|e| anyhow::anyhow!("leader election: {e}"))?;
        let leases: Api<Lease> = Api::namespaced(client.clone(), cfg.namespace());
        let since = leader::acquire(&leases, &cfg).await;
        ctx.metrics.leader.set(1);
        let renewer = {
            let (leases, cfg, metrics) = (leases.clone(), cfg.clone(), ctx.metrics.clone());
            tokio::spawn(async move {
                let lost = leader::renew_until_lost_since(&leases, &cfg, since).await;
                metrics.leader.set(0);
                tracing::error!(
                    ?lost,
                    "lost leadership; exiting so that only one replica writes"
                );
                std::process::exit(1);
            })
        };
        Some((leases, cfg, renewer))
    } else {
        ctx.metrics.leader.set(1);
        None
    };
    tracing::info!(
        namespace = args.watch_namespace.as_deref().unwrap_or("<all>"),
        "controller started"
    );
    // The built-in autoscaler: only here, after the Lease is held (a lost Lease ends the process).
    tokio::spawn(
        crate::autoscale::runner::Runner::new(
            client.clone(),
            crate::autoscale::runner::RunnerConfig {
                interval: Duration::from_secs(args.autoscale_interval_seconds),
                scrape_timeout: Duration::from_secs(args.autoscale_scrape_timeout_seconds),
                calibration_namespace: Some(args.lease_namespace.clone()),
                ..Default::default()
            },
            ctx.config.clone(),
            autoscaler_metrics,
        )
        .with_calibration(ctx.calibration.clone())
        .run(crate::autoscale::runner::Stores {
            nodes: ctx.nodes.clone(),
            pods: ctx.pods.clone(),
            deployments: ctx.deployments.clone(),
        }),
    );
    let controller = match policies_api {
        Some(api) => controller.owns(api, watcher::Config::default().labels(&managed)),
        None => controller,
    };
    controller
        .owns(pods_api, watcher::Config::default().labels(&managed))
        .owns(services_api, watcher::Config::default().labels(&managed))
        .owns(routers_api, watcher::Config::default().labels(&managed))
        .watches(nodes_api, watcher::Config::default(), move |node: Node| {
            // A Node change requeues the deployments placed on it.
            let name = node.name_any();
            md_store_for_nodes
                .state()
                .iter()
                .filter(|md| {
                    md.status.as_ref().is_some_and(|st| {
                        st.placements
                            .iter()
                            .any(|p| p.stages.iter().any(|s| s.node == name))
                    })
                })
                .map(|md| ObjectRef::from_obj(&**md))
                .collect::<Vec<_>>()
        })
        .shutdown_on_signal()
        .run(reconcile_one, error_policy, ctx.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "controller event");
            }
        })
        .await;
    tracing::info!("controller stopped");
    if let Some((leases, cfg, renewer)) = leadership {
        // Stop renewing, then hand the Lease over so a successor need not wait it out.
        renewer.abort();
        ctx.metrics.leader.set(0);
        if leader::release(&leases, &cfg).await {
            tracing::info!(lease = %cfg.name(), "released the lease");
        }
    }
    Ok(())
}
