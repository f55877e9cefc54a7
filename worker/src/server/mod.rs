//! The HTTP server of a replica leader (axum): the OpenAI-compatible API over the
//! [scheduler](crate::engine::scheduler), health, readiness and metrics.
//!
//! | route | what |
//! |---|---|
//! | `GET /v1/models`, `GET /v1/models/{id}` | the served model |
//! | `POST /v1/completions` | text completion (one prompt: a string, or token ids) |
//! | `POST /v1/chat/completions` | chat (ChatML through the tokenizer's template, no default system prompt) |
//! | `GET /healthz` | 200 while the scheduler serves; 503 naming the cause once it has failed (a panic, a lost rank group), so that a liveness probe restarts the pod |
//! | `GET /readyz` | 200 when the readiness callback says ready and the server is not draining, else 503 |
//! | `GET /metrics` | Prometheus text ([`metrics`]) |
//! | `POST /internal/pd/{prefill,decode}/{chat,completions}` | prefill/decode disaggregation's hand-over ([`pd`]; only with [`ServerConfig::pd`]) |
//!
//! Errors are OpenAI-style JSON (`{"error": {"message", "type", "param", "code"}}`); overload is
//! 429 and shutdown 503, both with `Retry-After`.

pub mod error;
pub mod metrics;
mod openai;
pub mod pd;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::engine::Engine;
use crate::engine::runner::Runner;
use crate::engine::scheduler::{Scheduler, SchedulerConfig, SchedulerHandle};
use error::ApiError;
pub use metrics::ServerMetrics;

/// Says whether the replica can serve (`Err` carries the reason, shown on `/readyz`).
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Settings of the HTTP layer.
#[derive(Clone)]
pub struct ServerConfig {
    /// The `model` name clients must use.
    pub served_model_name: String,
    /// Largest request body accepted (413 above).
    pub max_body_bytes: usize,
    /// Prompts tokenised at the same time; requests beyond them wait for a permit, and get 429
    /// before any CPU is spent on them once as many wait as the scheduler's queue holds.
    pub max_concurrent_tokenizations: usize,
    pub readiness: Readiness,
    /// This worker's part in a prefill/decode deployment (None: aggregated serving only).
    pub pd: Option<pd::PdConfig>,
}

impl ServerConfig {
    /// Default body limit: 4 MiB.
    pub const DEFAULT_MAX_BODY_BYTES: usize = 4 << 20;
    /// Default number of prompts tokenised at once.
    pub const DEFAULT_MAX_CONCURRENT_TOKENIZATIONS: usize = 4;

    /// A configuration that is always ready, with the default body limit.
    pub fn new(served_model_name: impl Into<String>) -> Self {
        Self {
            served_model_name: served_model_name.into(),
            max_body_bytes: Self::DEFAULT_MAX_BODY_BYTES,
            max_concurrent_tokenizations: Self::DEFAULT_MAX_CONCURRENT_TOKENIZATIONS,
            readiness: Arc::new(|| Ok(())),
            pd: None,
        }
    }
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("served_model_name", &self.served_model_name)
            .field("max_body_bytes", &self.max_body_bytes)
            .field(
                "max_concurrent_tokenizations",
                &self.max_concurrent_tokenizations,
            )
            .finish_non_exhaustive()
    }
}

/// State shared by the handlers.
#[derive(Clone)]
struct App {
    cfg: Arc<ServerConfig>,
    handle: SchedulerHandle,
    metrics: Arc<ServerMetrics>,
    /// Permits to tokenise a prompt (see [`ServerConfig::max_concurrent_tokenizations`]).
    tokenize_permits: Arc<tokio::sync::Semaphore>,
    /// Requests waiting for a tokenisation permit.
    tokenize_waiting: Arc<std::sync::atomic::AtomicUsize>,
    /// Unix time the router was built (`created` of the model).
    started: u64,
}

/// A JSON response.
pub(crate) fn json_response(status: StatusCode, v: &serde_json::Value) -> Response {
    let body = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(body),
    )
        .into_response()
}

/// The API's routes over a running scheduler.
pub fn router(cfg: ServerConfig, handle: SchedulerHandle, metrics: Arc<ServerMetrics>) -> Router {
    let limit = cfg.max_body_bytes;
    let permits = cfg.max_concurrent_tokenizations.max(1);
    let app = App {
        tokenize_permits: Arc::new(tokio::sync::Semaphore::new(permits)),
        tokenize_waiting: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        cfg: Arc::new(cfg),
        handle,
        metrics,
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    Router::new()
        .route("/v1/models", get(openai::list_models))
        // Served names may contain `/` (`org/model`), as Hugging Face ids do.
        .route("/v1/models/{*id}", get(openai::get_model))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat))
        .route("/internal/pd/prefill/{kind}", post(pd::prefill))
        .route("/internal/pd/decode/{kind}", post(pd::decode))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app)
}

/// Liveness: a scheduler that has failed never serves again, so the process must be restarted.
async fn healthz(State(app): State<App>) -> Response {
    match app.handle.failure() {
        None => (StatusCode::OK, "ok\n").into_response(),
        Some(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("failed: {e}\n")).into_response(),
    }
}

async fn readyz(State(app): State<App>) -> Response {
    let reason = if app.handle.is_draining() {
        Some("draining: the server is shutting down".to_owned())
    } else if let Some(e) = app.handle.failure() {
        Some(e)
    } else {
        (app.cfg.readiness)().err()
    };
    match reason {
        None => (StatusCode::OK, "ok\n").into_response(),
        Some(r) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {r}\n")).into_response(),
    }
}

async fn metrics_handler(State(app): State<App>) -> Response {
    // GPU telemetry (when set) calls NVML, which blocks.
    let metrics = Arc::clone(&app.metrics);
    match tokio::task::spawn_blocking(move || metrics.render()).await {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError::internal(format!("rendering the metrics failed: {e}")).into_response(),
    }
}

async fn not_found(uri: axum::http::Uri) -> Response {
    ApiError::invalid(format!("no route for {}", uri.path()))
        .with_status(StatusCode::NOT_FOUND)
        .with_code("not_found")
        .into_response()
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    ApiError::invalid(format!("{method} is not allowed on {}", uri.path()))
        .with_status(StatusCode::METHOD_NOT_ALLOWED)
        .with_code("method_not_allowed")
        .into_response()
}

/// Limits of the HTTP layer against slow, idle and too many clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// A client must send a request's whole header within this time, and an idle keep-alive
    /// connection is closed when no new request starts within it (hyper runs the same timer
    /// while it waits for the next request head).
    pub header_read_timeout: Duration,
    /// Connections open at once; a connection beyond them is closed at once (counted in
    /// `tessera_http_connections_refused_total`), before it can hold memory or a file descriptor
    /// for long.
    pub max_connections: usize,
    /// After the requests in flight are done, connections still open (idle keep-alive, slow
    /// readers of a finished response) get this long before the server returns anyway.
    pub shutdown_grace: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
            max_connections: 1024,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Serve `router` until `shutdown` resolves; then stop admission (new requests get 503, and
/// `/readyz` fails), wait for the requests in flight to finish and their responses to be
/// written, and return. With the default [`HttpLimits`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    handle: SchedulerHandle,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with_limits(listener, router, handle, HttpLimits::default(), shutdown).await
}

/// [`serve`] with explicit limits. Connections are served by hyper's HTTP/1.1 server with a
/// header read timeout (axum's own `serve` sets no timer, so a client that sends a header byte
/// a minute, or an idle keep-alive connection, was held forever and could keep shutdown
/// waiting), a cap on open connections, and a bounded wait for open connections at shutdown.
pub async fn serve_with_limits(
    listener: tokio::net::TcpListener,
    router: Router,
    handle: SchedulerHandle,
    limits: HttpLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let drained = {
        let handle = handle.clone();
        async move {
            shutdown.await;
            tracing::info!(
                in_flight = handle.in_flight(),
                "shutting down: admission stopped, draining requests in flight"
            );
            handle.begin_drain();
            handle.wait_idle().await;
            tracing::info!("drained");
        }
    };
    serve_until_drained(listener, router, limits, drained).await
}

/// The connection loop of [`serve_with_limits`] for any service: serve `router` under
/// `limits` until `drained` resolves (the caller stops admission and waits for the requests
/// in flight inside it), then give open connections `limits.shutdown_grace` and return. The
/// prefill/decode router uses it with its own drain.
pub async fn serve_until_drained(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: HttpLimits,
    drained: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    tokio::pin!(drained);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut drained => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(%peer, "connection refused: {} connections are open", limits.max_connections);
            HTTP_CONNECTIONS_REFUSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = http1.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
    drop(listener);
    // Responses of the drained requests are being written; idle connections are closed.
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "{} s after draining, some connections were still open; stopping anyway",
            limits.shutdown_grace.as_secs()
        );
    }
    Ok(())
}

/// Connections closed at once because `max_connections` were open (all servers of the process).
pub static HTTP_CONNECTIONS_REFUSED: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// Serve one model on one rank at `addr` until SIGINT/SIGTERM (for trying the API by hand and
/// for tests): `threads` CPU threads (0: all cores), the model's file name as served name unless
/// given.
pub fn serve_single(
    model: &Path,
    addr: SocketAddr,
    threads: usize,
    served_model_name: Option<&str>,
    sched: SchedulerConfig,
) -> anyhow::Result<()> {
    let engine = Engine::open(model, threads)?;
    let per_seq = sched.kv_budget_bytes;
    let runner = Runner::new(engine, per_seq, None);
    let metrics = Arc::new(ServerMetrics::new());
    let handle = Scheduler::spawn(runner, sched, Arc::clone(&metrics))?;
    let name = served_model_name.map_or_else(
        || {
            model
                .file_stem()
                .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
        },
        str::to_owned,
    );
    let app = router(ServerConfig::new(name.clone()), handle.clone(), metrics);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!("serving {name} on http://{}", listener.local_addr()?);
        serve(listener, app, handle.clone(), shutdown_signal()).await?;
        handle.shutdown();
        Ok(())
    })
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
