//! Choosing GPU type x tensor-parallel x pipeline-parallel for one deployment.
//!
//! Every layout that satisfies the head, KV-head and layer rules, the domain sizes the scope
//! allows and memory fit is predicted with the cost model, then ranked:
//! 1. GPU type preference: the position of the first `spec.gpu.types` entry that names the type
//!    (all types rank equal when the list is empty);
//! 2. highest predicted decode tokens/s per GPU (the objective);
//! 3. fewer GPUs, lower TP, lower PP, then product name (deterministic tie-breaks).
//!
//! The first is the choice; the rest are the fallbacks placement tries in order when the
//! choice has no room.

use super::catalog::short_name_matches;
use super::cost::{
    CostConstants, Estimate, Layout, Link, Links, Workload, all_to_all_link, estimate_layout,
};
use super::inventory::{Eligibility, Inventory};
use crate::api::{
    AttentionParallelism, LayoutPrediction, ModelArchitecture, ModelDeploymentSpec,
    TensorParallelScope,
};

/// Upper bound on GPUs per replica (the API's `MAX_GPUS_PER_REPLICA`).
pub const MAX_GPUS: u32 = crate::api::MAX_GPUS_PER_REPLICA;

/// What the eligible nodes of one GPU type offer a deployment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TypeStats {
    pub nodes: usize,
    pub gpus: u32,
    /// Largest NVLink domain (allocatable GPUs) on an eligible node.
    pub largest_domain: u32,
    /// Most allocatable GPUs on one eligible node.
    pub largest_node: u32,
    /// Slowest NVLink bandwidth per GPU per direction among eligible nodes with NVLink, GB/s.
    pub nvlink_gbps: f64,
}

/// Per-type statistics over the eligible nodes.
pub fn type_stats(inv: &Inventory, elig: &Eligibility) -> Vec<TypeStats> {
    let mut out = vec![TypeStats::default(); inv.types.len()];
    for (i, n) in inv.nodes.iter().enumerate() {
        if !elig.ok[i] {
            continue;
        }
        let s = &mut out[n.gpu_type];
        s.nodes += 1;
        s.gpus += n.allocatable;
        s.largest_node = s.largest_node.max(n.allocatable);
        let d = n.domains.iter().copied().max().unwrap_or(0);
        s.largest_domain = s.largest_domain.max(d);
        if d > 1 && n.nvlink_gbps > 0.0 {
            s.nvlink_gbps = if s.nvlink_gbps > 0.0 {
                s.nvlink_gbps.min(n.nvlink_gbps)
            } else {
                n.nvlink_gbps
            };
        }
    }
    out
}

/// One feasible layout.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// Index into [`Inventory::types`].
    pub gpu_type: usize,
    pub tp: u32,
    pub pp: u32,
    /// Expert-parallel degree (1: experts, if any, sharded by TP).
    pub ep: u32,
    /// Attention data-parallel inside the expert-parallel group.
    pub data_attention: bool,
    /// Preference rank of the GPU type (0 is best).
    pub rank: usize,
    pub estimate: Estimate,
}

impl Candidate {
    pub fn layout(&self) -> Layout {
        Layout {
            tp: self.tp,
            pp: self.pp,
            ep: self.ep,
            data_attention: self.data_attention,
        }
    }
    /// `H800 EP=16 DP-attention`.
    pub fn label(&self, inv: &Inventory) -> String {
        label(inv, self.gpu_type, self.layout())
    }
    pub fn gpus(&self) -> u32 {
        self.tp * self.pp
    }
    /// The objective: decode tokens/s per GPU.
    pub fn per_gpu(&self) -> f64 {
        self.estimate.per_gpu(self.gpus())
    }
}

/// The ranked feasible layouts of a deployment and why the others were dropped.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Choice {
    /// Feasible layouts, best first.
    pub candidates: Vec<Candidate>,
    /// Why GPU types or pinned layouts were rejected, with numbers.
    pub rejected: Vec<String>,
}

/// The links a layout gets at best on a type, before placement: NVLink inside a domain, PCIe
/// inside a node, the fabric between nodes.
pub fn nominal_links(
    inv: &Inventory,
    t: usize,
    stats: &TypeStats,
    tp: u32,
    pp: u32,
    c: &CostConstants,
) -> Links {
    let model = &inv.types[t].model;
    let nvlink = Link {
        gbps: stats.nvlink_gbps,
        latency_s: c.nvlink_latency_s,
    };
    let pcie = c.pcie_link(model);
    let fabric = c.fabric_link();
    let link_for = |n: u32| {
        if n <= stats.largest_domain && stats.nvlink_gbps > 0.0 && stats.largest_domain > 1 {
            nvlink
        } else if n <= stats.largest_node {
            pcie
        } else {
            fabric
        }
    };
    // The expert all-to-all of a stage of `tp` GPUs: inside one NVLink domain (or node) where
    // it fits, else spread over whole nodes with the rest over the fabric.
    let inside = if stats.nvlink_gbps > 0.0 && stats.largest_domain > 1 {
        nvlink
    } else {
        pcie
    };
    let local = tp
        .min(stats.largest_domain.max(1))
        .min(stats.largest_node.max(1));
    Links {
        tp: link_for(tp),
        pp: link_for(tp * pp),
        ep: all_to_all_link(tp, local, c.all_to_all(inside), fabric),
    }
}

/// The (tensor, expert, data-parallel attention) splits of a stage the model allows, for every
/// stage size up to [`MAX_GPUS`]: tensor parallelism where the heads allow it (experts sharded
/// like a dense feed-forward), and for a mixture of experts, expert parallelism over the
/// stage's GPUs (experts divisible by it) with tensor-parallel or data-parallel attention,
/// as `spec.parallelism` pins them.
pub fn stage_splits(spec: &ModelDeploymentSpec) -> Vec<(u32, u32, bool)> {
    let arch: &ModelArchitecture = &spec.model.architecture;
    let heads = arch.attention_heads.max(1) as u32;
    let kv = arch.kv_heads.max(1) as u32;
    let p = &spec.parallelism;
    let experts = arch.experts.unwrap_or(0).max(0) as u32;
    // The Tessera engine splits a mixture's experts over its tensor-parallel ranks (EP = TP,
    // combined by the all-reduce) and runs attention tensor-parallel (docs/worker.md).
    let tessera = spec.engine.name == crate::api::EngineName::Tessera;
    let mut out = Vec::new();
    for tp in 1..=MAX_GPUS {
        if p.tensor.fixed().is_some_and(|t| t != tp) {
            continue;
        }
        let ep_ok = |ep: u32| p.expert.fixed().is_none_or(|e| e == ep);
        let heads_ok = valid_tp(heads, kv, tp);
        if tessera && arch.is_moe() {
            let ep = if tp > 1 { tp } else { 1 };
            if heads_ok
                && experts.is_multiple_of(tp)
                && ep_ok(ep)
                && p.attention != AttentionParallelism::Data
            {
                out.push((tp, ep, false));
            }
            continue;
        }
        let tensor_attention = p.attention != AttentionParallelism::Data;
        if heads_ok && ep_ok(1) && tensor_attention {
            out.push((tp, 1, false));
        }
        if !arch.is_moe() || tp < 2 || !experts.is_multiple_of(tp) || !ep_ok(tp) {
            continue;
        }
        if heads_ok && tensor_attention {
            out.push((tp, tp, false));
        }
        if p.attention != AttentionParallelism::Tensor {
            out.push((tp, tp, true));
        }
    }
    out
}

/// The workload a deployment's spec asks each replica to hold.
pub fn workload(spec: &ModelDeploymentSpec) -> Workload {
    Workload {
        concurrency: f64::from(spec.serving.max_concurrency.max(1)),
        context: f64::from(
            spec.serving
                .context_length
                .unwrap_or(spec.model.architecture.context_length)
                .max(1),
        ),
        kv_bytes: spec.serving.kv_cache_dtype.bytes(),
    }
}

/// TP degrees the model's heads allow: divides the attention heads, and divides or is a
/// multiple of the KV heads.
pub fn valid_tp(heads: u32, kv_heads: u32, tp: u32) -> bool {
    tp >= 1
        && heads.is_multiple_of(tp)
        && (kv_heads.is_multiple_of(tp) || tp.is_multiple_of(kv_heads))
}

/// Preference rank of each inventory type for a spec (None: not allowed).
pub fn type_ranks(inv: &Inventory, spec: &ModelDeploymentSpec) -> Vec<Option<usize>> {
    inv.types
        .iter()
        .map(|t| {
            if spec.gpu.types.is_empty() {
                Some(0)
            } else {
                spec.gpu.types.iter().position(|s| {
                    short_name_matches(s, &t.product) || s.eq_ignore_ascii_case(&t.model.name)
                })
            }
        })
        .collect()
}

/// Enumerate, predict and rank the layouts of one deployment.
pub fn choose(
    spec: &ModelDeploymentSpec,
    inv: &Inventory,
    stats: &[TypeStats],
    elig: &Eligibility,
    c: &CostConstants,
) -> Choice {
    let arch = &spec.model.architecture;
    let work = workload(spec);
    let layers = arch.layers.max(1) as u32;
    let splits = stage_splits(spec);
    let pinned_tp = spec.parallelism.tensor.fixed();
    let pinned_pp = spec.parallelism.pipeline.fixed();
    let scope = spec.placement.tensor_parallel_scope;
    let ranks = type_ranks(inv, spec);
    let mut choice = Choice::default();

    for want in &spec.gpu.types {
        let present = inv.types.iter().any(|t| {
            short_name_matches(want, &t.product) || want.eq_ignore_ascii_case(&t.model.name)
        });
        if !present {
            choice
                .rejected
                .push(format!("{want}: no node in the cluster has {want} GPUs"));
        }
    }

    let mut order: Vec<usize> = (0..inv.types.len())
        .filter(|&t| ranks[t].is_some())
        .collect();
    order.sort_by_key(|&t| (ranks[t], inv.types[t].product.clone()));
    for t in order {
        let rank = ranks[t].unwrap_or(0);
        let ty = &inv.types[t];
        let short = ty.short();
        let st = &stats[t];
        if st.nodes == 0 {
            let why = elig.summary();
            choice.rejected.push(if why.is_empty() {
                format!("{short}: no schedulable node has {short} GPUs")
            } else {
                format!("{short}: no schedulable node has {short} GPUs ({why})")
            });
            continue;
        }
        if let Some(min) = spec.gpu.min_memory_gi_b
            && ty.model.memory_gib() < f64::from(min)
        {
            choice.rejected.push(format!(
                "{short}: has {:.1} GiB per GPU, below gpu.minMemoryGiB {min}",
                ty.model.memory_gib()
            ));
            continue;
        }
        let scope = scope.resolve(ty.model.nvlink_bidirectional_gbps > 0.0);
        let max_tp = match scope {
            TensorParallelScope::NvLinkDomain => st.largest_domain,
            TensorParallelScope::Node => st.largest_node,
            TensorParallelScope::Any | TensorParallelScope::Auto => st.gpus,
        }
        .min(MAX_GPUS);
        let before = choice.candidates.len();
        let mut last_reason: Option<String> = None;
        for &(tp, ep, data_attention) in &splits {
            let layout_of = |pp| Layout {
                tp,
                pp,
                ep,
                data_attention,
            };
            // Data-parallel attention has no all-reduce: its group may span nodes.
            if tp > max_tp && !(data_attention && tp <= st.gpus) {
                let reason = match scope {
                    TensorParallelScope::NvLinkDomain => format!(
                        "{short}: tensor={tp} needs {tp} GPUs in one NVLink domain of {short} but the largest is {}",
                        st.largest_domain
                    ),
                    TensorParallelScope::Node => format!(
                        "{short}: tensor={tp} needs {tp} GPUs on one node of {short} but the largest has {}",
                        st.largest_node
                    ),
                    TensorParallelScope::Any | TensorParallelScope::Auto => format!(
                        "{short}: tensor={tp} needs {tp} GPUs of {short} but schedulable nodes have {}",
                        st.gpus.min(MAX_GPUS)
                    ),
                };
                if pinned_tp.is_some() || last_reason.is_none() {
                    last_reason = Some(reason);
                }
                continue;
            }
            let pps: Vec<u32> = match pinned_pp {
                Some(pp) => vec![pp],
                None => (1..=layers).collect(),
            };
            let mut fitted = 0;
            for pp in pps {
                // vLLM's data-parallel engines each hold a whole pipeline on one node, so it
                // cannot run a stage's data-parallel attention group on that stage's own nodes
                // (docs/engines.md).
                if data_attention && pp > 1 && spec.engine.name == crate::api::EngineName::Vllm {
                    if pinned_pp.is_some() {
                        last_reason = Some(format!(
                            "{short}: {} needs one pipeline stage with vLLM: its data-parallel engines each hold a whole pipeline; set parallelism.pipeline: 1 or attention: tensor",
                            layout_of(pp).label()
                        ));
                    }
                    continue;
                }
                let gpus = tp * pp;
                if gpus > MAX_GPUS {
                    last_reason = Some(format!(
                        "{short}: tensor={tp} x pipeline={pp} needs {gpus} GPUs, more than the {MAX_GPUS} a replica may use"
                    ));
                    break;
                }
                if gpus > st.gpus {
                    last_reason = Some(format!(
                        "{short}: tensor={tp} x pipeline={pp} needs {gpus} GPUs of {short} but schedulable nodes have {}",
                        st.gpus
                    ));
                    break;
                }
                let links = c.calibrated_links(
                    &ty.model,
                    tp,
                    pp,
                    spec.engine.name.as_str(),
                    nominal_links(inv, t, st, tp, pp, c),
                );
                let e = c.calibrated(
                    &ty.model,
                    tp,
                    pp,
                    spec.engine.name.as_str(),
                    estimate_layout(arch, work, &ty.model, layout_of(pp), links, c),
                );
                if e.fits {
                    choice.candidates.push(Candidate {
                        gpu_type: t,
                        tp,
                        pp,
                        ep,
                        data_attention,
                        rank,
                        estimate: e,
                    });
                    fitted += 1;
                    if fitted >= 2 {
                        break;
                    }
                } else if fitted == 0 {
                    last_reason = Some(format!(
                        "{short}: {} does not fit: needs {:.1} GiB per GPU \
                         ({:.1} weights + {:.1} KV cache for {} x {} tokens + {:.1} overhead), {short} has {:.1} GiB x {}",
                        layout_of(pp).label(),
                        e.memory_per_gpu_gib,
                        e.weights_gib,
                        e.kv_cache_gib,
                        work.concurrency,
                        work.context,
                        e.overhead_gib,
                        ty.model.memory_gib(),
                        c.memory_utilization_cap
                    ));
                }
            }
        }
        if choice.candidates.len() == before {
            choice
                .rejected
                .push(last_reason.unwrap_or_else(|| {
                    if arch.is_moe() && spec.engine.name == crate::api::EngineName::Tessera {
                        format!(
                            "{short}: no layout the tessera engine runs: it splits the {} experts over its tensor-parallel ranks (expert = tensor, which must divide the experts and the heads) with tensor-parallel attention; unpin parallelism.expert/attention, or use engine vllm or sglang",
                            arch.experts.unwrap_or(0)
                        )
                    } else {
                        format!("{short}: no tensor degree fits the model's heads")
                    }
                }));
        }
    }

    choice.candidates.sort_by(|a, b| {
        a.rank
            .cmp(&b.rank)
            .then(b.per_gpu().total_cmp(&a.per_gpu()))
            .then(a.gpus().cmp(&b.gpus()))
            .then(a.tp.cmp(&b.tp))
            .then(a.pp.cmp(&b.pp))
            .then(a.ep.cmp(&b.ep))
            .then(a.data_attention.cmp(&b.data_attention))
            .then(
                inv.types[a.gpu_type]
                    .product
                    .cmp(&inv.types[b.gpu_type].product),
            )
    });
    choice
}

/// A candidate as the API's `LayoutPrediction`.
pub fn layout(inv: &Inventory, cand: &Candidate, note: Option<String>) -> LayoutPrediction {
    LayoutPrediction {
        gpu_type: inv.types[cand.gpu_type].product.clone(),
        tensor_parallel: cand.tp as i32,
        pipeline_parallel: cand.pp as i32,
        expert_parallel: (cand.ep > 1).then_some(cand.ep as i32),
        data_parallel_attention: cand.data_attention,
        predicted: cand.estimate.prediction(),
        note,
    }
}

/// Short label of a layout: `H100 TP=4 PP=1`, `H800 EP=16 DP-attention`.
pub fn label(inv: &Inventory, t: usize, layout: Layout) -> String {
    format!("{} {}", inv.types[t].short(), layout.label())
}

/// What the choice of a mixture-of-experts layout rests on: the expert all-to-all's bandwidth
/// and time per layer, or that experts are sharded by tensor parallelism.
fn moe_summary(spec: &ModelDeploymentSpec, c: &Candidate) -> Option<String> {
    let arch = &spec.model.architecture;
    if !arch.is_moe() {
        return None;
    }
    let active = format!(
        "{:.1}B of {:.1}B parameters active per token",
        arch.active_parameters() as f64 / 1e9,
        arch.parameters as f64 / 1e9
    );
    let e = &c.estimate;
    Some(if c.ep > 1 {
        format!(
            "; {active}; {} experts per GPU, expert all-to-all at {:.0} GB/s per GPU: {:.0} us per MoE layer per decode step ({:.1} ms of the {:.1} ms step){}",
            arch.experts.unwrap_or(0) as u32 / c.ep,
            e.all_to_all_gbps,
            e.all_to_all_seconds_per_layer * 1e6,
            e.decode_all_to_all_seconds * 1e3,
            spec.serving.max_concurrency.max(1) as f64 / e.decode_tokens_per_second * 1e3,
            if c.data_attention {
                ", attention data-parallel (no all-reduce, each GPU keeps its own sequences' KV cache)"
            } else {
                ""
            }
        )
    } else {
        format!("; {active}; experts sharded by tensor parallelism (all-reduce, no all-to-all)")
    })
}

/// Why the first candidate was chosen, and the two most instructive alternatives (the
/// runner-up on the same GPU type, then the best on another type) with their notes.
pub fn explain(
    inv: &Inventory,
    spec: &ModelDeploymentSpec,
    choice: &Choice,
) -> (String, Vec<LayoutPrediction>) {
    let Some(best) = choice.candidates.first() else {
        return (
            if choice.rejected.is_empty() {
                "no layout is feasible".into()
            } else {
                format!("no layout is feasible: {}", choice.rejected.join("; "))
            },
            Vec::new(),
        );
    };
    let same = choice
        .candidates
        .iter()
        .filter(|c| c.gpu_type == best.gpu_type)
        .count();
    let pref = if spec.gpu.types.is_empty() {
        String::new()
    } else {
        format!(
            ", {} is preference {} of gpu.types",
            inv.types[best.gpu_type].short(),
            best.rank + 1
        )
    };
    let mut why = format!(
        "highest predicted decode tokens/s per GPU ({:.0}) of {same} feasible layouts on {}{pref}",
        best.per_gpu(),
        inv.types[best.gpu_type].short()
    );
    if let Some(moe) = moe_summary(spec, best) {
        why.push_str(&moe);
    }
    let mut alts: Vec<&Candidate> = Vec::new();
    if let Some(c) = choice
        .candidates
        .iter()
        .skip(1)
        .find(|c| c.gpu_type == best.gpu_type)
    {
        alts.push(c);
    }
    if let Some(c) = choice
        .candidates
        .iter()
        .find(|c| c.gpu_type != best.gpu_type)
    {
        alts.push(c);
    }
    for c in choice.candidates.iter().skip(1) {
        if alts.len() >= 2 {
            break;
        }
        if !alts.iter().any(|a| std::ptr::eq(*a, c)) {
            alts.push(c);
        }
    }
    let alts = alts
        .into_iter()
        .map(|c| {
            let rel = (c.per_gpu() / best.per_gpu() - 1.0) * 100.0;
            let mut note = format!(
                "{:.0} decode tokens/s per GPU ({rel:+.0}%), TTFT {:.3} s",
                c.per_gpu(),
                c.estimate.time_to_first_token_seconds
            );
            if c.estimate.all_reduce_gbps > 0.0 {
                note.push_str(&format!(
                    ", all-reduce {:.0} GB/s",
                    c.estimate.all_reduce_gbps
                ));
            }
            if c.estimate.all_to_all_gbps > 0.0 {
                note.push_str(&format!(
                    ", expert all-to-all {:.0} GB/s ({:.0} us per MoE layer)",
                    c.estimate.all_to_all_gbps,
                    c.estimate.all_to_all_seconds_per_layer * 1e6
                ));
            }
            if c.rank != best.rank {
                note.push_str(&format!(
                    "; {} is a later gpu.types preference",
                    inv.types[c.gpu_type].short()
                ));
            }
            layout(inv, c, Some(note))
        })
        .collect();
    (why, alts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: serde_json::Value) -> ModelDeploymentSpec {
        serde_json::from_value(v).expect("spec")
    }

    fn moe_spec(engine: &str, parallelism: serde_json::Value) -> ModelDeploymentSpec {
        spec(serde_json::json!({
            "model": {"uri": "pvc://m/x", "architecture": {
                "parameters": 46_702_792_704i64, "layers": 32, "hiddenSize": 4096,
                "attentionHeads": 32, "kvHeads": 8, "intermediateSize": 14336,
                "vocabSize": 32000, "contextLength": 32768, "bytesPerParameter": 2,
                "experts": 8, "expertsPerToken": 2, "expertIntermediateSize": 14336}},
            "engine": {"name": engine},
            "parallelism": parallelism,
        }))
    }

    #[test]
    fn stage_splits_follow_the_model_the_engine_and_the_pins() {
        // Dense: TP by the head rules only.
        let mut dense = moe_spec("vllm", serde_json::json!({}));
        dense.model.architecture.experts = None;
        dense.model.architecture.experts_per_token = None;
        dense.model.architecture.expert_intermediate_size = None;
        let s = stage_splits(&dense);
        assert!(s.iter().all(|&(_, ep, data)| ep == 1 && !data));
        assert_eq!(
            s.iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![1, 2, 4, 8, 16, 32]
        );
        // vLLM, 8 experts: TP everywhere the heads allow; EP (tensor or data attention) where
        // the stage size divides the experts.
        let s = stage_splits(&moe_spec("vllm", serde_json::json!({})));
        assert!(
            s.contains(&(8, 1, false)) && s.contains(&(8, 8, false)) && s.contains(&(8, 8, true))
        );
        assert!(s.contains(&(16, 1, false)) && !s.iter().any(|&(tp, ep, _)| tp == 16 && ep > 1));
        // Pins.
        let s = stage_splits(&moe_spec(
            "vllm",
            serde_json::json!({"expert": 4, "attention": "data"}),
        ));
        assert_eq!(s, vec![(4, 4, true)]);
        let s = stage_splits(&moe_spec("vllm", serde_json::json!({"expert": 1})));
        assert!(s.iter().all(|&(_, ep, data)| ep == 1 && !data));
        // The tessera engine: EP = TP with tensor attention, never data-parallel attention.
        let s = stage_splits(&moe_spec("tessera", serde_json::json!({})));
        assert_eq!(
            s,
            vec![(1, 1, false), (2, 2, false), (4, 4, false), (8, 8, false)]
        );
        assert!(
            stage_splits(&moe_spec(
                "tessera",
                serde_json::json!({"expert": 1, "tensor": 2})
            ))
            .is_empty()
        );
    }

    #[test]
    fn tp_rules() {
        let ok: Vec<u32> = (1..=64).filter(|&t| valid_tp(64, 8, t)).collect();
        assert_eq!(ok, vec![1, 2, 4, 8, 16, 32, 64]);
        let ok: Vec<u32> = (1..=64).filter(|&t| valid_tp(9, 3, t)).collect();
        assert_eq!(ok, vec![1, 3, 9]);
        let ok: Vec<u32> = (1..=64).filter(|&t| valid_tp(32, 32, t)).collect();
        assert_eq!(ok, vec![1, 2, 4, 8, 16, 32]);
    }
}
