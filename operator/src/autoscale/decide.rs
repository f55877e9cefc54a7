//! The autoscaling decision, pure: from per-replica load samples, the spec's `autoscaling`, the
//! current replicas, the history of earlier recommendations and the replicas that fit, to the
//! desired replicas and the reason, with numbers.
//!
//! The algorithm follows the Kubernetes HPA (v2 `behavior`):
//!
//! 1. **Usage.** Each replica leader reports a value of the tracked metric (`queueDepth` is
//!    waiting + running requests). Samples older than [`Params::stale_after_s`], absent or not
//!    finite are *missing*. The per-replica average over fresh samples is compared with the
//!    target; within the tolerance band (`|avg/target - 1| <= 10%`) nothing changes.
//! 2. **Recommendation.** Outside the band the recommendation is `ceil(sum / target)`, the
//!    fresh sum divided by the per-replica target. That is HPA's `ceil(current * avg/target)`
//!    with every replica counted, and with replicas that have no sample counted as zero load
//!    (HPA does the same for a scale-up). It is clamped to `minReplicas..=maxReplicas`.
//! 3. **Missing metrics never scale down.** With no fresh sample at all the decision holds the
//!    current replicas; with some replicas missing, a scale-down is held (a scale-up computed
//!    from the known load, missing counted as zero, may still happen).
//! 4. **Stabilization** (like HPA): the up recommendation is the *lowest* recommendation within
//!    the last `scaleUpStabilizationSeconds` (load must stay high that long), the down
//!    recommendation the *highest* within the last `scaleDownStabilizationSeconds` (load must
//!    stay low that long). The result is the current replicas moved up to the first or down to
//!    the second. Before the history began (a new deployment, a restarted operator) the
//!    recommendation counts as the current replicas, so even the first move waits for its
//!    whole window.
//! 5. **Scale-up rate.** Within any [`Params::scale_up_period_s`] (15 s) replicas grow at most
//!    to `max(2 x base, base + 4)`, `base` being the replicas at the start of the period (HPA's
//!    default scale-up policy: 100% or 4 pods per 15 s, whichever is more). Scale-down has no
//!    rate limit beyond its stabilization window.
//! 6. **Capacity.** `capacity` is the most replicas the planner can place (the placed ones plus
//!    what fits in free GPUs, trying the spec's `gpu.types` in order, so a fallback GPU type
//!    with room counts). Above it the decision stops at `max(capacity, current)`: it never
//!    removes replicas because the cluster is full, and says "wanted N, M fit". `minReplicas`
//!    wins over capacity (the planner then reports the unplaced replicas).

use std::collections::VecDeque;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::api::{AutoscalingSpec, ScalingMetric};

/// Tunables of the decision that are not in the spec.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Params {
    /// No change while `|average / target - 1|` is at most this (HPA: 0.1).
    pub tolerance: f64,
    /// Length of the scale-up rate period, seconds.
    pub scale_up_period_s: f64,
    /// Within one period replicas grow at most to `base * factor`...
    pub scale_up_factor: f64,
    /// ...or `base + add`, whichever is more.
    pub scale_up_add: u32,
    /// A sample older than this is stale (treated as missing), seconds.
    pub stale_after_s: f64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            tolerance: 0.1,
            scale_up_period_s: 15.0,
            scale_up_factor: 2.0,
            scale_up_add: 4,
            stale_after_s: 60.0,
        }
    }
}

/// One replica leader's load, as scraped from its `/metrics`. `None`: the series was absent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaSample {
    /// `tessera_requests_waiting`.
    pub waiting: Option<f64>,
    /// `tessera_requests_running`.
    pub running: Option<f64>,
    /// `tessera_kv_cache_usage_ratio`, 0..1.
    pub kv_cache_utilization: Option<f64>,
    /// Rate of `tessera_generated_tokens_total` between two scrapes.
    pub tokens_per_second: Option<f64>,
    /// Mean of `DCGM_FI_DEV_GPU_UTIL` over the leader's GPUs, as a fraction 0..1.
    pub gpu_utilization: Option<f64>,
    /// Mean time to first token of the requests between the last two scrapes, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_first_token_s: Option<f64>,
    /// Mean inter-token latency between the last two scrapes, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inter_token_latency_s: Option<f64>,
    /// Seconds since the sample was taken.
    pub age_s: f64,
    /// The pool of a disaggregated deployment the leader serves in (`prefill`, `decode`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

impl ReplicaSample {
    /// The value of `metric`, when present, finite and not negative.
    pub fn value(&self, metric: ScalingMetric) -> Option<f64> {
        let v = match metric {
            ScalingMetric::QueueDepth => match (self.waiting, self.running) {
                (Some(w), Some(r)) => Some(w + r),
                _ => None,
            },
            ScalingMetric::KvCacheUtilization => self.kv_cache_utilization,
            ScalingMetric::TokensPerSecond => self.tokens_per_second,
            ScalingMetric::GpuUtilization => self.gpu_utilization,
            // No request in the interval: no latency, and none to scale for when idle.
            ScalingMetric::TimeToFirstToken => self.time_to_first_token_s.or(self.idle()),
            ScalingMetric::InterTokenLatency => self.inter_token_latency_s.or(self.idle()),
        }?;
        (v.is_finite() && v >= 0.0).then_some(v)
    }

    /// A sample whose tracked metric is `value` (the others absent), for traces and tests.
    pub fn of(metric: ScalingMetric, value: f64) -> Self {
        let mut s = ReplicaSample::default();
        match metric {
            ScalingMetric::QueueDepth => {
                s.waiting = Some(value);
                s.running = Some(0.0);
            }
            ScalingMetric::KvCacheUtilization => s.kv_cache_utilization = Some(value),
            ScalingMetric::TokensPerSecond => s.tokens_per_second = Some(value),
            ScalingMetric::GpuUtilization => s.gpu_utilization = Some(value),
            ScalingMetric::TimeToFirstToken => s.time_to_first_token_s = Some(value),
            ScalingMetric::InterTokenLatency => s.inter_token_latency_s = Some(value),
        }
        s
    }

    /// Taken recently enough to count (`Params::stale_after_s`).
    pub fn is_fresh(&self, params: &Params) -> bool {
        self.age_s.is_finite() && self.age_s <= params.stale_after_s
    }

    /// `Some(0.0)` when the leader reports no request waiting or running.
    fn idle(&self) -> Option<f64> {
        (self.waiting == Some(0.0) && self.running == Some(0.0)).then_some(0.0)
    }
}

/// Everything one decision looks at.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    pub spec: &'a AutoscalingSpec,
    /// `spec.replicas` now.
    pub current: u32,
    /// One sample per replica leader that answered (or answered recently); replicas without an
    /// entry count as missing.
    pub samples: &'a [ReplicaSample],
    /// Most replicas that can be placed (placed ones included); `None`: not limited.
    pub capacity: Option<u32>,
    /// Seconds on any monotonic clock; the same clock as the history.
    pub now_s: f64,
}

/// What the history remembers between decisions.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct History {
    /// `(time, recommendation)`, oldest first, within the longest stabilization window.
    pub recommendations: VecDeque<(f64, u32)>,
    /// `(time, replicas added)` of recent scale-ups, within the scale-up period.
    pub scale_ups: VecDeque<(f64, u32)>,
    /// When replicas last changed.
    pub last_scale_s: Option<f64>,
    /// When the first decision was committed.
    #[serde(default)]
    pub first_s: Option<f64>,
}

impl History {
    /// Remember a decision taken at `now_s`.
    pub fn commit(&mut self, spec: &AutoscalingSpec, params: &Params, d: &Decision, now_s: f64) {
        self.first_s.get_or_insert(now_s);
        self.recommendations.push_back((now_s, d.recommendation));
        if d.replicas > d.current {
            self.scale_ups.push_back((now_s, d.replicas - d.current));
        }
        if d.replicas != d.current {
            self.last_scale_s = Some(now_s);
        }
        let keep = f64::from(
            spec.scale_up_stabilization_seconds
                .max(spec.scale_down_stabilization_seconds)
                .max(0),
        );
        while self
            .recommendations
            .front()
            .is_some_and(|&(t, _)| t <= now_s - keep && self.recommendations.len() > 1)
        {
            self.recommendations.pop_front();
        }
        while self
            .scale_ups
            .front()
            .is_some_and(|&(t, _)| t <= now_s - params.scale_up_period_s)
        {
            self.scale_ups.pop_front();
        }
    }
}

/// Why the replicas are what they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Reason {
    /// Load within the tolerance band of the target.
    WithinTolerance,
    /// Scaled up.
    ScaleUp,
    /// Scaled down.
    ScaleDown,
    /// Scaled up, but no further than the per-period rate limit.
    ScaleUpRateLimited,
    /// Load is above target, but not for the whole scale-up window yet.
    ScaleUpStabilizing,
    /// Load is below target, but not for the whole scale-down window yet.
    ScaleDownStabilizing,
    /// No fresh sample from any replica: holding.
    MetricsMissing,
    /// Some replicas have no fresh sample and the load says scale down: holding.
    MetricsPartial,
    /// Replicas were below `minReplicas`.
    BelowMinimum,
    /// Replicas were above `maxReplicas`.
    AboveMaximum,
    /// The load wants more than `maxReplicas`; at the maximum.
    AtMaximum,
    /// The load wants more replicas than the cluster can place.
    CapacityLimited,
}

impl Reason {
    /// CamelCase name, for conditions and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::WithinTolerance => "WithinTolerance",
            Reason::ScaleUp => "ScaleUp",
            Reason::ScaleDown => "ScaleDown",
            Reason::ScaleUpRateLimited => "ScaleUpRateLimited",
            Reason::ScaleUpStabilizing => "ScaleUpStabilizing",
            Reason::ScaleDownStabilizing => "ScaleDownStabilizing",
            Reason::MetricsMissing => "MetricsMissing",
            Reason::MetricsPartial => "MetricsPartial",
            Reason::BelowMinimum => "BelowMinimum",
            Reason::AboveMaximum => "AboveMaximum",
            Reason::AtMaximum => "AtMaximum",
            Reason::CapacityLimited => "CapacityLimited",
        }
    }
}

/// The outcome of one decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    /// Replicas before.
    pub current: u32,
    /// Replicas after: what to write to the scale subresource.
    pub replicas: u32,
    pub reason: Reason,
    /// For people, with the numbers.
    pub message: String,
    /// The replicas the load alone asks for (clamped to min/max), recorded in the history.
    pub recommendation: u32,
    /// What the decision would have been without the capacity limit.
    pub wanted: u32,
    /// Set when capacity stopped the decision below `wanted`.
    pub capacity_limited: bool,
    /// The capacity it was given.
    pub capacity: Option<u32>,
    /// Mean of the metric over replicas with a fresh sample.
    pub average: Option<f64>,
    /// Replicas with a fresh sample.
    pub fresh: u32,
}

pub fn metric_name(m: ScalingMetric) -> &'static str {
    match m {
        ScalingMetric::QueueDepth => "queueDepth",
        ScalingMetric::KvCacheUtilization => "kvCacheUtilization",
        ScalingMetric::TokensPerSecond => "tokensPerSecond",
        ScalingMetric::GpuUtilization => "gpuUtilization",
        ScalingMetric::TimeToFirstToken => "timeToFirstToken",
        ScalingMetric::InterTokenLatency => "interTokenLatency",
    }
}

/// `ceil(x)` that forgives floating-point noise just above an integer.
fn ceil_u32(x: f64) -> u32 {
    if !x.is_finite() || x <= 0.0 {
        return 0;
    }
    let c = (x - 1e-9).ceil();
    if c >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        c as u32
    }
}

/// Decide the replicas. Pure: the caller commits the decision to the history with
/// [`History::commit`] once it is applied (or simulated).
pub fn decide(input: &Input<'_>, history: &History, params: &Params) -> Decision {
    let spec = input.spec;
    let current = input.current;
    let min = u32::try_from(spec.min_replicas.max(1)).unwrap_or(1);
    let max = u32::try_from(spec.max_replicas.max(1))
        .unwrap_or(1)
        .max(min);
    let target = if spec.target.is_finite() && spec.target > 0.0 {
        spec.target
    } else {
        1.0
    };
    let metric = spec.metric;
    let now = input.now_s;
    let mut msg = String::new();

    // 1. Usage over fresh samples.
    let mut fresh = 0u32;
    let mut stale = 0u32;
    let mut sum = 0.0;
    for s in input.samples {
        if !s.is_fresh(params) {
            stale += 1;
            continue;
        }
        if let Some(v) = s.value(metric) {
            fresh += 1;
            sum += v;
        }
    }
    let answered = u32::try_from(input.samples.len()).unwrap_or(u32::MAX);
    let absent = current.saturating_sub(answered.min(current));
    let missing = current.saturating_sub(fresh.min(current));
    let average = (fresh > 0).then(|| sum / f64::from(fresh));

    // 2. The raw recommendation and its primary reason.
    let (mut reason, raw) = match average {
        None => {
            let _ = write!(
                msg,
                "no fresh {} sample from any of {current} replicas ({stale} stale, {absent} without a sample); holding at {current}",
                metric_name(metric)
            );
            (Reason::MetricsMissing, current)
        }
        Some(avg) => {
            let ratio = avg / target;
            let _ = write!(
                msg,
                "{} {avg:.3} per replica over {fresh} of {current} replicas is {:.0}% of target {target}",
                metric_name(metric),
                ratio * 100.0
            );
            if (ratio - 1.0).abs() <= params.tolerance {
                let _ = write!(
                    msg,
                    " (within the {:.0}% tolerance); holding at {current}",
                    params.tolerance * 100.0
                );
                (Reason::WithinTolerance, current)
            } else {
                let want = ceil_u32(sum / target);
                if ratio < 1.0 && missing > 0 {
                    let _ = write!(
                        msg,
                        "; {missing} replicas have no fresh sample, so no scale-down; holding at {current}"
                    );
                    (Reason::MetricsPartial, current)
                } else if ratio > 1.0 && want <= current {
                    // Missing replicas counted as zero cancel the scale-up.
                    let _ = write!(
                        msg,
                        "; with the {missing} replicas without a sample counted as idle that is {want} replicas; holding at {current}"
                    );
                    (Reason::WithinTolerance, current)
                } else {
                    let _ = write!(msg, "; the load asks for {want} replicas");
                    if want > current {
                        (Reason::ScaleUp, want)
                    } else {
                        (Reason::ScaleDown, want)
                    }
                }
            }
        }
    };
    let mut recommendation = raw.clamp(min, max);
    if raw > max {
        if current >= max {
            reason = Reason::AtMaximum;
        }
        let _ = write!(msg, "; maxReplicas is {max}");
    }
    if reason == Reason::MetricsMissing || reason == Reason::MetricsPartial {
        // Hold: remember "current" so that no scale-down follows right after the gap.
        recommendation = current.clamp(min, max);
    }

    // 3. Stabilization windows (HPA): lowest recent recommendation for up, highest for down.
    let in_window = |secs: i32| {
        let w = f64::from(secs.max(0));
        history
            .recommendations
            .iter()
            .filter(move |&&(t, _)| t > now - w)
            .map(|&(_, r)| r)
    };
    // Before the history began (a new deployment or a restarted operator) the recommendation
    // counts as "current", so even the first move waits for its whole window.
    let seed = |secs: i32| {
        let w = f64::from(secs.max(0));
        (w > 0.0 && history.first_s.is_none_or(|f| f > now - w)).then_some(current)
    };
    let up_rec = in_window(spec.scale_up_stabilization_seconds)
        .chain(seed(spec.scale_up_stabilization_seconds))
        .fold(recommendation, u32::min);
    let down_rec = in_window(spec.scale_down_stabilization_seconds)
        .chain(seed(spec.scale_down_stabilization_seconds))
        .fold(recommendation, u32::max);
    let mut next = current;
    if next < up_rec {
        next = up_rec;
    }
    if next > down_rec {
        next = down_rec;
    }
    if recommendation > current && next < recommendation {
        if next == current {
            reason = Reason::ScaleUpStabilizing;
        }
        let _ = write!(
            msg,
            "; lowest recommendation in the last {} s is {up_rec}",
            spec.scale_up_stabilization_seconds
        );
    } else if recommendation < current && next > recommendation {
        if next == current {
            reason = Reason::ScaleDownStabilizing;
        }
        let _ = write!(
            msg,
            "; highest recommendation in the last {} s is {down_rec}",
            spec.scale_down_stabilization_seconds
        );
    }

    // 4. Scale-up rate limit per period.
    if next > current {
        let added: u32 = history
            .scale_ups
            .iter()
            .filter(|&&(t, _)| t > now - params.scale_up_period_s)
            .map(|&(_, n)| n)
            .sum();
        let base = current.saturating_sub(added).max(1);
        let by_factor = ceil_u32(f64::from(base) * params.scale_up_factor);
        let limit = by_factor.max(base.saturating_add(params.scale_up_add));
        if next > limit {
            next = limit.max(current);
            reason = Reason::ScaleUpRateLimited;
            let _ = write!(
                msg,
                "; scale-up limited to {limit} in this {} s period (from {base}: x{} or +{})",
                params.scale_up_period_s, params.scale_up_factor, params.scale_up_add
            );
        }
    }

    // 5. Bounds of the spec win over windows and rates.
    if next < min || (current < min && next == min) {
        reason = Reason::BelowMinimum;
        let _ = write!(msg, "; minReplicas is {min}");
        next = min;
    } else if next > max || (current > max && next == max) {
        reason = Reason::AboveMaximum;
        let _ = write!(msg, "; maxReplicas is {max}");
        next = max;
    }

    // 6. Capacity.
    let wanted = next;
    let mut capacity_limited = false;
    if let Some(cap) = input.capacity
        && next > cap
        && next > current.min(next).max(cap).max(min)
    {
        let limited = current.min(next).max(cap).max(min);
        capacity_limited = true;
        reason = Reason::CapacityLimited;
        let _ = write!(
            msg,
            "; wanted {wanted} replicas, {cap} fit in the cluster (allowed GPU types included)"
        );
        next = limited;
    }

    match reason {
        Reason::ScaleUp | Reason::ScaleDown if next == current => {
            reason = Reason::WithinTolerance;
        }
        _ => {}
    }
    if next != current {
        let _ = write!(msg, "; {current} -> {next}");
    } else if !msg.contains("holding") {
        let _ = write!(msg, "; holding at {current}");
    }
    Decision {
        current,
        replicas: next,
        reason,
        message: msg,
        recommendation,
        wanted,
        capacity_limited,
        capacity: input.capacity,
        average,
        fresh,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(min: i32, max: i32, target: f64, up: i32, down: i32) -> AutoscalingSpec {
        AutoscalingSpec {
            enabled: true,
            min_replicas: min,
            max_replicas: max,
            metric: ScalingMetric::QueueDepth,
            target,
            scale_up_stabilization_seconds: up,
            scale_down_stabilization_seconds: down,
            prefill: None,
            decode: None,
        }
    }

    fn samples(n: u32, each: f64) -> Vec<ReplicaSample> {
        (0..n)
            .map(|_| ReplicaSample::of(ScalingMetric::QueueDepth, each))
            .collect()
    }

    fn run(
        sp: &AutoscalingSpec,
        h: &mut History,
        current: u32,
        s: &[ReplicaSample],
        cap: Option<u32>,
        now: f64,
    ) -> Decision {
        let p = Params::default();
        let d = decide(
            &Input {
                spec: sp,
                current,
                samples: s,
                capacity: cap,
                now_s: now,
            },
            h,
            &p,
        );
        h.commit(sp, &p, &d, now);
        d
    }

    #[test]
    fn within_tolerance_holds() {
        let sp = spec(1, 10, 16.0, 0, 0);
        let d = run(
            &sp,
            &mut History::default(),
            2,
            &samples(2, 17.0),
            None,
            0.0,
        );
        assert_eq!(d.replicas, 2);
        assert_eq!(d.reason, Reason::WithinTolerance);
    }

    #[test]
    fn scales_up_to_ceil_of_load_over_target() {
        let sp = spec(1, 10, 16.0, 0, 300);
        let d = run(
            &sp,
            &mut History::default(),
            2,
            &samples(2, 40.0),
            None,
            0.0,
        );
        assert_eq!(d.replicas, 5, "{}", d.message);
        assert_eq!(d.reason, Reason::ScaleUp);
        assert!(d.message.contains("2 -> 5"), "{}", d.message);
    }

    #[test]
    fn scale_up_waits_for_its_window_then_follows_the_lowest() {
        let sp = spec(1, 10, 10.0, 30, 300);
        let mut h = History::default();
        let d = run(&sp, &mut h, 2, &samples(2, 10.0), None, 0.0);
        assert_eq!((d.replicas, d.reason), (2, Reason::WithinTolerance));
        let d = run(&sp, &mut h, 2, &samples(2, 30.0), None, 15.0);
        assert_eq!((d.replicas, d.reason), (2, Reason::ScaleUpStabilizing));
        assert!(d.message.contains("lowest recommendation"), "{}", d.message);
        // 30 s after the last low sample: the lowest in the window is 4 (now), 6 before.
        let d = run(&sp, &mut h, 2, &samples(2, 20.0), None, 30.0);
        assert_eq!(
            (d.replicas, d.reason),
            (4, Reason::ScaleUp),
            "{}",
            d.message
        );
    }

    #[test]
    fn scale_down_only_after_the_window() {
        let sp = spec(1, 10, 10.0, 0, 60);
        let mut h = History::default();
        assert_eq!(
            run(&sp, &mut h, 4, &samples(4, 10.0), None, 0.0).replicas,
            4
        );
        let d = run(&sp, &mut h, 4, &samples(4, 2.0), None, 30.0);
        assert_eq!((d.replicas, d.reason), (4, Reason::ScaleDownStabilizing));
        assert_eq!(
            run(&sp, &mut h, 4, &samples(4, 2.0), None, 59.0).replicas,
            4
        );
        let d = run(&sp, &mut h, 4, &samples(4, 2.0), None, 60.0);
        assert_eq!(
            (d.replicas, d.reason),
            (1, Reason::ScaleDown),
            "{}",
            d.message
        );
    }

    #[test]
    fn missing_or_stale_metrics_hold() {
        let sp = spec(1, 10, 10.0, 0, 0);
        let mut h = History::default();
        let d = run(&sp, &mut h, 5, &[], None, 0.0);
        assert_eq!((d.replicas, d.reason), (5, Reason::MetricsMissing));
        let mut old = samples(5, 0.0);
        for s in &mut old {
            s.age_s = 600.0;
        }
        let d = run(&sp, &mut h, 5, &old, None, 10.0);
        assert_eq!((d.replicas, d.reason), (5, Reason::MetricsMissing));
        assert!(d.message.contains("5 stale"), "{}", d.message);
        // Two of five answered with low load: still no scale-down.
        let d = run(&sp, &mut h, 5, &samples(2, 1.0), None, 20.0);
        assert_eq!((d.replicas, d.reason), (5, Reason::MetricsPartial));
    }

    #[test]
    fn rate_limit_doubles_or_adds_four() {
        let sp = spec(1, 100, 1.0, 0, 300);
        let mut h = History::default();
        let d = run(&sp, &mut h, 2, &samples(2, 50.0), None, 0.0);
        assert_eq!((d.replicas, d.reason), (6, Reason::ScaleUpRateLimited));
        // Same period: no further growth beyond 6 (base 2).
        let d = run(&sp, &mut h, 6, &samples(6, 20.0), None, 10.0);
        assert_eq!(d.replicas, 6, "{}", d.message);
        // Next period: from 6 to 12.
        let d = run(&sp, &mut h, 6, &samples(6, 20.0), None, 15.0);
        assert_eq!(d.replicas, 12, "{}", d.message);
    }

    #[test]
    fn capacity_limits_and_says_so() {
        let sp = spec(1, 10, 10.0, 0, 300);
        let d = run(
            &sp,
            &mut History::default(),
            4,
            &samples(4, 20.0),
            Some(5),
            0.0,
        );
        assert_eq!((d.replicas, d.reason), (5, Reason::CapacityLimited));
        assert!(d.capacity_limited);
        assert_eq!(d.wanted, 8);
        assert!(
            d.message.contains("wanted 8 replicas, 5 fit"),
            "{}",
            d.message
        );
        // Capacity below current never removes replicas.
        let d = run(
            &sp,
            &mut History::default(),
            4,
            &samples(4, 20.0),
            Some(2),
            0.0,
        );
        assert_eq!(d.replicas, 4);
        assert!(d.capacity_limited);
    }

    #[test]
    fn bounds_win() {
        let sp = spec(3, 5, 10.0, 0, 0);
        let d = run(&sp, &mut History::default(), 1, &[], None, 0.0);
        assert_eq!((d.replicas, d.reason), (3, Reason::BelowMinimum));
        let d = run(
            &sp,
            &mut History::default(),
            9,
            &samples(9, 10.0),
            None,
            0.0,
        );
        assert_eq!((d.replicas, d.reason), (5, Reason::AboveMaximum));
        let d = run(
            &sp,
            &mut History::default(),
            5,
            &samples(5, 100.0),
            None,
            0.0,
        );
        assert_eq!((d.replicas, d.reason), (5, Reason::AtMaximum));
    }
}
