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
    /// OpenAI `presence_penalty` in [-2, 2]: subtracted from the logit of every token already
    /// generated in this sequence.
    pub presence_penalty: f32,
    /// OpenAI `frequency_penalty` in [-2, 2]: subtracted from a token's logit once per time it
    /// was generated in this sequence.
    pub frequency_penalty: f32,
    /// Added to the logits of these tokens before sampling (greedy included); -100 bans.
    pub logit_bias: Vec<(u32, f32)>,
    /// Generation stops when one of these tokens is sampled (the token is not generated text).
    pub stop_token_ids: Vec<u32>,
    /// Report log-probabilities: of the sampled token and of the `n` most likely tokens.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            stop_token_ids: Vec::new(),
            logprobs: None,
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
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(v.is_finite() && (-2.0..=2.0).contains(&v)) {
                return Err(format!("{name} must be between -2 and 2, got {v}"));
            }
        }
        if let Some(&(t, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(b.is_finite() && (-100.0..=100.0).contains(b)))
        {
            return Err(format!(
                "logit_bias values must be between -100 and 100, got {b} for token {t}"
            ));
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return Err(format!(
                "logit_bias has {} entries; at most {MAX_LOGIT_BIAS} are allowed",
                self.logit_bias.len()
            ));
        }
        if self.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
            return Err(format!(
                "stop_token_ids has {} ids; at most {MAX_STOP_TOKEN_IDS} are allowed",
                self.stop_token_ids.len()
            ));
        }
        if let Some(n) = self.logprobs
            && n > MAX_TOP_LOGPROBS
        {
            return Err(format!(
                "logprobs: at most {MAX_TOP_LOGPROBS} alternatives, got {n}"
            ));
        }
        Ok(())
    }

    /// Reject token ids outside a vocabulary of `vocab` tokens (naming the parameter).
    pub fn check_tokens(&self, vocab: usize) -> Result<(), String> {
        if let Some((t, _)) = self.logit_bias.iter().find(|(t, _)| *t as usize >= vocab) {
            return Err(format!(
                "logit_bias: token id {t} is outside the vocabulary of {vocab}"
            ));
        }
        if let Some(t) = self.stop_token_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(format!(
                "stop_token_ids: token id {t} is outside the vocabulary of {vocab}"
            ));
        }
        Ok(())
    }

    /// Whether the logits are changed before sampling (bias or penalties).
    fn processes(&self) -> bool {
        !self.logit_bias.is_empty() || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

/// OpenAI's limit on `logit_bias` entries.
pub const MAX_LOGIT_BIAS: usize = 300;
/// The most `stop_token_ids` a request may give.
pub const MAX_STOP_TOKEN_IDS: usize = 64;
/// The most alternatives `logprobs` may ask for (OpenAI's chat `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Log-probabilities of one position (log softmax of the processed logits).
#[derive(Clone, Debug, PartialEq)]
pub struct Logprobs {
    /// Of the sampled token.
    pub logprob: f32,
    /// The most likely tokens, most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

/// The log-probability of `token` and the `k` most likely tokens under softmax(`logits`),
/// without allocating anything of the vocabulary's size.
pub fn logprobs(logits: &[f32], token: u32, k: usize) -> Logprobs {
    let max = logits
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits
        .iter()
        .filter(|v| v.is_finite())
        .map(|&v| (v - max).exp())
        .sum();
    let lse = max + sum.ln();
    let lp = |v: f32| {
        if v.is_finite() {
            v - lse
        } else {
            f32::NEG_INFINITY
        }
    };
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k > 0 {
        for (i, &v) in logits.iter().enumerate() {
            if !v.is_finite() || (top.len() == k && v <= top[k - 1].1) {
                continue;
            }
            let at = top.partition_point(|&(_, w)| w >= v);
            top.insert(at, (i as u32, v));
            top.truncate(k);
        }
    }
    for t in &mut top {
        t.1 = lp(t.1);
    }
    Logprobs {
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&v| lp(v)),
        top,
    }
}

/// SplitMix64: tiny, fast, and good enough for sampling.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The generator's whole state: [`Rng::new`] of it continues the same stream.
    pub fn state(&self) -> u64 {
        self.0
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
    /// How many times each token was sampled (only with penalties).
    counts: std::collections::HashMap<u32, u32>,
    /// Processed logits for [`Sampler::sample`] (kept between steps).
    scratch: Vec<f32>,
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
            counts: Default::default(),
            scratch: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The state of the random stream (prefill/decode disaggregation hands it to the decode
    /// replica with the first token, so that seeded sampling continues as on one replica).
    pub fn rng_state(&self) -> u64 {
        self.rng.state()
    }

    /// Continue the random stream of another sampler from its [`Sampler::rng_state`].
    pub fn with_rng_state(mut self, state: u64) -> Self {
        self.rng = Rng::new(state);
        self
    }

    /// Apply `logit_bias` and the presence and frequency penalties to `logits` in place (only
    /// the biased and already generated tokens are touched).
    pub fn process(&self, logits: &mut [f32]) {
        for &(t, b) in &self.params.logit_bias {
            if let Some(v) = logits.get_mut(t as usize) {
                *v += b;
            }
        }
        let (pp, fp) = (self.params.presence_penalty, self.params.frequency_penalty);
        for (&t, &c) in &self.counts {
            if let Some(v) = logits.get_mut(t as usize) {
                *v -= pp + fp * c as f32;
            }
        }
    }

    /// Count a generated token for the penalties.
    pub fn observe(&mut self, token: u32) {
        if self.params.presence_penalty != 0.0 || self.params.frequency_penalty != 0.0 {
            *self.counts.entry(token).or_insert(0) += 1;
        }
    }

    /// The next token: processes `logits` in place ([`Sampler::process`]), picks and counts
    /// the token.
    pub fn sample_in_place(&mut self, logits: &mut [f32]) -> u32 {
        self.process(logits);
        let t = self.pick(logits);
        self.observe(t);
        t
    }

    /// The next token (as [`Sampler::sample_in_place`], on a copy when logits are processed).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if !self.params.processes() {
            let t = self.pick(logits);
            self.observe(t);
            return t;
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        scratch.extend_from_slice(logits);
        let t = self.sample_in_place(&mut scratch);
        self.scratch = scratch;
        t
    }

    /// Choose a token from already processed logits (temperature, top-k, top-p).
    pub fn pick(&mut self, logits: &[f32]) -> u32 {
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

    /// A sampler continued from another's state draws what the other would have drawn next.
    #[test]
    fn a_sampler_continues_from_another_ones_state() {
        let logits = [0.3f32, 1.0, 0.2, 0.9, 0.5];
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(9),
            ..Default::default()
        };
        let mut a = Sampler::new(params.clone());
        let first = a.sample(&logits);
        let mut b = Sampler::new(SamplingParams {
            seed: None,
            ..params
        })
        .with_rng_state(a.rng_state());
        b.observe(first);
        let rest_a: Vec<u32> = (0..50).map(|_| a.sample(&logits)).collect();
        let rest_b: Vec<u32> = (0..50).map(|_| b.sample(&logits)).collect();
        assert_eq!(rest_a, rest_b);
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

    #[test]
    fn bias_and_penalties_touch_only_their_tokens() {
        let mut s = Sampler::new(SamplingParams {
            logit_bias: vec![(0, 100.0)],
            ..Default::default()
        });
        assert_eq!(s.sample(&[0.0, 5.0, 1.0]), 0);
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 1.0,
            frequency_penalty: 0.5,
            ..Default::default()
        });
        let mut l = [3.0, 2.9, 0.0];
        assert_eq!(s.sample_in_place(&mut l.clone()), 0);
        // Token 0 was generated once: 3 - 1 - 0.5 = 1.5 < 2.9.
        assert_eq!(s.sample_in_place(&mut l), 1);
        assert_eq!(l, [1.5, 2.9, 0.0]);
        // Now both once; token 0 again loses 1.5, token 1 loses 1.5.
        let mut l = [3.0, 2.9, 0.0];
        s.process(&mut l);
        assert!((l[0] - 1.5).abs() < 1e-6 && (l[1] - 1.4).abs() < 1e-6 && l[2] == 0.0);
    }

    #[test]
    fn logprobs_are_a_log_softmax_with_the_top_tokens() {
        let logits = [0.0f32, (2.0f32).ln(), (3.0f32).ln(), f32::NEG_INFINITY];
        let lp = logprobs(&logits, 1, 2);
        assert!((lp.logprob - (2.0f32 / 6.0).ln()).abs() < 1e-5);
        assert_eq!(lp.top.len(), 2);
        assert_eq!((lp.top[0].0, lp.top[1].0), (2, 1));
        assert!((lp.top[0].1 - 0.5f32.ln()).abs() < 1e-5);
        assert_eq!(logprobs(&logits, 3, 0).logprob, f32::NEG_INFINITY);
        assert!(logprobs(&logits, 0, 0).top.is_empty());
    }

    #[test]
    fn new_fields_are_validated() {
        for p in [
            SamplingParams {
                presence_penalty: 2.5,
                ..Default::default()
            },
            SamplingParams {
                frequency_penalty: f32::NAN,
                ..Default::default()
            },
            SamplingParams {
                logit_bias: vec![(1, 101.0)],
                ..Default::default()
            },
        ] {
            assert!(p.validate().is_err(), "{p:?}");
        }
        let p = SamplingParams {
            stop_token_ids: vec![10],
            ..Default::default()
        };
        assert!(p.check_tokens(10).unwrap_err().contains("stop_token_ids"));
        assert!(p.check_tokens(11).is_ok());
    }
}
