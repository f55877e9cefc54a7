//! The operator's Prometheus metrics (prometheus-client).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CategoryLabel {
    pub category: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabels {
    pub namespace: String,
    pub deployment: String,
    pub state: &'static str,
}

/// Every metric the controller exports.
#[derive(Clone)]
pub struct Metrics {
    pub reconciles: Family<ResultLabel, Counter>,
    pub failures: Family<CategoryLabel, Counter>,
    pub reconcile_duration: Histogram,
    pub placement_duration: Histogram,
    pub replicas: Family<ReplicaLabels, Gauge>,
}

impl Metrics {
    /// Create the metrics and register them.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            reconciles: Family::default(),
            failures: Family::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            placement_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 14)),
            replicas: Family::default(),
        };
        registry.register(
            "tessera_reconciles",
            "Reconciles of ModelDeployments, by result",
            m.reconciles.clone(),
        );
        registry.register(
            "tessera_reconcile_failures",
            "Failed reconciles, by error category",
            m.failures.clone(),
        );
        registry.register(
            "tessera_reconcile_duration_seconds",
            "Time of one reconcile, API calls included",
            m.reconcile_duration.clone(),
        );
        registry.register(
            "tessera_placement_duration_seconds",
            "Time of the pure decision (planning, placement, object building)",
            m.placement_duration.clone(),
        );
        registry.register(
            "tessera_replicas",
            "Replicas by state (ready, starting, backoff, unplaced)",
            m.replicas.clone(),
        );
        m
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeploymentLabels {
    pub namespace: String,
    pub deployment: String,
}

/// Every metric the autoscaler exports (registered in the controller's registry).
#[derive(Clone)]
pub struct AutoscalerMetrics {
    /// Passes run (`tessera_autoscaler_passes_total`).
    pub passes: Counter,
    /// Time of one pass, scrapes and API writes included.
    pub pass_duration: Histogram,
    /// Scrapes of replica leaders by result: `ok`, `timeout`, `error`.
    pub scrapes: Family<ResultLabel, Counter>,
    /// Decisions by direction: `up`, `down`, `hold`.
    pub decisions: Family<DirectionLabel, Counter>,
    /// The replicas the last decision asked for, per autoscaled deployment.
    pub desired_replicas: Family<DeploymentLabels, Gauge>,
}

impl AutoscalerMetrics {
    /// Create the metrics and register them.
    pub fn new(registry: &mut Registry) -> Self {
        let m = AutoscalerMetrics {
            passes: Counter::default(),
            pass_duration: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            scrapes: Family::default(),
            decisions: Family::default(),
            desired_replicas: Family::default(),
        };
        registry.register(
            "tessera_autoscaler_passes",
            "Autoscaling passes run",
            m.passes.clone(),
        );
        registry.register(
            "tessera_autoscaler_pass_duration_seconds",
            "Time of one autoscaling pass, scrapes and API writes included",
            m.pass_duration.clone(),
        );
        registry.register(
            "tessera_autoscaler_scrapes",
            "Scrapes of replica leaders' /metrics, by result (ok, timeout, error)",
            m.scrapes.clone(),
        );
        registry.register(
            "tessera_autoscaler_decisions",
            "Autoscaling decisions, by direction (up, down, hold)",
            m.decisions.clone(),
        );
        registry.register(
            "tessera_autoscaler_desired_replicas",
            "Replicas the last autoscaling decision asked for, per deployment",
            m.desired_replicas.clone(),
        );
        m
    }
}
