//! The router in front of a prefill/decode deployment: it serves the OpenAI API and splits each
//! request between a prefill replica and a decode replica.
//!
//! For `POST /v1/chat/completions` and `POST /v1/completions` it picks the least-loaded ready
//! prefill replica and the least-loaded ready decode replica (ties in turn), then:
//!
//! 1. sends the client's body to the prefill replica's `/internal/pd/prefill/{kind}`
//!    ([`crate::server::pd`]) with the decode replica's group id and KV ports; the prefill
//!    replica checks the request as the public endpoint would, prefills the prompt, samples
//!    each choice's first token and sends every rank's shard of the KV cache to the matching
//!    decode rank over the authenticated KV transport ([`crate::dist::kv`]), then answers with
//!    the hand-over (or the OpenAI error the client should get, which is relayed as is);
//! 2. sends `{"handoff": ..., "request": body}` to the decode replica's
//!    `/internal/pd/decode/{kind}`, which installs the caches and generates from the first
//!    tokens, answering as the public endpoint would; that answer, streamed or not, goes to the
//!    client with `x-tessera-*` headers naming the replicas and the hand-over's size and time.
//!
//! `GET /v1/models` is answered by a decode replica; `/health` and `/readyz` are 200 while at
//! least one prefill and one decode replica answer their `/readyz` (polled every
//! [`RouterLimits::health_interval`]), `/healthz` while the router runs; `/metrics` is the
//! router's own ([`metrics`]).
//!
//! Failures: every call is bounded ([`RouterLimits`]); a replica that cannot be reached, breaks
//! the connection or does not answer in time makes the request fail with 503 and `Retry-After`
//! (`replica_failed`, as the aggregated server answers when its group is lost); a streamed
//! answer that breaks off ends with an error event and `[DONE]`. A replica found unreachable
//! leaves the rotation until its `/readyz` answers again. The client leaving closes the
//! connection to the decode replica, which cancels the sequence there.

pub mod client;
pub mod metrics;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::Full;
use serde::Deserialize;
use tokio::sync::{Notify, mpsc};

use crate::engine::runner::KvTarget;
use crate::server::HttpLimits;
use crate::server::error::ApiError;
use crate::server::pd::{
    ADDRS_HEADER, GROUP_HEADER, PdRole, TOKEN_HEADER, TRANSFER_HEADER, internal_token,
};
use client::CallError;
pub use metrics::RouterMetrics;

/// One replica behind the router.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaSpec {
    /// A name for logs, errors and metrics (`prefill-0`, `decode-1`).
    pub name: String,
    /// Its leader's HTTP API.
    pub api: SocketAddr,
    /// Decode replicas: where prefill ranks send KV caches.
    pub kv: Option<KvTarget>,
}

/// Time and size limits of the router's calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouterLimits {
    /// Connecting to a replica.
    pub connect: Duration,
    /// The whole prefill call (queueing on the prefill replica, the prefill, the KV hand-over).
    pub prefill: Duration,
    /// A non-streamed decode call (the whole answer comes at its end).
    pub decode: Duration,
    /// A streamed decode call: the longest silence between two pieces.
    pub stream_idle: Duration,
    /// How often each replica's `/readyz` is asked.
    pub health_interval: Duration,
    /// How long a `/readyz` call may take.
    pub health_timeout: Duration,
    /// Largest client body (413 above).
    pub max_body_bytes: usize,
    /// Largest answer taken from a replica whole (a hand-over, a non-streamed answer).
    pub max_answer_bytes: usize,
}

impl Default for RouterLimits {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            prefill: Duration::from_secs(300),
            decode: Duration::from_secs(1800),
            stream_idle: Duration::from_secs(120),
            health_interval: Duration::from_millis(500),
            health_timeout: Duration::from_secs(2),
            max_body_bytes: 4 << 20,
            max_answer_bytes: 64 << 20,
        }
    }
}

/// What the router serves.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    pub prefill: Vec<ReplicaSpec>,
    pub decode: Vec<ReplicaSpec>,
    /// The group secret the replicas were given (for the internal endpoints' token).
    pub secret: Vec<u8>,
    pub limits: RouterLimits,
}

/// Consecutive failed `/readyz` calls (other than an unreachable replica, which leaves at
/// once) before a replica leaves the rotation.
const DOWN_AFTER: u32 = 3;

struct Replica {
    role: PdRole,
    spec: ReplicaSpec,
    in_flight: AtomicUsize,
    up: AtomicBool,
    failures: AtomicU32,
    why: Mutex<String>,
}

impl Replica {
    fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    fn why(&self) -> String {
        self.why.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Take the replica out of the rotation (until its `/readyz` answers again).
    fn set_down(&self, why: String) {
        if self.up.swap(false, Ordering::SeqCst) {
            tracing::warn!(
                replica = %self.spec.name,
                "{} leaves the rotation: {why}",
                self.spec.name
            );
        }
        *self.why.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    fn set_up(&self) {
        self.failures.store(0, Ordering::SeqCst);
        if !self.up.swap(true, Ordering::SeqCst) {
            tracing::info!(replica = %self.spec.name, "{} is ready", self.spec.name);
        }
        *self.why.lock().unwrap_or_else(|e| e.into_inner()) = "ready".into();
    }
}

/// A replica picked for a call; its load counts until this is dropped.
struct Busy(Arc<Replica>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

struct RouterState {
    prefill: Vec<Arc<Replica>>,
    decode: Vec<Arc<Replica>>,
    token: String,
    limits: RouterLimits,
    metrics: RouterMetrics,
    next: AtomicUsize,
    transfer_prefix: String,
    transfers: AtomicU64,
    in_flight: AtomicUsize,
    idle: Notify,
    draining: AtomicBool,
}

/// A request in the router; it counts until this is dropped (a streamed answer's task holds
/// it to the end).
struct Tracked(Arc<RouterState>);

impl Drop for Tracked {
    fn drop(&mut self) {
        self.0.metrics.requests_running.dec();
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl RouterState {
    fn track(self: &Arc<Self>) -> Tracked {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.metrics.requests_running.inc();
        Tracked(Arc::clone(self))
    }

    fn replicas(&self, role: PdRole) -> &[Arc<Replica>] {
        match role {
            PdRole::Prefill => &self.prefill,
            PdRole::Decode => &self.decode,
        }
    }

    /// The ready replica of `role` with the fewest calls in flight (ties in turn).
    fn pick(&self, role: PdRole) -> Result<Busy, ApiError> {
        let list = self.replicas(role);
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let best = (0..list.len())
            .map(|k| &list[(start + k) % list.len()])
            .filter(|r| r.is_up())
            .min_by_key(|r| r.in_flight.load(Ordering::SeqCst));
        match best {
            Some(r) => {
                r.in_flight.fetch_add(1, Ordering::SeqCst);
                Ok(Busy(Arc::clone(r)))
            }
            None => Err(ApiError::unavailable(
                format!(
                    "no {} replica is ready ({}); retry later",
                    role.name(),
                    Self::reasons(list)
                ),
                "model_unavailable",
            )),
        }
    }

    fn reasons(list: &[Arc<Replica>]) -> String {
        list.iter()
            .map(|r| format!("{}: {}", r.spec.name, r.why()))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Ready while at least one replica of each role is.
    fn readiness(&self) -> Result<(), String> {
        if self.draining.load(Ordering::SeqCst) {
            return Err("draining: the router is shutting down".into());
        }
        let missing: Vec<String> = [PdRole::Prefill, PdRole::Decode]
            .into_iter()
            .filter(|role| !self.replicas(*role).iter().any(|r| r.is_up()))
            .map(|role| {
                format!(
                    "no {} replica is ready ({})",
                    role.name(),
                    Self::reasons(self.replicas(role))
                )
            })
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing.join("; "))
        }
    }

    fn next_transfer(&self) -> String {
        let n = self.transfers.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.transfer_prefix)
    }

    /// A JSON POST to `path` on `r` with the internal token.
    fn post(&self, r: &Replica, path: String) -> axum::http::request::Builder {
        Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(header::HOST, r.spec.api.to_string())
            .header(header::CONTENT_TYPE, "application/json")
            .header(TOKEN_HEADER, &self.token)
    }

    /// The 503 for a call to `r` that failed; an unreachable replica leaves the rotation.
    fn failed(&self, r: &Replica, e: &CallError) -> ApiError {
        if let CallError::Unreachable(why) = e {
            r.set_down(why.clone());
        }
        self.metrics.finished("error");
        replica_failed(&r.spec.name, r.role, &e.to_string())
    }
}

fn replica_failed(name: &str, role: PdRole, why: &str) -> ApiError {
    ApiError::unavailable(
        format!(
            "the {} replica {name} failed while serving this request ({why}); retry it",
            role.name()
        ),
        "replica_failed",
    )
}

/// `stream` of the client's body, without judging the rest (the prefill replica does).
fn is_streamed(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Flag {
        stream: Option<bool>,
    }
    serde_json::from_slice::<Flag>(body)
        .ok()
        .and_then(|f| f.stream)
        .unwrap_or(false)
}

/// The sizes and times of a hand-over (the router reads nothing else of it).
#[derive(Deserialize)]
struct HandoffSummary {
    choices: Vec<ChoiceSummary>,
}

#[derive(Deserialize)]
struct ChoiceSummary {
    kv_bytes: u64,
    kv_seconds: f64,
}

/// An answer from a replica passed on whole: its status, content type, `Retry-After` and body.
fn relay(status: StatusCode, headers: &HeaderMap, body: Bytes) -> Response {
    let mut resp = Response::builder().status(status);
    for name in [header::CONTENT_TYPE, header::RETRY_AFTER] {
        if let Some(v) = headers.get(&name) {
            resp = resp.header(name, v.clone());
        }
    }
    resp.body(Body::from(body))
        .unwrap_or_else(|e| ApiError::internal(format!("relaying an answer: {e}")).into_response())
}

/// What the router learnt about a request, sent back in `x-tessera-*` headers.
struct Trace {
    prefill: String,
    decode: String,
    kv_bytes: u64,
    kv_seconds: f64,
    prefill_seconds: f64,
}

impl Trace {
    fn add_to(&self, headers: &mut HeaderMap) {
        let mut put = |name: &'static str, v: String| {
            if let Ok(v) = HeaderValue::from_str(&v) {
                headers.insert(name, v);
            }
        };
        put("x-tessera-prefill-replica", self.prefill.clone());
        put("x-tessera-decode-replica", self.decode.clone());
        put("x-tessera-kv-bytes", self.kv_bytes.to_string());
        put("x-tessera-kv-seconds", format!("{:.6}", self.kv_seconds));
        put(
            "x-tessera-prefill-seconds",
            format!("{:.6}", self.prefill_seconds),
        );
    }
}

async fn chat(State(st): State<Arc<RouterState>>, body: Result<Bytes, BytesRejection>) -> Response {
    complete(st, "chat", body).await
}

async fn completions(
    State(st): State<Arc<RouterState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    complete(st, "completions", body).await
}

async fn complete(
    st: Arc<RouterState>,
    kind: &'static str,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    complete_inner(st, kind, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn complete_inner(
    st: Arc<RouterState>,
    kind: &'static str,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if st.draining.load(Ordering::SeqCst) {
        return Err(ApiError::unavailable(
            "the server is shutting down and admits no new requests",
            "server_shutting_down",
        ));
    }
    let body = body.map_err(ApiError::from_body)?;
    let tracked = st.track();
    let arrived = Instant::now();
    let limits = st.limits;
    let streamed = is_streamed(&body);
    let prefill = st.pick(PdRole::Prefill)?;
    let decode = st.pick(PdRole::Decode)?;
    let kv = decode
        .0
        .spec
        .kv
        .as_ref()
        .expect("decode replicas have KV ports (checked in serve)");

    // 1. Prefill and hand-over.
    let req = st
        .post(&prefill.0, format!("/internal/pd/prefill/{kind}"))
        .header(TRANSFER_HEADER, st.next_transfer())
        .header(GROUP_HEADER, &kv.group_id)
        .header(ADDRS_HEADER, kv.addrs.join(","))
        .body(Full::new(body.clone()))
        .map_err(|e| ApiError::internal(format!("building the prefill call: {e}")))?;
    let (mut resp, conn) = client::open(prefill.0.spec.api, req, limits.connect, limits.prefill)
        .await
        .map_err(|e| st.failed(&prefill.0, &e))?;
    let left = limits
        .prefill
        .saturating_sub(arrived.elapsed())
        .max(Duration::from_secs(1));
    let handoff = client::read_all(resp.body_mut(), limits.max_answer_bytes, left)
        .await
        .map_err(|e| st.failed(&prefill.0, &e))?;
    drop(conn);
    if resp.status() != StatusCode::OK {
        if resp.status().is_server_error() {
            st.metrics.finished("error");
        }
        return Ok(relay(resp.status(), resp.headers(), handoff));
    }
    let summary: HandoffSummary = serde_json::from_slice(&handoff).map_err(|e| {
        st.metrics.finished("error");
        replica_failed(
            &prefill.0.spec.name,
            PdRole::Prefill,
            &format!("its hand-over is not valid: {e}"),
        )
    })?;
    let prefill_seconds = arrived.elapsed().as_secs_f64();
    st.metrics.prefill_seconds.observe(prefill_seconds);
    let mut trace = Trace {
        prefill: prefill.0.spec.name.clone(),
        decode: decode.0.spec.name.clone(),
        kv_bytes: 0,
        kv_seconds: 0.0,
        prefill_seconds,
    };
    for c in &summary.choices {
        st.metrics.kv_transfer_bytes.inc_by(c.kv_bytes);
        st.metrics.kv_transfer_seconds.observe(c.kv_seconds);
        trace.kv_bytes += c.kv_bytes;
        trace.kv_seconds += c.kv_seconds;
    }
    drop(prefill);

    // 2. Decode from the hand-over.
    let mut call = Vec::with_capacity(handoff.len() + body.len() + 24);
    call.extend_from_slice(b"{\"handoff\":");
    call.extend_from_slice(&handoff);
    call.extend_from_slice(b",\"request\":");
    call.extend_from_slice(&body);
    call.push(b'}');
    let req = st
        .post(&decode.0, format!("/internal/pd/decode/{kind}"))
        .body(Full::new(Bytes::from(call)))
        .map_err(|e| ApiError::internal(format!("building the decode call: {e}")))?;
    let head = if streamed {
        limits.stream_idle
    } else {
        limits.decode
    };
    let (mut resp, conn) = client::open(decode.0.spec.api, req, limits.connect, head)
        .await
        .map_err(|e| st.failed(&decode.0, &e))?;
    let is_stream = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if resp.status() != StatusCode::OK || !is_stream {
        let left = limits
            .decode
            .saturating_sub(arrived.elapsed())
            .max(Duration::from_secs(1));
        let answer = client::read_all(resp.body_mut(), limits.max_answer_bytes, left)
            .await
            .map_err(|e| st.failed(&decode.0, &e))?;
        if resp.status() == StatusCode::OK {
            count_finished(&st.metrics, &answer);
        } else if resp.status().is_server_error() {
            st.metrics.finished("error");
        }
        let mut out = relay(resp.status(), resp.headers(), answer);
        trace.add_to(out.headers_mut());
        return Ok(out);
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::convert::Infallible>>(32);
    let state = Arc::clone(&st);
    tokio::spawn(async move {
        // Held to the end of the stream: the connection, the replica's load, the request.
        let (_conn, decode, _tracked) = (conn, decode, tracked);
        let mut watch = StreamWatch::new(arrived);
        loop {
            match client::next_chunk(resp.body_mut(), state.limits.stream_idle).await {
                Ok(Some(bytes)) => {
                    watch.feed(&bytes, &state.metrics);
                    if tx.send(Ok(bytes)).await.is_err() {
                        // The client left; dropping the connection cancels the sequence.
                        state.metrics.finished("cancelled");
                        return;
                    }
                }
                Ok(None) if watch.done => return,
                end => {
                    let why = match end {
                        Err(e) => {
                            if let CallError::Unreachable(w) = &e {
                                decode.0.set_down(w.clone());
                            }
                            e.to_string()
                        }
                        _ => "the stream ended without [DONE]".to_owned(),
                    };
                    state.metrics.finished("error");
                    let e = replica_failed(&decode.0.spec.name, PdRole::Decode, &why);
                    let sep = if watch.at_boundary() { "" } else { "\n\n" };
                    let tail = format!("{sep}data: {}\n\ndata: [DONE]\n\n", e.body());
                    let _ = tx.send(Ok(Bytes::from(tail))).await;
                    return;
                }
            }
        }
    });
    let mut out = (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
        .into_response();
    trace.add_to(out.headers_mut());
    Ok(out)
}

/// Count the choices of a non-streamed answer by finish reason.
fn count_finished(m: &RouterMetrics, answer: &[u8]) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(answer) else {
        return;
    };
    for c in v["choices"].as_array().into_iter().flatten() {
        if let Some(r) = c["finish_reason"].as_str() {
            m.finished(r);
        }
    }
}

/// Reads the server-sent events passing through for the metrics: the first text chunk (time
/// to first token), the gaps between a choice's text chunks, finish reasons and errors.
struct StreamWatch {
    arrived: Instant,
    first: bool,
    last: HashMap<u64, Instant>,
    buf: Vec<u8>,
    done: bool,
}

impl StreamWatch {
    fn new(arrived: Instant) -> Self {
        Self {
            arrived,
            first: false,
            last: HashMap::new(),
            buf: Vec::new(),
            done: false,
        }
    }

    /// Whether what passed so far ends at an event boundary.
    fn at_boundary(&self) -> bool {
        self.buf.is_empty()
    }

    fn feed(&mut self, bytes: &[u8], m: &RouterMetrics) {
        self.buf.extend_from_slice(bytes);
        while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = self.buf.drain(..end + 2).collect();
            for line in event.split(|b| *b == b'\n') {
                let Some(data) = line.strip_prefix(b"data: ") else {
                    continue;
                };
                if data == b"[DONE]" {
                    self.done = true;
                    continue;
                }
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
                    continue;
                };
                if v.get("error").is_some() {
                    m.finished("error");
                    continue;
                }
                for c in v["choices"].as_array().into_iter().flatten() {
                    let index = c["index"].as_u64().unwrap_or(0);
                    let text = c["delta"]["content"]
                        .as_str()
                        .or_else(|| c["text"].as_str())
                        .unwrap_or("");
                    if !text.is_empty() {
                        let now = Instant::now();
                        if !self.first {
                            self.first = true;
                            m.time_to_first_token
                                .observe((now - self.arrived).as_secs_f64());
                        } else if let Some(prev) = self.last.get(&index) {
                            m.inter_token_latency.observe((now - *prev).as_secs_f64());
                        }
                        self.last.insert(index, now);
                    }
                    if let Some(r) = c["finish_reason"].as_str() {
                        m.finished(r);
                    }
                }
            }
        }
    }
}

/// `GET /v1/models` and `/v1/models/{id}`: a ready decode replica's answer.
async fn models(State(st): State<Arc<RouterState>>, uri: Uri) -> Response {
    let Some(r) = st.decode.iter().find(|r| r.is_up()) else {
        return ApiError::unavailable(
            format!(
                "no decode replica is ready ({})",
                RouterState::reasons(&st.decode)
            ),
            "model_unavailable",
        )
        .into_response();
    };
    let req = Request::builder()
        .method(Method::GET)
        .uri(uri.path())
        .header(header::HOST, r.spec.api.to_string())
        .body(Full::new(Bytes::new()));
    let Ok(req) = req else {
        return ApiError::internal("building the models call").into_response();
    };
    let limits = st.limits;
    let answer = async {
        let (mut resp, _conn) =
            client::open(r.spec.api, req, limits.connect, limits.health_timeout).await?;
        let body = client::read_all(
            resp.body_mut(),
            limits.max_answer_bytes,
            limits.health_timeout,
        )
        .await?;
        Ok::<_, CallError>(relay(resp.status(), resp.headers(), body))
    };
    match answer.await {
        Ok(resp) => resp,
        Err(e) => replica_failed(&r.spec.name, PdRole::Decode, &e.to_string()).into_response(),
    }
}

async fn readyz(State(st): State<Arc<RouterState>>) -> Response {
    match st.readiness() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(r) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {r}\n")).into_response(),
    }
}

async fn healthz() -> Response {
    (StatusCode::OK, "ok\n").into_response()
}

async fn metrics_handler(State(st): State<Arc<RouterState>>) -> Response {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.render(),
    )
        .into_response()
}

async fn not_found(uri: Uri) -> Response {
    ApiError::invalid(format!("no route for {}", uri.path()))
        .with_status(StatusCode::NOT_FOUND)
        .with_code("not_found")
        .into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::invalid(format!("{method} is not allowed on {}", uri.path()))
        .with_status(StatusCode::METHOD_NOT_ALLOWED)
        .with_code("method_not_allowed")
        .into_response()
}

/// Ask `r`'s `/readyz` every `health_interval` for as long as the router runs.
async fn watch_replica(st: Arc<RouterState>, r: Arc<Replica>) {
    let limits = st.limits;
    let gauge = st
        .metrics
        .replica_up
        .get_or_create(&metrics::ReplicaLabel {
            role: r.role.name().into(),
            replica: r.spec.name.clone(),
        })
        .clone();
    loop {
        let req = Request::builder()
            .method(Method::GET)
            .uri("/readyz")
            .header(header::HOST, r.spec.api.to_string())
            .body(Full::new(Bytes::new()))
            .expect("a fixed request is valid");
        let verdict = match client::open(
            r.spec.api,
            req,
            limits.health_timeout,
            limits.health_timeout,
        )
        .await
        {
            Ok((resp, _)) if resp.status() == StatusCode::OK => Ok(()),
            Ok((mut resp, _)) => {
                let body = client::read_all(resp.body_mut(), 4096, limits.health_timeout)
                    .await
                    .unwrap_or_default();
                Err((
                    false,
                    format!(
                        "/readyz answered {}: {}",
                        resp.status().as_u16(),
                        String::from_utf8_lossy(&body).trim()
                    ),
                ))
            }
            Err(e) => Err((matches!(e, CallError::Unreachable(_)), e.to_string())),
        };
        match verdict {
            Ok(()) => r.set_up(),
            Err((gone, why)) => {
                let n = r.failures.fetch_add(1, Ordering::SeqCst) + 1;
                if gone || n >= DOWN_AFTER || !r.is_up() {
                    r.set_down(why);
                }
            }
        }
        gauge.set(i64::from(r.is_up()));
        tokio::time::sleep(limits.health_interval).await;
    }
}

/// Serve the router on `listener` until `shutdown` resolves; then refuse new requests (503),
/// wait for the requests in flight (streams included) and return.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cfg: RouterConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        !cfg.prefill.is_empty() && !cfg.decode.is_empty(),
        "a prefill/decode router needs at least one prefill and one decode replica (it has {} and {})",
        cfg.prefill.len(),
        cfg.decode.len()
    );
    if let Some(d) = cfg.decode.iter().find(|d| d.kv.is_none()) {
        anyhow::bail!("decode replica {} has no KV ports", d.name);
    }
    let replica = |role, spec| {
        Arc::new(Replica {
            role,
            spec,
            in_flight: AtomicUsize::new(0),
            up: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            why: Mutex::new("not checked yet".into()),
        })
    };
    let prefix = crate::hex(
        &crate::dist::wire::nonce()
            .map_err(|e| anyhow::anyhow!("reading /dev/urandom for the transfer names: {e}"))?[..8],
    );
    let st = Arc::new(RouterState {
        prefill: cfg
            .prefill
            .into_iter()
            .map(|s| replica(PdRole::Prefill, s))
            .collect(),
        decode: cfg
            .decode
            .into_iter()
            .map(|s| replica(PdRole::Decode, s))
            .collect(),
        token: internal_token(&cfg.secret),
        limits: cfg.limits,
        metrics: RouterMetrics::new(),
        next: AtomicUsize::new(0),
        transfer_prefix: format!("kv{prefix}"),
        transfers: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
        idle: Notify::new(),
        draining: AtomicBool::new(false),
    });
    let watchers: Vec<_> = st
        .prefill
        .iter()
        .chain(&st.decode)
        .map(|r| tokio::spawn(watch_replica(Arc::clone(&st), Arc::clone(r))))
        .collect();
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/health", get(readyz))
        .route("/readyz", get(readyz))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_handler))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(st.limits.max_body_bytes))
        .with_state(Arc::clone(&st));
    tracing::info!(
        prefill = st.prefill.len(),
        decode = st.decode.len(),
        "routing the OpenAI API on http://{}",
        listener.local_addr()?
    );
    let drained = {
        let st = Arc::clone(&st);
        async move {
            shutdown.await;
            st.draining.store(true, Ordering::SeqCst);
            tracing::info!(
                in_flight = st.in_flight.load(Ordering::SeqCst),
                "router shutting down: admission stopped, draining requests in flight"
            );
            loop {
                let notified = st.idle.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if st.in_flight.load(Ordering::SeqCst) == 0 {
                    break;
                }
                notified.await;
            }
        }
    };
    let served =
        crate::server::serve_until_drained(listener, app, HttpLimits::default(), drained).await;
    for w in watchers {
        w.abort();
    }
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Text chunks give one first-token time and the gaps of each choice; finish reasons and
    /// error events count; an event split across reads is read once whole.
    #[test]
    fn the_stream_watch_times_text_chunks_per_choice() {
        let m = RouterMetrics::new();
        let mut w = StreamWatch::new(Instant::now());
        let ev = |v: serde_json::Value| format!("data: {v}\n\n");
        let role = ev(
            serde_json::json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
        );
        let a = ev(serde_json::json!({"choices": [{"index": 0, "delta": {"content": "Hel"}}]}));
        let b = ev(serde_json::json!({"choices": [{"index": 1, "delta": {"content": "Bon"}}]}));
        let c = ev(serde_json::json!({"choices": [{"index": 0, "delta": {"content": "lo"}}]}));
        let end = ev(
            serde_json::json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        );
        let all = format!("{role}{a}{b}{c}{end}data: [DONE]\n\n");
        let (x, y) = all.as_bytes().split_at(all.len() / 2 + 3);
        w.feed(x, &m);
        assert!(!w.done);
        w.feed(y, &m);
        assert!(w.done && w.at_boundary());
        let text = m.render();
        assert!(
            text.contains("tessera_time_to_first_token_seconds_count 1"),
            "{text}"
        );
        // Only choice 0 had two text chunks.
        assert!(
            text.contains("tessera_inter_token_latency_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("tessera_requests_total{finish_reason=\"stop\"} 1"),
            "{text}"
        );
        w.feed(b"data: {\"error\": {\"message\": \"x\"}}\n\n", &m);
        assert!(m.render().contains("finish_reason=\"error\"} 1"));
    }

    #[test]
    fn the_stream_flag_is_read_without_judging_the_body() {
        assert!(is_streamed(br#"{"stream": true, "model": 3}"#));
        assert!(!is_streamed(br#"{"stream": false}"#));
        assert!(!is_streamed(b"not json"));
    }
}
