//! The seams for tensor parallelism: which part of the model a rank holds ([`Shard`]) and how
//! ranks combine partial results ([`Collective`]).
//!
//! Megatron-style: Q, K, V and the FFN gate/up projections are column-parallel (each rank holds
//! a block of output rows: whole attention heads, a slice of the FFN), the attention output and
//! FFN down projections are row-parallel (each rank holds the matching block of input columns and
//! produces a partial sum), and one all-reduce after each row-parallel product restores the full
//! hidden state. With `world = 1` the identity collective makes this plain single-rank inference.

/// This rank's position in its tensor-parallel group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    /// The whole model on one rank.
    pub const SINGLE: Shard = Shard { rank: 0, world: 1 };

    pub fn new(rank: usize, world: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(world >= 1, "tensor-parallel world size must be at least 1");
        anyhow::ensure!(rank < world, "rank {rank} is outside a world of {world}");
        Ok(Self { rank, world })
    }

    /// This rank's part of `0..n` split in `world` equal pieces (`n` must divide evenly).
    pub fn range(&self, n: usize) -> std::ops::Range<usize> {
        let per = n / self.world;
        self.rank * per..(self.rank + 1) * per
    }

    /// The vocabulary-parallel split of `vocab` LM-head rows: every rank's part is `per =
    /// ceil(vocab / world)` rows long on the wire, and this rank holds rows `range` of them
    /// (`range.len() <= per`; the last ranks hold fewer, possibly none, when `world` does not
    /// divide `vocab`).
    pub fn vocab_split(&self, vocab: usize) -> (usize, std::ops::Range<usize>) {
        let per = vocab.div_ceil(self.world);
        let start = (self.rank * per).min(vocab);
        (per, start..(start + per).min(vocab))
    }
}

/// Rank 0's view of a vocabulary-parallel LM head: `parts` is every rank's `[rows, per]` block of
/// logits (see [`Shard::vocab_split`]) concatenated in rank order; the result is the
/// `[rows, vocab]` logits, the padding of short parts dropped.
pub fn assemble_vocab(parts: &[f32], world: usize, rows: usize, vocab: usize) -> Vec<f32> {
    let per = vocab.div_ceil(world);
    debug_assert_eq!(parts.len(), world * rows * per);
    let mut out = vec![0f32; rows * vocab];
    for rank in 0..world {
        let (_, cols) = Shard { rank, world }.vocab_split(vocab);
        let block = &parts[rank * rows * per..(rank + 1) * rows * per];
        for (src, dst) in block.chunks_exact(per).zip(out.chunks_exact_mut(vocab)) {
            dst[cols.clone()].copy_from_slice(&src[..cols.len()]);
        }
    }
    out
}

/// The vocabulary-parallel LM head's logits: `mine` is this rank's `[rows, cols]` block (its
/// rows of [`Shard::vocab_split`]); every rank's block, padded to the common length, goes to
/// rank 0 through [`Collective::gather`]. Rank 0 gets the `[rows, vocab]` logits, the other
/// ranks an empty vector.
pub fn gather_vocab(
    coll: &dyn Collective,
    shard: Shard,
    mine: Vec<f32>,
    rows: usize,
    vocab: usize,
) -> anyhow::Result<Vec<f32>> {
    use anyhow::Context;
    let (per, cols) = shard.vocab_split(vocab);
    let part = if cols.len() == per {
        mine
    } else {
        let mut part = vec![0f32; rows * per];
        if !cols.is_empty() {
            for (src, dst) in mine
                .chunks_exact(cols.len())
                .zip(part.chunks_exact_mut(per))
            {
                dst[..cols.len()].copy_from_slice(src);
            }
        }
        part
    };
    let gathered = coll
        .gather(&part)
        .context("gather of the LM head's logits")?;
    Ok(gathered.map_or_else(Vec::new, |all| {
        assemble_vocab(&all, shard.world, rows, vocab)
    }))
}

/// This rank's pipeline stage: which contiguous block of decoder layers it holds.
///
/// `count` stages split `n_layers` layers as evenly as possible; the first `n_layers % count`
/// stages take one layer more (30 layers in 2 stages: 15 + 15; in 4: 8 + 8 + 7 + 7). Stage 0
/// also holds the token embedding, the last stage the final norm and the LM head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stage {
    pub index: usize,
    pub count: usize,
}

impl Stage {
    /// The whole model in one stage.
    pub const WHOLE: Stage = Stage { index: 0, count: 1 };

    pub fn new(index: usize, count: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(count >= 1, "pipeline-parallel degree must be at least 1");
        anyhow::ensure!(
            index < count,
            "stage {index} is outside a pipeline of {count} stages"
        );
        Ok(Self { index, count })
    }

    pub fn is_first(&self) -> bool {
        self.index == 0
    }

    pub fn is_last(&self) -> bool {
        self.index + 1 == self.count
    }

    /// The layers of `0..n_layers` this stage holds (see the type's docs).
    pub fn layers(&self, n_layers: usize) -> std::ops::Range<usize> {
        let (base, extra) = (n_layers / self.count, n_layers % self.count);
        let start = self.index * base + self.index.min(extra);
        let len = base + usize::from(self.index < extra);
        start..start + len
    }
}

/// Collective operations across the ranks of a tensor-parallel group.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Element-wise sum of `buf` across all ranks, result in every rank's `buf`.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> anyhow::Result<()>;

    /// Gather on rank 0: every rank passes a `part` of the same length; rank 0 gets all parts
    /// concatenated in rank order, the other ranks `None`. The vocabulary-parallel LM head uses
    /// it: only the leader samples, so the logits need not travel back.
    ///
    /// The default moves the parts through [`Collective::all_reduce_sum`] (each rank's part at
    /// its offset in a zeroed buffer of `world` parts; adding zeros is exact); transports that
    /// can send to one rank override it.
    fn gather(&self, part: &[f32]) -> anyhow::Result<Option<Vec<f32>>> {
        let (rank, n) = (self.rank(), part.len());
        let mut all = vec![0f32; self.world() * n];
        all[rank * n..(rank + 1) * n].copy_from_slice(part);
        self.all_reduce_sum(&mut all)?;
        Ok((rank == 0).then_some(all))
    }
}

/// The collective of a single rank: every reduction is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct Identity;

impl Collective for Identity {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> anyhow::Result<()> {
        Ok(())
    }
    fn gather(&self, part: &[f32]) -> anyhow::Result<Option<Vec<f32>>> {
        Ok(Some(part.to_vec()))
    }
}

/// Process-wide all-reduce counters, updated by every [`Collective`] that moves data and read by
/// the worker's `/metrics` (`tessera_allreduce_*`).
pub static ALLREDUCE_STATS: AllReduceStats = AllReduceStats::new();

/// Calls, payload bytes and wall time of all-reduces.
#[derive(Debug)]
pub struct AllReduceStats {
    pub calls: std::sync::atomic::AtomicU64,
    pub bytes: std::sync::atomic::AtomicU64,
    pub nanos: std::sync::atomic::AtomicU64,
    /// Stall timeouts a collective sat out waiting for a slow (but live) rank.
    pub slow_waits: std::sync::atomic::AtomicU64,
}

impl AllReduceStats {
    pub const fn new() -> Self {
        use std::sync::atomic::AtomicU64;
        Self {
            calls: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            nanos: AtomicU64::new(0),
            slow_waits: AtomicU64::new(0),
        }
    }

    /// Record one all-reduce of `bytes` payload bytes that took `elapsed`.
    pub fn record(&self, bytes: usize, elapsed: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        self.calls.fetch_add(1, Relaxed);
        self.bytes.fetch_add(bytes as u64, Relaxed);
        self.nanos.fetch_add(
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            Relaxed,
        );
    }
}

impl Default for AllReduceStats {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vocabulary_split_covers_every_row_once() {
        for vocab in [1, 5, 96, 97, 49152, 128_256] {
            for world in 1..=9 {
                let mut next = 0;
                for rank in 0..world {
                    let (per, r) = Shard { rank, world }.vocab_split(vocab);
                    assert_eq!(per, vocab.div_ceil(world));
                    assert!(r.len() <= per, "{vocab}/{world} rank {rank}: {r:?}");
                    assert_eq!(r.start, next, "{vocab}/{world} rank {rank}: {r:?}");
                    next = r.end;
                }
                assert_eq!(next, vocab, "{vocab}/{world}");
            }
        }
    }

    /// Every rank's padded block of a `[rows, vocab]` matrix, as a gather delivers them, comes
    /// back as the matrix, including splits where the last ranks hold fewer rows or none.
    #[test]
    fn assembled_parts_give_back_the_whole_matrix() {
        for (vocab, world, rows) in [(10, 1, 2), (10, 3, 2), (5, 4, 3), (96, 4, 1), (7, 7, 2)] {
            let whole: Vec<f32> = (0..rows * vocab).map(|i| i as f32 + 0.5).collect();
            let mut parts = Vec::new();
            for rank in 0..world {
                let (per, cols) = Shard { rank, world }.vocab_split(vocab);
                for row in whole.chunks_exact(vocab) {
                    let mut block = row[cols.clone()].to_vec();
                    block.resize(per, f32::NAN); // padding is never read
                    parts.extend(block);
                }
            }
            assert_eq!(
                assemble_vocab(&parts, world, rows, vocab),
                whole,
                "{vocab}/{world}"
            );
        }
    }

    #[test]
    fn one_rank_gathers_its_own_part() {
        assert_eq!(Identity.gather(&[1.0, 2.0]).unwrap(), Some(vec![1.0, 2.0]));
    }
}
