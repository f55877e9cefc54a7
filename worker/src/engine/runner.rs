//! The step seam between scheduling and tensor parallelism.
//!
//! Every rank of a tensor-parallel group must run the same forward passes in the same order, or
//! the all-reduces inside them pair up wrongly. The leader decides what to run (the scheduler),
//! turns each decision into a [`Step`], hands it to a [`StepBroadcast`] (followers receive it over
//! the group's transport) and then executes it itself; followers execute the steps they receive
//! in order with [`Runner::execute`]. Each rank holds its own KV caches, keyed by [`SeqId`], for
//! its shard of the KV heads.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::Engine;
use crate::model::kv_cache::KvCache;
use crate::model::llama::Logits;

/// Identifies one sequence (request) across the ranks of a group.
pub type SeqId = u64;

/// One unit of work every rank executes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Append `tokens` to sequence `seq` (a new sequence starts with its prompt) and compute the
    /// last token's logits.
    Forward { seq: SeqId, tokens: Vec<u32> },
    /// Forget sequence `seq` and free its KV cache.
    Release { seq: SeqId },
}

/// The leader's side of the group transport: deliver a step to every follower, in order.
pub trait StepBroadcast: Send {
    fn broadcast(&mut self, step: &Step) -> anyhow::Result<()>;
}

/// Executes steps on this rank's shard.
pub struct Runner {
    pub engine: Engine,
    /// KV-cache budget of one sequence, in bytes.
    pub kv_budget_bytes: usize,
    caches: HashMap<SeqId, KvCache>,
    broadcast: Option<Box<dyn StepBroadcast>>,
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
        }
    }

    /// Leader (or single rank): broadcast the step, then execute it here.
    pub fn run(&mut self, step: &Step) -> anyhow::Result<Option<Vec<f32>>> {
        if let Some(b) = self.broadcast.as_mut() {
            b.broadcast(step)?;
        }
        self.execute(step)
    }

    /// Execute a step on this rank only (followers call this with each step received).
    /// Returns the last token's logits for a forward step.
    pub fn execute(&mut self, step: &Step) -> anyhow::Result<Option<Vec<f32>>> {
        match step {
            Step::Forward { seq, tokens } => {
                let cache = match self.caches.entry(*seq) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(self.engine.model.new_cache(self.kv_budget_bytes)?)
                    }
                };
                let logits = self.engine.model.forward(
                    &self.engine.pool,
                    self.engine.collective.as_ref(),
                    cache,
                    tokens,
                    Logits::Last,
                )?;
                Ok(Some(logits))
            }
            Step::Release { seq } => {
                self.caches.remove(seq);
                Ok(None)
            }
        }
    }

    /// Tokens held by sequence `seq`'s cache (0 when unknown).
    pub fn seq_len(&self, seq: SeqId) -> usize {
        self.caches.get(&seq).map_or(0, KvCache::len)
    }

    /// Sequences with a live cache.
    pub fn live(&self) -> usize {
        self.caches.len()
    }

    /// Bytes held by all live KV caches.
    pub fn kv_bytes_used(&self) -> usize {
        self.caches.values().map(KvCache::bytes_used).sum()
    }
}
