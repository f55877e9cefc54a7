//! One autoscaling pass over many deployments, pure: decide each, ask the planner how many
//! replicas fit, arbitrate the free GPUs between deployments that want more, decide again
//! within those limits, and compute the `ScalingLimited` condition.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use super::arbitrate::{Claim, arbitrate};
use super::decide::{Decision, History, Input, Params, ReplicaSample, decide};
use crate::api::{AutoscalingSpec, ModelDeployment, ScalingMetric, whole_units};
use crate::planner::inventory::Inventory;
use crate::planner::{PlanOptions, plan};

/// Type of the condition the autoscaler owns.
pub const CONDITION: &str = "ScalingLimited";

/// How many replicas of `md` can be placed: the `placed` ones plus as many new replicas (up
/// to `autoscaling.maxReplicas`) as the planner fits into the free GPUs of `inv`. The planner
/// tries every feasible layout of the spec's `gpu.types` in order of preference, so a fallback
/// GPU type with room counts. `inv` must count every pod's GPUs (this deployment's included).
pub fn capacity(inv: &Inventory, md: &ModelDeployment, placed: u32, opts: &PlanOptions) -> u32 {
    let max = md
        .spec
        .autoscaling
        .as_ref()
        .map_or(md.spec.replicas, |a| a.max_replicas)
        .max(0) as u32;
    if placed >= max {
        return placed;
    }
    let mut probe = md.clone();
    probe.spec.replicas = i32::try_from(max - placed).unwrap_or(i32::MAX);
    probe.status = None;
    let p = plan(inv, std::slice::from_ref(&probe), &[], opts);
    let Some(d) = p.deployments.first() else {
        return placed;
    };
    // Pools: `placed` and the answer count whole units of both pools.
    let more = match d.disaggregation.as_ref().filter(|x| x.disaggregated) {
        Some(x) if running_pools(md).is_some() => whole_units(
            &x.pools,
            probe.spec.replicas,
            d.placed.iter().map(|r| r.role.as_deref()),
        )
        .max(0) as u32,
        // Running pools the probe would not run now: replicas over the unit's size.
        _ => match running_pools(md) {
            Some(pools) => {
                d.placed.len() as u32 / pools.iter().map(|(_, n, _)| n).sum::<u32>().max(1)
            }
            None => d.placed.len() as u32,
        },
    };
    placed + more
}

/// Pods as the inventory should count them: unbound pods that the operator pinned to a node
/// (required node affinity with one node) count on that node.
pub fn pods_for_inventory(pods: &[Pod]) -> Vec<Pod> {
    pods.iter()
        .map(|p| {
            let mut p = p.clone();
            let pinned = crate::controller::reconcile::pinned_node(&p).map(str::to_owned);
            if let Some(spec) = p.spec.as_mut()
                && spec.node_name.is_none()
            {
                spec.node_name = pinned;
            }
            p
        })
        .collect()
}

/// One deployment's input to a pass.
#[derive(Clone, Debug)]
pub struct Target<'a> {
    pub md: &'a ModelDeployment,
    pub samples: Vec<ReplicaSample>,
}

/// `namespace/name`.
pub fn key(md: &ModelDeployment) -> String {
    format!(
        "{}/{}",
        md.metadata.namespace.as_deref().unwrap_or("default"),
        md.metadata.name.as_deref().unwrap_or("")
    )
}

fn current_of(md: &ModelDeployment) -> u32 {
    md.spec.replicas.max(0) as u32
}

/// The pools of a deployment whose prefill/decode pools run: (role, replicas per unit, GPUs
/// per replica) each. `spec.replicas` counts units of the pools' ratio, so the autoscaler
/// scales units.
fn running_pools(md: &ModelDeployment) -> Option<Vec<(String, u32, u32)>> {
    let st = md.status.as_ref()?;
    if !st.placements.iter().any(|p| p.role.is_some()) || st.pools.is_empty() {
        return None;
    }
    Some(
        st.pools
            .iter()
            .map(|p| {
                (
                    p.role.clone(),
                    p.per_unit(md.spec.replicas) as u32,
                    (p.tensor_parallel.max(1) * p.pipeline_parallel.max(1)) as u32,
                )
            })
            .collect(),
    )
}

/// GPUs one more replica (one more unit of both pools, when they run) takes.
fn gpus_per_replica(md: &ModelDeployment) -> u32 {
    if let Some(pools) = running_pools(md) {
        return pools.iter().map(|(_, n, g)| n * g).sum();
    }
    let st = md.status.as_ref();
    let tp = st.and_then(|s| s.tensor_parallel).unwrap_or(1).max(1);
    let pp = st.and_then(|s| s.pipeline_parallel).unwrap_or(1).max(1);
    (tp * pp) as u32
}

/// Replicas in the autoscaler's unit: placed replicas, or whole units of both pools.
fn placed_of(md: &ModelDeployment) -> u32 {
    let Some(st) = md.status.as_ref() else {
        return 0;
    };
    match running_pools(md) {
        None => st.placements.len() as u32,
        Some(_) => whole_units(
            &st.pools,
            md.spec.replicas,
            st.placements.iter().map(|p| p.role.as_deref()),
        )
        .max(0) as u32,
    }
}

/// What pool `role` scales on: `autoscaling.prefill` / `.decode`; else the SLO's time to first
/// token (prefill) or inter-token latency (decode); else the deployment's metric and target.
pub fn pool_scaling(md: &ModelDeployment, role: &str) -> Option<(ScalingMetric, f64)> {
    let a = md.spec.autoscaling.as_ref()?;
    let slo = md.spec.serving.slo.as_ref();
    let chosen = match role {
        "prefill" => a.prefill.map(|p| (p.metric.into(), p.target)).or_else(|| {
            slo.and_then(|s| s.time_to_first_token_seconds)
                .map(|t| (ScalingMetric::TimeToFirstToken, t))
        }),
        "decode" => a.decode.map(|p| (p.metric.into(), p.target)).or_else(|| {
            slo.and_then(|s| s.inter_token_latency_seconds)
                .map(|t| (ScalingMetric::InterTokenLatency, t))
        }),
        _ => None,
    };
    Some(chosen.unwrap_or((a.metric, a.target)))
}

/// A decision in units for a deployment whose pools run: each pool's mean of its own signal
/// ([`pool_scaling`]) over its fresh leaders against its target, and the pool that is the
/// most loaded for its target speaks for the unit (prefill pressed by long prompts, decode by
/// many long answers; a unit grows both at the planned ratio). Returned as the spec and the
/// samples [`decide`] reads: that pool's metric and target, and `current` samples of its mean,
/// as many fresh as the pool's share of fresh leaders (so the proportional rule counts units,
/// and a pool missing samples still holds a scale-down), with the note that goes before the
/// decision's message.
fn unit_samples(
    md: &ModelDeployment,
    samples: &[ReplicaSample],
    params: &Params,
) -> Option<(AutoscalingSpec, Vec<ReplicaSample>, String)> {
    let pools = running_pools(md)?;
    let spec = md.spec.autoscaling.as_ref()?;
    let current = current_of(md);
    // (load ratio, role, metric, target, mean, share of leaders fresh)
    let mut lead: Option<(f64, &str, ScalingMetric, f64, f64, f64)> = None;
    let mut parts = Vec::new();
    for (role, per_unit, _) in &pools {
        let (metric, target) = pool_scaling(md, role)?;
        let target = if target.is_finite() && target > 0.0 {
            target
        } else {
            1.0
        };
        let values: Vec<f64> = samples
            .iter()
            .filter(|s| s.pool.as_deref() == Some(role.as_str()))
            .filter(|s| s.is_fresh(params))
            .filter_map(|s| s.value(metric))
            .collect();
        let name = crate::autoscale::decide::metric_name(metric);
        if values.is_empty() {
            parts.push(format!("{role} {name}: no fresh sample"));
            continue;
        }
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let ratio = mean / target;
        parts.push(format!(
            "{role} {name} {mean:.3} over {} leaders is {:.0}% of {target}",
            values.len(),
            ratio * 100.0
        ));
        let share = (values.len() as f64 / f64::from(per_unit * current.max(1))).min(1.0);
        if lead.is_none_or(|l| ratio > l.0) {
            lead = Some((ratio, role.as_str(), metric, target, mean, share));
        }
    }
    let unit = pools
        .iter()
        .map(|(r, n, _)| format!("{n} {r}"))
        .collect::<Vec<_>>()
        .join(" + ");
    let Some((_, role, metric, target, mean, share)) = lead else {
        return Some((
            spec.clone(),
            Vec::new(),
            format!("pools scale in units ({unit}); {}: ", parts.join("; ")),
        ));
    };
    let fresh = ((f64::from(current) * share).round() as u32).min(current);
    let out = (0..current)
        .map(|i| {
            let mut s = ReplicaSample::of(metric, mean);
            if i >= fresh {
                s.age_s = f64::INFINITY;
            }
            s
        })
        .collect();
    let mut lead_spec = spec.clone();
    lead_spec.metric = metric;
    lead_spec.target = target;
    Some((
        lead_spec,
        out,
        format!(
            "pools scale in units ({unit}); {}; the {role} pool leads, per unit: ",
            parts.join("; ")
        ),
    ))
}

/// Decide every target. Deployments without `autoscaling.enabled` are skipped. With an
/// inventory, scale-ups are limited to what the planner can place, and when the free GPUs do
/// not cover every scale-up they are split by [`arbitrate`] (priority, then load ratio).
pub fn decide_pass(
    targets: &[Target<'_>],
    histories: &HashMap<String, History>,
    inv: Option<&Inventory>,
    params: &Params,
    opts: &PlanOptions,
    now_s: f64,
) -> Vec<(String, Decision)> {
    let empty = History::default();
    let enabled: Vec<&Target<'_>> = targets
        .iter()
        .filter(|t| t.md.spec.autoscaling.as_ref().is_some_and(|a| a.enabled))
        .collect();
    // Deployments whose pools run decide in units, on the pool that leads.
    let units: Vec<Option<(AutoscalingSpec, Vec<ReplicaSample>, String)>> = enabled
        .iter()
        .map(|t| unit_samples(t.md, &t.samples, params))
        .collect();
    let samples_of = |i: usize| -> &[ReplicaSample] {
        units[i]
            .as_ref()
            .map_or(&enabled[i].samples[..], |(_, s, _)| &s[..])
    };
    let spec_of = |i: usize| -> &AutoscalingSpec {
        units[i].as_ref().map_or_else(
            || enabled[i].md.spec.autoscaling.as_ref().expect("filtered"),
            |(spec, _, _)| spec,
        )
    };
    let noted = |i: usize, mut d: Decision| {
        if let Some((_, _, note)) = &units[i] {
            d.message = format!("{note}{}", d.message);
        }
        d
    };
    let first: Vec<Decision> = enabled
        .iter()
        .enumerate()
        .map(|(i, t)| {
            decide(
                &Input {
                    spec: spec_of(i),
                    current: current_of(t.md),
                    samples: samples_of(i),
                    capacity: None,
                    now_s,
                },
                histories.get(&key(t.md)).unwrap_or(&empty),
                params,
            )
        })
        .collect();
    let Some(inv) = inv else {
        return enabled
            .iter()
            .zip(first)
            .enumerate()
            .map(|(i, (t, d))| (key(t.md), noted(i, d)))
            .collect();
    };
    // Capacity per deployment that wants to grow.
    let mut caps: Vec<Option<u32>> = vec![None; enabled.len()];
    let mut claims = Vec::new();
    let mut claim_of = Vec::new();
    for (i, (t, d)) in enabled.iter().zip(&first).enumerate() {
        if d.replicas <= d.current {
            continue;
        }
        caps[i] = Some(capacity(inv, t.md, placed_of(t.md), opts));
        let target = spec_of(i).target.max(1e-9);
        claims.push(Claim {
            priority: t.md.spec.priority,
            running: d.current,
            wanted: d.replicas,
            gpus_per_replica: gpus_per_replica(t.md),
            ratio: d.average.unwrap_or(0.0) / target,
        });
        claim_of.push(i);
    }
    if !claims.is_empty() {
        let free: u64 = inv.nodes.iter().map(|n| u64::from(n.free_total())).sum();
        let grants = arbitrate(&claims, free);
        for (g, &i) in grants.into_iter().zip(&claim_of) {
            caps[i] = caps[i].map(|c| c.min(g));
        }
    }
    enabled
        .iter()
        .zip(first)
        .zip(caps)
        .enumerate()
        .map(|(i, ((t, d), cap))| {
            let d = match cap {
                None => d,
                Some(c) => decide(
                    &Input {
                        spec: spec_of(i),
                        current: current_of(t.md),
                        samples: samples_of(i),
                        capacity: Some(c),
                        now_s,
                    },
                    histories.get(&key(t.md)).unwrap_or(&empty),
                    params,
                ),
            };
            (key(t.md), noted(i, d))
        })
        .collect()
}

/// The conditions list with `ScalingLimited` set from the decision, or `None` when nothing
/// changes. Limited: `True`, reason `InsufficientCapacity`, "wanted N replicas, M fit". Not
/// limited: an existing `True` condition turns `False` (reason `CapacityAvailable`); with no
/// condition yet nothing is written.
pub fn scaling_condition(
    old: &[Condition],
    d: &Decision,
    generation: Option<i64>,
    now: Timestamp,
) -> Option<Vec<Condition>> {
    let existing = old.iter().find(|c| c.type_ == CONDITION);
    let (status, reason, message) = if d.capacity_limited {
        (
            "True",
            "InsufficientCapacity",
            format!(
                "wanted {} replicas, {} fit in the cluster (allowed GPU types included); running {}",
                d.wanted,
                d.capacity.unwrap_or(0),
                d.replicas
            ),
        )
    } else {
        match existing {
            None => return None,
            Some(_) => (
                "False",
                "CapacityAvailable",
                format!("the {} replicas the load asks for fit", d.replicas),
            ),
        }
    };
    if let Some(c) = existing
        && c.status == status
        && c.reason == reason
        && c.message == message
    {
        return None;
    }
    let transition = match existing {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(now),
    };
    let mut out: Vec<Condition> = old
        .iter()
        .filter(|c| c.type_ != CONDITION)
        .cloned()
        .collect();
    out.push(Condition {
        type_: CONDITION.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: transition,
        observed_generation: generation,
    });
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ScalingMetric, parse_model_deployment};
    use crate::planner::catalog::Catalog;
    use crate::planner::inventory::DEFAULT_TOPOLOGY_KEYS;
    use crate::planner::synthetic::node_json;
    use k8s_openapi::api::core::v1::Node;

    fn md(name: &str, priority: i32, replicas: i32) -> ModelDeployment {
        let v = serde_json::json!({
            "apiVersion": "tessera.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {
                "replicas": replicas,
                "priority": priority,
                "model": {"uri": "pvc://m/x", "architecture": {
                    "parameters": 8030261248i64, "layers": 32, "hiddenSize": 4096,
                    "attentionHeads": 32, "kvHeads": 8, "intermediateSize": 14336,
                    "vocabSize": 128256, "contextLength": 131072, "bytesPerParameter": 2}},
                "parallelism": {"tensor": 1, "pipeline": 1},
                "gpu": {"types": ["L40S", "H20"]},
                "serving": {"maxConcurrency": 8, "contextLength": 4096},
                "autoscaling": {"enabled": true, "minReplicas": 1, "maxReplicas": 8,
                    "metric": "queueDepth", "target": 10,
                    "scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 300}
            }
        });
        parse_model_deployment(&v).expect("valid")
    }

    fn inventory(nodes: &[(usize, u32)]) -> Inventory {
        let nodes: Vec<Node> = nodes
            .iter()
            .enumerate()
            .map(|(i, &(product, gpus))| {
                serde_json::from_value(node_json(&format!("n{i}"), product, gpus, 0, 0, 0))
                    .expect("node")
            })
            .collect();
        let keys: Vec<String> = DEFAULT_TOPOLOGY_KEYS
            .iter()
            .map(|s| s.to_string())
            .collect();
        Inventory::from_nodes(&nodes, &[], &Catalog::builtin(), &keys)
    }

    #[test]
    fn capacity_counts_fallback_gpu_types_and_stops_at_max() {
        let d = md("a", 0, 1);
        let opts = PlanOptions::default();
        // Product 3 is L40S, 2 is H20 (planner::synthetic::PRODUCTS).
        assert_eq!(capacity(&inventory(&[(3, 2)]), &d, 0, &opts), 2);
        assert_eq!(capacity(&inventory(&[(3, 2), (2, 2)]), &d, 0, &opts), 4);
        assert_eq!(capacity(&inventory(&[(3, 8), (2, 8)]), &d, 0, &opts), 8);
        // Already placed replicas count on top of what is free.
        assert_eq!(capacity(&inventory(&[(3, 1)]), &d, 3, &opts), 4);
    }

    /// One unit of 3 prefill and 1 decode replicas (TP=1) running.
    fn pooled() -> ModelDeployment {
        let mut d = md("pd", 0, 1);
        let placement = |replica: i32, role: &str| crate::api::ReplicaPlacement {
            replica,
            tensor_parallel: 1,
            pipeline_parallel: 1,
            role: Some(role.into()),
            ..Default::default()
        };
        let pool = |role: &str, replicas: i32| crate::api::PoolStatus {
            role: role.into(),
            tensor_parallel: 1,
            pipeline_parallel: 1,
            replicas,
            ..Default::default()
        };
        d.status = Some(crate::api::ModelDeploymentStatus {
            placements: vec![
                placement(0, "prefill"),
                placement(1, "prefill"),
                placement(2, "prefill"),
                placement(3, "decode"),
            ],
            pools: vec![pool("prefill", 3), pool("decode", 1)],
            ..Default::default()
        });
        d
    }

    /// One pass over `d` alone, without an inventory.
    fn decide_one(d: &ModelDeployment, samples: Vec<ReplicaSample>) -> Decision {
        let t = [Target { md: d, samples }];
        decide_pass(
            &t,
            &HashMap::new(),
            None,
            &Params::default(),
            &PlanOptions::default(),
            0.0,
        )
        .remove(0)
        .1
    }

    fn pool_samples(prefill: &[f64], decode: &[f64]) -> Vec<ReplicaSample> {
        let of = |role: &str, v: f64| ReplicaSample {
            pool: Some(role.into()),
            ..ReplicaSample::of(ScalingMetric::QueueDepth, v)
        };
        prefill
            .iter()
            .map(|&v| of("prefill", v))
            .chain(decode.iter().map(|&v| of("decode", v)))
            .collect()
    }

    #[test]
    fn pools_scale_in_units_on_the_pool_that_leads() {
        let d = pooled();
        assert_eq!((placed_of(&d), gpus_per_replica(&d)), (1, 4));
        let run = |samples: Vec<ReplicaSample>| decide_one(&d, samples);
        // Long prompts queue at the prefill pool (40 per leader, target 10): 4 units (the
        // leaders taken as replicas would ask for 12, rate-limited to 5).
        let up = run(pool_samples(&[40.0, 40.0, 40.0], &[0.0]));
        assert_eq!((up.current, up.replicas), (1, 4), "{}", up.message);
        assert!(
            up.message
                .starts_with("pools scale in units (3 prefill + 1 decode)")
                && up.message.contains("the prefill pool leads"),
            "{}",
            up.message
        );
        // The decode pool leads when it is the one loaded (25: 3 units; as replicas, 4).
        let up = run(pool_samples(&[2.0, 2.0, 2.0], &[25.0]));
        assert_eq!(up.replicas, 3, "{}", up.message);
        assert!(
            up.message.contains("the decode pool leads"),
            "{}",
            up.message
        );
        // No pool sample: hold, saying so per pool.
        let hold = run(Vec::new());
        assert_eq!(hold.replicas, 1);
        assert_eq!(
            hold.reason,
            crate::autoscale::decide::Reason::MetricsMissing
        );
        assert!(
            hold.message.contains("prefill queueDepth: no fresh sample"),
            "{}",
            hold.message
        );
    }

    #[test]
    fn each_pool_scales_on_its_own_signal_against_its_target() {
        // With an SLO, prefill scales on time to first token (target 2 s) and decode on
        // inter-token latency (50 ms) unless autoscaling.decode says otherwise.
        let mut d = pooled();
        d.spec.serving.slo = Some(crate::api::ServingSlo {
            time_to_first_token_seconds: Some(2.0),
            inter_token_latency_seconds: Some(0.05),
        });
        assert_eq!(
            pool_scaling(&d, "prefill"),
            Some((ScalingMetric::TimeToFirstToken, 2.0))
        );
        assert_eq!(
            pool_scaling(&d, "decode"),
            Some((ScalingMetric::InterTokenLatency, 0.05))
        );
        let sample = |role: &str, ttft: Option<f64>, itl: Option<f64>, kv: f64| ReplicaSample {
            pool: Some(role.into()),
            time_to_first_token_s: ttft,
            inter_token_latency_s: itl,
            kv_cache_utilization: Some(kv),
            waiting: Some(1.0),
            running: Some(4.0),
            ..ReplicaSample::default()
        };
        let run = decide_one;
        // Prefill 3 s against 2 s (150%), decode 40 ms against 50 ms (80%): 2 units, led by
        // prefill, whose signal the message names.
        let pools = vec![
            sample("prefill", Some(3.0), None, 0.1),
            sample("prefill", Some(3.0), None, 0.1),
            sample("prefill", Some(3.0), None, 0.1),
            sample("decode", None, Some(0.04), 0.95),
        ];
        let up = run(&d, pools.clone());
        assert_eq!(up.replicas, 2, "{}", up.message);
        assert!(
            up.message
                .contains("prefill timeToFirstToken 3.000 over 3 leaders is 150% of 2")
                && up.message.contains("decode interTokenLatency 0.040")
                && up.message.contains("the prefill pool leads"),
            "{}",
            up.message
        );
        // autoscaling.decode on KV-cache use (target 0.5): the decode pool at 0.95 leads (190%).
        d.spec.autoscaling.as_mut().unwrap().decode = Some(crate::api::PoolScaling {
            metric: crate::api::DecodeScalingMetric::KvCacheUtilization,
            target: 0.5,
        });
        let up = run(&d, pools);
        assert_eq!(up.replicas, 2, "{}", up.message);
        assert!(
            up.message.contains("decode kvCacheUtilization 0.950")
                && up.message.contains("the decode pool leads"),
            "{}",
            up.message
        );
        // Idle leaders (nothing waiting or running) have no latency to scale for: 0, not absent.
        let idle = ReplicaSample {
            pool: Some("prefill".into()),
            waiting: Some(0.0),
            running: Some(0.0),
            ..ReplicaSample::default()
        };
        assert_eq!(idle.value(ScalingMetric::TimeToFirstToken), Some(0.0));
        let busy_no_latency = ReplicaSample {
            running: Some(3.0),
            ..idle
        };
        assert_eq!(busy_no_latency.value(ScalingMetric::TimeToFirstToken), None);
    }

    #[test]
    fn pooled_units_hold_a_scale_down_while_a_pool_misses_samples() {
        let mut d = pooled();
        d.spec.replicas = 2;
        let st = d.status.as_mut().unwrap();
        st.pools[0].replicas = 6;
        st.pools[1].replicas = 2;
        // Light load, but only 2 of the 6 prefill leaders answered.
        let d = decide_one(&d, pool_samples(&[1.0, 1.0], &[1.0, 1.0]));
        assert_eq!(d.replicas, 2, "{}", d.message);
        assert_eq!(d.reason, crate::autoscale::decide::Reason::MetricsPartial);
    }

    fn busy(n: u32) -> Vec<ReplicaSample> {
        (0..n)
            .map(|_| ReplicaSample::of(ScalingMetric::QueueDepth, 40.0))
            .collect()
    }

    #[test]
    fn a_pass_gives_free_gpus_to_the_higher_priority_first() {
        // Both run 2 placed replicas (their GPUs are outside the 3 free ones) and want 8 (40
        // per replica at target 10, rate-limited to 6).
        let placed = |mut d: ModelDeployment| {
            d.status = Some(crate::api::ModelDeploymentStatus {
                placements: vec![crate::api::ReplicaPlacement::default(); 2],
                ..Default::default()
            });
            d
        };
        let low = placed(md("low", 0, 2));
        let high = placed(md("high", 10, 2));
        let inv = inventory(&[(3, 3)]);
        let targets = [
            Target {
                md: &low,
                samples: busy(2),
            },
            Target {
                md: &high,
                samples: busy(2),
            },
        ];
        let out = decide_pass(
            &targets,
            &HashMap::new(),
            Some(&inv),
            &Params::default(),
            &PlanOptions::default(),
            0.0,
        );
        let get = |k: &str| out.iter().find(|(key, _)| key == k).expect(k).1.clone();
        let (h, l) = (get("ns/high"), get("ns/low"));
        assert_eq!(h.replicas, 5, "{}", h.message);
        assert!(h.capacity_limited);
        assert_eq!(l.replicas, 2, "{}", l.message);
        assert!(l.capacity_limited);
        assert!(
            l.message.contains("wanted 6 replicas, 2 fit"),
            "{}",
            l.message
        );
        // Without an inventory nothing limits them.
        let free = decide_pass(
            &targets,
            &HashMap::new(),
            None,
            &Params::default(),
            &PlanOptions::default(),
            0.0,
        );
        assert!(
            free.iter()
                .all(|(_, d)| d.replicas == 6 && !d.capacity_limited)
        );
    }

    #[test]
    fn disabled_deployments_are_left_alone() {
        let mut off = md("off", 0, 2);
        off.spec.autoscaling.as_mut().expect("set").enabled = false;
        let out = decide_pass(
            &[Target {
                md: &off,
                samples: busy(2),
            }],
            &HashMap::new(),
            None,
            &Params::default(),
            &PlanOptions::default(),
            0.0,
        );
        assert!(out.is_empty());
    }

    #[test]
    fn the_condition_is_set_kept_and_cleared() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().expect("time");
        let t1: Timestamp = "2026-01-01T00:01:00Z".parse().expect("time");
        let other = Condition {
            type_: "Ready".into(),
            status: "True".into(),
            reason: "AllReady".into(),
            message: String::new(),
            last_transition_time: Time(t0),
            observed_generation: None,
        };
        let limited = Decision {
            current: 2,
            replicas: 3,
            reason: super::super::decide::Reason::CapacityLimited,
            message: String::new(),
            recommendation: 6,
            wanted: 6,
            capacity_limited: true,
            capacity: Some(3),
            average: Some(30.0),
            fresh: 2,
        };
        let set =
            scaling_condition(std::slice::from_ref(&other), &limited, Some(4), t0).expect("set");
        assert_eq!(set.len(), 2);
        let c = set.iter().find(|c| c.type_ == CONDITION).expect("cond");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "InsufficientCapacity")
        );
        assert!(
            c.message.contains("wanted 6 replicas, 3 fit"),
            "{}",
            c.message
        );
        assert_eq!(c.observed_generation, Some(4));
        // Same decision again: nothing to write.
        assert_eq!(scaling_condition(&set, &limited, Some(4), t1), None);
        // Not limited any more: False, with a new transition time; the other condition stays.
        let fine = Decision {
            capacity_limited: false,
            ..limited
        };
        let cleared = scaling_condition(&set, &fine, Some(4), t1).expect("clear");
        let c = cleared.iter().find(|c| c.type_ == CONDITION).expect("cond");
        assert_eq!(c.status, "False");
        assert_eq!(c.last_transition_time, Time(t1));
        assert!(cleared.iter().any(|c| c.type_ == "Ready"));
        // Never limited: no condition written at all.
        assert_eq!(scaling_condition(&[other], &fine, None, t1), None);
    }
}
