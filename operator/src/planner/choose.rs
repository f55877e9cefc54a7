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
use super::cost::{CostConstants, Estimate, Link, Links, Workload, estimate};
use super::inventory::{Eligibility, Inventory};
use crate::api::{LayoutPrediction, ModelDeploymentSpec, TensorParallelScope};

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
    /// Preference rank of the GPU type (0 is best).
    pub rank: usize,
    pub estimate: Estimate,
}

impl Candidate {
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
    let fabric = Link {
        gbps: c.fabric_gbps,
        latency_s: c.fabric_latency_s,
    };
    let link_for = |n: u32| {
        if n <= stats.largest_domain && stats.nvlink_gbps > 0.0 && stats.largest_domain > 1 {
            nvlink
        } else if n <= stats.largest_node {
            pcie
        } else {
            fabric
        }
    };
    Links {
        tp: link_for(tp),
        pp: link_for(tp * pp),
    }
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
    let heads = arch.attention_heads.max(1) as u32;
    let kv = arch.kv_heads.max(1) as u32;
    let layers = arch.layers.max(1) as u32;
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
        let tps: Vec<u32> = match pinned_tp {
            Some(tp) => vec![tp],
            None => (1..=MAX_GPUS)
                .filter(|&tp| valid_tp(heads, kv, tp))
                .collect(),
        };
        let before = choice.candidates.len();
        let mut last_reason: Option<String> = None;
        for tp in tps {
            if tp > max_tp {
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
                    estimate(arch, work, &ty.model, tp, pp, links, c),
                );
                if e.fits {
                    choice.candidates.push(Candidate {
                        gpu_type: t,
                        tp,
                        pp,
                        rank,
                        estimate: e,
                    });
                    fitted += 1;
                    if fitted >= 2 {
                        break;
                    }
                } else if fitted == 0 {
                    last_reason = Some(format!(
                        "{short}: tensor={tp} x pipeline={pp} does not fit: needs {:.1} GiB per GPU \
                         ({:.1} weights + {:.1} KV cache for {} x {} tokens + {:.1} overhead), {short} has {:.1} GiB x {}",
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
                    format!("{short}: no tensor degree fits the model's heads")
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
        predicted: cand.estimate.prediction(),
        note,
    }
}

/// Short label of a layout: `H100 TP=4 PP=1`.
pub fn label(inv: &Inventory, t: usize, tp: u32, pp: u32) -> String {
    format!("{} TP={tp} PP={pp}", inv.types[t].short())
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
    let why = format!(
        "highest predicted decode tokens/s per GPU ({:.0}) of {same} feasible layouts on {}{pref}",
        best.per_gpu(),
        inv.types[best.gpu_type].short()
    );
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
            if c.tp > 1 {
                note.push_str(&format!(
                    ", all-reduce {:.0} GB/s",
                    c.estimate.all_reduce_gbps
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
