//! What this process has done that its caches may not show yet, so that no reconcile acts on a
//! picture older than its own writes.
//!
//! kube-runtime reconciles from reflector caches that lag the API server: a pod created a
//! moment ago may not be in the cache on the next pass, a status just written may not be in the
//! ModelDeployment cache. Two records cover that window, both plain data, driven by the
//! controller and by the simulations alike:
//!
//! - [`Expectations`], as in Kubernetes' ReplicaSet controller: the pods a deployment's last
//!   pass created or deleted. Until the cache shows every one of them (created ones present,
//!   deleted ones absent or terminating), or the expectations expire, that deployment is not
//!   reconciled again; it is looked at again shortly.
//! - [`Promises`]: the placements this process wrote to a deployment's status (intent is
//!   written before pods are created). Until the deployment cache holds that write, other
//!   deployments' planning sees the promised placements instead of the cached ones, so the
//!   same free GPUs are never promised twice.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::api::{ModelDeployment, ReplicaPlacement};

/// How long expectations and promises are trusted before the cache is believed instead (a
/// watch that lost an event relists within this time; kube's ReplicaSet uses 5 minutes).
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);

/// What a cache shows of one pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    Absent,
    Present,
    /// Present with a deletion timestamp.
    Terminating,
}

#[derive(Clone, Debug)]
struct Pending {
    creates: BTreeSet<String>,
    deletes: BTreeSet<String>,
    since: Instant,
}

/// Pods created and deleted per deployment key, not yet observed in the cache.
#[derive(Clone, Debug)]
pub struct Expectations {
    pending: HashMap<String, Pending>,
    ttl: Duration,
}

impl Default for Expectations {
    fn default() -> Self {
        Self::new(DEFAULT_TTL)
    }
}

impl Expectations {
    pub fn new(ttl: Duration) -> Self {
        Self {
            pending: HashMap::new(),
            ttl,
        }
    }

    /// Record creations and deletions about to be made for `key`.
    pub fn expect(
        &mut self,
        key: &str,
        creates: impl IntoIterator<Item = String>,
        deletes: impl IntoIterator<Item = String>,
        now: Instant,
    ) {
        let p = self.pending.entry(key.to_owned()).or_insert(Pending {
            creates: BTreeSet::new(),
            deletes: BTreeSet::new(),
            since: now,
        });
        p.creates.extend(creates);
        p.deletes.extend(deletes);
        p.since = now;
        if p.creates.is_empty() && p.deletes.is_empty() {
            self.pending.remove(key);
        }
    }

    /// A creation that failed (or was never attempted) will not show up: stop waiting for it.
    pub fn creation_failed(&mut self, key: &str, name: &str) {
        if let Some(p) = self.pending.get_mut(key) {
            p.creates.remove(name);
            if p.creates.is_empty() && p.deletes.is_empty() {
                self.pending.remove(key);
            }
        }
    }

    /// Whether the cache shows everything `key` expects (what it shows is forgotten). Expired
    /// expectations count as satisfied, with a warning: the cache is then believed.
    pub fn satisfied(&mut self, key: &str, seen: impl Fn(&str) -> Seen, now: Instant) -> bool {
        let Some(p) = self.pending.get_mut(key) else {
            return true;
        };
        p.creates.retain(|n| seen(n) == Seen::Absent);
        p.deletes.retain(|n| seen(n) == Seen::Present);
        if p.creates.is_empty() && p.deletes.is_empty() {
            self.pending.remove(key);
            return true;
        }
        if now.saturating_duration_since(p.since) >= self.ttl {
            tracing::warn!(
                deployment = key,
                creates = p.creates.len(),
                deletes = p.deletes.len(),
                "expectations expired; believing the cache"
            );
            self.pending.remove(key);
            return true;
        }
        false
    }

    /// Forget a deployment (deleted, or its pass failed before acting).
    pub fn forget(&mut self, key: &str) {
        self.pending.remove(key);
    }

    /// Number of deployments with unobserved actions.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[derive(Clone, Debug)]
struct Promise {
    resource_version: String,
    placements: Vec<ReplicaPlacement>,
    since: Instant,
}

/// Placements written to status that the deployment cache may not show yet.
#[derive(Clone, Debug)]
pub struct Promises {
    by_key: HashMap<String, Promise>,
    ttl: Duration,
}

impl Default for Promises {
    fn default() -> Self {
        Self::new(DEFAULT_TTL)
    }
}

/// `a` is at least as new as `b`: equal, or both numbers (etcd revisions, as every API server
/// in use writes them) and `a >= b`.
fn caught_up(a: &str, b: &str) -> bool {
    a == b || matches!((a.parse::<u64>(), b.parse::<u64>()), (Ok(x), Ok(y)) if x >= y)
}

impl Promises {
    pub fn new(ttl: Duration) -> Self {
        Self {
            by_key: HashMap::new(),
            ttl,
        }
    }

    /// A status write of `key` succeeded with `resource_version`.
    pub fn record(
        &mut self,
        key: &str,
        resource_version: String,
        placements: Vec<ReplicaPlacement>,
        now: Instant,
    ) {
        self.by_key.insert(
            key.to_owned(),
            Promise {
                resource_version,
                placements,
                since: now,
            },
        );
    }

    pub fn forget(&mut self, key: &str) {
        self.by_key.remove(key);
    }

    /// The deployments as planning must see them: a cached deployment older than this
    /// process's last write to it carries the written placements. Promises the cache has caught
    /// up with, or that expired, are dropped.
    pub fn overlay(
        &mut self,
        deployments: &mut [ModelDeployment],
        key_of: impl Fn(&ModelDeployment) -> String,
        now: Instant,
    ) {
        let ttl = self.ttl;
        self.by_key
            .retain(|_, p| now.saturating_duration_since(p.since) < ttl);
        for d in deployments.iter_mut() {
            let key = key_of(d);
            let Some(p) = self.by_key.get(&key) else {
                continue;
            };
            let cached = d.metadata.resource_version.as_deref().unwrap_or_default();
            if caught_up(cached, &p.resource_version) {
                self.by_key.remove(&key);
                continue;
            }
            d.status.get_or_insert_with(Default::default).placements = p.placements.clone();
        }
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations_hold_until_the_cache_shows_creations_and_deletions() {
        let t0 = Instant::now();
        let mut e = Expectations::new(Duration::from_secs(60));
        assert!(e.satisfied("ns/a", |_| Seen::Absent, t0));
        e.expect("ns/a", ["p1".into(), "p2".into()], ["old".into()], t0);
        // Nothing seen yet.
        assert!(!e.satisfied(
            "ns/a",
            |n| if n == "old" {
                Seen::Present
            } else {
                Seen::Absent
            },
            t0
        ));
        // p1 seen, old terminating; p2 still missing.
        assert!(!e.satisfied(
            "ns/a",
            |n| match n {
                "p1" => Seen::Present,
                "old" => Seen::Terminating,
                _ => Seen::Absent,
            },
            t0
        ));
        // A failed creation is not waited for.
        e.creation_failed("ns/a", "p2");
        assert!(e.satisfied("ns/a", |_| Seen::Absent, t0));
        assert!(e.is_empty());
        // Another deployment is unaffected, and expectations expire.
        e.expect("ns/b", ["q".into()], [], t0);
        assert!(e.satisfied("ns/a", |_| Seen::Absent, t0));
        assert!(!e.satisfied("ns/b", |_| Seen::Absent, t0 + Duration::from_secs(59)));
        assert!(e.satisfied("ns/b", |_| Seen::Absent, t0 + Duration::from_secs(60)));
    }

    fn md(rv: &str, replicas: &[i32]) -> ModelDeployment {
        let mut d: ModelDeployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "tessera.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "a", "namespace": "ns", "resourceVersion": rv},
            "spec": {"model": {"uri": "pvc://m/x", "architecture": {
                "parameters": 8030261248i64, "layers": 32, "hiddenSize": 4096,
                "attentionHeads": 32, "kvHeads": 8, "intermediateSize": 14336,
                "vocabSize": 128256, "contextLength": 131072, "bytesPerParameter": 2}}}
        }))
        .expect("md");
        d.status = Some(crate::api::ModelDeploymentStatus {
            placements: replicas
                .iter()
                .map(|r| ReplicaPlacement {
                    replica: *r,
                    ..ReplicaPlacement::default()
                })
                .collect(),
            ..Default::default()
        });
        d
    }

    #[test]
    fn promises_overlay_a_stale_cache_until_it_catches_up() {
        let t0 = Instant::now();
        let key = |_: &ModelDeployment| "ns/a".to_owned();
        let mut p = Promises::new(Duration::from_secs(60));
        p.record(
            "ns/a",
            "12".into(),
            md("12", &[0, 1]).status.expect("status").placements,
            t0,
        );
        // The cache still shows rv 10 with one replica: planning sees the two written.
        let mut cached = vec![md("10", &[0])];
        p.overlay(&mut cached, key, t0);
        let replicas: Vec<i32> = cached[0]
            .status
            .as_ref()
            .expect("status")
            .placements
            .iter()
            .map(|x| x.replica)
            .collect();
        assert_eq!(replicas, [0, 1]);
        assert_eq!(p.len(), 1);
        // Caught up (or newer): the cache is believed and the promise dropped.
        let mut cached = vec![md("13", &[0])];
        p.overlay(&mut cached, key, t0);
        assert_eq!(cached[0].status.as_ref().expect("s").placements.len(), 1);
        assert!(p.is_empty());
        // Promises expire.
        p.record("ns/a", "20".into(), Vec::new(), t0);
        let mut cached = vec![md("15", &[0])];
        p.overlay(&mut cached, key, t0 + Duration::from_secs(61));
        assert_eq!(cached[0].status.as_ref().expect("s").placements.len(), 1);
        assert!(p.is_empty());
    }
}
