//! The key/value cache of one sequence (f32), with a memory budget, and the portable copy of
//! its contents ([`KvShard`]) that prefill/decode disaggregation moves between replicas.

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

    /// Layers held (this rank's pipeline stage's layers).
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Layer `layer`'s keys and values of the tokens cached, `[len, kv_dim]` each.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        let (k, v) = &self.layers[layer];
        let n = self.len * self.kv_dim;
        (&k[..n], &v[..n])
    }

    /// Take over the keys and values another replica computed for the first `shard.tokens`
    /// tokens of this sequence (prefill/decode disaggregation: the decode replica continues
    /// from the prefill replica's cache). The cache must be empty and of the same shape (layers
    /// and `kv_dim`: the same model, tensor-parallel rank and degree); the data goes into the
    /// memory already reserved, so the cache's reservation is unchanged.
    pub fn install(&mut self, shard: KvShard) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.len == 0,
            "installing a KV cache over a sequence that already holds {} tokens",
            self.len
        );
        anyhow::ensure!(
            shard.layers.len() == self.layers.len() && shard.kv_dim == self.kv_dim,
            "the KV cache handed over has {} layers of {} keys per token, this rank's cache {} of {} (prefill and decode replicas must run the same model with the same tensor-parallel degree)",
            shard.layers.len(),
            shard.kv_dim,
            self.layers.len(),
            self.kv_dim
        );
        let n = shard.tokens * self.kv_dim;
        if let Some(l) = shard
            .layers
            .iter()
            .position(|(k, v)| k.len() != n || v.len() != n)
        {
            anyhow::bail!(
                "layer {l} of the KV cache handed over does not hold {} tokens of {} keys",
                shard.tokens,
                self.kv_dim
            );
        }
        self.check_room(shard.tokens)?;
        for ((k, v), (sk, sv)) in self.layers.iter_mut().zip(shard.layers) {
            k.extend_from_slice(&sk);
            v.extend_from_slice(&sv);
        }
        self.len = shard.tokens;
        Ok(())
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

/// The keys and values of a sequence's first `tokens` tokens on one rank, as they travel from a
/// prefill replica to a decode replica: per layer `[tokens, kv_dim]` keys and as many values.
#[derive(Clone, Debug, PartialEq)]
pub struct KvShard {
    pub tokens: usize,
    pub kv_dim: usize,
    pub layers: Vec<(Vec<f32>, Vec<f32>)>,
}

impl KvShard {
    /// A copy of what `cache` holds.
    pub fn of(cache: &KvCache) -> Self {
        Self {
            tokens: cache.len(),
            kv_dim: cache.kv_dim(),
            layers: (0..cache.n_layers())
                .map(|l| {
                    let (k, v) = cache.layer(l);
                    (k.to_vec(), v.to_vec())
                })
                .collect(),
        }
    }

    /// Bytes of keys and values.
    pub fn bytes(&self) -> usize {
        self.layers.len() * 2 * self.tokens * self.kv_dim * std::mem::size_of::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(layers: usize, kv_dim: usize, tokens: usize) -> KvCache {
        let mut c = KvCache::with_reserved(layers, kv_dim, 16);
        for l in 0..layers {
            let k: Vec<f32> = (0..tokens * kv_dim)
                .map(|i| (l * 1000 + i) as f32)
                .collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            c.append(l, &k, &v);
        }
        c.commit(tokens);
        c
    }

    /// A shard copied out of one cache and installed into an empty one of the same shape gives
    /// the same keys and values, inside the reservation; a shard of another shape, a cache that
    /// is not empty and a shard beyond the capacity are refused, naming what differs.
    #[test]
    fn a_shard_installs_into_an_empty_cache_of_the_same_shape() {
        let src = filled(3, 4, 5);
        let shard = KvShard::of(&src);
        assert_eq!(shard.bytes(), 3 * 2 * 5 * 4 * 4);
        let mut dst = KvCache::with_reserved(3, 4, 8);
        let reserved = dst.reserved_floats();
        dst.install(shard.clone()).unwrap();
        assert_eq!(dst.len(), 5);
        assert_eq!(dst.reserved_floats(), reserved, "no reallocation");
        for l in 0..3 {
            assert_eq!(dst.layer(l), src.layer(l));
        }
        let again = dst.install(shard.clone()).unwrap_err().to_string();
        assert!(again.contains("already holds 5 tokens"), "{again}");

        let mut other = KvCache::with_reserved(3, 8, 8);
        let e = other.install(shard.clone()).unwrap_err().to_string();
        assert!(
            e.contains("3 layers of 4 keys") && e.contains("3 of 8"),
            "{e}"
        );
        let mut small = KvCache::with_reserved(3, 4, 4);
        let e = small.install(shard.clone()).unwrap_err().to_string();
        assert!(e.contains("KV cache full"), "{e}");
        let mut torn = shard;
        torn.layers[1].1.pop();
        let e = KvCache::with_reserved(3, 4, 8)
            .install(torn)
            .unwrap_err()
            .to_string();
        assert!(e.contains("layer 1"), "{e}");
    }
}
