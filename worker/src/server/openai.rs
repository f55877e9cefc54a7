//! The OpenAI-compatible endpoints: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.
//!
//! Requests are parsed by hand from the body bytes (so that every failure gets an OpenAI-style
//! error body), validated, tokenised off the async workers, and submitted to the scheduler.
//! Streaming answers are server-sent events in OpenAI's chunk format ending with
//! `data: [DONE]`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::App;
use super::error::ApiError;
use crate::engine::sampling::SamplingParams;
use crate::engine::sampling::{MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS, MAX_TOP_LOGPROBS};
use crate::engine::scheduler::{Completion, Event, Request, Resume, TokenLogprobs};
use crate::tokenizer::Message;

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A response id (`chatcmpl-...`, `cmpl-...`), unique within the process.
fn new_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!("{prefix}-{t:016x}{n:08x}")
}

pub(super) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::invalid(format!("the request body is not valid UTF-8: {e}"))
            .with_code("invalid_utf8")
    })?;
    if text.trim().is_empty() {
        return Err(ApiError::invalid(
            "the request body is empty; expected a JSON object",
        ));
    }
    serde_json::from_str(text).map_err(|e| {
        ApiError::invalid(format!(
            "the request body is not valid JSON for this endpoint: {e}"
        ))
        .with_code("invalid_json")
    })
}

/// `stop`: one string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// The parameters chat and text completions share.
#[derive(Deserialize)]
pub(super) struct Common {
    model: Option<String>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    /// Extension (vLLM, llama.cpp): keep the `top_k` most likely tokens; 0 or -1: all.
    top_k: Option<i64>,
    seed: Option<i64>,
    stop: Option<Stop>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    n: Option<i64>,
    logprobs: Option<Value>,
    /// Extension (vLLM): do not stop at the model's end-of-sequence tokens.
    ignore_eos: Option<bool>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<Value>,
    /// Extension (vLLM): stop when one of these tokens is sampled.
    stop_token_ids: Option<Value>,
    top_logprobs: Option<Value>,
    // Fields this server does not implement yet: refused with 400 naming the field when set to
    // anything but their neutral value, never silently ignored.
    repetition_penalty: Option<f64>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    functions: Option<Value>,
    response_format: Option<Value>,
}

/// Whether a JSON value is absent in effect (null, false, 0, "", [] or {}).
fn neutral(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Bool(true) => false,
    }
}

#[derive(Deserialize)]
pub(super) struct ChatRequest {
    messages: Option<Vec<ChatMessage>>,
    #[serde(flatten)]
    pub(super) common: Common,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: Option<String>,
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: Option<String>,
    text: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct CompletionRequest {
    prompt: Option<PromptInput>,
    echo: Option<bool>,
    best_of: Option<i64>,
    #[serde(flatten)]
    pub(super) common: Common,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// Which endpoint a request came through (for the response format).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Chat,
    Completion,
}

/// Validated options of one request.
pub(super) struct Options {
    sampling: SamplingParams,
    /// Choices to generate (1..=MAX_N).
    pub(super) n: usize,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
    ignore_eos: bool,
    /// `max_completion_tokens` or `max_tokens` as given, and which one.
    max_tokens: Option<(i64, &'static str)>,
}

/// The most choices (`n`) one request may ask for.
const MAX_N: i64 = 8;
/// The most alternatives `logprobs` may ask for on `/v1/completions` (OpenAI's limit).
const MAX_COMPLETION_LOGPROBS: u64 = 5;

/// A non-negative integer token id below `vocab`.
fn token_id(v: &Value, vocab: usize) -> Option<u32> {
    v.as_u64().filter(|&t| t < vocab as u64).map(|t| t as u32)
}

/// `logit_bias`: `{"token id": bias}`.
fn parse_logit_bias(v: &Value, vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
    let err = |m: String| Err(ApiError::param("logit_bias", m));
    let map = match v {
        Value::Null => return Ok(Vec::new()),
        Value::Object(m) => m,
        _ => return err("logit_bias must be an object mapping token ids to biases".into()),
    };
    if map.len() > MAX_LOGIT_BIAS {
        return err(format!(
            "logit_bias has {} entries; at most {MAX_LOGIT_BIAS} are allowed",
            map.len()
        ));
    }
    let mut out = Vec::with_capacity(map.len());
    for (k, b) in map {
        let Some(t) = k.trim().parse::<u64>().ok().filter(|&t| t < vocab as u64) else {
            return err(format!(
                "logit_bias keys must be token ids (integers from 0 to {}), got {k:?}",
                vocab - 1
            ));
        };
        let Some(b) = b.as_f64().filter(|b| (-100.0..=100.0).contains(b)) else {
            return err(format!(
                "logit_bias values must be numbers between -100 and 100, got {b} for token {k}"
            ));
        };
        out.push((t as u32, b as f32));
    }
    Ok(out)
}

/// `stop_token_ids`: a list of token ids.
fn parse_stop_token_ids(v: &Value, vocab: usize) -> Result<Vec<u32>, ApiError> {
    let err = |m: String| Err(ApiError::param("stop_token_ids", m));
    let list = match v {
        Value::Null => return Ok(Vec::new()),
        Value::Array(a) => a,
        _ => return err("stop_token_ids must be a list of token ids".into()),
    };
    if list.len() > MAX_STOP_TOKEN_IDS {
        return err(format!(
            "stop_token_ids has {} ids; at most {MAX_STOP_TOKEN_IDS} are allowed",
            list.len()
        ));
    }
    list.iter()
        .map(|t| {
            token_id(t, vocab).ok_or_else(|| {
                ApiError::param(
                    "stop_token_ids",
                    format!(
                        "stop_token_ids must be token ids (integers from 0 to {}), got {t}",
                        vocab - 1
                    ),
                )
            })
        })
        .collect()
}

impl Common {
    /// `logprobs` (and `top_logprobs` on chat): how many alternatives to report, if any.
    fn logprobs(&self, kind: Kind) -> Result<Option<usize>, ApiError> {
        let top = match &self.top_logprobs {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64().filter(|&k| k <= MAX_TOP_LOGPROBS as u64) {
                Some(k) => Some(k as usize),
                None => {
                    return Err(ApiError::param(
                        "top_logprobs",
                        format!(
                            "top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {v}"
                        ),
                    ));
                }
            },
        };
        match kind {
            Kind::Chat => match &self.logprobs {
                None | Some(Value::Null) | Some(Value::Bool(false)) => {
                    if top.is_some_and(|k| k > 0) {
                        return Err(ApiError::param(
                            "top_logprobs",
                            "top_logprobs needs logprobs set to true",
                        ));
                    }
                    Ok(None)
                }
                Some(Value::Bool(true)) => Ok(Some(top.unwrap_or(0))),
                Some(v) => Err(ApiError::param(
                    "logprobs",
                    format!("logprobs must be true or false on chat completions, got {v}"),
                )),
            },
            Kind::Completion => {
                if top.is_some_and(|k| k > 0) {
                    return Err(ApiError::param(
                        "top_logprobs",
                        "top_logprobs is a chat completions field; use logprobs (an integer) here",
                    ));
                }
                match &self.logprobs {
                    None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(None),
                    Some(v) => match v.as_u64().filter(|&k| k <= MAX_COMPLETION_LOGPROBS) {
                        Some(k) => Ok(Some(k as usize)),
                        None => Err(ApiError::param(
                            "logprobs",
                            format!(
                                "logprobs must be an integer from 0 to {MAX_COMPLETION_LOGPROBS}, got {v}"
                            ),
                        )),
                    },
                }
            }
        }
    }

    pub(super) fn validate(&self, app: &App, kind: Kind) -> Result<Options, ApiError> {
        match self.model.as_deref() {
            None => {
                return Err(ApiError::param(
                    "model",
                    "you must provide a model parameter",
                ));
            }
            Some(m) if m != app.cfg.served_model_name => {
                return Err(ApiError::param(
                    "model",
                    format!(
                        "the model `{m}` does not exist; this server serves `{}`",
                        app.cfg.served_model_name
                    ),
                )
                .with_status(StatusCode::NOT_FOUND)
                .with_code("model_not_found"));
            }
            Some(_) => {}
        }
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_N).contains(&n) {
            return Err(ApiError::param(
                "n",
                format!("n must be between 1 and {MAX_N}, got {n}"),
            ));
        }
        let unsupported = |field: &str, what: &str| {
            Err(ApiError::param(
                field,
                format!("{field} is not supported by this server yet ({what}); remove it"),
            )
            .with_code("unsupported_parameter"))
        };
        for (field, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && (-2.0..=2.0).contains(&v))
            {
                return Err(ApiError::param(
                    field,
                    format!("{field} must be between -2 and 2, got {v}"),
                ));
            }
        }
        if self.repetition_penalty.is_some_and(|v| v != 1.0) {
            return unsupported(
                "repetition_penalty",
                "only 1 is accepted; use presence_penalty or frequency_penalty",
            );
        }
        let vocab = app.handle.vocab_size();
        let logit_bias = match &self.logit_bias {
            None => Vec::new(),
            Some(v) => parse_logit_bias(v, vocab)?,
        };
        let stop_token_ids = match &self.stop_token_ids {
            None => Vec::new(),
            Some(v) => parse_stop_token_ids(v, vocab)?,
        };
        let logprobs = self.logprobs(kind)?;
        for (field, v, what) in [
            ("tools", &self.tools, "tool calling is not implemented"),
            (
                "functions",
                &self.functions,
                "function calling is not implemented",
            ),
        ] {
            if v.as_ref().is_some_and(|v| !neutral(v)) {
                return unsupported(field, what);
            }
        }
        match &self.tool_choice {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "none" || s == "auto" => {}
            Some(_) => return unsupported("tool_choice", "tool calling is not implemented"),
        }
        match &self.response_format {
            None | Some(Value::Null) => {}
            Some(Value::Object(o)) if o.get("type").and_then(Value::as_str) == Some("text") => {}
            Some(_) => {
                return unsupported(
                    "response_format",
                    "only {\"type\": \"text\"} is accepted; JSON modes are not implemented",
                );
            }
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
            return Err(ApiError::param(
                "temperature",
                format!("temperature must be between 0 and 2, got {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p.is_finite() && (0.0..=1.0).contains(&top_p)) {
            return Err(ApiError::param(
                "top_p",
                format!("top_p must be between 0 and 1, got {top_p}"),
            ));
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => {
                return Err(ApiError::param(
                    "top_k",
                    format!("top_k must be -1, 0 (all tokens) or positive, got {k}"),
                ));
            }
        };
        let sampling = SamplingParams {
            temperature: temperature as f32,
            // top_p = 0 keeps only the most likely token.
            top_k: if top_p == 0.0 { 1 } else { top_k },
            top_p: if top_p == 0.0 { 1.0 } else { top_p as f32 },
            // Any 64-bit pattern is a seed.
            seed: self.seed.map(|s| s as u64),
            presence_penalty: self.presence_penalty.unwrap_or(0.0) as f32,
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0) as f32,
            logit_bias,
            stop_token_ids,
            logprobs,
        };
        let stop: Vec<String> = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        crate::engine::detok::check_stops(&stop).map_err(|e| ApiError::param("stop", e))?;
        let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(n), _) => Some((n, "max_completion_tokens")),
            (None, Some(n)) => Some((n, "max_tokens")),
            (None, None) => None,
        };
        if let Some((n, param)) = max_tokens
            && n < 1
        {
            return Err(ApiError::param(
                param,
                format!("{param} must be at least 1, got {n}"),
            ));
        }
        let stream = self.stream.unwrap_or(false);
        Ok(Options {
            sampling,
            n: n as usize,
            stop,
            stream,
            include_usage: stream
                && self
                    .stream_options
                    .as_ref()
                    .and_then(|o| o.include_usage)
                    .unwrap_or(false),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            max_tokens,
        })
    }
}

/// `max_tokens` for a prompt of `prompt_len` tokens: as asked if it fits the sequence, else
/// `context_length_exceeded`; by default what is left (chat) or 16 (completions, as OpenAI).
pub(super) fn resolve_max_tokens(
    app: &App,
    opts: &Options,
    prompt_len: usize,
    kind: Kind,
) -> Result<usize, ApiError> {
    let cap = app.handle.max_sequence_tokens();
    let where_ = match kind {
        Kind::Chat => ("messages", "in the messages"),
        Kind::Completion => ("prompt", "in the prompt"),
    };
    let too_long = |asked: usize| {
        ApiError::param(
            where_.0,
            format!(
                "this model's maximum context length is {cap} tokens; however, you requested {} tokens ({prompt_len} {}, {asked} in the completion)",
                prompt_len + asked,
                where_.1
            ),
        )
        .with_code("context_length_exceeded")
    };
    let left = cap.saturating_sub(prompt_len);
    match opts.max_tokens {
        Some((n, _)) => {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if n > left {
                return Err(too_long(n));
            }
            Ok(n)
        }
        None => {
            let n = match kind {
                Kind::Chat => left,
                Kind::Completion => left.min(16),
            };
            if n == 0 {
                return Err(too_long(1));
            }
            Ok(n)
        }
    }
}

/// Tokenise off the async workers. Admission is checked first (a full queue, a failed or
/// draining scheduler answer at once), and at most `max_concurrent_tokenizations` prompts are
/// tokenised at a time. A burst beyond them waits for a permit; only when as many requests
/// already wait for one as the scheduler's queue holds (`max_waiting`) does a request get 429,
/// so a flood of long prompts cannot hold every core, and ordinary bursts are not refused.
async fn tokenize(
    app: &App,
    f: impl FnOnce(&crate::tokenizer::Tokenizer) -> anyhow::Result<Vec<u32>> + Send + 'static,
) -> Result<Vec<u32>, ApiError> {
    app.handle.admission_check()?;
    let permit = match Arc::clone(&app.tokenize_permits).try_acquire_owned() {
        Ok(p) => p,
        Err(_) => {
            let limit = app.handle.config().max_waiting.max(1);
            let waiting = app.tokenize_waiting.fetch_add(1, Ordering::SeqCst);
            let permit = if waiting >= limit {
                None
            } else {
                Arc::clone(&app.tokenize_permits).acquire_owned().await.ok()
            };
            app.tokenize_waiting.fetch_sub(1, Ordering::SeqCst);
            permit.ok_or_else(|| {
                ApiError::overloaded(format!(
                    "the server is overloaded: {} prompts are being tokenised and {waiting} wait; retry later",
                    app.cfg.max_concurrent_tokenizations
                ))
            })?
        }
    };
    let tok = app.handle.tokenizer().clone();
    let metrics = Arc::clone(&app.metrics);
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let t = std::time::Instant::now();
        let ids = f(&tok);
        metrics.tokenize_seconds.observe(t.elapsed().as_secs_f64());
        ids
    })
    .await
    .map_err(|e| ApiError::internal(format!("the tokenizer task failed: {e}")))?
    .map_err(|e| ApiError::invalid(format!("{e:#}")))
}

pub(super) async fn chat(State(app): State<App>, body: Result<Bytes, BytesRejection>) -> Response {
    chat_inner(app, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn chat_inner(app: App, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let (opts, prompt) = parse_chat(&app, body).await?;
    respond(app, Kind::Chat, opts, prompt).await
}

/// A chat request's options and prompt (the messages through the chat template, tokenised).
pub(super) async fn parse_chat(
    app: &App,
    body: Result<Bytes, BytesRejection>,
) -> Result<(Options, Vec<u32>), ApiError> {
    let body = body.map_err(ApiError::from_body)?;
    let req: ChatRequest = parse_json(&body)?;
    let opts = req.common.validate(app, Kind::Chat)?;
    let messages = req
        .messages
        .ok_or_else(|| ApiError::param("messages", "you must provide messages"))?;
    if messages.is_empty() {
        return Err(ApiError::param(
            "messages",
            "messages must contain at least one message",
        ));
    }
    let mut conv = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let role = match m.role.as_deref() {
            Some(r @ ("system" | "user" | "assistant" | "tool")) => r,
            Some("developer") => "system",
            Some(r) => {
                return Err(ApiError::param(
                    &format!("messages[{i}].role"),
                    format!("unsupported role {r:?} (system, developer, user, assistant or tool)"),
                ));
            }
            None => {
                return Err(ApiError::param(
                    &format!("messages[{i}].role"),
                    "every message needs a role",
                ));
            }
        };
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut s = String::new();
                for (j, p) in parts.into_iter().enumerate() {
                    match (p.kind.as_deref(), p.text) {
                        (Some("text"), Some(t)) => s.push_str(&t),
                        (kind, _) => {
                            return Err(ApiError::param(
                                &format!("messages[{i}].content[{j}]"),
                                format!(
                                    "only text content parts are supported, got type {}",
                                    kind.unwrap_or("(none)")
                                ),
                            ));
                        }
                    }
                }
                s
            }
        };
        conv.push(Message {
            role: role.to_owned(),
            content,
        });
    }
    let prompt = tokenize(app, move |t| {
        let text = t.apply_chat_template(&conv, true)?;
        Ok(t.encode(&text, true))
    })
    .await?;
    Ok((opts, prompt))
}

pub(super) async fn completions(
    State(app): State<App>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    completions_inner(app, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn completions_inner(
    app: App,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (opts, prompt) = parse_completion(&app, body).await?;
    respond(app, Kind::Completion, opts, prompt).await
}

/// A text-completion request's options and prompt (tokenised, or token ids as given).
pub(super) async fn parse_completion(
    app: &App,
    body: Result<Bytes, BytesRejection>,
) -> Result<(Options, Vec<u32>), ApiError> {
    let body = body.map_err(ApiError::from_body)?;
    let req: CompletionRequest = parse_json(&body)?;
    let opts = completion_options(app, &req)?;
    let one = "one prompt per request is supported";
    let prompt = match req.prompt {
        None => return Err(ApiError::param("prompt", "you must provide a prompt")),
        Some(PromptInput::Text(t)) => PromptInput::Text(t),
        Some(PromptInput::Texts(mut v)) if v.len() == 1 => PromptInput::Text(v.remove(0)),
        Some(PromptInput::Tokens(v)) => PromptInput::Tokens(v),
        Some(PromptInput::TokenLists(mut v)) if v.len() == 1 => PromptInput::Tokens(v.remove(0)),
        Some(PromptInput::Texts(v)) if v.is_empty() => {
            return Err(ApiError::param("prompt", "the prompt is empty"));
        }
        Some(_) => return Err(ApiError::param("prompt", one)),
    };
    let prompt = match prompt {
        PromptInput::Text(t) => tokenize(app, move |tok| Ok(tok.encode(&t, true))).await?,
        PromptInput::Tokens(v) => v,
        _ => unreachable!("normalised above"),
    };
    if prompt.is_empty() {
        return Err(ApiError::param("prompt", "the prompt is empty"));
    }
    Ok((opts, prompt))
}

/// A completion request's options checked as [`parse_completion`] does, without the prompt
/// (a decode replica takes the prompt's tokens from the prefill replica's hand-over).
pub(super) fn completion_options(app: &App, req: &CompletionRequest) -> Result<Options, ApiError> {
    let opts = req.common.validate(app, Kind::Completion)?;
    if req.echo == Some(true) {
        return Err(ApiError::param("echo", "echo is not supported"));
    }
    if let Some(b) = req.best_of
        && b != 1
    {
        return Err(ApiError::param(
            "best_of",
            format!("only best_of = 1 is supported, got {b}"),
        ));
    }
    Ok(opts)
}

/// Submit and answer, streamed or whole. `n` choices are `n` sequences of the same prompt;
/// with a seed, choice `i > 0` samples with a seed derived from it.
async fn respond(
    app: App,
    kind: Kind,
    opts: Options,
    prompt: Vec<u32>,
) -> Result<Response, ApiError> {
    respond_with(app, kind, opts, prompt, None).await
}

/// The scheduler requests of a request's `n` choices; with a seed, choice `i > 0` samples with
/// a seed derived from it.
pub(super) fn choice_requests(opts: &Options, prompt: &[u32], max_tokens: usize) -> Vec<Request> {
    (0..opts.n)
        .map(|i| {
            let mut sampling = opts.sampling.clone();
            if i > 0 {
                sampling.seed = sampling.seed.map(|s| choice_seed(s, i));
            }
            Request {
                prompt: prompt.to_vec(),
                max_tokens,
                sampling,
                stop: opts.stop.clone(),
                ignore_eos: opts.ignore_eos,
            }
        })
        .collect()
}

/// [`respond`], or, with `resume`, the decode half of a disaggregated request: each choice
/// continues from the KV cache and first token a prefill replica handed over.
pub(super) async fn respond_with(
    app: App,
    kind: Kind,
    opts: Options,
    prompt: Vec<u32>,
    resume: Option<Vec<Resume>>,
) -> Result<Response, ApiError> {
    let max_tokens = resolve_max_tokens(&app, &opts, prompt.len(), kind)?;
    let reqs = choice_requests(&opts, &prompt, max_tokens);
    // All choices are queued or none: a refusal leaves nothing running.
    let rxs = match resume {
        None => app.handle.submit_all(reqs)?,
        Some(resume) => {
            if resume.len() != reqs.len() {
                return Err(ApiError::invalid(format!(
                    "the hand-over holds {} choices where the request asks for n = {}",
                    resume.len(),
                    reqs.len()
                )));
            }
            app.handle
                .submit_resume(reqs.into_iter().zip(resume).collect())?
        }
    };
    let meta = Meta {
        id: new_id(match kind {
            Kind::Chat => "chatcmpl",
            Kind::Completion => "cmpl",
        }),
        created: now_unix(),
        model: app.cfg.served_model_name.clone(),
        kind,
        include_usage: opts.include_usage,
        logprobs: opts.sampling.logprobs.is_some(),
    };
    if opts.stream {
        Ok(stream_response(rxs, meta))
    } else {
        whole_response(rxs, meta).await
    }
}

/// The seed of choice `i` of a request seeded with `seed` (0: the seed itself).
fn choice_seed(seed: u64, i: usize) -> u64 {
    let mut r = crate::engine::sampling::Rng::new(seed);
    let mut s = seed;
    for _ in 0..i {
        s = r.next_u64();
    }
    s
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    include_usage: bool,
    /// Whether choices carry `logprobs`.
    logprobs: bool,
}

fn usage_json(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// The usage of a request whose choices ended with `done` (the prompt counts once).
fn total_usage(done: &[Completion]) -> Value {
    usage_json(
        done.first().map_or(0, |c| c.usage.prompt_tokens),
        done.iter().map(|c| c.usage.completion_tokens).sum(),
    )
}

/// A log-probability for JSON (OpenAI writes -9999 for an impossible token).
fn lp_json(lp: f32) -> Value {
    json!(if lp.is_finite() { lp } else { -9999.0 })
}

/// The `logprobs` of a choice (or of a chunk) covering `entries`; `offset` is where the first
/// token's text starts in the choice's text (completions' `text_offset`, in bytes), advanced.
fn logprobs_json(kind: Kind, entries: &[TokenLogprobs], offset: &mut usize) -> Value {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    match kind {
        Kind::Chat => {
            let content: Vec<Value> = entries
                .iter()
                .map(|e| {
                    let top: Vec<Value> = e
                        .top
                        .iter()
                        .map(|(_, b, lp)| json!({"token": text(b), "logprob": lp_json(*lp), "bytes": b}))
                        .collect();
                    json!({
                        "token": text(&e.bytes),
                        "logprob": lp_json(e.logprob),
                        "bytes": e.bytes,
                        "top_logprobs": top,
                    })
                })
                .collect();
            json!({ "content": content })
        }
        Kind::Completion => {
            let mut tokens = Vec::with_capacity(entries.len());
            let mut token_logprobs = Vec::with_capacity(entries.len());
            let mut top_logprobs = Vec::with_capacity(entries.len());
            let mut text_offset = Vec::with_capacity(entries.len());
            for e in entries {
                let t = text(&e.bytes);
                text_offset.push(*offset);
                *offset += t.len();
                tokens.push(t);
                token_logprobs.push(lp_json(e.logprob));
                let mut top = serde_json::Map::new();
                for (_, b, lp) in &e.top {
                    top.entry(text(b)).or_insert_with(|| lp_json(*lp));
                }
                top_logprobs.push(Value::Object(top));
            }
            json!({
                "tokens": tokens,
                "token_logprobs": token_logprobs,
                "top_logprobs": top_logprobs,
                "text_offset": text_offset,
            })
        }
    }
}

/// 503 with `Retry-After`: the replica failed under the request (its group was lost, its
/// scheduler stopped) and is being restarted; the request can be sent again. Not a 500: nothing
/// was wrong with the request, and a retry elsewhere succeeds.
pub(super) fn replica_failed(why: &str) -> ApiError {
    ApiError::unavailable(
        format!("the replica failed while serving this request ({why}); retry it"),
        "replica_failed",
    )
}

async fn whole_response(rxs: Vec<mpsc::Receiver<Event>>, meta: Meta) -> Result<Response, ApiError> {
    let mut choices = Vec::with_capacity(rxs.len());
    let mut all = Vec::with_capacity(rxs.len());
    for (index, mut rx) in rxs.into_iter().enumerate() {
        let mut entries = Vec::new();
        let done = loop {
            match rx.recv().await {
                Some(Event::Text(_)) => {}
                Some(Event::Logprobs(l)) => entries.push(l),
                Some(Event::Done(c)) => break c,
                Some(Event::Error(e)) => return Err(ApiError::internal(e)),
                Some(Event::Failed(e)) => return Err(replica_failed(&e)),
                Some(Event::Prefilled(_)) => {
                    return Err(ApiError::internal(
                        "a prefill-only hand-over ended a whole request",
                    ));
                }
                None => return Err(replica_failed("generation ended without a result")),
            }
        };
        let logprobs = if meta.logprobs {
            logprobs_json(meta.kind, &entries, &mut 0)
        } else {
            Value::Null
        };
        choices.push(match meta.kind {
            Kind::Chat => json!({
                "index": index,
                "message": {"role": "assistant", "content": done.text},
                "logprobs": logprobs,
                "finish_reason": done.finish_reason.as_str(),
            }),
            Kind::Completion => json!({
                "index": index,
                "text": done.text,
                "logprobs": logprobs,
                "finish_reason": done.finish_reason.as_str(),
            }),
        });
        all.push(done);
    }
    let body = json!({
        "id": meta.id,
        "object": match meta.kind { Kind::Chat => "chat.completion", Kind::Completion => "text_completion" },
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": total_usage(&all),
    });
    Ok(super::json_response(StatusCode::OK, &body))
}

impl Meta {
    /// A streamed chunk with one choice.
    fn chunk(
        &self,
        index: usize,
        delta_or_text: Value,
        finish_reason: Option<&str>,
        logprobs: Value,
    ) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": index,
                "delta": delta_or_text,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }),
            Kind::Completion => json!({
                "index": index,
                "text": delta_or_text,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }),
        };
        let mut v = json!({
            "id": self.id,
            "object": match self.kind { Kind::Chat => "chat.completion.chunk", Kind::Completion => "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    fn text_chunk(&self, index: usize, text: &str, logprobs: Value) -> Value {
        match self.kind {
            Kind::Chat => self.chunk(index, json!({"content": text}), None, logprobs),
            Kind::Completion => self.chunk(index, json!(text), None, logprobs),
        }
    }

    fn final_chunk(&self, index: usize, finish_reason: &str, logprobs: Value) -> Value {
        match self.kind {
            Kind::Chat => self.chunk(index, json!({}), Some(finish_reason), logprobs),
            Kind::Completion => self.chunk(index, json!(""), Some(finish_reason), logprobs),
        }
    }

    fn usage_chunk(&self, done: &[Completion]) -> Value {
        json!({
            "id": self.id,
            "object": match self.kind { Kind::Chat => "chat.completion.chunk", Kind::Completion => "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": total_usage(done),
        })
    }
}

fn sse(v: &Value) -> Result<Bytes, Infallible> {
    Ok(Bytes::from(format!("data: {v}\n\n")))
}

/// Server-sent events. A task forwards the scheduler's events of every choice as they come
/// (each chunk names its choice's index); when the client goes away the body (and this
/// channel) is dropped, the task ends and drops the scheduler's receivers, which cancels the
/// sequences. With logprobs, a chunk carries those of the tokens generated since the previous
/// chunk of its choice (the last chunk those left).
fn stream_response(rxs: Vec<mpsc::Receiver<Event>>, meta: Meta) -> Response {
    use tokio_stream::StreamExt;
    let (tx, body_rx) = mpsc::channel::<Result<Bytes, Infallible>>(32);
    tokio::spawn(async move {
        let n = rxs.len();
        let mut events = tokio_stream::StreamMap::new();
        for (i, rx) in rxs.into_iter().enumerate() {
            events.insert(i, tokio_stream::wrappers::ReceiverStream::new(rx));
        }
        if meta.kind == Kind::Chat {
            for i in 0..n {
                let lp = if meta.logprobs {
                    json!({"content": []})
                } else {
                    Value::Null
                };
                let first = meta.chunk(i, json!({"role": "assistant", "content": ""}), None, lp);
                if tx.send(sse(&first)).await.is_err() {
                    return;
                }
            }
        }
        let mut pending: Vec<Vec<TokenLogprobs>> = vec![Vec::new(); n];
        let mut offsets = vec![0usize; n];
        let mut done: Vec<Option<Completion>> = vec![None; n];
        let mut take_lp = |i: usize, pending: &mut Vec<Vec<TokenLogprobs>>| {
            if meta.logprobs {
                let v = logprobs_json(meta.kind, &pending[i], &mut offsets[i]);
                pending[i].clear();
                v
            } else {
                Value::Null
            }
        };
        loop {
            let ev = tokio::select! {
                ev = events.next() => ev,
                () = tx.closed() => return,
            };
            let out: Vec<Value> = match ev {
                Some((i, Event::Logprobs(l))) => {
                    pending[i].push(l);
                    Vec::new()
                }
                Some((i, Event::Text(t))) => {
                    let lp = take_lp(i, &mut pending);
                    vec![meta.text_chunk(i, &t, lp)]
                }
                Some((i, Event::Done(c))) => {
                    let lp = take_lp(i, &mut pending);
                    let chunk = meta.final_chunk(i, c.finish_reason.as_str(), lp);
                    done[i] = Some(c);
                    vec![chunk]
                }
                Some((_, Event::Error(e))) => {
                    let _ = tx.send(sse(&ApiError::internal(e).body())).await;
                    break;
                }
                Some((_, Event::Failed(e))) => {
                    let _ = tx.send(sse(&replica_failed(&e).body())).await;
                    break;
                }
                Some((_, Event::Prefilled(_))) => {
                    let e = ApiError::internal("a prefill-only hand-over ended a whole request");
                    let _ = tx.send(sse(&e.body())).await;
                    break;
                }
                None => {
                    let all: Option<Vec<Completion>> = done.iter().cloned().collect();
                    match all {
                        Some(all) => {
                            if meta.include_usage {
                                let _ = tx.send(sse(&meta.usage_chunk(&all))).await;
                            }
                        }
                        None => {
                            let e = replica_failed("generation ended without a result");
                            let _ = tx.send(sse(&e.body())).await;
                        }
                    }
                    break;
                }
            };
            for chunk in &out {
                if tx.send(sse(chunk)).await.is_err() {
                    return;
                }
            }
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(body_rx));
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

pub(super) async fn list_models(State(app): State<App>) -> Response {
    super::json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": [model_json(&app)]}),
    )
}

pub(super) async fn get_model(State(app): State<App>, Path(id): Path<String>) -> Response {
    if id != app.cfg.served_model_name {
        return ApiError::param("model", format!("the model `{id}` does not exist"))
            .with_status(StatusCode::NOT_FOUND)
            .with_code("model_not_found")
            .into_response();
    }
    super::json_response(StatusCode::OK, &model_json(&app))
}

fn model_json(app: &App) -> Value {
    json!({
        "id": app.cfg.served_model_name,
        "object": "model",
        "created": app.started,
        "owned_by": "tessera",
        "max_model_len": app.handle.max_sequence_tokens(),
    })
}
