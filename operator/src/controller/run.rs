//! `tessera-operator run`: kube-runtime's Controller around the pure [`reconcile`].
//!
//! Watches: ModelDeployments (primary), their Pods and Services (owned), and Nodes (a Node
//! change requeues the deployments placed on it). Reflector stores of Nodes and Pods feed the
//! planner's inventory. Watch errors are logged and retried by the watcher's backoff, so one
//! malformed object never stalls a watch. Writes are server-side apply under the field manager
//! `tessera-operator` (forced), status through the `/status` subresource.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType as KubeEventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use prometheus_client::registry::Registry;

use super::leader::{self, LeaderConfig};
use super::metrics::{CategoryLabel, Metrics, ReplicaLabels, ResultLabel};
use super::reconcile::{self, Actions, Config, EventType, Observed, reserved_by_others};
use crate::api::{ModelDeployment, ReplicaState};
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

/// Shared state of the reconciles.
pub struct Context {
    pub client: Client,
    pub config: Config,
    pub nodes: Store<Node>,
    pub pods: Store<Pod>,
    pub services: Store<Service>,
    /// The operator's NetworkPolicies, when `--worker-network-policies` is on.
    pub network_policies: Option<Store<NetworkPolicy>>,
    pub deployments: Store<ModelDeployment>,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// Consecutive failures per object, for per-object exponential backoff.
    pub failures: Mutex<HashMap<String, u32>>,
    /// Namespaces whose worker ServiceAccount this process has applied.
    pub service_accounts: Mutex<BTreeSet<String>>,
    pub incarnations: AtomicU64,
}

fn key(md: &ModelDeployment) -> String {
    format!("{}/{}", md.namespace().unwrap_or_default(), md.name_any())
}

/// Observe, decide, apply.
pub async fn reconcile_one(md: Arc<ModelDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = md.namespace().unwrap_or_default();
    let name = md.name_any();
    let uid = md.uid();
    let all_pods: Vec<Pod> = ctx.pods.state().iter().map(|p| (**p).clone()).collect();
    let (own, other): (Vec<Pod>, Vec<Pod>) = all_pods.into_iter().partition(|p| {
        p.metadata.namespace.as_deref() == Some(ns.as_str())
            && p.labels().get(labels::DEPLOYMENT) == Some(&name)
            && p.labels().get(labels::MANAGED_BY).map(String::as_str) == Some(labels::MANAGER)
    });
    let services: Vec<Service> = ctx
        .services
        .state()
        .iter()
        .filter(|s| {
            s.metadata.namespace.as_deref() == Some(ns.as_str())
                && s.owner_references()
                    .iter()
                    .any(|o| Some(&o.uid) == uid.as_ref())
        })
        .map(|s| (**s).clone())
        .collect();
    let nodes: Vec<Node> = ctx.nodes.state().iter().map(|n| (**n).clone()).collect();
    let deployments: Vec<ModelDeployment> = ctx
        .deployments
        .state()
        .iter()
        .map(|d| (**d).clone())
        .collect();
    let reserved = reserved_by_others(&deployments, uid.as_deref());
    let obs = Observed {
        md: &md,
        pods: &own,
        services: &services,
        nodes: &nodes,
        other_pods: &other,
        reserved: &reserved,
        now: Timestamp::now(),
    };
    let decided = Instant::now();
    let mut next =
        |_r: i32| build::incarnation_id(ctx.incarnations.fetch_add(1, Ordering::Relaxed));
    let actions = reconcile::reconcile(&obs, &ctx.config, &mut next);
    ctx.metrics
        .placement_duration
        .observe(decided.elapsed().as_secs_f64());
    record_replicas(&ctx.metrics, &md, &actions);
    execute(&ctx, &md, actions.clone()).await?;
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    ctx.metrics
        .reconciles
        .get_or_create(&ResultLabel { result: "ok" })
        .inc();
    ctx.failures.lock().expect("lock").remove(&key(&md));
    Ok(match actions.requeue_after {
        Some(d) => Action::requeue(d),
        // Watches drive everything else; a slow resync guards against missed events.
        None => Action::requeue(Duration::from_secs(600)),
    })
}

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
        m.replicas
            .get_or_create(&ReplicaLabels {
                namespace: ns.clone(),
                deployment: dep.clone(),
                state,
            })
            .set(v);
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

/// Apply the decided actions: Services, deletions, then pods by server-side apply, then status
/// and Events.
pub async fn execute(ctx: &Context, md: &ModelDeployment, actions: Actions) -> Result<(), Error> {
    let ns = md.namespace().unwrap_or_default();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
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
    // Deletions first: stale members (old incarnations, removed replicas) are gone before a new
    // incarnation is created, so no replica ever has members of two incarnations, and their
    // GPUs are released before new pods ask for them. A failed delete stops the pass.
    for name in &actions.delete_pods {
        match pods.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    for p in &actions.apply_pods {
        let name = p.metadata.name.clone().unwrap_or_default();
        pods.patch(&name, &params, &Patch::Apply(p)).await?;
    }
    if let Some(status) = &actions.status {
        let mds: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &ns);
        let body = serde_json::json!({
            "apiVersion": ModelDeployment::api_version(&()),
            "kind": ModelDeployment::kind(&()),
            "status": status,
        });
        mds.patch_status(&md.name_any(), &params, &Patch::Apply(&body))
            .await?;
    }
    let reference = md.object_ref(&());
    for e in &actions.events {
        let ev = Event {
            type_: match e.type_ {
                EventType::Normal => KubeEventType::Normal,
                EventType::Warning => KubeEventType::Warning,
            },
            reason: e.reason.to_owned(),
            note: Some(e.note.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(err) = ctx.recorder.publish(&ev, &reference).await {
            // Events are best effort; never fail a reconcile for them.
            tracing::warn!(error = %err, "publishing an Event failed");
        }
    }
    Ok(())
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
                                "not leading yet\n",
                            )
                        }
                    }
                }
            }),
        );
    tokio::spawn(serve_http(args.metrics_addr, metrics_router, "metrics"));
    tokio::spawn(serve_http(args.health_addr, health_router, "health"));

    if args.leader_elect {
        let identity = std::env::var("POD_NAME")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| format!("tessera-operator-{}", std::process::id()));
        let cfg = LeaderConfig {
            namespace: args.lease_namespace.clone(),
            name: args.lease_name.clone(),
            identity,
            lease_duration: Duration::from_secs(15),
        };
        let leases = Api::namespaced(client.clone(), &cfg.namespace);
        leader::acquire(&leases, &cfg).await;
        tokio::spawn(async move {
            leader::renew_until_lost(&leases, &cfg).await;
            tracing::error!("lost leadership; exiting so that only one replica writes");
            std::process::exit(1);
        });
    }

    let (mds, pods_api, services_api): (Api<ModelDeployment>, Api<Pod>, Api<Service>) =
        match &args.watch_namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            ),
        };
    // GPU use is cluster-wide: every pod's GPUs count, whatever the watched namespace.
    let all_pods: Api<Pod> = Api::all(client.clone());
    let nodes_api: Api<Node> = Api::all(client.clone());

    let (node_store, node_writer) = reflector::store();
    let (pod_store, pod_writer) = reflector::store();
    let (svc_store, svc_writer) = reflector::store();
    let managed = format!("{}={}", labels::MANAGED_BY, labels::MANAGER);
    let log_errors = |what: &'static str| move |e: &watcher::Error| tracing::warn!(watch = what, error = %e, "watch error; retrying");
    tokio::spawn(
        reflector::reflector(
            node_writer,
            watcher(nodes_api.clone(), watcher::Config::default()),
        )
        .default_backoff()
        .inspect_err(log_errors("nodes"))
        .for_each(|_| futures::future::ready(())),
    );
    tokio::spawn(
        reflector::reflector(
            pod_writer,
            watcher(
                all_pods,
                watcher::Config::default().fields("status.phase!=Succeeded"),
            ),
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
    node_store.wait_until_ready().await.ok();
    pod_store.wait_until_ready().await.ok();
    svc_store.wait_until_ready().await.ok();

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
    let seed = Timestamp::now().as_nanosecond() as u64;
    let ctx = Arc::new(Context {
        client: client.clone(),
        config: Config {
            topology_keys: args.topology_keys.clone(),
            build: build::BuildOptions {
                default_worker_image: args.worker_image.clone(),
                default_vllm_image: args.vllm_image.clone(),
                default_sglang_image: args.sglang_image.clone(),
                network_policies: network_policy_options,
            },
            ..Config::default()
        },
        nodes: node_store,
        pods: pod_store,
        services: svc_store,
        network_policies: policy_store,
        deployments: md_store,
        recorder,
        metrics,
        failures: Mutex::new(HashMap::new()),
        service_accounts: Mutex::new(BTreeSet::new()),
        incarnations: AtomicU64::new(seed),
    });
    // The built-in autoscaler: only here, after the Lease is held (a lost Lease ends the process).
    tokio::spawn(
        crate::autoscale::runner::Runner::new(
            client.clone(),
            crate::autoscale::runner::RunnerConfig {
                interval: Duration::from_secs(args.autoscale_interval_seconds),
                scrape_timeout: Duration::from_secs(args.autoscale_scrape_timeout_seconds),
                ..Default::default()
            },
            ctx.config.clone(),
            autoscaler_metrics,
        )
        .run(crate::autoscale::runner::Stores {
            nodes: ctx.nodes.clone(),
            pods: ctx.pods.clone(),
            deployments: ctx.deployments.clone(),
        }),
    );
    ready.store(true, Ordering::Relaxed);
    tracing::info!(
        namespace = args.watch_namespace.as_deref().unwrap_or("<all>"),
        "controller started"
    );
    let controller = match policies_api {
        Some(api) => controller.owns(api, watcher::Config::default().labels(&managed)),
        None => controller,
    };
    controller
        .owns(pods_api, watcher::Config::default().labels(&managed))
        .owns(services_api, watcher::Config::default().labels(&managed))
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
        .run(reconcile_one, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "controller event");
            }
        })
        .await;
    tracing::info!("controller stopped");
    Ok(())
}
