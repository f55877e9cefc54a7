//! Choosing the next token from logits: greedy, temperature, top-k, top-p, with a seedable
//! random number generator (the same seed and logits give the same tokens).

/// How to pick tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 (or less) is greedy decoding.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1: all).
    pub top_p: f32,
    /// Seed of the random number generator (`None`: from the clock).
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Reject values that make no sense (naming the parameter).
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

/// SplitMix64: tiny, fast, and good enough for sampling.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Picks tokens with fixed parameters and its own random stream.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

/// Index of the largest logit (the first one on ties); 0 for an empty slice.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| {
            use std::hash::{BuildHasher, RandomState};
            RandomState::new().hash_one(std::time::SystemTime::now())
        });
        Self {
            params,
            rng: Rng::new(seed),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature <= 0.0 || p.top_k == 1 {
            return argmax(logits);
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, &v)| (i as u32, v / p.temperature))
            .collect();
        // A temperature so small that logits / temperature overflows (1e-40, say) leaves only
        // infinities, whose softmax is NaN: that is greedy decoding.
        if cand.is_empty() || cand.iter().any(|c| !c.1.is_finite()) {
            return argmax(logits);
        }
        let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, desc);
            cand.truncate(p.top_k);
        }
        cand.sort_unstable_by(desc);
        let max = cand[0].1;
        let mut sum = 0f32;
        for c in &mut cand {
            c.1 = (c.1 - max).exp();
            sum += c.1;
        }
        for c in &mut cand {
            c.1 /= sum;
        }
        if p.top_p < 1.0 {
            let mut acc = 0f32;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                acc += c.1;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep);
            let s: f32 = cand.iter().map(|c| c.1).sum();
            cand.iter_mut().for_each(|c| c.1 /= s);
        }
        let r = self.rng.next_f32();
        let mut acc = 0f32;
        for c in &cand {
            acc += c.1;
            if r < acc {
                return c.0;
            }
        }
        cand.last().map_or(0, |c| c.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_k_limits() {
        let logits = [1.0, 2.0, 3.0, 4.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 10.0,
            top_k: 2,
            seed: Some(7),
            ..Default::default()
        });
        for _ in 0..200 {
            assert!(s.sample(&logits) >= 2);
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Probabilities ~ [0.0003, 0.0009, 0.0025, 0.9963]: top_p 0.5 keeps only the last.
        let logits = [1.0, 2.0, 3.0, 9.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: Some(1),
            ..Default::default()
        });
        for _ in 0..100 {
            assert_eq!(s.sample(&logits), 3);
        }
    }

    #[test]
    fn seeded_sampling_is_deterministic_and_follows_the_distribution() {
        let logits = [0.0f32, (2.0f32).ln(), (3.0f32).ln()];
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(42),
            ..Default::default()
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(params.clone());
            (0..6000).map(|_| s.sample(&logits)).collect()
        };
        let mut s = Sampler::new(params);
        let b: Vec<u32> = (0..6000).map(|_| s.sample(&logits)).collect();
        assert_eq!(a, b);
        let freq = |t| a.iter().filter(|&&x| x == t).count() as f32 / 6000.0;
        for (t, p) in [(0, 1.0 / 6.0), (1, 2.0 / 6.0), (2, 3.0 / 6.0)] {
            assert!((freq(t) - p).abs() < 0.03, "token {t}: {} vs {p}", freq(t));
        }
    }

    /// Logits over a subnormal temperature overflow to infinity; the softmax of infinities
    /// is NaN, and the draw then fell through to the *least* likely kept token.
    #[test]
    fn a_temperature_so_small_it_overflows_is_greedy() {
        for t in [1e-40f32, f32::MIN_POSITIVE, 1e-30] {
            let mut s = Sampler::new(SamplingParams {
                temperature: t,
                seed: Some(3),
                ..Default::default()
            });
            for _ in 0..20 {
                assert_eq!(s.sample(&[1.0, 30.0, -2.0, 29.5]), 1, "temperature {t}");
            }
        }
    }

    #[test]
    fn validation_names_the_parameter() {
        let bad = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("temperature"));
        let bad = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("top_p"));
    }
}
