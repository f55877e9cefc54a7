//! Prefill/decode disaggregation end to end, with the built binary on the test model:
//! `local --prefill 1 --decode 1` answers exactly as `local` aggregated (greedy, seeded, with
//! penalties and log-probabilities, streamed and not, n = 2, prompts longer than a prefill
//! chunk, TP = 1 and TP = 3 on both sides), the router's metrics count what it moved, the
//! internal endpoints refuse strangers, and a killed decode replica gives the client a 503 (or
//! an error event in a stream) instead of a hang.

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::{Proc, model_path};

const BIN: &str = env!("CARGO_BIN_EXE_tessera-worker");
const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";
/// KV-cache bytes per token of the test model: 30 layers x 192 keys and as many values, f32.
const KV_BYTES_PER_TOKEN: u64 = 30 * 192 * 2 * 4;

/// One deployment at a time: each test starts several processes that compute on every core.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// An HTTP answer: status, headers (names lower-case) and the body (chunked encoding undone).
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Undo HTTP/1.1 chunked transfer encoding.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = std::str::from_utf8(&raw[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 {
            return out;
        }
        let start = eol + 2;
        let end = (start + size).min(raw.len());
        out.extend_from_slice(&raw[start..end]);
        raw = &raw[(end + 2).min(raw.len())..];
    }
}

/// One request to 127.0.0.1:`port`, read to the end (`Connection: close`).
fn request(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = &raw[split + 4..];
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_vec()
    };
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn post(port: u16, path: &str, body: &Value) -> Answer {
    request(port, "POST", path, &[], &body.to_string())
}

/// Start `local` with `args` (and one thread per rank) and wait until `/readyz` says ready;
/// its log lines go to `lines`.
fn start(args: &[&str], lines: mpsc::Sender<String>) -> (Proc, u16) {
    common::start_local(args, &[], lines)
}

/// The replicas `local` started: (role, API port, pid) of each replica's rank 0.
fn replicas(local: u32) -> Vec<(String, u16, u32)> {
    let children = std::fs::read_to_string(format!("/proc/{local}/task/{local}/children")).unwrap();
    children
        .split_whitespace()
        .filter_map(|c| {
            let pid: u32 = c.parse().ok()?;
            let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            let var = |name: &str| {
                env.split(|b| *b == 0)
                    .filter_map(|kv| std::str::from_utf8(kv).ok())
                    .find_map(|kv| kv.strip_prefix(&format!("{name}=")).map(str::to_owned))
            };
            if var("TESSERA_RANK_OFFSET")? != "0" {
                return None;
            }
            Some((
                var("TESSERA_PD_ROLE")?,
                var("TESSERA_PORT")?.parse().ok()?,
                pid,
            ))
        })
        .collect()
}

/// A metric's value in Prometheus text (the first sample whose name and labels start so).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
}

/// A streamed answer reduced to what must not change: per choice (their chunks interleave in
/// arrival order), each chunk's text, finish reason and log-probabilities (ids and timestamps
/// differ by design); then errors and usage; and whether it ended with `[DONE]`.
fn stream_events(body: &str) -> (Vec<Value>, bool) {
    let mut choices: std::collections::BTreeMap<u64, Vec<Value>> = Default::default();
    let mut rest = Vec::new();
    let mut done = false;
    for line in body.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if v.get("error").is_some() {
            rest.push(v);
            continue;
        }
        for c in v["choices"].as_array().unwrap() {
            choices
                .entry(c["index"].as_u64().unwrap())
                .or_default()
                .push(json!([
                    c["delta"],
                    c["text"],
                    c["finish_reason"],
                    c["logprobs"]
                ]));
        }
        if !v["usage"].is_null() {
            rest.push(v["usage"].clone());
        }
    }
    let mut events: Vec<Value> = choices.into_values().map(Value::Array).collect();
    events.extend(rest);
    (events, done)
}

/// A long prompt: more tokens than one prefill chunk (512).
fn long_prompt() -> String {
    "The history of the city of Paris begins about 250 BC, when a tribe of the Senones settled on the banks of the Seine. "
        .repeat(17)
}

/// The requests both deployments answer: (path, body).
fn requests() -> Vec<(&'static str, Value)> {
    let chat = |content: &str, extra: Value| {
        let mut b = json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 24,
            "temperature": 0,
        });
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b
    };
    vec![
        (
            "/v1/chat/completions",
            chat("What is the capital of France?", json!({})),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": long_prompt(), "max_tokens": 20, "temperature": 0}),
        ),
        (
            "/v1/chat/completions",
            chat(
                "Traduis en français : « Guten Morgen », 早上好, Доброе утро, おはよう.",
                json!({"max_tokens": 32}),
            ),
        ),
        // Seeded sampling of two choices with log-probabilities: the decode replica must
        // continue each choice's random stream from where the prefill replica left it.
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": "Once upon a time, in a small village,", "max_tokens": 16,
                   "temperature": 0.9, "seed": 7, "n": 2, "logprobs": 2}),
        ),
        // Penalties count the first token, which the prefill replica sampled.
        (
            "/v1/chat/completions",
            chat(
                "List five colours.",
                json!({"presence_penalty": 1.5, "frequency_penalty": 1.0, "logprobs": true, "top_logprobs": 2}),
            ),
        ),
    ]
}

/// One request, whole or streamed: the parts that must not change, and the answer.
fn ask(port: u16, path: &str, body: &Value, stream: bool) -> (Value, Answer) {
    if !stream {
        let whole = post(port, path, body);
        assert_eq!(whole.status, 200, "{path}: {}", whole.body);
        let v = whole.json();
        return (json!({"choices": v["choices"], "usage": v["usage"]}), whole);
    }
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let s = post(port, path, &streamed);
    assert_eq!(s.status, 200, "{path}: {}", s.body);
    let (events, done) = stream_events(&s.body);
    assert!(done, "the stream ends with [DONE]: {}", s.body);
    (json!(events), s)
}

/// Every request of `reqs` whole and streamed: (the comparable parts, and the answers).
fn ask_all(port: u16, reqs: &[(&str, Value)]) -> (Vec<Value>, Vec<Answer>) {
    reqs.iter()
        .flat_map(|(path, body)| [false, true].map(|stream| ask(port, path, body, stream)))
        .unzip()
}

/// The same greedy (and seeded) answers from `local --prefill 1 --decode 1` as from `local`
/// with one replica, whole and streamed; the router counts the KV bytes it moved (prompt
/// tokens x 46,080 per choice, also in each answer's `x-tessera-kv-bytes`), the first-token and
/// inter-token times of the streams and the finish reasons; `/v1/models` and `/health` answer;
/// the internal endpoints refuse calls without the token or for the other role.
#[test]
fn disaggregated_answers_equal_aggregated_ones_and_the_router_counts_the_kv_bytes() {
    let _g = serial();
    let reqs = requests();
    let (tx, _rx) = mpsc::channel();
    let (agg, port) = start(&["--tp", "1"], tx);
    let (want, _) = ask_all(port, &reqs);
    drop(agg);

    let (tx, _rx) = mpsc::channel();
    let (pd, port) = start(&["--prefill", "1", "--decode", "1"], tx);
    let (got, answers) = ask_all(port, &reqs);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g,
            w,
            "request {} ({}) differs between disaggregated and aggregated serving",
            i / 2,
            if i % 2 == 0 { "whole" } else { "streamed" }
        );
    }
    // The long prompt really is longer than a prefill chunk, and the seeded choices differ
    // (so equality above says something about the random stream).
    let usage = &want[2]["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 512, "{usage}");
    let seeded = &want[6]["choices"];
    assert_ne!(seeded[0]["text"], seeded[1]["text"], "{seeded}");

    // KV bytes: per answer in its header, and in all on the router's /metrics.
    let mut total = 0;
    let mut streams = 0;
    for (k, a) in answers.iter().enumerate() {
        let (_, body) = &reqs[k / 2];
        let prompt = got[k - k % 2]["usage"]["prompt_tokens"].as_u64().unwrap();
        let n = body["n"].as_u64().unwrap_or(1);
        let bytes = prompt * n * KV_BYTES_PER_TOKEN;
        assert_eq!(
            a.header("x-tessera-kv-bytes"),
            Some(bytes.to_string().as_str())
        );
        assert_eq!(a.header("x-tessera-prefill-replica"), Some("prefill-0"));
        assert_eq!(a.header("x-tessera-decode-replica"), Some("decode-0"));
        total += bytes;
        streams += k % 2;
    }
    let m = request(port, "GET", "/metrics", &[], "").body;
    assert_eq!(metric(&m, "tessera_kv_transfer_bytes_total"), total as f64);
    let handoffs: u64 = reqs
        .iter()
        .map(|(_, b)| 2 * b["n"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!(
        metric(&m, "tessera_kv_transfer_seconds_count"),
        handoffs as f64
    );
    assert_eq!(
        metric(&m, "tessera_time_to_first_token_seconds_count"),
        streams as f64
    );
    assert!(
        metric(&m, "tessera_inter_token_latency_seconds_count") > 50.0,
        "{m}"
    );
    let finished = metric(&m, "tessera_requests_total{finish_reason=\"length\"}")
        + metric(&m, "tessera_requests_total{finish_reason=\"stop\"}");
    assert_eq!(finished, handoffs as f64, "{m}");
    assert_eq!(metric(&m, "tessera_requests_running"), 0.0);
    assert_eq!(
        metric(
            &m,
            "tessera_pd_replica_up{role=\"decode\",replica=\"decode-0\"}"
        ),
        1.0
    );

    let models = request(port, "GET", "/v1/models", &[], "");
    assert_eq!(models.status, 200, "{}", models.body);
    assert_eq!(models.json()["data"][0]["id"], MODEL);
    assert_eq!(request(port, "GET", "/health", &[], "").status, 200);
    // A bad request gets the public endpoint's error, relayed from the prefill replica.
    let bad = post(
        port,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "x", "temperature": 7}),
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert_eq!(bad.json()["error"]["param"], "temperature");

    // The replicas' internal endpoints: no token, a wrong token, the other role.
    let reps = replicas(pd.0.id());
    let decode = reps
        .iter()
        .find(|r| r.0 == "decode")
        .expect("a decode replica")
        .1;
    let prefill = reps
        .iter()
        .find(|r| r.0 == "prefill")
        .expect("a prefill replica")
        .1;
    let body =
        json!({"handoff": {"prompt": [1], "choices": []}, "request": {"model": MODEL}}).to_string();
    let a = request(decode, "POST", "/internal/pd/decode/chat", &[], &body);
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.body.contains("x-tessera-pd-token"), "{}", a.body);
    let a = request(
        decode,
        "POST",
        "/internal/pd/decode/chat",
        &[("x-tessera-pd-token", "00")],
        &body,
    );
    assert_eq!(a.status, 403, "{}", a.body);
    let a = request(prefill, "POST", "/internal/pd/decode/chat", &[], &body);
    assert_eq!(a.status, 404, "{}", a.body);
    assert!(a.body.contains("TESSERA_PD_ROLE=prefill"), "{}", a.body);
    drop(pd);
}

/// TP = 3 on both sides (each prefill rank sends its shard to the matching decode rank): the
/// same answers as aggregated TP = 3 (the chat whole and streamed, the long prompt whole), and
/// the KV bytes of all three shards.
#[test]
fn tp3_on_both_sides_equals_aggregated_tp3() {
    let _g = serial();
    let reqs = requests();
    let asks = [(&reqs[0], false), (&reqs[0], true), (&reqs[1], false)];
    let run = |args: &[&str]| {
        let (tx, _rx) = mpsc::channel();
        let (p, port) = start(args, tx);
        let out: Vec<(Value, Answer)> = asks
            .iter()
            .map(|((path, body), stream)| ask(port, path, body, *stream))
            .collect();
        drop(p);
        out
    };
    let want = run(&["--tp", "3"]);
    let got = run(&["--tp", "3", "--prefill", "1", "--decode", "1"]);
    for (i, ((g, a), (w, _))) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "ask {i}");
        let prompt = if i == 1 { &got[0].0 } else { g }["usage"]["prompt_tokens"]
            .as_u64()
            .unwrap();
        assert_eq!(
            a.header("x-tessera-kv-bytes"),
            Some((prompt * KV_BYTES_PER_TOKEN).to_string().as_str()),
            "ask {i}: three shards of a third each"
        );
    }
}

/// Wait until the replica serving on `port` runs a sequence.
fn wait_running(port: u16) {
    let t = Instant::now();
    loop {
        if let Some((200, m)) = common::http(port, "GET", "/metrics", None)
            && metric(&m, "tessera_requests_running") >= 1.0
        {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the replica never ran the request"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill(pid: u32) {
    assert!(
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
}

/// A long decode that the test interrupts.
fn long_decode(stream: bool) -> Value {
    json!({"model": MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 600, "temperature": 0,
           "ignore_eos": true, "stream": stream})
}

/// Killing the only decode replica's process in the middle of a request: the client gets 503
/// with `Retry-After` within seconds (not a hang), and `local` stops, naming the replica.
#[test]
fn a_killed_decode_replica_gives_503_and_local_exits_naming_it() {
    let _g = serial();
    let (tx, rx) = mpsc::channel();
    let (mut pd, port) = start(&["--prefill", "1", "--decode", "1"], tx);
    let (_, decode_port, decode_pid) = replicas(pd.0.id())
        .into_iter()
        .find(|r| r.0 == "decode")
        .expect("a decode replica");
    let client = std::thread::spawn(move || post(port, "/v1/completions", &long_decode(false)));
    wait_running(decode_port);
    kill(decode_pid);
    let killed = Instant::now();
    let a = client.join().unwrap();
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "{:?}",
        killed.elapsed()
    );
    assert_eq!(a.status, 503, "{}", a.body);
    assert!(a.header("retry-after").is_some(), "{:?}", a.headers);
    let e = a.json();
    assert_eq!(e["error"]["code"], "replica_failed", "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("decode-0"),
        "{e}"
    );

    let t = Instant::now();
    let st = loop {
        if let Some(st) = pd.0.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "local kept running");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!st.success());
    let log: Vec<String> = rx.try_iter().collect();
    assert!(
        log.iter().any(
            |l| l.contains("decode-0 rank 0 exited") && l.contains("no decode replica is left")
        ),
        "{log:#?}"
    );
}

/// With two decode replicas, killing the one streaming an answer ends that stream with an
/// error event and `[DONE]`; the router takes the dead replica out of rotation and the next
/// request is served by the other one; `local` keeps running.
#[test]
fn a_killed_decode_replica_ends_its_stream_and_the_other_one_serves() {
    let _g = serial();
    let (tx, _rx) = mpsc::channel();
    let (mut pd, port) = start(&["--prefill", "1", "--decode", "2"], tx);
    let decodes: Vec<(u16, u32)> = replicas(pd.0.id())
        .into_iter()
        .filter(|r| r.0 == "decode")
        .map(|r| (r.1, r.2))
        .collect();
    assert_eq!(decodes.len(), 2, "{decodes:?}");
    let client = std::thread::spawn(move || post(port, "/v1/completions", &long_decode(true)));
    // The replica running the stream.
    let t = Instant::now();
    let (_, victim) = loop {
        let busy = decodes.iter().find(|(p, _)| {
            common::http(*p, "GET", "/metrics", None)
                .is_some_and(|(_, m)| metric(&m, "tessera_requests_running") >= 1.0)
        });
        if let Some(d) = busy {
            break *d;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no decode replica ran it"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    kill(victim);
    let a = client.join().unwrap();
    assert_eq!(a.status, 200, "the stream had started: {}", a.body);
    let (events, done) = stream_events(&a.body);
    assert!(done, "{}", a.body);
    let last = events.last().unwrap();
    assert_eq!(last["error"]["code"], "replica_failed", "{}", a.body);

    // The router sees the replica gone, stays ready with the other one, and serves.
    let t = Instant::now();
    loop {
        let m = request(port, "GET", "/metrics", &[], "").body;
        let up = metric(
            &m,
            "tessera_pd_replica_up{role=\"decode\",replica=\"decode-0\"}",
        ) + metric(
            &m,
            "tessera_pd_replica_up{role=\"decode\",replica=\"decode-1\"}",
        );
        if up == 1.0 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{m}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(request(port, "GET", "/health", &[], "").status, 200);
    let body = json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0});
    let a = post(port, "/v1/completions", &body);
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(pd.0.try_wait().unwrap().is_none(), "local keeps running");
}

/// Layouts disaggregation does not take are refused before anything starts, naming the flag or
/// variable, the rule and the fix.
#[test]
fn unsupported_disaggregated_layouts_are_refused_naming_the_setting() {
    let local = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("local")
            .arg("--model")
            .arg(model_path())
            .args(args)
            .args(["--port", "1"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = local(&["--prefill", "0"]);
    assert!(
        e.contains("--prefill 0 --decode 1") && e.contains("at least one"),
        "{e}"
    );
    let e = local(&["--decode", "1", "--pp", "2"]);
    assert!(e.contains("--pp 2") && e.contains("--pp 1"), "{e}");
    let e = local(&["--prefill", "1", "--device", "cuda"]);
    assert!(
        e.contains("--device cuda") && e.contains("--device cpu"),
        "{e}"
    );
    let e = local(&["--prefill", "1", "--tp", "2"]);
    assert!(
        e.contains("--tp 2") && e.contains("9 attention heads"),
        "{e}"
    );

    let serve = |vars: &[(&str, &str)]| {
        let out = Command::new(BIN)
            .arg("serve")
            .env_clear()
            .env("TESSERA_TP", "1")
            .env("TESSERA_PORT", "8000")
            .env("TESSERA_MODEL_PATH", model_path())
            .envs(vars.iter().copied())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{vars:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = serve(&[("TESSERA_PD_ROLE", "both")]);
    assert!(
        e.contains("TESSERA_PD_ROLE=\"both\"") && e.contains("prefill or decode"),
        "{e}"
    );
    let e = serve(&[("TESSERA_PD_ROLE", "decode")]);
    assert!(e.contains("TESSERA_KV_PORT is not set"), "{e}");
}
