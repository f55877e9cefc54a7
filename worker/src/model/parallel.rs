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

/// Process-wide all-reduce counters, updated by every [`Collective`] that moves data and read by
/// the worker's `/metrics` (`tessera_allreduce_*`).
pub static ALLREDUCE_STATS: AllReduceStats = AllReduceStats::new();

/// Calls, payload bytes and wall time of all-reduces.
#[derive(Debug)]
pub struct AllReduceStats {
    pub calls: std::sync::atomic::AtomicU64,
    pub bytes: std::sync::atomic::AtomicU64,
    pub nanos: std::sync::atomic::AtomicU64,
}

impl AllReduceStats {
    pub const fn new() -> Self {
        use std::sync::atomic::AtomicU64;
        Self {
            calls: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            nanos: AtomicU64::new(0),
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
