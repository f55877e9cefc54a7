//! Autoscaler benchmark (docs/autoscaling.md): one decision pass over 1,000 deployments,
//! each with 1..=8 replicas reporting, followed by arbitration of the free GPUs between those
//! that want to grow. Target: at most 10 ms.
//!
//! Run: `cargo bench -p tessera-operator --bench autoscale`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use tessera_operator::api::{AutoscalingSpec, ScalingMetric};
use tessera_operator::autoscale::arbitrate::{Claim, arbitrate};
use tessera_operator::autoscale::decide::{History, Input, Params, ReplicaSample, decide};
use tessera_operator::planner::synthetic::Rng;

struct Dep {
    spec: AutoscalingSpec,
    priority: i32,
    current: u32,
    samples: Vec<ReplicaSample>,
    history: History,
}

fn fleet(n: usize) -> Vec<Dep> {
    let mut rng = Rng::new(6);
    let params = Params::default();
    (0..n)
        .map(|_| {
            let spec = AutoscalingSpec {
                enabled: true,
                min_replicas: 1,
                max_replicas: 16,
                metric: ScalingMetric::QueueDepth,
                target: 16.0,
                scale_up_stabilization_seconds: 30,
                scale_down_stabilization_seconds: 300,
                prefill: None,
                decode: None,
            };
            let current = 1 + rng.below(8) as u32;
            let per = rng.below(48) as f64;
            let samples = (0..current)
                .map(|_| ReplicaSample::of(ScalingMetric::QueueDepth, per))
                .collect();
            // A full history: 20 earlier decisions, one every 15 s (a 300 s window).
            let mut history = History::default();
            for k in 0..20 {
                let t = f64::from(k) * 15.0;
                let s: Vec<ReplicaSample> = (0..current)
                    .map(|_| ReplicaSample::of(ScalingMetric::QueueDepth, per))
                    .collect();
                let d = decide(
                    &Input {
                        spec: &spec,
                        current,
                        samples: &s,
                        capacity: None,
                        now_s: t,
                    },
                    &history,
                    &params,
                );
                let mut d = d;
                d.replicas = current; // keep the fleet where it is
                history.commit(&spec, &params, &d, t);
            }
            Dep {
                spec,
                priority: rng.below(5) as i32 - 2,
                current,
                samples,
                history,
            }
        })
        .collect()
}

fn pass(fleet: &[Dep], params: &Params) -> (u32, Vec<u32>) {
    let now = 300.0;
    let decisions: Vec<_> = fleet
        .iter()
        .map(|d| {
            decide(
                &Input {
                    spec: &d.spec,
                    current: d.current,
                    samples: &d.samples,
                    capacity: None,
                    now_s: now,
                },
                &d.history,
                params,
            )
        })
        .collect();
    let claims: Vec<Claim> = fleet
        .iter()
        .zip(&decisions)
        .filter(|(_, d)| d.replicas > d.current)
        .map(|(f, d)| Claim {
            priority: f.priority,
            running: d.current,
            wanted: d.replicas,
            gpus_per_replica: 2,
            ratio: d.average.unwrap_or(0.0) / f.spec.target,
        })
        .collect();
    let grants = arbitrate(&claims, 1_000);
    (decisions.iter().map(|d| d.replicas).sum(), grants)
}

fn bench(c: &mut Criterion) {
    let fleet = fleet(1_000);
    let params = Params::default();
    let (total, grants) = pass(&fleet, &params);
    eprintln!(
        "fleet: 1000 deployments, {} replicas now, {total} wanted, {} claims for 1000 free GPUs",
        fleet.iter().map(|d| d.current).sum::<u32>(),
        grants.len()
    );
    let mut g = c.benchmark_group("autoscale");
    g.bench_function("decide_and_arbitrate_1000_deployments", |b| {
        b.iter(|| pass(black_box(&fleet), black_box(&params)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
