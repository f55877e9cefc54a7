//! Properties of the autoscaling decision (docs/autoscaling.md): replicas stay within
//! min..max and within capacity, missing or stale metrics never scale down, and the direction
//! changes at most once per stabilization window.

use proptest::prelude::*;
use tessera_operator::api::{AutoscalingSpec, ScalingMetric};
use tessera_operator::autoscale::decide::{History, Input, Params, ReplicaSample, decide};

#[derive(Clone, Debug)]
struct Tick {
    dt: f64,
    /// Per-replica load; `None`: no replica answers.
    load: Option<f64>,
    /// Fraction of replicas that answer (0..=1).
    answered: f64,
    stale: bool,
    capacity: Option<u32>,
}

fn tick() -> impl Strategy<Value = Tick> {
    (
        prop_oneof![Just(15.0), 1.0f64..60.0],
        prop_oneof![3 => (0.0f64..200.0).prop_map(Some), 1 => Just(None)],
        prop_oneof![3 => Just(1.0), 1 => 0.0f64..1.0],
        prop::bool::weighted(0.1),
        prop_oneof![3 => Just(None), 1 => (0u32..20).prop_map(Some)],
    )
        .prop_map(|(dt, load, answered, stale, capacity)| Tick {
            dt,
            load,
            answered,
            stale,
            capacity,
        })
}

fn spec() -> impl Strategy<Value = AutoscalingSpec> {
    (1i32..6, 0i32..16, 0.5f64..50.0, 0i32..120, 0i32..600).prop_map(
        |(min, extra, target, up, down)| AutoscalingSpec {
            enabled: true,
            min_replicas: min,
            max_replicas: min + extra,
            metric: ScalingMetric::QueueDepth,
            target,
            scale_up_stabilization_seconds: up,
            scale_down_stabilization_seconds: down,
            prefill: None,
            decode: None,
        },
    )
}

struct Step {
    t: f64,
    previous: u32,
    replicas: u32,
    tick: Tick,
}

fn replay(sp: &AutoscalingSpec, start: u32, ticks: &[Tick]) -> Vec<Step> {
    let params = Params::default();
    let mut h = History::default();
    let mut current = start;
    let mut t = 0.0;
    let mut out = Vec::new();
    for tk in ticks {
        t += tk.dt;
        let n = ((f64::from(current) * tk.answered).floor() as u32).min(current);
        let samples: Vec<ReplicaSample> = match tk.load {
            Some(v) => (0..n)
                .map(|_| {
                    let mut s = ReplicaSample::of(ScalingMetric::QueueDepth, v);
                    if tk.stale {
                        s.age_s = params.stale_after_s + 1.0;
                    }
                    s
                })
                .collect(),
            None => Vec::new(),
        };
        let d = decide(
            &Input {
                spec: sp,
                current,
                samples: &samples,
                capacity: tk.capacity,
                now_s: t,
            },
            &h,
            &params,
        );
        h.commit(sp, &params, &d, t);
        out.push(Step {
            t,
            previous: current,
            replicas: d.replicas,
            tick: tk.clone(),
        });
        current = d.replicas;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn replicas_stay_within_min_max_and_capacity(
        sp in spec(),
        start_frac in 0.0f64..1.0,
        ticks in prop::collection::vec(tick(), 1..60),
    ) {
        let min = sp.min_replicas as u32;
        let max = sp.max_replicas as u32;
        let start = min + ((f64::from(max - min)) * start_frac).round() as u32;
        for s in replay(&sp, start, &ticks) {
            prop_assert!(s.replicas >= min && s.replicas <= max,
                "{} outside {min}..={max}", s.replicas);
            if let Some(cap) = s.tick.capacity && s.replicas > s.previous {
                // A scale-up never goes past what fits (minReplicas aside).
                prop_assert!(s.replicas <= cap.max(min),
                    "scaled {} -> {} with capacity {cap}", s.previous, s.replicas);
            }
        }
    }

    #[test]
    fn missing_or_stale_metrics_never_scale_down(
        sp in spec(),
        start_frac in 0.0f64..1.0,
        ticks in prop::collection::vec(tick(), 1..60),
    ) {
        let min = sp.min_replicas as u32;
        let max = sp.max_replicas as u32;
        let start = min + ((f64::from(max - min)) * start_frac).round() as u32;
        for s in replay(&sp, start, &ticks) {
            let all_answer = s.tick.load.is_some() && !s.tick.stale
                && ((f64::from(s.previous) * s.tick.answered).floor() as u32) >= s.previous;
            if !all_answer {
                prop_assert!(s.replicas >= s.previous,
                    "scaled down {} -> {} at t={} without metrics from every replica",
                    s.previous, s.replicas, s.t);
            }
        }
    }

    #[test]
    fn at_most_one_direction_change_per_stabilization_window(
        sp in spec(),
        start_frac in 0.0f64..1.0,
        ticks in prop::collection::vec(tick(), 1..80),
    ) {
        let min = sp.min_replicas as u32;
        let max = sp.max_replicas as u32;
        let start = min + ((f64::from(max - min)) * start_frac).round() as u32;
        let mut last: Option<(f64, bool)> = None;
        for s in replay(&sp, start, &ticks) {
            if s.replicas == s.previous {
                continue;
            }
            let up = s.replicas > s.previous;
            if let Some((t0, was_up)) = last && was_up != up {
                let window = f64::from(if up {
                    sp.scale_up_stabilization_seconds
                } else {
                    sp.scale_down_stabilization_seconds
                });
                prop_assert!(s.t - t0 >= window,
                    "{} at t={} only {} s after the opposite change (window {window} s)",
                    if up { "scale-up" } else { "scale-down" }, s.t, s.t - t0);
            }
            last = Some((s.t, up));
        }
    }
}
