//! Generating text for one sequence: prefill the prompt in one batched forward pass, then decode
//! token by token with the sampler, stopping at an end-of-sequence token, a stop sequence, the
//! token limit or the KV-cache budget. Text is streamed as it becomes final (never a partial
//! UTF-8 character, never the start of a stop sequence that may still complete).

use std::time::{Duration, Instant};

use anyhow::Context;

use super::Engine;
use super::sampling::{Sampler, SamplingParams};
use crate::model::llama::Logits;

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends before the first occurrence of any of these (not included in the text).
    pub stop: Vec<String>,
    /// Memory budget of this sequence's KV cache, in bytes.
    pub kv_budget_bytes: usize,
    /// Keep generating past end-of-sequence tokens (benchmarks: a fixed number of tokens).
    pub ignore_eos: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            kv_budget_bytes: 512 << 20,
            ignore_eos: false,
        }
    }
}

/// Why generation ended (OpenAI's `finish_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop sequence.
    Stop,
    /// `max_tokens`, or the KV-cache budget / context length.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Token counts (OpenAI's `usage`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

impl Usage {
    pub fn total_tokens(&self) -> usize {
        self.prompt_tokens + self.completion_tokens
    }
}

/// The result of a generation.
#[derive(Clone, Debug)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    /// Time of the prompt's forward pass.
    pub prefill: Duration,
    /// Time of the decode forward passes, and how many there were.
    pub decode: Duration,
    pub decode_steps: usize,
}

impl Generation {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.usage.prompt_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }

    pub fn decode_tokens_per_s(&self) -> f64 {
        self.decode_steps as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// Incremental detokenisation with stop sequences.
struct TextStream<'a> {
    stop: &'a [String],
    bytes: Vec<u8>,
    emitted: usize,
}

impl TextStream<'_> {
    /// The longest valid UTF-8 prefix of the bytes so far.
    fn text(&self) -> std::borrow::Cow<'_, str> {
        match std::str::from_utf8(&self.bytes) {
            Ok(s) => s.into(),
            Err(e) if e.error_len().is_none() => {
                std::str::from_utf8(&self.bytes[..e.valid_up_to()])
                    .expect("valid prefix")
                    .into()
            }
            Err(_) => String::from_utf8_lossy(&self.bytes),
        }
    }

    /// Add bytes; returns the final text if a stop sequence completed, and calls `emit` with
    /// text that can no longer change.
    fn push(&mut self, b: &[u8], emit: &mut impl FnMut(&str)) -> Option<String> {
        self.bytes.extend_from_slice(b);
        let text = self.text().into_owned();
        if let Some(at) = self
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            if at > self.emitted {
                emit(&text[self.emitted..at]);
            }
            self.emitted = self.emitted.max(at);
            return Some(text[..at].to_owned());
        }
        // Hold back a suffix that could be the start of a stop sequence.
        let mut safe = text.len();
        for s in self.stop.iter().filter(|s| !s.is_empty()) {
            for (i, _) in s.char_indices().skip(1) {
                if text.ends_with(&s[..i]) {
                    safe = safe.min(text.len() - i);
                }
            }
        }
        if safe > self.emitted {
            emit(&text[self.emitted..safe]);
            self.emitted = safe;
        }
        None
    }

    fn finish(&mut self, emit: &mut impl FnMut(&str)) -> String {
        let text = String::from_utf8_lossy(&self.bytes).into_owned();
        if text.len() > self.emitted {
            emit(&text[self.emitted..]);
        }
        text
    }
}

impl Engine {
    /// Tokenize a chat conversation with the model's ChatML template, ready for the
    /// assistant's answer.
    pub fn chat_prompt(&self, messages: &[crate::tokenizer::Message]) -> anyhow::Result<Vec<u32>> {
        let text = self.tokenizer.apply_chat_template(messages, true)?;
        Ok(self.tokenizer.encode(&text, true))
    }

    /// Generate a continuation of `prompt` (token ids), calling `on_text` with each piece of
    /// final text as it is produced.
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        mut on_text: impl FnMut(&str),
    ) -> anyhow::Result<Generation> {
        anyhow::ensure!(!prompt.is_empty(), "the prompt has no tokens");
        params
            .sampling
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid sampling parameters: {e}"))?;
        let mut cache = self.model.new_cache(params.kv_budget_bytes)?;
        cache
            .check_room(prompt.len())
            .context("the prompt does not fit in the KV cache")?;
        let mut sampler = Sampler::new(params.sampling.clone());
        let mut stream = TextStream {
            stop: &params.stop,
            bytes: Vec::new(),
            emitted: 0,
        };
        let mut tokens = Vec::new();
        let t0 = Instant::now();
        let mut logits = self.model.forward(
            &self.pool,
            self.collective.as_ref(),
            &mut cache,
            prompt,
            Logits::Last,
        )?;
        let prefill = t0.elapsed();
        let mut decode = Duration::ZERO;
        let mut decode_steps = 0;
        let mut finish = FinishReason::Length;
        let mut final_text = None;
        while tokens.len() < params.max_tokens {
            let next = sampler.sample(&logits);
            if !params.ignore_eos && self.tokenizer.is_stop(next) {
                finish = FinishReason::Stop;
                break;
            }
            tokens.push(next);
            let piece = self.tokenizer.decode_bytes(&[next], true);
            if let Some(t) = stream.push(&piece, &mut on_text) {
                final_text = Some(t);
                finish = FinishReason::Stop;
                break;
            }
            if tokens.len() >= params.max_tokens || cache.check_room(1).is_err() {
                break;
            }
            let t = Instant::now();
            logits = self.model.forward(
                &self.pool,
                self.collective.as_ref(),
                &mut cache,
                &[next],
                Logits::Last,
            )?;
            decode += t.elapsed();
            decode_steps += 1;
        }
        let text = match final_text {
            Some(t) => t,
            None => stream.finish(&mut on_text),
        };
        Ok(Generation {
            text,
            usage: Usage {
                prompt_tokens: prompt.len(),
                completion_tokens: tokens.len(),
            },
            tokens,
            finish_reason: finish,
            prefill,
            decode,
            decode_steps,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stop: &[&str], pieces: &[&str]) -> (Vec<String>, Option<String>) {
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        let mut s = TextStream {
            stop: &stop,
            bytes: Vec::new(),
            emitted: 0,
        };
        let mut out = Vec::new();
        for p in pieces {
            if let Some(t) = s.push(p.as_bytes(), &mut |x: &str| out.push(x.to_owned())) {
                return (out, Some(t));
            }
        }
        let t = s.finish(&mut |x: &str| out.push(x.to_owned()));
        (out, Some(t))
    }

    #[test]
    fn stop_sequence_cuts_and_is_never_streamed() {
        let (out, text) = run(&["\n\nUser"], &["Hello", "\n", "\nUs", "er: hi"]);
        assert_eq!(text.as_deref(), Some("Hello"));
        assert_eq!(out.concat(), "Hello");
    }

    #[test]
    fn held_back_text_is_released_when_the_stop_does_not_complete() {
        let (out, text) = run(&["END"], &["a E", "N", "x"]);
        assert_eq!(text.as_deref(), Some("a ENx"));
        assert_eq!(out.concat(), "a ENx");
    }

    #[test]
    fn partial_utf8_is_not_emitted() {
        let bytes = "é".as_bytes();
        let stop: Vec<String> = Vec::new();
        let mut s = TextStream {
            stop: &stop,
            bytes: Vec::new(),
            emitted: 0,
        };
        let mut out = Vec::new();
        s.push(&bytes[..1], &mut |x: &str| out.push(x.to_owned()));
        assert!(out.is_empty());
        s.push(&bytes[1..], &mut |x: &str| out.push(x.to_owned()));
        assert_eq!(out.concat(), "é");
    }
}
