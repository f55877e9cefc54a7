//! The key/value cache of one sequence (f32), with a memory budget.

/// Keys and values of every layer for the tokens of one sequence seen so far. Memory grows as
/// tokens arrive, up to `capacity` tokens; appending past it is an error, not a reallocation.
#[derive(Debug)]
pub struct KvCache {
    /// Per layer: keys and values, `[tokens, kv_dim]` each.
    pub(crate) layers: Vec<(Vec<f32>, Vec<f32>)>,
    kv_dim: usize,
    len: usize,
    capacity: usize,
}

/// The cache cannot hold the tokens asked for.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error(
    "KV cache full: the sequence needs {needed} tokens but its budget holds {capacity} ({budget_mib:.1} MiB at {bytes_per_token} bytes per token)"
)]
pub struct KvCacheFull {
    pub needed: usize,
    pub capacity: usize,
    pub bytes_per_token: usize,
    pub budget_mib: f64,
}

impl KvCache {
    /// A cache for `n_layers` layers of `kv_dim` keys (and as many values) per token, holding at
    /// most `capacity` tokens.
    pub fn new(n_layers: usize, kv_dim: usize, capacity: usize) -> Self {
        Self {
            layers: (0..n_layers).map(|_| (Vec::new(), Vec::new())).collect(),
            kv_dim,
            len: 0,
            capacity,
        }
    }

    /// A cache holding at most `capacity` tokens with the memory for all of them reserved now,
    /// exactly (no growth by doubling later): what the scheduler admitted for a sequence.
    pub fn with_reserved(n_layers: usize, kv_dim: usize, capacity: usize) -> Self {
        let per_layer = capacity * kv_dim;
        Self {
            layers: (0..n_layers)
                .map(|_| (Vec::with_capacity(per_layer), Vec::with_capacity(per_layer)))
                .collect(),
            kv_dim,
            len: 0,
            capacity,
        }
    }

    /// Floats reserved across all layers (keys and values): what the cache holds in memory at
    /// most without growing.
    pub fn reserved_floats(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| k.capacity() + v.capacity())
            .sum()
    }

    /// Bytes one token takes across all layers.
    pub fn bytes_per_token(&self) -> usize {
        self.layers.len() * self.kv_dim * 2 * std::mem::size_of::<f32>()
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Most tokens this cache may hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes in use now.
    pub fn bytes_used(&self) -> usize {
        self.len * self.bytes_per_token()
    }

    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    /// Fails unless `more` tokens fit.
    pub fn check_room(&self, more: usize) -> Result<(), KvCacheFull> {
        let needed = self.len + more;
        if needed > self.capacity {
            return Err(KvCacheFull {
                needed,
                capacity: self.capacity,
                bytes_per_token: self.bytes_per_token(),
                budget_mib: (self.capacity * self.bytes_per_token()) as f64 / (1 << 20) as f64,
            });
        }
        Ok(())
    }

    /// Forget everything after the first `len` tokens.
    pub fn truncate(&mut self, len: usize) {
        let len = len.min(self.len);
        for (k, v) in &mut self.layers {
            k.truncate(len * self.kv_dim);
            v.truncate(len * self.kv_dim);
        }
        self.len = len;
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Append one layer's keys and values for new tokens (the layer's length may run ahead of
    /// `len` during a forward pass until [`KvCache::commit`]).
    pub(crate) fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let (kc, vc) = &mut self.layers[layer];
        kc.extend_from_slice(k);
        vc.extend_from_slice(v);
    }

    /// Record that `n` more tokens are now in every layer.
    pub(crate) fn commit(&mut self, n: usize) {
        self.len += n;
        debug_assert!(
            self.layers
                .iter()
                .all(|(k, _)| k.len() == self.len * self.kv_dim)
        );
    }

    /// Undo a forward pass that failed half-way.
    pub(crate) fn rollback(&mut self) {
        let len = self.len;
        for (k, v) in &mut self.layers {
            k.truncate(len * self.kv_dim);
            v.truncate(len * self.kv_dim);
        }
    }
}
