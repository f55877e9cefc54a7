//! The tokenizer rebuilt from GGUF metadata: GPT-2-style byte-level BPE (`tokenizer.ggml.model =
//! gpt2`) with the model's pre-tokenizer, special tokens, and the ChatML chat template.
//!
//! Pre-tokenizers (`tokenizer.ggml.pre`), as llama.cpp applies them:
//! - `smollm`: every number character (`\p{N}`) on its own, then the GPT-2 regex on the rest;
//! - `gpt2` / `default`: the GPT-2 regex alone.
//!
//! The GPT-2 regex is `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`;
//! the `regex` crate has no look-ahead, so a whitespace run followed by a non-space gives back
//! its last character (which then starts the next piece), exactly what `\s+(?!\S)` does.

use std::collections::HashMap;

use anyhow::{Context, bail};
use regex::Regex;

use crate::model::gguf::{Gguf, Value};

/// ggml token types.
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// A chat message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_owned(),
            content: content.to_owned(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pre {
    Gpt2,
    SmolLm,
}

/// A byte-level BPE tokenizer.
pub struct Tokenizer {
    tokens: Vec<String>,
    types: Vec<i64>,
    ids: HashMap<String, u32>,
    /// (left, right) → (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Special tokens matched in text, longest first.
    special: Vec<(String, u32)>,
    byte_ids: [Option<u32>; 256],
    byte_decoder: HashMap<char, u8>,
    pre: Pre,
    regex: Regex,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    /// Tokens that end generation (the EOS id, and `<|im_end|>` / `<|endoftext|>` / EOT when the
    /// vocabulary has them).
    pub stop_ids: Vec<u32>,
    chat_template: Option<String>,
}

/// GPT-2's map from bytes to printable characters.
fn bytes_to_unicode() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        out[b as usize] = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).expect("valid char")
        };
    }
    out
}

impl Tokenizer {
    /// Build the tokenizer from a GGUF file's metadata; errors name the file and key.
    pub fn from_gguf(g: &Gguf) -> anyhow::Result<Self> {
        let path = g.path.display();
        let key = |k: &str| {
            g.get(k)
                .with_context(|| format!("{path}: metadata key {k} is missing"))
        };
        let model = key("tokenizer.ggml.model")?.as_str().unwrap_or_default();
        if model != "gpt2" {
            bail!(
                "{path}: tokenizer.ggml.model {model:?} is not supported (gpt2, byte-level BPE, is)"
            );
        }
        let pre = match g.get("tokenizer.ggml.pre").and_then(Value::as_str) {
            Some("smollm") => Pre::SmolLm,
            None | Some("gpt2" | "default") => Pre::Gpt2,
            Some(other) => bail!(
                "{path}: tokenizer.ggml.pre {other:?} is not supported (smollm, gpt2 and default are)"
            ),
        };
        let strings = |k: &str| -> anyhow::Result<Vec<String>> {
            key(k)?
                .as_array()
                .with_context(|| format!("{path}: metadata key {k} is not an array"))?
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .with_context(|| format!("{path}: metadata key {k} holds a non-string"))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .as_array()
                .with_context(|| format!("{path}: tokenizer.ggml.token_type is not an array"))?
                .iter()
                .map(|v| match *v {
                    Value::I32(x) => i64::from(x),
                    ref other => other.as_u64().map_or(1, |x| x as i64),
                })
                .collect(),
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            bail!(
                "{path}: tokenizer.ggml.token_type has {} entries for {} tokens",
                types.len(),
                tokens.len()
            );
        }
        let id_key =
            |k: &str| -> Option<u32> { g.get(k).and_then(Value::as_u64).map(|v| v as u32) };
        let template = g
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(str::to_owned);
        Self::new(
            tokens,
            types,
            &merges,
            pre == Pre::SmolLm,
            id_key("tokenizer.ggml.bos_token_id"),
            id_key("tokenizer.ggml.eos_token_id"),
            id_key("tokenizer.ggml.eot_token_id"),
            g.get("tokenizer.ggml.add_bos_token")
                .is_some_and(|v| *v == Value::Bool(true)),
            template,
        )
        .with_context(|| format!("{path}: building the tokenizer"))
    }

    /// Build from parts (tests build tiny vocabularies this way).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tokens: Vec<String>,
        types: Vec<i64>,
        merges: &[String],
        split_digits: bool,
        bos: Option<u32>,
        eos: Option<u32>,
        eot: Option<u32>,
        add_bos: bool,
        chat_template: Option<String>,
    ) -> anyhow::Result<Self> {
        let ids: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            let Some((a, b)) = m.split_once(' ') else {
                bail!("merge #{rank} {m:?} has no space");
            };
            if let (Some(&ia), Some(&ib), Some(&im)) =
                (ids.get(a), ids.get(b), ids.get(&format!("{a}{b}")))
            {
                merge_map.entry((ia, ib)).or_insert((rank as u32, im));
            }
        }
        let enc = bytes_to_unicode();
        let mut byte_ids = [None; 256];
        for (b, c) in enc.iter().enumerate() {
            byte_ids[b] = ids.get(&c.to_string()).copied();
        }
        let byte_decoder = enc.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        let mut special: Vec<(String, u32)> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (t, ty))| {
                (**ty == TYPE_CONTROL || **ty == TYPE_USER_DEFINED) && !t.is_empty()
            })
            .map(|(i, (t, _))| (t.clone(), i as u32))
            .collect();
        special.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        let mut stop_ids: Vec<u32> = eos.into_iter().chain(eot).collect();
        for name in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>"] {
            if let Some(&id) = ids.get(name)
                && !stop_ids.contains(&id)
            {
                stop_ids.push(id);
            }
        }
        let regex = Regex::new(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+")
            .expect("valid regex");
        Ok(Self {
            tokens,
            types,
            ids,
            merges: merge_map,
            special,
            byte_ids,
            byte_decoder,
            pre: if split_digits { Pre::SmolLm } else { Pre::Gpt2 },
            regex,
            bos,
            eos,
            add_bos,
            stop_ids,
            chat_template,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The id of a token's text, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    /// A token's text as stored (byte-level encoded).
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Tokenize `text`. With `parse_special`, special tokens written in the text (such as
    /// `<|im_start|>`) become their ids; otherwise they are tokenized as plain text. A BOS token
    /// is prepended when the model asks for one (`tokenizer.ggml.add_bos_token`).
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if self.add_bos
            && let Some(b) = self.bos
        {
            out.push(b);
        }
        let mut rest = text;
        while !rest.is_empty() {
            let found = if parse_special {
                self.special
                    .iter()
                    .filter_map(|(s, id)| rest.find(s.as_str()).map(|at| (at, s.len(), *id)))
                    .min_by_key(|&(at, len, _)| (at, std::cmp::Reverse(len)))
            } else {
                None
            };
            match found {
                Some((at, len, id)) => {
                    self.encode_plain(&rest[..at], &mut out);
                    out.push(id);
                    rest = &rest[at + len..];
                }
                None => {
                    self.encode_plain(rest, &mut out);
                    break;
                }
            }
        }
        out
    }

    /// The pre-tokenizer's pieces of plain text (exposed for tests).
    pub fn pre_tokenize<'a>(&self, text: &'a str) -> Vec<&'a str> {
        let mut pieces = Vec::new();
        match self.pre {
            Pre::Gpt2 => self.gpt2_split(text, &mut pieces),
            Pre::SmolLm => {
                let mut seg_start = 0;
                for (i, c) in text.char_indices() {
                    if c.is_numeric() {
                        self.gpt2_split(&text[seg_start..i], &mut pieces);
                        pieces.push(&text[i..i + c.len_utf8()]);
                        seg_start = i + c.len_utf8();
                    }
                }
                self.gpt2_split(&text[seg_start..], &mut pieces);
            }
        }
        pieces
    }

    fn gpt2_split<'a>(&self, text: &'a str, out: &mut Vec<&'a str>) {
        let mut pos = 0;
        while pos < text.len() {
            let Some(m) = self.regex.find_at(text, pos) else {
                out.push(&text[pos..]);
                break;
            };
            if m.start() > pos {
                // Unmatched text (cannot happen with this regex, kept for safety).
                out.push(&text[pos..m.start()]);
            }
            let mut end = m.end();
            let s = m.as_str();
            if end < text.len() && s.chars().all(char::is_whitespace) && s.chars().count() > 1 {
                // `\s+(?!\S)`: leave the last whitespace character to the next piece.
                let last = s.chars().next_back().expect("non-empty").len_utf8();
                end -= last;
            }
            out.push(&text[m.start()..end]);
            pos = end;
        }
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        for piece in self.pre_tokenize(text) {
            self.bpe(piece, out);
        }
    }

    fn bpe(&self, piece: &str, out: &mut Vec<u32>) {
        let mut syms: Vec<u32> = piece
            .bytes()
            .filter_map(|b| self.byte_ids[b as usize])
            .collect();
        while syms.len() > 1 {
            let best = syms
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| self.merges.get(&(w[0], w[1])).map(|&(r, m)| (r, i, m)))
                .min();
            let Some((_, i, merged)) = best else { break };
            syms[i] = merged;
            syms.remove(i + 1);
        }
        out.extend(syms);
    }

    /// The bytes `ids` stand for. Control tokens (such as `<|im_end|>`) are left out when
    /// `skip_special`.
    pub fn decode_bytes(&self, ids: &[u32], skip_special: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            let Some(t) = self.tokens.get(id as usize) else {
                continue;
            };
            match self.types[id as usize] {
                TYPE_CONTROL if skip_special => {}
                TYPE_CONTROL | TYPE_USER_DEFINED => out.extend(t.as_bytes()),
                _ => {
                    for c in t.chars() {
                        match self.byte_decoder.get(&c) {
                            Some(&b) => out.push(b),
                            None => out.extend(c.to_string().as_bytes()),
                        }
                    }
                }
            }
        }
        out
    }

    /// The text `ids` stand for (invalid UTF-8 replaced).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids, skip_special)).into_owned()
    }

    /// Whether generation ends at this token.
    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }

    /// The default system prompt the model's template inserts when the conversation has none
    /// (SmolLM2's template does), if any.
    pub fn default_system_prompt(&self) -> Option<String> {
        let t = self.chat_template.as_deref()?;
        let at = t.find("<|im_start|>system")? + "<|im_start|>system".len();
        let rest = &t[at..];
        let rest = rest
            .strip_prefix("\\n")
            .or_else(|| rest.strip_prefix('\n'))?;
        let end = rest.find("<|im_end|>")?;
        let s = &rest[..end];
        // Only a literal string, not template code.
        (!s.contains("{{") && !s.contains('\'')).then(|| s.to_owned())
    }

    /// The ChatML prompt for `messages`: `<|im_start|>ROLE\nCONTENT<|im_end|>\n` per message,
    /// then `<|im_start|>assistant\n` when `add_generation_prompt`. Like llama.cpp's built-in
    /// ChatML formatter, no system message is added when the conversation has none (SmolLM2's
    /// Jinja template would add [`Tokenizer::default_system_prompt`]; with it the 135M model
    /// answers the France question worse, in llama.cpp too).
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> anyhow::Result<String> {
        if self.token_id("<|im_start|>").is_none() || self.token_id("<|im_end|>").is_none() {
            bail!(
                "the model has no ChatML tokens (<|im_start|>, <|im_end|>); only ChatML chat templates are supported"
            );
        }
        let mut s = String::new();
        for m in messages {
            s.push_str(&format!(
                "<|im_start|>{}\n{}<|im_end|>\n",
                m.role, m.content
            ));
        }
        if add_generation_prompt {
            s.push_str("<|im_start|>assistant\n");
        }
        Ok(s)
    }
}
