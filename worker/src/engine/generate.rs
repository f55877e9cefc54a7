//! Generating text for one sequence: prefill the prompt in one batched forward pass, then decode
//! token by token with the sampler, stopping at an end-of-sequence token, a stop sequence, the
//! token limit or the KV-cache budget. Text is streamed as it becomes final (never a partial
//! UTF-8 character, never the start of a stop sequence that may still complete).

use std::time::{Duration, Instant};

use anyhow::Context;

use super::Engine;
use super::detok::TextStream;
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
        params
            .sampling
            .check_tokens(self.model.config.vocab)
            .map_err(|e| anyhow::anyhow!("invalid sampling parameters: {e}"))?;
        let mut cache = self.model.new_cache(params.kv_budget_bytes)?;
        cache
            .check_room(prompt.len())
            .context("the prompt does not fit in the KV cache")?;
        let mut sampler = Sampler::new(params.sampling.clone());
        crate::engine::detok::check_stops(&params.stop)
            .map_err(|e| anyhow::anyhow!("invalid stop sequences: {e}"))?;
        let mut stream = TextStream::new(&params.stop);
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
            if (!params.ignore_eos && self.tokenizer.is_stop(next))
                || params.sampling.stop_token_ids.contains(&next)
            {
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
