//! The serving metrics on `/metrics` (Prometheus text through prometheus-client).
//!
//! The names are a contract: the operator's autoscaler scrapes them (see docs/worker.md).
//!
//! | name | type | what |
//! |---|---|---|
//! | `tessera_requests_waiting` | gauge | requests queued, not yet admitted |
//! | `tessera_requests_running` | gauge | sequences being generated |
//! | `tessera_kv_cache_usage_ratio` | gauge | KV-cache bytes in use / the scheduler's budget (0..1) |
//! | `tessera_prompt_tokens_total` | counter | prompt tokens prefilled |
//! | `tessera_generated_tokens_total` | counter | tokens generated |
//! | `tessera_requests_total{finish_reason}` | counter | finished requests by outcome |
//! | `tessera_time_to_first_token_seconds` | histogram | submission to first generated token |
//! | `tessera_inter_token_latency_seconds` | histogram | between consecutive generated tokens |
//! | `tessera_http_connections_refused_total` | counter | connections closed at once because `max_connections` were open |
//! | `tessera_tokenize_seconds` | histogram | tokenising one prompt (requests refused by admission are never tokenised) |
//! | `tessera_allreduce_calls_total` | counter | all-reduce calls of this process |
//! | `tessera_allreduce_bytes_total` | counter | all-reduce payload bytes |
//! | `tessera_allreduce_seconds_total` | counter | wall time in all-reduce |
//! | `tessera_allreduce_slow_waits_total` | counter | stall timeouts a collective waited out for a slow but live rank |
//!
//! With [`ServerMetrics::set_gpu_telemetry`], the node's dcgm-style GPU gauges
//! (`DCGM_FI_DEV_GPU_UTIL`, ..., `tessera_nvml_up`) follow in the same exposition, so that the
//! autoscaler's GPU-utilisation metric can be read from the replica leader.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::model::parallel::ALLREDUCE_STATS;
use crate::telemetry::Telemetry;

/// Label of `tessera_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishLabel {
    /// `stop`, `length`, `cancelled` or `error`.
    pub finish_reason: String,
}

/// Buckets of the time to first token (seconds).
pub const TTFT_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
];
/// Buckets of the inter-token latency (seconds).
pub const ITL_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56,
];

/// Buckets of prompt tokenisation times (seconds).
const TOKENIZE_BUCKETS: [f64; 10] = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

/// Every serving metric of one server, and the registry that renders them.
pub struct ServerMetrics {
    registry: Registry,
    pub requests_waiting: Gauge,
    pub requests_running: Gauge,
    pub kv_cache_utilization: Gauge<f64, AtomicU64>,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    pub requests: Family<FinishLabel, Counter>,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub tokenize_seconds: Histogram,
    http_connections_refused: Counter,
    allreduce_calls: Counter,
    allreduce_bytes: Counter,
    allreduce_seconds: Counter<f64, AtomicU64>,
    allreduce_slow_waits: Counter,
    /// Serialises the copy from `ALLREDUCE_STATS` into the counters above.
    allreduce_sync: Mutex<()>,
    /// GPU telemetry appended to the exposition, with the node's host name.
    gpu: OnceLock<(Arc<dyn Telemetry>, String)>,
}

impl std::fmt::Debug for ServerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerMetrics")
            .field("registry", &self.registry)
            .field("gpu_telemetry", &self.gpu.get().is_some())
            .finish_non_exhaustive()
    }
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests_waiting = Gauge::default();
        let requests_running = Gauge::default();
        let kv_cache_utilization = Gauge::<f64, AtomicU64>::default();
        let prompt_tokens = Counter::default();
        let generated_tokens = Counter::default();
        let requests = Family::<FinishLabel, Counter>::default();
        let time_to_first_token = Histogram::new(TTFT_BUCKETS);
        let inter_token_latency = Histogram::new(ITL_BUCKETS);
        let tokenize_seconds = Histogram::new(TOKENIZE_BUCKETS);
        let http_connections_refused = Counter::default();
        let allreduce_calls = Counter::default();
        let allreduce_bytes = Counter::default();
        let allreduce_seconds = Counter::<f64, AtomicU64>::default();
        let allreduce_slow_waits = Counter::default();
        registry.register(
            "tessera_requests_waiting",
            "Requests queued and not yet admitted",
            requests_waiting.clone(),
        );
        registry.register(
            "tessera_requests_running",
            "Sequences being generated",
            requests_running.clone(),
        );
        registry.register(
            "tessera_kv_cache_usage_ratio",
            "KV-cache bytes in use over the scheduler's KV-cache budget (0 to 1; named tessera_kv_cache_utilization before)",
            kv_cache_utilization.clone(),
        );
        // prometheus-client appends `_total` to counter names.
        registry.register(
            "tessera_prompt_tokens",
            "Prompt tokens prefilled",
            prompt_tokens.clone(),
        );
        registry.register(
            "tessera_generated_tokens",
            "Tokens generated",
            generated_tokens.clone(),
        );
        registry.register(
            "tessera_requests",
            "Finished requests by finish reason (stop, length, cancelled, error)",
            requests.clone(),
        );
        registry.register(
            "tessera_time_to_first_token_seconds",
            "Time from submission to the first generated token",
            time_to_first_token.clone(),
        );
        registry.register(
            "tessera_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a sequence",
            inter_token_latency.clone(),
        );
        registry.register(
            "tessera_tokenize_seconds",
            "Time to tokenise one prompt",
            tokenize_seconds.clone(),
        );
        registry.register(
            "tessera_http_connections_refused",
            "Connections closed at once because the connection cap was reached",
            http_connections_refused.clone(),
        );
        registry.register(
            "tessera_allreduce_calls",
            "All-reduce calls of this process",
            allreduce_calls.clone(),
        );
        registry.register(
            "tessera_allreduce_bytes",
            "All-reduce payload bytes of this process",
            allreduce_bytes.clone(),
        );
        registry.register(
            "tessera_allreduce_seconds",
            "Wall time spent in all-reduce by this process",
            allreduce_seconds.clone(),
        );
        registry.register(
            "tessera_allreduce_slow_waits",
            "Stall timeouts a collective waited out for a slow but live rank (each also a warning in the log)",
            allreduce_slow_waits.clone(),
        );
        Self {
            registry,
            requests_waiting,
            requests_running,
            kv_cache_utilization,
            prompt_tokens,
            generated_tokens,
            requests,
            time_to_first_token,
            inter_token_latency,
            tokenize_seconds,
            http_connections_refused,
            allreduce_calls,
            allreduce_bytes,
            allreduce_seconds,
            allreduce_slow_waits,
            allreduce_sync: Mutex::new(()),
            gpu: OnceLock::new(),
        }
    }

    /// Count one finished request.
    pub fn finished(&self, finish_reason: &str) {
        self.requests
            .get_or_create(&FinishLabel {
                finish_reason: finish_reason.to_owned(),
            })
            .inc();
    }

    /// Bring the all-reduce counters up to `ALLREDUCE_STATS`.
    fn sync_allreduce(&self) {
        let _guard = self
            .allreduce_sync
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let calls = ALLREDUCE_STATS.calls.load(Ordering::Relaxed);
        let bytes = ALLREDUCE_STATS.bytes.load(Ordering::Relaxed);
        let secs = ALLREDUCE_STATS.nanos.load(Ordering::Relaxed) as f64 / 1e9;
        self.allreduce_calls
            .inc_by(calls.saturating_sub(self.allreduce_calls.get()));
        self.allreduce_bytes
            .inc_by(bytes.saturating_sub(self.allreduce_bytes.get()));
        let slow = ALLREDUCE_STATS.slow_waits.load(Ordering::Relaxed);
        self.allreduce_slow_waits
            .inc_by(slow.saturating_sub(self.allreduce_slow_waits.get()));
        let have = self.allreduce_seconds.get();
        if secs > have {
            self.allreduce_seconds.inc_by(secs - have);
        }
    }

    /// Append the dcgm-style gauges of `telemetry`'s GPUs (labelled with `hostname`) to every
    /// rendering. Only the first call has an effect. A snapshot may block (NVML), so render off
    /// the async workers.
    pub fn set_gpu_telemetry(&self, telemetry: Arc<dyn Telemetry>, hostname: String) {
        let _ = self.gpu.set((telemetry, hostname));
    }

    /// The metrics as Prometheus (OpenMetrics) text.
    pub fn render(&self) -> String {
        self.sync_allreduce();
        let refused = super::HTTP_CONNECTIONS_REFUSED.load(Ordering::Relaxed);
        self.http_connections_refused
            .inc_by(refused.saturating_sub(self.http_connections_refused.get()));
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        if let Some((telemetry, hostname)) = self.gpu.get() {
            let snapshot = telemetry.snapshot();
            let mut gpu = Registry::default();
            crate::telemetry::metrics::register(&mut gpu, &snapshot, hostname);
            // One exposition: drop the first `# EOF`; the second one ends the text.
            if let Some(at) = out.rfind("# EOF") {
                out.truncate(at);
            }
            encode(&mut out, &gpu).expect("writing to a String cannot fail");
        }
        out
    }
}
