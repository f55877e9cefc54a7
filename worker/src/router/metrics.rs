//! The router's metrics on `/metrics` (Prometheus text), named as the worker's
//! ([`crate::server::metrics`]) where they mean the same thing, seen from in front of the
//! replicas.
//!
//! | name | type | what |
//! |---|---|---|
//! | `tessera_requests_running` | gauge | requests in the router (prefill, hand-over or decode) |
//! | `tessera_requests_total{finish_reason}` | counter | finished choices: `stop`, `length`, `error` (a failed request counts once), `cancelled` (the client left) |
//! | `tessera_time_to_first_token_seconds` | histogram | streamed requests: arrival at the router to the first text chunk sent to the client (prefill, KV hand-over and the decode replica's admission included) |
//! | `tessera_inter_token_latency_seconds` | histogram | streamed requests: between consecutive text chunks of a choice |
//! | `tessera_kv_transfer_bytes_total` | counter | KV-cache bytes handed from prefill to decode replicas (all ranks) |
//! | `tessera_kv_transfer_seconds` | histogram | one choice's KV hand-over (every rank's shard sent and stored) |
//! | `tessera_pd_prefill_seconds` | histogram | the prefill call: queueing, prefill and the KV hand-over |
//! | `tessera_pd_replica_up{role,replica}` | gauge | 1 while the replica's `/readyz` answers 200 |

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::server::metrics::{FinishLabel, ITL_BUCKETS, TTFT_BUCKETS};

/// Buckets of one KV hand-over (seconds): from a short prompt on loopback to a long one over
/// a slow link.
const KV_TRANSFER_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Label of `tessera_pd_replica_up`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabel {
    /// `prefill` or `decode`.
    pub role: String,
    /// The replica's name (`prefill-0`, `decode-1`, ...).
    pub replica: String,
}

/// Every metric of the router.
pub struct RouterMetrics {
    registry: Registry,
    pub requests_running: Gauge,
    pub requests: Family<FinishLabel, Counter>,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub kv_transfer_bytes: Counter,
    pub kv_transfer_seconds: Histogram,
    pub prefill_seconds: Histogram,
    pub replica_up: Family<ReplicaLabel, Gauge<i64, std::sync::atomic::AtomicI64>>,
}

impl std::fmt::Debug for RouterMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterMetrics").finish_non_exhaustive()
    }
}

impl Default for RouterMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl RouterMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            requests_running: Gauge::default(),
            requests: Family::default(),
            time_to_first_token: Histogram::new(TTFT_BUCKETS),
            inter_token_latency: Histogram::new(ITL_BUCKETS),
            kv_transfer_bytes: Counter::default(),
            kv_transfer_seconds: Histogram::new(KV_TRANSFER_BUCKETS),
            prefill_seconds: Histogram::new(TTFT_BUCKETS),
            replica_up: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "tessera_requests_running",
            "Requests in the router (prefill, KV hand-over or decode)",
            m.requests_running.clone(),
        );
        // prometheus-client appends `_total` to counter names.
        registry.register(
            "tessera_requests",
            "Finished choices by finish reason (stop, length, error, cancelled)",
            m.requests.clone(),
        );
        registry.register(
            "tessera_time_to_first_token_seconds",
            "Streamed requests: arrival at the router to the first text chunk sent to the client",
            m.time_to_first_token.clone(),
        );
        registry.register(
            "tessera_inter_token_latency_seconds",
            "Streamed requests: time between consecutive text chunks of a choice",
            m.inter_token_latency.clone(),
        );
        registry.register(
            "tessera_kv_transfer_bytes",
            "KV-cache bytes handed from prefill to decode replicas (all ranks)",
            m.kv_transfer_bytes.clone(),
        );
        registry.register(
            "tessera_kv_transfer_seconds",
            "One choice's KV-cache hand-over from a prefill to a decode replica",
            m.kv_transfer_seconds.clone(),
        );
        registry.register(
            "tessera_pd_prefill_seconds",
            "The prefill call: queueing, prefill and the KV hand-over",
            m.prefill_seconds.clone(),
        );
        registry.register(
            "tessera_pd_replica_up",
            "1 while the replica's /readyz answers 200",
            m.replica_up.clone(),
        );
        Self { registry, ..m }
    }

    /// Count one finished choice (or a failed request).
    pub fn finished(&self, finish_reason: &str) {
        self.requests
            .get_or_create(&FinishLabel {
                finish_reason: finish_reason.to_owned(),
            })
            .inc();
    }

    /// The metrics as Prometheus (OpenMetrics) text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
