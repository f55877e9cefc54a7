//! [`CudaLlama`]: a rank's Llama shard on one GPU, with the same forward pass as the CPU
//! [`Llama`] (and built from it: the shard selection, tensor checks and configuration are the
//! CPU loader's), and `tessera-worker generate --device cuda` ([`generate_cli`]).
//!
//! Per layer: RMSNorm (→ f16) → Q, K, V (cuBLAS) → RoPE → append K, V to the cache → attention
//! (→ f16) → Wo (cuBLAS) → NCCL all-reduce (more than one rank) → residual add; then RMSNorm →
//! gate, up (cuBLAS) → SiLU·up (→ f16) → down (cuBLAS) → all-reduce → residual add. The LM head
//! is a cuBLAS product over the last token (or every token).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cudarc::driver::{CudaSlice, PushKernelArg};
use half::f16;

use super::device::{CudaDevice, blocks};
use super::gemm::linear;
use super::kernels::grid_for;
use super::nccl::NcclCollective;
use super::weights::DeviceMatrix;
use super::{cu, no_panic};
use crate::kernels::QMatrix;
use crate::model::llama::{Ffn, Llama, LlamaConfig, LocalDims, Logits};

struct DeviceLayer {
    attn_norm: CudaSlice<f32>,
    ffn_norm: CudaSlice<f32>,
    wq: DeviceMatrix,
    wk: DeviceMatrix,
    wv: DeviceMatrix,
    wo: DeviceMatrix,
    w_gate: DeviceMatrix,
    w_up: DeviceMatrix,
    w_down: DeviceMatrix,
}

/// One sequence's KV cache on the GPU: f32 `[capacity, kv_dim]` per layer for K and for V.
pub struct CudaKvCache {
    k: Vec<CudaSlice<f32>>,
    v: Vec<CudaSlice<f32>>,
    len: usize,
    capacity: usize,
    /// Device bytes held (allocated whole at creation).
    bytes: usize,
}

impl CudaKvCache {
    /// Device bytes this cache holds (its whole capacity, allocated up front).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// A Llama shard on the GPU.
pub struct CudaLlama {
    pub config: LlamaConfig,
    pub local: LocalDims,
    dev: CudaDevice,
    /// This rank's rows of the token embedding (vocabulary-parallel as on the CPU: rows
    /// `vocab_rows`), on the host (rows dequantised per step).
    embed: QMatrix,
    shard: crate::model::parallel::Shard,
    vocab_rows: std::ops::Range<usize>,
    layers: Vec<DeviceLayer>,
    norm: CudaSlice<f32>,
    lm_head: DeviceMatrix,
    inv_freq: CudaSlice<f32>,
    nccl: Option<NcclCollective>,
    device_bytes: usize,
}

impl CudaLlama {
    /// Upload `model` (a loaded CPU shard) to `dev`. `nccl` is the group's collective when the
    /// shard is one of several ranks (`model.shard.world > 1`), else `None`.
    pub fn upload(
        model: &Llama,
        dev: CudaDevice,
        nccl: Option<NcclCollective>,
    ) -> anyhow::Result<Self> {
        if let Some(m) = &model.config.moe {
            bail!(
                "mixture-of-experts models run on the CPU engine only for now; this model routes each token to {} of {} experts per layer (llama.expert_count), which the CUDA engine does not implement: run it with TESSERA_DEVICE=cpu (local --device cpu)",
                m.n_used,
                m.n_experts
            );
        }
        if model.shard.world > 1 && nccl.is_none() {
            bail!(
                "a tensor-parallel shard ({} ranks) on CUDA needs an NCCL collective",
                model.shard.world
            );
        }
        // Pipeline stages (a shard without the embedding or the LM head) are not implemented
        // on CUDA: the whole stack of layers must be on this rank.
        let (Some(embed), Some(lm_head)) = (&model.embed, &model.lm_head) else {
            bail!(
                "pipeline-parallel stages are not implemented on CUDA (this shard lacks the embedding or the LM head); run the whole model per rank"
            );
        };
        if lm_head.rows == 0 {
            bail!(
                "a vocabulary of {} split over {} tensor-parallel ranks leaves rank {} no rows of the LM head; CUDA needs at least one (use fewer ranks)",
                model.config.vocab,
                model.shard.world,
                model.shard.rank
            );
        }
        if model.layers.len() != model.config.n_layers {
            bail!(
                "pipeline-parallel stages are not implemented on CUDA ({} of {} layers on this rank)",
                model.layers.len(),
                model.config.n_layers
            );
        }
        let c = model.config.clone();
        let s = Arc::clone(&dev.stream);
        no_panic("uploading the model to the GPU", || {
            let mut bytes = 0;
            let mut up = |m: &QMatrix, name: String| -> anyhow::Result<DeviceMatrix> {
                let d = DeviceMatrix::upload(&s, m, &name)?;
                bytes += d.bytes();
                Ok(d)
            };
            let mut layers = Vec::with_capacity(model.layers.len());
            for (i, l) in model.layers.iter().enumerate() {
                let n = |t: &str| format!("blk.{i}.{t}.weight");
                let Ffn::Dense(mlp) = &l.ffn else {
                    bail!(
                        "layer {i}: mixture-of-experts layers run on the CPU engine only for now"
                    );
                };
                layers.push(DeviceLayer {
                    attn_norm: cu("uploading a norm", s.clone_htod(&l.attn_norm))?,
                    ffn_norm: cu("uploading a norm", s.clone_htod(&l.ffn_norm))?,
                    wq: up(&l.wq, n("attn_q"))?,
                    wk: up(&l.wk, n("attn_k"))?,
                    wv: up(&l.wv, n("attn_v"))?,
                    wo: up(&l.wo, n("attn_output"))?,
                    w_gate: up(&mlp.gate, n("ffn_gate"))?,
                    w_up: up(&mlp.up, n("ffn_up"))?,
                    w_down: up(&mlp.down, n("ffn_down"))?,
                });
            }
            let lm_head = up(lm_head, "output.weight (or the tied embedding)".into())?;
            let inv_freq = model.rope_frequencies().to_vec();
            let norm = cu("uploading the output norm", s.clone_htod(&model.norm))?;
            let inv_freq = cu("uploading RoPE frequencies", s.clone_htod(&inv_freq))?;
            dev.sync()?;
            Ok(Self {
                config: c.clone(),
                local: model.local.clone(),
                embed: embed.clone(),
                shard: model.shard,
                vocab_rows: model.shard.vocab_split(c.vocab).1,
                layers,
                norm,
                lm_head,
                inv_freq,
                nccl,
                device_bytes: bytes,
                dev,
            })
        })
    }

    /// Device bytes of the f16 weights.
    pub fn device_weight_bytes(&self) -> usize {
        self.device_bytes
    }

    /// This shard's tensor-parallel rank (rank 0 gets the logits).
    pub fn rank(&self) -> usize {
        self.shard.rank
    }

    /// The GPU's name.
    pub fn device_name(&self) -> &str {
        &self.dev.name
    }

    fn kv_dim(&self) -> usize {
        self.local.kv_heads * self.config.head_dim
    }

    /// A KV cache for one sequence: as many tokens as `budget_bytes` allows (f32 K and V), at
    /// most the context length (the CPU cache's rule).
    pub fn new_cache(&self, budget_bytes: usize) -> anyhow::Result<CudaKvCache> {
        let per_token = (self.config.n_layers * self.kv_dim() * 2 * 4).max(1);
        let capacity = (budget_bytes / per_token).min(self.config.context_length);
        if capacity == 0 {
            bail!(
                "a KV-cache budget of {budget_bytes} bytes holds no token ({per_token} bytes each)"
            );
        }
        let s = &self.dev.stream;
        let alloc = || {
            cu(
                "allocating the KV cache",
                s.alloc_zeros::<f32>(capacity * self.kv_dim()),
            )
        };
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for _ in 0..self.config.n_layers {
            k.push(alloc()?);
            v.push(alloc()?);
        }
        Ok(CudaKvCache {
            k,
            v,
            len: 0,
            capacity,
            bytes: capacity * per_token,
        })
    }

    /// Run `tokens` (positions following what `cache` holds) through the model, appending to
    /// the cache; the last token's logits or every token's, on the host. A failure leaves the
    /// cache's length as it was.
    pub fn forward(
        &self,
        cache: &mut CudaKvCache,
        tokens: &[u32],
        which: Logits,
    ) -> anyhow::Result<Vec<f32>> {
        if tokens.is_empty() {
            bail!("forward pass over no tokens");
        }
        if cache.len + tokens.len() > cache.capacity {
            bail!(
                "the KV cache holds {} tokens; {} more do not fit its capacity of {}",
                cache.len,
                tokens.len(),
                cache.capacity
            );
        }
        if cache.k.len() != self.config.n_layers {
            bail!("the KV cache was made for another model");
        }
        let logits = no_panic("CUDA forward pass", || {
            self.forward_inner(cache, tokens, which)
        })?;
        cache.len += tokens.len();
        Ok(logits)
    }

    fn forward_inner(
        &self,
        cache: &mut CudaKvCache,
        tokens: &[u32],
        which: Logits,
    ) -> anyhow::Result<Vec<f32>> {
        let c = &self.config;
        let (s, k) = (&self.dev.stream, &self.dev.kernels);
        let blas = &self.dev.blas;
        let b = tokens.len();
        let h = c.hidden;
        let hd = c.head_dim;
        let start = cache.len;
        let (qh, kvh) = (self.local.q_heads, self.local.kv_heads);
        let (qd, kvd) = (qh * hd, self.kv_dim());
        let fd = self.local.ffn.len();
        let i32_ = |v: usize| -> anyhow::Result<i32> {
            i32::try_from(v).map_err(|_| anyhow::anyhow!("size {v} exceeds a kernel's int"))
        };

        // Embedding rows on the host (this rank's vocabulary rows; the all-reduce below adds
        // the other ranks'), then to the device.
        let mut x_host = vec![0f32; b * h];
        for (t, row) in tokens.iter().zip(x_host.chunks_exact_mut(h)) {
            let t = *t as usize;
            if t >= c.vocab {
                bail!("token id {t} is outside the vocabulary of {}", c.vocab);
            }
            if self.vocab_rows.contains(&t) {
                self.embed.dequantize_row(t - self.vocab_rows.start, row);
            }
        }
        let alloc32 = |n: usize| cu("allocating activations", s.alloc_zeros::<f32>(n));
        let alloc16 = |n: usize| cu("allocating activations", s.alloc_zeros::<f16>(n));
        let mut x = cu("uploading the embeddings", s.clone_htod(&x_host))?;
        if let Some(nccl) = &self.nccl {
            nccl.all_reduce_device(&mut x.as_view_mut())
                .context("all-reduce of the token embedding")?;
        }
        let mut xn = alloc16(b * h)?;
        let mut q = alloc32(b * qd)?;
        let mut kk = alloc32(b * kvd)?;
        let mut vv = alloc32(b * kvd)?;
        let mut att = alloc16(b * qd)?;
        let mut o = alloc32(b * h)?;
        let mut g = alloc32(b * fd)?;
        let mut u = alloc32(b * fd)?;
        let mut gu = alloc16(b * fd)?;
        let stride = start + b;
        let mut scores = alloc32(b * qh * stride)?;

        let (n_h, eps) = (i32_(h)?, c.rms_eps);
        let (b_i, qh_i, kvh_i, hd_i, pairs) = (
            i32_(b)?,
            i32_(qh)?,
            i32_(kvh)?,
            i32_(hd)?,
            i32_(c.rope_dim / 2)?,
        );
        let (start_i, kvd_i, stride_i) = (i32_(start)?, i32_(kvd)?, i32_(stride)?);
        let group = i32_(c.n_heads / c.n_kv_heads)?;
        let (q0, kv0) = (i32_(self.local.q_head0)?, i32_(self.local.kv_head0)?);
        let scale = 1.0 / (hd as f32).sqrt();
        let n_bh = i32_(b * h)?;
        let n_bf = i32_(b * fd)?;
        let launch = |what: &str, r: Result<Option<_>, _>| cu(what, r).map(|_| ());

        for (li, l) in self.layers.iter().enumerate() {
            // Attention block.
            let mut a = s.launch_builder(&k.rms_norm_f16);
            a.arg(&x).arg(&l.attn_norm).arg(&mut xn).arg(&n_h).arg(&eps);
            // SAFETY: argument types and order match rms_norm_f16; b rows of h elements.
            launch("rms_norm", unsafe { a.launch(blocks(b as u32)) })?;
            linear(blas, s, &l.wq, &xn, b, &mut q)?;
            linear(blas, s, &l.wk, &xn, b, &mut kk)?;
            linear(blas, s, &l.wv, &xn, b, &mut vv)?;
            for (buf, heads) in [(&mut q, qh_i), (&mut kk, kvh_i)] {
                let n = b * heads as usize * (c.rope_dim / 2);
                let mut a = s.launch_builder(&k.rope);
                a.arg(buf)
                    .arg(&self.inv_freq)
                    .arg(&b_i)
                    .arg(&heads)
                    .arg(&hd_i)
                    .arg(&pairs)
                    .arg(&start_i);
                // SAFETY: matches rope's signature; the kernel bounds-checks its index.
                launch("rope", unsafe { a.launch(blocks(grid_for(n))) })?;
            }
            let span = start * kvd..(start + b) * kvd;
            cu(
                "appending K",
                s.memcpy_dtod(&kk, &mut cache.k[li].slice_mut(span.clone())),
            )?;
            cu(
                "appending V",
                s.memcpy_dtod(&vv, &mut cache.v[li].slice_mut(span)),
            )?;
            let mut a = s.launch_builder(&k.attention);
            a.arg(&q)
                .arg(&cache.k[li])
                .arg(&cache.v[li])
                .arg(&mut att)
                .arg(&mut scores)
                .arg(&qh_i)
                .arg(&hd_i)
                .arg(&kvd_i)
                .arg(&group)
                .arg(&q0)
                .arg(&kv0)
                .arg(&start_i)
                .arg(&stride_i)
                .arg(&scale);
            // SAFETY: matches attention's signature; scores has b*qh rows of `stride` floats
            // and every query's keys (start + t + 1 <= stride) are in the cache.
            launch("attention", unsafe {
                a.launch(blocks(i32_(b * qh)? as u32))
            })?;
            linear(blas, s, &l.wo, &att, b, &mut o)?;
            self.reduce(&mut o, li, "attention")?;
            let mut a = s.launch_builder(&k.add_inplace);
            a.arg(&mut x).arg(&o).arg(&n_bh);
            // SAFETY: matches add_inplace; both buffers hold b*h floats.
            launch("add", unsafe { a.launch(blocks(grid_for(b * h))) })?;

            // MLP block.
            let mut a = s.launch_builder(&k.rms_norm_f16);
            a.arg(&x).arg(&l.ffn_norm).arg(&mut xn).arg(&n_h).arg(&eps);
            // SAFETY: as above.
            launch("rms_norm", unsafe { a.launch(blocks(b as u32)) })?;
            linear(blas, s, &l.w_gate, &xn, b, &mut g)?;
            linear(blas, s, &l.w_up, &xn, b, &mut u)?;
            let mut a = s.launch_builder(&k.silu_mul_f16);
            a.arg(&g).arg(&u).arg(&mut gu).arg(&n_bf);
            // SAFETY: matches silu_mul_f16; b*fd elements each.
            launch("silu_mul", unsafe { a.launch(blocks(grid_for(b * fd))) })?;
            linear(blas, s, &l.w_down, &gu, b, &mut o)?;
            self.reduce(&mut o, li, "the MLP")?;
            let mut a = s.launch_builder(&k.add_inplace);
            a.arg(&mut x).arg(&o).arg(&n_bh);
            // SAFETY: as above.
            launch("add", unsafe { a.launch(blocks(grid_for(b * h))) })?;
        }

        let (first, n) = match which {
            Logits::Last => (b - 1, 1),
            Logits::All => (0, b),
        };
        let rows = cu(
            "final rows",
            s.clone_dtod(&x.slice(first * h..(first + n) * h)),
        )?;
        let mut a = s.launch_builder(&k.rms_norm_f16);
        a.arg(&rows)
            .arg(&self.norm)
            .arg(&mut xn)
            .arg(&n_h)
            .arg(&eps);
        // SAFETY: as above; xn has room for b >= n rows.
        launch("rms_norm", unsafe { a.launch(blocks(n as u32)) })?;
        let cols = self.vocab_rows.len();
        let mut logits = alloc32(n * cols.max(1))?;
        if cols > 0 {
            linear(blas, s, &self.lm_head, &xn, n, &mut logits)?;
        }
        let mine = cu("copying the logits back", s.clone_dtoh(&logits))?;
        self.dev.sync()?;
        let Some(nccl) = self.nccl.as_ref().filter(|_| self.shard.world > 1) else {
            return Ok(mine);
        };
        // Vocabulary-parallel head: every rank's block to rank 0 (on the host, through the
        // collective's gather), as the CPU path does. A rank always holds rows (checked at load).
        crate::model::parallel::gather_vocab(nccl, self.shard, mine, n, c.vocab)
    }

    fn reduce(&self, o: &mut CudaSlice<f32>, layer: usize, after: &str) -> anyhow::Result<()> {
        match &self.nccl {
            Some(nccl) => nccl
                .all_reduce_device(&mut o.as_view_mut())
                .with_context(|| format!("all-reduce after {after} of layer {layer}")),
            None => Ok(()),
        }
    }
}

/// Largest difference between the CPU and CUDA logits of a prompt, relative to the largest
/// |logit|, that `TESSERA_CUDA_COMPARE=1` accepts (8-bit activations on the CPU, f16 on the GPU).
pub const LOGIT_TOLERANCE: f32 = 0.05;

/// `tessera-worker generate --device cuda`: the CPU command's output (the text on stdout, the
/// timings on stderr) from the GPU. With `TESSERA_CUDA_COMPARE=1` it also runs the CPU path on
/// the same prompt and prints whether the greedy tokens agree and the largest logit difference
/// on the prompt; logits further apart than [`LOGIT_TOLERANCE`] make it exit non-zero.
pub fn generate_cli(args: &crate::cli::GenerateArgs) -> anyhow::Result<()> {
    use crate::engine::sampling::{Sampler, SamplingParams};
    use crate::engine::{Engine, GenerateParams};
    use crate::tokenizer::Message;
    use std::io::Write;

    let t0 = Instant::now();
    let dev = CudaDevice::new(0)?;
    // The CPU loader does the file checks and the shard selection; its weights stay in the map.
    let engine = Engine::open(&args.model, args.threads)?;
    let model = CudaLlama::upload(&engine.model, dev, None)?;
    let load = t0.elapsed();
    eprintln!(
        "cuda: {} ; {:.1} MiB of f16 weights on the GPU",
        model.device_name(),
        model.device_weight_bytes() as f64 / (1 << 20) as f64
    );
    let prompt = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", &args.prompt));
        engine.chat_prompt(&messages)?
    } else {
        engine.tokenizer.encode(&args.prompt, false)
    };
    anyhow::ensure!(!prompt.is_empty(), "the prompt has no tokens");
    if !args.stop.is_empty() {
        bail!("--stop is not implemented on --device cuda yet (use --device cpu)");
    }
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        ..Default::default()
    };
    sampling
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid sampling parameters: {e}"))?;
    let kv_budget = args.kv_cache_mib << 20;
    let mut cache = model.new_cache(kv_budget)?;
    let mut sampler = Sampler::new(sampling.clone());
    let t1 = Instant::now();
    let mut logits = model.forward(&mut cache, &prompt, Logits::Last)?;
    let prefill = t1.elapsed();
    let prompt_logits = logits.clone();
    let mut tokens = Vec::new();
    let mut decode = Duration::ZERO;
    let mut steps = 0usize;
    let mut finish = "length";
    while tokens.len() < args.max_tokens {
        let next = sampler.sample(&logits);
        if !args.ignore_eos && engine.tokenizer.is_stop(next) {
            finish = "stop";
            break;
        }
        tokens.push(next);
        if tokens.len() == args.max_tokens || cache.len() == cache.capacity() {
            break;
        }
        let t = Instant::now();
        logits = model.forward(&mut cache, &[next], Logits::Last)?;
        decode += t.elapsed();
        steps += 1;
    }
    let text = engine.tokenizer.decode(&tokens, true);
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    eprintln!(
        "load {:.2} s; prompt {} tokens in {:.3} s ({:.1} tokens/s); generated {} tokens, {} decode steps in {:.3} s ({:.1} tokens/s); finish {finish}; cuda",
        load.as_secs_f64(),
        prompt.len(),
        prefill.as_secs_f64(),
        prompt.len() as f64 / prefill.as_secs_f64().max(1e-9),
        tokens.len(),
        steps,
        decode.as_secs_f64(),
        steps as f64 / decode.as_secs_f64().max(1e-9),
    );
    if std::env::var("TESSERA_CUDA_COMPARE").is_ok_and(|v| v == "1") {
        let mut cpu_cache = engine.model.new_cache(kv_budget)?;
        let cpu_logits = engine.model.forward(
            &engine.pool,
            engine.collective.as_ref(),
            &mut cpu_cache,
            &prompt,
            Logits::Last,
        )?;
        let max_diff = cpu_logits
            .iter()
            .zip(&prompt_logits)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let max_abs = cpu_logits.iter().map(|v| v.abs()).fold(0f32, f32::max);
        let params = GenerateParams {
            max_tokens: args.max_tokens,
            sampling,
            stop: Vec::new(),
            kv_budget_bytes: kv_budget,
            ignore_eos: args.ignore_eos,
        };
        let cpu = engine.generate(&prompt, &params, |_| {})?;
        let same = cpu.tokens == tokens;
        eprintln!(
            "compare: prompt logits max |cpu - cuda| = {max_diff:.4} (max |logit| {max_abs:.2}); greedy tokens identical: {same}"
        );
        eprintln!("compare: cpu  tokens {:?}", cpu.tokens);
        eprintln!("compare: cuda tokens {tokens:?}");
        // The gate is the logits, not the tokens: the CPU path quantises activations to 8 bits
        // and CUDA computes in f16, so a near tie between two tokens may break either way and
        // the texts then diverge honestly.
        let relative = max_diff / max_abs.max(1e-6);
        eprintln!(
            "compare: relative logit difference {relative:.4} (gate {LOGIT_TOLERANCE}); argmax of the prompt's logits {}",
            if crate::engine::sampling::argmax(&cpu_logits)
                == crate::engine::sampling::argmax(&prompt_logits)
            {
                "agrees"
            } else {
                "differs"
            }
        );
        if relative > LOGIT_TOLERANCE {
            bail!(
                "the CUDA path's logits differ from the CPU path's by {max_diff:.4} (relative {relative:.4} > {LOGIT_TOLERANCE})"
            );
        }
    }
    Ok(())
}
