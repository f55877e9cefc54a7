//! The Llama-family decoder: RMSNorm, RoPE (ggml's "normal" mode: adjacent pairs), grouped-query
//! attention with a KV cache, SwiGLU MLP, LM head tied to the embedding when the file has no
//! `output.weight`.
//!
//! Weights stay in their GGUF encoding (borrowed from the memory map when one rank holds the
//! whole model). A [`Shard`] selects the part of every matrix a tensor-parallel rank holds
//! (whole attention heads and an FFN slice for the column-parallel Q/K/V and gate/up
//! projections; the matching input columns of the row-parallel attention-output and down
//! projections), and the forward pass calls the [`Collective`] once after each row-parallel product. The token embedding and the LM head are
//! vocabulary-parallel (one matrix when tied): each rank holds a block of their rows; a token's
//! embedding comes from the rank that holds it through one all-reduce, and rank 0 gathers the
//! logits of every rank's rows. A tensor-parallel rank copies its part out of the map and drops
//! the mapped pages, so its resident weights are its part: 1/TP of the model.
//!
//! A [`Stage`] selects the contiguous block of layers a pipeline-parallel rank holds (stage 0 also
//! the token embedding, the last stage the final norm and the LM head); [`Llama::forward_from`]
//! starts from the previous stage's hidden state and can stop after the stage's last layer.
//!
//! Mixture of experts (llama.cpp's Mixtral layout, see [`MoeConfig`]): a layer's feed-forward
//! network is either dense or a router over routed experts plus optional shared experts
//! ([`Ffn`]). With tensor parallelism the routed experts are split over the ranks in contiguous
//! blocks of whole experts (expert parallelism); every rank routes every token (the hidden state
//! is replicated after attention) and runs only the experts it holds, and the same all-reduce
//! that ends a dense FFN sums the partial outputs. The shared experts are sharded like a dense
//! FFN.
//!
//! RoPE: llama.cpp's converter permutes the Q and K rows of Hugging Face checkpoints so that
//! ggml's normal RoPE (rotating elements `2i` and `2i + 1`) applies; this module uses the same
//! convention, so GGUF weights are used as stored. Hugging Face safetensors weights are loaded
//! through the same code (a [`TensorSource`]); their Q and K rows are reordered at load.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};

use super::MappedGguf;
use super::gguf::{Gguf, Value};
use super::kv_cache::KvCache;
use super::parallel::{self, Collective, Shard, Stage};
use super::source::{self, GgufSource, QkLayout, TensorSource, interleave_qk};
use crate::kernels::{self, Pool, QMatrix, SendPtr, dot};

/// Hyper-parameters from the GGUF metadata (`llama.*`).
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub n_layers: usize,
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub rope_base: f32,
    pub rope_dim: usize,
    /// Linear RoPE scaling: positions are multiplied by this (1 / `llama.rope.scaling.factor`;
    /// 1 without scaling).
    pub rope_freq_scale: f32,
    pub rms_eps: f32,
    pub context_length: usize,
    /// Mixture-of-experts hyper-parameters (`None`: a dense model).
    pub moe: Option<MoeConfig>,
}

/// The mixture-of-experts hyper-parameters of a llama-architecture GGUF in llama.cpp's Mixtral
/// layout (`llama.expert_count` > 0).
///
/// A MoE layer has a router `blk.N.ffn_gate_inp.weight` (`[experts, hidden]`) and the routed
/// experts stacked in three tensors `blk.N.ffn_{gate,up,down}_exps.weight` (GGUF dims
/// `[hidden, expert_ffn, experts]` for gate and up, `[expert_ffn, hidden, experts]` for down:
/// expert `e` is the contiguous `e`-th matrix). Shared experts, when the model has them, are one
/// SwiGLU FFN `blk.N.ffn_{gate,up,down}_shexp.weight` of width `shared_ffn` applied to every
/// token, ungated. The first `leading_dense` layers are dense (`blk.N.ffn_{gate,up,down}`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoeConfig {
    /// Routed experts per MoE layer (`llama.expert_count`).
    pub n_experts: usize,
    /// Experts each token is routed to (`llama.expert_used_count`, the top-k).
    pub n_used: usize,
    /// Feed-forward width of one routed expert (`llama.expert_feed_forward_length`, else
    /// `llama.feed_forward_length`).
    pub expert_ffn: usize,
    /// Feed-forward width of the shared experts together, 0 without any: the rows of
    /// `ffn_gate_shexp` (`llama.expert_shared_feed_forward_length` when present, as llama.cpp
    /// records it; else `llama.expert_shared_count` x `expert_ffn`, DeepSeek's convention).
    pub shared_ffn: usize,
    /// Leading dense layers (`llama.leading_dense_block_count`, default 0).
    pub leading_dense: usize,
}

impl MoeConfig {
    /// Whether global layer `layer` is a mixture-of-experts layer (not one of the leading dense
    /// ones).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        layer >= self.leading_dense
    }
}

/// Architectures llama.cpp knows as mixture-of-experts models whose own layouts Tessera does not
/// read (their attention or routing differs from Mixtral's). A file of any other architecture
/// with `{arch}.expert_count` > 0 is refused the same way.
const MOE_ARCHITECTURES: &[&str] = &[
    "mixtral",
    "qwen2moe",
    "qwen3moe",
    "deepseek",
    "deepseek2",
    "deepseek3",
    "llama4",
    "gpt-oss",
    "gptoss",
    "dbrx",
    "olmoe",
    "grok",
    "arctic",
    "phimoe",
    "granitemoe",
    "jamba",
    "bailingmoe",
    "ernie4_5-moe",
    "glm4moe",
    "hunyuan-moe",
];

impl LlamaConfig {
    /// Read the configuration; errors name the file and the missing or invalid key.
    pub fn from_gguf(g: &Gguf) -> anyhow::Result<Self> {
        let path = g.path.display();
        let arch = g
            .architecture()
            .with_context(|| format!("{path}: metadata key general.architecture is missing"))?;
        if arch != "llama" {
            let experts = g
                .get(&format!("{arch}.expert_count"))
                .and_then(Value::as_u64);
            if MOE_ARCHITECTURES.contains(&arch) || experts.is_some_and(|n| n > 0) {
                bail!(
                    "{path}: general.architecture {arch:?} is a mixture-of-experts model, and mixture-of-experts models of that architecture are not supported yet; supported are llama-architecture GGUFs, dense or mixture-of-experts in llama.cpp's Mixtral layout (llama.expert_count, blk.N.ffn_gate_inp and blk.N.ffn_{{gate,up,down}}_exps tensors)"
                );
            }
            bail!("{path}: architecture {arch:?} is not supported (llama is)");
        }
        let get = |key: &str| -> anyhow::Result<usize> {
            let v = g
                .get(key)
                .with_context(|| format!("{path}: metadata key {key} is missing"))?;
            v.as_u64()
                .map(|v| v as usize)
                .with_context(|| format!("{path}: metadata key {key} is not an integer: {v:?}"))
        };
        let positive = |key: &str| -> anyhow::Result<usize> {
            match get(key)? {
                0 => bail!("{path}: metadata key {key} is 0"),
                v => Ok(v),
            }
        };
        let n_layers = positive("llama.block_count")?;
        let hidden = positive("llama.embedding_length")?;
        let n_heads = get("llama.attention.head_count")?;
        let n_kv_heads = match g.get("llama.attention.head_count_kv") {
            Some(_) => get("llama.attention.head_count_kv")?,
            None => n_heads,
        };
        let ffn = positive("llama.feed_forward_length")?;
        let context_length = positive("llama.context_length")?;
        let rms_eps = g
            .get("llama.attention.layer_norm_rms_epsilon")
            .and_then(Value::as_f64)
            .with_context(|| {
                format!("{path}: metadata key llama.attention.layer_norm_rms_epsilon is missing")
            })? as f32;
        let rope_base = g
            .get("llama.rope.freq_base")
            .and_then(Value::as_f64)
            .unwrap_or(10_000.0) as f32;
        // As llama.cpp: with type linear (or no type) the factor (or the older
        // `rope.scale_linear`) scales positions unless 0; type none means no scaling whatever
        // the factor; YaRN and LongRoPE need more than a scale and are refused.
        let scaled = match g.get("llama.rope.scaling.type").and_then(Value::as_str) {
            None | Some("linear") => true,
            Some("none") => false,
            Some(other) => bail!(
                "{path}: llama.rope.scaling.type {other:?} is not supported (none and linear are; Llama 3.1's frequency factors, the rope_freqs.weight tensor, are too)"
            ),
        };
        let rope_factor = ["llama.rope.scaling.factor", "llama.rope.scale_linear"]
            .iter()
            .find_map(|k| g.get(k).map(|v| (k, v)))
            .filter(|_| scaled);
        let rope_freq_scale = match rope_factor {
            None => 1.0,
            Some((k, v)) => match v.as_f64() {
                Some(0.0) => 1.0,
                Some(f) if f.is_finite() && f > 0.0 => (1.0 / f) as f32,
                _ => bail!("{path}: metadata key {k} is {v:?}, not a positive number"),
            },
        };
        let vocab = match g.get("llama.vocab_size") {
            Some(_) => get("llama.vocab_size")?,
            None => g
                .get("tokenizer.ggml.tokens")
                .and_then(Value::as_array)
                .map(<[Value]>::len)
                .or_else(|| {
                    g.tensor("token_embd.weight")
                        .and_then(|t| t.dims.get(1).map(|&d| d as usize))
                })
                .with_context(|| format!("{path}: metadata key llama.vocab_size is missing"))?,
        };
        if n_heads == 0 || n_kv_heads == 0 || !hidden.is_multiple_of(n_heads) {
            bail!(
                "{path}: llama.embedding_length {hidden} is not a multiple of llama.attention.head_count {n_heads}"
            );
        }
        if !n_heads.is_multiple_of(n_kv_heads) {
            bail!(
                "{path}: llama.attention.head_count {n_heads} is not a multiple of llama.attention.head_count_kv {n_kv_heads}"
            );
        }
        let head_dim = match g.get("llama.attention.key_length") {
            Some(_) => positive("llama.attention.key_length")?,
            None => hidden / n_heads,
        };
        let rope_dim = match g.get("llama.rope.dimension_count") {
            Some(_) => get("llama.rope.dimension_count")?,
            None => head_dim,
        };
        if rope_dim > head_dim || !rope_dim.is_multiple_of(2) {
            bail!(
                "{path}: llama.rope.dimension_count {rope_dim} does not fit head size {head_dim}"
            );
        }
        let moe = MoeConfig::from_gguf(g, n_layers, ffn)?;
        Ok(Self {
            n_layers,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn,
            vocab,
            rope_base,
            rope_dim,
            rope_freq_scale,
            rms_eps,
            context_length,
            moe,
        })
    }

    /// Whether global layer `layer` has a dense FFN (`blk.N.ffn_{gate,up,down}`): every layer of
    /// a dense model, the leading dense layers of a mixture-of-experts one.
    pub fn is_dense_layer(&self, layer: usize) -> bool {
        self.moe.as_ref().is_none_or(|m| !m.is_moe_layer(layer))
    }

    /// Whether the model splits into `stage.count` pipeline stages (at least a layer each).
    pub fn check_stage(&self, stage: Stage) -> anyhow::Result<()> {
        if stage.count > self.n_layers {
            bail!(
                "pipeline-parallel degree {} exceeds the model's {} layers (every stage needs at least one)",
                stage.count,
                self.n_layers
            );
        }
        Ok(())
    }

    /// Whether `world` ranks can split this model (heads evenly; KV heads split or replicated;
    /// routed experts in whole experts, evenly).
    pub fn check_shard(&self, shard: Shard) -> anyhow::Result<()> {
        let w = shard.world;
        if let Some(m) = &self.moe {
            if !m.n_experts.is_multiple_of(w) {
                let both = gcd(m.n_experts, self.n_heads);
                let fits: Vec<String> = (1..=both)
                    .filter(|d| both.is_multiple_of(*d))
                    .map(|d| d.to_string())
                    .collect();
                bail!(
                    "tensor-parallel degree {w} must divide the model's {n} routed experts (llama.expert_count): expert parallelism gives each rank an equal block of whole experts; use a degree that divides both the {n} experts and the {} attention heads ({})",
                    self.n_heads,
                    fits.join(", "),
                    n = m.n_experts,
                );
            }
            if !m.shared_ffn.is_multiple_of(w) {
                bail!(
                    "tensor-parallel degree {w} must divide the shared experts' feed-forward size {} (llama.expert_shared_feed_forward_length)",
                    m.shared_ffn
                );
            }
        }
        if !self.n_heads.is_multiple_of(w) {
            bail!(
                "tensor-parallel degree {w} must divide the model's {} attention heads",
                self.n_heads
            );
        }
        if !(self.n_kv_heads.is_multiple_of(w) || w.is_multiple_of(self.n_kv_heads)) {
            bail!(
                "tensor-parallel degree {w} must divide, or be a multiple of, the model's {} KV heads",
                self.n_kv_heads
            );
        }
        let dense_layers = (0..self.n_layers).any(|i| self.is_dense_layer(i));
        if dense_layers && !self.ffn.is_multiple_of(w) {
            bail!(
                "tensor-parallel degree {w} must divide the feed-forward size {}",
                self.ffn
            );
        }
        Ok(())
    }
}

impl MoeConfig {
    /// The `llama.expert_*` keys of `g` (`None` without experts). Errors name the file, the key,
    /// the value and the rule; routing other than softmax, top-k and renormalisation is refused.
    fn from_gguf(g: &Gguf, n_layers: usize, ffn: usize) -> anyhow::Result<Option<Self>> {
        let path = g.path.display();
        let get = |key: &str| -> anyhow::Result<Option<usize>> {
            g.get(key)
                .map(|v| {
                    v.as_u64().map(|v| v as usize).with_context(|| {
                        format!("{path}: metadata key {key} is not an integer: {v:?}")
                    })
                })
                .transpose()
        };
        let n_experts = get("llama.expert_count")?.unwrap_or(0);
        if n_experts == 0 {
            return Ok(None);
        }
        let n_used = get("llama.expert_used_count")?.with_context(|| {
            format!(
                "{path}: metadata key llama.expert_used_count (experts per token) is missing; a mixture-of-experts model (llama.expert_count {n_experts}) needs it"
            )
        })?;
        if n_used == 0 || n_used > n_experts {
            bail!(
                "{path}: metadata key llama.expert_used_count is {n_used}; it must be between 1 and llama.expert_count {n_experts}"
            );
        }
        let expert_ffn = match get("llama.expert_feed_forward_length")? {
            Some(0) => bail!("{path}: metadata key llama.expert_feed_forward_length is 0"),
            Some(n) => n,
            None => ffn,
        };
        let shared_count = get("llama.expert_shared_count")?.unwrap_or(0);
        let shared_ffn = match get("llama.expert_shared_feed_forward_length")? {
            Some(n) if n > 0 => n,
            _ => shared_count.checked_mul(expert_ffn).with_context(|| {
                format!(
                    "{path}: metadata key llama.expert_shared_count {shared_count} is too large"
                )
            })?,
        };
        let leading_dense = get("llama.leading_dense_block_count")?.unwrap_or(0);
        if leading_dense > n_layers {
            bail!(
                "{path}: metadata key llama.leading_dense_block_count is {leading_dense}, more than the {n_layers} layers (llama.block_count)"
            );
        }
        // Routing as Mixtral: softmax over the router's logits, top-k, weights renormalised.
        if let Some(v) = g.get("llama.expert_gating_func")
            && v.as_u64() != Some(1)
        {
            bail!(
                "{path}: metadata key llama.expert_gating_func is {v:?}; only 1 (softmax, Mixtral's routing) is supported"
            );
        }
        if let Some(v) = g.get("llama.expert_weights_scale")
            && v.as_f64() != Some(1.0)
        {
            bail!(
                "{path}: metadata key llama.expert_weights_scale is {v:?}; only 1 (no scaling of the routing weights) is supported"
            );
        }
        if let Some(v) = g.get("llama.expert_weights_norm")
            && *v != Value::Bool(true)
        {
            bail!(
                "{path}: metadata key llama.expert_weights_norm is {v:?}; only true (the top-k weights renormalised to sum 1, as Mixtral) is supported"
            );
        }
        Ok(Some(Self {
            n_experts,
            n_used,
            expert_ffn,
            shared_ffn,
            leading_dense,
        }))
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The heads and FFN slice one rank holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalDims {
    /// Global index of the first query head and the number held.
    pub q_head0: usize,
    pub q_heads: usize,
    /// Global index of the first KV head and the number held.
    pub kv_head0: usize,
    pub kv_heads: usize,
    /// FFN columns held (of a dense layer's FFN).
    pub ffn: std::ops::Range<usize>,
    /// Columns held of the shared experts' FFN (empty without a mixture of experts).
    pub shared_ffn: std::ops::Range<usize>,
    /// The routed experts held, whole (a contiguous block; empty without a mixture of experts).
    pub experts: std::ops::Range<usize>,
}

impl LocalDims {
    pub fn new(c: &LlamaConfig, s: Shard) -> Self {
        let q = s.range(c.n_heads);
        let group = c.n_heads / c.n_kv_heads;
        let kv_head0 = q.start / group;
        let kv_end = (q.end - 1) / group + 1;
        Self {
            q_head0: q.start,
            q_heads: q.len(),
            kv_head0,
            kv_heads: kv_end - kv_head0,
            ffn: s.range(c.ffn),
            shared_ffn: c.moe.as_ref().map_or(0..0, |m| s.range(m.shared_ffn)),
            experts: c.moe.as_ref().map_or(0..0, |m| s.range(m.n_experts)),
        }
    }
}

/// One decoder layer's weights (this rank's shard).
#[derive(Debug)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub wq: QMatrix,
    pub wk: QMatrix,
    pub wv: QMatrix,
    pub wo: QMatrix,
    pub ffn_norm: Vec<f32>,
    pub ffn: Ffn,
}

/// A SwiGLU feed-forward network, `down(silu(gate · x) ⊙ (up · x))`: this rank's slice of a
/// dense FFN or of the shared experts (rows of gate and up, the matching columns of down), or
/// one whole routed expert.
#[derive(Debug)]
pub struct Mlp {
    pub gate: QMatrix,
    pub up: QMatrix,
    pub down: QMatrix,
}

impl Mlp {
    /// `out = down(silu(gate · x) ⊙ (up · x))` for `b` rows of `x` (`[b, gate.cols]`); `g` and
    /// `u` are scratch of `b * gate.rows` floats, `out` is `[b, down.rows]`.
    pub fn forward(
        &self,
        pool: &Pool,
        x: &[f32],
        b: usize,
        g: &mut [f32],
        u: &mut [f32],
        out: &mut [f32],
    ) {
        kernels::matmul_multi(pool, &[&self.gate, &self.up], x, b, &mut [&mut *g, &mut *u]);
        g.iter_mut()
            .zip(u.iter())
            .for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u);
        kernels::matmul(pool, &self.down, g, b, out);
    }
}

/// A layer's feed-forward network.
#[derive(Debug)]
pub enum Ffn {
    /// A dense SwiGLU FFN (this rank's slice).
    Dense(Mlp),
    /// A mixture of experts.
    Moe(Moe),
}

/// A mixture-of-experts FFN as one rank holds it: the whole router, its block of whole routed
/// experts, its slice of the shared experts.
#[derive(Debug)]
pub struct Moe {
    /// `[experts, hidden]`, replicated on every rank: every rank routes every token.
    pub router: QMatrix,
    /// Experts each token is routed to (top-k).
    pub n_used: usize,
    /// Global index of `experts[0]`.
    pub expert0: usize,
    /// This rank's routed experts, whole, in order.
    pub experts: Vec<Mlp>,
    /// This rank's slice of the shared experts (applied to every token, ungated).
    pub shared: Option<Mlp>,
    /// Tokens the router sent to each expert (all of them, not only this rank's) since loading.
    routed: Vec<std::sync::atomic::AtomicU64>,
}

impl Moe {
    /// Tokens the router has sent to each expert of this layer since loading (one count per
    /// expert of the model; every rank routes every token, so every rank counts all experts).
    pub fn routed_tokens(&self) -> Vec<u64> {
        self.routed
            .iter()
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
            .collect()
    }

    /// The mixture's output for `b` rows of `xn` (`[b, hidden]`) into `out`: this rank's part,
    /// before the all-reduce (the shared experts' slice plus, per token, the weighted outputs of
    /// the chosen experts this rank holds). `g`, `u` are scratch of `b` rows of the widest FFN
    /// held, `xe` and `ye` of `b` rows of the hidden size.
    fn forward(
        &self,
        pool: &Pool,
        xn: &[f32],
        b: usize,
        (g, u): (&mut [f32], &mut [f32]),
        (xe, ye): (&mut [f32], &mut [f32]),
        out: &mut [f32],
    ) {
        let h = self.router.cols;
        match &self.shared {
            Some(m) => {
                let f = m.gate.rows;
                m.forward(pool, xn, b, &mut g[..b * f], &mut u[..b * f], out);
            }
            None => out.fill(0.0),
        }
        let n = self.router.rows;
        let mut logits = vec![0f32; b * n];
        kernels::matmul(pool, &self.router, xn, b, &mut logits);
        // Per local expert: the tokens routed to it and their weights.
        let mut mine: Vec<Vec<(usize, f32)>> = vec![Vec::new(); self.experts.len()];
        let mut chosen = Vec::with_capacity(self.n_used);
        let mut order = Vec::with_capacity(n);
        for (t, l) in logits.chunks_exact(n).enumerate() {
            route(l, self.n_used, &mut order, &mut chosen);
            for &(e, w) in &chosen {
                self.routed[e].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Some(list) = e.checked_sub(self.expert0).and_then(|j| mine.get_mut(j)) {
                    list.push((t, w));
                }
            }
        }
        // Each expert runs once over the rows of all its tokens; the outputs are added in
        // expert order, so a token's sum does not depend on the other tokens in the batch.
        for (expert, rows) in self.experts.iter().zip(&mine) {
            let m = rows.len();
            if m == 0 {
                continue;
            }
            for (dst, &(t, _)) in xe.chunks_exact_mut(h).zip(rows) {
                dst.copy_from_slice(&xn[t * h..(t + 1) * h]);
            }
            let f = expert.gate.rows;
            expert.forward(
                pool,
                &xe[..m * h],
                m,
                &mut g[..m * f],
                &mut u[..m * f],
                &mut ye[..m * h],
            );
            for (y, &(t, w)) in ye.chunks_exact(h).zip(rows) {
                dot::axpy(w, y, &mut out[t * h..(t + 1) * h]);
            }
        }
    }
}

/// The router's choice for one token: the `k` largest `logits` (ties to the lower expert) with
/// weights softmax(logits) taken at those experts and renormalised to sum 1, which is the
/// softmax over the chosen logits alone (Mixtral's routing; Qwen3-MoE's `norm_topk_prob`).
/// `out` receives `(expert, weight)` pairs, largest logit first; `order` is scratch.
fn route(logits: &[f32], k: usize, order: &mut Vec<usize>, out: &mut Vec<(usize, f32)>) {
    order.clear();
    order.extend(0..logits.len());
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    out.clear();
    let Some(&top) = order.first() else { return };
    let max = logits[top];
    out.extend(order.iter().take(k).map(|&e| (e, (logits[e] - max).exp())));
    let sum: f32 = out.iter().map(|(_, w)| w).sum();
    out.iter_mut().for_each(|(_, w)| *w /= sum);
}

/// A loaded Llama model (one rank's shard of one pipeline stage).
pub struct Llama {
    pub config: LlamaConfig,
    pub shard: Shard,
    pub local: LocalDims,
    pub stage: Stage,
    /// Global index of `layers[0]`.
    pub first_layer: usize,
    /// This rank's rows of the token embedding (stage 0 only): the vocabulary-parallel split of
    /// [`Shard::vocab_split`], all of it on a single rank.
    pub embed: Option<QMatrix>,
    /// This stage's layers.
    pub layers: Vec<Layer>,
    /// The final norm (last stage only; empty elsewhere).
    pub norm: Vec<f32>,
    /// This rank's rows of the LM head (last stage only; of the embedding matrix when tied):
    /// the vocabulary-parallel split of [`Shard::vocab_split`], all of it on a single rank.
    pub lm_head: Option<QMatrix>,
    inv_freq: Vec<f32>,
    file: Option<Arc<MappedGguf>>,
}

/// Which logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// The last token's (`[vocab]`): generation.
    Last,
    /// Every token's (`[tokens, vocab]`): tests and scoring.
    All,
}

/// Where a forward pass starts.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    /// Token ids (stage 0).
    Tokens(&'a [u32]),
    /// The previous stage's hidden state, `[tokens, hidden]` (every later stage).
    Hidden(&'a [f32]),
}

/// Where a forward pass stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// After the final norm and the LM head (last stage).
    Logits(Logits),
    /// After this stage's last layer: every token's hidden state, `[tokens, hidden]`.
    Hidden,
}

struct Loader<'a> {
    src: &'a dyn TensorSource,
    /// This rank holds part of every tensor (tensor-parallel): it copies its parts out of the
    /// map and drops each tensor's mapped pages once copied, so what stays resident is its part
    /// exactly, not its part plus the neighbouring pages the kernel maps around each fault
    /// (64 KiB windows: measured 59 instead of 31 MiB per rank at TP=3 on the test model). A
    /// rank holding whole tensors (one rank, or one pipeline stage) borrows them from the map.
    own: bool,
}

impl Loader<'_> {
    /// A matrix `[rows, cols]` (GGUF dims `[cols, rows]`).
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> anyhow::Result<QMatrix> {
        let t = self.src.tensor(name)?;
        let path = t.file.display();
        let want = [cols as u64, rows as u64];
        if t.dims != want {
            bail!(
                "{path}: tensor {} has shape {}, expected {}",
                t.name,
                t.shape_text(&t.dims),
                t.shape_text(&want)
            );
        }
        QMatrix::new(t.ty, rows, cols, t.data)
            .map_err(|e| anyhow::anyhow!("{path}: tensor {}: {e}", t.name))
    }

    /// This rank's `part` of matrix `name` (`[rows, cols]`): borrowed from the map, or a copy
    /// of its own with the tensor's pages released (see `own`). Errors name the file and the
    /// tensor.
    fn part(
        &self,
        name: &str,
        (rows, cols): (usize, usize),
        part: impl FnOnce(&QMatrix) -> Result<QMatrix, String>,
    ) -> anyhow::Result<QMatrix> {
        let full = self.matrix(name, rows, cols)?;
        let mine = part(&full).map_err(|e| {
            let file = self.src.tensor(name).map(|t| (t.file, t.name));
            let (file, tensor) = file.unwrap_or_default();
            anyhow::anyhow!("{}: tensor {tensor}: {e}", file.display())
        })?;
        if !self.own {
            return Ok(mine);
        }
        let mine = mine.into_owned();
        full.release_pages();
        Ok(mine)
    }

    /// Rows `rows` of matrix `name`.
    fn rows(
        &self,
        name: &str,
        shape: (usize, usize),
        rows: std::ops::Range<usize>,
    ) -> anyhow::Result<QMatrix> {
        self.part(name, shape, |m| Ok(m.slice_rows(rows)))
    }

    /// Columns `cols` of matrix `name` (the input shard of a row-parallel product).
    fn cols(
        &self,
        name: &str,
        shape: (usize, usize),
        cols: std::ops::Range<usize>,
    ) -> anyhow::Result<QMatrix> {
        self.part(name, shape, |m| m.slice_cols(cols))
    }

    /// A Q or K projection's rows `rows` (whole heads), in the order RoPE expects.
    fn qk(
        &self,
        name: &str,
        shape: (usize, usize),
        rows: std::ops::Range<usize>,
        head_dim: usize,
    ) -> anyhow::Result<QMatrix> {
        let layout = self.src.qk_layout();
        self.part(name, shape, |m| {
            let m = m.slice_rows(rows);
            match layout {
                QkLayout::Interleaved => Ok(m),
                QkLayout::HalfSplit => interleave_qk(&m, head_dim),
            }
        })
    }

    /// This rank's slice of the SwiGLU FFN `blk.{layer}.{gate,up,down}{suffix}.weight` of width
    /// `ffn` (rows `cols` of gate and up, the same columns of down).
    fn mlp(
        &self,
        layer: usize,
        suffix: &str,
        (hidden, ffn): (usize, usize),
        cols: std::ops::Range<usize>,
    ) -> anyhow::Result<Mlp> {
        let n = |s: &str| format!("blk.{layer}.ffn_{s}{suffix}.weight");
        Ok(Mlp {
            gate: self.rows(&n("gate"), (ffn, hidden), cols.clone())?,
            up: self.rows(&n("up"), (ffn, hidden), cols.clone())?,
            down: self.cols(&n("down"), (hidden, ffn), cols)?,
        })
    }

    /// Experts `mine` of the stacked expert tensor `name`: `n` matrices `[rows, cols]` one after
    /// the other (GGUF dims `[cols, rows, n]`, llama.cpp's layout). Each is a slice of the
    /// tensor, borrowed from the map, or copied (see `own`): only these experts' bytes are read.
    fn experts(
        &self,
        name: &str,
        n: usize,
        (rows, cols): (usize, usize),
        mine: std::ops::Range<usize>,
    ) -> anyhow::Result<Vec<QMatrix>> {
        let t = self.src.tensor(name)?;
        let path = t.file.display();
        let want = [cols as u64, rows as u64, n as u64];
        if t.dims != want {
            bail!(
                "{path}: tensor {} has shape {}, expected {} ({n} experts of {rows} rows x {cols} columns, stacked as llama.cpp writes them)",
                t.name,
                t.shape_text(&t.dims),
                t.shape_text(&want)
            );
        }
        let all = QMatrix::new(t.ty, n * rows, cols, t.data)
            .map_err(|e| anyhow::anyhow!("{path}: tensor {}: {e}", t.name))?;
        let experts = mine
            .map(|e| {
                let m = all.slice_rows(e * rows..(e + 1) * rows);
                if self.own { m.into_owned() } else { m }
            })
            .collect();
        if self.own {
            all.release_pages();
        }
        Ok(experts)
    }

    /// This rank's part of the mixture-of-experts FFN of `layer` (see [`MoeConfig`]).
    fn moe(
        &self,
        layer: usize,
        c: &LlamaConfig,
        m: &MoeConfig,
        local: &LocalDims,
    ) -> anyhow::Result<Moe> {
        let n = |s: &str| format!("blk.{layer}.{s}.weight");
        let h = c.hidden;
        if !self.src.has(&n("ffn_gate_exps"))
            && self.src.has(&format!("blk.{layer}.ffn_gate.0.weight"))
        {
            bail!(
                "{}: layer {layer} stores its experts one tensor each (blk.{layer}.ffn_gate.0.weight, an older llama.cpp layout); the stacked tensors {} etc. are needed: convert the model again with a current llama.cpp",
                self.src.metadata().gguf.path.display(),
                n("ffn_gate_exps")
            );
        }
        let shape = (m.expert_ffn, h);
        let range = local.experts.clone();
        let gate = self.experts(&n("ffn_gate_exps"), m.n_experts, shape, range.clone())?;
        let up = self.experts(&n("ffn_up_exps"), m.n_experts, shape, range.clone())?;
        let down = self.experts(&n("ffn_down_exps"), m.n_experts, (h, m.expert_ffn), range)?;
        let experts = gate
            .into_iter()
            .zip(up)
            .zip(down)
            .map(|((gate, up), down)| Mlp { gate, up, down })
            .collect();
        let has_shared = self.src.has(&n("ffn_gate_shexp"));
        let shared = match m.shared_ffn {
            0 if has_shared => bail!(
                "{}: tensor {} is present but the metadata declares no shared experts; set llama.expert_shared_feed_forward_length (its row count) or llama.expert_shared_count",
                self.src.metadata().gguf.path.display(),
                n("ffn_gate_shexp")
            ),
            0 => None,
            f => Some(self.mlp(layer, "_shexp", (h, f), local.shared_ffn.clone())?),
        };
        if self.src.has(&n("ffn_gate_inp_shexp")) {
            bail!(
                "{}: tensor {} (a sigmoid gate on the shared experts, Qwen2-MoE's) is not supported; shared experts are applied ungated",
                self.src.metadata().gguf.path.display(),
                n("ffn_gate_inp_shexp")
            );
        }
        Ok(Moe {
            router: self.rows(&n("ffn_gate_inp"), (m.n_experts, h), 0..m.n_experts)?,
            n_used: m.n_used,
            expert0: local.experts.start,
            experts,
            shared,
            routed: (0..m.n_experts).map(|_| Default::default()).collect(),
        })
    }

    fn vector(&self, name: &str, n: usize) -> anyhow::Result<Vec<f32>> {
        let t = self.src.tensor(name)?;
        let path = t.file.display();
        if t.dims != [n as u64] {
            bail!(
                "{path}: tensor {} has shape {}, expected [{n}]",
                t.name,
                t.shape_text(&t.dims)
            );
        }
        if !kernels::quant::supported(t.ty) {
            bail!("{path}: tensor {}: type {} is not supported", t.name, t.ty);
        }
        let bytes = t.data.as_slice();
        match t.ty.row_bytes(n as u64) {
            Some(len) if len as usize == bytes.len() => {}
            _ => bail!(
                "{path}: tensor {}: {} bytes for {n} values of {}",
                t.name,
                bytes.len(),
                t.ty
            ),
        }
        let mut out = vec![0f32; n];
        kernels::quant::dequantize_row(t.ty, bytes, &mut out);
        if let (true, kernels::Bytes::Mapped { file, start, len }) = (self.own, &t.data) {
            file.release_range(*start, *len);
        }
        Ok(out)
    }
}

impl Llama {
    /// Open a model (a GGUF file or a safetensors model, see [`source::open`]) and load this
    /// rank's shard.
    pub fn open(path: &Path, shard: Shard) -> anyhow::Result<Self> {
        Self::load_from(source::open(path)?.as_ref(), shard, Stage::WHOLE)
    }

    /// Load this rank's shard from a mapped GGUF file. Errors name the file and the tensor.
    pub fn load(file: Arc<MappedGguf>, shard: Shard) -> anyhow::Result<Self> {
        Self::load_stage(file, shard, Stage::WHOLE)
    }

    /// Load this rank's shard of one pipeline stage's layers (see [`Stage`]); nothing of the
    /// other stages' layers is touched.
    pub fn load_stage(file: Arc<MappedGguf>, shard: Shard, stage: Stage) -> anyhow::Result<Self> {
        Self::load_from(&GgufSource(file), shard, stage)
    }

    /// Load this rank's shard of one pipeline stage from any [`TensorSource`] (GGUF or
    /// safetensors). Errors name the file and the tensor.
    pub fn load_from(src: &dyn TensorSource, shard: Shard, stage: Stage) -> anyhow::Result<Self> {
        let file = Arc::clone(src.metadata());
        let config = LlamaConfig::from_gguf(&file.gguf)?;
        config
            .check_shard(shard)
            .with_context(|| format!("{}", file.gguf.path.display()))?;
        config
            .check_stage(stage)
            .with_context(|| format!("{}", file.gguf.path.display()))?;
        let stage_layers = stage.layers(config.n_layers);
        let local = LocalDims::new(&config, shard);
        let c = &config;
        let hd = c.head_dim;
        let ld = Loader {
            src,
            own: shard.world > 1,
        };
        let q_rows = local.q_head0 * hd..(local.q_head0 + local.q_heads) * hd;
        let kv_rows = local.kv_head0 * hd..(local.kv_head0 + local.kv_heads) * hd;
        let (q_dim, kv_dim) = (c.n_heads * hd, c.n_kv_heads * hd);
        // No `with_capacity(n_layers)`: the count comes from the file and is only trusted once
        // every layer's tensors have been found.
        let mut layers = Vec::new();
        for i in stage_layers.clone() {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            let ffn = match &c.moe {
                Some(m) if m.is_moe_layer(i) => Ffn::Moe(ld.moe(i, c, m, &local).with_context(|| {
                    format!(
                        "layer {i} is a mixture-of-experts layer (llama.expert_count {}, llama.leading_dense_block_count {})",
                        m.n_experts, m.leading_dense
                    )
                })?),
                _ => Ffn::Dense(ld.mlp(i, "", (c.hidden, c.ffn), local.ffn.clone())?),
            };
            layers.push(Layer {
                attn_norm: ld.vector(&n("attn_norm"), c.hidden)?,
                wq: ld.qk(&n("attn_q"), (q_dim, c.hidden), q_rows.clone(), hd)?,
                wk: ld.qk(&n("attn_k"), (kv_dim, c.hidden), kv_rows.clone(), hd)?,
                wv: ld.rows(&n("attn_v"), (kv_dim, c.hidden), kv_rows.clone())?,
                wo: ld.cols(&n("attn_output"), (c.hidden, q_dim), q_rows.clone())?,
                ffn_norm: ld.vector(&n("ffn_norm"), c.hidden)?,
                ffn,
            });
        }
        // Vocabulary-parallel embedding and LM head: this rank's rows of each (one matrix when
        // tied: the head is the embedding's rows, shared).
        let tied = !src.has("output.weight");
        let vocab_rows = shard.vocab_split(c.vocab).1;
        let vocab_shape = (c.vocab, c.hidden);
        let embed = if stage.is_first() {
            Some(ld.rows("token_embd.weight", vocab_shape, vocab_rows.clone())?)
        } else {
            None
        };
        let (lm_head, norm) = if stage.is_last() {
            let head = match &embed {
                Some(e) if tied => e.clone(),
                _ if tied => ld.rows("token_embd.weight", vocab_shape, vocab_rows)?,
                _ => ld.rows("output.weight", vocab_shape, vocab_rows)?,
            };
            (Some(head), ld.vector("output_norm.weight", c.hidden)?)
        } else {
            (None, Vec::new())
        };
        // RoPE frequency of pair i: base^(-2i/d) x the linear scale, divided by the pair's
        // frequency factor when the model has them (Llama 3.1+: `rope_freqs.weight`, as ggml).
        let factors = if src.has("rope_freqs.weight") {
            let f = ld.vector("rope_freqs.weight", c.rope_dim / 2)?;
            if let Some((i, v)) = f
                .iter()
                .enumerate()
                .find(|(_, v)| !(v.is_finite() && **v > 0.0))
            {
                bail!(
                    "{}: tensor rope_freqs.weight: factor {i} is {v}, not a positive number",
                    file.gguf.path.display()
                );
            }
            f
        } else {
            vec![1.0; c.rope_dim / 2]
        };
        let inv_freq = factors
            .iter()
            .enumerate()
            .map(|(i, ff)| {
                let theta = f64::from(c.rope_base).powf(-2.0 * i as f64 / c.rope_dim as f64);
                (theta * f64::from(c.rope_freq_scale) / f64::from(*ff)) as f32
            })
            .collect();
        Ok(Self {
            config,
            shard,
            local,
            stage,
            first_layer: stage_layers.start,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            file: Some(file),
        })
    }

    /// RoPE's angular frequency of each rotated pair (scaling and frequency factors applied).
    pub fn rope_frequencies(&self) -> &[f32] {
        &self.inv_freq
    }

    /// The file the weights come from.
    pub fn file(&self) -> Option<&Arc<MappedGguf>> {
        self.file.as_ref()
    }

    /// Bytes of weights this rank uses, and how many of them are copies (not in the map).
    pub fn weight_bytes(&self) -> (usize, usize) {
        let mut total = 0;
        let mut owned = 0;
        let mut add = |m: &QMatrix| {
            total += m.bytes().len();
            if !m.is_mapped() {
                owned += m.bytes().len();
            }
        };
        for l in &self.layers {
            for m in [&l.wq, &l.wk, &l.wv, &l.wo] {
                add(m);
            }
            let mlps: Vec<&Mlp> = match &l.ffn {
                Ffn::Dense(m) => vec![m],
                Ffn::Moe(moe) => {
                    add(&moe.router);
                    moe.experts.iter().chain(&moe.shared).collect()
                }
            };
            for m in mlps {
                for w in [&m.gate, &m.up, &m.down] {
                    add(w);
                }
            }
        }
        // A tied head on a single rank is the embedding itself; counted once.
        let tied_whole = matches!((&self.embed, &self.lm_head), (Some(e), Some(h))
            if e.rows == h.rows && std::ptr::eq(e.bytes().as_ptr(), h.bytes().as_ptr()));
        if let Some(m) = &self.embed {
            add(m);
        }
        if let Some(m) = self.lm_head.as_ref().filter(|_| !tied_whole) {
            add(m);
        }
        (total, owned)
    }

    /// Width of this rank's K (and V) rows in the cache.
    pub fn kv_dim(&self) -> usize {
        self.local.kv_heads * self.config.head_dim
    }

    /// A KV cache for one sequence: as many tokens as `budget_bytes` allows, at most the
    /// model's context length.
    pub fn new_cache(&self, budget_bytes: usize) -> anyhow::Result<KvCache> {
        let per_token = self.kv_bytes_per_token().max(1);
        let tokens = (budget_bytes / per_token).min(self.config.context_length);
        if tokens == 0 {
            bail!(
                "a KV-cache budget of {budget_bytes} bytes holds no token ({per_token} bytes each)"
            );
        }
        Ok(KvCache::new(self.layers.len(), self.kv_dim(), tokens))
    }

    /// A KV cache for a sequence admitted for `tokens` tokens (prompt plus the most it may
    /// generate), with exactly that memory reserved (at most the per-sequence budget and the
    /// context length).
    pub fn new_cache_reserved(
        &self,
        tokens: usize,
        budget_bytes: usize,
    ) -> anyhow::Result<KvCache> {
        let per_token = self.kv_bytes_per_token().max(1);
        let capacity = tokens
            .min(budget_bytes / per_token)
            .min(self.config.context_length);
        if capacity == 0 {
            bail!(
                "a reservation of {tokens} tokens within a KV-cache budget of {budget_bytes} bytes holds no token ({per_token} bytes each)"
            );
        }
        Ok(KvCache::with_reserved(
            self.layers.len(),
            self.kv_dim(),
            capacity,
        ))
    }

    /// KV-cache bytes one token takes on this rank (its stage's layers, its KV heads).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.layers.len() * self.kv_dim() * 2 * 4
    }

    /// Run `tokens` (positions following what `cache` holds) through the model, appending to
    /// the cache. Returns the last token's logits or every token's (on tensor-parallel rank 0;
    /// empty on the others, see [`Llama::forward_batch`]).
    pub fn forward(
        &self,
        pool: &Pool,
        coll: &dyn Collective,
        cache: &mut KvCache,
        tokens: &[u32],
        which: Logits,
    ) -> anyhow::Result<Vec<f32>> {
        self.forward_from(
            pool,
            coll,
            cache,
            Input::Tokens(tokens),
            Output::Logits(which),
        )
    }

    /// The forward pass of this rank's stage: from tokens (stage 0) or the previous stage's
    /// hidden state, to logits (last stage) or this stage's hidden state of every token.
    pub fn forward_from(
        &self,
        pool: &Pool,
        coll: &dyn Collective,
        cache: &mut KvCache,
        input: Input<'_>,
        output: Output,
    ) -> anyhow::Result<Vec<f32>> {
        let n = match input {
            Input::Tokens(t) => t.len(),
            Input::Hidden(x) => x.len() / self.config.hidden.max(1),
        };
        self.forward_batch(pool, coll, &mut [cache], &[n], input, output)
    }

    /// One forward pass over several sequences at once (batched decode): sequence `s` owns
    /// `lens[s]` consecutive rows of `input` (tokens or hidden states, in sequence order) and
    /// appends them to `caches[s]`. The linear layers (Q/K/V, attention output, gate/up, down,
    /// LM head) multiply all rows of all sequences as one matrix, so the weights are read once
    /// per step rather than once per sequence; RoPE and attention run per sequence against its
    /// own cache; with tensor parallelism there is one all-reduce per layer half for the whole
    /// batch. Every row is computed exactly as in a pass of its sequence alone.
    ///
    /// Returns `[sequences, vocab]` for [`Logits::Last`] (each sequence's last token),
    /// `[rows, vocab]` for [`Logits::All`] and `[rows, hidden]` for [`Output::Hidden`]. Logits
    /// come back on tensor-parallel rank 0 only: each rank multiplies by its rows of the
    /// vocabulary-parallel LM head and rank 0 gathers them; the other ranks return an empty
    /// vector. On error no cache changes.
    pub fn forward_batch(
        &self,
        pool: &Pool,
        coll: &dyn Collective,
        caches: &mut [&mut KvCache],
        lens: &[usize],
        input: Input<'_>,
        output: Output,
    ) -> anyhow::Result<Vec<f32>> {
        let h = self.config.hidden;
        let n = match input {
            Input::Tokens(t) if self.embed.is_none() => bail!(
                "stage {} of {} has no token embedding: it starts from the previous stage's hidden state ({} tokens given)",
                self.stage.index,
                self.stage.count,
                t.len()
            ),
            Input::Tokens(t) => t.len(),
            Input::Hidden(x) if !x.len().is_multiple_of(h) => {
                bail!(
                    "a hidden state of {} floats is not a multiple of {h}",
                    x.len()
                )
            }
            Input::Hidden(x) => x.len() / h,
        };
        if matches!(output, Output::Logits(_)) && self.lm_head.is_none() {
            bail!(
                "stage {} of {} has no LM head: it stops at its hidden state",
                self.stage.index,
                self.stage.count
            );
        }
        if n == 0 || lens.contains(&0) {
            bail!("forward pass over no tokens");
        }
        if caches.len() != lens.len() || lens.iter().sum::<usize>() != n {
            bail!(
                "a batch of {} rows does not split into {} sequences of {lens:?} rows",
                n,
                caches.len()
            );
        }
        for (cache, &len) in caches.iter().zip(lens) {
            cache.check_room(len)?;
            if cache.kv_dim() != self.kv_dim() || cache.layers.len() != self.layers.len() {
                bail!("the KV cache was made for another model");
            }
        }
        match self.forward_inner(pool, coll, caches, lens, input, n, output) {
            Ok(l) => {
                for (cache, &len) in caches.iter_mut().zip(lens) {
                    cache.commit(len);
                }
                Ok(l)
            }
            Err(e) => {
                for cache in caches.iter_mut() {
                    cache.rollback();
                }
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_inner(
        &self,
        pool: &Pool,
        coll: &dyn Collective,
        caches: &mut [&mut KvCache],
        lens: &[usize],
        input: Input<'_>,
        b: usize,
        output: Output,
    ) -> anyhow::Result<Vec<f32>> {
        let c = &self.config;
        let h = c.hidden;
        let hd = c.head_dim;
        let (qd, kvd) = (self.local.q_heads * hd, self.kv_dim());
        // The widest FFN this rank runs: its dense slice, its shared-expert slice, one expert.
        let fd = (self.local.ffn.len())
            .max(self.local.shared_ffn.len())
            .max(c.moe.as_ref().map_or(0, |m| m.expert_ffn));
        // Sequence `s` owns rows `offs[s]..offs[s + 1]`, at positions from `starts[s]`.
        let starts: Vec<usize> = caches.iter().map(|c| c.len()).collect();
        let mut offs = Vec::with_capacity(lens.len() + 1);
        offs.push(0);
        for &len in lens {
            offs.push(offs[offs.len() - 1] + len);
        }
        let seqs = Seqs {
            starts: &starts,
            offs: &offs,
        };

        let mut x = match input {
            Input::Hidden(x) => x.to_vec(),
            Input::Tokens(tokens) => {
                // Vocabulary-parallel: each rank fills the rows of the tokens it holds, the
                // all-reduce adds the zeros of the others (exact).
                let embed = self.embed.as_ref().context("no token embedding")?;
                let mine = self.shard.vocab_split(c.vocab).1;
                let mut x = vec![0f32; b * h];
                for (t, row) in tokens.iter().zip(x.chunks_exact_mut(h)) {
                    let t = *t as usize;
                    if t >= c.vocab {
                        bail!("token id {t} is outside the vocabulary of {}", c.vocab);
                    }
                    if mine.contains(&t) {
                        embed.dequantize_row(t - mine.start, row);
                    }
                }
                if self.shard.world > 1 {
                    coll.all_reduce_sum(&mut x)
                        .context("all-reduce of the token embedding")?;
                }
                x
            }
        };
        let mut xn = vec![0f32; b * h];
        let mut q = vec![0f32; b * qd];
        let mut k = vec![0f32; b * kvd];
        let mut v = vec![0f32; b * kvd];
        let mut att = vec![0f32; b * qd];
        let mut o = vec![0f32; b * h];
        let mut g = vec![0f32; b * fd];
        let mut u = vec![0f32; b * fd];
        // A mixture's gathered input and output rows of one expert.
        let moe_rows = if c.moe.is_some() { b * h } else { 0 };
        let (mut xe, mut ye) = (vec![0f32; moe_rows], vec![0f32; moe_rows]);

        for (i, l) in self.layers.iter().enumerate() {
            let li = self.first_layer + i;
            rms_norm(&x, &l.attn_norm, c.rms_eps, &mut xn);
            kernels::matmul_multi(
                pool,
                &[&l.wq, &l.wk, &l.wv],
                &xn,
                b,
                &mut [&mut q, &mut k, &mut v],
            );
            for (s, cache) in caches.iter_mut().enumerate() {
                let (r0, r1) = (offs[s], offs[s + 1]);
                self.rope(&mut q[r0 * qd..r1 * qd], self.local.q_heads, starts[s]);
                self.rope(&mut k[r0 * kvd..r1 * kvd], self.local.kv_heads, starts[s]);
                cache.append(i, &k[r0 * kvd..r1 * kvd], &v[r0 * kvd..r1 * kvd]);
            }
            let kv: Vec<(&[f32], &[f32])> = caches
                .iter()
                .map(|c| (&c.layers[i].0[..], &c.layers[i].1[..]))
                .collect();
            self.attention(pool, &q, &kv, &seqs, &mut att);
            kernels::matmul(pool, &l.wo, &att, b, &mut o);
            coll.all_reduce_sum(&mut o)
                .with_context(|| format!("all-reduce after attention of layer {li}"))?;
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);

            rms_norm(&x, &l.ffn_norm, c.rms_eps, &mut xn);
            match &l.ffn {
                Ffn::Dense(m) => {
                    let f = m.gate.rows;
                    m.forward(pool, &xn, b, &mut g[..b * f], &mut u[..b * f], &mut o);
                }
                Ffn::Moe(moe) => {
                    moe.forward(pool, &xn, b, (&mut g, &mut u), (&mut xe, &mut ye), &mut o)
                }
            }
            coll.all_reduce_sum(&mut o)
                .with_context(|| format!("all-reduce after the MLP of layer {li}"))?;
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        }

        let which = match output {
            Output::Hidden => return Ok(x),
            Output::Logits(which) => which,
        };
        let lm_head = self.lm_head.as_ref().context("no LM head")?;
        let last;
        let rows = match which {
            Logits::Last if lens.len() == 1 => &x[(b - 1) * h..],
            Logits::Last => {
                last = offs[1..]
                    .iter()
                    .flat_map(|&end| &x[(end - 1) * h..end * h])
                    .copied()
                    .collect::<Vec<f32>>();
                &last[..]
            }
            Logits::All => &x[..],
        };
        let n = rows.len() / h;
        let mut xn = vec![0f32; rows.len()];
        rms_norm(rows, &self.norm, c.rms_eps, &mut xn);
        if self.shard.world == 1 {
            let mut logits = vec![0f32; n * c.vocab];
            kernels::matmul(pool, lm_head, &xn, n, &mut logits);
            return Ok(logits);
        }
        // Vocabulary-parallel: this rank's columns of the logits, gathered on rank 0.
        let cols = self.shard.vocab_split(c.vocab).1.len();
        let mut mine = vec![0f32; n * cols];
        if cols > 0 {
            kernels::matmul(pool, lm_head, &xn, n, &mut mine);
        }
        parallel::gather_vocab(coll, self.shard, mine, n, c.vocab)
    }

    /// ggml's normal-mode RoPE on `[tokens, heads * head_dim]`, positions from `start`.
    fn rope(&self, x: &mut [f32], heads: usize, start: usize) {
        let hd = self.config.head_dim;
        for (t, row) in x.chunks_exact_mut(heads * hd).enumerate() {
            let pos = (start + t) as f32;
            let cs: Vec<(f32, f32)> = self
                .inv_freq
                .iter()
                .map(|f| {
                    let (s, c) = (pos * f).sin_cos();
                    (c, s)
                })
                .collect();
            for head in row.chunks_exact_mut(hd) {
                for (i, &(c, s)) in cs.iter().enumerate() {
                    let (a, b) = (head[2 * i], head[2 * i + 1]);
                    head[2 * i] = a * c - b * s;
                    head[2 * i + 1] = a * s + b * c;
                }
            }
        }
    }

    /// Causal grouped-query attention of every sequence's new queries (rows `offs[s]..offs[s +
    /// 1]` of `q`, at positions from `starts[s]`) over its cached keys and values `kv[s]` (which
    /// already include the new tokens). One parallel section for the whole batch.
    fn attention(
        &self,
        pool: &Pool,
        q: &[f32],
        kv: &[(&[f32], &[f32])],
        seqs: &Seqs<'_>,
        out: &mut [f32],
    ) {
        let c = &self.config;
        let hd = c.head_dim;
        let (qh, kvh) = (self.local.q_heads, self.local.kv_heads);
        let group = c.n_heads / c.n_kv_heads;
        let kvd = kvh * hd;
        let scale = 1.0 / (hd as f32).sqrt();
        let b = seqs.offs[seqs.offs.len() - 1];
        // The sequence of each row.
        let seq_of: Vec<usize> = (0..kv.len())
            .flat_map(|s| std::iter::repeat_n(s, seqs.offs[s + 1] - seqs.offs[s]))
            .collect();
        let ptr = SendPtr(out.as_mut_ptr());
        let local = &self.local;
        pool.for_each(qh * b, |task| {
            let (r, head) = (task / qh, task % qh);
            let s = seq_of[r];
            let (kc, vc) = kv[s];
            let t = r - seqs.offs[s];
            let kvi = (local.q_head0 + head) / group - local.kv_head0;
            let qv = &q[r * qh * hd + head * hd..][..hd];
            let n = seqs.starts[s] + t + 1;
            let mut scores: Vec<f32> = (0..n)
                .map(|j| dot::dot_f32(qv, &kc[j * kvd + kvi * hd..][..hd]) * scale)
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in &mut scores {
                *s = (*s - max).exp();
                sum += *s;
            }
            let mut acc = vec![0f32; hd];
            for (j, s) in scores.iter().enumerate() {
                dot::axpy(s / sum, &vc[j * kvd + kvi * hd..][..hd], &mut acc);
            }
            // SAFETY: task (r, head) owns out[r * qh * hd + head * hd..][..hd]; `out` has
            // b * qh * hd elements and outlives the tasks.
            unsafe {
                let dst = ptr.get().add(r * qh * hd + head * hd);
                std::ptr::copy_nonoverlapping(acc.as_ptr(), dst, hd);
            }
        });
    }
}

/// The sequences of a batched forward pass: sequence `s` owns rows `offs[s]..offs[s + 1]`, the
/// first at position `starts[s]`.
struct Seqs<'a> {
    starts: &'a [usize],
    offs: &'a [usize],
}

/// RMSNorm of each `weight.len()`-long row of `x` into `out`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / n as f32;
        let s = 1.0 / (ms + eps).sqrt();
        for ((o, v), w) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * s * w;
        }
    }
}
