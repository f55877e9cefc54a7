//! HTTP endpoints for GPU telemetry: `/metrics` (Prometheus text, dcgm-exporter names) and
//! `/healthz`. The agent serves this router; the inference server mounts the same one.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::{Telemetry, metrics};

#[derive(Clone)]
struct AppState {
    telemetry: Arc<dyn Telemetry>,
    hostname: Arc<str>,
}

/// `/metrics` and `/healthz` over a telemetry backend.
pub fn router(telemetry: Arc<dyn Telemetry>, hostname: String) -> Router {
    let state = AppState {
        telemetry,
        hostname: hostname.into(),
    };
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state)
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
    let t = state.telemetry.clone();
    // NVML calls block; keep them off the async workers.
    let snapshot = match tokio::task::spawn_blocking(move || t.snapshot()).await {
        Ok(s) => s,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                format!("telemetry task failed: {e}\n"),
            );
        }
    };
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics::render(&snapshot, &state.hostname),
    )
}
