//! The step seam between scheduling and tensor parallelism.
//!
//! Every rank of a tensor-parallel group must run the same forward passes in the same order, or
//! the all-reduces inside them pair up wrongly. The leader decides what to run (the scheduler),
//! turns each decision into a [`Step`], hands it to a [`StepBroadcast`] (followers receive it over
//! the group's transport) and then executes it itself; followers execute the steps they receive
//! in order with [`Runner::execute`]. Each rank holds its own KV caches, keyed by [`SeqId`], for
//! its shard of the KV heads.
//!
//! With pipeline parallelism every rank still receives every step; a rank runs its stage's
//! layers and moves activations through its [`Pipe`]: stage 0 embeds the tokens, each stage
//! sends its hidden state to the next, the last stage's tensor-parallel rank 0 sends the last
//! token's logits back to the global leader, which samples. Whatever would make a step fail
//! for every rank alike (no tokens, a token outside the vocabulary, a full KV cache) is checked
//! on every rank before any activation moves, so no stage waits for a stage that gave up.
//!
//! With prefill/decode disaggregation a prefill replica hands a sequence's KV cache to a decode
//! replica ([`Step::SendKv`] on every prefill rank, [`Step::InstallKv`] on every decode rank,
//! each rank moving its own shard through its [`KvTransport`]); one all-reduce of a flag per
//! rank makes every rank of a replica agree whether the hand-over worked, so no rank keeps a
//! cache the others dropped.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::Engine;
use crate::model::kv_cache::{KvCache, KvShard};
use crate::model::llama::{Input, Logits, Output};

/// Identifies one sequence (request) across the ranks of a group.
pub type SeqId = u64;

/// One unit of work every rank executes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Append `tokens` to sequence `seq` (a new sequence starts with its prompt) and compute the
    /// last token's logits.
    Forward { seq: SeqId, tokens: Vec<u32> },
    /// Append `tokens` to each sequence `seq` in one forward pass (batched decode: one token for
    /// every running sequence, plus prefill chunks) and compute every sequence's last token's
    /// logits, `[seqs.len(), vocab]` in this order. The linear layers multiply the rows of all
    /// sequences at once (one all-reduce per layer half for the batch, one hidden-state
    /// transfer per pipeline stage); attention runs per sequence. A sequence appears at most
    /// once. Added in group protocol version 2 (`tessera-group/2`).
    ForwardBatch { seqs: Vec<(SeqId, Vec<u32>)> },
    /// Forget sequence `seq` and free its KV cache.
    Release { seq: SeqId },
    /// Make sequence `seq`'s KV cache before its first forward step, with memory for exactly
    /// `tokens` tokens (what the scheduler admitted it for: prompt plus the most it may
    /// generate, within the per-sequence budget). Without it a cache is made at the first
    /// step and grows as tokens arrive. Added in group protocol version 3.
    Reserve { seq: SeqId, tokens: usize },
    /// Prefill/decode disaggregation, on a prefill replica: every rank sends its shard of
    /// sequence `seq`'s KV cache to the matching rank of `target` under the name `transfer`,
    /// and the ranks agree that every shard arrived (an error on every rank otherwise). Added
    /// in group protocol version 4.
    SendKv {
        seq: SeqId,
        transfer: String,
        target: KvTarget,
    },
    /// Prefill/decode disaggregation, on a decode replica: every rank installs the shard it
    /// received under `transfer` (the first `tokens` tokens of the sequence) into sequence
    /// `seq`'s empty cache, and the ranks agree that every shard was there (otherwise every
    /// rank leaves the cache empty and the step fails). Added in group protocol version 4.
    InstallKv {
        seq: SeqId,
        transfer: String,
        tokens: usize,
    },
}

/// Where a prefill replica sends a sequence's KV cache: the decode replica's group id and the
/// KV-transfer address (`HOST:PORT`) of each of its ranks. Rank `r` of the prefill replica
/// sends its shard to `addrs[r]`, so both replicas must have the same tensor-parallel degree.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct KvTarget {
    pub group_id: String,
    pub addrs: Vec<String>,
}

/// How a rank moves KV-cache shards between replicas (prefill/decode disaggregation). The
/// implementation over TCP is `dist::kv`.
pub trait KvTransport: Send {
    /// Send this rank's shard of `cache` to rank `rank` of `target`, named `transfer`; returns
    /// once the receiver has stored it.
    fn send(
        &mut self,
        target: &KvTarget,
        transfer: &str,
        rank: usize,
        cache: &KvCache,
    ) -> anyhow::Result<()>;
    /// The shard received under `transfer` (waiting a bounded time for it).
    fn take(&mut self, transfer: &str) -> anyhow::Result<KvShard>;
}

/// The leader's side of the group transport: deliver a step to every follower, in order.
pub trait StepBroadcast: Send {
    fn broadcast(&mut self, step: &Step) -> anyhow::Result<()>;
}

/// How a pipeline stage's ranks move activations (see the module docs). The caller knows every
/// length from the step, so the transport checks it.
pub trait Pipe: Send {
    /// Receive the previous stage's hidden state (`n` floats).
    fn recv_hidden(&mut self, n: usize) -> anyhow::Result<Vec<f32>>;
    /// Send this stage's hidden state to the next stage.
    fn send_hidden(&mut self, x: &[f32]) -> anyhow::Result<()>;
    /// Last stage, tensor-parallel rank 0: send the last token's logits to the global leader.
    fn send_logits(&mut self, logits: &[f32]) -> anyhow::Result<()>;
    /// Global leader: receive the last stage's logits (`n` floats).
    fn recv_logits(&mut self, n: usize) -> anyhow::Result<Vec<f32>>;
}

/// Executes steps on this rank's shard.
pub struct Runner {
    pub engine: Engine,
    /// KV-cache budget of one sequence, in bytes.
    pub kv_budget_bytes: usize,
    caches: HashMap<SeqId, KvCache>,
    broadcast: Option<Box<dyn StepBroadcast>>,
    pipe: Option<Box<dyn Pipe>>,
    /// KV-cache hand-over between replicas (prefill/decode disaggregation).
    kv: Option<Box<dyn KvTransport>>,
    /// The shard on the GPU when the rank runs on CUDA ([`Runner::with_cuda`]); the CPU model in
    /// `engine` then only supplies the configuration.
    #[cfg(feature = "cuda")]
    gpu: Option<Gpu>,
}

/// A rank's shard on the GPU and its sequences' caches there.
#[cfg(feature = "cuda")]
struct Gpu {
    model: crate::cuda::llama::CudaLlama,
    caches: HashMap<SeqId, crate::cuda::llama::CudaKvCache>,
}

#[cfg(feature = "cuda")]
impl Gpu {
    /// One forward pass per sequence, in the step's order (every rank alike, so the NCCL
    /// reductions pair up); the logits concatenated on rank 0. What would fail for every rank
    /// (a token outside the vocabulary, a full cache) is checked before anything runs.
    fn forward(
        &mut self,
        seqs: &[(SeqId, &[u32])],
        budget: usize,
    ) -> anyhow::Result<Option<Vec<f32>>> {
        let vocab = self.model.config.vocab;
        for (seq, tokens) in seqs {
            anyhow::ensure!(!tokens.is_empty(), "forward pass over no tokens");
            if let Some(t) = tokens.iter().find(|t| **t as usize >= vocab) {
                anyhow::bail!("token id {t} is outside the vocabulary of {vocab}");
            }
            if let Some(c) = self.caches.get(seq) {
                anyhow::ensure!(
                    c.len() + tokens.len() <= c.capacity(),
                    "KV cache full: sequence {seq} holds {} tokens; {} more do not fit its capacity of {}",
                    c.len(),
                    tokens.len(),
                    c.capacity()
                );
            }
        }
        let mut out = Vec::new();
        for (seq, tokens) in seqs {
            let cache = match self.caches.entry(*seq) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(self.model.new_cache(budget)?)
                }
            };
            out.extend(self.model.forward(cache, tokens, Logits::Last)?);
        }
        Ok((self.model.rank() == 0).then_some(out))
    }
}

impl Runner {
    /// A runner over `engine`. The leader of a group passes its broadcast; single ranks and
    /// followers pass `None`.
    pub fn new(
        engine: Engine,
        kv_budget_bytes: usize,
        broadcast: Option<Box<dyn StepBroadcast>>,
    ) -> Self {
        Self {
            engine,
            kv_budget_bytes,
            caches: HashMap::new(),
            broadcast,
            pipe: None,
            kv: None,
            #[cfg(feature = "cuda")]
            gpu: None,
        }
    }

    /// Run the forward passes on `model`, this rank's shard uploaded to its GPU (pipeline
    /// stages are refused: CUDA holds whole models per rank so far).
    #[cfg(feature = "cuda")]
    pub fn with_cuda(mut self, model: crate::cuda::llama::CudaLlama) -> anyhow::Result<Self> {
        anyhow::ensure!(
            self.engine.model.stage.count == 1,
            "pipeline-parallel stages are not implemented on CUDA yet"
        );
        self.gpu = Some(Gpu {
            model,
            caches: HashMap::new(),
        });
        Ok(self)
    }

    /// A rank of a pipeline with more than one stage moves activations through `pipe`.
    pub fn with_pipe(mut self, pipe: Option<Box<dyn Pipe>>) -> Self {
        self.pipe = pipe;
        self
    }

    /// Hand KV caches to, or take them from, other replicas through `kv` (prefill/decode
    /// disaggregation).
    pub fn with_kv(mut self, kv: Box<dyn KvTransport>) -> Self {
        self.kv = Some(kv);
        self
    }

    /// Leader (or single rank): broadcast the step, then execute it here.
    pub fn run(&mut self, step: &Step) -> anyhow::Result<Option<Vec<f32>>> {
        if let Some(b) = self.broadcast.as_mut() {
            b.broadcast(step)?;
        }
        self.execute(step)
    }

    /// Execute a step on this rank only (followers call this with each step received).
    /// Returns the last token's logits for a forward step on the rank that has them: rank 0 of a
    /// single stage, the global leader of a pipeline (`[vocab]` for
    /// [`Step::Forward`], `[sequences, vocab]` for [`Step::ForwardBatch`]).
    pub fn execute(&mut self, step: &Step) -> anyhow::Result<Option<Vec<f32>>> {
        match step {
            Step::Forward { seq, tokens } => self.forward(&[(*seq, tokens)]),
            Step::ForwardBatch { seqs } => {
                let seqs: Vec<(SeqId, &[u32])> =
                    seqs.iter().map(|(s, t)| (*s, t.as_slice())).collect();
                self.forward(&seqs)
            }
            Step::Reserve { seq, tokens } => {
                #[cfg(feature = "cuda")]
                if let Some(gpu) = self.gpu.as_mut() {
                    if !gpu.caches.contains_key(seq) {
                        let per_token = self.engine.model.kv_bytes_per_token().max(1);
                        let bytes = tokens.saturating_mul(per_token).min(self.kv_budget_bytes);
                        gpu.caches.insert(*seq, gpu.model.new_cache(bytes)?);
                    }
                    return Ok(None);
                }
                if !self.caches.contains_key(seq) {
                    let cache = self
                        .engine
                        .model
                        .new_cache_reserved(*tokens, self.kv_budget_bytes)?;
                    self.caches.insert(*seq, cache);
                }
                Ok(None)
            }
            Step::SendKv {
                seq,
                transfer,
                target,
            } => {
                let mine = self.send_kv(*seq, transfer, target);
                self.agree(mine, "sending its KV-cache shard to the decode replica")?;
                Ok(None)
            }
            Step::InstallKv {
                seq,
                transfer,
                tokens,
            } => {
                let mine = self.install_kv(*seq, transfer, *tokens);
                let agreed = self.agree(mine, "installing the KV-cache shard it was handed");
                if agreed.is_err()
                    && let Some(c) = self.caches.get_mut(seq)
                {
                    c.clear();
                }
                agreed.map(|()| None)
            }
            Step::Release { seq } => {
                self.caches.remove(seq);
                #[cfg(feature = "cuda")]
                if let Some(gpu) = self.gpu.as_mut() {
                    gpu.caches.remove(seq);
                }
                Ok(None)
            }
        }
    }

    /// Why this rank cannot hand KV caches over, if it cannot.
    fn kv_unsupported(&self) -> Option<&'static str> {
        #[cfg(feature = "cuda")]
        if self.gpu.is_some() {
            return Some(
                "prefill/decode disaggregation runs on the CPU engine only (the KV cache is on the GPU); set TESSERA_DEVICE=cpu",
            );
        }
        (self.engine.model.stage.count > 1).then_some(
            "prefill/decode disaggregation does not support pipeline stages (TESSERA_PP must be 1)",
        )
    }

    fn send_kv(&mut self, seq: SeqId, transfer: &str, target: &KvTarget) -> anyhow::Result<()> {
        if let Some(why) = self.kv_unsupported() {
            anyhow::bail!(why);
        }
        let (rank, world) = (
            self.engine.collective.rank(),
            self.engine.collective.world(),
        );
        anyhow::ensure!(
            target.addrs.len() == world,
            "the decode replica has {} ranks and this prefill replica {world}: prefill/decode disaggregation needs the same tensor-parallel degree on both sides (--tp / TESSERA_TP)",
            target.addrs.len()
        );
        let cache = self
            .caches
            .get(&seq)
            .ok_or_else(|| anyhow::anyhow!("sequence {seq} has no KV cache on this rank"))?;
        let kv = self.kv.as_mut().ok_or_else(|| {
            anyhow::anyhow!("this replica hands no KV cache over (TESSERA_PD_ROLE is not prefill)")
        })?;
        kv.send(target, transfer, rank, cache)
    }

    fn install_kv(&mut self, seq: SeqId, transfer: &str, tokens: usize) -> anyhow::Result<()> {
        if let Some(why) = self.kv_unsupported() {
            anyhow::bail!(why);
        }
        let kv = self.kv.as_mut().ok_or_else(|| {
            anyhow::anyhow!("this replica takes no KV cache over (TESSERA_PD_ROLE is not decode)")
        })?;
        let shard = kv.take(transfer)?;
        anyhow::ensure!(
            shard.tokens == tokens,
            "the KV cache handed over as {transfer} holds {} tokens where the prompt has {tokens}",
            shard.tokens
        );
        let cache = match self.caches.entry(seq) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(self.engine.model.new_cache(self.kv_budget_bytes)?)
            }
        };
        cache.install(shard)
    }

    /// Every rank's outcome of a step that may fail on some ranks only (a KV hand-over): one
    /// all-reduce of a flag per rank gives every rank the same verdict. A rank that failed
    /// returns its own error; the others name the ranks that failed. A lost group is the
    /// collective's error (fatal).
    fn agree(&self, mine: anyhow::Result<()>, what: &str) -> anyhow::Result<()> {
        let coll = self.engine.collective.as_ref();
        let (rank, world) = (coll.rank(), coll.world());
        if world == 1 {
            return mine;
        }
        let mut failed = vec![0f32; world];
        if let Err(e) = &mine {
            tracing::warn!(rank, "rank {rank} failed {what}: {e:#}");
            failed[rank] = 1.0;
        }
        coll.all_reduce_sum(&mut failed)?;
        mine?;
        let bad: Vec<usize> = (0..world).filter(|r| failed[*r] > 0.5).collect();
        anyhow::ensure!(
            bad.is_empty(),
            "ranks {bad:?} of this replica failed {what} (their logs say why)"
        );
        Ok(())
    }

    /// One forward pass over `seqs` (one or more sequences); the caches are taken out of the
    /// map for the pass and put back whatever happens (a new sequence keeps its empty cache
    /// until released, as with a failed first step).
    fn forward(&mut self, seqs: &[(SeqId, &[u32])]) -> anyhow::Result<Option<Vec<f32>>> {
        anyhow::ensure!(!seqs.is_empty(), "a forward step over no sequence");
        for (i, (seq, _)) in seqs.iter().enumerate() {
            anyhow::ensure!(
                !seqs[..i].iter().any(|(s, _)| s == seq),
                "sequence {seq} appears twice in one batched step"
            );
        }
        #[cfg(feature = "cuda")]
        if let Some(gpu) = self.gpu.as_mut() {
            return gpu.forward(seqs, self.kv_budget_bytes);
        }
        let mut caches = Vec::with_capacity(seqs.len());
        for (seq, _) in seqs {
            let cache = match self.caches.remove(seq) {
                Some(c) => Ok(c),
                None => self.engine.model.new_cache(self.kv_budget_bytes),
            };
            match cache {
                Ok(c) => caches.push((*seq, c)),
                Err(e) => {
                    self.caches.extend(caches);
                    return Err(e);
                }
            }
        }
        let result = self.forward_caches(&mut caches, seqs);
        self.caches.extend(caches);
        result
    }

    fn forward_caches(
        &mut self,
        caches: &mut [(SeqId, KvCache)],
        seqs: &[(SeqId, &[u32])],
    ) -> anyhow::Result<Option<Vec<f32>>> {
        let model = &self.engine.model;
        let (pool, coll) = (&self.engine.pool, self.engine.collective.as_ref());
        let lens: Vec<usize> = seqs.iter().map(|(_, t)| t.len()).collect();
        let tokens: Vec<u32> = match seqs {
            [(_, t)] => t.to_vec(),
            _ => seqs.iter().flat_map(|(_, t)| t.iter().copied()).collect(),
        };
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().map(|(_, c)| c).collect();
        let Some(pipe) = self.pipe.as_mut().filter(|_| model.stage.count > 1) else {
            let out = Output::Logits(Logits::Last);
            let logits =
                model.forward_batch(pool, coll, &mut refs, &lens, Input::Tokens(&tokens), out)?;
            return Ok((coll.rank() == 0).then_some(logits));
        };
        // Fail alike on every rank before anything moves.
        let c = &model.config;
        anyhow::ensure!(!lens.contains(&0), "forward pass over no tokens");
        if let Some(t) = tokens.iter().find(|t| **t as usize >= c.vocab) {
            anyhow::bail!("token id {t} is outside the vocabulary of {}", c.vocab);
        }
        for (cache, &len) in refs.iter().zip(&lens) {
            cache.check_room(len)?;
        }
        let (stage, tp_rank) = (model.stage, coll.rank());
        let received;
        let input = if stage.is_first() {
            Input::Tokens(&tokens)
        } else {
            received = pipe.recv_hidden(tokens.len() * c.hidden)?;
            Input::Hidden(&received)
        };
        if !stage.is_last() {
            let x = model.forward_batch(pool, coll, &mut refs, &lens, input, Output::Hidden)?;
            pipe.send_hidden(&x)?;
        } else {
            // Every rank of the last stage multiplies by its rows of the LM head; its rank 0
            // gathers the logits and passes them on.
            let out = Output::Logits(Logits::Last);
            let logits = model.forward_batch(pool, coll, &mut refs, &lens, input, out)?;
            if tp_rank == 0 {
                pipe.send_logits(&logits)?;
            }
        }
        if stage.is_first() && tp_rank == 0 {
            return Ok(Some(pipe.recv_logits(seqs.len() * c.vocab)?));
        }
        Ok(None)
    }

    /// Tokens held by sequence `seq`'s cache (0 when unknown).
    pub fn seq_len(&self, seq: SeqId) -> usize {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            return gpu.caches.get(&seq).map_or(0, |c| c.len());
        }
        self.caches.get(&seq).map_or(0, KvCache::len)
    }

    /// Floats of KV-cache memory reserved for sequence `seq` on this rank (CPU caches; `None`
    /// when it has none).
    pub fn reserved_floats(&self, seq: SeqId) -> Option<usize> {
        self.caches.get(&seq).map(KvCache::reserved_floats)
    }

    /// Sequences with a live cache.
    pub fn live(&self) -> usize {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            return gpu.caches.len();
        }
        self.caches.len()
    }

    /// Bytes held by all live KV caches (on the GPU: their whole capacity, allocated up front).
    pub fn kv_bytes_used(&self) -> usize {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            return gpu.caches.values().map(|c| c.bytes()).sum();
        }
        self.caches.values().map(KvCache::bytes_used).sum()
    }
}
