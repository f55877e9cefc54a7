//! Leader election on a `coordination.k8s.io/v1` Lease, so only one operator replica writes.
//!
//! kube-runtime has no elector; this one follows client-go's protocol: the holder renews the
//! Lease every `duration / 3`; a candidate takes it over only once `renewTime +
//! leaseDurationSeconds` has passed; every write is a replace with the read `resourceVersion`,
//! so two candidates can never both win (the loser gets a 409). A leader that cannot renew in
//! time stops (the process exits and restarts as a candidate) rather than risk two writers.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};

/// Settings of the elector.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub lease_duration: Duration,
}

/// What to do with a Lease as found, for `identity` at `now`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it, it expired, or we hold it: write ourselves in.
    Take { transition: bool },
    /// Someone else holds a live Lease; look again after this long.
    Wait(Duration),
}

/// Pure: decide from the Lease's spec.
pub fn decide(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> Decision {
    let Some(spec) = spec else {
        return Decision::Take { transition: true };
    };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder == identity {
        return Decision::Take { transition: false };
    }
    if holder.is_empty() {
        return Decision::Take { transition: true };
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    let renewed = spec
        .renew_time
        .as_ref()
        .map(|t| t.0)
        .unwrap_or(Timestamp::UNIX_EPOCH);
    let expires = renewed.checked_add(duration).unwrap_or(Timestamp::MAX);
    if now >= expires {
        Decision::Take { transition: true }
    } else {
        let left = expires.duration_since(now);
        Decision::Wait(Duration::from_millis(
            left.as_millis().clamp(100, 60_000) as u64
        ))
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
        lease_duration_seconds: Some(i32::try_from(cfg.lease_duration.as_secs()).unwrap_or(15)),
        acquire_time: if transition {
            Some(MicroTime(now))
        } else {
            old.and_then(|s| s.acquire_time.clone())
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if transition {
            transitions + 1
        } else {
            transitions
        }),
        ..LeaseSpec::default()
    }
}

/// One attempt to take or renew the Lease. Ok(true) when we hold it afterwards.
pub async fn try_acquire(
    api: &Api<Lease>,
    cfg: &LeaderConfig,
) -> Result<Result<(), Duration>, kube::Error> {
    let now = Timestamp::now();
    let current = api.get_opt(&cfg.name).await?;
    let decision = decide(
        current.as_ref().and_then(|l| l.spec.as_ref()),
        &cfg.identity,
        now,
    );
    let transition = match decision {
        Decision::Wait(d) => return Ok(Err(d)),
        Decision::Take { transition } => transition,
    };
    let spec = lease_spec(
        cfg,
        current.as_ref().and_then(|l| l.spec.as_ref()),
        transition,
        now,
    );
    let result = match current {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec),
            };
            api.create(&PostParams::default(), &lease).await.map(|_| ())
        }
        Some(mut lease) => {
            // Replace with the resourceVersion we read: a concurrent writer makes this a 409.
            lease.spec = Some(spec);
            api.replace(&cfg.name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        }
    };
    match result {
        Ok(()) => Ok(Ok(())),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Err(Duration::from_secs(1))),
        Err(e) => Err(e),
    }
}

/// Block until this process holds the Lease.
pub async fn acquire(api: &Api<Lease>, cfg: &LeaderConfig) {
    loop {
        match try_acquire(api, cfg).await {
            Ok(Ok(())) => {
                tracing::info!(lease = %cfg.name, identity = %cfg.identity, "became the leader");
                return;
            }
            Ok(Err(wait)) => {
                tracing::debug!(lease = %cfg.name, wait_ms = wait.as_millis() as u64, "another replica leads");
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                tracing::warn!(lease = %cfg.name, error = %e, "leader election failed; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

/// Renew the Lease until renewal fails for longer than the lease duration; then return, and
/// the caller must stop writing.
pub async fn renew_until_lost(api: &Api<Lease>, cfg: &LeaderConfig) {
    let period = cfg.lease_duration / 3;
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(period).await;
        match try_acquire(api, cfg).await {
            Ok(Ok(())) => last_ok = tokio::time::Instant::now(),
            Ok(Err(_)) => {
                tracing::error!(lease = %cfg.name, "another replica took the lease");
                return;
            }
            Err(e) => tracing::warn!(lease = %cfg.name, error = %e, "renewing the lease failed"),
        }
        if last_ok.elapsed() >= cfg.lease_duration {
            tracing::error!(lease = %cfg.name, "could not renew the lease in time");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed: &str) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(renewed.parse().expect("time"))),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn takes_a_free_or_expired_lease_and_waits_for_a_live_one() {
        let now: Timestamp = "2026-01-01T00:00:20Z".parse().expect("time");
        assert_eq!(decide(None, "a", now), Decision::Take { transition: true });
        assert_eq!(
            decide(Some(&spec("a", "2026-01-01T00:00:19Z")), "a", now),
            Decision::Take { transition: false }
        );
        assert_eq!(
            decide(Some(&spec("b", "2026-01-01T00:00:04Z")), "a", now),
            Decision::Take { transition: true }
        );
        assert_eq!(
            decide(Some(&spec("b", "2026-01-01T00:00:10Z")), "a", now),
            Decision::Wait(Duration::from_secs(5))
        );
    }
}
