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
}

/// Collective operations across the ranks of a tensor-parallel group.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Element-wise sum of `buf` across all ranks, result in every rank's `buf`.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> anyhow::Result<()>;
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
}
