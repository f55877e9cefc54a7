//! A worker's side of prefill/decode disaggregation: the two internal endpoints the router in
//! front of the replicas (`crate::router`) calls, and the hand-over between them.
//!
//! | route | served by | body | answer |
//! |---|---|---|---|
//! | `POST /internal/pd/prefill/{chat,completions}` | a prefill replica | the client's request, as for `/v1/chat/completions` or `/v1/completions` | 200 with a [`Handoff`] once every choice's prompt is prefilled, its first token sampled and its KV cache stored by the decode replica; or the OpenAI error the public endpoint would give |
//! | `POST /internal/pd/decode/{chat,completions}` | a decode replica | `{"handoff": Handoff, "request": the client's request}` | what the public endpoint would answer (streamed or not), each choice continuing from its hand-over |
//!
//! Both need the [`TOKEN_HEADER`] derived from the group secret ([`internal_token`]), so that
//! an API client cannot make a prefill replica send KV caches anywhere. The prefill call also
//! names the decode replica ([`GROUP_HEADER`], [`ADDRS_HEADER`]: its group id and the KV port
//! of each rank) and the transfer ([`TRANSFER_HEADER`]; choice `i` travels as `NAME-i`).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::App;
use super::error::ApiError;
use super::openai::{self, ChatRequest, CompletionRequest, Kind};
use crate::engine::runner::KvTarget;
use crate::engine::sampling::Logprobs;
use crate::engine::scheduler::{Event, Resume};

/// The internal endpoints' credential: hex of [`internal_token`].
pub const TOKEN_HEADER: &str = "x-tessera-pd-token";
/// The transfer's name (letters, digits, `-` and `_`, at most 96 characters).
pub const TRANSFER_HEADER: &str = "x-tessera-kv-transfer";
/// The decode replica's group id (its `TESSERA_INCARNATION`).
pub const GROUP_HEADER: &str = "x-tessera-kv-group";
/// The decode replica's KV ports, `HOST:PORT` per rank in rank order, comma-separated.
pub const ADDRS_HEADER: &str = "x-tessera-kv-addrs";

/// Which half of a disaggregated deployment a replica serves (`TESSERA_PD_ROLE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PdRole {
    Prefill,
    Decode,
}

impl PdRole {
    /// The role's name in `TESSERA_PD_ROLE` and in the routes.
    pub fn name(self) -> &'static str {
        match self {
            PdRole::Prefill => "prefill",
            PdRole::Decode => "decode",
        }
    }

    /// `prefill` or `decode`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "prefill" => Some(PdRole::Prefill),
            "decode" => Some(PdRole::Decode),
            _ => None,
        }
    }
}

/// A worker's part in a disaggregated deployment ([`super::ServerConfig::pd`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PdConfig {
    pub role: PdRole,
    /// What [`TOKEN_HEADER`] must hold ([`internal_token`] of the group secret).
    pub token: String,
}

/// The internal endpoints' credential for a group secret: hex HMAC-SHA256 of a fixed label
/// keyed by the secret (the router and the workers of one deployment share the secret).
pub fn internal_token(secret: &[u8]) -> String {
    use hmac::Mac;
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key");
    m.update(b"tessera-pd-internal/1");
    crate::hex(&m.finalize().into_bytes())
}

/// What a prefill replica hands to a decode replica (through the router) for one request.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Handoff {
    /// The prompt's token ids (the decode replica does not tokenise again).
    pub prompt: Vec<u32>,
    /// One per choice (`n`), in order.
    pub choices: Vec<HandoffChoice>,
}

/// One choice's hand-over.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct HandoffChoice {
    /// The name its KV cache was stored under on every decode rank.
    pub transfer: String,
    /// The first generated token.
    pub token: u32,
    /// The sampler's random state after drawing it.
    pub rng_state: u64,
    /// The first token's log-probabilities, when asked for.
    #[serde(default)]
    pub logprobs: Option<WireLogprobs>,
    /// KV-cache bytes sent (all ranks).
    pub kv_bytes: usize,
    /// Seconds the hand-over took (every rank's shard sent and stored).
    pub kv_seconds: f64,
}

/// [`Logprobs`] in JSON, which has no infinities: `null` is minus infinity (a token that
/// cannot be sampled).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct WireLogprobs {
    pub logprob: Option<f32>,
    pub top: Vec<(u32, Option<f32>)>,
}

impl From<&Logprobs> for WireLogprobs {
    fn from(l: &Logprobs) -> Self {
        let f = |v: f32| v.is_finite().then_some(v);
        Self {
            logprob: f(l.logprob),
            top: l.top.iter().map(|&(t, v)| (t, f(v))).collect(),
        }
    }
}

impl From<&WireLogprobs> for Logprobs {
    fn from(w: &WireLogprobs) -> Self {
        let f = |v: Option<f32>| v.unwrap_or(f32::NEG_INFINITY);
        Self {
            logprob: f(w.logprob),
            top: w.top.iter().map(|&(t, v)| (t, f(v))).collect(),
        }
    }
}

/// Refuse a call that is not for this worker's role or lacks the token.
fn check(app: &App, headers: &HeaderMap, want: PdRole) -> Result<(), ApiError> {
    let not_here = |m: String| {
        ApiError::invalid(m)
            .with_status(StatusCode::NOT_FOUND)
            .with_code("not_found")
    };
    let Some(pd) = &app.cfg.pd else {
        return Err(not_here(format!(
            "/internal/pd/{}/...: this worker is not part of a prefill/decode deployment (TESSERA_PD_ROLE is unset)",
            want.name()
        )));
    };
    if pd.role != want {
        return Err(not_here(format!(
            "/internal/pd/{}/...: this worker is a {} replica (TESSERA_PD_ROLE={}); {} replicas serve it",
            want.name(),
            pd.role.name(),
            pd.role.name(),
            want.name()
        )));
    }
    let given = headers
        .get(TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let same = given.len() == pd.token.len()
        && given
            .bytes()
            .zip(pd.token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !same {
        return Err(ApiError {
            status: StatusCode::FORBIDDEN,
            kind: "permission_error",
            code: Some("invalid_pd_token"),
            ..ApiError::invalid(format!(
                "the internal endpoints of prefill/decode disaggregation need the {TOKEN_HEADER} header derived from the group secret (TESSERA_GROUP_SECRET)"
            ))
        });
    }
    Ok(())
}

fn kind_of(path: &str) -> Result<Kind, ApiError> {
    match path {
        "chat" => Ok(Kind::Chat),
        "completions" => Ok(Kind::Completion),
        other => Err(ApiError::invalid(format!(
            "no internal endpoint for {other:?} (chat or completions)"
        ))
        .with_status(StatusCode::NOT_FOUND)
        .with_code("not_found")),
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, ApiError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::invalid(format!("the {name} header is missing or not text")))
}

/// `POST /internal/pd/prefill/{kind}`.
pub(super) async fn prefill(
    State(app): State<App>,
    Path(kind): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    prefill_inner(app, &kind, &headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn prefill_inner(
    app: App,
    kind: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check(&app, headers, PdRole::Prefill)?;
    let kind = kind_of(kind)?;
    let transfer = header(headers, TRANSFER_HEADER)?;
    if transfer.len() > 96
        || !transfer
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ApiError::invalid(format!(
            "{TRANSFER_HEADER} must be 1 to 96 letters, digits, '-' or '_'"
        )));
    }
    let target = KvTarget {
        group_id: header(headers, GROUP_HEADER)?.to_owned(),
        addrs: header(headers, ADDRS_HEADER)?
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect(),
    };
    let (opts, prompt) = match kind {
        Kind::Chat => openai::parse_chat(&app, body).await?,
        Kind::Completion => openai::parse_completion(&app, body).await?,
    };
    // The same limits as the public endpoint (the decode replica checks them again).
    openai::resolve_max_tokens(&app, &opts, prompt.len(), kind)?;
    let names: Vec<String> = (0..opts.n).map(|i| format!("{transfer}-{i}")).collect();
    // A prefill-only sequence reserves its prompt and the first token.
    let reqs = openai::choice_requests(&opts, &prompt, 1)
        .into_iter()
        .zip(names.iter().cloned())
        .collect();
    let rxs = app.handle.submit_prefill(reqs, target)?;
    let mut choices = Vec::with_capacity(rxs.len());
    for (mut rx, transfer) in rxs.into_iter().zip(names) {
        let p = loop {
            match rx.recv().await {
                Some(Event::Prefilled(p)) => break p,
                Some(Event::Failed(e)) => return Err(openai::replica_failed(&e)),
                Some(Event::Error(e)) => return Err(ApiError::internal(e)),
                Some(Event::Text(_) | Event::Logprobs(_) | Event::Done(_)) => {}
                None => {
                    return Err(openai::replica_failed(
                        "the prefill ended without a hand-over",
                    ));
                }
            }
        };
        choices.push(HandoffChoice {
            transfer,
            token: p.token,
            rng_state: p.rng_state,
            logprobs: p.logprobs.as_ref().map(WireLogprobs::from),
            kv_bytes: p.kv_bytes,
            kv_seconds: p.kv_seconds,
        });
    }
    let body = serde_json::to_value(Handoff { prompt, choices })
        .map_err(|e| ApiError::internal(format!("encoding the hand-over: {e}")))?;
    Ok(super::json_response(StatusCode::OK, &body))
}

/// `POST /internal/pd/decode/{kind}`.
pub(super) async fn decode(
    State(app): State<App>,
    Path(kind): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    decode_inner(app, &kind, &headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// The decode call's body.
#[derive(Deserialize)]
struct DecodeBody {
    handoff: Handoff,
    request: serde_json::Value,
}

async fn decode_inner(
    app: App,
    kind: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check(&app, headers, PdRole::Decode)?;
    let kind = kind_of(kind)?;
    let body = body.map_err(ApiError::from_body)?;
    let DecodeBody { handoff, request } = openai::parse_json(&body)?;
    let bad_request = |e: serde_json::Error| {
        ApiError::invalid(format!(
            "the request body is not valid JSON for this endpoint: {e}"
        ))
        .with_code("invalid_json")
    };
    let opts = match kind {
        Kind::Chat => {
            let req: ChatRequest = serde_json::from_value(request).map_err(bad_request)?;
            req.common.validate(&app, Kind::Chat)?
        }
        Kind::Completion => {
            let req: CompletionRequest = serde_json::from_value(request).map_err(bad_request)?;
            openai::completion_options(&app, &req)?
        }
    };
    if handoff.prompt.is_empty() {
        return Err(ApiError::invalid("the hand-over holds no prompt tokens"));
    }
    let resume = handoff
        .choices
        .iter()
        .map(|c| Resume {
            transfer: c.transfer.clone(),
            token: c.token,
            rng_state: c.rng_state,
            logprobs: c.logprobs.as_ref().map(Logprobs::from),
        })
        .collect();
    openai::respond_with(app, kind, opts, handoff.prompt, Some(resume)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_survive_json_with_impossible_tokens() {
        let l = Logprobs {
            logprob: -0.25,
            top: vec![(7, -0.25), (3, f32::NEG_INFINITY)],
        };
        let text = serde_json::to_string(&WireLogprobs::from(&l)).unwrap();
        let back: WireLogprobs = serde_json::from_str(&text).unwrap();
        assert_eq!(Logprobs::from(&back), l);
    }

    #[test]
    fn the_token_depends_on_the_secret() {
        assert_eq!(internal_token(b"a"), internal_token(b"a"));
        assert_ne!(internal_token(b"a"), internal_token(b"b"));
        assert_eq!(internal_token(b"a").len(), 64);
    }
}
