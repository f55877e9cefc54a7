//! One autoscaling pass over many deployments, pure: decide each, ask the planner how many
//! replicas fit, arbitrate the free GPUs between deployments that want more, decide again
//! within those limits, and compute the `ScalingLimited` condition.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use super::arbitrate::{Claim, arbitrate};
use super::decide::{Decision, History, Input, Params, ReplicaSample, decide};
use crate::api::{AutoscalingSpec, ModelDeployment, ScalingMetric};
use crate::planner::inventory::Inventory;
use crate::planner::{PlanOptions, plan};

/// Type of the condition the autoscaler owns.
pub const CONDITION: &str = "ScalingLimited";

/// How many replicas of `md` can be placed: the `placed` ones plus as many new replicas (up
/// to `autoscaling.maxReplicas`) as the planner fits into the free GPUs of `inv`. The planner
/// tries every feasible layout of the spec's `gpu.types` in order of preference, so a fallback
/// GPU type with room counts. For one pool of a deployment whose pools run ([`pool_view`]),
/// the planner places replicas of that pool's GPU type and layout. `inv` must count every
/// pod's GPUs (this deployment's included).
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
    probe.status = None;
    probe.spec.replicas = i32::try_from(max - placed).unwrap_or(i32::MAX);
    if let Some(pool) = view_pool(md) {
        // One pool: replicas of its GPU type and layout, whatever the other pool needs (the
        // pools' verdict weighs whole units, which a pool growing alone does not need).
        let Some(t) = inv.types.iter().find(|t| t.product == pool.gpu_type) else {
            return placed;
        };
        let spec = &mut probe.spec;
        spec.serving.disaggregation = crate::api::Disaggregation::Off;
        spec.serving.slo = None;
        spec.pool_replicas = None;
        spec.autoscaling = None;
        spec.gpu.types = vec![t.short().to_owned()];
        let fixed = |n: i32| crate::api::ParallelDegree::Fixed(n.max(1) as u32);
        spec.parallelism.tensor = fixed(pool.tensor_parallel);
        spec.parallelism.pipeline = fixed(pool.pipeline_parallel);
        if let Some(ep) = pool.expert_parallel {
            spec.parallelism.expert = fixed(ep);
        }
        if pool.data_parallel_attention {
            spec.parallelism.attention = crate::api::AttentionParallelism::Data;
        }
    }
    let p = plan(inv, std::slice::from_ref(&probe), &[], opts);
    let Some(d) = p.deployments.first() else {
        return placed;
    };
    placed + d.placed.len() as u32
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

/// The pools of a deployment whose prefill/decode pools run (placements in roles, two pools
/// in status).
fn running_pools(md: &ModelDeployment) -> Option<&[crate::api::PoolStatus]> {
    let st = md.status.as_ref()?;
    (st.placements.iter().any(|p| p.role.is_some()) && st.pools.len() > 1)
        .then_some(st.pools.as_slice())
}

/// The pool a [`pool_view`] stands for: the one its `NAME:ROLE` names.
fn view_pool(md: &ModelDeployment) -> Option<&crate::api::PoolStatus> {
    let (_, role) = md.metadata.name.as_deref()?.split_once(':')?;
    md.status.as_ref()?.pools.iter().find(|p| p.role == role)
}

/// The deployment's name without a pool view's `:ROLE`.
fn base_name(md: &ModelDeployment) -> &str {
    let name = md.metadata.name.as_deref().unwrap_or("");
    name.split_once(':').map_or(name, |(n, _)| n)
}

/// The deployment's key and the pool of a key from [`decide_pass`]: `ns/name` and `None`, or
/// `ns/name:ROLE` and the role (`:` never occurs in a Kubernetes name).
pub fn split_key(key: &str) -> (&str, Option<&str>) {
    match key.split_once(':') {
        Some((k, role)) => (k, Some(role)),
        None => (key, None),
    }
}

/// One pool of a deployment whose pools run, as the autoscaler scales it: named `NAME:ROLE`;
/// `spec.replicas` is the pool's size (`spec.poolReplicas`, else its units); the bounds are
/// `autoscaling.minReplicas` / `maxReplicas` units of the pool's replicas per unit; the metric
/// and target are the pool's own ([`pool_scaling`]); its status holds the pool's placements and
/// the pool alone, with the pool's layout. `None` without that pool.
pub fn pool_view(md: &ModelDeployment, role: &str) -> Option<ModelDeployment> {
    let pool = running_pools(md)?.iter().find(|p| p.role == role)?;
    let per_unit = pool.per_unit(md.spec.replicas);
    let (metric, target) = pool_scaling(md, role)?;
    let mut v = md.clone();
    v.metadata.name = Some(format!("{}:{role}", base_name(md)));
    v.spec.replicas = md.spec.pool_size(role, per_unit);
    if let Some(a) = v.spec.autoscaling.as_mut() {
        a.min_replicas = a.min_replicas.saturating_mul(per_unit);
        a.max_replicas = a.max_replicas.saturating_mul(per_unit);
        a.metric = metric;
        a.target = target;
    }
    let st = v.status.as_mut().expect("pools run");
    st.placements.retain(|p| p.role.as_deref() == Some(role));
    st.gpu_type = Some(pool.gpu_type.clone());
    st.tensor_parallel = Some(pool.tensor_parallel);
    st.pipeline_parallel = Some(pool.pipeline_parallel);
    st.expert_parallel = pool.expert_parallel;
    st.pools = vec![pool.clone()];
    Some(v)
}

/// GPUs one more replica takes (of the pool, for a [`pool_view`]).
fn gpus_per_replica(md: &ModelDeployment) -> u32 {
    if let Some(p) = view_pool(md) {
        return (p.tensor_parallel.max(1) * p.pipeline_parallel.max(1)) as u32;
    }
    let st = md.status.as_ref();
    let tp = st.and_then(|s| s.tensor_parallel).unwrap_or(1).max(1);
    let pp = st.and_then(|s| s.pipeline_parallel).unwrap_or(1).max(1);
    (tp * pp) as u32
}

/// Placed replicas (of the pool, for a [`pool_view`]).
fn placed_of(md: &ModelDeployment) -> u32 {
    md.status
        .as_ref()
        .map_or(0, |st| st.placements.len() as u32)
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

/// The (namespace, name) of what the autoscaler decides on for `md`: `NAME`, or `NAME:ROLE`
/// for each pool while its pools run.
pub fn scaled_names(md: &ModelDeployment) -> Vec<(String, String)> {
    let ns = md.metadata.namespace.clone().unwrap_or_default();
    let name = base_name(md).to_owned();
    match running_pools(md) {
        None => vec![(ns, name)],
        Some(pools) => pools
            .iter()
            .map(|p| (ns.clone(), format!("{name}:{}", p.role)))
            .collect(),
    }
}

/// What the autoscaler decides on for one deployment: the deployment itself, or, while its
/// prefill/decode pools run, each pool on its own ([`pool_view`]) with its own leaders' samples.
fn scaled<'a>(
    md: &'a ModelDeployment,
    samples: &[ReplicaSample],
) -> Vec<(std::borrow::Cow<'a, ModelDeployment>, Vec<ReplicaSample>)> {
    let Some(pools) = running_pools(md) else {
        return vec![(std::borrow::Cow::Borrowed(md), samples.to_vec())];
    };
    pools
        .iter()
        .filter_map(|p| {
            let view = pool_view(md, &p.role)?;
            let own = samples
                .iter()
                .filter(|s| s.pool.as_deref() == Some(p.role.as_str()))
                .cloned()
                .collect();
            Some((std::borrow::Cow::Owned(view), own))
        })
        .collect()
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
    // Deployments whose pools run are decided pool by pool, each under `NAME:ROLE`.
    let enabled: Vec<(std::borrow::Cow<'_, ModelDeployment>, Vec<ReplicaSample>)> = targets
        .iter()
        .filter(|t| t.md.spec.autoscaling.as_ref().is_some_and(|a| a.enabled))
        .flat_map(|t| scaled(t.md, &t.samples))
        .collect();
    fn spec_of(md: &ModelDeployment) -> &AutoscalingSpec {
        md.spec.autoscaling.as_ref().expect("filtered")
    }
    let decide_with = |md: &ModelDeployment, samples: &[ReplicaSample], capacity| {
        decide(
            &Input {
                spec: spec_of(md),
                current: current_of(md),
                samples,
                capacity,
                now_s,
            },
            histories.get(&key(md)).unwrap_or(&empty),
            params,
        )
    };
    let first: Vec<Decision> = enabled
        .iter()
        .map(|(md, samples)| decide_with(md, samples, None))
        .collect();
    let Some(inv) = inv else {
        return enabled
            .iter()
            .zip(first)
            .map(|((md, _), d)| (key(md), d))
            .collect();
    };
    // Capacity per deployment (or pool) that wants to grow.
    let mut caps: Vec<Option<u32>> = vec![None; enabled.len()];
    let mut claims = Vec::new();
    let mut claim_of = Vec::new();
    for (i, ((md, _), d)) in enabled.iter().zip(&first).enumerate() {
        if d.replicas <= d.current {
            continue;
        }
        caps[i] = Some(capacity(inv, md, placed_of(md), opts));
        let target = spec_of(md).target.max(1e-9);
        claims.push(Claim {
            priority: md.spec.priority,
            running: d.current,
            wanted: d.replicas,
            gpus_per_replica: gpus_per_replica(md),
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
        .map(|(((md, samples), d), cap)| {
            let d = match cap {
                None => d,
                Some(c) => decide_with(md, samples, Some(c)),
            };
            (key(md), d)
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
    pool: Option<&str>,
    generation: Option<i64>,
    now: Timestamp,
) -> Option<Vec<Condition>> {
    let existing = old.iter().find(|c| c.type_ == CONDITION);
    let (status, reason, message) = if d.capacity_limited {
        (
            "True",
            "InsufficientCapacity",
            format!(
                "{}wanted {} replicas, {} fit in the cluster (allowed GPU types included); running {}",
                pool.map_or(String::new(), |p| format!("the {p} pool ")),
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
                format!(
                    "the {} replicas the load asks for fit{}",
                    d.replicas,
                    pool.map_or(String::new(), |p| format!(" (the {p} pool)"))
                ),
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

    /// One pass over `d` alone, without an inventory: every decision, by key.
    fn decide_all(d: &ModelDeployment, samples: Vec<ReplicaSample>) -> Vec<(String, Decision)> {
        let t = [Target { md: d, samples }];
        decide_pass(
            &t,
            &HashMap::new(),
            None,
            &Params::default(),
            &PlanOptions::default(),
            0.0,
        )
    }

    /// The decisions for the prefill and the decode pool of `d`.
    fn decide_pools(d: &ModelDeployment, samples: Vec<ReplicaSample>) -> (Decision, Decision) {
        let out = decide_all(d, samples);
        let keys: Vec<&str> = out.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["ns/pd:prefill", "ns/pd:decode"]);
        let mut it = out.into_iter().map(|(_, d)| d);
        (it.next().unwrap(), it.next().unwrap())
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
    fn each_pool_scales_alone_on_its_own_signal() {
        let d = pooled();
        let (pre, dec) = (
            pool_view(&d, "prefill").unwrap(),
            pool_view(&d, "decode").unwrap(),
        );
        assert_eq!((placed_of(&pre), gpus_per_replica(&pre)), (3, 1));
        assert_eq!((placed_of(&dec), gpus_per_replica(&dec)), (1, 1));
        // Bounds: 1..8 units of each pool's replicas per unit.
        let bounds = |v: &ModelDeployment| {
            let a = v.spec.autoscaling.as_ref().unwrap();
            (a.min_replicas, a.max_replicas)
        };
        assert_eq!((bounds(&pre), bounds(&dec)), ((3, 24), (1, 8)));
        // Long prompts queue at the prefill pool (40 per leader, target 10): the prefill pool
        // grows, the idle decode pool stays as it is.
        let (p, q) = decide_pools(&d, pool_samples(&[40.0, 40.0, 40.0], &[0.0]));
        assert_eq!(p.current, 3);
        assert!(p.replicas > 3, "{}", p.message);
        assert_eq!((q.current, q.replicas), (1, 1), "{}", q.message);
        // Many long answers load the decode pool (25 at target 10): it alone grows to 3; the
        // light prefill pool holds (its scale-down window has not passed).
        let (p, q) = decide_pools(&d, pool_samples(&[2.0, 2.0, 2.0], &[25.0]));
        assert_eq!((q.current, q.replicas), (1, 3), "{}", q.message);
        assert_eq!(p.replicas, 3, "{}", p.message);
        // No sample from a pool: that pool holds, saying so.
        let (p, q) = decide_pools(&d, pool_samples(&[], &[25.0]));
        assert_eq!(p.replicas, 3);
        assert_eq!(p.reason, crate::autoscale::decide::Reason::MetricsMissing);
        assert_eq!(q.replicas, 3, "{}", q.message);
    }

    #[test]
    fn a_pools_size_comes_from_pool_replicas_else_its_units() {
        let mut d = pooled();
        d.spec.replicas = 2;
        d.status.as_mut().unwrap().pools[0].replicas_per_unit = 3;
        d.status.as_mut().unwrap().pools[1].replicas_per_unit = 1;
        let size = |d: &ModelDeployment, role: &str| pool_view(d, role).unwrap().spec.replicas;
        assert_eq!((size(&d, "prefill"), size(&d, "decode")), (6, 2));
        d.spec.pool_replicas = Some(crate::api::PoolReplicas {
            prefill: Some(7),
            decode: None,
        });
        assert_eq!((size(&d, "prefill"), size(&d, "decode")), (7, 2));
        assert_eq!(
            scaled_names(&d),
            [
                ("ns".to_owned(), "pd:prefill".to_owned()),
                ("ns".to_owned(), "pd:decode".to_owned())
            ]
        );
        assert_eq!(split_key("ns/pd:decode"), ("ns/pd", Some("decode")));
        assert_eq!(split_key("ns/pd"), ("ns/pd", None));
        // A deployment without running pools is decided whole.
        let plain = md("a", 0, 2);
        assert!(pool_view(&plain, "prefill").is_none());
        assert_eq!(decide_all(&plain, busy(2))[0].0, "ns/a");
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
        // Prefill 3 s against 2 s (150%): 3 prefill replicas become ceil(4.5) = 5; decode
        // 40 ms against 50 ms (80%) holds its one replica.
        let pools = vec![
            sample("prefill", Some(3.0), None, 0.1),
            sample("prefill", Some(3.0), None, 0.1),
            sample("prefill", Some(3.0), None, 0.1),
            sample("decode", None, Some(0.04), 0.95),
        ];
        let (p, q) = decide_pools(&d, pools.clone());
        assert_eq!(
            (p.replicas, q.replicas),
            (5, 1),
            "{} / {}",
            p.message,
            q.message
        );
        // autoscaling.decode on KV-cache use (target 0.5): the decode pool at 0.95 grows to 2.
        d.spec.autoscaling.as_mut().unwrap().decode = Some(crate::api::PoolScaling {
            metric: crate::api::DecodeScalingMetric::KvCacheUtilization,
            target: 0.5,
        });
        let (p, q) = decide_pools(&d, pools);
        assert_eq!(
            (p.replicas, q.replicas),
            (5, 2),
            "{} / {}",
            p.message,
            q.message
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
    fn a_pool_holds_a_scale_down_while_it_misses_samples() {
        let mut d = pooled();
        d.spec.replicas = 2;
        let st = d.status.as_mut().unwrap();
        st.pools[0].replicas = 6;
        st.pools[1].replicas = 2;
        // Light load, but only 2 of the 6 prefill leaders answered.
        let (p, _) = decide_pools(&d, pool_samples(&[1.0, 1.0], &[1.0, 1.0]));
        assert_eq!(p.replicas, 6, "{}", p.message);
        assert_eq!(p.reason, crate::autoscale::decide::Reason::MetricsPartial);
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
        let set = scaling_condition(std::slice::from_ref(&other), &limited, None, Some(4), t0)
            .expect("set");
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
        assert_eq!(scaling_condition(&set, &limited, None, Some(4), t1), None);
        // Not limited any more: False, with a new transition time; the other condition stays.
        let fine = Decision {
            capacity_limited: false,
            ..limited
        };
        let cleared = scaling_condition(&set, &fine, None, Some(4), t1).expect("clear");
        let c = cleared.iter().find(|c| c.type_ == CONDITION).expect("cond");
        assert_eq!(c.status, "False");
        assert_eq!(c.last_transition_time, Time(t1));
        assert!(cleared.iter().any(|c| c.type_ == "Ready"));
        // Never limited: no condition written at all.
        assert_eq!(scaling_condition(&[other], &fine, None, None, t1), None);
    }
}
