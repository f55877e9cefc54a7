//! The cost model: memory fit, decode and prefill speed of one replica for a layout and the links
//! it gets. Formulas and the sources of the constants are in `docs/cost-model.md`.

use serde::{Deserialize, Serialize};

use super::calibration::{Calibration, LayoutKey};
use super::catalog::GpuModel;
use crate::api::{ModelArchitecture, Prediction};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Tunable constants of the model (defaults documented in docs/cost-model.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CostConstants {
    /// Fraction of GPU memory the weights, KV cache and overhead may use.
    pub memory_utilization_cap: f64,
    /// Fraction of peak HBM bandwidth decode achieves.
    pub hbm_efficiency: f64,
    /// Model FLOPs utilisation achieved by prefill and batched decode.
    pub mfu: f64,
    /// Runtime overhead per GPU (CUDA context, NCCL buffers, allocator slack), GiB.
    pub runtime_overhead_gib: f64,
    /// Tokens per prefill chunk; sizes the activation workspace.
    pub prefill_chunk_tokens: f64,
    /// Bytes per activation element moved by all-reduces and pipeline sends (2: BF16).
    pub activation_bytes: f64,
    /// Inter-node fabric bandwidth per GPU per direction, GB/s (8 x 400 Gb/s per 8-GPU node).
    pub fabric_gbps: f64,
    /// Per-hop latency of an NVLink ring step, seconds.
    pub nvlink_latency_s: f64,
    /// Per-hop latency of a PCIe ring step, seconds.
    pub pcie_latency_s: f64,
    /// Fraction of a GPU's PCIe bandwidth a NCCL ring over PCIe achieves: without NVLink the
    /// ring's peer-to-peer traffic goes through PCIe switches and the CPU root complexes (and
    /// across the socket interconnect on 8-GPU nodes), which sustain well below x16 line rate.
    #[serde(default = "default_pcie_allreduce_efficiency")]
    pub pcie_allreduce_efficiency: f64,
    /// Per-hop latency of an inter-node ring step, seconds.
    pub fabric_latency_s: f64,
    /// Fraction of a GPU's per-direction NVLink (or PCIe ring) bandwidth an expert all-to-all
    /// achieves inside a node: DeepEP's normal kernels reach about 153-158 GB/s of H800's
    /// 200 GB/s per direction.
    #[serde(default = "default_all_to_all_efficiency")]
    pub all_to_all_efficiency: f64,
    /// Fixed cost of one all-to-all phase (dispatch or combine): kernel launch, the exchange of
    /// token counts and the barrier, seconds.
    #[serde(default = "default_all_to_all_latency_s")]
    pub all_to_all_latency_s: f64,
    /// How much more SLO-meeting output tokens/s per GPU a prefill/decode pair must predict
    /// than aggregated serving for `serving.disaggregation: Auto` to choose it (0.1: 10%): two
    /// pools pay what the model does not count (the router hop, KV-transfer setup, pools kept
    /// in ratio as load shifts).
    #[serde(default = "default_disaggregation_margin")]
    pub disaggregation_margin: f64,
    /// Corrections measured on the fleet per (GPU type, TP, PP, engine), applied to the
    /// predictions the planner ranks layouts by (`plan --calibration FILE`;
    /// `planner::calibration`).
    #[serde(default, skip_serializing_if = "Calibration::is_empty")]
    pub calibration: Calibration,
}

impl Default for CostConstants {
    fn default() -> Self {
        CostConstants {
            memory_utilization_cap: 0.9,
            hbm_efficiency: 0.8,
            mfu: 0.5,
            runtime_overhead_gib: 1.5,
            prefill_chunk_tokens: 8192.0,
            activation_bytes: 2.0,
            fabric_gbps: 50.0,
            nvlink_latency_s: 2e-6,
            pcie_latency_s: 5e-6,
            fabric_latency_s: 10e-6,
            pcie_allreduce_efficiency: default_pcie_allreduce_efficiency(),
            all_to_all_efficiency: default_all_to_all_efficiency(),
            all_to_all_latency_s: default_all_to_all_latency_s(),
            disaggregation_margin: default_disaggregation_margin(),
            calibration: Calibration::default(),
        }
    }
}

fn default_pcie_allreduce_efficiency() -> f64 {
    0.5
}

fn default_all_to_all_efficiency() -> f64 {
    0.77
}

fn default_all_to_all_latency_s() -> f64 {
    20e-6
}

fn default_disaggregation_margin() -> f64 {
    0.1
}

impl CostConstants {
    /// `e` (predicted for `gpu` at `tp` x `pp` running `engine`) with the fleet's correction.
    pub fn calibrated(
        &self,
        gpu: &GpuModel,
        tp: u32,
        pp: u32,
        engine: &str,
        e: Estimate,
    ) -> Estimate {
        if self.calibration.is_empty() {
            return e;
        }
        let key = LayoutKey {
            gpu_type: gpu.name.clone(),
            tensor_parallel: tp,
            pipeline_parallel: pp,
            engine: engine.to_owned(),
        };
        self.calibration.apply(&key, e)
    }

    /// `links` of `gpu` at `tp` x `pp` running `engine` with the fleet's all-reduce correction:
    /// the TP link's bandwidth times it and its latency over it, so ring times scale by its
    /// inverse.
    pub fn calibrated_links(
        &self,
        gpu: &GpuModel,
        tp: u32,
        pp: u32,
        engine: &str,
        links: Links,
    ) -> Links {
        if self.calibration.is_empty() || tp <= 1 {
            return links;
        }
        let r = self.calibration.allreduce(&LayoutKey {
            gpu_type: gpu.name.clone(),
            tensor_parallel: tp,
            pipeline_parallel: pp,
            engine: engine.to_owned(),
        });
        Links {
            tp: Link {
                gbps: links.tp.gbps * r,
                latency_s: links.tp.latency_s / r,
            },
            pp: links.pp,
            ep: links.ep,
        }
    }

    /// What an expert all-to-all gets of a link inside a node.
    pub fn all_to_all(&self, inside: Link) -> Link {
        Link {
            gbps: inside.gbps * self.all_to_all_efficiency,
            latency_s: inside.latency_s,
        }
    }

    /// The fabric between nodes (per GPU).
    pub fn fabric_link(&self) -> Link {
        Link {
            gbps: self.fabric_gbps,
            latency_s: self.fabric_latency_s,
        }
    }

    /// The PCIe link a collective gets on `gpu`.
    pub fn pcie_link(&self, gpu: &GpuModel) -> Link {
        Link {
            gbps: gpu.pcie_gbps * self.pcie_allreduce_efficiency,
            latency_s: self.pcie_latency_s,
        }
    }
}

/// A link: per-direction bandwidth in GB/s and per-hop latency in seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Link {
    pub gbps: f64,
    pub latency_s: f64,
}

/// The links one replica gets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Links {
    /// The slowest link of the tensor-parallel ring.
    pub tp: Link,
    /// The slowest link between consecutive pipeline stages.
    pub pp: Link,
    /// What the expert all-to-all gets per GPU (see [`all_to_all_link`]); unused without
    /// expert parallelism.
    pub ep: Link,
}

/// How one replica splits the model: `tp` GPUs per pipeline stage, `pp` stages; for a mixture
/// of experts, `ep` (1, or `tp`: the stage's GPUs each hold whole experts) and whether
/// attention runs data-parallel over the stage's GPUs instead of tensor-parallel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    pub tp: u32,
    pub pp: u32,
    pub ep: u32,
    pub data_attention: bool,
}

impl Layout {
    /// Tensor x pipeline parallelism, experts (if any) sharded like a dense feed-forward.
    pub fn dense(tp: u32, pp: u32) -> Layout {
        Layout {
            tp: tp.max(1),
            pp: pp.max(1),
            ep: 1,
            data_attention: false,
        }
    }

    /// A layout as the API writes it (`tensorParallel`, `pipelineParallel`,
    /// `expertParallel` present only above 1, `dataParallelAttention`); negative degrees read
    /// as 0 and are never feasible.
    pub fn from_api(tp: i32, pp: i32, ep: Option<i32>, data_attention: bool) -> Layout {
        Layout {
            tp: tp.max(0) as u32,
            pp: pp.max(0) as u32,
            ep: ep.unwrap_or(1).max(1) as u32,
            data_attention,
        }
    }

    /// The layout a replica was placed with (its status entry).
    pub fn of_placement(p: &crate::api::ReplicaPlacement) -> Layout {
        Layout::from_api(
            p.tensor_parallel,
            p.pipeline_parallel,
            p.expert_parallel,
            p.data_parallel_attention,
        )
    }

    /// GPUs of one replica.
    pub fn gpus(&self) -> u32 {
        self.tp * self.pp
    }

    /// `TP=8 PP=1`, `TP=8 EP=8`, `EP=16 DP-attention`.
    pub fn label(&self) -> String {
        let pp = if self.pp > 1 {
            format!(" PP={}", self.pp)
        } else {
            String::new()
        };
        match (self.ep > 1, self.data_attention) {
            (false, _) => format!("TP={} PP={}", self.tp, self.pp),
            (true, false) => format!("TP={} EP={}{pp}", self.tp, self.ep),
            (true, true) => format!("EP={} DP-attention{pp}", self.ep),
        }
    }
}

/// The link an all-to-all over `group` GPUs gets per GPU when `local` of them (itself included)
/// share its fast domain (`inside`) and the rest are reached over `across`: every GPU sends an
/// equal share to each of the `group - 1` others at once, so the slower part bounds it.
pub fn all_to_all_link(group: u32, local: u32, inside: Link, across: Link) -> Link {
    if group <= 1 {
        return inside;
    }
    let others = f64::from(group - 1);
    let near = f64::from(local.clamp(1, group) - 1) / others;
    let far = 1.0 - near;
    // Seconds per byte of the whole send, each part at its own link's rate.
    let t = (near / (inside.gbps.max(1e-3) * 1e9)).max(far / (across.gbps.max(1e-3) * 1e9));
    Link {
        gbps: 1.0 / t / 1e9,
        latency_s: if far > 0.0 {
            across.latency_s
        } else {
            inside.latency_s
        },
    }
}

/// The load a replica must hold.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Workload {
    /// Concurrent sequences (`serving.maxConcurrency`).
    pub concurrency: f64,
    /// Tokens per sequence (`serving.contextLength`, default the model's).
    pub context: f64,
    /// Bytes per KV-cache element (`serving.kvCacheDtype`: 2 for BF16, 1 for FP8).
    pub kv_bytes: f64,
}

/// What the model predicts for one layout.
#[derive(Clone, Debug, PartialEq)]
pub struct Estimate {
    pub weights_gib: f64,
    pub kv_cache_gib: f64,
    pub overhead_gib: f64,
    /// Weights + KV + overhead per GPU.
    pub memory_per_gpu_gib: f64,
    /// GPU memory x utilisation cap.
    pub memory_budget_gib: f64,
    pub fits: bool,
    pub decode_tokens_per_second: f64,
    pub prefill_tokens_per_second: f64,
    pub time_to_first_token_seconds: f64,
    /// Per-direction bandwidth of the tensor-parallel ring, GB/s (0 for TP = 1).
    pub all_reduce_gbps: f64,
    /// Decode step time spent in tensor-parallel all-reduces, seconds.
    pub decode_all_reduce_seconds: f64,
    /// Prefill time spent in tensor-parallel all-reduces, seconds.
    pub prefill_all_reduce_seconds: f64,
    /// Prefill compute time, seconds.
    pub prefill_compute_seconds: f64,
    /// Prefill time per prompt when prompts keep the replica busy: the time to first token, or
    /// less where several prompts run side by side (data-parallel attention), seconds.
    pub prefill_seconds_per_prompt: f64,
    /// Per-direction bandwidth of the expert all-to-all per GPU, GB/s (0 without expert
    /// parallelism).
    pub all_to_all_gbps: f64,
    /// Dispatch plus combine of one MoE layer in a decode step, seconds.
    pub all_to_all_seconds_per_layer: f64,
    /// Decode step time spent in expert all-to-alls, seconds.
    pub decode_all_to_all_seconds: f64,
    /// Prefill time spent in expert all-to-alls, seconds.
    pub prefill_all_to_all_seconds: f64,
}

impl Estimate {
    /// Decode tokens/s per GPU: the choice objective.
    pub fn per_gpu(&self, gpus: u32) -> f64 {
        self.decode_tokens_per_second / f64::from(gpus.max(1))
    }

    /// The API's prediction type.
    pub fn prediction(&self) -> Prediction {
        Prediction {
            decode_tokens_per_second: round(self.decode_tokens_per_second, 1),
            prefill_tokens_per_second: round(self.prefill_tokens_per_second, 1),
            time_to_first_token_seconds: round(self.time_to_first_token_seconds, 4),
            all_reduce_g_bps: round(self.all_reduce_gbps, 1),
            all_to_all_g_bps: (self.all_to_all_gbps > 0.0).then(|| round(self.all_to_all_gbps, 1)),
            all_to_all_micros_per_layer: (self.all_to_all_gbps > 0.0)
                .then(|| round(self.all_to_all_seconds_per_layer * 1e6, 1)),
            measured_decode_ratio: None,
            measured_prefill_ratio: None,
            measured_all_reduce_ratio: None,
        }
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

/// Ring all-reduce time of `bytes` over `n` GPUs: 2(n-1)/n x size / per-direction bandwidth +
/// 2(n-1) x per-hop latency.
pub fn ring_all_reduce_seconds(bytes: f64, n: u32, link: Link) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    let n = f64::from(n);
    2.0 * (n - 1.0) / n * bytes / (link.gbps.max(1e-3) * 1e9) + 2.0 * (n - 1.0) * link.latency_s
}

/// Point-to-point send time.
pub fn send_seconds(bytes: f64, link: Link) -> f64 {
    bytes / (link.gbps.max(1e-3) * 1e9) + link.latency_s
}

/// Dense TFLOPS the model's weights run at: FP8 units for 1-byte weights, BF16 otherwise
/// (smaller quantisations are dequantised to BF16).
pub fn tflops_for(gpu: &GpuModel, bytes_per_parameter: f64) -> f64 {
    if (0.9..=1.1).contains(&bytes_per_parameter) {
        gpu.fp8_tflops.max(gpu.bf16_tflops)
    } else {
        gpu.bf16_tflops
    }
}

/// Predict one tensor x pipeline layout (experts, if any, sharded like a dense feed-forward).
/// `tp` and `pp` are at least 1.
pub fn estimate(
    arch: &ModelArchitecture,
    work: Workload,
    gpu: &GpuModel,
    tp: u32,
    pp: u32,
    links: Links,
    c: &CostConstants,
) -> Estimate {
    estimate_layout(arch, work, gpu, Layout::dense(tp, pp), links, c)
}

/// Predict one layout of a dense or mixture-of-experts model (docs/cost-model.md gives the
/// formulas).
pub fn estimate_layout(
    arch: &ModelArchitecture,
    work: Workload,
    gpu: &GpuModel,
    layout: Layout,
    links: Links,
    c: &CostConstants,
) -> Estimate {
    let tp = layout.tp.max(1);
    let pp = layout.pp.max(1);
    let ep = if arch.is_moe() { layout.ep.max(1) } else { 1 };
    let data = arch.is_moe() && ep > 1 && layout.data_attention;
    let tpf = f64::from(tp);
    let ppf = f64::from(pp);
    let params = arch.parameters as f64;
    let routed = arch.routed_expert_parameters() as f64;
    let dense_params = (params - routed).max(0.0);
    let active = arch.active_parameters() as f64;
    let layers = f64::from(arch.layers.max(1));
    let moe_layers = arch.moe_layers() as f64;
    let hidden = f64::from(arch.hidden_size.max(1));
    let kv_heads = arch.kv_heads.max(1);
    let inter = f64::from(arch.intermediate_size.max(1));
    let layers_per_stage = (f64::from(arch.layers.max(1)) / ppf).ceil();
    // Tensor-parallel attention splits the KV heads (a latent cache is copied on every rank);
    // data-parallel attention keeps whole heads for a 1/tp share of the sequences.
    let (attn_split, seq_share) = if data { (1.0, tpf) } else { (tpf, 1.0) };
    let kv_per_rank = (f64::from(kv_heads) / attn_split).max(1.0).ceil();
    let bytes = arch.bytes_per_parameter;

    // Memory per GPU: the dense part (attention, embeddings, dense layers, shared experts)
    // split by tensor-parallel attention or copied on every GPU with data-parallel attention;
    // the routed experts spread over the stage's GPUs either way (sharded, or whole by EP).
    let dense_weights = dense_params * bytes / (attn_split * ppf);
    let expert_weights = routed * bytes / (tpf * ppf);
    let weights = dense_weights + expert_weights;
    let kv_per_token =
        layers_per_stage * arch.kv_elements_per_token_layer(kv_per_rank) * work.kv_bytes;
    let kv = work.concurrency / seq_share * work.context * kv_per_token;
    let chunk = c.prefill_chunk_tokens.min(work.context).max(1.0);
    let activations = chunk * (4.0 * hidden + 2.0 * inter / tpf) * c.activation_bytes;
    let overhead = c.runtime_overhead_gib * GIB + activations;
    let total = weights + kv + overhead;
    let budget = gpu.memory_mib * 1024.0 * 1024.0 * c.memory_utilization_cap;

    let hbm = gpu.memory_bandwidth_gbps * 1e9 * c.hbm_efficiency;
    let flops = tflops_for(gpu, bytes) * 1e12 * c.mfu;
    let act = c.activation_bytes;
    let topk = f64::from(arch.experts_per_token.unwrap_or(1).max(1));
    let experts = f64::from(arch.experts.unwrap_or(1).max(1));
    // Collectives per layer on the tensor-parallel ring: attention's output, and each dense
    // feed-forward's; MoE layers' too while experts are sharded (EP = 1). Data-parallel
    // attention has none.
    let all_reduces = if data {
        0.0
    } else if ep > 1 {
        layers + (layers - moe_layers)
    } else {
        2.0 * layers
    };
    // Dispatch and combine of `tokens` routed tokens held by one GPU: each goes to `topk`
    // experts, (ep - 1)/ep of them on other GPUs.
    let epf = f64::from(ep);
    let a2a = |tokens_on_gpu: f64| {
        if ep <= 1 {
            return 0.0;
        }
        let bytes = tokens_on_gpu * topk * hidden * act * (epf - 1.0) / epf;
        2.0 * (send_seconds(bytes, links.ep) + c.all_to_all_latency_s)
    };

    // Decode: one step advances every sequence by one token; stages run one after another
    // (no micro-batching). Per stage: max(memory time, compute time) + collectives.
    let batch = work.concurrency.max(1.0);
    // The experts a step touches: each of the batch's tokens picks `topk` of `experts`, so a
    // fraction 1 - (1 - k/E)^batch of them is read (all of them at large batch).
    let touched = if arch.is_moe() {
        1.0 - (1.0 - (topk / experts).min(1.0)).powf(batch)
    } else {
        1.0
    };
    let read = dense_weights + touched * expert_weights;
    let kv_read = batch / seq_share * (work.context / 2.0) * kv_per_token; // half-way on average
    // Per layer the GEMMs (bound by reading the weights or by their FLOPs) and the attention
    // kernel (bound by reading the KV cache) run one after the other, so their times add.
    let stage_gemm = (read / hbm).max(2.0 * active / ppf * batch / (tpf * flops));
    let stage_attention = kv_read / hbm;
    let decode_ar = all_reduces * ring_all_reduce_seconds(batch * hidden * act, tp, links.tp);
    let a2a_layer = a2a(batch / tpf);
    let decode_a2a = moe_layers * a2a_layer;
    let decode_pp = (ppf - 1.0) * send_seconds(batch * hidden * act, links.pp);
    let step = ppf * (stage_gemm + stage_attention) + decode_ar + decode_a2a + decode_pp;
    let decode_tps = batch / step;

    // Prefill of one prompt of `context` tokens: 2 x active params x tokens FLOPs plus causal
    // attention (2 x layers x tokens^2 x hidden), over the stage's GPUs, the all-reduces of
    // tokens x hidden x 2 bytes, the all-to-alls, one send per stage boundary. With
    // data-parallel attention one prompt's attention and dense part run on one GPU (its
    // experts still spread), and `tp` prompts run side by side.
    let tokens = work.context.max(1.0);
    let attention_flops = 2.0 * layers * tokens * tokens * hidden;
    let expert_active = (active - dense_params).max(0.0);
    let prefill_compute = if data {
        (2.0 * dense_params * tokens + attention_flops) / flops
            + 2.0 * expert_active * tokens / (tpf * flops)
    } else {
        (2.0 * active * tokens + attention_flops) / (tpf * flops)
    };
    let prefill_ar = all_reduces * ring_all_reduce_seconds(tokens * hidden * act, tp, links.tp);
    let prefill_a2a = moe_layers * a2a(if data { tokens } else { tokens / tpf });
    let prefill_pp = (ppf - 1.0) * send_seconds(tokens * hidden * act, links.pp);
    let ttft = prefill_compute + prefill_ar + prefill_a2a + prefill_pp;
    let per_prompt = if data {
        // `tp` prompts at once: the dense part in parallel, the experts' FLOPs and the
        // all-to-all bytes shared.
        (2.0 * (dense_params + expert_active) * tokens + attention_flops) / (tpf * flops)
            + moe_layers * a2a(tokens / tpf)
            + prefill_pp
    } else {
        ttft
    };

    Estimate {
        weights_gib: weights / GIB,
        kv_cache_gib: kv / GIB,
        overhead_gib: overhead / GIB,
        memory_per_gpu_gib: total / GIB,
        memory_budget_gib: budget / GIB,
        fits: total <= budget,
        decode_tokens_per_second: decode_tps,
        prefill_tokens_per_second: tokens / ttft,
        time_to_first_token_seconds: ttft,
        all_reduce_gbps: if tp > 1 && !data { links.tp.gbps } else { 0.0 },
        decode_all_reduce_seconds: decode_ar,
        prefill_all_reduce_seconds: prefill_ar,
        prefill_compute_seconds: prefill_compute,
        prefill_seconds_per_prompt: per_prompt,
        all_to_all_gbps: if ep > 1 { links.ep.gbps } else { 0.0 },
        all_to_all_seconds_per_layer: a2a_layer,
        decode_all_to_all_seconds: decode_a2a,
        prefill_all_to_all_seconds: prefill_a2a,
    }
}

/// The largest value in `lo..=hi` that passes `ok`, for a predicate that holds for a prefix of
/// the range and `ok(lo)` (binary search).
pub fn largest_passing(lo: u32, hi: u32, ok: impl Fn(u32) -> bool) -> u32 {
    let (mut lo, mut hi) = (lo, hi.max(lo));
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if ok(mid) { lo = mid } else { hi = mid - 1 }
    }
    lo
}

/// Largest concurrency `predict` and the serving prediction consider (the CRD's bound on
/// `serving.maxConcurrency`).
pub const MAX_BATCH: u32 = 4096;

/// A request shape: prompt and output tokens per request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RequestShape {
    pub input_tokens: f64,
    pub output_tokens: f64,
}

/// What one replica does for a stream of requests of one shape at a concurrency.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Serving {
    /// The concurrency predicted for.
    pub batch: u32,
    /// The largest concurrency whose KV cache fits next to the weights (0: the weights alone
    /// do not fit).
    pub max_batch: u32,
    /// Whether `batch` sequences of `input + output` tokens fit.
    pub fits: bool,
    /// Prefill of one prompt, unloaded, seconds.
    pub time_to_first_token_seconds: f64,
    /// One decode step at `batch`, the KV cache half-way through the outputs, seconds.
    pub inter_token_latency_seconds: f64,
    /// Replica time one request's prefill takes when prompts keep it busy (chunked together,
    /// side by side with data-parallel attention), seconds.
    pub prefill_seconds_per_request: f64,
    /// Output tokens/s of the replica in steady state: every request costs its prefill and
    /// its share of the decode steps.
    pub output_tokens_per_second: f64,
    /// The same per GPU of the replica.
    pub output_tokens_per_second_per_gpu: f64,
    /// Memory per GPU at `batch`, GiB (weights, KV cache, overhead) and the budget.
    pub memory_per_gpu_gib: f64,
    pub memory_budget_gib: f64,
    /// Expert parallelism: the all-to-all's bandwidth per GPU (GB/s) and its dispatch plus
    /// combine time per MoE layer in one decode step at `batch` (0 without).
    pub all_to_all_gbps: f64,
    pub all_to_all_seconds_per_layer: f64,
}

/// Predict a replica serving requests of `shape` at `batch` concurrent sequences, or at the
/// largest concurrency that fits when `batch` is `None` (as offline throughput benchmarks run).
///
/// Memory fit counts `input + output` tokens per sequence. A decode step reads the KV cache of
/// sequences half-way through their outputs (`input + output / 2` tokens: [`estimate`]'s
/// context is twice that, since it averages over a whole context). Steady state: `batch`
/// requests take `batch` prefills and `output` steps, so
/// `tokens/s = batch x output / (batch x ttft + output x step)`.
#[allow(clippy::too_many_arguments)]
pub fn serve(
    arch: &ModelArchitecture,
    gpu: &GpuModel,
    layout: Layout,
    links: Links,
    c: &CostConstants,
    shape: RequestShape,
    kv_bytes: f64,
    batch: Option<u32>,
) -> Serving {
    let input = shape.input_tokens.max(1.0);
    let output = shape.output_tokens.max(1.0);
    let (tp, pp) = (layout.tp.max(1), layout.pp.max(1));
    let at = |b: u32, context: f64| {
        estimate_layout(
            arch,
            Workload {
                concurrency: f64::from(b.max(1)),
                context,
                kv_bytes,
            },
            gpu,
            layout,
            links,
            c,
        )
    };
    let fits = |b: u32| at(b, input + output).fits;
    // Memory grows with the batch: binary search the largest that fits.
    let max_batch = if !fits(1) {
        0
    } else {
        largest_passing(1, MAX_BATCH, fits)
    };
    let batch = batch.unwrap_or(max_batch).max(1);
    let memory = at(batch, input + output);
    let decode = at(batch, 2.0 * input + output);
    let step = f64::from(batch) / decode.decode_tokens_per_second.max(1e-12);
    let prefill = at(1, input);
    let ttft = prefill.time_to_first_token_seconds;
    // In steady state prompts are prefilled together in chunks of `prefill_chunk_tokens`, so a
    // collective's per-hop latency is paid once per chunk, not once per prompt.
    let ring_hops = if prefill.all_reduce_gbps > 0.0 {
        2.0 * f64::from(arch.layers.max(1)) * 2.0 * f64::from(tp - 1) * links.tp.latency_s
    } else {
        0.0
    };
    let hops = ring_hops + f64::from(pp - 1) * links.pp.latency_s;
    let prompts_per_chunk = (c.prefill_chunk_tokens / input).max(1.0);
    let prefill_each =
        (prefill.prefill_seconds_per_prompt - hops + hops / prompts_per_chunk).max(0.0);
    let b = f64::from(batch);
    let tps = b * output / (b * prefill_each + output * step);
    Serving {
        batch,
        max_batch,
        fits: memory.fits,
        time_to_first_token_seconds: ttft,
        inter_token_latency_seconds: step,
        prefill_seconds_per_request: prefill_each,
        output_tokens_per_second: tps,
        output_tokens_per_second_per_gpu: tps / f64::from(tp.max(1) * pp.max(1)),
        memory_per_gpu_gib: memory.memory_per_gpu_gib,
        memory_budget_gib: memory.memory_budget_gib,
        all_to_all_gbps: decode.all_to_all_gbps,
        all_to_all_seconds_per_layer: decode.all_to_all_seconds_per_layer,
    }
}

/// The links of a replica of `tp x pp` GPUs on nodes of `gpus_per_node` GPUs of `gpu`, packed:
/// a TP group inside one node (NVLink where the type has it, else PCIe) when it fits there,
/// stages on the same node while the replica fits in one, the fabric otherwise.
pub fn packed_links(
    gpu: &GpuModel,
    tp: u32,
    pp: u32,
    gpus_per_node: u32,
    c: &CostConstants,
) -> Links {
    let inside = if gpu.nvlink_bidirectional_gbps > 0.0 {
        Link {
            gbps: gpu.nvlink_per_direction_gbps(),
            latency_s: c.nvlink_latency_s,
        }
    } else {
        c.pcie_link(gpu)
    };
    let fabric = c.fabric_link();
    Links {
        tp: if tp <= gpus_per_node { inside } else { fabric },
        pp: if tp * pp <= gpus_per_node {
            inside
        } else {
            fabric
        },
        ep: all_to_all_link(tp, tp.min(gpus_per_node), c.all_to_all(inside), fabric),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::catalog::Catalog;

    fn llama70b() -> ModelArchitecture {
        ModelArchitecture {
            parameters: 70_000_000_000,
            layers: 80,
            hidden_size: 8192,
            attention_heads: 64,
            kv_heads: 8,
            intermediate_size: 28672,
            vocab_size: 128_256,
            context_length: 131_072,
            bytes_per_parameter: 2.0,
            ..Default::default()
        }
    }

    fn within(x: f64, want: f64, tol: f64) -> bool {
        (x - want).abs() <= want * tol
    }

    /// DESIGN.md section 4: 70B, prefill of 4096 tokens, hidden 8192, BF16: each all-reduce
    /// moves 64 MiB, 160 per forward; at TP=8 about 42 ms of ring traffic on H100 (450 GB/s per
    /// direction) vs about 117 ms on H800 at 160 GB/s, against about 145 ms of compute at 50%.
    #[test]
    fn design_worked_example_70b_h100_vs_h800() {
        let c = CostConstants::default();
        let cat = Catalog::builtin();
        let h100 = cat.lookup("NVIDIA-H100-80GB-HBM3").unwrap();
        let h800 = cat.lookup("NVIDIA-H800").unwrap();
        let work = Workload {
            concurrency: 1.0,
            context: 4096.0,
            kv_bytes: 2.0,
        };
        let fabric = Link {
            gbps: 50.0,
            latency_s: c.fabric_latency_s,
        };
        let nv = |gbps| Links {
            tp: Link {
                gbps,
                latency_s: c.nvlink_latency_s,
            },
            pp: fabric,
            ep: fabric,
        };
        // 64 MiB per all-reduce.
        assert_eq!(4096.0 * 8192.0 * 2.0, 64.0 * 1024.0 * 1024.0);
        let a = estimate(
            &llama70b(),
            work,
            h100,
            8,
            1,
            nv(h100.nvlink_per_direction_gbps()),
            &c,
        );
        let b = estimate(&llama70b(), work, h800, 8, 1, nv(160.0), &c);
        // Ring traffic alone (what DESIGN.md quotes): 160 x 2(n-1)/n x 64 MiB / bandwidth.
        let bw_only = |gbps| {
            let l = Link {
                gbps,
                latency_s: 0.0,
            };
            160.0 * ring_all_reduce_seconds(64.0 * 1024.0 * 1024.0, 8, l)
        };
        assert!(within(bw_only(450.0), 0.042, 0.10));
        assert!(within(bw_only(160.0), 0.117, 0.10));
        // With the per-hop latency (160 x 14 x 2 us = 4.5 ms) on top.
        assert!(
            within(a.prefill_all_reduce_seconds, 0.042 + 0.0045, 0.10),
            "{a:?}"
        );
        assert!(
            within(b.prefill_all_reduce_seconds, 0.117 + 0.0045, 0.10),
            "{b:?}"
        );
        assert!(within(a.prefill_compute_seconds, 0.145, 0.10), "{a:?}");
        assert!(within(b.prefill_compute_seconds, 0.145, 0.10), "{b:?}");
        // On H800, TP=4 x 2 replicas beats TP=8 in prefill tokens/s per GPU; the gap is far
        // smaller on H100, where the cheap all-reduce keeps TP=8 close.
        let b4 = estimate(&llama70b(), work, h800, 4, 1, nv(160.0), &c);
        let a4 = estimate(&llama70b(), work, h100, 4, 1, nv(450.0), &c);
        let gain_h800 = (b4.prefill_tokens_per_second / 4.0) / (b.prefill_tokens_per_second / 8.0);
        let gain_h100 = (a4.prefill_tokens_per_second / 4.0) / (a.prefill_tokens_per_second / 8.0);
        assert!(gain_h800 > 1.25, "{gain_h800}");
        assert!(gain_h100 < gain_h800, "{gain_h100} {gain_h800}");
    }

    #[test]
    fn ring_formula() {
        let l = Link {
            gbps: 100.0,
            latency_s: 1e-6,
        };
        assert_eq!(ring_all_reduce_seconds(1e9, 1, l), 0.0);
        let t = ring_all_reduce_seconds(1e9, 4, l);
        assert!((t - (1.5 * 0.01 + 6e-6)).abs() < 1e-12);
    }

    #[test]
    fn memory_fit_70b() {
        let c = CostConstants::default();
        let cat = Catalog::builtin();
        let h100 = cat.lookup("NVIDIA-H100").unwrap();
        let work = Workload {
            concurrency: 32.0,
            context: 8192.0,
            kv_bytes: 2.0,
        };
        let l = Links {
            tp: Link {
                gbps: 450.0,
                latency_s: 2e-6,
            },
            pp: Link {
                gbps: 50.0,
                latency_s: 1e-5,
            },
            ep: Link {
                gbps: 50.0,
                latency_s: 1e-5,
            },
        };
        assert!(!estimate(&llama70b(), work, h100, 2, 1, l, &c).fits);
        let e = estimate(&llama70b(), work, h100, 4, 1, l, &c);
        assert!(e.fits, "{e:?}");
        // KV: 2 x 80 layers x 2 KV heads per rank x 128 x 2 bytes x 32 x 8192 tokens = 20 GiB.
        assert!(within(e.kv_cache_gib, 20.0, 0.01), "{e:?}");
        // More pipeline stages never raise decode throughput per GPU.
        let e2 = estimate(&llama70b(), work, h100, 4, 2, l, &c);
        assert!(e2.per_gpu(8) < e.per_gpu(4));
        // An FP8 KV cache halves the KV memory and the KV reads of a decode step.
        let fp8 = Workload {
            kv_bytes: 1.0,
            ..work
        };
        let e8 = estimate(&llama70b(), fp8, h100, 4, 1, l, &c);
        assert!(within(e8.kv_cache_gib, 10.0, 0.01), "{e8:?}");
        assert!(e8.decode_tokens_per_second > e.decode_tokens_per_second * 1.05);
        // 4 sequences at TP=2: 65 GiB of weights per GPU leave room for the FP8 KV cache
        // (2.5 GiB) but not for the BF16 one (5 GiB) under the 72 GiB budget.
        let small = Workload {
            concurrency: 4.0,
            ..fp8
        };
        assert!(
            !estimate(
                &llama70b(),
                Workload {
                    kv_bytes: 2.0,
                    ..small
                },
                h100,
                2,
                1,
                l,
                &c
            )
            .fits
        );
        assert!(estimate(&llama70b(), small, h100, 2, 1, l, &c).fits);
    }

    #[test]
    fn a_measured_all_reduce_scales_the_ring_time_of_its_layout_only() {
        use crate::planner::calibration::{LayoutKey, Measurement};
        let cat = Catalog::builtin();
        let h800 = cat.lookup("NVIDIA-H800").unwrap();
        let mut c = CostConstants::default();
        let links = packed_links(h800, 8, 1, 8, &c);
        let work = Workload {
            concurrency: 1.0,
            context: 4096.0,
            kv_bytes: 2.0,
        };
        let before = estimate(&llama70b(), work, h800, 8, 1, links, &c);
        // The fleet's all-reduces take twice the predicted time on H800 TP=8.
        let key = LayoutKey {
            gpu_type: "H800".into(),
            tensor_parallel: 8,
            pipeline_parallel: 1,
            engine: "vllm".into(),
        };
        for _ in 0..3 {
            c.calibration.observe(
                &key,
                Measurement {
                    predicted_decode_tokens_per_second: 0.0,
                    measured_decode_tokens_per_second: None,
                    predicted_time_to_first_token_seconds: 0.0,
                    measured_time_to_first_token_seconds: None,
                    predicted_allreduce_seconds: 1e-3,
                    measured_allreduce_seconds: Some(2e-3),
                },
            );
        }
        let slow = c.calibrated_links(h800, 8, 1, "vllm", links);
        let after = estimate(&llama70b(), work, h800, 8, 1, slow, &c);
        assert!(within(
            after.prefill_all_reduce_seconds,
            2.0 * before.prefill_all_reduce_seconds,
            1e-9
        ));
        // Another engine or layout is untouched.
        assert_eq!(c.calibrated_links(h800, 8, 1, "sglang", links), links);
        assert_eq!(c.calibrated_links(h800, 4, 1, "vllm", links), links);
    }
}
