//! Calibration of the cost model from measurements: per (GPU type, TP, PP, engine), the ratio of
//! measured to predicted decode tokens/s and time to first token, kept as a bounded window of
//! samples whose median corrects later predictions.
//!
//! Robust by construction: a correction applies only with at least [`MIN_SAMPLES`] samples,
//! each sample is clamped to [`MIN_RATIO`, `MAX_RATIO`] (a broken scrape cannot make a layout
//! look 100 times faster), and the median of the last [`WINDOW`] samples ignores a single
//! outlier and smooths noise. The planner multiplies a layout's predicted decode and prefill
//! rates by the correction (and divides the time to first token), so a layout the fleet measures
//! 30% slower than predicted loses to the next one when that one is within 30%.
//!
//! Plain data: `plan --calibration FILE` reads it (YAML or JSON, as written by [`Calibration`]'s
//! serde form), and the planner takes it through [`super::cost::CostConstants::calibration`].

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::cost::Estimate;

/// Samples kept per layout.
pub const WINDOW: usize = 16;
/// Samples needed before a correction applies.
pub const MIN_SAMPLES: usize = 3;
/// Bounds of one sample's measured / predicted ratio.
pub const MIN_RATIO: f64 = 0.25;
pub const MAX_RATIO: f64 = 4.0;

/// Which layout a measurement belongs to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayoutKey {
    /// The catalog's short name of the GPU type (`H100`).
    pub gpu_type: String,
    pub tensor_parallel: u32,
    pub pipeline_parallel: u32,
    /// `tessera`, `vllm` or `sglang`.
    pub engine: String,
}

/// The samples of one layout.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayoutSamples {
    #[serde(flatten)]
    pub key: LayoutKey,
    /// Measured / predicted decode tokens/s, oldest first.
    #[serde(default)]
    pub decode_ratios: VecDeque<f64>,
    /// Predicted / measured time to first token (above 1: faster than predicted), oldest first.
    #[serde(default)]
    pub prefill_ratios: VecDeque<f64>,
    /// Predicted / measured time of one tensor-parallel all-reduce of the mean payload.
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    pub allreduce_ratios: VecDeque<f64>,
}

impl Default for LayoutKey {
    fn default() -> Self {
        LayoutKey {
            gpu_type: String::new(),
            tensor_parallel: 1,
            pipeline_parallel: 1,
            engine: "tessera".into(),
        }
    }
}

/// One measurement of a ready replica against what was predicted for it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measurement {
    pub predicted_decode_tokens_per_second: f64,
    pub measured_decode_tokens_per_second: Option<f64>,
    pub predicted_time_to_first_token_seconds: f64,
    pub measured_time_to_first_token_seconds: Option<f64>,
    /// One all-reduce of the interval's mean payload: predicted and measured seconds.
    pub predicted_allreduce_seconds: f64,
    pub measured_allreduce_seconds: Option<f64>,
}

/// Corrections for every measured layout.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Calibration {
    #[serde(default)]
    pub layouts: Vec<LayoutSamples>,
}

fn median(v: &VecDeque<f64>) -> Option<f64> {
    if v.len() < MIN_SAMPLES {
        return None;
    }
    let mut s: Vec<f64> = v.iter().copied().collect();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

fn push(window: &mut VecDeque<f64>, ratio: f64) {
    if !ratio.is_finite() || ratio <= 0.0 {
        return;
    }
    window.push_back(ratio.clamp(MIN_RATIO, MAX_RATIO));
    while window.len() > WINDOW {
        window.pop_front();
    }
}

impl Calibration {
    pub fn is_empty(&self) -> bool {
        self.layouts.is_empty()
    }

    /// The samples of `key`, inserted in key order when new.
    fn entry(&mut self, key: &LayoutKey) -> &mut LayoutSamples {
        // Linear: a file someone edited need not be sorted (and layouts are few).
        let at = match self.layouts.iter().position(|l| &l.key == key) {
            Some(i) => i,
            None => {
                let i = self.layouts.partition_point(|l| l.key < *key);
                self.layouts.insert(
                    i,
                    LayoutSamples {
                        key: key.clone(),
                        ..LayoutSamples::default()
                    },
                );
                i
            }
        };
        &mut self.layouts[at]
    }

    /// Add one measurement of `key` (missing or non-positive values are ignored).
    pub fn observe(&mut self, key: &LayoutKey, m: Measurement) {
        let e = self.entry(key);
        if let Some(d) = m.measured_decode_tokens_per_second
            && m.predicted_decode_tokens_per_second > 0.0
        {
            push(
                &mut e.decode_ratios,
                d / m.predicted_decode_tokens_per_second,
            );
        }
        if let Some(t) = m.measured_time_to_first_token_seconds
            && t > 0.0
        {
            push(
                &mut e.prefill_ratios,
                m.predicted_time_to_first_token_seconds / t,
            );
        }
        if let Some(t) = m.measured_allreduce_seconds
            && t > 0.0
            && m.predicted_allreduce_seconds > 0.0
        {
            push(&mut e.allreduce_ratios, m.predicted_allreduce_seconds / t);
        }
    }

    /// The all-reduce correction of `key`: measured speed over predicted (1.0 with too few
    /// samples). The planner scales the TP link of that layout by it.
    pub fn allreduce(&self, key: &LayoutKey) -> f64 {
        self.measured_allreduce(key).unwrap_or(1.0)
    }

    /// The measured all-reduce ratio of `key`, where there are enough samples.
    pub fn measured_allreduce(&self, key: &LayoutKey) -> Option<f64> {
        self.layouts
            .iter()
            .find(|l| &l.key == key)
            .and_then(|l| median(&l.allreduce_ratios))
    }

    /// The decode and prefill corrections of `key` (1.0 where there are too few samples).
    pub fn correction(&self, key: &LayoutKey) -> (f64, f64) {
        self.layouts
            .iter()
            .find(|l| &l.key == key)
            .map_or((1.0, 1.0), |l| {
                (
                    median(&l.decode_ratios).unwrap_or(1.0),
                    median(&l.prefill_ratios).unwrap_or(1.0),
                )
            })
    }

    /// The measured decode and prefill ratios of `key`, where there are enough samples.
    pub fn measured(&self, key: &LayoutKey) -> (Option<f64>, Option<f64>) {
        self.layouts
            .iter()
            .find(|l| &l.key == key)
            .map_or((None, None), |l| {
                (median(&l.decode_ratios), median(&l.prefill_ratios))
            })
    }

    /// `e` corrected for `key`.
    pub fn apply(&self, key: &LayoutKey, mut e: Estimate) -> Estimate {
        let (decode, prefill) = self.correction(key);
        e.decode_tokens_per_second *= decode;
        e.prefill_tokens_per_second *= prefill;
        e.time_to_first_token_seconds /= prefill;
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> LayoutKey {
        LayoutKey {
            gpu_type: "H100".into(),
            tensor_parallel: 4,
            pipeline_parallel: 1,
            engine: "vllm".into(),
        }
    }

    fn m(decode: f64) -> Measurement {
        Measurement {
            predicted_decode_tokens_per_second: 1000.0,
            measured_decode_tokens_per_second: Some(decode),
            predicted_time_to_first_token_seconds: 0.1,
            measured_time_to_first_token_seconds: Some(0.2),
            predicted_allreduce_seconds: 0.001,
            measured_allreduce_seconds: Some(0.004),
        }
    }

    #[test]
    fn a_correction_needs_samples_ignores_an_outlier_and_is_bounded() {
        let mut c = Calibration::default();
        c.observe(&key(), m(700.0));
        c.observe(&key(), m(700.0));
        assert_eq!(
            c.correction(&key()),
            (1.0, 1.0),
            "two samples are not enough"
        );
        c.observe(&key(), m(700.0));
        let (d, p) = c.correction(&key());
        assert!((d - 0.7).abs() < 1e-9 && (p - 0.5).abs() < 1e-9, "{d} {p}");
        assert!((c.allreduce(&key()) - 0.25).abs() < 1e-9);
        // One wild sample (a scrape during a restart) does not move the median.
        c.observe(&key(), m(5.0));
        assert!((c.correction(&key()).0 - 0.7).abs() < 1e-9);
        // Every sample is bounded.
        let mut wild = Calibration::default();
        for _ in 0..5 {
            wild.observe(&key(), m(1e9));
        }
        assert_eq!(wild.correction(&key()).0, MAX_RATIO);
        // The window forgets old samples: 16 new ones at 0.9 replace the old 0.7s.
        for _ in 0..WINDOW {
            c.observe(&key(), m(900.0));
        }
        assert!((c.correction(&key()).0 - 0.9).abs() < 1e-9);
        assert_eq!(c.layouts[0].decode_ratios.len(), WINDOW);
        // Other layouts are untouched.
        let other = LayoutKey {
            tensor_parallel: 8,
            ..key()
        };
        assert_eq!(c.correction(&other), (1.0, 1.0));
    }

    #[test]
    fn it_round_trips_through_yaml() {
        let mut c = Calibration::default();
        for _ in 0..3 {
            c.observe(&key(), m(800.0));
        }
        let text = serde_yaml_ng::to_string(&c).expect("yaml");
        assert!(text.contains("gpuType: H100"), "{text}");
        let back: Calibration = serde_yaml_ng::from_str(&text).expect("parse");
        assert_eq!(back, c);
    }
}
