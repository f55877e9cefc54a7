//! The tokenizer rebuilt from GGUF metadata, as llama.cpp builds it: GPT-2-style byte-level BPE
//! (`tokenizer.ggml.model = gpt2`) with the model's pre-tokenizer, or SentencePiece-style
//! (`llama`: Llama 2, Mistral, TinyLlama); special tokens; the ChatML and Llama 3 chat formats.
//!
//! Byte-level BPE pre-tokenizers (`tokenizer.ggml.pre`), as llama.cpp applies them:
//! - `smollm`: every number character (`\p{N}`) on its own, then the GPT-2 regex on the rest;
//! - `gpt2` / `gpt-2` / `default`: the GPT-2 regex alone;
//! - `llama-bpe` / `llama3` / `llama-v3` (Llama 3):
//!   `'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD]|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
//!   ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`, and a piece that is a whole token is
//!   kept whole without merging (llama.cpp's `ignore_merges`).
//!
//! The GPT-2 regex is `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`;
//! the `regex` crate has no look-ahead, so a whitespace run followed by a non-space gives back
//! its last character (which then starts the next piece), exactly what `\s+(?!\S)` does. In the
//! Llama 3 regex a run holding a line break was matched by `\s*[\r\n]+` before and keeps it.
//!
//! SentencePiece (llama.cpp's `llm_tokenizer_spm`): a space is put before text at the start or
//! after a special token (`tokenizer.ggml.add_space_prefix`, default on), spaces become `▁`, the
//! text splits into characters and the adjacent pair whose concatenation is the vocabulary's
//! highest-scoring token (`tokenizer.ggml.scores`; the leftmost on a tie) merges until none is a
//! token; a character that is no token becomes its UTF-8 bytes' `<0xXX>` tokens.
//!
//! `tests/tokenizer_vocab.rs` checks all three kinds against llama.cpp's own test vocabularies
//! (Llama 2 SentencePiece, Llama 3 BPE, GPT-2) and the ids their original tokenizers give.

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

/// The chat formats built in (see [`Tokenizer::apply_chat_template`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChatFormat {
    ChatMl,
    Llama3,
}

/// A byte-level BPE pre-tokenizer (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pre {
    Gpt2,
    SmolLm,
    Llama3,
}

/// How plain text becomes tokens.
enum Algo {
    /// Byte-level BPE.
    Bpe {
        /// (left, right) → (rank, merged id).
        merges: HashMap<(u32, u32), (u32, u32)>,
        byte_ids: [Option<u32>; 256],
        byte_encoder: Box<[char; 256]>,
        byte_decoder: HashMap<char, u8>,
        pre: Pre,
        regex: Regex,
    },
    /// SentencePiece-style: merges by token score, byte fallback.
    Spm {
        scores: Vec<f32>,
        /// The `<0xXX>` token of each byte.
        byte_ids: [Option<u32>; 256],
        unk: Option<u32>,
        add_space_prefix: bool,
    },
}

/// ggml token types beyond control and user-defined.
const TYPE_UNKNOWN: i64 = 2;
const TYPE_UNUSED: i64 = 5;
const TYPE_BYTE: i64 = 6;

/// A tokenizer: byte-level BPE or SentencePiece-style (see the module docs).
pub struct Tokenizer {
    tokens: Vec<String>,
    types: Vec<i64>,
    ids: HashMap<String, u32>,
    /// Special tokens matched in text (leftmost, then longest), and their ids by pattern.
    special: Option<aho_corasick::AhoCorasick>,
    special_ids: Vec<u32>,
    algo: Algo,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    /// Tokens that end generation (the EOS id, and `<|im_end|>` / `<|endoftext|>` / EOT when the
    /// vocabulary has them).
    pub stop_ids: Vec<u32>,
    chat_template: Option<String>,
}

/// Token ids by text.
fn index(tokens: &[String]) -> HashMap<String, u32> {
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect()
}

/// The byte of a SentencePiece byte token, `<0xXX>`.
fn byte_token(t: &str) -> Option<u8> {
    let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

/// A candidate SentencePiece merge: the symbol `left` with its successor, `len` bytes together,
/// whose concatenation is a token of `score`. The heap yields the highest score first, then the
/// leftmost (llama.cpp's order).
struct Bigram {
    score: f32,
    left: usize,
    len: usize,
}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Bigram {}

/// Split `text` into the regex's matches, emulating a trailing `\s+(?!\S)` (see the module
/// docs): a run of two or more whitespace characters that stops before a non-space gives its
/// last character to the next piece, unless it holds a line break and `line_breaks_first` (the
/// regex matched such a run with `\s*[\r\n]+` before reaching `\s+(?!\S)`).
fn regex_split<'a>(regex: &Regex, line_breaks_first: bool, text: &'a str, out: &mut Vec<&'a str>) {
    let mut pos = 0;
    while pos < text.len() {
        let Some(m) = regex.find_at(text, pos) else {
            out.push(&text[pos..]);
            break;
        };
        if m.start() > pos {
            // Unmatched text (cannot happen with these regexes, kept for safety).
            out.push(&text[pos..m.start()]);
        }
        let mut end = m.end();
        let s = m.as_str();
        if end < text.len()
            && s.chars().all(char::is_whitespace)
            && !(line_breaks_first && s.contains(['\r', '\n']))
            && s.chars().count() > 1
        {
            let last = s.chars().next_back().expect("non-empty").len_utf8();
            end -= last;
        }
        out.push(&text[m.start()..end]);
        pos = end;
    }
}

/// A symbol of a byte that has no token: never merges, never output.
const NO_TOKEN: u32 = u32::MAX;

/// Byte-level BPE merging of one piece's symbols: the adjacent pair with the lowest merge rank
/// merges (the leftmost on a tie), again and again, until no adjacent pair has a merge.
/// [`NO_TOKEN`] symbols take part as barriers and are left out of `out`.
///
/// A heap of candidate pairs over a linked list of symbols makes this O(n log n) in the piece's
/// length (a piece can be a whole 1 MB "word"); rescanning every pair after each merge was
/// O(n²). A heap entry is checked against the current symbols when it is popped: it is stale if
/// either side has changed since it was pushed.
fn bpe_merge(merges: &HashMap<(u32, u32), (u32, u32)>, mut ids: Vec<u32>, out: &mut Vec<u32>) {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    const NONE: usize = usize::MAX;
    let n = ids.len();
    if n < 2 {
        out.extend(ids.into_iter().filter(|&id| id != NO_TOKEN));
        return;
    }
    let mut next: Vec<usize> = (1..n).chain([NONE]).collect();
    let mut prev: Vec<usize> = [NONE].into_iter().chain(0..n - 1).collect();
    let mut alive = vec![true; n];
    // (rank, left position, left id, right id); positions keep their order, so the smallest
    // entry is the leftmost pair of the lowest rank.
    let mut heap: BinaryHeap<Reverse<(u32, usize, u32, u32)>> = BinaryHeap::new();
    let candidate = |heap: &mut BinaryHeap<_>, ids: &[u32], l: usize, r: usize| {
        if let Some(&(rank, _)) = merges.get(&(ids[l], ids[r])) {
            heap.push(Reverse((rank, l, ids[l], ids[r])));
        }
    };
    for l in 0..n - 1 {
        candidate(&mut heap, &ids, l, l + 1);
    }
    while let Some(Reverse((_, l, left, right))) = heap.pop() {
        let r = next[l];
        if !alive[l] || r == NONE || ids[l] != left || ids[r] != right {
            continue;
        }
        ids[l] = merges[&(left, right)].1;
        alive[r] = false;
        next[l] = next[r];
        if next[l] != NONE {
            prev[next[l]] = l;
        }
        if prev[l] != NONE {
            candidate(&mut heap, &ids, prev[l], l);
        }
        if next[l] != NONE {
            candidate(&mut heap, &ids, l, next[l]);
        }
    }
    let mut i = 0;
    while i != NONE {
        if ids[i] != NO_TOKEN {
            out.push(ids[i]);
        }
        i = next[i];
    }
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

/// What every tokenizer has besides its algorithm: the vocabulary and token types, the
/// `[bos, eos, eot]` ids, whether to add BOS, and the chat template.
struct Vocab {
    tokens: Vec<String>,
    types: Vec<i64>,
    specials: [Option<u32>; 3],
    add_bos: bool,
    chat_template: Option<String>,
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
        let spm = match model {
            "gpt2" => false,
            "llama" => true,
            other => bail!(
                "{path}: tokenizer.ggml.model {other:?} is not supported (gpt2, byte-level BPE, and llama, SentencePiece-style, are)"
            ),
        };
        let pre = match g.get("tokenizer.ggml.pre").and_then(Value::as_str) {
            _ if spm => Pre::Gpt2,
            Some("smollm") => Pre::SmolLm,
            Some("llama-bpe" | "llama3" | "llama-v3") => Pre::Llama3,
            None | Some("gpt2" | "gpt-2" | "default") => Pre::Gpt2,
            Some(other) => bail!(
                "{path}: tokenizer.ggml.pre {other:?} is not supported (smollm, llama-bpe, gpt2 and default are)"
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
        let merges = if spm {
            Vec::new()
        } else {
            strings("tokenizer.ggml.merges")?
        };
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
        let flag = |k: &str, default: bool| match g.get(k) {
            Some(Value::Bool(b)) => *b,
            _ => default,
        };
        // llama.cpp's defaults: SentencePiece vocabularies and Llama 3's add BOS, other
        // byte-level BPE ones do not; the key, when present, decides.
        let add_bos = flag("tokenizer.ggml.add_bos_token", spm || pre == Pre::Llama3);
        let (bos, eos, eot) = (
            id_key("tokenizer.ggml.bos_token_id"),
            id_key("tokenizer.ggml.eos_token_id"),
            id_key("tokenizer.ggml.eot_token_id"),
        );
        let vocab = Vocab {
            tokens,
            types,
            specials: [bos, eos, eot],
            add_bos,
            chat_template: template,
        };
        let built = if spm {
            let scores: Vec<f32> = key("tokenizer.ggml.scores")?
                .as_array()
                .with_context(|| format!("{path}: tokenizer.ggml.scores is not an array"))?
                .iter()
                .map(|v| match *v {
                    Value::F32(x) => Ok(x),
                    Value::F64(x) => Ok(x as f32),
                    _ => bail!("{path}: tokenizer.ggml.scores holds a non-number"),
                })
                .collect::<anyhow::Result<_>>()?;
            if scores.len() != vocab.tokens.len() {
                bail!(
                    "{path}: tokenizer.ggml.scores has {} entries for {} tokens",
                    scores.len(),
                    vocab.tokens.len()
                );
            }
            Self::new_spm(
                vocab,
                scores,
                flag("tokenizer.ggml.add_space_prefix", true),
                id_key("tokenizer.ggml.unknown_token_id"),
            )
        } else {
            Self::with_pre(vocab, &merges, pre)
        };
        built.with_context(|| format!("{path}: building the tokenizer"))
    }

    /// Build a byte-level BPE tokenizer from parts (tests build tiny vocabularies this way);
    /// `split_digits` selects the `smollm` pre-tokenizer, otherwise GPT-2's.
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
        let pre = if split_digits { Pre::SmolLm } else { Pre::Gpt2 };
        let vocab = Vocab {
            tokens,
            types,
            specials: [bos, eos, eot],
            add_bos,
            chat_template,
        };
        Self::with_pre(vocab, merges, pre)
    }

    /// A byte-level BPE tokenizer with pre-tokenizer `pre`.
    fn with_pre(vocab: Vocab, merges: &[String], pre: Pre) -> anyhow::Result<Self> {
        let ids = index(&vocab.tokens);
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
        let regex = match pre {
            Pre::Gpt2 | Pre::SmolLm => {
                r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+"
            }
            Pre::Llama3 => concat!(
                r"'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD]|[^\r\n\p{L}\p{N}]?\p{L}+|",
                r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+"
            ),
        };
        let algo = Algo::Bpe {
            merges: merge_map,
            byte_ids,
            byte_encoder: Box::new(enc),
            byte_decoder,
            pre,
            regex: Regex::new(regex).expect("valid regex"),
        };
        Ok(Self::assemble(vocab, ids, algo))
    }

    /// A SentencePiece-style tokenizer: `scores` per token, `<0xXX>` byte tokens.
    fn new_spm(
        vocab: Vocab,
        scores: Vec<f32>,
        add_space_prefix: bool,
        unk: Option<u32>,
    ) -> anyhow::Result<Self> {
        if scores.len() != vocab.tokens.len() {
            bail!("{} scores for {} tokens", scores.len(), vocab.tokens.len());
        }
        let ids = index(&vocab.tokens);
        let mut byte_ids = [None; 256];
        for (b, id) in byte_ids.iter_mut().enumerate() {
            *id = ids.get(&format!("<0x{b:02X}>")).copied();
        }
        let algo = Algo::Spm {
            scores,
            byte_ids,
            unk,
            add_space_prefix,
        };
        Ok(Self::assemble(vocab, ids, algo))
    }

    fn assemble(vocab: Vocab, ids: HashMap<String, u32>, algo: Algo) -> Self {
        let Vocab {
            tokens,
            types,
            specials: [bos, eos, eot],
            add_bos,
            chat_template,
        } = vocab;
        let special: Vec<(&str, u32)> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (t, ty))| {
                (**ty == TYPE_CONTROL || **ty == TYPE_USER_DEFINED) && !t.is_empty()
            })
            .map(|(i, (t, _))| (t.as_str(), i as u32))
            .collect();
        let special_ids = special.iter().map(|s| s.1).collect();
        // Leftmost-longest: at the earliest position, the longest special token (as the former
        // scan of every token did). Building fails only on absurd sizes; then no special token
        // is parsed rather than no tokenizer at all.
        let special_matcher = (!special.is_empty())
            .then(|| {
                aho_corasick::AhoCorasick::builder()
                    .match_kind(aho_corasick::MatchKind::LeftmostLongest)
                    .build(special.iter().map(|s| s.0))
                    .ok()
            })
            .flatten();
        let mut stop_ids: Vec<u32> = eos.into_iter().chain(eot).collect();
        for name in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>"] {
            if let Some(&id) = ids.get(name)
                && !stop_ids.contains(&id)
            {
                stop_ids.push(id);
            }
        }
        Self {
            tokens,
            types,
            ids,
            special: special_matcher,
            special_ids,
            algo,
            bos,
            eos,
            add_bos,
            stop_ids,
            chat_template,
        }
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
        // One pass over the text finds every special token (leftmost, then longest). Every
        // plain segment starts the text or follows a special token, so each gets
        // SentencePiece's space prefix (llama.cpp's `is_prev_special`).
        let mut plain_from = 0;
        if parse_special && let Some(ac) = &self.special {
            for m in ac.find_iter(text) {
                let plain = &text[plain_from..m.start()];
                if !plain.is_empty() {
                    self.encode_plain(plain, &mut out);
                }
                out.push(self.special_ids[m.pattern().as_usize()]);
                plain_from = m.end();
            }
        }
        let plain = &text[plain_from..];
        if !plain.is_empty() {
            self.encode_plain(plain, &mut out);
        }
        out
    }

    /// The pre-tokenizer's pieces of plain text (exposed for tests); SentencePiece-style
    /// tokenizers have no pre-tokenizer: the whole text is one piece.
    pub fn pre_tokenize<'a>(&self, text: &'a str) -> Vec<&'a str> {
        let mut pieces = Vec::new();
        let Algo::Bpe { pre, regex, .. } = &self.algo else {
            return vec![text];
        };
        match pre {
            Pre::Gpt2 => regex_split(regex, false, text, &mut pieces),
            Pre::Llama3 => regex_split(regex, true, text, &mut pieces),
            Pre::SmolLm => {
                let mut seg_start = 0;
                for (i, c) in text.char_indices() {
                    if c.is_numeric() {
                        regex_split(regex, false, &text[seg_start..i], &mut pieces);
                        pieces.push(&text[i..i + c.len_utf8()]);
                        seg_start = i + c.len_utf8();
                    }
                }
                regex_split(regex, false, &text[seg_start..], &mut pieces);
            }
        }
        pieces
    }

    /// Tokenize text that holds no special token and starts the text or follows one.
    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        match &self.algo {
            Algo::Bpe { .. } => {
                for piece in self.pre_tokenize(text) {
                    self.bpe(piece, out);
                }
            }
            Algo::Spm {
                add_space_prefix, ..
            } => {
                let prefix = if *add_space_prefix { " " } else { "" };
                let escaped = format!("{prefix}{text}").replace(' ', "\u{2581}");
                self.spm(&escaped, out);
            }
        }
    }

    fn bpe(&self, piece: &str, out: &mut Vec<u32>) {
        let Algo::Bpe {
            merges,
            byte_ids,
            byte_encoder,
            pre,
            ..
        } = &self.algo
        else {
            return;
        };
        if *pre == Pre::Llama3 {
            // `ignore_merges`: a piece that is a token stays whole.
            let encoded: String = piece.bytes().map(|b| byte_encoder[b as usize]).collect();
            if let Some(&id) = self.ids.get(&encoded) {
                out.push(id);
                return;
            }
        }
        // A byte without a token of its own (some vocabularies lack control bytes) stays a
        // symbol that never merges, so that its neighbours do not merge across it, and is left
        // out of the ids (as llama.cpp does).
        let syms: Vec<u32> = piece
            .bytes()
            .map(|b| byte_ids[b as usize].unwrap_or(NO_TOKEN))
            .collect();
        bpe_merge(merges, syms, out);
    }

    /// SentencePiece-style merging of `text` (spaces already `▁`), as llama.cpp's
    /// `llm_tokenizer_spm`: symbols start as characters; the adjacent pair whose concatenation
    /// is the highest-scoring token merges (the leftmost on a tie), again and again; a final
    /// symbol that is no token (a character outside the vocabulary: merged symbols always are
    /// tokens) becomes its bytes' `<0xXX>` tokens.
    fn spm(&self, text: &str, out: &mut Vec<u32>) {
        let Algo::Spm {
            scores,
            byte_ids,
            unk,
            ..
        } = &self.algo
        else {
            return;
        };
        // Symbol i: bytes start..start + len of `text`; a merged-away symbol has len 0.
        struct Sym {
            start: usize,
            len: usize,
            prev: Option<usize>,
            next: Option<usize>,
        }
        let mut syms: Vec<Sym> = text
            .char_indices()
            .enumerate()
            .map(|(i, (start, c))| Sym {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: Some(i + 1),
            })
            .collect();
        if let Some(last) = syms.last_mut() {
            last.next = None;
        }
        let mut queue = std::collections::BinaryHeap::new();
        let push = |queue: &mut std::collections::BinaryHeap<Bigram>, syms: &[Sym], l: usize| {
            let Some(r) = syms[l].next else { return };
            let len = syms[l].len + syms[r].len;
            let piece = &text[syms[l].start..syms[l].start + len];
            if let Some(&id) = self.ids.get(piece) {
                queue.push(Bigram {
                    score: scores[id as usize],
                    left: l,
                    len,
                });
            }
        };
        for l in 0..syms.len() {
            push(&mut queue, &syms, l);
        }
        while let Some(b) = queue.pop() {
            let Some(r) = syms[b.left].next else { continue };
            // Stale: one side was merged since.
            if syms[b.left].len == 0 || syms[r].len == 0 || syms[b.left].len + syms[r].len != b.len
            {
                continue;
            }
            syms[b.left].len = b.len;
            syms[r].len = 0;
            let after = syms[r].next;
            syms[b.left].next = after;
            if let Some(a) = after {
                syms[a].prev = Some(b.left);
            }
            if let Some(p) = syms[b.left].prev {
                push(&mut queue, &syms, p);
            }
            push(&mut queue, &syms, b.left);
        }
        let mut i = (!syms.is_empty()).then_some(0);
        while let Some(at) = i {
            let sym = &syms[at];
            let piece = &text[sym.start..sym.start + sym.len];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => out.extend(piece.bytes().filter_map(|b| byte_ids[b as usize].or(*unk))),
            }
            i = sym.next;
        }
    }

    /// The bytes `ids` stand for. Control tokens (such as `<|im_end|>`) are left out when
    /// `skip_special`.
    pub fn decode_bytes(&self, ids: &[u32], skip_special: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            let Some(t) = self.tokens.get(id as usize) else {
                continue;
            };
            match (self.types[id as usize], &self.algo) {
                (TYPE_CONTROL, _) if skip_special => {}
                (TYPE_UNUSED, _) => {}
                (TYPE_CONTROL | TYPE_USER_DEFINED, _) => out.extend(t.as_bytes()),
                (_, Algo::Bpe { byte_decoder, .. }) => {
                    for c in t.chars() {
                        match byte_decoder.get(&c) {
                            Some(&b) => out.push(b),
                            None => out.extend(c.to_string().as_bytes()),
                        }
                    }
                }
                (TYPE_BYTE, Algo::Spm { .. }) => match byte_token(t) {
                    Some(b) => out.push(b),
                    None => out.extend(t.as_bytes()),
                },
                // The unknown token (`<unk>`) is special: shown as its text unless skipped.
                (TYPE_UNKNOWN, Algo::Spm { .. }) if skip_special => {}
                (TYPE_UNKNOWN, Algo::Spm { .. }) => out.extend(t.as_bytes()),
                (_, Algo::Spm { .. }) => out.extend(t.replace('\u{2581}', " ").as_bytes()),
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

    /// The chat format of the model: from its template (`tokenizer.chat_template`) when it has
    /// one, else from the tokens its vocabulary has.
    fn chat_format(&self) -> Option<ChatFormat> {
        let has = |t: &str| self.token_id(t).is_some();
        let llama3 = has("<|start_header_id|>") && has("<|end_header_id|>") && has("<|eot_id|>");
        let chatml = has("<|im_start|>") && has("<|im_end|>");
        match self.chat_template.as_deref() {
            Some(t) if t.contains("<|start_header_id|>") && llama3 => Some(ChatFormat::Llama3),
            Some(t) if t.contains("<|im_start|>") && chatml => Some(ChatFormat::ChatMl),
            Some(_) => None,
            None if chatml => Some(ChatFormat::ChatMl),
            None if llama3 => Some(ChatFormat::Llama3),
            None => None,
        }
    }

    /// The prompt for `messages` in the model's chat format, as llama.cpp's built-in formatters
    /// write them (the BOS token, when the model wants one, comes from [`Tokenizer::encode`]):
    /// - ChatML: `<|im_start|>ROLE\nCONTENT<|im_end|>\n` per message, then
    ///   `<|im_start|>assistant\n` when `add_generation_prompt`. Like llama.cpp, no system
    ///   message is added when the conversation has none (SmolLM2's Jinja template would add
    ///   [`Tokenizer::default_system_prompt`]; with it the 135M model answers the France question
    ///   worse, in llama.cpp too).
    /// - Llama 3: `<|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT<|eot_id|>` per message
    ///   (content trimmed), then `<|start_header_id|>assistant<|end_header_id|>\n\n`.
    ///
    /// Other templates (Llama 2's `[INST]`, Mistral's, Jinja in general) are refused.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> anyhow::Result<String> {
        let Some(format) = self.chat_format() else {
            bail!(
                "the model's chat template is not supported (ChatML, with <|im_start|> and <|im_end|> tokens, and Llama 3's, with <|start_header_id|>, are); use /v1/completions with a prompt formatted for the model"
            );
        };
        let mut s = String::new();
        match format {
            ChatFormat::ChatMl => {
                for m in messages {
                    s.push_str(&format!(
                        "<|im_start|>{}\n{}<|im_end|>\n",
                        m.role, m.content
                    ));
                }
                if add_generation_prompt {
                    s.push_str("<|im_start|>assistant\n");
                }
            }
            ChatFormat::Llama3 => {
                for m in messages {
                    s.push_str(&format!(
                        "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>",
                        m.role,
                        m.content.trim()
                    ));
                }
                if add_generation_prompt {
                    s.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
                }
            }
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The former O(n²) merge loop: rescan every adjacent pair, merge the lowest rank (the
    /// leftmost on a tie), repeat.
    fn rescan_merge(merges: &HashMap<(u32, u32), (u32, u32)>, mut syms: Vec<u32>) -> Vec<u32> {
        while syms.len() > 1 {
            let best = syms
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| merges.get(&(w[0], w[1])).map(|&(r, m)| (r, i, m)))
                .min();
            let Some((_, i, merged)) = best else { break };
            syms[i] = merged;
            syms.remove(i + 1);
        }
        syms
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]
        /// The heap merge gives exactly the rescanning merge's symbols on random merge tables
        /// over a small alphabet (many ties and overlapping pairs such as `a a a`).
        #[test]
        fn heap_merge_equals_rescan_merge(
            table in proptest::collection::vec((0u32..6, 0u32..6, 0u32..40), 0..30),
            syms in proptest::collection::vec(0u32..7, 0..40),
        ) {
            // 6 stands for a byte without a token: a barrier that is never output.
            let syms: Vec<u32> = syms.into_iter().map(|s| if s == 6 { NO_TOKEN } else { s }).collect();
            let mut merges = HashMap::new();
            for (rank, (a, b, m)) in table.into_iter().enumerate() {
                // Merged ids may themselves merge further (ids below 6 are bytes).
                merges.entry((a, b)).or_insert((rank as u32, 6 + m % 6 + (a + b) % 3));
            }
            // Let merged ids take part in later merges too.
            for x in 6u32..14 {
                merges.entry((x, x % 6)).or_insert((100 + x, 20 + x));
            }
            let mut out = Vec::new();
            bpe_merge(&merges, syms.clone(), &mut out);
            let mut want = rescan_merge(&merges, syms);
            want.retain(|&id| id != NO_TOKEN);
            prop_assert_eq!(out, want);
        }
    }
}
