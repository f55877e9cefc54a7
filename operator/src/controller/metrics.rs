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
    /// Reconciles put off because the pod cache did not yet show the last pass's pods.
    pub expectations_waits: Counter,
    /// Decisions taken again from live reads because the cache was behind.
    pub stale_decisions: Counter,
    /// 1 while this process holds the leader Lease (or runs without election).
    pub leader: Gauge,
    /// Deployments with `tessera_replicas` series, to remove them when a deployment goes.
    known: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<(String, String)>>>,
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
            expectations_waits: Counter::default(),
            stale_decisions: Counter::default(),
            leader: Gauge::default(),
            known: Default::default(),
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
        registry.register(
            "tessera_expectation_waits",
            "Reconciles put off until the pod cache showed the pods the last pass created or deleted",
            m.expectations_waits.clone(),
        );
        registry.register(
            "tessera_stale_cache_decisions",
            "Decisions taken again from live reads because the cache was behind the API server",
            m.stale_decisions.clone(),
        );
        registry.register(
            "tessera_operator_leader",
            "1 while this operator process holds the leader Lease (or runs without leader election)",
            m.leader.clone(),
        );
        m
    }

    /// The replica gauge of one deployment in one state.
    pub fn replica_gauge(&self, namespace: &str, deployment: &str, state: &'static str) -> Gauge {
        self.known
            .lock()
            .expect("lock")
            .insert((namespace.to_owned(), deployment.to_owned()));
        self.replicas
            .get_or_create(&ReplicaLabels {
                namespace: namespace.to_owned(),
                deployment: deployment.to_owned(),
                state,
            })
            .clone()
    }

    /// Remove a deployment's series.
    pub fn forget_deployment(&self, namespace: &str, deployment: &str) {
        self.known
            .lock()
            .expect("lock")
            .remove(&(namespace.to_owned(), deployment.to_owned()));
        for state in REPLICA_STATES {
            self.replicas.remove(&ReplicaLabels {
                namespace: namespace.to_owned(),
                deployment: deployment.to_owned(),
                state,
            });
        }
    }

    /// Remove the series of every deployment whose `namespace/name` is not in `keep`.
    pub fn forget_deployments_except(&self, keep: std::collections::BTreeSet<String>) {
        let gone: Vec<(String, String)> = self
            .known
            .lock()
            .expect("lock")
            .iter()
            .filter(|(ns, d)| !keep.contains(&format!("{ns}/{d}")))
            .cloned()
            .collect();
        for (ns, d) in gone {
            self.forget_deployment(&ns, &d);
        }
    }
}

/// The states of `tessera_replicas`.
pub const REPLICA_STATES: [&str; 4] = ["ready", "starting", "backoff", "unplaced"];

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
    /// 1 while the last decision wanted more replicas than the cluster holds.
    pub capacity_limited: Family<DeploymentLabels, Gauge>,
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
            capacity_limited: Family::default(),
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
        registry.register(
            "tessera_autoscaler_capacity_limited",
            "1 while the last autoscaling decision wanted more replicas than fit in the cluster, per deployment",
            m.capacity_limited.clone(),
        );
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).expect("encode");
        out
    }

    #[test]
    fn a_deleted_deployments_series_go_with_it() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        m.replica_gauge("inference", "a", "ready").set(2);
        m.replica_gauge("inference", "b", "ready").set(1);
        m.replica_gauge("inference", "b", "backoff").set(1);
        assert!(text(&registry).contains("deployment=\"b\""));
        // "b" is no longer in the store: its series are removed, "a"'s stay.
        m.forget_deployments_except(["inference/a".to_owned()].into());
        let out = text(&registry);
        assert!(!out.contains("deployment=\"b\""), "{out}");
        assert!(out.contains("deployment=\"a\""), "{out}");
        // A deployment being deleted (foreground deletion) goes at once.
        m.forget_deployment("inference", "a");
        assert!(!text(&registry).contains("deployment=\"a\""));
    }
}
