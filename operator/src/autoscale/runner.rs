//! The autoscaler inside `tessera-operator run`: a task on an interval that scrapes every ready
//! replica leader of every ModelDeployment with `autoscaling.enabled`, decides with
//! [`decide_pass`], writes replicas through the scale subresource (server-side apply, field
//! manager `tessera-autoscaler`) and sets or clears the `ScalingLimited` condition.
//!
//! - It runs only in the leader: `run` starts it after the Lease is held, and the process exits
//!   when leadership is lost.
//! - No pile-up: a pass is awaited before the next tick and missed ticks are skipped.
//! - Scrapes run with bounded concurrency (`buffer_unordered`) and a timeout each. A failed
//!   scrape reuses the pod's last good sample with its age, so it turns stale (and holds the
//!   replicas, never scales down) after `Params::stale_after_s`.
//! - The condition is written with a JSON merge patch on `/status` that carries
//!   `metadata.resourceVersion`: if the controller wrote status in between, the API answers 409
//!   and the condition waits for the next tick.
//! - One pass is [`Runner::pass`] over a [`Snapshot`] of the watch stores; the scrapes go
//!   through a [`Scraper`] and time through a [`Clock`], both replaceable (tests script the API,
//!   the scrapes and the clock; production uses [`HttpScraper`] and [`SystemClock`]).
//! - Metrics: [`AutoscalerMetrics`] (passes, pass duration, scrapes by result, decisions by
//!   direction, desired replicas per deployment).

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};

use super::decide::{Decision, History, Params, ReplicaSample};
use super::pass::{self, Target, decide_pass, scaling_condition};
use super::scrape::{self, LeaderMetrics, ScrapeError, interval_means};
use crate::api::ModelDeployment;
use crate::build::labels;
use crate::controller::cache::gpus_in_use;
use crate::controller::metrics::{
    AutoscalerMetrics, DeploymentLabels, DirectionLabel, ResultLabel,
};
use crate::controller::reconcile::{Config, reserved_by_others};
use crate::planner::calibration::{Calibration, LayoutKey, Measurement};
use crate::planner::inventory::{Inventory, labels_read};
use crate::planner::{choose, cost};

/// Field manager of the autoscaler's writes.
pub const FIELD_MANAGER: &str = "tessera-autoscaler";

/// Settings of the runner.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// Time between passes.
    pub interval: Duration,
    /// Timeout of one scrape.
    pub scrape_timeout: Duration,
    /// Scrapes in flight at once.
    pub concurrency: usize,
    pub params: Params,
    /// Namespace of the ConfigMap [`CALIBRATION_CONFIGMAP`] that keeps the cost model's
    /// calibration across restarts (the operator's own); `None` keeps it in memory only.
    pub calibration_namespace: Option<String>,
}

/// The ConfigMap that keeps the calibration (key [`CALIBRATION_KEY`], YAML).
pub const CALIBRATION_CONFIGMAP: &str = "tessera-calibration";
/// Its data key.
pub const CALIBRATION_KEY: &str = "calibration.yaml";

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            interval: Duration::from_secs(15),
            scrape_timeout: Duration::from_secs(3),
            concurrency: 32,
            params: Params::default(),
            calibration_namespace: None,
        }
    }
}

/// Watch-fed state the runner reads.
pub struct Stores {
    pub nodes: Store<Node>,
    pub pods: Store<Pod>,
    pub deployments: Store<ModelDeployment>,
}

/// A snapshot of the stores: their objects shared, not copied.
pub type SharedSnapshot = Snapshot<Arc<Node>, Arc<Pod>, Arc<ModelDeployment>>;

impl Stores {
    /// What the stores hold now (the stores' `Arc`s, not copies of the objects).
    pub fn snapshot(&self) -> SharedSnapshot {
        Snapshot {
            nodes: self.nodes.state(),
            pods: self.pods.state(),
            deployments: self.deployments.state(),
        }
    }
}

/// The cluster state one pass looks at: every Node, every Pod (GPU use is cluster-wide) and
/// every ModelDeployment (autoscaled or not), owned or shared ([`SharedSnapshot`]).
#[derive(Clone, Debug, Default)]
pub struct Snapshot<N = Node, P = Pod, D = ModelDeployment> {
    pub nodes: Vec<N>,
    pub pods: Vec<P>,
    pub deployments: Vec<D>,
}

/// Reads a replica leader's `/metrics`. The runner bounds each call with its scrape timeout
/// (a call that does not finish in time counts as `timeout`).
pub trait Scraper: Send + Sync {
    fn scrape(&self, addr: SocketAddr) -> BoxFuture<'static, Result<String, ScrapeError>>;
}

/// `GET http://addr/metrics` over HTTP/1.1 ([`scrape::get`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct HttpScraper;

impl Scraper for HttpScraper {
    fn scrape(&self, addr: SocketAddr) -> BoxFuture<'static, Result<String, ScrapeError>> {
        Box::pin(scrape::get(addr))
    }
}

/// The runner's time: a monotonic clock for sample ages, windows and pass durations, and the
/// wall clock for condition transition times.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
    fn wall(&self) -> Timestamp;
}

/// The system clocks.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn wall(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// How one write of a pass went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteResult {
    /// Nothing to write.
    Skipped,
    Written,
    /// 409: the object changed since it was read; the next pass tries again.
    Conflict,
    /// Any other error (logged); the next pass tries again.
    Failed(String),
}

/// What one pass did for one autoscaled deployment.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// `namespace/name`.
    pub deployment: String,
    pub decision: Decision,
    /// The scale subresource write.
    pub scale: WriteResult,
    /// The `ScalingLimited` status write.
    pub condition: WriteResult,
}

struct LastScrape {
    at: Instant,
    sample: ReplicaSample,
    tokens_total: Option<f64>,
    /// The whole scrape, for the calibration's interval means.
    metrics: LeaderMetrics,
}

/// The autoscaler task.
pub struct Runner {
    client: Client,
    cfg: RunnerConfig,
    plan_cfg: Config,
    metrics: AutoscalerMetrics,
    scraper: Arc<dyn Scraper>,
    clock: Arc<dyn Clock>,
    histories: HashMap<String, History>,
    last: HashMap<String, LastScrape>,
    /// Deployments with a `desired_replicas` series, to remove it when they go.
    gauges: HashSet<DeploymentLabels>,
    epoch: Instant,
    /// Measured / predicted speed per layout, shared with the controller's planning.
    calibration: Arc<std::sync::Mutex<Calibration>>,
    /// A sample was added since the calibration was last saved.
    calibration_changed: bool,
}

/// A replica leader to scrape.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaderTarget {
    /// `namespace/name` of the deployment.
    pub deployment: String,
    /// The engine whose metric names the leader exposes.
    pub engine: crate::api::EngineName,
    /// Pod uid (or name), the key of its last sample.
    pub pod: String,
    pub addr: SocketAddr,
    /// The replica the leader belongs to (its placement in status says on what it runs).
    pub replica: i32,
    /// Its pool (`tessera.dev/pool`) in a disaggregated deployment.
    pub pool: Option<String>,
}

fn pod_ready(p: &Pod) -> bool {
    let st = p.status.as_ref();
    st.and_then(|s| s.phase.as_deref()) == Some("Running")
        && st
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        && p.metadata.deletion_timestamp.is_none()
}

/// Ready replica leaders of `md` among `pods`, with the address of their `/metrics`
/// (`serving.port` on the pod IP). Pure.
pub fn leaders<P: Borrow<Pod>>(md: &ModelDeployment, pods: &[P]) -> Vec<LeaderTarget> {
    let ns = md.namespace().unwrap_or_default();
    let name = md.name_any();
    let port = u16::try_from(md.spec.serving.port).unwrap_or(8000);
    pods.iter()
        .map(Borrow::borrow)
        .filter(|p: &&Pod| {
            let l = p.labels();
            p.metadata.namespace.as_deref() == Some(ns.as_str())
                && l.get(labels::DEPLOYMENT) == Some(&name)
                && l.get(labels::ROLE).map(String::as_str) == Some(labels::ROLE_LEADER)
                && l.get(labels::MANAGED_BY).map(String::as_str) == Some(labels::MANAGER)
                && pod_ready(p)
        })
        .filter_map(|p| {
            let ip: IpAddr = p.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
            Some(LeaderTarget {
                deployment: pass::key(md),
                engine: md.spec.engine.name,
                pod: p.metadata.uid.clone().unwrap_or_else(|| p.name_any()),
                addr: SocketAddr::new(ip, port),
                // -1 (no placement, so no calibration sample) without a replica label.
                replica: p
                    .labels()
                    .get(labels::REPLICA)
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(-1),
                pool: p.labels().get(labels::POOL).cloned(),
            })
        })
        .collect()
}

/// A calibration measurement of replica `replica` of `md` from one scrape interval: the decode
/// rate at the batch it ran (`running` sequences, one token each per inter-token latency)
/// against the cost model's at that batch, and the time to first token of the interval's mean
/// prompt against the model's, counted only when nothing waited (a queue adds to the measured
/// TTFT what the model does not predict). The layout is the replica's placement in status; the
/// links are a packed placement's (NVLink or PCIe inside a node).
pub fn calibration_sample(
    md: &ModelDeployment,
    replica: i32,
    means: &crate::autoscale::scrape::IntervalMeans,
    now: &LeaderMetrics,
    cfg: &Config,
) -> Option<(LayoutKey, Measurement)> {
    let p = md
        .status
        .as_ref()?
        .placements
        .iter()
        .find(|p| p.replica == replica)?;
    let gpu = cfg.catalog.lookup(&p.gpu_type)?;
    let (tp, pp) = (
        u32::try_from(p.tensor_parallel).ok()?.max(1),
        u32::try_from(p.pipeline_parallel).ok()?.max(1),
    );
    let layout = cost::Layout::of_placement(p);
    let c = &cfg.plan.constants;
    let links = cost::packed_links(gpu, tp, pp, 8, c);
    let work = choose::workload(&md.spec);
    let arch = &md.spec.model.architecture;
    let batch = now.running.unwrap_or(1.0).round().max(1.0);
    let predicted_decode = cost::estimate_layout(
        arch,
        cost::Workload {
            concurrency: batch,
            ..work
        },
        gpu,
        layout,
        links,
        c,
    )
    .decode_tokens_per_second;
    let measured_decode = means.inter_token_latency_s.map(|itl| batch / itl);
    let unqueued = now.waiting.unwrap_or(0.0) < 0.5;
    let (predicted_ttft, measured_ttft) = match (means.prompt_tokens, means.time_to_first_token_s) {
        (Some(prompt), Some(ttft)) if unqueued => (
            cost::estimate_layout(
                arch,
                cost::Workload {
                    concurrency: 1.0,
                    context: prompt.max(1.0),
                    ..work
                },
                gpu,
                layout,
                links,
                c,
            )
            .time_to_first_token_seconds,
            Some(ttft),
        ),
        _ => (0.0, None),
    };
    // One all-reduce of the interval's mean payload on the replica's TP link.
    let (predicted_allreduce, measured_allreduce) = match (means.allreduce_bytes, means.allreduce_s)
    {
        (Some(bytes), Some(secs)) if tp > 1 => (
            cost::ring_all_reduce_seconds(bytes, tp, links.tp),
            Some(secs),
        ),
        _ => (0.0, None),
    };
    if measured_decode.is_none() && measured_ttft.is_none() && measured_allreduce.is_none() {
        return None;
    }
    Some((
        LayoutKey {
            gpu_type: gpu.name.clone(),
            tensor_parallel: tp,
            pipeline_parallel: pp,
            engine: md.spec.engine.name.as_str().to_owned(),
        },
        Measurement {
            predicted_decode_tokens_per_second: predicted_decode,
            measured_decode_tokens_per_second: measured_decode,
            predicted_time_to_first_token_seconds: predicted_ttft,
            measured_time_to_first_token_seconds: measured_ttft,
            predicted_allreduce_seconds: predicted_allreduce,
            measured_allreduce_seconds: measured_allreduce,
        },
    ))
}

fn direction(d: &Decision) -> &'static str {
    match d.replicas.cmp(&d.current) {
        std::cmp::Ordering::Greater => "up",
        std::cmp::Ordering::Less => "down",
        std::cmp::Ordering::Equal => "hold",
    }
}

fn scrape_result(r: &Result<String, ScrapeError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(ScrapeError::Timeout(_)) => "timeout",
        Err(_) => "error",
    }
}

fn write_result(r: Result<(), kube::Error>) -> WriteResult {
    match r {
        Ok(()) => WriteResult::Written,
        Err(kube::Error::Api(e)) if e.code == 409 => WriteResult::Conflict,
        Err(e) => WriteResult::Failed(e.to_string()),
    }
}

impl Runner {
    /// A runner that scrapes over HTTP and reads the system clocks.
    pub fn new(
        client: Client,
        cfg: RunnerConfig,
        plan_cfg: Config,
        metrics: AutoscalerMetrics,
    ) -> Self {
        Runner {
            client,
            cfg,
            plan_cfg,
            metrics,
            scraper: Arc::new(HttpScraper),
            clock: Arc::new(SystemClock),
            histories: HashMap::new(),
            last: HashMap::new(),
            gauges: HashSet::new(),
            epoch: Instant::now(),
            calibration: Arc::default(),
            calibration_changed: false,
        }
    }

    /// Share the calibration with the controller (which plans with it).
    #[must_use]
    pub fn with_calibration(mut self, calibration: Arc<std::sync::Mutex<Calibration>>) -> Self {
        self.calibration = calibration;
        self
    }

    /// The calibration learned so far.
    pub fn calibration(&self) -> Calibration {
        self.calibration.lock().expect("lock").clone()
    }

    /// Scrape through `scraper` instead of HTTP.
    #[must_use]
    pub fn with_scraper(mut self, scraper: Arc<dyn Scraper>) -> Self {
        self.scraper = scraper;
        self
    }

    /// Read time from `clock` instead of the system clocks.
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.epoch = clock.now();
        self.clock = clock;
        self
    }

    /// Run passes over the stores until the process ends.
    pub async fn run(mut self, stores: Stores) {
        self.load_calibration().await;
        let mut tick = tokio::time::interval(self.cfg.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        tracing::info!(
            interval_s = self.cfg.interval.as_secs_f64(),
            "autoscaler started"
        );
        loop {
            tick.tick().await;
            let started = Instant::now();
            self.pass(&stores.snapshot()).await;
            let took = started.elapsed();
            if took > self.cfg.interval {
                tracing::warn!(
                    took_s = took.as_secs_f64(),
                    "autoscaling pass took longer than the interval; skipping missed ticks"
                );
            }
        }
    }

    /// Read the calibration a previous operator saved (a missing or unreadable ConfigMap starts
    /// empty, with a warning for the unreadable one).
    pub async fn load_calibration(&mut self) {
        let Some(ns) = self.cfg.calibration_namespace.clone() else {
            return;
        };
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &ns);
        match api.get_opt(CALIBRATION_CONFIGMAP).await {
            Ok(Some(cm)) => {
                let text = cm
                    .data
                    .as_ref()
                    .and_then(|d| d.get(CALIBRATION_KEY))
                    .cloned()
                    .unwrap_or_default();
                match serde_yaml_ng::from_str::<Calibration>(&text) {
                    Ok(c) => {
                        tracing::info!(
                            layouts = c.layouts.len(),
                            "loaded the cost model's calibration"
                        );
                        *self.calibration.lock().expect("lock") = c;
                    }
                    Err(e) => {
                        tracing::warn!(configmap = CALIBRATION_CONFIGMAP, error = %e, "ignoring an unreadable calibration")
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(configmap = CALIBRATION_CONFIGMAP, error = %e, "reading the calibration failed; starting without")
            }
        }
    }

    /// Keep the calibration in its ConfigMap (server-side apply; best effort, the next change
    /// writes it again).
    async fn save_calibration(&self, c: &Calibration) {
        let Some(ns) = &self.cfg.calibration_namespace else {
            return;
        };
        let cm = ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(CALIBRATION_CONFIGMAP.into()),
                namespace: Some(ns.clone()),
                labels: Some([(labels::MANAGED_BY.to_owned(), labels::MANAGER.to_owned())].into()),
                ..Default::default()
            },
            data: Some(
                [(
                    CALIBRATION_KEY.to_owned(),
                    serde_yaml_ng::to_string(c).unwrap_or_default(),
                )]
                .into(),
            ),
            ..Default::default()
        };
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        if let Err(e) = api
            .patch(CALIBRATION_CONFIGMAP, &params, &Patch::Apply(&cm))
            .await
        {
            tracing::warn!(configmap = CALIBRATION_CONFIGMAP, error = %e, "saving the calibration failed; retrying with the next change");
        }
    }

    /// One pass: scrape the ready leaders of every autoscaled deployment in `snap`, decide,
    /// and write what changed. Errors are logged and retried by the next pass.
    pub async fn pass<N, P, D>(&mut self, snap: &Snapshot<N, P, D>) -> Vec<Outcome>
    where
        N: Borrow<Node> + Sync,
        P: Borrow<Pod> + Sync,
        D: Borrow<ModelDeployment> + Sync,
    {
        let started = self.clock.now();
        let out = self.pass_inner(snap).await;
        if std::mem::take(&mut self.calibration_changed) {
            self.save_calibration(&self.calibration()).await;
        }
        self.metrics.passes.inc();
        self.metrics.pass_duration.observe(
            self.clock
                .now()
                .saturating_duration_since(started)
                .as_secs_f64(),
        );
        out
    }

    async fn pass_inner<N, P, D>(&mut self, snap: &Snapshot<N, P, D>) -> Vec<Outcome>
    where
        N: Borrow<Node> + Sync,
        P: Borrow<Pod> + Sync,
        D: Borrow<ModelDeployment> + Sync,
    {
        let live: Vec<&ModelDeployment> = snap
            .deployments
            .iter()
            .map(Borrow::borrow)
            .filter(|d| d.metadata.deletion_timestamp.is_none())
            .collect();
        let deployments: Vec<&ModelDeployment> = live
            .iter()
            .copied()
            .filter(|d| d.spec.autoscaling.as_ref().is_some_and(|a| a.enabled))
            .collect();
        let known: HashSet<String> = deployments.iter().map(|d| pass::key(d)).collect();
        // A pool's history is under `ns/NAME:ROLE`: kept while its deployment is.
        self.histories
            .retain(|k, _| known.contains(pass::split_key(k).0));
        let gauges: HashSet<DeploymentLabels> = deployments
            .iter()
            .flat_map(|d| pass::scaled_names(d))
            .map(|(namespace, deployment)| DeploymentLabels {
                namespace,
                deployment,
            })
            .collect();
        for gone in self.gauges.difference(&gauges) {
            self.metrics.desired_replicas.remove(gone);
            self.metrics.capacity_limited.remove(gone);
        }
        self.gauges = gauges;
        if live.is_empty() {
            self.last.clear();
            return Vec::new();
        }
        // Every deployment's leaders: the autoscaled ones for their decisions, all of them for
        // the calibration of the cost model.
        let targets: Vec<LeaderTarget> =
            live.iter().flat_map(|md| leaders(md, &snap.pods)).collect();
        let by_key: HashMap<String, &ModelDeployment> =
            live.iter().map(|d| (pass::key(d), *d)).collect();
        let timeout = self.cfg.scrape_timeout;
        let scraper = self.scraper.clone();
        let results: Vec<(LeaderTarget, Result<String, ScrapeError>)> =
            futures::stream::iter(targets.into_iter().map(|t| {
                let fut = scraper.scrape(t.addr);
                async move {
                    let r = match tokio::time::timeout(timeout, fut).await {
                        Ok(r) => r,
                        Err(_) => Err(ScrapeError::Timeout(timeout)),
                    };
                    (t, r)
                }
            }))
            .buffer_unordered(self.cfg.concurrency.max(1))
            .collect()
            .await;
        let now = self.clock.now();
        let mut samples: HashMap<String, Vec<ReplicaSample>> = HashMap::new();
        let mut seen = HashSet::new();
        for (t, r) in results {
            seen.insert(t.pod.clone());
            self.metrics
                .scrapes
                .get_or_create(&ResultLabel {
                    result: scrape_result(&r),
                })
                .inc();
            let sample = match r {
                Ok(text) => {
                    let m = LeaderMetrics::from_engine_text(t.engine, &text);
                    let prev = self.last.get(&t.pod).and_then(|l| {
                        l.tokens_total
                            .map(|v| (v, now.saturating_duration_since(l.at).as_secs_f64()))
                    });
                    let mut s = m.sample(prev);
                    s.pool = t.pool.clone();
                    // The interval since the pod's last scrape: the latencies the pools
                    // scale on, and the calibration's measurement.
                    let means = self
                        .last
                        .get(&t.pod)
                        .map(|l| interval_means(&l.metrics, &m));
                    if let Some(means) = &means {
                        s.time_to_first_token_s = means.time_to_first_token_s;
                        s.inter_token_latency_s = means.inter_token_latency_s;
                    }
                    if let (Some(means), Some(md)) = (&means, by_key.get(&t.deployment))
                        && let Some((key, measurement)) =
                            calibration_sample(md, t.replica, means, &m, &self.plan_cfg)
                    {
                        self.calibration
                            .lock()
                            .expect("lock")
                            .observe(&key, measurement);
                        self.calibration_changed = true;
                    }
                    self.last.insert(
                        t.pod.clone(),
                        LastScrape {
                            at: now,
                            sample: s.clone(),
                            tokens_total: m.generated_tokens_total,
                            metrics: m,
                        },
                    );
                    Some(s)
                }
                Err(e) => {
                    tracing::debug!(deployment = %t.deployment, addr = %t.addr, error = %e, "scrape failed");
                    self.last.get(&t.pod).map(|l| {
                        let mut s = l.sample.clone();
                        s.age_s = now.saturating_duration_since(l.at).as_secs_f64();
                        s
                    })
                }
            };
            if let Some(s) = sample
                && by_key
                    .get(&t.deployment)
                    .is_some_and(|d| d.spec.autoscaling.as_ref().is_some_and(|a| a.enabled))
            {
                samples.entry(t.deployment).or_default().push(s);
            }
        }
        self.last.retain(|k, _| seen.contains(k));

        // GPU use read from the shared pods, not from copies of them.
        let reserved = reserved_by_others(
            snap.deployments.iter().map(Borrow::borrow),
            None,
            snap.pods.iter().map(Borrow::borrow),
        );
        let inv = Inventory::from_nodes_and_use(
            &snap.nodes,
            &gpus_in_use(&snap.pods, &reserved),
            &self.plan_cfg.catalog,
            &self.plan_cfg.topology_keys,
            // Of the nodes' labels, only those the autoscaled deployments select on.
            Some(&labels_read(deployments.iter().map(|d| &d.spec.placement))),
        );
        let pass_targets: Vec<Target<'_>> = deployments
            .iter()
            .map(|md| Target {
                md,
                samples: samples.remove(&pass::key(md)).unwrap_or_default(),
            })
            .collect();
        let now_s = now.saturating_duration_since(self.epoch).as_secs_f64();
        let decisions = decide_pass(
            &pass_targets,
            &self.histories,
            Some(&inv),
            &self.cfg.params,
            &self.plan_cfg.plan,
            now_s,
        );
        // The pools' sizes as decided in this pass, per deployment: one write carries both, so
        // two pools that change in the same pass never undo each other. And the decision that
        // writes a deployment's condition: its first one limited by capacity, else its first.
        let mut pool_sizes: HashMap<String, BTreeMap<String, u32>> = HashMap::new();
        let mut speaks: HashMap<String, (String, bool)> = HashMap::new();
        for (k, d) in &decisions {
            let (dep, role) = pass::split_key(k);
            if let Some(role) = role {
                pool_sizes
                    .entry(dep.to_owned())
                    .or_default()
                    .insert(role.to_owned(), d.replicas);
            }
            if speaks
                .get(dep)
                .is_none_or(|&(_, limited)| !limited && d.capacity_limited)
            {
                speaks.insert(dep.to_owned(), (k.clone(), d.capacity_limited));
            }
        }
        let speaks: HashSet<String> = speaks.into_values().map(|(k, _)| k).collect();
        let mut outcomes = Vec::with_capacity(decisions.len());
        for (key, d) in decisions {
            let (dep_key, pool) = pass::split_key(&key);
            let Some(md) = by_key.get(dep_key).copied() else {
                continue;
            };
            let pool = pool.map(str::to_owned);
            let spec = md.spec.autoscaling.as_ref().expect("enabled");
            self.metrics
                .decisions
                .get_or_create(&DirectionLabel {
                    direction: direction(&d),
                })
                .inc();
            let labels = DeploymentLabels {
                namespace: md.namespace().unwrap_or_default(),
                deployment: match &pool {
                    Some(role) => format!("{}:{role}", md.name_any()),
                    None => md.name_any(),
                },
            };
            self.metrics
                .desired_replicas
                .get_or_create(&labels)
                .set(i64::from(d.replicas));
            self.metrics
                .capacity_limited
                .get_or_create(&labels)
                .set(i64::from(d.capacity_limited));
            let scale = if d.replicas != d.current {
                let r = match &pool {
                    None => write_result(self.apply_replicas(md, d.replicas).await),
                    Some(_) => {
                        write_result(self.apply_pool_replicas(md, &pool_sizes[dep_key]).await)
                    }
                };
                match &r {
                    WriteResult::Written => {
                        tracing::info!(deployment = %key, from = d.current, to = d.replicas, reason = d.reason.as_str(), "{}", d.message);
                    }
                    other => {
                        let what = match &pool {
                            None => "replicas through the scale subresource",
                            Some(_) => "spec.poolReplicas",
                        };
                        tracing::warn!(deployment = %key, result = ?other, "writing {what} failed; retrying next tick");
                    }
                }
                r
            } else {
                tracing::debug!(deployment = %key, reason = d.reason.as_str(), "{}", d.message);
                WriteResult::Skipped
            };
            let applied = matches!(scale, WriteResult::Written | WriteResult::Skipped);
            if applied {
                self.histories.entry(key.clone()).or_default().commit(
                    spec,
                    &self.cfg.params,
                    &d,
                    now_s,
                );
            }
            let old = md
                .status
                .as_ref()
                .map(|s| s.conditions.as_slice())
                .unwrap_or(&[]);
            // The condition describes the replicas written: when that write failed, it waits
            // for the next pass with it.
            let conditions = if applied && speaks.contains(&key) {
                scaling_condition(
                    old,
                    &d,
                    pool.as_deref(),
                    md.metadata.generation,
                    self.clock.wall(),
                )
            } else {
                None
            };
            let condition = match conditions {
                None => WriteResult::Skipped,
                Some(conditions) => {
                    let r = write_result(self.write_conditions(md, &conditions).await);
                    match &r {
                        WriteResult::Conflict => {
                            tracing::debug!(deployment = %key, "status changed meanwhile; ScalingLimited waits for the next tick")
                        }
                        WriteResult::Failed(e) => {
                            tracing::warn!(deployment = %key, error = %e, "writing the ScalingLimited condition failed; retrying next tick")
                        }
                        _ => {}
                    }
                    r
                }
            };
            outcomes.push(Outcome {
                deployment: key,
                decision: d,
                scale,
                condition,
            });
        }
        outcomes
    }

    async fn apply_replicas(&self, md: &ModelDeployment, replicas: u32) -> Result<(), kube::Error> {
        let api: Api<ModelDeployment> =
            Api::namespaced(self.client.clone(), &md.namespace().unwrap_or_default());
        let body = scale_body(replicas);
        api.patch_scale(
            &md.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map(|_| ())
    }

    /// Write both pools' sizes (`spec.poolReplicas`) with a JSON merge patch of the spec.
    async fn apply_pool_replicas(
        &self,
        md: &ModelDeployment,
        sizes: &BTreeMap<String, u32>,
    ) -> Result<(), kube::Error> {
        let api: Api<ModelDeployment> =
            Api::namespaced(self.client.clone(), &md.namespace().unwrap_or_default());
        api.patch(
            &md.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&pool_replicas_patch(sizes)),
        )
        .await
        .map(|_| ())
    }

    async fn write_conditions(
        &self,
        md: &ModelDeployment,
        conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    ) -> Result<(), kube::Error> {
        let api: Api<ModelDeployment> =
            Api::namespaced(self.client.clone(), &md.namespace().unwrap_or_default());
        let body = condition_patch(md.resource_version(), conditions);
        api.patch_status(
            &md.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&body),
        )
        .await
        .map(|_| ())
    }
}

/// The server-side apply body of the scale subresource.
pub fn scale_body(replicas: u32) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "spec": {"replicas": replicas},
    })
}

/// The merge patch of `spec.poolReplicas` with every pool's size (role -> replicas).
pub fn pool_replicas_patch(sizes: &BTreeMap<String, u32>) -> serde_json::Value {
    serde_json::json!({"spec": {"poolReplicas": sizes}})
}

/// The merge patch of the conditions, guarded by the resourceVersion that was read.
pub fn condition_patch(
    resource_version: Option<String>,
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"resourceVersion": resource_version},
        "status": {"conditions": conditions},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, role: &str, ready: bool, ip: Option<&str>) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"), "labels": {
                labels::DEPLOYMENT: "m", labels::ROLE: role, labels::MANAGED_BY: labels::MANAGER}},
            "spec": {"containers": []},
            "status": {"phase": "Running", "podIP": ip,
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
        }))
        .expect("pod")
    }

    #[test]
    fn scrapes_only_ready_leaders_on_the_serving_port() {
        let md: ModelDeployment = crate::api::parse_model_deployment(&serde_json::json!({
            "apiVersion": "tessera.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "m", "namespace": "ns"},
            "spec": {"model": {"uri": "pvc://m/x", "architecture": {
                "parameters": 1000000, "layers": 2, "hiddenSize": 64, "attentionHeads": 4,
                "kvHeads": 4, "intermediateSize": 128, "vocabSize": 100, "contextLength": 128,
                "bytesPerParameter": 2}},
                "serving": {"port": 9000}}
        }))
        .expect("valid");
        let pods = [
            pod("a", labels::ROLE_LEADER, true, Some("10.0.0.1")),
            pod("b", labels::ROLE_LEADER, false, Some("10.0.0.2")),
            pod("c", labels::ROLE_WORKER, true, Some("10.0.0.3")),
            pod("d", labels::ROLE_LEADER, true, None),
            pod("e", labels::ROLE_LEADER, true, Some("fd00::5")),
        ];
        let got = leaders(&md, &pods);
        let addrs: Vec<String> = got.iter().map(|t| t.addr.to_string()).collect();
        assert_eq!(addrs, ["10.0.0.1:9000", "[fd00::5]:9000"]);
        assert_eq!(got[0].deployment, "ns/m");
        assert_eq!(got[0].pod, "uid-a");
    }

    #[test]
    fn writes_are_scale_apply_and_guarded_merge_patches() {
        assert_eq!(
            scale_body(4),
            serde_json::json!({"apiVersion": "autoscaling/v1", "kind": "Scale", "spec": {"replicas": 4}})
        );
        let p = condition_patch(Some("42".into()), &[]);
        assert_eq!(p["metadata"]["resourceVersion"], "42");
        assert!(
            p["status"]["conditions"]
                .as_array()
                .is_some_and(Vec::is_empty)
        );
    }
}
