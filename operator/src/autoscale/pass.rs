//! One autoscaling pass over many deployments, pure: decide each, ask the planner how many
//! replicas fit, arbitrate the free GPUs between deployments that want more, decide again
//! within those limits, and compute the `ScalingLimited` condition.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use super::arbitrate::{Claim, arbitrate};
use super::decide::{Decision, History, Input, Params, ReplicaSample, decide};
use crate::api::ModelDeployment;
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
    let more = p.deployments.first().map_or(0, |d| d.placed.len()) as u32;
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

fn gpus_per_replica(md: &ModelDeployment) -> u32 {
    let st = md.status.as_ref();
    let tp = st.and_then(|s| s.tensor_parallel).unwrap_or(1).max(1);
    let pp = st.and_then(|s| s.pipeline_parallel).unwrap_or(1).max(1);
    (tp * pp) as u32
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
    let first: Vec<Decision> = enabled
        .iter()
        .map(|t| {
            let spec = t.md.spec.autoscaling.as_ref().expect("filtered");
            decide(
                &Input {
                    spec,
                    current: current_of(t.md),
                    samples: &t.samples,
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
            .map(|(t, d)| (key(t.md), d))
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
        let placed =
            t.md.status
                .as_ref()
                .map_or(0, |s| s.placements.len() as u32);
        caps[i] = Some(capacity(inv, t.md, placed, opts));
        let target =
            t.md.spec
                .autoscaling
                .as_ref()
                .map_or(1.0, |a| a.target.max(1e-9));
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
        .map(|((t, d), cap)| {
            let d = match cap {
                None => d,
                Some(c) => decide(
                    &Input {
                        spec: t.md.spec.autoscaling.as_ref().expect("filtered"),
                        current: current_of(t.md),
                        samples: &t.samples,
                        capacity: Some(c),
                        now_s,
                    },
                    histories.get(&key(t.md)).unwrap_or(&empty),
                    params,
                ),
            };
            (key(t.md), d)
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
