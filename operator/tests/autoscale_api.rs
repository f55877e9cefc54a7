//! Scripted API scenarios (tower-test) for the autoscaler: the exact requests one pass of the
//! real runner makes (scale subresource, `ScalingLimited` on `/status`), how it survives 409 and
//! 5xx answers, which pods it scrapes (fake scrapes, and real HTTP on a local listener), and the
//! metrics it exports. Time comes from a manual clock; no test sleeps.

mod common;

use common::h100_node as node;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tessera_operator::api::{ModelDeployment, parse_model_deployment};
use tessera_operator::autoscale::Reason;
use tessera_operator::autoscale::runner::{
    Clock, HttpScraper, Runner, RunnerConfig, Scraper, Snapshot, WriteResult,
};
use tessera_operator::autoscale::scrape::ScrapeError;
use tessera_operator::controller::metrics::AutoscalerMetrics;
use tessera_operator::controller::reconcile::{Config, Observed, reconcile};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NS: &str = "inference";
const NAME: &str = "llama-8b";
const SCALE: &str =
    "/apis/tessera.dev/v1alpha1/namespaces/inference/modeldeployments/llama-8b/scale";
const STATUS: &str =
    "/apis/tessera.dev/v1alpha1/namespaces/inference/modeldeployments/llama-8b/status";

/// queueDepth, target 10 per replica, 1..8 replicas, no stabilization windows (each pass may
/// move), tensor parallel 2 (2 GPUs per replica).
fn deployment(replicas: i32, enabled: bool) -> ModelDeployment {
    let mut md = parse_model_deployment(&json!({
        "apiVersion": "tessera.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {
            "replicas": replicas,
            "model": {"uri": "pvc://models/llama-8b", "architecture": {
                "parameters": 8030261248i64, "layers": 32, "hiddenSize": 4096,
                "attentionHeads": 32, "kvHeads": 8, "intermediateSize": 14336,
                "vocabSize": 128256, "contextLength": 131072, "bytesPerParameter": 2}},
            "parallelism": {"tensor": 2, "pipeline": 1},
            "serving": {"maxConcurrency": 16, "contextLength": 8192, "port": 8000},
            "autoscaling": {"enabled": enabled, "minReplicas": 1, "maxReplicas": 8,
                "metric": "queueDepth", "target": 10,
                "scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 0}
        }
    }))
    .expect("valid");
    md.metadata.uid = Some("uid-1".into());
    md.metadata.generation = Some(3);
    md.metadata.resource_version = Some("41".into());
    md
}

/// `replicas` placed and running (each leader Ready on 10.0.0.<replica + 1>), as the
/// controller leaves them; the status carries the placements.
fn converged(replicas: i32, enabled: bool) -> (ModelDeployment, Vec<Pod>) {
    let mut md = deployment(replicas, enabled);
    let nodes = [node()];
    let obs = Observed {
        md: &md,
        pods: &[],
        services: &[],
        routers: &[],
        nodes: &nodes,
        other_pods: &[],
        reserved: &[],
        now: Timestamp::now(),
    };
    let actions = reconcile(&obs, &Config::default());
    md.status = actions.status.clone();
    assert_eq!(
        md.status.as_ref().map(|s| s.placements.len()),
        Some(replicas as usize),
        "every replica placed"
    );
    let pods = actions
        .apply_pods
        .into_iter()
        .map(|mut p| {
            let replica: u32 = p.metadata.labels.as_ref().expect("labels")["tessera.dev/replica"]
                .parse()
                .expect("replica");
            p.spec.as_mut().expect("spec").node_name = Some("h100-1".into());
            p.status = Some(ready_status(Some(&format!("10.0.0.{}", replica + 1))));
            p
        })
        .collect();
    (md, pods)
}

fn ready_status(ip: Option<&str>) -> k8s_openapi::api::core::v1::PodStatus {
    serde_json::from_value(json!({
        "phase": "Running", "podIP": ip,
        "conditions": [{"type": "Ready", "status": "True"}]
    }))
    .expect("status")
}

fn snapshot(md: &ModelDeployment, pods: &[Pod]) -> Snapshot {
    Snapshot {
        nodes: vec![node()],
        pods: pods.to_vec(),
        deployments: vec![md.clone()],
    }
}

/// A clock that moves only when told to.
struct ManualClock {
    base: Instant,
    offset: Mutex<Duration>,
}

impl ManualClock {
    fn new() -> Arc<Self> {
        Arc::new(ManualClock {
            base: Instant::now(),
            offset: Mutex::new(Duration::ZERO),
        })
    }
    fn advance(&self, d: Duration) {
        *self.offset.lock().expect("lock") += d;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.base + *self.offset.lock().expect("lock")
    }
    fn wall(&self) -> Timestamp {
        Timestamp::from_second(1_700_000_000).expect("ts") + *self.offset.lock().expect("lock")
    }
}

/// What a fake leader answers.
#[derive(Clone)]
enum Answer {
    Metrics(String),
    /// Never answers (the runner's timeout must end it).
    Hang,
    Refused,
}

/// Scrapes answered from a table, every address recorded; addresses not in the table are
/// scraped for real over HTTP.
#[derive(Default)]
struct FakeScraper {
    answers: Mutex<HashMap<SocketAddr, Answer>>,
    scraped: Mutex<Vec<SocketAddr>>,
}

impl FakeScraper {
    fn set(&self, ip: &str, answer: Answer) {
        let addr = SocketAddr::new(ip.parse().expect("ip"), 8000);
        self.answers.lock().expect("lock").insert(addr, answer);
    }
    fn scraped(&self) -> Vec<SocketAddr> {
        let mut v = self.scraped.lock().expect("lock").clone();
        v.sort();
        v
    }
}

impl Scraper for FakeScraper {
    fn scrape(&self, addr: SocketAddr) -> BoxFuture<'static, Result<String, ScrapeError>> {
        self.scraped.lock().expect("lock").push(addr);
        match self.answers.lock().expect("lock").get(&addr).cloned() {
            Some(Answer::Metrics(text)) => Box::pin(async move { Ok(text) }),
            Some(Answer::Hang) => Box::pin(futures::future::pending()),
            Some(Answer::Refused) => Box::pin(async {
                Err(ScrapeError::Io(
                    std::io::ErrorKind::ConnectionRefused.into(),
                ))
            }),
            None => HttpScraper.scrape(addr),
        }
    }
}

/// A leader's `/metrics` with `waiting + running` requests.
fn load(waiting: u32, running: u32) -> Answer {
    Answer::Metrics(format!(
        "# TYPE tessera_requests_waiting gauge\ntessera_requests_waiting {waiting}\n\
         # TYPE tessera_requests_running gauge\ntessera_requests_running {running}\n"
    ))
}

#[derive(Debug)]
struct Seen {
    method: Method,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

/// How the fake API server answers a request.
type Script = Box<dyn FnMut(&Seen) -> StatusCode + Send>;

fn always_ok() -> Script {
    Box::new(|_| StatusCode::OK)
}

/// The first request to `path` gets `code`, every other request 200.
fn fail_first(path: &'static str, code: StatusCode) -> Script {
    let mut first = true;
    Box::new(move |s| {
        if s.path == path && std::mem::take(&mut first) {
            code
        } else {
            StatusCode::OK
        }
    })
}

/// Answer every request per `script` until the client is dropped, recording each in `seen`
/// before answering it.
fn serve(
    mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    mut script: Script,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.expect("body").to_vec();
            let s = Seen {
                method: parts.method,
                path: parts.uri.path().to_owned(),
                query: parts.uri.query().unwrap_or_default().to_owned(),
                content_type: parts
                    .headers
                    .get("content-type")
                    .map(|v| v.to_str().expect("ascii").to_owned())
                    .unwrap_or_default(),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            };
            let code = script(&s);
            let reply = if !code.is_success() {
                let reason = if code == StatusCode::CONFLICT {
                    "Conflict"
                } else {
                    "InternalError"
                };
                json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                    "message": format!("scripted {code}"), "reason": reason, "code": code.as_u16()})
            } else if s.path.ends_with("/scale") {
                json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
                    "metadata": {"name": NAME, "namespace": NS},
                    "spec": s.body["spec"].clone(), "status": {"replicas": 1}})
            } else {
                let mut whole = serde_json::to_value(deployment(1, true)).expect("json");
                whole["status"] = s.body["status"].clone();
                whole
            };
            seen.lock().expect("lock").push(s);
            send.send_response(
                Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&reply).expect("json")))
                    .expect("response"),
            );
        }
    })
}

struct Harness {
    runner: Runner,
    clock: Arc<ManualClock>,
    scraper: Arc<FakeScraper>,
    registry: Registry,
    seen: Arc<Mutex<Vec<Seen>>>,
    server: tokio::task::JoinHandle<()>,
}

fn harness(script: Script, scrape_timeout: Duration) -> Harness {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let mut registry = Registry::default();
    let metrics = AutoscalerMetrics::new(&mut registry);
    let clock = ManualClock::new();
    let scraper = Arc::new(FakeScraper::default());
    let runner = Runner::new(
        client,
        RunnerConfig {
            scrape_timeout,
            ..RunnerConfig::default()
        },
        Config::default(),
        metrics,
    )
    .with_clock(clock.clone())
    .with_scraper(scraper.clone());
    let seen = Arc::new(Mutex::new(Vec::new()));
    Harness {
        runner,
        clock,
        scraper,
        registry,
        server: serve(handle, script, seen.clone()),
        seen,
    }
}

impl Harness {
    /// The exported metrics, as Prometheus scrapes them.
    fn metrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("encode");
        out
    }

    /// The conditions of the last status write so far.
    fn last_status_conditions(&self) -> Vec<Condition> {
        let seen = self.seen.lock().expect("lock");
        let s = seen
            .iter()
            .rev()
            .find(|s| s.path == STATUS)
            .expect("a status write");
        serde_json::from_value(s.body["status"]["conditions"].clone()).expect("conditions")
    }

    /// Drop the runner (and with it the client) and collect every request it made.
    async fn requests(self) -> Vec<Seen> {
        drop(self.runner);
        self.server.await.expect("server");
        std::mem::take(&mut *self.seen.lock().expect("lock"))
    }
}

/// The value of the series `series` (name with its labels) in the exposition, if exported.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().expect("number"))
}

fn desired(text: &str) -> Option<f64> {
    value(
        text,
        r#"tessera_autoscaler_desired_replicas{namespace="inference",deployment="llama-8b"}"#,
    )
}

fn assert_scale_apply(s: &Seen, replicas: u32) {
    assert_eq!(s.method, Method::PATCH);
    assert_eq!(s.path, SCALE);
    let query: Vec<&str> = s.query.split('&').collect();
    assert!(
        query.contains(&"fieldManager=tessera-autoscaler"),
        "{}",
        s.query
    );
    assert!(query.contains(&"force=true"), "{}", s.query);
    assert_eq!(s.content_type, "application/apply-patch+yaml");
    assert_eq!(
        s.body,
        json!({"apiVersion": "autoscaling/v1", "kind": "Scale", "spec": {"replicas": replicas}})
    );
}

fn scaling_limited(s: &Seen) -> Condition {
    assert_eq!(s.method, Method::PATCH);
    assert_eq!(s.path, STATUS);
    assert_eq!(s.content_type, "application/merge-patch+json");
    assert!(
        !s.query.contains("fieldManager=tessera-autoscaler"),
        "{}",
        s.query
    );
    let conditions: Vec<Condition> =
        serde_json::from_value(s.body["status"]["conditions"].clone()).expect("conditions");
    let mut limited = conditions
        .into_iter()
        .filter(|c| c.type_ == "ScalingLimited");
    let c = limited.next().expect("ScalingLimited");
    assert!(limited.next().is_none(), "one ScalingLimited condition");
    c
}

const PASS: Duration = Duration::from_secs(15);

#[tokio::test]
async fn a_scale_up_is_one_forced_apply_on_the_scale_subresource() {
    let h = harness(always_ok(), Duration::from_secs(3));
    // One replica (2 of 8 GPUs) with 25 requests at target 10: 3 replicas, which fit.
    let (md, pods) = converged(1, true);
    h.scraper.set("10.0.0.1", load(20, 5));
    let mut h = h;
    let out = h.runner.pass(&snapshot(&md, &pods)).await;
    assert_eq!(out.len(), 1);
    let d = &out[0].decision;
    assert_eq!(
        (d.current, d.replicas, d.reason),
        (1, 3, Reason::ScaleUp),
        "{}",
        d.message
    );
    assert_eq!(out[0].scale, WriteResult::Written);
    assert_eq!(out[0].condition, WriteResult::Skipped);
    let m = h.metrics();
    assert_eq!(value(&m, "tessera_autoscaler_passes_total"), Some(1.0));
    assert_eq!(
        value(&m, "tessera_autoscaler_pass_duration_seconds_count"),
        Some(1.0)
    );
    assert_eq!(
        value(&m, r#"tessera_autoscaler_scrapes_total{result="ok"}"#),
        Some(1.0)
    );
    assert_eq!(
        value(&m, r#"tessera_autoscaler_decisions_total{direction="up"}"#),
        Some(1.0)
    );
    assert_eq!(desired(&m), Some(3.0));
    assert_eq!(h.scraper.scraped(), ["10.0.0.1:8000".parse().unwrap()]);
    let seen = h.requests().await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_scale_apply(&seen[0], 3);
}

#[tokio::test]
async fn holding_writes_nothing() {
    let mut h = harness(always_ok(), Duration::from_secs(3));
    // Two replicas at 10 and 11 requests, target 10: within the tolerance, never limited.
    let (md, pods) = converged(2, true);
    h.scraper.set("10.0.0.1", load(4, 6));
    h.scraper.set("10.0.0.2", load(5, 6));
    for _ in 0..3 {
        let out = h.runner.pass(&snapshot(&md, &pods)).await;
        let d = &out[0].decision;
        assert_eq!(
            (d.replicas, d.reason),
            (2, Reason::WithinTolerance),
            "{}",
            d.message
        );
        assert_eq!(
            (&out[0].scale, &out[0].condition),
            (&WriteResult::Skipped, &WriteResult::Skipped)
        );
        h.clock.advance(PASS);
    }
    let m = h.metrics();
    assert_eq!(value(&m, "tessera_autoscaler_passes_total"), Some(3.0));
    assert_eq!(
        value(
            &m,
            r#"tessera_autoscaler_decisions_total{direction="hold"}"#
        ),
        Some(3.0)
    );
    assert_eq!(
        value(&m, r#"tessera_autoscaler_decisions_total{direction="up"}"#),
        None
    );
    assert_eq!(desired(&m), Some(2.0));
    assert!(h.requests().await.is_empty());
}

#[tokio::test]
async fn capacity_limits_show_as_a_guarded_condition_that_clears() {
    let mut h = harness(always_ok(), Duration::from_secs(3));
    // Two replicas (4 of 8 GPUs) at 40 requests each, target 10: the load asks for 8, the
    // scale-up rate allows 6, and 2 more fit (4 GPUs free): 4.
    let (md, pods) = converged(2, true);
    h.scraper.set("10.0.0.1", load(30, 10));
    h.scraper.set("10.0.0.2", load(30, 10));
    let out = h.runner.pass(&snapshot(&md, &pods)).await;
    let d = &out[0].decision;
    assert_eq!(
        (d.replicas, d.reason),
        (4, Reason::CapacityLimited),
        "{}",
        d.message
    );
    assert_eq!(
        (&out[0].scale, &out[0].condition),
        (&WriteResult::Written, &WriteResult::Written)
    );

    // The world after that pass: 4 replicas placed on all 8 GPUs, the condition in status.
    h.clock.advance(PASS);
    let (mut md4, pods4) = converged(4, true);
    md4.metadata.resource_version = Some("42".into());
    for ip in 1..=4 {
        h.scraper.set(&format!("10.0.0.{ip}"), load(30, 10));
    }
    // Still 40 per replica: the load asks for 16 (8 at most), none more fits. The numbers in
    // the message change, so the condition is written again.
    let out = h.runner.pass(&snapshot(&md4, &pods4)).await;
    let d = &out[0].decision;
    assert_eq!(
        (d.current, d.replicas, d.reason),
        (4, 4, Reason::CapacityLimited),
        "{}",
        d.message
    );
    assert_eq!(
        (&out[0].scale, &out[0].condition),
        (&WriteResult::Skipped, &WriteResult::Written)
    );
    let m = h.metrics();
    assert_eq!(desired(&m), Some(4.0));
    assert_eq!(
        value(
            &m,
            r#"tessera_autoscaler_decisions_total{direction="hold"}"#
        ),
        Some(1.0)
    );

    // Same load, the condition as written in status: nothing to write.
    h.clock.advance(PASS);
    let limited = h.last_status_conditions();
    md4.status.as_mut().expect("status").conditions = limited.clone();
    let out = h.runner.pass(&snapshot(&md4, &pods4)).await;
    assert_eq!(
        (&out[0].scale, &out[0].condition),
        (&WriteResult::Skipped, &WriteResult::Skipped),
        "{}",
        out[0].decision.message
    );

    // The load drops to 10 per replica: within the tolerance, not limited any more.
    h.clock.advance(PASS);
    for ip in 1..=4 {
        h.scraper.set(&format!("10.0.0.{ip}"), load(4, 6));
    }
    let out = h.runner.pass(&snapshot(&md4, &pods4)).await;
    assert_eq!(out[0].decision.replicas, 4);
    assert_eq!(out[0].condition, WriteResult::Written);

    let seen = h.requests().await;
    assert_eq!(seen.len(), 4, "{seen:?}");
    // Pass 1: the replicas first, then the condition, guarded by the resourceVersion read.
    assert_scale_apply(&seen[0], 4);
    let c = scaling_limited(&seen[1]);
    assert_eq!(seen[1].body["metadata"]["resourceVersion"], "41");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "InsufficientCapacity")
    );
    assert_eq!(
        c.message,
        "wanted 6 replicas, 4 fit in the cluster (allowed GPU types included); running 4"
    );
    assert_eq!(c.observed_generation, Some(3));
    // Pass 2: new numbers.
    let c = scaling_limited(&seen[2]);
    assert_eq!(seen[2].body["metadata"]["resourceVersion"], "42");
    assert_eq!(c.status, "True");
    assert_eq!(
        c.message,
        "wanted 8 replicas, 4 fit in the cluster (allowed GPU types included); running 4"
    );
    // Pass 4: cleared, the condition turns False (it is not removed), with a new transition.
    let c = scaling_limited(&seen[3]);
    assert_eq!(seen[3].body["metadata"]["resourceVersion"], "42");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "CapacityAvailable")
    );
    let before = limited
        .iter()
        .find(|c| c.type_ == "ScalingLimited")
        .expect("before");
    assert!(c.last_transition_time.0 > before.last_transition_time.0);
    // The controller's other conditions ride along unchanged in the merge patch.
    let all: Vec<Condition> =
        serde_json::from_value(seen[3].body["status"]["conditions"].clone()).expect("conditions");
    let others: Vec<&Condition> = limited
        .iter()
        .filter(|c| c.type_ != "ScalingLimited")
        .collect();
    assert!(!others.is_empty());
    assert_eq!(
        all.iter()
            .filter(|c| c.type_ != "ScalingLimited")
            .collect::<Vec<_>>(),
        others
    );
}

#[tokio::test]
async fn a_conflict_on_status_waits_for_the_next_pass() {
    // The first status write meets a controller write in between (409); the next one lands.
    let mut h = harness(
        fail_first(STATUS, StatusCode::CONFLICT),
        Duration::from_secs(3),
    );
    // Four replicas on all 8 GPUs at 40 requests each: held at 4 by capacity.
    let (md, pods) = converged(4, true);
    for ip in 1..=4 {
        h.scraper.set(&format!("10.0.0.{ip}"), load(30, 10));
    }
    let out = h.runner.pass(&snapshot(&md, &pods)).await;
    assert_eq!(out[0].decision.replicas, 4);
    assert_eq!(out[0].scale, WriteResult::Skipped);
    assert_eq!(out[0].condition, WriteResult::Conflict);
    h.clock.advance(PASS);
    let out = h.runner.pass(&snapshot(&md, &pods)).await;
    assert_eq!(out[0].condition, WriteResult::Written);
    let seen = h.requests().await;
    // One write per pass: no retry storm within a pass, no scale write.
    assert_eq!(seen.len(), 2, "{seen:?}");
    for s in &seen {
        assert_eq!(scaling_limited(s).status, "True");
        assert_eq!(s.body["metadata"]["resourceVersion"], "41");
    }
}

#[tokio::test]
async fn a_server_error_on_scale_is_retried_next_pass_before_the_condition() {
    // The first scale write gets a 503; the next pass writes it again.
    let mut h = harness(
        fail_first(SCALE, StatusCode::SERVICE_UNAVAILABLE),
        Duration::from_secs(3),
    );
    let (md, pods) = converged(2, true);
    h.scraper.set("10.0.0.1", load(30, 10));
    h.scraper.set("10.0.0.2", load(30, 10));
    let out = h.runner.pass(&snapshot(&md, &pods)).await;
    assert_eq!(out[0].decision.replicas, 4);
    assert!(
        matches!(&out[0].scale, WriteResult::Failed(e) if e.contains("503")),
        "{:?}",
        out[0].scale
    );
    // The condition describes replicas that were not written: it waits too.
    assert_eq!(out[0].condition, WriteResult::Skipped);
    h.clock.advance(PASS);
    let out = h.runner.pass(&snapshot(&md, &pods)).await;
    assert_eq!(out[0].decision.replicas, 4, "{}", out[0].decision.message);
    assert_eq!(
        (&out[0].scale, &out[0].condition),
        (&WriteResult::Written, &WriteResult::Written)
    );
    let m = h.metrics();
    assert_eq!(
        value(&m, r#"tessera_autoscaler_decisions_total{direction="up"}"#),
        Some(2.0)
    );
    let seen = h.requests().await;
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_scale_apply(&seen[0], 4);
    assert_scale_apply(&seen[1], 4);
    assert_eq!(scaling_limited(&seen[2]).status, "True");
}

#[tokio::test]
async fn a_deployment_without_autoscaling_gets_no_request_and_no_decision() {
    let mut h = harness(always_ok(), Duration::from_secs(3));
    let (md, pods) = converged(1, true);
    h.scraper.set("10.0.0.1", load(10, 0));
    // Enabled and holding: a desired_replicas series.
    let out = h.runner.pass(&snapshot(&md, &pods)).await;
    assert_eq!(out[0].decision.replicas, 1);
    assert_eq!(desired(&h.metrics()), Some(1.0));
    // Turned off under load that would scale it up: nothing at all, and the series goes.
    h.scraper.set("10.0.0.1", load(80, 0));
    let mut off = md.clone();
    off.spec.autoscaling.as_mut().expect("autoscaling").enabled = false;
    let mut none = md.clone();
    none.metadata.name = Some("no-autoscaling".into());
    none.spec.autoscaling = None;
    for _ in 0..2 {
        h.clock.advance(PASS);
        let snap = Snapshot {
            nodes: vec![node()],
            pods: pods.clone(),
            deployments: vec![off.clone(), none.clone()],
        };
        assert!(h.runner.pass(&snap).await.is_empty());
    }
    let m = h.metrics();
    assert_eq!(value(&m, "tessera_autoscaler_passes_total"), Some(3.0));
    assert_eq!(desired(&m), None, "{m}");
    // Its leader is still scraped, for the cost model's calibration, but never decided for.
    assert_eq!(h.scraper.scraped().len(), 3);
    assert!(h.requests().await.is_empty());
}

/// A leader's `/metrics` with histogram totals: `tokens` tokens at `itl` seconds each, and
/// `requests` requests of `prompt` tokens each at `ttft` seconds.
fn timed(running: u32, tokens: f64, itl: f64, requests: f64, prompt: f64, ttft: f64) -> Answer {
    Answer::Metrics(format!(
        "# TYPE tessera_requests_waiting gauge\ntessera_requests_waiting 0\n\
         # TYPE tessera_requests_running gauge\ntessera_requests_running {running}\n\
         # TYPE tessera_inter_token_latency_seconds histogram\n\
         tessera_inter_token_latency_seconds_sum {}\ntessera_inter_token_latency_seconds_count {tokens}\n\
         # TYPE tessera_time_to_first_token_seconds histogram\n\
         tessera_time_to_first_token_seconds_sum {}\ntessera_time_to_first_token_seconds_count {requests}\n\
         # TYPE tessera_prompt_tokens counter\ntessera_prompt_tokens_total {}\n",
        tokens * itl,
        requests * ttft,
        requests * prompt
    ))
}

#[tokio::test]
async fn a_fleet_slower_than_predicted_calibrates_the_model_and_noise_does_not() {
    use tessera_operator::planner::calibration::LayoutKey;
    use tessera_operator::planner::cost::{CostConstants, Workload, estimate, packed_links};
    let mut h = harness(always_ok(), Duration::from_secs(3));
    // Not autoscaled: calibration does not need the autoscaler to act.
    let (md, pods) = converged(1, false);
    let p = &md.status.as_ref().expect("status").placements[0];
    let catalog = tessera_operator::planner::catalog::Catalog::builtin();
    let gpu = catalog.lookup(&p.gpu_type).expect("H100");
    let c = CostConstants::default();
    let (tp, pp) = (p.tensor_parallel as u32, p.pipeline_parallel as u32);
    let key = LayoutKey {
        gpu_type: gpu.name.clone(),
        tensor_parallel: tp,
        pipeline_parallel: pp,
        engine: "tessera".into(),
    };
    // What the model predicts at 8 running sequences: 8 / decode = one step.
    let mut work = tessera_operator::planner::choose::workload(&md.spec);
    work = Workload {
        concurrency: 8.0,
        ..work
    };
    let links = packed_links(gpu, tp, pp, 8, &c);
    let step = 8.0
        / estimate(&md.spec.model.architecture, work, gpu, tp, pp, links, &c)
            .decode_tokens_per_second;
    // The fleet's steps take 1/0.7 of that (30% slower decode), TTFT as predicted.
    let snap = snapshot(&md, &pods);
    let (mut tokens, mut requests) = (0.0, 0.0);
    for pass in 0..5 {
        tokens += 400.0;
        requests += 4.0;
        h.scraper.set(
            "10.0.0.1",
            timed(8, tokens, step / 0.7, requests, 1000.0, 0.2),
        );
        h.runner.pass(&snap).await;
        h.clock.advance(PASS);
        let (decode, _) = h.runner.calibration().correction(&key);
        if pass < 3 {
            assert_eq!(decode, 1.0, "pass {pass}: fewer than 3 intervals");
        } else {
            assert!((decode - 0.7).abs() < 0.01, "pass {pass}: {decode}");
        }
    }
    // One wild interval (a stall) does not move it; a restart (counters back to 0) is no sample.
    tokens += 400.0;
    h.scraper.set(
        "10.0.0.1",
        timed(8, tokens, step * 20.0, requests, 1000.0, 0.2),
    );
    h.runner.pass(&snap).await;
    h.scraper
        .set("10.0.0.1", timed(8, 10.0, step, 1.0, 1000.0, 0.2));
    h.runner.pass(&snap).await;
    let (decode, _) = h.runner.calibration().correction(&key);
    assert!((decode - 0.7).abs() < 0.01, "{decode}");
    assert!(
        h.requests().await.is_empty(),
        "calibration writes nothing to the API"
    );
}

#[tokio::test]
async fn a_scrape_timeout_is_a_missing_sample_and_never_scales_down() {
    let mut h = harness(always_ok(), Duration::from_millis(50));
    // Two replicas; one reports 2 requests (target 10: the load says 1 replica), the other
    // never answers.
    let (md, pods) = converged(2, true);
    h.scraper.set("10.0.0.1", load(1, 1));
    h.scraper.set("10.0.0.2", Answer::Hang);
    let out = h.runner.pass(&snapshot(&md, &pods)).await;
    let d = &out[0].decision;
    assert_eq!(
        (d.replicas, d.reason),
        (2, Reason::MetricsPartial),
        "{}",
        d.message
    );
    let m = h.metrics();
    assert_eq!(
        value(&m, r#"tessera_autoscaler_scrapes_total{result="ok"}"#),
        Some(1.0)
    );
    assert_eq!(
        value(&m, r#"tessera_autoscaler_scrapes_total{result="timeout"}"#),
        Some(1.0)
    );
    // A refused connection is an error, and no sample either.
    h.clock.advance(PASS);
    h.scraper.set("10.0.0.2", Answer::Refused);
    let out = h.runner.pass(&snapshot(&md, &pods)).await;
    assert_eq!(out[0].decision.reason, Reason::MetricsPartial);
    assert_eq!(
        value(
            &h.metrics(),
            r#"tessera_autoscaler_scrapes_total{result="error"}"#
        ),
        Some(1.0)
    );
    // Both answer: now the same load scales down (no stabilization window in this spec).
    h.clock.advance(PASS);
    h.scraper.set("10.0.0.2", load(1, 1));
    let out = h.runner.pass(&snapshot(&md, &pods)).await;
    let d = &out[0].decision;
    assert_eq!(
        (d.replicas, d.reason),
        (1, Reason::ScaleDown),
        "{}",
        d.message
    );
    // Replica 1 is gone. After a good scrape, a timeout reuses the last sample while it is
    // fresh...
    h.clock.advance(PASS);
    h.scraper.set("10.0.0.1", Answer::Hang);
    let mut md1 = md.clone();
    md1.spec.replicas = 1;
    let leader0: Vec<Pod> = pods
        .iter()
        .filter(|p| p.metadata.labels.as_ref().unwrap()["tessera.dev/replica"] == "0")
        .cloned()
        .collect();
    let out = h.runner.pass(&snapshot(&md1, &leader0)).await;
    let d = &out[0].decision;
    assert_eq!(d.fresh, 1, "{}", d.message);
    // ...and turns stale after 60 s: missing, holding.
    h.clock.advance(Duration::from_secs(61));
    let out = h.runner.pass(&snapshot(&md1, &leader0)).await;
    let d = &out[0].decision;
    assert_eq!(
        (d.replicas, d.reason),
        (1, Reason::MetricsMissing),
        "{}",
        d.message
    );
    let m = h.metrics();
    assert_eq!(
        value(
            &m,
            r#"tessera_autoscaler_decisions_total{direction="down"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&m, r#"tessera_autoscaler_scrapes_total{result="timeout"}"#),
        Some(3.0)
    );
    let seen = h.requests().await;
    assert_eq!(seen.len(), 1, "only the scale-down writes: {seen:?}");
    assert_scale_apply(&seen[0], 1);
}

/// A pod of `deployment` in `ns` with `role`, no GPUs, at `ip`.
fn extra_pod(name: &str, ns: &str, deployment: &str, role: &str, ip: Option<&str>) -> Pod {
    let mut p: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "labels": {
            "tessera.dev/deployment": deployment, "tessera.dev/role": role,
            "app.kubernetes.io/managed-by": "tessera-operator"}},
        "spec": {"containers": [{"name": "worker"}]}
    }))
    .expect("pod");
    p.status = Some(ready_status(ip));
    p
}

/// Serve `body` as `/metrics` to every connection on `listener`.
fn serve_metrics(listener: tokio::net::TcpListener, body: &'static str) {
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
}

#[tokio::test]
async fn only_ready_leaders_are_scraped_over_http() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    serve_metrics(
        listener,
        "tessera_requests_waiting 20\ntessera_requests_running 5\n",
    );
    // A generous timeout: the local server answers at once, the outcome does not depend on it.
    let mut h = harness(always_ok(), Duration::from_secs(30));
    let (mut md, mut pods) = converged(1, true);
    md.spec.serving.port = i32::from(port);
    pods[0].status = Some(ready_status(Some("127.0.0.1")));
    let mut not_ready = extra_pod("not-ready", NS, NAME, "leader", Some("127.0.0.2"));
    not_ready
        .status
        .as_mut()
        .unwrap()
        .conditions
        .as_mut()
        .unwrap()[0]
        .status = "False".into();
    let mut pending = extra_pod("pending", NS, NAME, "leader", Some("127.0.0.3"));
    pending.status.as_mut().unwrap().phase = Some("Pending".into());
    let mut deleting = extra_pod("deleting", NS, NAME, "leader", Some("127.0.0.4"));
    deleting.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            Timestamp::from_second(1_700_000_000).unwrap(),
        ));
    let mut other_manager = extra_pod("hand-made", NS, NAME, "leader", Some("127.0.0.5"));
    other_manager
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("app.kubernetes.io/managed-by".into(), "someone".into());
    pods.extend([
        not_ready,
        pending,
        deleting,
        other_manager,
        extra_pod("worker", NS, NAME, "worker", Some("127.0.0.6")),
        extra_pod("no-ip", NS, NAME, "leader", None),
        extra_pod("elsewhere", "other-ns", NAME, "leader", Some("127.0.0.7")),
        extra_pod("other-deployment", NS, "other", "leader", Some("127.0.0.8")),
    ]);
    let out = h.runner.pass(&snapshot(&md, &pods)).await;
    let d = &out[0].decision;
    assert_eq!((d.fresh, d.replicas), (1, 3), "{}", d.message);
    assert_eq!(
        h.scraper.scraped(),
        [SocketAddr::new("127.0.0.1".parse().unwrap(), port)]
    );
    assert_eq!(
        value(
            &h.metrics(),
            r#"tessera_autoscaler_scrapes_total{result="ok"}"#
        ),
        Some(1.0)
    );
    let seen = h.requests().await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_scale_apply(&seen[0], 3);
}

#[tokio::test]
async fn a_leader_that_accepts_but_never_answers_times_out_over_http() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    // Accept and hold every connection without a byte of answer.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut held = Vec::new();
        tokio::select! {
            _ = async { while let Ok((s, _)) = listener.accept().await { held.push(s); } } => {}
            _ = stopped => {}
        }
    });
    let mut h = harness(always_ok(), Duration::from_millis(100));
    let (mut md, mut pods) = converged(1, true);
    md.spec.serving.port = i32::from(port);
    pods[0].status = Some(ready_status(Some("127.0.0.1")));
    let out = h.runner.pass(&snapshot(&md, &pods)).await;
    let d = &out[0].decision;
    assert_eq!(
        (d.replicas, d.reason),
        (1, Reason::MetricsMissing),
        "{}",
        d.message
    );
    let m = h.metrics();
    assert_eq!(
        value(&m, r#"tessera_autoscaler_scrapes_total{result="timeout"}"#),
        Some(1.0)
    );
    assert_eq!(
        value(
            &m,
            r#"tessera_autoscaler_decisions_total{direction="hold"}"#
        ),
        Some(1.0)
    );
    let _ = stop.send(());
    assert!(h.requests().await.is_empty());
}

/// A vLLM deployment is scaled from vLLM's own series; Tessera's names on the same page (a
/// sidecar, say) are not read for it.
#[tokio::test]
async fn a_vllm_deployment_scales_on_vllms_own_queue_metrics() {
    let h = harness(always_ok(), Duration::from_secs(3));
    let (mut md, pods) = converged(1, true);
    md.spec.engine.name = tessera_operator::api::EngineName::Vllm;
    h.scraper.set(
        "10.0.0.1",
        Answer::Metrics(
            "# TYPE vllm:num_requests_waiting gauge\n\
             vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 15.0\n\
             vllm:num_requests_waiting{engine=\"1\",model_name=\"m\"} 5.0\n\
             # TYPE vllm:num_requests_running gauge\n\
             vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 5.0\n\
             tessera_requests_waiting 0\ntessera_requests_running 0\n"
                .into(),
        ),
    );
    let mut h = h;
    let out = h.runner.pass(&snapshot(&md, &pods)).await;
    let d = &out[0].decision;
    assert_eq!(
        (d.current, d.replicas, d.reason),
        (1, 3, Reason::ScaleUp),
        "{}",
        d.message
    );
    // The same page read as a Tessera worker's would hold at one replica.
    md.spec.engine.name = tessera_operator::api::EngineName::Tessera;
    let m = tessera_operator::autoscale::scrape::LeaderMetrics::from_engine_text(
        md.spec.engine.name,
        "vllm:num_requests_waiting 20\ntessera_requests_waiting 0\ntessera_requests_running 0\n",
    );
    assert_eq!((m.waiting, m.running), (Some(0.0), Some(0.0)));
}

/// An SGLang leader's `/metrics`.
fn sglang_load(queue: u32, running: u32, kv: f64) -> Answer {
    Answer::Metrics(format!(
        "# TYPE sglang:num_queue_reqs gauge\nsglang:num_queue_reqs {queue}\n\
         # TYPE sglang:num_running_reqs gauge\nsglang:num_running_reqs {running}\n\
         # TYPE sglang:token_usage gauge\nsglang:token_usage {kv}\n"
    ))
}

/// SGLang prefill/decode pools of a long-prompt workload, placed by the controller on two
/// H100 nodes and running; prefill scales on queue depth (target 10), decode on KV-cache use
/// (0.8). Prefill leaders queue 30 long prompts each; the decode leader is at 50% KV use.
/// Returns the snapshot and the pools' sizes (prefill, decode).
fn pooled_and_loaded(h: &Harness) -> (Snapshot, i32, i32) {
    let mut md = deployment(1, true);
    md.spec.parallelism = Default::default();
    md.spec.engine.name = serde_json::from_value(json!("sglang")).expect("engine");
    let serving = &mut md.spec.serving;
    serving.context_length = Some(16384);
    serving.workload = Some(tessera_operator::api::WorkloadShape {
        input_tokens: 8192,
        output_tokens: 256,
    });
    serving.slo = Some(tessera_operator::api::ServingSlo {
        time_to_first_token_seconds: Some(2.0),
        inter_token_latency_seconds: Some(0.02),
    });
    serving.disaggregation = tessera_operator::api::Disaggregation::Auto;
    let a = md.spec.autoscaling.as_mut().expect("autoscaling");
    a.prefill = Some(tessera_operator::api::PoolScaling {
        metric: tessera_operator::api::PrefillScalingMetric::QueueDepth,
        target: 10.0,
    });
    a.decode = Some(tessera_operator::api::PoolScaling {
        metric: tessera_operator::api::DecodeScalingMetric::KvCacheUtilization,
        target: 0.8,
    });
    let second = {
        let mut n = node();
        n.metadata.name = Some("h100-2".into());
        n
    };
    let nodes = vec![node(), second];
    let actions = reconcile(
        &Observed {
            md: &md,
            pods: &[],
            services: &[],
            routers: &[],
            nodes: &nodes,
            other_pods: &[],
            reserved: &[],
            now: Timestamp::now(),
        },
        &Config::default(),
    );
    md.status = actions.status.clone();
    let st = md.status.clone().expect("status");
    assert_eq!(st.pools.len(), 2, "{st:?}");
    let (prefill, decode) = (st.pools[0].replicas, st.pools[1].replicas);
    assert_eq!(st.placements.len() as i32, prefill + decode, "all placed");
    let gpus: i32 = st
        .pools
        .iter()
        .map(|p| p.replicas * p.tensor_parallel * p.pipeline_parallel)
        .sum();
    assert!(gpus < 16, "room to grow: {gpus} of 16 GPUs");
    let pods: Vec<Pod> = actions
        .apply_pods
        .into_iter()
        .map(|mut p| {
            let labels = p.metadata.labels.clone().expect("labels");
            let replica: u32 = labels["tessera.dev/replica"].parse().expect("replica");
            let ip = format!("10.0.1.{}", replica + 1);
            match labels.get("tessera.dev/pool").map(String::as_str) {
                Some("prefill") => h.scraper.set(&ip, sglang_load(30, 0, 0.1)),
                Some("decode") => h.scraper.set(&ip, sglang_load(0, 8, 0.5)),
                other => panic!("pod without a pool: {other:?}"),
            }
            let pinned =
                tessera_operator::controller::reconcile::pinned_node(&p).map(str::to_owned);
            p.spec.as_mut().expect("spec").node_name = pinned;
            p.status = Some(ready_status(Some(&ip)));
            p
        })
        .collect();
    let snap = Snapshot {
        nodes,
        pods,
        deployments: vec![md],
    };
    (snap, prefill, decode)
}

const DEPLOYMENT_PATH: &str =
    "/apis/tessera.dev/v1alpha1/namespaces/inference/modeldeployments/llama-8b";

#[tokio::test]
async fn each_pool_scales_on_its_own_and_one_merge_patch_sizes_both() {
    let mut h = harness(always_ok(), Duration::from_secs(3));
    let (snap, prefill, decode) = pooled_and_loaded(&h);
    let out = h.runner.pass(&snap).await;
    let keys: Vec<&str> = out.iter().map(|o| o.deployment.as_str()).collect();
    assert_eq!(
        keys,
        ["inference/llama-8b:prefill", "inference/llama-8b:decode"]
    );
    let (p, q) = (&out[0].decision, &out[1].decision);
    // The prefill pool grows as far as the free GPUs allow; the decode pool holds.
    assert_eq!(p.current, prefill as u32);
    assert!(p.replicas > p.current, "{}", p.message);
    assert!(
        p.capacity_limited,
        "3x the queue does not fit: {}",
        p.message
    );
    assert_eq!(
        (q.current, q.replicas),
        (decode as u32, decode as u32),
        "{}",
        q.message
    );
    assert_eq!(out[0].scale, WriteResult::Written);
    assert_eq!(out[1].scale, WriteResult::Skipped);
    let m = h.metrics();
    assert_eq!(
        value(
            &m,
            r#"tessera_autoscaler_desired_replicas{namespace="inference",deployment="llama-8b:prefill"}"#
        ),
        Some(f64::from(p.replicas))
    );
    let seen = h.requests().await;
    // One merge patch of the deployment with both pools' sizes, no write of the scale
    // subresource, and the prefill pool's ScalingLimited condition.
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].method, Method::PATCH);
    assert_eq!(seen[0].path, DEPLOYMENT_PATH);
    assert_eq!(seen[0].content_type, "application/merge-patch+json");
    assert_eq!(
        seen[0].body,
        json!({"spec": {"poolReplicas": {"decode": decode, "prefill": p.replicas}}})
    );
    let c = scaling_limited(&seen[1]);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "InsufficientCapacity")
    );
    assert!(
        c.message
            .starts_with(&format!("the prefill pool wanted {} replicas", p.wanted)),
        "{}",
        c.message
    );
}

#[tokio::test]
async fn a_refused_pool_size_write_is_retried_next_pass_before_the_condition() {
    // The API answers the first merge patch of spec.poolReplicas 409 (a user's edit in
    // between): nothing is recorded, the condition waits, and the next pass writes the same
    // sizes again.
    let mut h = harness(
        fail_first(DEPLOYMENT_PATH, StatusCode::CONFLICT),
        Duration::from_secs(3),
    );
    let (snap, _, decode) = pooled_and_loaded(&h);
    let out = h.runner.pass(&snap).await;
    let grown = out[0].decision.replicas;
    assert_eq!(out[0].scale, WriteResult::Conflict, "{:?}", out[0]);
    assert_eq!(out[0].condition, WriteResult::Skipped);
    h.clock.advance(PASS);
    let out = h.runner.pass(&snap).await;
    assert_eq!(
        out[0].decision.replicas, grown,
        "{}",
        out[0].decision.message
    );
    assert_eq!(
        (&out[0].scale, &out[0].condition),
        (&WriteResult::Written, &WriteResult::Written)
    );
    let seen = h.requests().await;
    let patches: Vec<&Value> = seen
        .iter()
        .filter(|s| s.path == DEPLOYMENT_PATH)
        .map(|s| &s.body)
        .collect();
    let want = json!({"spec": {"poolReplicas": {"decode": decode, "prefill": grown}}});
    assert_eq!(patches, vec![&want, &want], "{seen:?}");
    assert_eq!(
        seen.iter().filter(|s| s.path == STATUS).count(),
        1,
        "one ScalingLimited write, after the sizes landed"
    );
}
