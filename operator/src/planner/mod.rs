//! The bandwidth-aware planner: pure functions from cluster inventory and ModelDeployments to a
//! plan (GPU type, tensor x pipeline layout and nodes for every replica), with reasons.
//!
//! - [`catalog`]: GPU numbers and product matching;
//! - [`inventory`]: nodes, NVLink domains, fabric position, free GPUs, eligibility;
//! - [`cost`]: the cost model (memory fit, decode, prefill, all-reduce);
//! - [`choose`]: enumerating and ranking layouts;
//! - [`place`]: gang placement on an index of free capacity.
//!
//! The JSON form of [`Plan`] is a stable contract documented in `docs/plan-json.md`.

pub mod calibration;
pub mod catalog;
pub mod choose;
pub mod cost;
pub mod disagg;
pub mod inventory;
pub mod place;
#[doc(hidden)]
pub mod synthetic;

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::api::{
    LayoutPrediction, ModelDeployment, Prediction, ReplicaPlacement, StagePlacement,
    TensorParallelScope,
};
use choose::{Candidate, Choice, TypeStats};
use cost::{CostConstants, Layout, Link, Links};
use inventory::{Eligibility, Inventory};
use place::{Alloc, Capacity, LazyGrouping, Mode};

/// Knobs of one planning run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanOptions {
    /// Cost-model constants (fabric bandwidth, latencies, utilisation cap...).
    #[serde(default)]
    pub constants: CostConstants,
    /// Place each replica only with its deployment's chosen layout, never a fallback (another
    /// layout or a later `gpu.types` entry). Off by default; the placement-quality benchmark
    /// uses it to compare placement alone against a scheduler that has no fallbacks.
    #[serde(default)]
    pub first_choice_only: bool,
    /// Decide and report prefill/decode disaggregation (`DeploymentPlan::disaggregation`) but
    /// place every replica aggregated: the controller, for a deployment whose pools cannot run
    /// (the tessera engine, a vLLM router without an image).
    #[serde(default)]
    pub aggregated_only: bool,
}

/// A replica placed by an earlier plan, kept where it is when it still fits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExistingPlacement {
    pub namespace: String,
    pub name: String,
    pub replica: i32,
    pub gpu_type: String,
    pub tensor_parallel: i32,
    pub pipeline_parallel: i32,
    /// Expert-parallel degree (MoE with expert parallelism).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_parallel: Option<i32>,
    /// Data-parallel attention inside the expert-parallel group.
    #[serde(default)]
    pub data_parallel_attention: bool,
    pub stages: Vec<StagePlacement>,
    /// `prefill` or `decode` for a replica of a disaggregated deployment's pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

impl ExistingPlacement {
    /// The layout it was placed with.
    pub fn layout(&self) -> Layout {
        Layout::from_api(
            self.tensor_parallel,
            self.pipeline_parallel,
            self.expert_parallel,
            self.data_parallel_attention,
        )
    }

    /// From a ModelDeployment's status entry.
    pub fn from_status(namespace: &str, name: &str, p: &ReplicaPlacement) -> Self {
        ExistingPlacement {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            replica: p.replica,
            gpu_type: p.gpu_type.clone(),
            tensor_parallel: p.tensor_parallel,
            pipeline_parallel: p.pipeline_parallel,
            expert_parallel: p.expert_parallel,
            data_parallel_attention: p.data_parallel_attention,
            stages: p.stages.clone(),
            role: p.role.clone(),
        }
    }
}

/// The plan for every deployment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// In placement order: priority (higher first), creation time, namespace/name.
    pub deployments: Vec<DeploymentPlan>,
    /// Inventory problems, fallbacks and dropped placements.
    pub warnings: Vec<String>,
}

impl Plan {
    /// Every placed replica as an existing placement, to re-plan stably.
    pub fn existing(&self) -> Vec<ExistingPlacement> {
        let mut out = Vec::new();
        for d in &self.deployments {
            for p in &d.placed {
                out.push(ExistingPlacement {
                    namespace: d.namespace.clone(),
                    name: d.name.clone(),
                    replica: p.replica,
                    gpu_type: p.gpu_type.clone(),
                    tensor_parallel: p.tensor_parallel,
                    pipeline_parallel: p.pipeline_parallel,
                    expert_parallel: p.expert_parallel,
                    data_parallel_attention: p.data_parallel_attention,
                    stages: p.stages.clone(),
                    role: p.role.clone(),
                });
            }
        }
        out
    }
}

/// The plan of one deployment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentPlan {
    pub namespace: String,
    pub name: String,
    pub priority: i32,
    /// Desired replicas.
    pub replicas: i32,
    pub placed: Vec<PlacedReplica>,
    pub unplaced: Vec<UnplacedReplica>,
    pub choice: ChoiceReport,
    /// Prefill/decode disaggregation (`serving.disaggregation` Auto or On with a workload):
    /// the verdict, why, and the two pools when disaggregated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disaggregation: Option<DisaggregationPlan>,
}

/// The planner's disaggregation verdict for one deployment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DisaggregationPlan {
    /// Prefill and decode on separate pools.
    pub disaggregated: bool,
    /// Why, with the figures compared (output tokens/s per GPU under the SLO).
    pub reason: String,
    /// The prefill and the decode pool (empty when aggregated).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<crate::api::PoolStatus>,
}

impl DisaggregationPlan {
    /// The pool replica `replica` serves in when the pools hold `units` units (`spec.replicas`):
    /// as the plan places it ([`prefill_slot`]).
    pub fn pool_of(&self, units: i32, replica: i32) -> Option<&crate::api::PoolStatus> {
        let per_unit = |role: &str| {
            self.pools
                .iter()
                .find(|p| p.role == role)
                .map_or(0, |p| p.per_unit(units))
        };
        let role = if prefill_slot(replica, per_unit("prefill"), per_unit("decode")) {
            "prefill"
        } else {
            "decode"
        };
        self.pools.iter().find(|p| p.role == role)
    }

    /// The replica indices of the pools ([`pool_indices`]), ascending; `units` is
    /// `spec.replicas`.
    pub fn indices(&self, units: i32) -> Vec<i32> {
        let pool = |role: &str| {
            self.pools
                .iter()
                .find(|p| p.role == role)
                .map_or((0, 0), |p| (p.replicas, p.per_unit(units)))
        };
        let (pre, dec) = (pool("prefill"), pool("decode"));
        pool_indices((pre.0, dec.0), (pre.1, dec.1))
    }
}

/// Whether replica `r` of a disaggregated deployment is a prefill replica. Replicas come in units
/// of the pair's ratio, each unit its `prefill` replicas then its `decode` replicas: with 1:2,
/// replicas 0, 3, 6 prefill and 1, 2, 4, 5 decode. Scaling the units keeps every existing
/// replica's role (a running pod never changes pool).
pub fn prefill_slot(r: i32, prefill: i32, decode: i32) -> bool {
    r.rem_euclid((prefill + decode).max(1)) < prefill
}

/// The replica indices of pools of `pools.0` prefill and `pools.1` decode replicas, with
/// `unit.0` prefill and `unit.1` decode replicas per unit ([`prefill_slot`]): the first
/// `pools.0` prefill slots and the first `pools.1` decode slots, ascending. Each pool's k-th
/// replica has the same index whatever the size of either pool, so one pool grows or shrinks
/// without moving a replica of the other: with 1:2 units, 2 prefill and 5 decode replicas are
/// 0, 3 and 1, 2, 4, 5, 7.
pub fn pool_indices(pools: (i32, i32), unit: (i32, i32)) -> Vec<i32> {
    let (p, d) = (unit.0.max(0), unit.1.max(0));
    let size = (p + d).max(1);
    let slot = |k: i32, per: i32, offset: i32| (k / per) * size + offset + k % per;
    let mut out: Vec<i32> = Vec::new();
    if p > 0 {
        out.extend((0..pools.0.max(0)).map(|k| slot(k, p, 0)));
    }
    if d > 0 {
        out.extend((0..pools.1.max(0)).map(|k| slot(k, d, p)));
    }
    out.sort_unstable();
    out
}

/// One placed replica.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlacedReplica {
    pub replica: i32,
    /// Node GPU product (`NVIDIA-H100-80GB-HBM3`).
    pub gpu_type: String,
    pub tensor_parallel: i32,
    pub pipeline_parallel: i32,
    /// Expert-parallel degree (MoE with expert parallelism).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_parallel: Option<i32>,
    /// Data-parallel attention inside the expert-parallel group.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub data_parallel_attention: bool,
    /// One entry per stage and node (a stage spans nodes with tensorParallelScope Any, or for
    /// an expert-parallel group with data-parallel attention that does not fit one node).
    pub stages: Vec<StagePlacement>,
    /// Predictions for the links this placement actually gets.
    pub predicted: Prediction,
    /// Kept from the existing placements.
    #[serde(default)]
    pub kept: bool,
    /// Set when the replica fell back from the chosen layout, with why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// `prefill` or `decode` in a disaggregated deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// A replica that could not be placed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UnplacedReplica {
    pub replica: i32,
    pub reason: String,
}

/// Why the layout was chosen.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChoiceReport {
    /// The chosen layout with its nominal prediction (before placement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen: Option<LayoutPrediction>,
    /// Why it was chosen, or why nothing is feasible.
    pub reason: String,
    /// The best two alternatives.
    pub alternatives: Vec<LayoutPrediction>,
    /// Feasible layouts considered.
    pub feasible: usize,
    /// GPU types or pinned layouts rejected, with numbers.
    pub rejected: Vec<String>,
}

struct Class {
    elig: Eligibility,
    stats: Vec<TypeStats>,
}

/// A held replica: (type, tp, pp, allocations, kept, note).
type Held = (usize, Layout, Vec<Alloc>, bool, Option<String>);

struct Dep<'a> {
    md: &'a ModelDeployment,
    namespace: String,
    name: String,
    class: usize,
    grouping: usize,
    choice: Choice,
    /// replica -> (type, tp, pp, allocations, kept, note)
    placed: BTreeMap<i32, Held>,
    unplaced: Vec<UnplacedReplica>,
    /// The disaggregation verdict, and the pools when disaggregated (which replica serves in
    /// which pool: `Dep::pool_of`).
    decision: Option<disagg::Decision>,
    pools: Option<Pools>,
    /// Whether the pools are placed (`PlanOptions::aggregated_only` off).
    place_pools: bool,
}

/// The two pools of a disaggregated deployment.
struct Pools {
    prefill: Candidate,
    decode: Candidate,
    prefill_replicas: i32,
    decode_replicas: i32,
    pair: disagg::Pair,
}

impl Pools {
    /// Prefill and decode replicas in one unit of the pair's ratio.
    fn unit(&self) -> (i32, i32) {
        (
            self.pair.prefill_replicas as i32,
            self.pair.decode_replicas as i32,
        )
    }

    /// Replicas in one unit (the index stride of [`pool_indices`]).
    fn unit_size(&self) -> i32 {
        let (p, d) = self.unit();
        (p + d).max(1)
    }
}

impl Dep<'_> {
    /// The pools this plan places, if any.
    fn placed_pools(&self) -> Option<&Pools> {
        self.pools.as_ref().filter(|_| self.place_pools)
    }

    /// Replicas to place: both pools when disaggregated.
    fn replicas(&self) -> i32 {
        self.placed_pools()
            .map_or(self.md.spec.replicas.max(0), |p| {
                p.prefill_replicas + p.decode_replicas
            })
    }

    /// The indices of the replicas to place: `0..replicas`, or each pool's slots
    /// ([`pool_indices`]) when disaggregated.
    fn indices(&self) -> Vec<i32> {
        match self.placed_pools() {
            None => (0..self.md.spec.replicas.max(0)).collect(),
            Some(p) => pool_indices((p.prefill_replicas, p.decode_replicas), p.unit()),
        }
    }

    /// The eligible nodes near the replicas of `r`'s unit already placed, nearest first: the
    /// node of the unit's first placed replica when the pools planned the KV transfer inside a
    /// node (NVLink or PCIe, [`disagg::KvLink`]), then the innermost topology group (rack, then
    /// block, zone, as `inv.topology_keys` name them) of that replica, so the KV caches a
    /// unit's prefill replicas hand to its decode replicas stay inside it. Empty without pools
    /// or for a unit's first replica.
    fn near_unit(
        &self,
        r: i32,
        ok: &[bool],
        inv: &Inventory,
        grouping: &LazyGrouping,
    ) -> Vec<Vec<bool>> {
        let Some(p) = self.placed_pools() else {
            return Vec::new();
        };
        let size = p.unit_size();
        let unit = r / size;
        let Some(first) = self
            .placed
            .range(unit * size..(unit + 1) * size)
            .next()
            .and_then(|(_, (_, _, allocs, _, _))| allocs.first())
        else {
            return Vec::new();
        };
        let node = first.node as usize;
        let mut out = Vec::new();
        if p.pair.kv_link.in_node() {
            out.push(
                ok.iter()
                    .enumerate()
                    .map(|(i, &o)| o && i == node)
                    .collect(),
            );
        }
        let grouping = grouping.get(inv);
        // Levels: node, the topology keys from the innermost, the cluster.
        if grouping.ids.len() >= 3 {
            let level = &grouping.ids[1];
            let group = level[node];
            if group != place::EXCLUDED {
                out.push(
                    ok.iter()
                        .zip(level)
                        .map(|(&o, &gid)| o && gid == group)
                        .collect(),
                );
            }
        }
        out
    }

    /// The pool replica `r` belongs to: its layout and role ([`prefill_slot`]).
    fn pool_of(&self, r: i32) -> Option<(&Candidate, &'static str)> {
        self.placed_pools().map(|p| {
            let (pre, dec) = p.unit();
            if prefill_slot(r, pre, dec) {
                (&p.prefill, "prefill")
            } else {
                (&p.decode, "decode")
            }
        })
    }
}

/// The scope a deployment's TP groups have on GPU type `t` (`Auto` resolved by NVLink).
fn scope_on(scope: TensorParallelScope, inv: &Inventory, t: usize) -> TensorParallelScope {
    scope.resolve(
        inv.types
            .get(t)
            .is_some_and(|ty| ty.model.nvlink_bidirectional_gbps > 0.0),
    )
}

fn modes(scope: TensorParallelScope) -> &'static [Mode] {
    match scope {
        TensorParallelScope::NvLinkDomain => &[Mode::Domain],
        TensorParallelScope::Node => &[Mode::Domain, Mode::Node],
        TensorParallelScope::Any => &[Mode::Domain, Mode::Node, Mode::Spread],
        // Resolved per GPU type before placement (`scope_on`); NVLink-or-node at worst.
        TensorParallelScope::Auto => &[Mode::Domain, Mode::Node],
    }
}

fn order_key(md: &ModelDeployment) -> impl Ord + use<> {
    let ts = md
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string());
    (
        std::cmp::Reverse(md.spec.priority),
        ts.is_none(),
        ts,
        md.metadata.namespace.clone().unwrap_or_default(),
        md.metadata.name.clone().unwrap_or_default(),
    )
}

/// Plan every deployment against the inventory. Existing placements are kept when their nodes
/// still exist, are schedulable for the deployment and have the GPUs; the inventory's free GPUs
/// must not already count them (exclude their pods when building it).
pub fn plan(
    inv: &Inventory,
    deployments: &[ModelDeployment],
    existing: &[ExistingPlacement],
    opts: &PlanOptions,
) -> Plan {
    let c = &opts.constants;
    let mut warnings = inv.warnings.clone();
    let mut cap = Capacity::new(inv);
    let node_index: HashMap<&str, usize> = inv
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();

    let mut sorted: Vec<&ModelDeployment> = deployments.iter().collect();
    sorted.sort_by_cached_key(|md| order_key(md));

    let mut classes: Vec<Class> = Vec::new();
    let mut class_ids: HashMap<String, usize> = HashMap::new();
    let mut groupings: Vec<LazyGrouping> = Vec::new();
    let mut grouping_ids: HashMap<Option<String>, usize> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut deps: Vec<Dep<'_>> = Vec::new();
    for md in sorted {
        let namespace = md
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = md.metadata.name.clone().unwrap_or_default();
        if !seen.insert((namespace.clone(), name.clone())) {
            warnings.push(format!(
                "{namespace}/{name}: given more than once; the later copy is ignored"
            ));
            continue;
        }
        let p = &md.spec.placement;
        let sig = serde_json::to_string(&(&p.node_selector, &p.tolerations)).unwrap_or_default();
        let class = *class_ids.entry(sig).or_insert_with(|| {
            let elig = Eligibility::compute(inv, p);
            let stats = choose::type_stats(inv, &elig);
            classes.push(Class { elig, stats });
            classes.len() - 1
        });
        let grouping = *grouping_ids
            .entry(p.pipeline_topology_key.clone())
            .or_insert_with(|| {
                groupings.push(LazyGrouping::new(p.pipeline_topology_key.as_deref()));
                groupings.len() - 1
            });
        let choice = choose::choose(
            &md.spec,
            inv,
            &classes[class].stats,
            &classes[class].elig,
            c,
        );
        let decision = disagg::decide(&md.spec, inv, &classes[class].stats, &choice, c);
        let pools = decision.as_ref().and_then(|d| {
            let (i, j, pair) = d.pair.clone().filter(|_| d.disaggregate)?;
            Some(Pools {
                prefill: choice.candidates[i].clone(),
                decode: choice.candidates[j].clone(),
                prefill_replicas: md.spec.pool_size("prefill", pair.prefill_replicas as i32),
                decode_replicas: md.spec.pool_size("decode", pair.decode_replicas as i32),
                pair,
            })
        });
        deps.push(Dep {
            md,
            namespace,
            name,
            class,
            grouping,
            choice,
            placed: BTreeMap::new(),
            unplaced: Vec::new(),
            decision,
            pools,
            place_pools: !opts.aggregated_only,
        });
    }

    // Phase 1: keep existing placements that still hold.
    let mut by_dep: HashMap<(&str, &str), Vec<&ExistingPlacement>> = HashMap::new();
    for e in existing {
        by_dep
            .entry((e.namespace.as_str(), e.name.as_str()))
            .or_default()
            .push(e);
    }
    // Existing placements record nodes and GPU counts, not which NVLink domain of a node they
    // hold. Re-reserve the ones that must sit inside one domain first, largest TP group first
    // (best fit decreasing, which packs power-of-two groups exactly), then the ones that may span
    // domains; otherwise a spanning replica could split a domain that a later one needs.
    let mut order: Vec<(usize, &ExistingPlacement)> = Vec::new();
    for (i, dep) in deps.iter().enumerate() {
        if let Some(list) = by_dep.get(&(dep.namespace.as_str(), dep.name.as_str())) {
            let mut list = list.clone();
            // A pool replica is kept only in its pool's role (placed aggregated, or in the
            // other pool, it is placed again); an aggregated one only without pools.
            list.retain(|e| e.role.as_deref() == dep.pool_of(e.replica).map(|(_, role)| role));
            list.sort_by_key(|e| e.replica);
            order.extend(list.into_iter().map(|e| (i, e)));
        }
    }
    order.sort_by_key(|&(i, e)| {
        let t = inv
            .types
            .iter()
            .position(|t| t.product == e.gpu_type)
            .unwrap_or(usize::MAX);
        let spans = scope_on(deps[i].md.spec.placement.tensor_parallel_scope, inv, t)
            != TensorParallelScope::NvLinkDomain;
        (spans, std::cmp::Reverse(e.tensor_parallel))
    });
    let indices: Vec<Vec<i32>> = deps.iter().map(Dep::indices).collect();
    for (i, e) in order {
        let dep = &mut deps[i];
        if indices[i].binary_search(&e.replica).is_err() || dep.placed.contains_key(&e.replica) {
            continue;
        }
        match keep(inv, &mut cap, &node_index, dep, &classes[dep.class].elig, e) {
            Ok((t, layout, allocs)) => {
                dep.placed
                    .insert(e.replica, (t, layout, allocs, true, None));
            }
            Err(why) => warnings.push(format!(
                "{}/{} replica {}: previous placement dropped and re-planned: {why}",
                dep.namespace, dep.name, e.replica
            )),
        }
    }

    // Phase 2: place the rest, in priority order. Within one priority, every deployment's
    // chosen layout is tried first (pass 0) and fallbacks only after (pass 1): a fallback is
    // usually a bigger or slower layout, and letting it take GPUs that another deployment of the
    // same priority would use for its first choice costs both of them.
    // (GPU type, TP, PP, data-parallel attention, scope, grouping, eligibility class): layouts
    // that found no room, with why, so a later replica does not search again.
    type FailedKey = (usize, u32, u32, bool, u8, usize, usize);
    let mut failed: HashMap<FailedKey, String> = HashMap::new();
    let mut level_start = 0;
    while level_start < deps.len() {
        let priority = deps[level_start].md.spec.priority;
        let level_end = deps[level_start..]
            .iter()
            .position(|d| d.md.spec.priority != priority)
            .map_or(deps.len(), |k| level_start + k);
        for pass in 0..2 {
            for (dep, indices) in deps[level_start..level_end]
                .iter_mut()
                .zip(&indices[level_start..level_end])
            {
                let scope = dep.md.spec.placement.tensor_parallel_scope;
                let ok = &classes[dep.class].elig.ok;
                let g = &groupings[dep.grouping];
                for &r in indices {
                    if dep.placed.contains_key(&r) {
                        continue;
                    }
                    if pass == 0 && dep.choice.candidates.is_empty() {
                        continue;
                    }
                    if dep.choice.candidates.is_empty() {
                        let (why, _) = choose::explain(inv, &dep.md.spec, &dep.choice);
                        dep.unplaced.push(UnplacedReplica {
                            replica: r,
                            reason: why,
                        });
                        continue;
                    }
                    let mut first_reason: Option<String> = None;
                    let mut done = false;
                    let tries = if pass == 0 || opts.first_choice_only {
                        1
                    } else {
                        dep.choice.candidates.len()
                    };
                    // A pool's replicas take its layout only.
                    let cands: Vec<&Candidate> = match dep.pool_of(r) {
                        Some((cand, _)) => vec![cand],
                        None => dep.choice.candidates.iter().take(tries).collect(),
                    };
                    for cand in cands {
                        let key = (
                            cand.gpu_type,
                            cand.tp,
                            cand.pp,
                            cand.data_attention,
                            scope as u8,
                            dep.grouping,
                            dep.class,
                        );
                        // A pool replica tries near its unit first, then anywhere.
                        let res = match failed.get(&key) {
                            Some(why) => Err(why.clone()),
                            None => dep
                                .near_unit(r, ok, inv, g)
                                .iter()
                                .find_map(|near| try_place(inv, &cap, cand, scope, near, g).ok())
                                .map_or_else(|| try_place(inv, &cap, cand, scope, ok, g), Ok),
                        };
                        match res {
                            Ok(allocs) => {
                                for a in &allocs {
                                    cap.take(a);
                                }
                                let note = first_reason.as_ref().map(|why| {
                                    let first = &dep.choice.candidates[0];
                                    format!(
                                        "fell back from {} to {}: {why}",
                                        first.label(inv),
                                        cand.label(inv)
                                    )
                                });
                                if let Some(n) = &note {
                                    warnings.push(format!(
                                        "{}/{} replica {r}: {n}",
                                        dep.namespace, dep.name
                                    ));
                                }
                                dep.placed
                                    .insert(r, (cand.gpu_type, cand.layout(), allocs, false, note));
                                done = true;
                                break;
                            }
                            Err(why) => {
                                failed.insert(key, why.clone());
                                if first_reason.is_none() {
                                    first_reason = Some(why);
                                }
                            }
                        }
                    }
                    if !done && pass == 1 {
                        let (n, first) = match dep.pool_of(r) {
                            Some((cand, _)) => (1, cand),
                            None => (dep.choice.candidates.len(), &dep.choice.candidates[0]),
                        };
                        let mut reason =
                            format!("{}: {}", first.label(inv), first_reason.unwrap_or_default());
                        if n > 1 {
                            reason.push_str(&format!(
                                "; the {} other feasible layouts have no room either",
                                n - 1
                            ));
                        }
                        dep.unplaced.push(UnplacedReplica { replica: r, reason });
                    }
                }
            }
        }
        level_start = level_end;
    }

    let deployments = deps
        .into_iter()
        .map(|dep| {
            let replicas = dep.replicas();
            let (reason, alternatives) = choose::explain(inv, &dep.md.spec, &dep.choice);
            let chosen = dep
                .choice
                .candidates
                .first()
                .map(|c| choose::layout(inv, c, None));
            let work = choose::workload(&dep.md.spec);
            let roles: BTreeMap<i32, &'static str> = dep
                .placed
                .keys()
                .filter_map(|&r| dep.pool_of(r).map(|(_, role)| (r, role)))
                .collect();
            let placed: Vec<PlacedReplica> = dep
                .placed
                .into_iter()
                .map(|(r, (t, layout, allocs, kept, note))| {
                    let (tp, pp) = (layout.tp, layout.pp);
                    let links = c.calibrated_links(
                        &inv.types[t].model,
                        tp,
                        pp,
                        dep.md.spec.engine.name.as_str(),
                        actual_links(inv, t, &allocs, c),
                    );
                    let e = c.calibrated(
                        &inv.types[t].model,
                        tp,
                        pp,
                        dep.md.spec.engine.name.as_str(),
                        cost::estimate_layout(
                            &dep.md.spec.model.architecture,
                            work,
                            &inv.types[t].model,
                            layout,
                            links,
                            c,
                        ),
                    );
                    PlacedReplica {
                        replica: r,
                        gpu_type: inv.types[t].product.clone(),
                        tensor_parallel: tp as i32,
                        pipeline_parallel: pp as i32,
                        expert_parallel: (layout.ep > 1).then_some(layout.ep as i32),
                        data_parallel_attention: layout.data_attention,
                        stages: stages_of(inv, &allocs),
                        predicted: e.prediction(),
                        kept,
                        note,
                        role: roles.get(&r).map(|x| (*x).to_owned()),
                    }
                })
                .collect();
            let disaggregation = dep.decision.as_ref().map(|d| DisaggregationPlan {
                disaggregated: dep.pools.is_some(),
                reason: d.reason.clone(),
                pools: dep
                    .pools
                    .as_ref()
                    .map(|p| pool_statuses(inv, p, &placed, c))
                    .unwrap_or_default(),
            });
            DeploymentPlan {
                namespace: dep.namespace,
                name: dep.name,
                priority: dep.md.spec.priority,
                replicas,
                placed,
                unplaced: dep.unplaced,
                choice: ChoiceReport {
                    chosen,
                    reason,
                    alternatives,
                    feasible: dep.choice.candidates.len(),
                    rejected: dep.choice.rejected,
                },
                disaggregation,
            }
        })
        .collect();
    Plan {
        deployments,
        warnings,
    }
}

/// The link the KV caches of the placed units cross: the planned in-node link where every
/// placed replica of every unit shares one node, else the fabric (`None` with nothing placed).
fn placed_kv_link(p: &Pools, placed: &[PlacedReplica]) -> Option<disagg::KvLink> {
    let size = p.unit_size();
    let mut units: BTreeMap<i32, std::collections::BTreeSet<&str>> = BTreeMap::new();
    for r in placed {
        units
            .entry(r.replica / size)
            .or_default()
            .extend(r.stages.iter().map(|s| s.node.as_str()));
    }
    if units.is_empty() {
        return None;
    }
    let one_node = units.values().all(|nodes| nodes.len() == 1);
    Some(if p.pair.kv_link.in_node() && one_node {
        p.pair.kv_link
    } else {
        disagg::KvLink::Fabric
    })
}

/// The status of both pools: layout, replicas, the nodes they were placed on, predictions (the
/// time to first token with the KV transfer over the link the placement gives).
fn pool_statuses(
    inv: &Inventory,
    p: &Pools,
    placed: &[PlacedReplica],
    c: &CostConstants,
) -> Vec<crate::api::PoolStatus> {
    let pool = |cand: &Candidate, role: &str, replicas: i32, per_unit: u32| {
        let mut nodes: Vec<String> = placed
            .iter()
            .filter(|r| r.role.as_deref() == Some(role))
            .flat_map(|r| r.stages.iter().map(|s| s.node.clone()))
            .collect();
        nodes.sort();
        nodes.dedup();
        crate::api::PoolStatus {
            role: role.to_owned(),
            gpu_type: inv.types[cand.gpu_type].product.clone(),
            tensor_parallel: cand.tp as i32,
            pipeline_parallel: cand.pp as i32,
            expert_parallel: (cand.ep > 1).then_some(cand.ep as i32),
            data_parallel_attention: cand.data_attention,
            replicas,
            replicas_per_unit: per_unit as i32,
            kv_transfer_link: None,
            nodes,
            batch: None,
            time_to_first_token_seconds: None,
            inter_token_latency_seconds: None,
            requests_per_second_per_replica: 0.0,
        }
    };
    let x = &p.pair;
    let mut prefill = pool(
        &p.prefill,
        "prefill",
        p.prefill_replicas,
        x.prefill_replicas,
    );
    let link = placed_kv_link(p, placed).unwrap_or(x.kv_link);
    let ttft = if link == x.kv_link {
        x.time_to_first_token_seconds
    } else {
        let fabric = c.fabric_link();
        x.time_to_first_token_seconds - x.kv_transfer_seconds
            + cost::send_seconds(x.kv_bytes_per_lane, fabric)
    };
    prefill.time_to_first_token_seconds = Some(round3(ttft));
    prefill.kv_transfer_link = Some(link.as_str().to_owned());
    prefill.requests_per_second_per_replica = round3(x.prefill_requests_per_second);
    let mut decode = pool(&p.decode, "decode", p.decode_replicas, x.decode_replicas);
    decode.batch = Some(x.decode_batch as i32);
    decode.inter_token_latency_seconds = Some(round3(x.inter_token_latency_seconds));
    decode.requests_per_second_per_replica = round3(x.decode_requests_per_second);
    vec![prefill, decode]
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn try_place(
    inv: &Inventory,
    cap: &Capacity,
    cand: &Candidate,
    scope: TensorParallelScope,
    ok: &[bool],
    g: &LazyGrouping,
) -> Result<Vec<Alloc>, String> {
    let short = inv.types[cand.gpu_type].short();
    let mut last = String::new();
    // An expert-parallel group with data-parallel attention has no all-reduce: it may span
    // nodes (its all-to-all then crosses the fabric), after the tighter modes.
    let base = modes(scope_on(scope, inv, cand.gpu_type));
    let spread_too = cand.data_attention && !base.contains(&Mode::Spread);
    for &mode in base.iter().chain(spread_too.then_some(&Mode::Spread)) {
        match cap.find(cand.gpu_type, cand.tp, cand.pp, mode, ok, g, short, inv) {
            Ok(a) => return Ok(a),
            Err(e) => last = e.0,
        }
    }
    Err(last)
}

/// Reserve an existing placement again, all or nothing.
fn keep(
    inv: &Inventory,
    cap: &mut Capacity,
    node_index: &HashMap<&str, usize>,
    dep: &Dep<'_>,
    elig: &Eligibility,
    e: &ExistingPlacement,
) -> Result<(usize, Layout, Vec<Alloc>), String> {
    let t = inv
        .types
        .iter()
        .position(|t| t.product == e.gpu_type)
        .ok_or_else(|| format!("no node has {} GPUs any more", e.gpu_type))?;
    let layout = e.layout();
    let (tp, pp) = (layout.tp, layout.pp);
    if !dep
        .choice
        .candidates
        .iter()
        .any(|c| c.gpu_type == t && c.layout() == layout)
    {
        return Err(format!(
            "{} is no longer a feasible layout for the spec",
            choose::label(inv, t, layout)
        ));
    }
    if let Some((cand, role)) = dep.pool_of(e.replica)
        && (cand.gpu_type != t || cand.layout() != layout)
    {
        return Err(format!(
            "the {role} pool is now {}, not {}",
            cand.label(inv),
            choose::label(inv, t, layout)
        ));
    }
    let mut per_stage = vec![0u32; pp as usize];
    for s in &e.stages {
        if s.stage < 0 || s.stage as u32 >= pp || s.gpus <= 0 {
            return Err(format!(
                "stage {} with {} GPUs does not match PP={pp}",
                s.stage, s.gpus
            ));
        }
        per_stage[s.stage as usize] += s.gpus as u32;
    }
    if per_stage.iter().any(|&g| g != tp) {
        return Err(format!("stages do not hold TP={tp} GPUs each"));
    }
    let scope = scope_on(dep.md.spec.placement.tensor_parallel_scope, inv, t);
    let mut taken: Vec<Alloc> = Vec::new();
    let undo = |cap: &mut Capacity, taken: &[Alloc]| {
        for a in taken {
            cap.give(a);
        }
    };
    for s in &e.stages {
        let Some(&n) = node_index.get(s.node.as_str()) else {
            undo(cap, &taken);
            return Err(format!("node {} is gone", s.node));
        };
        if !elig.ok[n] {
            undo(cap, &taken);
            return Err(format!("node {} is not schedulable for it", s.node));
        }
        if inv.nodes[n].gpu_type != t {
            undo(cap, &taken);
            return Err(format!("node {} no longer has {} GPUs", s.node, e.gpu_type));
        }
        let mut need = s.gpus as u32;
        let free = &cap.free[n];
        let mut plan: Vec<(u32, u32)> = Vec::new();
        // A data-parallel-attention group may spread over domains and nodes (see `try_place`).
        if scope == TensorParallelScope::NvLinkDomain && !layout.data_attention {
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, f)| **f >= need)
                .min_by_key(|(d, f)| (**f, *d));
            match best {
                Some((d, _)) => plan.push((d as u32, need)),
                None => {
                    undo(cap, &taken);
                    return Err(format!(
                        "node {} has no NVLink domain with {need} free GPUs",
                        s.node
                    ));
                }
            }
        } else {
            let mut doms: Vec<(u32, usize)> = free.iter().copied().zip(0..).collect();
            doms.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            for (f, d) in doms {
                if need == 0 {
                    break;
                }
                let k = f.min(need);
                if k > 0 {
                    plan.push((d as u32, k));
                    need -= k;
                }
            }
            if need > 0 {
                undo(cap, &taken);
                return Err(format!("node {} lacks {} free GPUs", s.node, s.gpus));
            }
        }
        for (d, k) in plan {
            let a = Alloc {
                stage: s.stage as u32,
                node: n as u32,
                domain: d,
                gpus: k,
            };
            cap.take(&a);
            taken.push(a);
        }
    }
    Ok((t, layout, taken))
}

/// Merge allocations into one entry per (stage, node), in stage order.
fn stages_of(inv: &Inventory, allocs: &[Alloc]) -> Vec<StagePlacement> {
    let mut m: BTreeMap<(u32, u32), u32> = BTreeMap::new();
    let mut order: Vec<(u32, u32)> = Vec::new();
    for a in allocs {
        let k = (a.stage, a.node);
        if !m.contains_key(&k) {
            order.push(k);
        }
        *m.entry(k).or_insert(0) += a.gpus;
    }
    order.sort_by_key(|&(s, _)| s);
    order
        .into_iter()
        .map(|(s, n)| StagePlacement {
            stage: s as i32,
            node: inv.nodes[n as usize].name.clone(),
            gpus: m[&(s, n)] as i32,
        })
        .collect()
}

fn slower(a: Link, b: Link) -> Link {
    if b.gbps < a.gbps || (b.gbps == a.gbps && b.latency_s > a.latency_s) {
        b
    } else {
        a
    }
}

/// The links a placement actually gets: NVLink inside one domain, PCIe across domains of one
/// node, the fabric across nodes; the slowest over stages and stage boundaries.
pub fn actual_links(inv: &Inventory, t: usize, allocs: &[Alloc], c: &CostConstants) -> Links {
    let model = &inv.types[t].model;
    let pcie = c.pcie_link(model);
    let fabric = c.fabric_link();
    let domain_link = |node: u32| {
        let n = &inv.nodes[node as usize];
        if n.nvlink_gbps > 0.0 {
            Link {
                gbps: n.nvlink_gbps,
                latency_s: c.nvlink_latency_s,
            }
        } else {
            pcie
        }
    };
    let mut by_stage: BTreeMap<u32, Vec<&Alloc>> = BTreeMap::new();
    for a in allocs {
        by_stage.entry(a.stage).or_default().push(a);
    }
    let within = |xs: &[&Alloc]| -> Link {
        let first = xs[0];
        if xs.iter().any(|a| a.node != first.node) {
            fabric
        } else if xs.iter().any(|a| a.domain != first.domain) {
            pcie
        } else if inv.nodes[first.node as usize].domains[first.domain as usize] > 1 {
            domain_link(first.node)
        } else {
            pcie
        }
    };
    let mut tp: Option<Link> = None;
    for xs in by_stage.values() {
        let l = within(xs);
        tp = Some(tp.map_or(l, |p| slower(p, l)));
    }
    let stages: Vec<&Vec<&Alloc>> = by_stage.values().collect();
    let mut pp: Option<Link> = None;
    for w in stages.windows(2) {
        let mut both: Vec<&Alloc> = w[0].clone();
        both.extend(w[1].iter());
        let l = within(&both);
        pp = Some(pp.map_or(l, |p| slower(p, l)));
    }
    let nominal = domain_link(allocs.first().map_or(0, |a| a.node));
    // The all-to-all of a stage: its GPUs inside the smallest share one fast domain holds,
    // the rest over the fabric (or PCIe between domains of one node); the slowest stage.
    let mut ep: Option<Link> = None;
    for xs in by_stage.values() {
        let group: u32 = xs.iter().map(|a| a.gpus).sum();
        let local = xs.iter().map(|a| a.gpus).min().unwrap_or(1);
        let first = xs[0];
        let inside = if inv.nodes[first.node as usize].domains[first.domain as usize] > 1 {
            domain_link(first.node)
        } else {
            pcie
        };
        let across = if xs.iter().any(|a| a.node != first.node) {
            fabric
        } else {
            pcie
        };
        let l = cost::all_to_all_link(group, local, c.all_to_all(inside), across);
        ep = Some(ep.map_or(l, |p| slower(p, l)));
    }
    Links {
        tp: tp.unwrap_or(nominal),
        pp: pp.unwrap_or(fabric),
        ep: ep.unwrap_or(c.all_to_all(nominal)),
    }
}
