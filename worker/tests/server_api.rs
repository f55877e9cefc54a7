//! The OpenAI-compatible server over real HTTP on 127.0.0.1 with the real test model, and the
//! continuous-batching scheduler against `Engine::generate`.
//!
//! The tests take one lock so that only one model computes at a time (the build machine is
//! small); the HTTP client is a minimal HTTP/1.1 client over a TCP stream.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use tessera_worker::engine::runner::Runner;
use tessera_worker::engine::scheduler::{
    Event, Request, Scheduler, SchedulerConfig, SchedulerHandle, SubmitError,
};
use tessera_worker::engine::{Engine, FinishReason, GenerateParams, SamplingParams};
use tessera_worker::server::{self, Readiness, ServerConfig, ServerMetrics};
use tessera_worker::tokenizer::Message;

const MODEL_NAME: &str = "smollm2-135m";
const THREADS: usize = 2;
const PER_SEQ_KV: usize = 256 << 20;
const BODY_LIMIT: usize = 64 << 10;
const FRANCE: &str = "What is the capital of France?";

use common::model_path;

/// One model at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The lock for tests outside an async runtime.
fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.blocking_lock()
}

fn sched_cfg() -> SchedulerConfig {
    SchedulerConfig {
        max_running: 4,
        max_waiting: 16,
        kv_budget_bytes: 512 << 20,
        prefill_chunk: 64,
    }
}

fn spawn_scheduler(cfg: SchedulerConfig) -> (SchedulerHandle, Arc<ServerMetrics>) {
    let engine = Engine::open(&model_path(), THREADS).expect("the model loads");
    let runner = Runner::new(engine, PER_SEQ_KV, None);
    let metrics = Arc::new(ServerMetrics::new());
    let handle = Scheduler::spawn(runner, cfg, Arc::clone(&metrics)).expect("scheduler starts");
    (handle, metrics)
}

struct Server {
    addr: SocketAddr,
    handle: SchedulerHandle,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    async fn start(cfg: SchedulerConfig, readiness: Readiness) -> Self {
        let (handle, metrics) = spawn_scheduler(cfg);
        let router = server::router(
            ServerConfig {
                max_body_bytes: BODY_LIMIT,
                readiness,
                ..ServerConfig::new(MODEL_NAME)
            },
            handle.clone(),
            metrics,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server::serve(
            listener,
            router,
            handle.clone(),
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            addr,
            handle,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    async fn default() -> Self {
        Self::start(sched_cfg(), Arc::new(|| Ok(()))).await
    }

    async fn post(&self, path: &str, body: &Value) -> Resp {
        request(self.addr, "POST", path, Some(body.to_string().as_bytes())).await
    }

    async fn get(&self, path: &str) -> Resp {
        request(self.addr, "GET", path, None).await
    }

    async fn stream(&self, path: &str, body: &Value) -> Sse {
        Sse::open(self.addr, path, body).await
    }
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn write_request(method: &str, path: &str, body: Option<&[u8]>) -> Vec<u8> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAccept: */*\r\n"
    )
    .into_bytes();
    if let Some(b) = body {
        req.extend(
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            )
            .bytes(),
        );
    }
    req.extend(b"\r\n");
    if let Some(b) = body {
        req.extend(b);
    }
    req
}

/// Status line and headers.
async fn read_head(r: &mut BufReader<TcpStream>) -> (u16, HashMap<String, String>) {
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).await.unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').expect("header");
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
    }
    (status, headers)
}

/// The next piece of a chunked body (`None` at the end).
async fn read_chunk(r: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut line = String::new();
    if r.read_line(&mut line).await.unwrap() == 0 {
        return None;
    }
    let size = usize::from_str_radix(line.trim(), 16).expect("chunk size");
    let mut buf = vec![0u8; size + 2];
    r.read_exact(&mut buf).await.unwrap();
    buf.truncate(size);
    (size > 0).then_some(buf)
}

async fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>) -> Resp {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    // The server may answer (413) before reading a large body and close: ignore write errors.
    let _ = s.write_all(&write_request(method, path, body)).await;
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r).await;
    let mut body = Vec::new();
    if headers.get("transfer-encoding").map(String::as_str) == Some("chunked") {
        while let Some(c) = read_chunk(&mut r).await {
            body.extend(c);
        }
    } else if let Some(n) = headers.get("content-length") {
        body.resize(n.parse().unwrap(), 0);
        r.read_exact(&mut body).await.unwrap();
    } else {
        r.read_to_end(&mut body).await.unwrap();
    }
    Resp {
        status,
        headers,
        body,
    }
}

/// A server-sent event stream.
struct Sse {
    status: u16,
    headers: HashMap<String, String>,
    r: BufReader<TcpStream>,
    buf: Vec<u8>,
    ended: bool,
}

impl Sse {
    async fn open(addr: SocketAddr, path: &str, body: &Value) -> Self {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(&write_request(
            "POST",
            path,
            Some(body.to_string().as_bytes()),
        ))
        .await
        .unwrap();
        let mut r = BufReader::new(s);
        let (status, headers) = read_head(&mut r).await;
        Self {
            status,
            headers,
            r,
            buf: Vec::new(),
            ended: false,
        }
    }

    /// The next `data:` payload.
    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let ev: Vec<u8> = self.buf.drain(..at + 2).collect();
                let ev = String::from_utf8(ev).expect("events are UTF-8");
                let data: Vec<&str> = ev
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect();
                if data.is_empty() {
                    continue;
                }
                return Some(data.join("\n"));
            }
            if self.ended {
                return None;
            }
            match read_chunk(&mut self.r).await {
                Some(c) => self.buf.extend(c),
                None => self.ended = true,
            }
        }
    }

    /// Every remaining payload, up to and including `[DONE]`.
    async fn rest(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(d) = self.next().await {
            let done = d == "[DONE]";
            out.push(d);
            if done {
                break;
            }
        }
        out
    }
}

fn chat_body(content: &str, max_tokens: u64) -> Value {
    json!({
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

async fn chat_text(s: &Server, content: &str, max_tokens: u64) -> (String, Value) {
    let r = s
        .post("/v1/chat/completions", &chat_body(content, max_tokens))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned();
    (text, v)
}

fn scrape(text: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("metrics parse")
}

/// The value of a sample (first one whose labels contain `labels`).
fn sample(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(v)))
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{name} is not a plain value"),
        })
}

async fn metrics(s: &Server) -> prometheus_parse::Scrape {
    let r = s.get("/metrics").await;
    assert_eq!(r.status, 200);
    scrape(&r.text())
}

/// Wait (bounded) until `cond` holds on a metrics scrape.
async fn wait_metrics(s: &Server, what: &str, cond: impl Fn(&prometheus_parse::Scrape) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if cond(&metrics(s).await) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_openai_error(r: &Resp, status: u16, param: Option<&str>) -> Value {
    assert_eq!(r.status, status, "{}", r.text());
    assert!(
        r.headers
            .get("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{:?}",
        r.headers
    );
    let v = r.json();
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{v}");
    }
    v
}

// ---------------------------------------------------------------------------------------------
// The scheduler against Engine::generate.

fn collect(rx: &mut tokio::sync::mpsc::Receiver<Event>) -> (Vec<String>, Event) {
    let mut pieces = Vec::new();
    loop {
        match rx
            .blocking_recv()
            .expect("the scheduler ends every request")
        {
            Event::Text(t) => pieces.push(t),
            e => return (pieces, e),
        }
    }
}

#[test]
fn scheduler_greedy_equals_engine_generate_with_chunked_prefill_and_interleaving() {
    let _g = serial();
    let engine = Engine::open(&model_path(), THREADS).unwrap();
    // A chunk of 5 prompt tokens per iteration: every prompt here is prefilled in several
    // iterations, interleaved with the others' decode steps.
    let (handle, _m) = spawn_scheduler(SchedulerConfig {
        prefill_chunk: 5,
        ..sched_cfg()
    });
    let prompts: Vec<(Vec<u32>, Vec<String>)> = vec![
        (
            engine.chat_prompt(&[Message::new("user", FRANCE)]).unwrap(),
            vec![],
        ),
        (
            engine
                .chat_prompt(&[Message::new("user", "Name three colours of the rainbow.")])
                .unwrap(),
            vec![],
        ),
        (
            engine
                .tokenizer
                .encode("The first five prime numbers are", true),
            vec!["11".to_owned()],
        ),
    ];
    let params = |stop: &[String]| GenerateParams {
        max_tokens: 24,
        sampling: SamplingParams::greedy(),
        stop: stop.to_vec(),
        kv_budget_bytes: PER_SEQ_KV,
        ignore_eos: false,
    };
    let mut rxs: Vec<_> = prompts
        .iter()
        .map(|(p, stop)| {
            handle
                .submit(Request {
                    prompt: p.clone(),
                    max_tokens: 24,
                    sampling: SamplingParams::greedy(),
                    stop: stop.clone(),
                    ignore_eos: false,
                })
                .unwrap()
        })
        .collect();
    for ((prompt, stop), rx) in prompts.iter().zip(&mut rxs) {
        let mut streamed = String::new();
        let want = engine
            .generate(prompt, &params(stop), |t| streamed.push_str(t))
            .unwrap();
        let (pieces, end) = collect(rx);
        let Event::Done(got) = end else {
            panic!("{end:?}")
        };
        assert_eq!(got.text, want.text);
        assert_eq!(pieces.concat(), want.text);
        assert_eq!(streamed, want.text);
        assert_eq!(got.finish_reason, want.finish_reason);
        assert_eq!(got.usage, want.usage);
    }
    assert!(rxs.len() == 3);
    handle.shutdown();
}

#[test]
fn scheduler_checks_what_it_is_given_and_honours_limits() {
    let _g = serial();
    let (handle, metrics) = spawn_scheduler(SchedulerConfig {
        max_running: 1,
        max_waiting: 0,
        kv_budget_bytes: 64 << 20,
        prefill_chunk: 64,
    });
    let cap = handle.max_sequence_tokens();
    // 64 MiB at 45 KiB per token (30 layers x 3 KV heads x 64 x K and V x 4 bytes).
    assert_eq!(cap, (64 << 20) / (30 * 192 * 2 * 4));
    let req = |prompt: Vec<u32>, max_tokens| Request {
        prompt,
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        ignore_eos: false,
    };
    assert!(matches!(
        handle.submit(req(vec![], 4)),
        Err(SubmitError::Invalid(_))
    ));
    assert!(matches!(
        handle.submit(req(vec![1], 0)),
        Err(SubmitError::Invalid(_))
    ));
    assert!(matches!(
        handle.submit(req(vec![u32::MAX], 4)),
        Err(SubmitError::Invalid(_))
    ));
    assert_eq!(
        handle.submit(req(vec![1; cap + 1], 4)).unwrap_err(),
        SubmitError::PromptTooLong {
            prompt_tokens: cap + 1,
            capacity: cap
        }
    );
    let bad = Request {
        sampling: SamplingParams {
            temperature: -1.0,
            ..SamplingParams::greedy()
        },
        ..req(vec![1], 4)
    };
    assert!(matches!(handle.submit(bad), Err(SubmitError::Invalid(_))));
    // No waiting room at all: every request is overload.
    assert!(matches!(
        handle.submit(req(vec![1, 2, 3], 4)),
        Err(SubmitError::Overloaded { .. })
    ));
    assert_eq!(handle.in_flight(), 0);
    drop(metrics);
    handle.shutdown();

    // ignore_eos and a token limit: exactly max_tokens tokens, finish_reason length.
    let (handle, _m) = spawn_scheduler(sched_cfg());
    let mut rx = handle
        .submit(Request {
            ignore_eos: true,
            ..req(vec![1, 504, 3458], 40)
        })
        .unwrap();
    let (_, end) = collect(&mut rx);
    let Event::Done(c) = end else {
        panic!("{end:?}")
    };
    assert_eq!(c.usage.completion_tokens, 40);
    assert_eq!(c.finish_reason, FinishReason::Length);
    handle.begin_drain();
    assert_eq!(
        handle.submit(req(vec![1], 1)).unwrap_err(),
        SubmitError::Draining
    );
    handle.shutdown();
}

// ---------------------------------------------------------------------------------------------
// HTTP.

#[tokio::test]
async fn chat_about_france_answers_paris_with_usage() {
    let _g = SERIAL.lock().await;
    let s = Server::default().await;
    let (text, v) = chat_text(&s, FRANCE, 24).await;
    assert!(text.contains("Paris"), "{text:?}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL_NAME);
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let tok = s.handle.tokenizer();
    let prompt = tok.encode(
        &tok.apply_chat_template(&[Message::new("user", FRANCE)], true)
            .unwrap(),
        true,
    );
    let u = &v["usage"];
    assert_eq!(u["prompt_tokens"], prompt.len());
    let completion = u["completion_tokens"].as_u64().unwrap();
    assert!(completion > 0 && completion <= 24);
    assert_eq!(u["total_tokens"], prompt.len() as u64 + completion);

    // The same answer through /v1/completions with the prompt written out.
    let r = s
        .post(
            "/v1/completions",
            &json!({
                "model": MODEL_NAME,
                "prompt": tok.apply_chat_template(&[Message::new("user", FRANCE)], true).unwrap(),
                "max_tokens": 24,
                "temperature": 0.0,
            }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let c = r.json();
    assert_eq!(c["object"], "text_completion");
    assert_eq!(c["choices"][0]["text"], text.as_str());
    assert_eq!(c["usage"], v["usage"]);
    // And with token ids as the prompt.
    let r = s
        .post(
            "/v1/completions",
            &json!({"model": MODEL_NAME, "prompt": prompt, "max_tokens": 24, "temperature": 0}),
        )
        .await;
    assert_eq!(r.json()["choices"][0]["text"], text.as_str());
}

#[tokio::test]
async fn streaming_chunks_join_to_the_whole_text() {
    let _g = SERIAL.lock().await;
    let s = Server::default().await;
    let (whole, v) = chat_text(&s, FRANCE, 24).await;
    let mut body = chat_body(FRANCE, 24);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let mut sse = s.stream("/v1/chat/completions", &body).await;
    assert_eq!(sse.status, 200);
    assert!(sse.headers["content-type"].starts_with("text/event-stream"));
    let events = sse.rest().await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk is JSON"))
        .collect();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
        assert_eq!(c["model"], MODEL_NAME);
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .filter(|t| !t.is_empty())
        .collect();
    assert!(content.len() >= 3, "{content:?}");
    assert_eq!(content.concat(), whole);
    // The finish reason, then a usage chunk with no choices.
    let n = chunks.len();
    assert_eq!(chunks[n - 2]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[n - 1]["choices"], json!([]));
    assert_eq!(chunks[n - 1]["usage"], v["usage"]);
    assert!(chunks[..n - 1].iter().all(|c| c["usage"].is_null()));

    // Text completions stream too (no usage chunk unless asked).
    let body = json!({"model": MODEL_NAME, "prompt": "The capital of France is", "max_tokens": 12,
                      "temperature": 0});
    let whole = s.post("/v1/completions", &body).await.json()["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = s.stream("/v1/completions", &streamed).await.rest().await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, whole);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
}

#[tokio::test]
async fn malformed_requests_get_openai_errors() {
    let _g = SERIAL.lock().await;
    let s = Server::default().await;
    let chat = "/v1/chat/completions";

    let r = request(s.addr, "POST", chat, Some(b"{\"model\": ")).await;
    assert_openai_error(&r, 400, None);
    let r = request(s.addr, "POST", chat, Some(b"[1, 2, 3]")).await;
    assert_openai_error(&r, 400, None);
    let r = request(s.addr, "POST", chat, Some(b"")).await;
    assert_openai_error(&r, 400, None);
    // Invalid UTF-8 inside a string.
    let mut bad =
        br#"{"model": "smollm2-135m", "messages": [{"role": "user", "content": "caf"#.to_vec();
    bad.extend([0xC3, 0x28]);
    bad.extend(br#""}]}"#);
    let r = request(s.addr, "POST", chat, Some(&bad)).await;
    let v = assert_openai_error(&r, 400, None);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("UTF-8"),
        "{v}"
    );
    // Oversized body.
    let big = json!({"model": MODEL_NAME, "messages": [{"role": "user", "content": "x".repeat(BODY_LIMIT * 2)}]});
    let r = s.post(chat, &big).await;
    assert_openai_error(&r, 413, None);

    let cases: Vec<(Value, u16, Option<&str>)> = vec![
        (
            json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}),
            404,
            Some("model"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            400,
            Some("model"),
        ),
        (
            json!({"model": MODEL_NAME, "messages": []}),
            400,
            Some("messages"),
        ),
        (json!({"model": MODEL_NAME}), 400, Some("messages")),
        (json!({"model": MODEL_NAME, "messages": "hi"}), 400, None),
        (
            json!({"model": MODEL_NAME, "messages": [{"role": "wizard", "content": "hi"}]}),
            400,
            Some("messages[0].role"),
        ),
        (
            json!({"model": MODEL_NAME, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            400,
            Some("messages[0].content[0]"),
        ),
        (
            json!({"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}),
            400,
            Some("max_tokens"),
        ),
        (
            json!({"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
            400,
            Some("max_tokens"),
        ),
        (
            json!({"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -5}),
            400,
            Some("max_completion_tokens"),
        ),
        (
            json!({"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1_000_000_000}),
            400,
            Some("messages"),
        ),
        (
            json!({"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}),
            400,
            None,
        ),
        (
            json!({"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": 5}),
            400,
            Some("temperature"),
        ),
        (
            json!({"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": -0.5}),
            400,
            Some("temperature"),
        ),
        (
            json!({"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}),
            400,
            Some("top_p"),
        ),
        (
            json!({"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "top_k": -3}),
            400,
            Some("top_k"),
        ),
        (
            json!({"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "n": 9}),
            400,
            Some("n"),
        ),
        (
            json!({"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "logprobs": 3}),
            400,
            Some("logprobs"),
        ),
        (
            json!({"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "stop": vec!["a"; 17]}),
            400,
            Some("stop"),
        ),
    ];
    for (body, status, param) in &cases {
        let r = s.post(chat, body).await;
        assert_openai_error(&r, *status, *param);
    }
    let v = assert_openai_error(&s.post(chat, &cases[10].0).await, 400, None);
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let v = assert_openai_error(&s.post(chat, &cases[0].0).await, 404, None);
    assert_eq!(v["error"]["code"], "model_not_found");

    let cmpl = "/v1/completions";
    for (body, param) in [
        (json!({"model": MODEL_NAME, "prompt": []}), "prompt"),
        (json!({"model": MODEL_NAME, "prompt": ["a", "b"]}), "prompt"),
        (json!({"model": MODEL_NAME, "prompt": ""}), "prompt"),
        (json!({"model": MODEL_NAME}), "prompt"),
        (
            json!({"model": MODEL_NAME, "prompt": "hi", "echo": true}),
            "echo",
        ),
        (
            json!({"model": MODEL_NAME, "prompt": "hi", "best_of": 3}),
            "best_of",
        ),
    ] {
        let r = s.post(cmpl, &body).await;
        assert_openai_error(&r, 400, Some(param));
    }
    // Token ids outside the vocabulary.
    let r = s
        .post(
            cmpl,
            &json!({"model": MODEL_NAME, "prompt": [1, 4_000_000_000u32]}),
        )
        .await;
    assert_openai_error(&r, 400, None);

    // Wrong method, unknown route.
    assert_openai_error(&s.get(chat).await, 405, None);
    assert_openai_error(&s.get("/v1/nothing").await, 404, None);
    assert_openai_error(&s.get("/v1/models/gpt-4").await, 404, Some("model"));

    // After all that, the server still answers.
    let (text, _) = chat_text(&s, FRANCE, 24).await;
    assert!(text.contains("Paris"), "{text:?}");
    assert_eq!(s.handle.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_give_the_sequential_greedy_text() {
    let _g = SERIAL.lock().await;
    let s = Arc::new(Server::default().await);
    let questions = [
        FRANCE,
        "What is 2 + 2?",
        "Write one sentence about the sea.",
    ];
    let mut sequential = Vec::new();
    for q in questions {
        sequential.push(chat_text(&s, q, 24).await.0);
    }
    let before = metrics(&s).await;
    // Six at once (two of each), four running and two waiting at first.
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                let (text, v) = chat_text(&s, questions[i % 3], 24).await;
                (i, text, v)
            })
        })
        .collect();
    let mut generated = 0;
    let mut prompt = 0;
    for t in tasks {
        let (i, text, v) = t.await.unwrap();
        assert_eq!(text, sequential[i % 3], "request {i}");
        generated += v["usage"]["completion_tokens"].as_u64().unwrap();
        prompt += v["usage"]["prompt_tokens"].as_u64().unwrap();
    }
    let after = metrics(&s).await;
    let delta = |n: &str| sample(&after, n, &[]).unwrap() - sample(&before, n, &[]).unwrap();
    assert_eq!(delta("tessera_generated_tokens_total"), generated as f64);
    assert_eq!(delta("tessera_prompt_tokens_total"), prompt as f64);
    assert_eq!(sample(&after, "tessera_requests_running", &[]), Some(0.0));
    assert_eq!(sample(&after, "tessera_requests_waiting", &[]), Some(0.0));
    assert_eq!(s.handle.in_flight(), 0);
}

#[tokio::test]
async fn metrics_parse_and_count() {
    let _g = SERIAL.lock().await;
    let s = Server::default().await;
    let m = metrics(&s).await;
    for name in [
        "tessera_requests_waiting",
        "tessera_requests_running",
        "tessera_kv_cache_usage_ratio",
        "tessera_prompt_tokens_total",
        "tessera_generated_tokens_total",
        "tessera_time_to_first_token_seconds_count",
        "tessera_inter_token_latency_seconds_count",
        "tessera_allreduce_calls_total",
        "tessera_allreduce_bytes_total",
        "tessera_allreduce_seconds_total",
    ] {
        assert!(sample(&m, name, &[]).is_some(), "{name} missing");
    }
    assert!(
        m.samples
            .iter()
            .any(|x| x.metric == "tessera_time_to_first_token_seconds"
                && matches!(&x.value, prometheus_parse::Value::Histogram(h) if h.len() > 10)),
        "TTFT buckets"
    );
    assert_eq!(sample(&m, "tessera_prompt_tokens_total", &[]), Some(0.0));
    assert_eq!(sample(&m, "tessera_generated_tokens_total", &[]), Some(0.0));

    let (_, v) = chat_text(&s, FRANCE, 24).await;
    let completion = v["usage"]["completion_tokens"].as_f64().unwrap();
    let m = metrics(&s).await;
    assert_eq!(
        sample(&m, "tessera_prompt_tokens_total", &[]),
        v["usage"]["prompt_tokens"].as_f64()
    );
    assert_eq!(
        sample(&m, "tessera_generated_tokens_total", &[]),
        Some(completion)
    );
    assert_eq!(
        sample(&m, "tessera_time_to_first_token_seconds_count", &[]),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "tessera_inter_token_latency_seconds_count", &[]),
        Some(completion - 1.0)
    );
    assert_eq!(
        sample(&m, "tessera_requests_total", &[("finish_reason", "stop")]),
        Some(1.0)
    );
    assert_eq!(sample(&m, "tessera_requests_running", &[]), Some(0.0));
    // Released after the request: nothing left in the cache.
    assert_eq!(sample(&m, "tessera_kv_cache_usage_ratio", &[]), Some(0.0));

    // A request whose very first token ends it (a stop token, forced by logit_bias) still has
    // a time to first token.
    let mut body = chat_body(FRANCE, 8);
    body["logit_bias"] = json!({"42": 100});
    body["stop_token_ids"] = json!([42]);
    let r = s.post("/v1/chat/completions", &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["message"]["content"], "");
    let m = metrics(&s).await;
    assert_eq!(
        sample(&m, "tessera_time_to_first_token_seconds_count", &[]),
        Some(2.0)
    );
    assert_eq!(
        sample(&m, "tessera_requests_total", &[("finish_reason", "stop")]),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_gets_429_and_a_client_leaving_frees_its_slot() {
    let _g = SERIAL.lock().await;
    let s = Server::start(
        SchedulerConfig {
            max_running: 1,
            max_waiting: 1,
            ..sched_cfg()
        },
        Arc::new(|| Ok(())),
    )
    .await;
    // A: a long stream that holds the only running slot.
    let mut long = chat_body("Tell me a very long story.", 4000);
    long["stream"] = json!(true);
    long["ignore_eos"] = json!(true);
    let mut a = s.stream("/v1/chat/completions", &long).await;
    assert_eq!(a.status, 200);
    a.next().await.expect("role chunk");
    a.next().await.expect("first text chunk");
    // B waits for the slot.
    let addr = s.addr;
    let b = tokio::spawn(async move {
        request(
            addr,
            "POST",
            "/v1/chat/completions",
            Some(chat_body(FRANCE, 24).to_string().as_bytes()),
        )
        .await
    });
    wait_metrics(&s, "one waiting request", |m| {
        sample(m, "tessera_requests_waiting", &[]) == Some(1.0)
    })
    .await;
    // C finds the queue full, and is refused before its prompt is tokenised.
    let tokenized = |m: &prometheus_parse::Scrape| {
        sample(m, "tessera_tokenize_seconds_count", &[]).expect("tessera_tokenize_seconds")
    };
    let before = tokenized(&metrics(&s).await);
    let r = s.post("/v1/chat/completions", &chat_body(FRANCE, 24)).await;
    let v = assert_openai_error(&r, 429, None);
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert!(r.headers.contains_key("retry-after"), "{:?}", r.headers);
    let mut prompt = json!({"model": MODEL_NAME, "prompt": "word ".repeat(4000), "max_tokens": 4});
    let r = s.post("/v1/completions", &prompt).await;
    assert_openai_error(&r, 429, None);
    assert_eq!(
        tokenized(&metrics(&s).await),
        before,
        "a refused prompt was tokenised"
    );
    prompt["prompt"] = json!([1, 2, 3]);
    assert_openai_error(&s.post("/v1/completions", &prompt).await, 429, None);
    // A's client leaves: its sequence is cancelled and B runs.
    drop(a);
    let rb = b.await.unwrap();
    assert_eq!(rb.status, 200, "{}", rb.text());
    assert!(
        rb.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Paris")
    );
    let m = metrics(&s).await;
    assert_eq!(
        sample(
            &m,
            "tessera_requests_total",
            &[("finish_reason", "cancelled")]
        ),
        Some(1.0)
    );
    assert_eq!(s.handle.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_refuses_new_requests_and_finishes_the_one_in_flight() {
    let _g = SERIAL.lock().await;
    let mut s = Server::default().await;
    let mut body = chat_body("Tell me a story.", 300);
    body["stream"] = json!(true);
    body["ignore_eos"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let mut a = s.stream("/v1/chat/completions", &body).await;
    assert_eq!(a.status, 200);
    a.next().await.expect("role chunk");
    a.next().await.expect("first text chunk");
    s.shutdown.take().unwrap().send(()).unwrap();
    // Admission stops: new requests get 503 (once the shutdown is seen).
    let deadline = Instant::now() + Duration::from_secs(60);
    let refused = loop {
        let r = s.post("/v1/chat/completions", &chat_body(FRANCE, 1)).await;
        if r.status == 503 {
            break r;
        }
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(Instant::now() < deadline, "admission never stopped");
    };
    let v = assert_openai_error(&refused, 503, None);
    assert_eq!(v["error"]["code"], "server_shutting_down");
    assert!(refused.headers.contains_key("retry-after"));
    assert_eq!(s.get("/readyz").await.status, 503);
    // The request in flight completes.
    let events = a.rest().await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 300);
    // Then serve returns, and nothing listens any more.
    s.task.take().unwrap().await.unwrap().unwrap();
    assert!(TcpStream::connect(s.addr).await.is_err());
    s.handle.shutdown();
}

#[tokio::test]
async fn health_readiness_and_models() {
    let _g = SERIAL.lock().await;
    let ready = Arc::new(AtomicBool::new(false));
    let r2 = Arc::clone(&ready);
    let s = Server::start(
        sched_cfg(),
        Arc::new(move || {
            if r2.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("rank 2 lost".into())
            }
        }),
    )
    .await;
    assert_eq!(s.get("/healthz").await.status, 200);
    let r = s.get("/readyz").await;
    assert_eq!(r.status, 503);
    assert!(r.text().contains("rank 2 lost"), "{}", r.text());
    ready.store(true, Ordering::SeqCst);
    assert_eq!(s.get("/readyz").await.status, 200);
    let m = s.get("/v1/models").await.json();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], MODEL_NAME);
    assert_eq!(m["data"][0]["object"], "model");
    let one = s.get(&format!("/v1/models/{MODEL_NAME}")).await.json();
    assert_eq!(one["id"], MODEL_NAME);
}

#[test]
fn metrics_can_carry_the_gpu_gauges() {
    let m = ServerMetrics::new();
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/h100-hgx.json");
    let fake = tessera_worker::telemetry::fake::FakeTelemetry::from_file(&fixture).unwrap();
    m.set_gpu_telemetry(Arc::new(fake), "node-1".into());
    m.generated_tokens.inc_by(5);
    let text = m.render();
    assert_eq!(text.matches("# EOF").count(), 1, "{text}");
    assert!(text.trim_end().ends_with("# EOF"));
    let s = scrape(&text);
    assert_eq!(sample(&s, "tessera_generated_tokens_total", &[]), Some(5.0));
    assert_eq!(sample(&s, "tessera_nvml_up", &[]), Some(1.0));
    assert!(
        sample(
            &s,
            "DCGM_FI_DEV_GPU_UTIL",
            &[("gpu", "0"), ("Hostname", "node-1")]
        )
        .is_some()
    );
}

/// The high-temperature reproduction: ordinary requests at `temperature: 2.0` (valid in OpenAI's
/// API) over a prompt with emoji and Chinese. Sampling at that temperature picks lone bytes of
/// multi-byte characters; the scheduler's text stream used to decode lossily after an invalid
/// byte, send U+FFFD for a character still arriving and then slice inside it: the scheduler
/// thread panicked (here: the completion with seed 3), and from then on every request got 503
/// while `/healthz` stayed 200. Every request must succeed and the replica stay live and ready.
#[tokio::test]
async fn high_temperature_requests_over_multilingual_text_leave_the_replica_ready() {
    let _g = SERIAL.lock().await;
    let s = Server::default().await;
    let prompt = "Écris un poème 🌍🚀 sur la mer: 大海啊，你好！😀 用中文回答。";
    let total = 96usize;
    let mut generated = 0u64;
    let mut replacement_seen = false;
    for wave in 0..total / 4 {
        let mut tasks = Vec::new();
        for k in 0..4 {
            let addr = s.addr;
            let i = wave * 4 + k;
            let stream = i % 2 == 1;
            let chat = i % 3 == 2;
            let mut body = json!({
                "model": MODEL_NAME,
                "max_tokens": 24,
                "temperature": 2.0,
                "seed": i,
                "stream": stream,
            });
            if chat {
                body["messages"] = json!([{"role": "user", "content": prompt}]);
            } else {
                body["prompt"] = json!(prompt);
            }
            // Some requests with stop sequences (held-back text must not hide the bug).
            let with_stop = i % 4 == 1;
            if with_stop {
                body["stop"] = json!(["海", "\n\n"]);
            }
            let path = if chat {
                "/v1/chat/completions"
            } else {
                "/v1/completions"
            };
            tasks.push(tokio::spawn(async move {
                let text = if stream {
                    let mut sse = Sse::open(addr, path, &body).await;
                    let events = sse.rest().await;
                    assert_eq!(
                        events.last().map(String::as_str),
                        Some("[DONE]"),
                        "{events:?}"
                    );
                    let mut text = String::new();
                    for e in &events[..events.len() - 1] {
                        let v: Value = serde_json::from_str(e).expect("chunk is JSON");
                        assert!(v.get("error").is_none(), "request {i}: {v}");
                        let c = &v["choices"][0];
                        if let Some(t) = c["delta"]["content"].as_str().or(c["text"].as_str()) {
                            text.push_str(t);
                        }
                    }
                    text
                } else {
                    let r = request(addr, "POST", path, Some(body.to_string().as_bytes())).await;
                    assert_eq!(r.status, 200, "request {i}: {}", r.text());
                    let v = r.json();
                    let c = &v["choices"][0];
                    c["message"]["content"]
                        .as_str()
                        .or(c["text"].as_str())
                        .expect("text")
                        .to_owned()
                };
                if with_stop {
                    assert!(
                        !text.contains('海') && !text.contains("\n\n"),
                        "request {i}: a stop sequence was sent: {text:?}"
                    );
                }
                text
            }));
        }
        for t in tasks {
            let text = t.await.expect("request task");
            replacement_seen |= text.contains('\u{FFFD}');
            generated += text.len() as u64;
        }
    }
    assert!(generated > 0);
    // The sampled text did contain broken characters, so the case was exercised.
    assert!(
        replacement_seen,
        "no invalid UTF-8 was sampled: the test lost its point"
    );
    assert_eq!(s.get("/healthz").await.status, 200);
    assert_eq!(s.get("/readyz").await.status, 200);
    let m = metrics(&s).await;
    let finished = |reason: &str| {
        sample(&m, "tessera_requests_total", &[("finish_reason", reason)]).unwrap_or(0.0)
    };
    assert_eq!(finished("error"), 0.0);
    assert_eq!(finished("stop") + finished("length"), total as f64);
    s.handle.shutdown();
}

/// A step broadcast that panics at its `n`th step, standing in for any bug in the scheduler
/// thread.
struct PanicAt(usize);

impl tessera_worker::engine::runner::StepBroadcast for PanicAt {
    fn broadcast(&mut self, _: &tessera_worker::engine::runner::Step) -> anyhow::Result<()> {
        self.0 = self.0.saturating_sub(1);
        assert!(self.0 > 0, "injected fault in the scheduler thread");
        Ok(())
    }
}

/// A scheduler that panics must fail liveness (so Kubernetes restarts the pod) and refuse
/// requests with 503, never leave `/healthz` at 200 with a dead engine.
#[tokio::test]
async fn a_panicking_scheduler_fails_liveness_and_readiness() {
    let _g = SERIAL.lock().await;
    let engine = Engine::open(&model_path(), THREADS).expect("the model loads");
    let runner = Runner::new(engine, PER_SEQ_KV, Some(Box::new(PanicAt(3))));
    let metrics = Arc::new(ServerMetrics::new());
    let handle = Scheduler::spawn(runner, sched_cfg(), Arc::clone(&metrics)).unwrap();
    let router = server::router(
        ServerConfig::new(MODEL_NAME),
        handle.clone(),
        Arc::clone(&metrics),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move { axum::serve(listener, router).await });
    let h = request(addr, "GET", "/healthz", None).await;
    assert_eq!(h.status, 200);
    let r = request(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(chat_body(FRANCE, 8).to_string().as_bytes()),
    )
    .await;
    // The request in flight ends with the reason, and by then liveness already fails (the
    // failure is recorded before any sequence learns of it: a client retrying on the 503 and a
    // probe right after must agree).
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("injected fault"), "{}", r.text());
    let h = request(addr, "GET", "/healthz", None).await;
    assert_eq!(h.status, 503, "{}", h.text());
    assert!(
        h.text().contains("panicked") && h.text().contains("injected fault"),
        "{}",
        h.text()
    );
    assert_eq!(request(addr, "GET", "/readyz", None).await.status, 503);
    let again = request(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(chat_body(FRANCE, 8).to_string().as_bytes()),
    )
    .await;
    assert_eq!(again.status, 503, "{}", again.text());
    task.abort();
}

/// OpenAI fields the server does not implement are refused with 400 naming the field (they were
/// silently ignored), while their neutral values, which clients send by default, are accepted.
#[tokio::test]
async fn unsupported_openai_fields_are_refused_by_name_and_neutral_values_pass() {
    let _g = SERIAL.lock().await;
    let s = Server::default().await;
    let chat = "/v1/chat/completions";
    let with = |field: &str, v: Value| {
        let mut b = chat_body(FRANCE, 4);
        b[field] = v;
        b
    };
    let tool = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    for (field, v) in [
        ("tools", tool),
        ("tool_choice", json!("required")),
        (
            "tool_choice",
            json!({"type": "function", "function": {"name": "f"}}),
        ),
        ("functions", json!([{"name": "f"}])),
        ("response_format", json!({"type": "json_object"})),
        (
            "response_format",
            json!({"type": "json_schema", "json_schema": {"name": "x"}}),
        ),
        ("repetition_penalty", json!(1.2)),
    ] {
        let r = s.post(chat, &with(field, v.clone())).await;
        let e = assert_openai_error(&r, 400, Some(field));
        assert_eq!(e["error"]["code"], "unsupported_parameter", "{field}={v}");
        assert!(
            e["error"]["message"].as_str().unwrap().starts_with(field),
            "{e}"
        );
    }
    for (field, v) in [
        ("tools", json!([])),
        ("tool_choice", json!("none")),
        ("response_format", json!({"type": "text"})),
        ("presence_penalty", json!(0)),
        ("frequency_penalty", json!(0.0)),
        ("repetition_penalty", json!(1.0)),
        ("logit_bias", json!({})),
        ("stop_token_ids", json!([])),
        ("top_logprobs", json!(0)),
    ] {
        let r = s.post(chat, &with(field, v.clone())).await;
        assert_eq!(r.status, 200, "{field}={v}: {}", r.text());
    }
    // Model ids with a slash (Hugging Face style) are routed to the model, not a 404 route.
    let r = s.get("/v1/models/org/some-model").await;
    let e = assert_openai_error(&r, 404, Some("model"));
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("org/some-model"),
        "{e}"
    );
    s.handle.shutdown();
}

/// A server whose served name contains `/` answers `GET /v1/models/{id}` for it.
#[tokio::test]
async fn a_served_name_with_a_slash_is_found() {
    let _g = SERIAL.lock().await;
    let (handle, metrics) = spawn_scheduler(sched_cfg());
    let name = "HuggingFaceTB/SmolLM2-135M-Instruct";
    let router = server::router(ServerConfig::new(name), handle.clone(), metrics);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move { axum::serve(listener, router).await });
    let r = request(addr, "GET", &format!("/v1/models/{name}"), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["id"], name);
    task.abort();
    handle.shutdown();
}

/// Start a server with explicit HTTP limits; returns its address, the scheduler and the serve
/// task with its shutdown trigger.
async fn start_limited(
    limits: server::HttpLimits,
) -> (
    SocketAddr,
    SchedulerHandle,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let (handle, metrics) = spawn_scheduler(sched_cfg());
    let router = server::router(ServerConfig::new(MODEL_NAME), handle.clone(), metrics);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server::serve_with_limits(
        listener,
        router,
        handle.clone(),
        limits,
        async move {
            let _ = rx.await;
        },
    ));
    (addr, handle, tx, task)
}

/// Read until the server closes the connection (or `limit` passes: then `None`).
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A client that trickles its header, or sits idle on a kept-alive connection, is cut after
/// the header read timeout (axum's serve had no timer: such clients were held forever); beyond
/// the connection cap a new connection is closed at once and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_idle_and_excess_connections_are_cut() {
    let _g = SERIAL.lock().await;
    let limits = server::HttpLimits {
        header_read_timeout: Duration::from_secs(2),
        max_connections: 2,
        shutdown_grace: Duration::from_secs(5),
    };
    let (addr, handle, stop, task) = start_limited(limits).await;
    // A trickled header: cut within the timeout (plus slack), never answered.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let got = closed_within(&mut slow, Duration::from_secs(10))
        .await
        .expect("a trickling client is disconnected");
    assert!(!String::from_utf8_lossy(&got).contains("200 OK"), "{got:?}");
    // An idle keep-alive connection after one answered request: closed.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = closed_within(&mut idle, Duration::from_secs(10))
        .await
        .expect("an idle kept-alive connection is closed");
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"),
        "{got:?}"
    );
    // The cap: two connections hold both slots; a third is closed at once, without an answer.
    let _a = TcpStream::connect(addr).await.unwrap();
    let _b = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    let _ = c
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let got = closed_within(&mut c, Duration::from_millis(900))
        .await
        .expect("the connection beyond the cap is closed before the header timeout");
    assert!(got.is_empty(), "{got:?}");
    assert!(server::HTTP_CONNECTIONS_REFUSED.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    // Once the idle holders time out, connections are accepted again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = request(addr, "GET", "/healthz", None).await;
    assert_eq!(r.status, 200);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    handle.shutdown();
}

/// Shutdown does not wait for idle connections: with one open and silent (and a header timeout
/// far away), the server still returns within its grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_does_not_hold_shutdown() {
    let _g = SERIAL.lock().await;
    let limits = server::HttpLimits {
        header_read_timeout: Duration::from_secs(600),
        max_connections: 16,
        shutdown_grace: Duration::from_secs(3),
    };
    let (addr, handle, stop, task) = start_limited(limits).await;
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let _silent = TcpStream::connect(addr).await.unwrap();
    let t = Instant::now();
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(8), task)
        .await
        .expect("serve returns although connections are open")
        .unwrap()
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(8));
    handle.shutdown();
}

/// A burst beyond the tokenisation permits waits for one instead of getting 429 (with one
/// permit and eight requests at once, most find it taken).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_beyond_the_tokenisation_permits_waits_for_them() {
    let _g = SERIAL.lock().await;
    let (handle, metrics) = spawn_scheduler(sched_cfg());
    let cfg = ServerConfig {
        max_concurrent_tokenizations: 1,
        ..ServerConfig::new(MODEL_NAME)
    };
    let router = server::router(cfg, handle.clone(), metrics);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move { axum::serve(listener, router).await });
    let prompt = "The history of the city of Paris begins about 250 BC. ".repeat(40);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let body = json!({"model": MODEL_NAME, "prompt": prompt, "max_tokens": 2});
            tokio::spawn(async move {
                request(
                    addr,
                    "POST",
                    "/v1/completions",
                    Some(body.to_string().as_bytes()),
                )
                .await
            })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    task.abort();
    handle.shutdown();
}

// ---------------------------------------------------------------------------------------------
// Sampling fields: stop_token_ids, logit_bias, penalties, logprobs, n.

fn completion_body(prompt: &str, max_tokens: u64) -> Value {
    json!({"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

/// The token ids of a greedy completion (each token's text, through `logprobs: 0`).
async fn greedy_tokens(s: &Server, extra: Value) -> (Vec<u32>, Value) {
    let mut b = completion_body("one two three four five six", 8);
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    let r = s.post("/v1/completions", &b).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let tok = s.handle.tokenizer();
    let text = v["choices"][0]["text"].as_str().unwrap();
    (tok.encode(text, false), v)
}

#[tokio::test]
async fn stop_token_ids_logit_bias_and_penalties_change_generation() {
    let _g = SERIAL.lock().await;
    let s = Server::default().await;
    let tok = s.handle.tokenizer().clone();
    let vocab = s.handle.vocab_size();
    let base = json!({"logprobs": 0});
    let (_, v) = greedy_tokens(&s, base.clone()).await;
    let tokens: Vec<String> = v["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    assert_eq!(tokens.len(), 8, "{v}");
    let ids: Vec<u32> = tokens
        .iter()
        .map(|t| {
            let e = tok.encode(t, false);
            assert_eq!(e.len(), 1, "{t:?} is one token");
            e[0]
        })
        .collect();

    // stop_token_ids: stops at the third token, which is not in the text.
    let (_, v) = greedy_tokens(&s, json!({"stop_token_ids": [ids[2]]})).await;
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "stop", "{v}");
    assert_eq!(c["text"], tokens[..2].concat(), "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 2, "{v}");

    // logit_bias +100 on one token: greedy repeats it.
    let target = tok.encode(" apple", false)[0];
    let (got, v) = greedy_tokens(&s, json!({"logit_bias": {target.to_string(): 100}})).await;
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert_eq!(text, " apple".repeat(8), "{v}");
    assert!(got.iter().all(|&t| t == target), "{got:?}");
    // -100 on the greedy first token: the first token changes.
    let (_, v) = greedy_tokens(
        &s,
        json!({"logit_bias": {ids[0].to_string(): -100}, "logprobs": 0}),
    )
    .await;
    let first = v["choices"][0]["logprobs"]["tokens"][0].as_str().unwrap();
    assert_ne!(first, tokens[0], "{v}");

    // Penalties on a repetitive prompt change the greedy continuation.
    let rep = json!({"model": MODEL_NAME, "prompt": "la la la la la la la la", "max_tokens": 12, "temperature": 0});
    let text = |v: &Value| v["choices"][0]["text"].as_str().unwrap().to_owned();
    let r0 = s.post("/v1/completions", &rep).await;
    assert_eq!(r0.status, 200, "{}", r0.text());
    for (field, val) in [("presence_penalty", 2.0), ("frequency_penalty", 2.0)] {
        let mut b = rep.clone();
        b[field] = json!(val);
        let r = s.post("/v1/completions", &b).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_ne!(text(&r.json()), text(&r0.json()), "{field} changed nothing");
    }

    // Bad values: 400 naming the field.
    let chat = "/v1/chat/completions";
    let with = |field: &str, v: Value| {
        let mut b = chat_body(FRANCE, 4);
        b[field] = v;
        b
    };
    for (field, v) in [
        ("stop_token_ids", json!([vocab])),
        ("stop_token_ids", json!([-1])),
        ("stop_token_ids", json!("2")),
        ("stop_token_ids", json!(vec![1; 65])),
        ("logit_bias", json!({"abc": 1})),
        ("logit_bias", json!({vocab.to_string(): 1})),
        ("logit_bias", json!({"5": 101})),
        ("logit_bias", json!({"5": "x"})),
        ("logit_bias", json!([1])),
        (
            "logit_bias",
            Value::Object((0..301).map(|i| (i.to_string(), json!(1))).collect()),
        ),
        ("presence_penalty", json!(2.5)),
        ("frequency_penalty", json!(-2.01)),
        ("top_logprobs", json!(21)),
        ("top_logprobs", json!(2)),
        ("n", json!(0)),
    ] {
        let r = s.post(chat, &with(field, v.clone())).await;
        let e = assert_openai_error(&r, 400, Some(field));
        assert!(
            e["error"]["message"].as_str().unwrap().contains(field),
            "{field}={v}: {e}"
        );
    }
    let r = s
        .post(
            "/v1/completions",
            &json!({"model": MODEL_NAME, "prompt": "x", "logprobs": 6}),
        )
        .await;
    assert_openai_error(&r, 400, Some("logprobs"));
    s.handle.shutdown();
}

fn assert_close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() < 1e-3, "{what}: {a} vs {b}");
}

#[tokio::test]
async fn logprobs_come_in_openai_shapes_streamed_and_whole() {
    let _g = SERIAL.lock().await;
    let s = Server::default().await;
    // Completions: logprobs = 3.
    let mut b = completion_body("one two three four five six", 6);
    b["logprobs"] = json!(3);
    let r = s.post("/v1/completions", &b).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let c = &v["choices"][0];
    let lp = &c["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 6, "{v}");
    let joined: String = tokens.iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(joined, c["text"].as_str().unwrap(), "{v}");
    let mut off = 0;
    for (i, t) in tokens.iter().enumerate() {
        assert_eq!(lp["text_offset"][i], off, "{v}");
        off += t.as_str().unwrap().len();
        let l = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(l <= 0.0, "{v}");
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 3, "{v}");
        // Greedy: the sampled token is the most likely one.
        let best = top
            .values()
            .map(|x| x.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert_close(l, best, "greedy token is the top one");
    }
    // Streamed: the same logprobs, spread over the chunks.
    b["stream"] = json!(true);
    let mut sse = s.stream("/v1/completions", &b).await;
    assert_eq!(sse.status, 200);
    let mut streamed = Vec::new();
    let mut offsets = Vec::new();
    for d in sse.rest().await {
        if d == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&d).unwrap();
        if let Some(l) = v["choices"][0]["logprobs"].as_object() {
            for (i, x) in l["token_logprobs"].as_array().unwrap().iter().enumerate() {
                streamed.push(x.as_f64().unwrap());
                offsets.push(l["text_offset"][i].as_u64().unwrap());
            }
        }
    }
    let whole: Vec<f64> = lp["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(streamed.len(), whole.len());
    for (a, b) in streamed.iter().zip(&whole) {
        assert_close(*a, *b, "streamed logprob");
    }
    let whole_off: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(offsets, whole_off);

    // Chat: logprobs true, top_logprobs 2.
    let mut b = chat_body(FRANCE, 5);
    b["logprobs"] = json!(true);
    b["top_logprobs"] = json!(2);
    let r = s.post("/v1/chat/completions", &b).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 5, "{v}");
    let mut bytes = Vec::new();
    for e in content {
        assert!(e["logprob"].as_f64().unwrap() <= 0.0, "{e}");
        bytes.extend(
            e["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8),
        );
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2, "{e}");
        assert!(
            top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64(),
            "{e}"
        );
        assert_close(
            e["logprob"].as_f64().unwrap(),
            top[0]["logprob"].as_f64().unwrap(),
            "greedy",
        );
    }
    assert_eq!(
        String::from_utf8(bytes).unwrap(),
        v["choices"][0]["message"]["content"].as_str().unwrap()
    );
    // Streamed chat: every token's entry arrives.
    b["stream"] = json!(true);
    let mut sse = s.stream("/v1/chat/completions", &b).await;
    let mut n = 0;
    for d in sse.rest().await {
        if d == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&d).unwrap();
        if let Some(c) = v["choices"][0]["logprobs"]["content"].as_array() {
            n += c.len();
        }
    }
    assert_eq!(n, 5);
    // Without logprobs, null as before.
    let (_, v) = chat_text(&s, FRANCE, 2).await;
    assert!(v["choices"][0]["logprobs"].is_null(), "{v}");
    s.handle.shutdown();
}

#[tokio::test]
async fn n_choices_are_independent_and_usage_sums_them() {
    let _g = SERIAL.lock().await;
    let s = Server::default().await;
    let mut b = chat_body(FRANCE, 6);
    b["n"] = json!(3);
    b["temperature"] = json!(1.5);
    b["seed"] = json!(7);
    let r = s.post("/v1/chat/completions", &b).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "{v}");
    let mut texts = Vec::new();
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i, "{v}");
        texts.push(c["message"]["content"].as_str().unwrap().to_owned());
    }
    assert!(texts[0] != texts[1] || texts[1] != texts[2], "{texts:?}");
    // Seeded: the same request gives the same choices; choice 0 is what n = 1 gives.
    let again = s.post("/v1/chat/completions", &b).await.json();
    for i in 0..3 {
        assert_eq!(again["choices"][i]["message"]["content"], texts[i].as_str());
    }
    let mut one = b.clone();
    one["n"] = json!(1);
    let v1 = s.post("/v1/chat/completions", &one).await.json();
    assert_eq!(v1["choices"][0]["message"]["content"], texts[0].as_str());
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(prompt, v1["usage"]["prompt_tokens"].as_u64().unwrap());
    let sum = 3 * 6;
    // Every choice ran to max_tokens or stopped early; the sum counts them all.
    let completion = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(completion <= sum && completion >= 3, "{v}");
    assert_eq!(
        v["usage"]["total_tokens"].as_u64().unwrap(),
        prompt + completion
    );

    // Streamed: chunks of each index join to that choice's text; usage at the end.
    b["stream"] = json!(true);
    b["stream_options"] = json!({"include_usage": true});
    let mut sse = s.stream("/v1/chat/completions", &b).await;
    let mut joined = vec![String::new(); 3];
    let mut finished = [false; 3];
    let mut usage = Value::Null;
    for d in sse.rest().await {
        if d == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&d).unwrap();
        if !v["usage"].is_null() {
            usage = v["usage"].clone();
        }
        for c in v["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            if let Some(t) = c["delta"]["content"].as_str() {
                joined[i].push_str(t);
            }
            if c["finish_reason"].is_string() {
                finished[i] = true;
            }
        }
    }
    assert_eq!(joined, texts);
    assert_eq!(finished, [true; 3]);
    assert_eq!(usage["completion_tokens"], completion);
    // Completions too.
    let mut c = completion_body("one two three four five six", 3);
    c["n"] = json!(2);
    let v = s.post("/v1/completions", &c).await.json();
    assert_eq!(v["choices"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["choices"][1]["index"], 1, "{v}");
    assert_eq!(
        v["choices"][0]["text"], v["choices"][1]["text"],
        "greedy choices agree"
    );
    s.handle.shutdown();
}

/// The `n` choices of one request are queued all or none: a queue with room for two refuses a
/// request of three without queueing any of them (they used to be queued one by one, the
/// first ones then cancelled, counted and run for nobody), and takes one of two.
#[test]
fn the_choices_of_a_request_are_queued_all_or_none() {
    let _g = serial();
    let (handle, metrics) = spawn_scheduler(SchedulerConfig {
        max_running: 1,
        max_waiting: 2,
        kv_budget_bytes: 64 << 20,
        prefill_chunk: 64,
    });
    let req = |max_tokens| Request {
        prompt: vec![1, 2, 3],
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        ignore_eos: true,
    };
    // Hold the running slot, then wait until the queue is empty again.
    let long = handle.submit(req(2000)).unwrap();
    let t = std::time::Instant::now();
    while metrics.requests_running.get() != 1 {
        assert!(t.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(10));
    }
    let e = handle.submit_all(vec![req(4), req(4), req(4)]).unwrap_err();
    assert!(matches!(e, SubmitError::Overloaded { waiting: 0 }), "{e:?}");
    assert_eq!(metrics.requests_waiting.get(), 0, "nothing was queued");
    let rxs = handle.submit_all(vec![req(4), req(4)]).unwrap();
    assert_eq!(rxs.len(), 2);
    assert_eq!(metrics.requests_waiting.get(), 2);
    drop((long, rxs));
    handle.shutdown();
}
