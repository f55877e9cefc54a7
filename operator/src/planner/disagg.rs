//! Prefill/decode disaggregation: whether a deployment serves its workload better with prefill
//! and decode on separate pools (each its own GPU type and layout, in a ratio), and which.
//!
//! Plain data in, plain data out. For every feasible layout of the deployment (the candidates
//! [`super::choose::choose`] ranked) the cost model gives three figures for the request shape of
//! `serving.workload` under `serving.slo` ([`figures`]):
//! - **aggregated**: the largest batch whose decode step, stretched by the prefills that share
//!   the replica (`step + batch x prefill / output`), meets the inter-token SLO, and whose time
//!   to first token meets the TTFT SLO; output tokens/s per GPU there;
//! - **as a prefill pool**: replica-seconds per prompt (prompts chunked together) and the time
//!   to first token of one prompt;
//! - **as a decode pool**: the largest batch whose decode step alone meets the inter-token SLO
//!   and whose KV cache fits; requests/s at that batch.
//!
//! Every (prefill layout, decode layout) pair is then scored ([`pair`]): the prompt's KV cache
//! crosses from the prefill to the decode GPUs (added to the time to first token) over the
//! fabric, or, for pools of one GPU type whose unit fits one node, over NVLink or PCIe inside
//! it ([`KvLink`]), and the pools are sized in the integer ratio (each side up to [`MAX_POOL_RATIO`]) that wastes the
//! fewest GPUs;
//! the objective is output tokens/s per GPU of the two pools together. `docs/planner.md` has the
//! formulas and a worked example.

use serde::{Deserialize, Serialize};

use super::catalog::GpuModel;
use super::cost::{self, CostConstants, Layout, Link, Links, RequestShape};
use crate::api::ModelArchitecture;

/// Largest count of either pool's replicas in one serving unit (the ratio search's bound).
pub const MAX_POOL_RATIO: u32 = 16;

/// Latency targets; `None` leaves that latency free.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Slo {
    pub time_to_first_token_seconds: Option<f64>,
    pub inter_token_latency_seconds: Option<f64>,
}

impl Slo {
    fn ttft_ok(&self, t: f64) -> bool {
        self.time_to_first_token_seconds.is_none_or(|s| t <= s)
    }
    fn itl_ok(&self, t: f64) -> bool {
        self.inter_token_latency_seconds.is_none_or(|s| t <= s)
    }
}

/// One operating point of a replica.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Point {
    /// Concurrent sequences.
    pub batch: u32,
    pub time_to_first_token_seconds: f64,
    pub inter_token_latency_seconds: f64,
    /// Output tokens/s of the replica.
    pub output_tokens_per_second: f64,
}

/// What one layout does for a request shape, in each role.
#[derive(Clone, Debug, PartialEq)]
pub struct Figures {
    pub gpus: u32,
    /// Aggregated serving under the SLO (`None`: no batch meets it).
    pub aggregated: Option<Point>,
    /// As a prefill pool: replica-seconds per prompt and one prompt's time to first token
    /// (`None`: the weights do not fit).
    pub prefill: Option<(f64, f64)>,
    /// As a decode pool under the inter-token SLO (`None`: no batch meets it).
    pub decode: Option<Point>,
    /// Bytes of one prompt's KV cache (all layers, all heads) that a decode pool receives.
    pub kv_bytes_per_request: f64,
}

/// The figures of one layout of `arch` on `gpu` for `shape` under `slo`.
#[allow(clippy::too_many_arguments)]
pub fn figures(
    arch: &ModelArchitecture,
    gpu: &GpuModel,
    layout: Layout,
    links: Links,
    c: &CostConstants,
    shape: RequestShape,
    kv_bytes: f64,
    slo: Slo,
) -> Figures {
    let at = |b: u32| cost::serve(arch, gpu, layout, links, c, shape, kv_bytes, Some(b));
    let first = at(1);
    let gpus = layout.gpus();
    let kv_bytes_per_request = shape.input_tokens.max(1.0)
        * f64::from(arch.layers.max(1))
        * arch.kv_elements_per_token_layer(f64::from(arch.kv_heads.max(1)))
        * kv_bytes;
    if first.max_batch == 0 {
        return Figures {
            gpus,
            aggregated: None,
            prefill: None,
            decode: None,
            kv_bytes_per_request,
        };
    }
    let output = shape.output_tokens.max(1.0);
    let pe = first.prefill_seconds_per_request;
    let ttft = first.time_to_first_token_seconds;
    // The largest batch in 1..=max_batch where `ok` holds (it holds for a prefix of batches:
    // both latencies grow with the batch).
    let largest = |ok: &dyn Fn(&cost::Serving) -> bool| -> Option<cost::Serving> {
        if !ok(&first) {
            return None;
        }
        let lo = cost::largest_passing(1, first.max_batch, |b| ok(&at(b)));
        Some(at(lo))
    };
    let stretched =
        |s: &cost::Serving| s.inter_token_latency_seconds + f64::from(s.batch) * pe / output;
    let aggregated = if slo.ttft_ok(ttft) {
        largest(&|s| slo.itl_ok(stretched(s))).map(|s| Point {
            batch: s.batch,
            time_to_first_token_seconds: ttft,
            inter_token_latency_seconds: stretched(&s),
            output_tokens_per_second: s.output_tokens_per_second,
        })
    } else {
        None
    };
    let decode = largest(&|s| slo.itl_ok(s.inter_token_latency_seconds)).map(|s| Point {
        batch: s.batch,
        time_to_first_token_seconds: 0.0,
        inter_token_latency_seconds: s.inter_token_latency_seconds,
        output_tokens_per_second: f64::from(s.batch) / s.inter_token_latency_seconds.max(1e-12),
    });
    Figures {
        gpus,
        aggregated,
        prefill: Some((pe, ttft)),
        decode,
        kv_bytes_per_request,
    }
}

/// The link a prompt's KV cache crosses from a prefill replica to a decode replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum KvLink {
    /// Inside one node's NVLink domain (the unit of the pools sits on one node).
    #[serde(rename = "NVLink")]
    NvLink,
    /// Inside one node, over PCIe.
    #[serde(rename = "PCIe")]
    Pcie,
    /// Between nodes.
    #[serde(rename = "fabric")]
    Fabric,
}

impl KvLink {
    /// `NVLink`, `PCIe` or `fabric`, as the status says it.
    pub fn as_str(self) -> &'static str {
        match self {
            KvLink::NvLink => "NVLink",
            KvLink::Pcie => "PCIe",
            KvLink::Fabric => "fabric",
        }
    }

    /// Whether the link needs a unit's replicas on one node.
    pub fn in_node(self) -> bool {
        self != KvLink::Fabric
    }
}

/// A prefill pool and a decode pool in a ratio.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pair {
    /// Prefill and decode replicas per serving unit.
    pub prefill_replicas: u32,
    pub decode_replicas: u32,
    /// Output tokens/s per GPU of the unit (both pools), limited by the slower pool.
    pub output_tokens_per_second_per_gpu: f64,
    /// One prompt's prefill plus its KV transfer to the decode pool.
    pub time_to_first_token_seconds: f64,
    pub inter_token_latency_seconds: f64,
    /// Transfer time of one prompt's KV cache, seconds, the link it crosses and its GB/s, and
    /// the bytes each lane carries.
    pub kv_transfer_seconds: f64,
    pub kv_transfer_gbps: f64,
    pub kv_link: KvLink,
    pub kv_bytes_per_lane: f64,
    /// The decode pool's batch per replica.
    pub decode_batch: u32,
    /// Requests/s of one replica of each pool.
    pub prefill_requests_per_second: f64,
    pub decode_requests_per_second: f64,
}

/// Score `p` as the prefill pool and `d` as the decode pool of `shape` under `slo`; the KV
/// cache crosses `link` (of kind `kind`, per GPU) from every prefill GPU at once, bounded by
/// the smaller pool's GPU count. Only ratios `fits(prefill replicas, decode replicas)` accepts
/// are considered (the cluster's GPUs of each type; a unit inside one node for an in-node
/// link). `None` when either role cannot meet the SLO or no ratio fits.
pub fn pair(
    p: &Figures,
    d: &Figures,
    (link, kind): (Link, KvLink),
    shape: RequestShape,
    slo: Slo,
    fits: &dyn Fn(u32, u32) -> bool,
) -> Option<Pair> {
    let (pe, ttft) = p.prefill?;
    let dec = d.decode?;
    let lanes = f64::from(p.gpus.min(d.gpus).max(1));
    let per_lane = d.kv_bytes_per_request / lanes;
    let transfer = cost::send_seconds(per_lane, link);
    let ttft = ttft + transfer;
    if !slo.ttft_ok(ttft) {
        return None;
    }
    let output = shape.output_tokens.max(1.0);
    // Requests/s of one replica in each role.
    let rate_p = 1.0 / pe.max(1e-12);
    let rate_d = dec.output_tokens_per_second / output;
    let mut best: Option<(f64, u32, u32)> = None;
    for np in 1..=MAX_POOL_RATIO {
        for nd in 1..=MAX_POOL_RATIO {
            if !fits(np, nd) {
                continue;
            }
            let rate = (f64::from(np) * rate_p).min(f64::from(nd) * rate_d);
            let gpus = f64::from(np * p.gpus + nd * d.gpus);
            let per_gpu = rate * output / gpus;
            // Fewer replicas win ties (a smaller unit to place).
            if best.is_none_or(|(b, _, _)| per_gpu > b * (1.0 + 1e-9)) {
                best = Some((per_gpu, np, nd));
            }
        }
    }
    let (per_gpu, np, nd) = best?;
    Some(Pair {
        prefill_replicas: np,
        decode_replicas: nd,
        output_tokens_per_second_per_gpu: per_gpu,
        time_to_first_token_seconds: ttft,
        inter_token_latency_seconds: dec.inter_token_latency_seconds,
        kv_transfer_seconds: transfer,
        kv_transfer_gbps: link.gbps,
        kv_link: kind,
        kv_bytes_per_lane: per_lane,
        decode_batch: dec.batch,
        prefill_requests_per_second: rate_p,
        decode_requests_per_second: rate_d,
    })
}

/// The planner's verdict for one deployment.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Serve with two pools.
    pub disaggregate: bool,
    /// Why, with the figures compared.
    pub reason: String,
    /// The best aggregated layout under the SLO: candidate index, its point and tokens/s per
    /// GPU.
    pub aggregated: Option<(usize, Point, f64)>,
    /// The best pair: prefill and decode candidate indices and the pair.
    pub pair: Option<(usize, usize, Pair)>,
}

/// Decide disaggregation for a deployment whose feasible layouts `choice` ranked (`None` when
/// `serving.disaggregation` is Off or `serving.workload` is unset).
pub fn decide(
    spec: &crate::api::ModelDeploymentSpec,
    inv: &super::inventory::Inventory,
    stats: &[super::choose::TypeStats],
    choice: &super::choose::Choice,
    c: &CostConstants,
) -> Option<Decision> {
    use crate::api::Disaggregation;
    let mode = spec.serving.disaggregation;
    let w = spec.serving.workload?;
    if mode == Disaggregation::Off {
        return None;
    }
    let shape = RequestShape {
        input_tokens: f64::from(w.input_tokens.max(1)),
        output_tokens: f64::from(w.output_tokens.max(1)),
    };
    let slo = spec.serving.slo.map_or(Slo::default(), |s| Slo {
        time_to_first_token_seconds: s.time_to_first_token_seconds,
        inter_token_latency_seconds: s.inter_token_latency_seconds,
    });
    let kv_bytes = spec.serving.kv_cache_dtype.bytes();
    let arch = &spec.model.architecture;
    let figs: Vec<Figures> = choice
        .candidates
        .iter()
        .map(|cand| {
            let t = cand.gpu_type;
            let links = super::choose::nominal_links(inv, t, &stats[t], cand.tp, cand.pp, c);
            figures(
                arch,
                &inv.types[t].model,
                cand.layout(),
                links,
                c,
                shape,
                kv_bytes,
                slo,
            )
        })
        .collect();
    let label = |i: usize| choice.candidates[i].label(inv);
    let mut aggregated: Option<(usize, Point, f64)> = None;
    for (i, f) in figs.iter().enumerate() {
        if let Some(a) = f.aggregated {
            let per_gpu = a.output_tokens_per_second / f64::from(f.gpus.max(1));
            if aggregated.is_none_or(|(_, _, b)| per_gpu > b) {
                aggregated = Some((i, a, per_gpu));
            }
        }
    }
    // Pools of different GPU types sit on different nodes: the KV cache crosses the fabric.
    // Pools of one type may also keep each unit inside one node, where it crosses NVLink (the
    // unit inside the node's NVLink domain) or PCIe; the placement then keeps units on one node.
    let fabric = c.fabric_link();
    // A unit's pools must fit the eligible GPUs of their types, `spec.replicas` units over.
    let units = spec.replicas.max(1) as u32;
    let mut best: Option<(usize, usize, Pair)> = None;
    for (i, p) in figs.iter().enumerate() {
        for (j, d) in figs.iter().enumerate() {
            let (tp_, td) = (choice.candidates[i].gpu_type, choice.candidates[j].gpu_type);
            let fits = |np: u32, nd: u32| {
                let (gp, gd) = (units * np * p.gpus, units * nd * d.gpus);
                if tp_ == td {
                    gp + gd <= stats[tp_].gpus
                } else {
                    gp <= stats[tp_].gpus && gd <= stats[td].gpus
                }
            };
            let mut links = vec![((fabric, KvLink::Fabric), u32::MAX)];
            if tp_ == td {
                let st = &stats[tp_];
                if st.nvlink_gbps > 0.0 && st.largest_domain > 1 {
                    let nvlink = Link {
                        gbps: st.nvlink_gbps,
                        latency_s: c.nvlink_latency_s,
                    };
                    links.push(((nvlink, KvLink::NvLink), st.largest_domain));
                } else if st.largest_node > 1 {
                    let pcie = c.pcie_link(&inv.types[tp_].model);
                    links.push(((pcie, KvLink::Pcie), st.largest_node));
                }
            }
            for (link, room) in links {
                let unit_fits =
                    |np: u32, nd: u32| fits(np, nd) && np * p.gpus + nd * d.gpus <= room;
                // Most output per GPU; at equal output, the shorter time to first token.
                if let Some(x) = pair(p, d, link, shape, slo, &unit_fits)
                    && best.as_ref().is_none_or(|(_, _, b)| {
                        let (xo, bo) = (
                            x.output_tokens_per_second_per_gpu,
                            b.output_tokens_per_second_per_gpu,
                        );
                        xo > bo * (1.0 + 1e-9)
                            || (xo >= bo * (1.0 - 1e-9)
                                && x.time_to_first_token_seconds < b.time_to_first_token_seconds)
                    })
                {
                    best = Some((i, j, x));
                }
            }
        }
    }
    let agg_text = aggregated.map_or_else(
        || "no aggregated layout meets the SLO".to_owned(),
        |(i, a, per_gpu)| {
            format!(
                "{per_gpu:.0} aggregated on {} (batch {}, decode steps stretched by prefills to {:.0} ms, TTFT {:.2} s)",
                label(i),
                a.batch,
                a.inter_token_latency_seconds * 1e3,
                a.time_to_first_token_seconds
            )
        },
    );
    let pair_text = |(i, j, x): &(usize, usize, Pair)| {
        format!(
            "prefill on {} x{} and decode on {} x{} per unit: {:.0} output tokens/s per GPU (TTFT {:.2} s with a {:.1} ms KV transfer over {} at {:.0} GB/s, ITL {:.0} ms at batch {})",
            label(*i),
            x.prefill_replicas,
            label(*j),
            x.decode_replicas,
            x.output_tokens_per_second_per_gpu,
            x.time_to_first_token_seconds,
            x.kv_transfer_seconds * 1e3,
            match x.kv_link {
                KvLink::Fabric => "the fabric",
                KvLink::NvLink => "NVLink inside a node",
                KvLink::Pcie => "PCIe inside a node",
            },
            x.kv_transfer_gbps,
            x.inter_token_latency_seconds * 1e3,
            x.decode_batch
        )
    };
    let agg_per_gpu = aggregated.map_or(0.0, |a| a.2);
    let (disaggregate, reason) = match (&best, mode) {
        (None, _) => (
            false,
            format!("aggregated: no prefill/decode pair meets the SLO; {agg_text}"),
        ),
        (Some(b), Disaggregation::On) => (
            true,
            format!("disaggregated (On): {}; vs {agg_text}", pair_text(b)),
        ),
        (Some(b), _)
            if b.2.output_tokens_per_second_per_gpu
                > agg_per_gpu * (1.0 + c.disaggregation_margin) =>
        {
            (
                true,
                format!(
                    "disaggregated (Auto): {} beats {agg_text} by {}",
                    pair_text(b),
                    gain(b.2.output_tokens_per_second_per_gpu, agg_per_gpu)
                ),
            )
        }
        (Some(b), _) => (
            false,
            format!(
                "aggregated (Auto): the best pair, {}, gains {} over {agg_text}, less than the {:.0}% two pools must gain",
                pair_text(b),
                gain(b.2.output_tokens_per_second_per_gpu, agg_per_gpu),
                c.disaggregation_margin * 100.0
            ),
        ),
    };
    Some(Decision {
        disaggregate,
        reason,
        aggregated,
        pair: best,
    })
}

/// `+34%` (or why there is no ratio).
fn gain(pd: f64, agg: f64) -> String {
    if agg > 0.0 {
        format!("{:+.0}%", (pd / agg - 1.0) * 100.0)
    } else {
        "all (no aggregated layout meets the SLO)".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::catalog::Catalog;

    fn llama70b_fp8() -> ModelArchitecture {
        ModelArchitecture {
            parameters: 70_553_706_496,
            layers: 80,
            hidden_size: 8192,
            attention_heads: 64,
            kv_heads: 8,
            intermediate_size: 28672,
            vocab_size: 128_256,
            context_length: 131_072,
            bytes_per_parameter: 1.0,
            ..Default::default()
        }
    }

    fn fig(gpu: &str, tp: u32, shape: RequestShape, slo: Slo) -> Figures {
        let cat = Catalog::builtin();
        let g = cat.lookup(gpu).unwrap();
        let c = CostConstants::default();
        let layout = Layout::dense(tp, 1);
        let links = cost::packed_links(g, tp, 1, 8, &c);
        figures(&llama70b_fp8(), g, layout, links, &c, shape, 1.0, slo)
    }

    const LONG: RequestShape = RequestShape {
        input_tokens: 8192.0,
        output_tokens: 256.0,
    };

    #[test]
    fn the_slo_bounds_the_batch_and_prefills_stretch_aggregated_decode() {
        let free = fig("H100", 4, LONG, Slo::default());
        let tight = Slo {
            time_to_first_token_seconds: None,
            inter_token_latency_seconds: Some(0.05),
        };
        let f = fig("H100", 4, LONG, tight);
        let (agg, dec) = (f.aggregated.unwrap(), f.decode.unwrap());
        assert!(agg.inter_token_latency_seconds <= 0.05 && dec.inter_token_latency_seconds <= 0.05);
        // Long prompts sharing the replica stretch every decode step, so a decode-only pool
        // holds a bigger batch under the same inter-token target.
        assert!(dec.batch > agg.batch, "{dec:?} vs {agg:?}");
        assert!(agg.batch < free.aggregated.unwrap().batch);
        // A target no batch can meet.
        let impossible = Slo {
            time_to_first_token_seconds: Some(1e-4),
            inter_token_latency_seconds: Some(1e-4),
        };
        let f = fig("H100", 4, LONG, impossible);
        assert!(f.aggregated.is_none() && f.decode.is_none());
        // 8192 tokens x 80 layers x 2 x 8 KV heads x 128 x 1 byte (FP8) = 1.34 GB.
        assert!((f.kv_bytes_per_request - 8192.0 * 80.0 * 2.0 * 8.0 * 128.0).abs() < 1.0);
    }

    #[test]
    fn compute_for_prefill_and_bandwidth_for_decode() {
        // Long prompts: H800 prefills 6.7x faster than H20 per GPU, H20 decodes as well or
        // better per GPU (4.0 TB/s of HBM, 96 GB). The pair H800 prefill + H20 decode beats
        // both aggregated layouts and the reverse pair.
        let slo = Slo {
            time_to_first_token_seconds: Some(2.0),
            inter_token_latency_seconds: Some(0.05),
        };
        let h800 = fig("H800", 4, LONG, slo);
        let h20 = fig("H20", 4, LONG, slo);
        let fabric = Link {
            gbps: 50.0,
            latency_s: 10e-6,
        };
        let any = |_: u32, _: u32| true;
        let best = pair(&h800, &h20, (fabric, KvLink::Fabric), LONG, slo, &any).expect("pair");
        let reverse = pair(&h20, &h800, (fabric, KvLink::Fabric), LONG, slo, &any);
        let agg = |f: &Figures| {
            f.aggregated
                .map_or(0.0, |a| a.output_tokens_per_second / f64::from(f.gpus))
        };
        assert!(
            best.output_tokens_per_second_per_gpu > agg(&h800),
            "{best:?} {h800:?}"
        );
        assert!(
            best.output_tokens_per_second_per_gpu > agg(&h20),
            "{best:?} {h20:?}"
        );
        assert!(reverse.is_none_or(
            |r| r.output_tokens_per_second_per_gpu < best.output_tokens_per_second_per_gpu
        ));
        // The KV transfer is counted: 1.34 GB over 4 lanes of 50 GB/s.
        assert!(
            (best.kv_transfer_seconds - 1.342e9 / 4.0 / 50e9).abs() < 1e-3,
            "{best:?}"
        );
        assert!(best.time_to_first_token_seconds > h800.prefill.unwrap().1);
    }
}
