//! Leader election on a `coordination.k8s.io/v1` Lease, so only one operator replica writes.
//!
//! kube-runtime has no elector; this one follows client-go's `tools/leaderelection`:
//!
//! - **Timings** ([`LeaderConfig`]): `lease_duration` (15 s) is how long a candidate waits, after
//!   it last saw the Lease record change, before it takes the Lease over; `renew_deadline` (10 s)
//!   is how long the leader keeps trying to renew before it gives up; `retry_period` (2 s) is the
//!   interval between attempts. Construction checks `lease_duration > renew_deadline > 1.2 ×
//!   retry_period` (client-go's `JitterFactor` rule) and that `lease_duration` is whole seconds
//!   (it is written as `leaseDurationSeconds`).
//! - **Expiry is judged by local observation, never by the remote `renewTime`.** Each replica
//!   keeps an [`Observer`]: the last Lease record it read (spec and `resourceVersion`) and the
//!   local monotonic [`Instant`] at which it saw that record *change*. A candidate takes a Lease
//!   held by another identity only once `observed_time + leaseDurationSeconds` (the record's own
//!   value; ours when the record has none) has passed on its own clock with no change in between.
//!   `renewTime` is written for humans only, so clock skew between nodes cannot cause an early
//!   takeover (only a difference in clock *rate* could). A Lease with an empty holder (released)
//!   is taken at once, and so is a missing Lease (created).
//! - **Every write is conditional**: a replace carrying the `resourceVersion` just read, or a
//!   create; of two racing candidates one gets a 409 Conflict and loses.
//! - **The leader renews every `retry_period`**; each attempt (get + replace) is bounded by a
//!   timeout that ends at the renewal deadline. Once `renew_deadline` has passed since the start
//!   of the last successful renewal, [`renew_until_lost`] returns and the caller must stop
//!   writing (the operator exits). It also returns at once when it finds another holder. Since
//!   `renew_deadline < lease_duration`, the old leader stops before any other replica, which
//!   waits `lease_duration` from when it saw that renewal land, may take over.
//! - **Release on shutdown** ([`release`]): a leader that stops cleanly writes an empty holder,
//!   `renewTime` now and `leaseDurationSeconds: 1` (client-go's `ReleaseOnCancel`), so a
//!   successor takes over at its next retry instead of waiting out the Lease. Call it only once
//!   nothing writes any more.
//! - Candidates retry every `retry_period` plus up to 120 % jitter (client-go's `JitterUntil`).
//!
//! The API calls go through the small [`LeaseClient`] trait (implemented for `Api<Lease>`), so the
//! loops are tested against a fake with tokio's paused clock.

use std::future::Future;
use std::hash::BuildHasher;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::time::Instant;

/// client-go's default `LeaseDuration`.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// client-go's default `RenewDeadline`.
pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// client-go's default `RetryPeriod`.
pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(2);
/// client-go's `JitterFactor`: candidates wait `retry_period × (1 + rand × 1.2)` between tries,
/// and `renew_deadline` must exceed `1.2 × retry_period`.
pub const JITTER_FACTOR: f64 = 1.2;

/// Why a [`LeaderConfig`] was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("leader election: the lease {0} must not be empty")]
    Empty(&'static str),
    #[error(
        "leader election: lease_duration ({0:?}) must be a whole number of seconds, at least 1 s"
    )]
    LeaseDurationSeconds(Duration),
    #[error(
        "leader election: lease_duration ({lease_duration:?}) must be greater than renew_deadline ({renew_deadline:?})"
    )]
    LeaseNotLongerThanRenewDeadline {
        lease_duration: Duration,
        renew_deadline: Duration,
    },
    #[error(
        "leader election: renew_deadline ({renew_deadline:?}) must be greater than 1.2 × retry_period ({retry_period:?})"
    )]
    RenewDeadlineTooShort {
        renew_deadline: Duration,
        retry_period: Duration,
    },
    #[error("leader election: retry_period must be greater than zero")]
    ZeroRetryPeriod,
}

/// Settings of the elector; only built through [`LeaderConfig::new`] and
/// [`LeaderConfig::with_timings`], which validate them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderConfig {
    namespace: String,
    name: String,
    identity: String,
    lease_duration: Duration,
    renew_deadline: Duration,
    retry_period: Duration,
}

impl LeaderConfig {
    /// The Lease `namespace/name`, contended for as `identity`, with client-go's default timings
    /// (15 s lease, 10 s renew deadline, 2 s retry period).
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        identity: impl Into<String>,
    ) -> Result<Self, ConfigError> {
        let cfg = Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_deadline: DEFAULT_RENEW_DEADLINE,
            retry_period: DEFAULT_RETRY_PERIOD,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The same Lease with other timings; refused unless
    /// `lease_duration > renew_deadline > 1.2 × retry_period > 0`.
    pub fn with_timings(
        self,
        lease_duration: Duration,
        renew_deadline: Duration,
        retry_period: Duration,
    ) -> Result<Self, ConfigError> {
        let cfg = Self {
            lease_duration,
            renew_deadline,
            retry_period,
            ..self
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("namespace", &self.namespace),
            ("name", &self.name),
            ("identity", &self.identity),
        ] {
            if value.is_empty() {
                return Err(ConfigError::Empty(field));
            }
        }
        let secs = self.lease_duration.as_secs();
        if secs == 0 || self.lease_duration.subsec_nanos() != 0 || i32::try_from(secs).is_err() {
            return Err(ConfigError::LeaseDurationSeconds(self.lease_duration));
        }
        if self.retry_period.is_zero() {
            return Err(ConfigError::ZeroRetryPeriod);
        }
        if self.lease_duration <= self.renew_deadline {
            return Err(ConfigError::LeaseNotLongerThanRenewDeadline {
                lease_duration: self.lease_duration,
                renew_deadline: self.renew_deadline,
            });
        }
        // renew_deadline > 1.2 × retry_period, in integers: 5 × deadline > 6 × period.
        if self.renew_deadline.as_nanos() * 5 <= self.retry_period.as_nanos() * 6 {
            return Err(ConfigError::RenewDeadlineTooShort {
                renew_deadline: self.renew_deadline,
                retry_period: self.retry_period,
            });
        }
        Ok(())
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn identity(&self) -> &str {
        &self.identity
    }
    pub fn lease_duration(&self) -> Duration {
        self.lease_duration
    }
    pub fn renew_deadline(&self) -> Duration {
        self.renew_deadline
    }
    pub fn retry_period(&self) -> Duration {
        self.retry_period
    }
}

/// What to do with the Lease as last observed, for `identity` at `now`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it, it expired by our observation, or we hold it: write ourselves in.
    /// `transition` is false only when we already hold it (a renewal).
    Take { transition: bool },
    /// Someone else holds it and we saw it change less than its lease duration ago; it expires
    /// for us after this long unless it changes again.
    Wait(Duration),
}

/// The last Lease record read and the local instant at which it was seen to change.
#[derive(Clone, Debug)]
pub struct Observer {
    /// Assumed when a record has no (positive) `leaseDurationSeconds`.
    default_lease: Duration,
    seen: Option<Seen>,
}

#[derive(Clone, Debug)]
struct Seen {
    /// `None`: no Lease (or one without a spec).
    spec: Option<LeaseSpec>,
    resource_version: Option<String>,
    at: Instant,
}

impl Observer {
    /// Nothing observed yet; `default_lease` is used for records without `leaseDurationSeconds`.
    pub fn new(default_lease: Duration) -> Self {
        Self {
            default_lease,
            seen: None,
        }
    }

    /// Record the Lease as read at `now`. The observed time moves only when the record differs
    /// from the last one (spec or `resourceVersion`); returns whether it did.
    pub fn observe(
        &mut self,
        spec: Option<&LeaseSpec>,
        resource_version: Option<&str>,
        now: Instant,
    ) -> bool {
        if let Some(seen) = &self.seen
            && seen.spec.as_ref() == spec
            && seen.resource_version.as_deref() == resource_version
        {
            return false;
        }
        self.seen = Some(Seen {
            spec: spec.cloned(),
            resource_version: resource_version.map(str::to_owned),
            at: now,
        });
        true
    }

    /// When the current record was first seen; `None` before any observation.
    pub fn observed_at(&self) -> Option<Instant> {
        self.seen.as_ref().map(|s| s.at)
    }

    /// The holder of the observed record; empty when none.
    pub fn holder(&self) -> &str {
        self.seen
            .as_ref()
            .and_then(|s| s.spec.as_ref())
            .and_then(|s| s.holder_identity.as_deref())
            .unwrap_or("")
    }

    /// Pure: what `identity` should do at `now`, judged only by local observation times.
    pub fn decide(&self, identity: &str, now: Instant) -> Decision {
        let Some(seen) = &self.seen else {
            return Decision::Take { transition: true };
        };
        let holder = self.holder();
        if holder.is_empty() {
            return Decision::Take { transition: true };
        }
        if holder == identity {
            return Decision::Take { transition: false };
        }
        let duration = seen
            .spec
            .as_ref()
            .and_then(|s| s.lease_duration_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .filter(|s| *s > 0)
            .map_or(self.default_lease, Duration::from_secs);
        let expires = seen.at + duration;
        if now >= expires {
            Decision::Take { transition: true }
        } else {
            Decision::Wait(expires - now)
        }
    }
}

/// The Lease API calls the elector makes; implemented for `Api<Lease>` and by fakes in tests.
pub trait LeaseClient: Send + Sync {
    /// The Lease, or `None` when it does not exist.
    fn get(&self, name: &str) -> impl Future<Output = Result<Option<Lease>, kube::Error>> + Send;
    fn create(&self, lease: &Lease) -> impl Future<Output = Result<Lease, kube::Error>> + Send;
    /// Must fail with 409 when `lease.metadata.resourceVersion` is not the current one.
    fn replace(
        &self,
        name: &str,
        lease: &Lease,
    ) -> impl Future<Output = Result<Lease, kube::Error>> + Send;
}

impl LeaseClient for Api<Lease> {
    async fn get(&self, name: &str) -> Result<Option<Lease>, kube::Error> {
        self.get_opt(name).await
    }
    async fn create(&self, lease: &Lease) -> Result<Lease, kube::Error> {
        Api::create(self, &PostParams::default(), lease).await
    }
    async fn replace(&self, name: &str, lease: &Lease) -> Result<Lease, kube::Error> {
        Api::replace(self, name, &PostParams::default(), lease).await
    }
}

/// Why one attempt on the Lease failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("the Lease changed under us (409 Conflict)")]
    Conflict,
    #[error("the Lease {0} timed out")]
    Timeout(&'static str),
    #[error(transparent)]
    Api(#[from] kube::Error),
}

/// The result of one successful look at the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// We hold the Lease now (taken or renewed).
    Leading,
    /// Another replica holds it; it expires for us after `expires_in` unless it changes.
    Following {
        holder: String,
        expires_in: Duration,
    },
}

/// Why [`renew_until_lost`] returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lost {
    /// No successful renewal within `renew_deadline`.
    Deadline,
    /// Another replica holds the Lease.
    TakenBy(String),
}

async fn bounded<T>(
    deadline: Instant,
    what: &'static str,
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, LeaseError> {
    match tokio::time::timeout_at(deadline, call).await {
        Err(_) => Err(LeaseError::Timeout(what)),
        Ok(Err(kube::Error::Api(s))) if s.code == 409 => Err(LeaseError::Conflict),
        Ok(r) => Ok(r?),
    }
}

fn lease_spec(
    cfg: &LeaderConfig,
    old: Option<&LeaseSpec>,
    transition: bool,
    now: Timestamp,
) -> LeaseSpec {
    let transitions = old.and_then(|s| s.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        // Validated to fit when the config was built.
        lease_duration_seconds: Some(i32::try_from(cfg.lease_duration.as_secs()).unwrap_or(15)),
        acquire_time: if transition {
            Some(MicroTime(now))
        } else {
            old.and_then(|s| s.acquire_time.clone())
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if transition {
            transitions.saturating_add(1)
        } else {
            transitions
        }),
        ..LeaseSpec::default()
    }
}

/// One attempt to take or renew the Lease (client-go's `tryAcquireOrRenew`): read it, update
/// `observer`, and write ourselves in when [`Observer::decide`] allows. Every API call ends by
/// `deadline`.
pub async fn try_acquire<C: LeaseClient + ?Sized>(
    client: &C,
    cfg: &LeaderConfig,
    observer: &mut Observer,
    deadline: Instant,
) -> Result<Attempt, LeaseError> {
    let current = bounded(deadline, "get", client.get(&cfg.name)).await?;
    let now = Instant::now();
    let old_spec = current.as_ref().and_then(|l| l.spec.as_ref());
    observer.observe(
        old_spec,
        current
            .as_ref()
            .and_then(|l| l.metadata.resource_version.as_deref()),
        now,
    );
    let transition = match observer.decide(&cfg.identity, now) {
        Decision::Wait(expires_in) => {
            return Ok(Attempt::Following {
                holder: observer.holder().to_owned(),
                expires_in,
            });
        }
        Decision::Take { transition } => transition,
    };
    let spec = lease_spec(cfg, old_spec, transition, Timestamp::now());
    let written = match current {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec),
            };
            bounded(deadline, "create", client.create(&lease)).await?
        }
        Some(mut lease) => {
            // Replace with the resourceVersion we read: a concurrent writer makes this a 409.
            lease.spec = Some(spec);
            bounded(deadline, "replace", client.replace(&cfg.name, &lease)).await?
        }
    };
    observer.observe(
        written.spec.as_ref(),
        written.metadata.resource_version.as_deref(),
        Instant::now(),
    );
    Ok(Attempt::Leading)
}

/// `period × (1 + rand × JITTER_FACTOR)`, as client-go's `wait.Jitter`.
fn jittered(period: Duration) -> Duration {
    let random = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    let unit = (random >> 11) as f64 / (1u64 << 53) as f64;
    period + period.mul_f64(JITTER_FACTOR * unit)
}

/// Block until this process holds the Lease. Returns the instant at which the winning attempt
/// started, which is when the Lease's validity must be counted from (see
/// [`renew_until_lost_since`]). Each attempt is bounded by `renew_deadline`; between attempts
/// it waits `retry_period` plus jitter.
pub async fn acquire<C: LeaseClient + ?Sized>(client: &C, cfg: &LeaderConfig) -> Instant {
    let mut observer = Observer::new(cfg.lease_duration);
    loop {
        let started = Instant::now();
        match try_acquire(client, cfg, &mut observer, started + cfg.renew_deadline).await {
            Ok(Attempt::Leading) => {
                tracing::info!(lease = %cfg.name, identity = %cfg.identity, "became the leader");
                return started;
            }
            Ok(Attempt::Following { holder, expires_in }) => {
                tracing::debug!(
                    lease = %cfg.name,
                    %holder,
                    expires_in_ms = expires_in.as_millis() as u64,
                    "another replica leads"
                );
            }
            Err(e) => {
                tracing::warn!(lease = %cfg.name, error = %e, "leader election failed; retrying");
            }
        }
        tokio::time::sleep(jittered(cfg.retry_period)).await;
    }
}

/// [`renew_until_lost_since`] counting from now: call it right after [`acquire`] returns.
pub async fn renew_until_lost<C: LeaseClient + ?Sized>(client: &C, cfg: &LeaderConfig) -> Lost {
    renew_until_lost_since(client, cfg, Instant::now()).await
}

/// Renew the Lease every `retry_period`, starting at once, until it is lost: no renewal
/// succeeded within `renew_deadline` of the start of the last successful one (`renewed_at` at
/// first: the instant [`acquire`] returned), or another replica holds it. Then return; the
/// caller must stop writing. Every attempt ends by the deadline, so this returns by
/// `last success + renew_deadline`, before anyone else may take over.
pub async fn renew_until_lost_since<C: LeaseClient + ?Sized>(
    client: &C,
    cfg: &LeaderConfig,
    renewed_at: Instant,
) -> Lost {
    let mut observer = Observer::new(cfg.lease_duration);
    let mut last_ok = renewed_at;
    loop {
        let deadline = last_ok + cfg.renew_deadline;
        let started = Instant::now();
        if started >= deadline {
            tracing::error!(lease = %cfg.name, "could not renew the lease in time");
            return Lost::Deadline;
        }
        match try_acquire(client, cfg, &mut observer, deadline).await {
            Ok(Attempt::Leading) => last_ok = started,
            Ok(Attempt::Following { holder, .. }) => {
                tracing::error!(lease = %cfg.name, %holder, "another replica took the lease");
                return Lost::TakenBy(holder);
            }
            Err(e) => {
                tracing::warn!(lease = %cfg.name, error = %e, "renewing the lease failed");
            }
        }
        let next = Instant::now() + cfg.retry_period;
        tokio::time::sleep_until(next.min(last_ok + cfg.renew_deadline)).await;
    }
}

/// Give the Lease up if we hold it (client-go's `ReleaseOnCancel`): write an empty holder,
/// `renewTime` and `acquireTime` now and `leaseDurationSeconds: 1`, with the `resourceVersion`
/// read, so a successor need not wait out the Lease. Best effort, bounded by `renew_deadline`;
/// returns whether it released. Call it only once this process has stopped writing.
pub async fn release<C: LeaseClient + ?Sized>(client: &C, cfg: &LeaderConfig) -> bool {
    let deadline = Instant::now() + cfg.renew_deadline;
    let result = async {
        let Some(mut lease) = bounded(deadline, "get", client.get(&cfg.name)).await? else {
            return Ok(false);
        };
        let Some(old) = lease.spec.as_ref() else {
            return Ok(false);
        };
        if old.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
            return Ok(false);
        }
        let now = MicroTime(Timestamp::now());
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(String::new()),
            lease_duration_seconds: Some(1),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: old.lease_transitions,
            ..LeaseSpec::default()
        });
        bounded(deadline, "replace", client.replace(&cfg.name, &lease)).await?;
        Ok::<_, LeaseError>(true)
    }
    .await;
    match result {
        Ok(released) => {
            if released {
                tracing::info!(lease = %cfg.name, identity = %cfg.identity, "released the lease");
            }
            released
        }
        Err(e) => {
            tracing::warn!(lease = %cfg.name, error = %e, "releasing the lease failed");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

    use kube::core::Status;

    use super::*;

    fn spec(holder: &str, renewed: &str) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(renewed.parse().expect("time"))),
            ..LeaseSpec::default()
        }
    }

    fn cfg(identity: &str) -> LeaderConfig {
        LeaderConfig::new("ns", "tessera", identity).expect("valid config")
    }

    #[test]
    fn config_defaults_follow_client_go_and_bad_timings_are_refused() {
        let c = cfg("a");
        assert_eq!(
            (c.lease_duration(), c.renew_deadline(), c.retry_period()),
            (
                Duration::from_secs(15),
                Duration::from_secs(10),
                Duration::from_secs(2)
            )
        );
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        assert!(cfg("a").with_timings(s(4), s(3), s(2)).is_ok());
        assert_eq!(
            cfg("a").with_timings(s(10), s(10), s(2)),
            Err(ConfigError::LeaseNotLongerThanRenewDeadline {
                lease_duration: s(10),
                renew_deadline: s(10)
            })
        );
        // 2.4 s is exactly 1.2 × 2 s: not enough; 2.401 s is.
        assert_eq!(
            cfg("a").with_timings(s(15), ms(2400), s(2)),
            Err(ConfigError::RenewDeadlineTooShort {
                renew_deadline: ms(2400),
                retry_period: s(2)
            })
        );
        assert!(cfg("a").with_timings(s(15), ms(2401), s(2)).is_ok());
        assert_eq!(
            cfg("a").with_timings(s(15), s(10), s(0)),
            Err(ConfigError::ZeroRetryPeriod)
        );
        assert_eq!(
            cfg("a").with_timings(ms(15_500), s(10), s(2)),
            Err(ConfigError::LeaseDurationSeconds(ms(15_500)))
        );
        assert_eq!(
            LeaderConfig::new("ns", "tessera", ""),
            Err(ConfigError::Empty("identity"))
        );
        let msg = cfg("a")
            .with_timings(s(10), s(12), s(2))
            .expect_err("refused")
            .to_string();
        assert!(msg.contains("must be greater than renew_deadline"), "{msg}");
    }

    #[test]
    fn a_lease_just_seen_to_change_is_not_taken_however_old_its_renew_time() {
        // The holder's clock is far behind ours: renewTime is years in the past. Judged by
        // renewTime (the old logic), it would be taken at once.
        let t0 = Instant::now();
        let mut o = Observer::new(DEFAULT_LEASE_DURATION);
        assert!(o.observe(Some(&spec("b", "2001-01-01T00:00:00Z")), Some("1"), t0));
        assert_eq!(o.decide("a", t0), Decision::Wait(Duration::from_secs(15)));
        // It renews (record changes) 10 s later: the wait restarts from then.
        let t1 = t0 + Duration::from_secs(10);
        assert!(o.observe(Some(&spec("b", "2001-01-01T00:00:10Z")), Some("2"), t1));
        assert_eq!(
            o.decide("a", t1 + Duration::from_secs(14)),
            Decision::Wait(Duration::from_secs(1))
        );
        // Same record again: the observed time does not move.
        assert!(!o.observe(
            Some(&spec("b", "2001-01-01T00:00:10Z")),
            Some("2"),
            t1 + Duration::from_secs(5)
        ));
        assert_eq!(o.observed_at(), Some(t1));
        // Only the resourceVersion changed (e.g. a label): still a change.
        assert!(o.observe(
            Some(&spec("b", "2001-01-01T00:00:10Z")),
            Some("3"),
            t1 + Duration::from_secs(6)
        ));
    }

    #[test]
    fn a_lease_unchanged_for_its_duration_is_taken_even_with_a_future_renew_time() {
        // The holder's clock is ahead: renewTime is in the far future. The old logic would wait
        // for it forever; by observation it expires 15 s after it stopped changing.
        let t0 = Instant::now();
        let mut o = Observer::new(DEFAULT_LEASE_DURATION);
        let held = spec("b", "2099-01-01T00:00:00Z");
        o.observe(Some(&held), Some("7"), t0);
        for secs in [2, 4, 14] {
            let now = t0 + Duration::from_secs(secs);
            assert!(!o.observe(Some(&held), Some("7"), now));
            assert!(matches!(o.decide("a", now), Decision::Wait(_)));
        }
        assert_eq!(
            o.decide("a", t0 + Duration::from_secs(15)),
            Decision::Take { transition: true }
        );
    }

    #[test]
    fn own_free_released_and_missing_leases_are_taken_at_once() {
        let t0 = Instant::now();
        let mut o = Observer::new(DEFAULT_LEASE_DURATION);
        assert_eq!(o.decide("a", t0), Decision::Take { transition: true });
        o.observe(None, None, t0);
        assert_eq!(o.decide("a", t0), Decision::Take { transition: true });
        o.observe(Some(&spec("a", "2001-01-01T00:00:00Z")), Some("1"), t0);
        assert_eq!(o.decide("a", t0), Decision::Take { transition: false });
        assert_eq!(o.holder(), "a");
        o.observe(Some(&spec("", "2001-01-01T00:00:00Z")), Some("2"), t0);
        assert_eq!(o.decide("a", t0), Decision::Take { transition: true });
    }

    #[test]
    fn the_records_own_lease_duration_counts_and_ours_is_the_fallback() {
        let t0 = Instant::now();
        let mut o = Observer::new(Duration::from_secs(30));
        let mut short = spec("b", "2026-01-01T00:00:00Z");
        short.lease_duration_seconds = Some(1);
        o.observe(Some(&short), Some("1"), t0);
        assert_eq!(
            o.decide("a", t0 + Duration::from_millis(500)),
            Decision::Wait(Duration::from_millis(500))
        );
        assert_eq!(
            o.decide("a", t0 + Duration::from_secs(1)),
            Decision::Take { transition: true }
        );
        let mut none = short.clone();
        none.lease_duration_seconds = None;
        o.observe(Some(&none), Some("2"), t0);
        assert_eq!(
            o.decide("a", t0 + Duration::from_secs(29)),
            Decision::Wait(Duration::from_secs(1))
        );
    }

    /// An in-memory Lease store with resourceVersion checks; calls can be made to hang or fail.
    #[derive(Default)]
    struct Fake {
        lease: Mutex<Option<Lease>>,
        version: AtomicU64,
        hang: AtomicBool,
        fail: AtomicBool,
        writes: AtomicUsize,
    }

    impl Fake {
        fn holding(spec: LeaseSpec) -> Self {
            let fake = Self::default();
            fake.store(spec);
            fake
        }

        fn store(&self, spec: LeaseSpec) {
            let rv = self.version.fetch_add(1, Ordering::SeqCst) + 1;
            *self.lease.lock().expect("lock") = Some(Lease {
                metadata: ObjectMeta {
                    name: Some("tessera".into()),
                    resource_version: Some(rv.to_string()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec),
            });
        }

        fn spec(&self) -> LeaseSpec {
            let lease = self.lease.lock().expect("lock");
            lease
                .as_ref()
                .and_then(|l| l.spec.clone())
                .expect("a lease")
        }

        async fn gate(&self) -> Result<(), kube::Error> {
            if self.hang.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            if self.fail.load(Ordering::SeqCst) {
                return Err(kube::Error::Api(
                    Status::failure("boom", "InternalError")
                        .with_code(500)
                        .boxed(),
                ));
            }
            Ok(())
        }

        fn write(&self, lease: &Lease, create: bool) -> Result<Lease, kube::Error> {
            let mut current = self.lease.lock().expect("lock");
            let matches = match (&*current, create) {
                (None, true) => true,
                (Some(c), false) => c.metadata.resource_version == lease.metadata.resource_version,
                _ => false,
            };
            if !matches {
                return Err(kube::Error::Api(
                    Status::failure("changed", "Conflict")
                        .with_code(409)
                        .boxed(),
                ));
            }
            let mut stored = lease.clone();
            let rv = self.version.fetch_add(1, Ordering::SeqCst) + 1;
            stored.metadata.resource_version = Some(rv.to_string());
            *current = Some(stored.clone());
            self.writes.fetch_add(1, Ordering::SeqCst);
            Ok(stored)
        }
    }

    impl LeaseClient for Fake {
        async fn get(&self, _name: &str) -> Result<Option<Lease>, kube::Error> {
            self.gate().await?;
            Ok(self.lease.lock().expect("lock").clone())
        }
        async fn create(&self, lease: &Lease) -> Result<Lease, kube::Error> {
            self.gate().await?;
            self.write(lease, true)
        }
        async fn replace(&self, _name: &str, lease: &Lease) -> Result<Lease, kube::Error> {
            self.gate().await?;
            self.write(lease, false)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_whose_renewals_hang_stops_within_the_renew_deadline() {
        let c = cfg("a");
        let fake = Fake::default();
        let since = acquire(&fake, &c).await;
        assert_eq!(fake.spec().holder_identity.as_deref(), Some("a"));
        fake.hang.store(true, Ordering::SeqCst);
        let lost =
            tokio::time::timeout(c.lease_duration(), renew_until_lost_since(&fake, &c, since))
                .await;
        assert_eq!(
            lost.ok(),
            Some(Lost::Deadline),
            "still leading after the lease duration"
        );
        let took = since.elapsed();
        assert!(took <= c.renew_deadline() + c.retry_period(), "{took:?}");
        assert!(took < c.lease_duration(), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_whose_renewals_fail_stops_at_the_renew_deadline() {
        let c = cfg("a");
        let fake = Fake::holding(spec("a", "2026-01-01T00:00:00Z"));
        let since = Instant::now();
        fake.fail.store(true, Ordering::SeqCst);
        assert_eq!(renew_until_lost(&fake, &c).await, Lost::Deadline);
        assert_eq!(since.elapsed(), c.renew_deadline());
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_whose_renewals_succeed_keeps_leading() {
        let c = cfg("a");
        let fake = Fake::default();
        acquire(&fake, &c).await;
        let kept = tokio::time::timeout(Duration::from_secs(60), renew_until_lost(&fake, &c)).await;
        assert!(kept.is_err(), "gave up: {kept:?}");
        // One renewal at once, then one every 2 s, besides the create.
        let writes = fake.writes.load(Ordering::SeqCst);
        assert!((30..=32).contains(&writes), "{writes} writes");
        let spec = fake.spec();
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_transitions, Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_finds_another_holder_stops_at_once() {
        let c = cfg("a");
        let fake = Fake::holding(spec("b", "2026-01-01T00:00:00Z"));
        let since = Instant::now();
        assert_eq!(renew_until_lost(&fake, &c).await, Lost::TakenBy("b".into()));
        assert_eq!(since.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_candidate_waits_out_a_stale_looking_lease_and_never_takes_a_renewed_one() {
        let c = cfg("a");
        // Held by "b", whose renewTime looks 25 years stale.
        let fake = std::sync::Arc::new(Fake::holding(spec("b", "2001-01-01T00:00:00Z")));
        let holder = {
            let fake = fake.clone();
            tokio::spawn(async move {
                for i in 0..30 {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    fake.store(spec("b", &format!("2001-01-01T00:01:{i:02}Z")));
                }
            })
        };
        let start = Instant::now();
        // While "b" renews (60 s) the candidate waits; then it takes over once the record has
        // not changed for 15 s (plus up to one jittered retry).
        acquire(&*fake, &c).await;
        let took = start.elapsed();
        holder.await.expect("holder");
        assert!(took >= Duration::from_secs(60 + 15), "{took:?}");
        // It sees the last change within one jittered retry (≤ 4.4 s) of it, and takes over at
        // the first retry after that has been unchanged for 15 s.
        assert!(
            took <= Duration::from_secs(60 + 15) + Duration::from_millis(2 * 4400),
            "{took:?}"
        );
        let spec = fake.spec();
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_transitions, Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn release_writes_an_empty_holder_and_a_successor_takes_over_at_once() {
        let a = cfg("a");
        let fake = Fake::default();
        acquire(&fake, &a).await;
        assert!(!release(&fake, &cfg("b")).await, "b does not hold it");
        let before = fake.version.load(Ordering::SeqCst).to_string();
        assert!(release(&fake, &a).await);
        let lease = fake.lease.lock().expect("lock").clone().expect("lease");
        let spec = lease.spec.clone().expect("spec");
        assert_eq!(spec.holder_identity.as_deref(), Some(""));
        assert_eq!(spec.lease_duration_seconds, Some(1));
        assert!(spec.renew_time.is_some());
        assert_eq!(spec.lease_transitions, Some(1));
        assert_ne!(lease.metadata.resource_version, Some(before));
        assert!(!release(&fake, &a).await, "already released");

        let start = Instant::now();
        acquire(&fake, &cfg("b")).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(fake.spec().lease_transitions, Some(2));
    }

    #[tokio::test(start_paused = true)]
    async fn release_is_bounded_when_the_api_hangs() {
        let c = cfg("a");
        let fake = Fake::holding(spec("a", "2026-01-01T00:00:00Z"));
        fake.hang.store(true, Ordering::SeqCst);
        let start = Instant::now();
        assert!(!release(&fake, &c).await);
        assert_eq!(start.elapsed(), c.renew_deadline());
    }
}
