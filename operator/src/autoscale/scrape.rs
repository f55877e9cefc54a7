//! Reading a worker's `/metrics`: a small, tolerant parser of the Prometheus text format (and
//! the OpenMetrics text the worker's prometheus-client writes), the few series the autoscaler
//! needs, and a bounded HTTP/1.1 GET.
//!
//! Series read from a replica leader, by engine (vLLM 0.32's and SGLang 0.5.23's names, checked
//! against their sources):
//!
//! | what | `tessera` | `vllm` | `sglang` |
//! |---|---|---|---|
//! | waiting requests (sum) | `tessera_requests_waiting` | `vllm:num_requests_waiting` | `sglang:num_queue_reqs` |
//! | running requests (sum) | `tessera_requests_running` | `vllm:num_requests_running` | `sglang:num_running_reqs` |
//! | KV-cache use 0..1 (mean) | `tessera_kv_cache_usage_ratio` (older workers: `tessera_kv_cache_utilization`) | `vllm:kv_cache_usage_perc` (a fraction despite the name) | `sglang:token_usage` |
//! | generated tokens, counter (sum; tokens/s is its rate between scrapes) | `tessera_generated_tokens_total` | `vllm:generation_tokens_total` | `sglang:generation_tokens_total` |
//! | GPU utilisation (mean of percent, as a fraction) | `DCGM_FI_DEV_GPU_UTIL` | the same, when the pod exposes it | the same |
//!
//! A series an engine does not expose is `None`: the decision holds and says why, as for a
//! missing scrape. SGLang exposes its series only with `--enable-metrics`, which the operator
//! always sets.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::decide::ReplicaSample;
use crate::api::EngineName;

/// One sample line: name, labels, value.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Parse Prometheus/OpenMetrics text. Comments, blank lines and lines that do not parse are
/// skipped (a scrape should not fail because of one odd series).
pub fn parse(text: &str) -> Vec<Series> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Series> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        let (ls, after) = parse_labels(r)?;
        labels = ls;
        rest = after;
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    Some(Series {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Labels after the `{`; returns them and the text after the closing `}`.
fn parse_labels(s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut out = Vec::new();
    let mut chars = s.char_indices().peekable();
    loop {
        // Skip spaces and commas.
        while let Some(&(_, c)) = chars.peek() {
            if c == ',' || c.is_whitespace() {
                chars.next();
            } else {
                break;
            }
        }
        let &(start, c) = chars.peek()?;
        if c == '}' {
            return Some((out, &s[start + 1..]));
        }
        let mut key = String::new();
        while let Some(&(_, c)) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|&(_, c)| c.is_whitespace()) {
            chars.next();
        }
        if chars.next()?.1 != '=' {
            return None;
        }
        while chars.peek().is_some_and(|&(_, c)| c.is_whitespace()) {
            chars.next();
        }
        if chars.next()?.1 != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            let (_, c) = chars.next()?;
            match c {
                '"' => break,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        }
        out.push((key, value));
    }
}

/// The raw values the autoscaler needs from one leader's `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaderMetrics {
    pub waiting: Option<f64>,
    pub running: Option<f64>,
    pub kv_cache_utilization: Option<f64>,
    pub generated_tokens_total: Option<f64>,
    /// Mean GPU utilisation as a fraction 0..1.
    pub gpu_utilization: Option<f64>,
    /// Time-to-first-token histogram: sum of seconds and count of requests.
    pub ttft_sum: Option<f64>,
    pub ttft_count: Option<f64>,
    /// Inter-token-latency histogram: sum of seconds and count of tokens.
    pub itl_sum: Option<f64>,
    pub itl_count: Option<f64>,
    /// Prompt tokens processed.
    pub prompt_tokens_total: Option<f64>,
    /// All-reduce calls, payload bytes and seconds of the leader (the Tessera engine's).
    pub allreduce_calls_total: Option<f64>,
    pub allreduce_bytes_total: Option<f64>,
    pub allreduce_seconds_total: Option<f64>,
}

/// Means over the interval between two scrapes of one leader, for calibrating the cost model
/// (`planner::calibration`): each is present only when its counters moved forward enough to
/// mean something (a counter that went down is a restart: no interval).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct IntervalMeans {
    /// Mean inter-token latency, seconds (at least 16 tokens in the interval).
    pub inter_token_latency_s: Option<f64>,
    /// Mean time to first token, seconds, and the mean prompt of those requests, tokens.
    pub time_to_first_token_s: Option<f64>,
    pub prompt_tokens: Option<f64>,
    /// Mean all-reduce: payload bytes and seconds per call (at least 16 calls).
    pub allreduce_bytes: Option<f64>,
    pub allreduce_s: Option<f64>,
}

fn delta(now: Option<f64>, before: Option<f64>) -> Option<f64> {
    let d = now? - before?;
    (d.is_finite() && d >= 0.0).then_some(d)
}

/// What happened between `before` and `now` (two scrapes of the same leader).
pub fn interval_means(before: &LeaderMetrics, now: &LeaderMetrics) -> IntervalMeans {
    let itl = match (
        delta(now.itl_sum, before.itl_sum),
        delta(now.itl_count, before.itl_count),
    ) {
        (Some(s), Some(n)) if n >= 16.0 && s > 0.0 => Some(s / n),
        _ => None,
    };
    let requests = delta(now.ttft_count, before.ttft_count).filter(|n| *n >= 1.0);
    let ttft = match (delta(now.ttft_sum, before.ttft_sum), requests) {
        (Some(s), Some(n)) if s > 0.0 => Some(s / n),
        _ => None,
    };
    let prompt = match (
        delta(now.prompt_tokens_total, before.prompt_tokens_total),
        requests,
    ) {
        (Some(t), Some(n)) if t > 0.0 => Some(t / n),
        _ => None,
    };
    let calls =
        delta(now.allreduce_calls_total, before.allreduce_calls_total).filter(|n| *n >= 16.0);
    let (allreduce_bytes, allreduce_s) = match (
        calls,
        delta(now.allreduce_bytes_total, before.allreduce_bytes_total),
        delta(now.allreduce_seconds_total, before.allreduce_seconds_total),
    ) {
        (Some(n), Some(b), Some(t)) if b > 0.0 && t > 0.0 => (Some(b / n), Some(t / n)),
        _ => (None, None),
    };
    IntervalMeans {
        allreduce_bytes,
        allreduce_s,
        inter_token_latency_s: itl,
        time_to_first_token_s: ttft.filter(|_| prompt.is_some()),
        prompt_tokens: prompt.filter(|_| ttft.is_some()),
    }
}

fn sum_of(series: &[Series], name: &str) -> Option<f64> {
    let mut it = series
        .iter()
        .filter(|s| s.name == name && s.value.is_finite())
        .peekable();
    it.peek()?;
    Some(it.map(|s| s.value).sum())
}

fn mean_of(series: &[Series], name: &str) -> Option<f64> {
    let vals: Vec<f64> = series
        .iter()
        .filter(|s| s.name == name && s.value.is_finite())
        .map(|s| s.value)
        .collect();
    (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64)
}

/// The series names of one engine (see the module docs).
struct EngineSeries {
    waiting: &'static [&'static str],
    running: &'static [&'static str],
    kv_cache: &'static [&'static str],
    generated_tokens: &'static [&'static str],
    /// Histogram base names (`_sum` and `_count` are appended).
    ttft: &'static [&'static str],
    itl: &'static [&'static str],
    prompt_tokens: &'static [&'static str],
}

fn engine_series(engine: EngineName) -> EngineSeries {
    match engine {
        EngineName::Tessera => EngineSeries {
            waiting: &["tessera_requests_waiting"],
            running: &["tessera_requests_running"],
            kv_cache: &[
                "tessera_kv_cache_usage_ratio",
                "tessera_kv_cache_utilization",
            ],
            generated_tokens: &["tessera_generated_tokens_total"],
            ttft: &["tessera_time_to_first_token_seconds"],
            itl: &["tessera_inter_token_latency_seconds"],
            prompt_tokens: &["tessera_prompt_tokens_total"],
        },
        EngineName::Vllm => EngineSeries {
            waiting: &["vllm:num_requests_waiting"],
            running: &["vllm:num_requests_running"],
            kv_cache: &["vllm:kv_cache_usage_perc"],
            generated_tokens: &["vllm:generation_tokens_total"],
            ttft: &["vllm:time_to_first_token_seconds"],
            itl: &[
                "vllm:inter_token_latency_seconds",
                "vllm:time_per_output_token_seconds",
            ],
            prompt_tokens: &["vllm:prompt_tokens_total"],
        },
        EngineName::Sglang => EngineSeries {
            waiting: &["sglang:num_queue_reqs"],
            running: &["sglang:num_running_reqs"],
            kv_cache: &["sglang:token_usage"],
            generated_tokens: &["sglang:generation_tokens_total"],
            ttft: &["sglang:time_to_first_token_seconds"],
            itl: &[
                "sglang:inter_token_latency_seconds",
                "sglang:time_per_output_token_seconds",
            ],
            prompt_tokens: &["sglang:prompt_tokens_total"],
        },
    }
}

/// `_sum` or `_count` of the first histogram of `bases` the exposition has.
fn histogram_part(series: &[Series], bases: &[&str], part: &str) -> Option<f64> {
    bases
        .iter()
        .find_map(|b| sum_of(series, &format!("{b}{part}")))
}

/// The first of `names` that the exposition has, through `pick`.
fn first_of(
    series: &[Series],
    names: &[&str],
    pick: fn(&[Series], &str) -> Option<f64>,
) -> Option<f64> {
    names.iter().find_map(|n| pick(series, n))
}

impl LeaderMetrics {
    /// Pick a Tessera worker's series out of a parsed exposition.
    pub fn from_text(text: &str) -> Self {
        Self::from_engine_text(EngineName::Tessera, text)
    }

    /// Pick the series of `engine` out of a parsed exposition.
    pub fn from_engine_text(engine: EngineName, text: &str) -> Self {
        let series = parse(text);
        let names = engine_series(engine);
        LeaderMetrics {
            waiting: first_of(&series, names.waiting, sum_of),
            running: first_of(&series, names.running, sum_of),
            kv_cache_utilization: first_of(&series, names.kv_cache, mean_of),
            generated_tokens_total: first_of(&series, names.generated_tokens, sum_of),
            gpu_utilization: mean_of(&series, "DCGM_FI_DEV_GPU_UTIL").map(|p| p / 100.0),
            ttft_sum: histogram_part(&series, names.ttft, "_sum"),
            ttft_count: histogram_part(&series, names.ttft, "_count"),
            itl_sum: histogram_part(&series, names.itl, "_sum"),
            itl_count: histogram_part(&series, names.itl, "_count"),
            prompt_tokens_total: first_of(&series, names.prompt_tokens, sum_of),
            allreduce_calls_total: sum_of(&series, "tessera_allreduce_calls_total"),
            allreduce_bytes_total: sum_of(&series, "tessera_allreduce_bytes_total"),
            allreduce_seconds_total: sum_of(&series, "tessera_allreduce_seconds_total"),
        }
    }

    /// The decision's sample; `previous` is the last scrape of the same pod (tokens counter and
    /// seconds since), for the tokens/s rate. A counter that went down (a restart) gives no
    /// rate.
    pub fn sample(&self, previous: Option<(f64, f64)>) -> ReplicaSample {
        let tokens_per_second = match (self.generated_tokens_total, previous) {
            (Some(now), Some((before, secs))) if secs > 0.0 && now >= before => {
                Some((now - before) / secs)
            }
            _ => None,
        };
        ReplicaSample {
            waiting: self.waiting,
            running: self.running,
            kv_cache_utilization: self.kv_cache_utilization,
            tokens_per_second,
            gpu_utilization: self.gpu_utilization,
            time_to_first_token_s: None,
            inter_token_latency_s: None,
            age_s: 0.0,
            pool: None,
        }
    }
}

/// Why a scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("connecting or reading: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("malformed HTTP response: {0}")]
    Malformed(&'static str),
    #[error("response larger than {0} bytes")]
    TooLarge(usize),
}

/// Largest `/metrics` body read.
pub const MAX_BODY: usize = 4 << 20;

/// GET `http://addr/metrics` (HTTP/1.1, `Connection: close`) with one overall timeout.
pub async fn fetch(addr: SocketAddr, timeout: Duration) -> Result<String, ScrapeError> {
    match tokio::time::timeout(timeout, get(addr)).await {
        Ok(r) => r,
        Err(_) => Err(ScrapeError::Timeout(timeout)),
    }
}

/// GET `http://addr/metrics` without a timeout of its own (the caller bounds it).
pub async fn get(addr: SocketAddr) -> Result<String, ScrapeError> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let req = format!(
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\nConnection: close\r\nUser-Agent: tessera-autoscaler\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_BODY + 64 * 1024 {
            return Err(ScrapeError::TooLarge(MAX_BODY));
        }
    }
    parse_response(&buf)
}

/// The body of a raw HTTP/1.1 response (identity, `Content-Length` or chunked).
pub fn parse_response(raw: &[u8]) -> Result<String, ScrapeError> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(ScrapeError::Malformed("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..head_end])
        .map_err(|_| ScrapeError::Malformed("headers are not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or(ScrapeError::Malformed("no status code"))?;
    if code != 200 {
        return Err(ScrapeError::Status(code));
    }
    let mut chunked = false;
    let mut length: Option<usize> = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let k = k.trim();
            let v = v.trim();
            if k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k.eq_ignore_ascii_case("content-length") {
                length = v.parse().ok();
            }
        }
    }
    let body = &raw[head_end + 4..];
    let bytes: Vec<u8> = if chunked {
        dechunk(body)?
    } else if let Some(n) = length {
        body.get(..n)
            .ok_or(ScrapeError::Malformed("body shorter than Content-Length"))?
            .to_vec()
    } else {
        body.to_vec()
    };
    String::from_utf8(bytes).map_err(|_| ScrapeError::Malformed("body is not UTF-8"))
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, ScrapeError> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or(ScrapeError::Malformed("chunk size without CRLF"))?;
        let size_text = std::str::from_utf8(&body[..line_end])
            .map_err(|_| ScrapeError::Malformed("chunk size"))?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| ScrapeError::Malformed("chunk size"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let data = body
            .get(..size)
            .ok_or(ScrapeError::Malformed("truncated chunk"))?;
        out.extend_from_slice(data);
        body = body.get(size + 2..).unwrap_or(&[]);
        if out.len() > MAX_BODY {
            return Err(ScrapeError::TooLarge(MAX_BODY));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORKER: &str = r#"# HELP tessera_requests_waiting Requests waiting for a slot.
# TYPE tessera_requests_waiting gauge
tessera_requests_waiting 3
# TYPE tessera_requests_running gauge
tessera_requests_running{model="llama"} 12
# TYPE tessera_kv_cache_usage_ratio gauge
tessera_kv_cache_usage_ratio 0.625
# TYPE tessera_generated_tokens counter
tessera_generated_tokens_total 15000 1700000000000
tessera_generated_tokens_created 1.7e9
DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-a",modelName="NVIDIA H100 80GB HBM3"} 80
DCGM_FI_DEV_GPU_UTIL{gpu="1",UUID="GPU-b",modelName="a \"quoted\" {name}, with spaces"} 60
tessera_odd{broken 1
# EOF
"#;

    #[test]
    fn parses_the_worker_series() {
        let m = LeaderMetrics::from_text(WORKER);
        assert_eq!(m.waiting, Some(3.0));
        assert_eq!(m.running, Some(12.0));
        assert_eq!(m.kv_cache_utilization, Some(0.625));
        assert_eq!(m.generated_tokens_total, Some(15000.0));
        assert_eq!(m.gpu_utilization, Some(0.7));
    }

    #[test]
    fn older_workers_kv_cache_name_is_still_read() {
        let m = LeaderMetrics::from_text("tessera_kv_cache_utilization 0.25\n");
        assert_eq!(m.kv_cache_utilization, Some(0.25));
    }

    /// A vLLM 0.32 exposition (abridged from its /metrics: labelled per model and engine, one
    /// series per engine core) and an SGLang 0.5 one.
    const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 7.0
vllm:num_requests_running{engine="1",model_name="llama"} 5.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 2.0
vllm:num_requests_waiting{engine="1",model_name="llama"} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="llama"} 0.3
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="llama"} 1200.0
vllm:generation_tokens_total{engine="1",model_name="llama"} 800.0
vllm:generation_tokens_created{engine="0",model_name="llama"} 1.7e9
tessera_requests_waiting 99
"#;
    const SGLANG: &str = r#"# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="llama",tp_rank="0"} 4.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="llama",tp_rank="0"} 6.0
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="llama",tp_rank="0"} 0.42
# TYPE sglang:generation_tokens_total counter
sglang:generation_tokens_total{model_name="llama"} 5000.0
"#;

    #[test]
    fn each_engine_is_read_from_its_own_series() {
        let v = LeaderMetrics::from_engine_text(EngineName::Vllm, VLLM);
        assert_eq!(v.waiting, Some(3.0));
        assert_eq!(v.running, Some(12.0));
        assert_eq!(v.kv_cache_utilization, Some(0.4));
        assert_eq!(v.generated_tokens_total, Some(2000.0));
        let s = LeaderMetrics::from_engine_text(EngineName::Sglang, SGLANG);
        assert_eq!(
            (s.waiting, s.running, s.kv_cache_utilization),
            (Some(6.0), Some(4.0), Some(0.42))
        );
        assert_eq!(s.generated_tokens_total, Some(5000.0));
        // Another engine's series are not mistaken for this one's: missing, so the decision
        // holds.
        let t = LeaderMetrics::from_engine_text(EngineName::Sglang, VLLM);
        assert_eq!(t, LeaderMetrics::default());
        let s =
            LeaderMetrics::from_engine_text(EngineName::Vllm, VLLM).sample(Some((1000.0, 10.0)));
        assert_eq!(s.tokens_per_second, Some(100.0));
    }

    #[test]
    fn labels_with_quotes_braces_and_escapes() {
        let s = parse(WORKER);
        let gpu1 = s
            .iter()
            .find(|s| s.labels.iter().any(|(k, v)| k == "gpu" && v == "1"))
            .expect("gpu 1");
        assert_eq!(gpu1.value, 60.0);
        assert!(
            gpu1.labels
                .iter()
                .any(|(k, v)| k == "modelName" && v == "a \"quoted\" {name}, with spaces")
        );
        // The broken line is skipped, not fatal.
        assert!(s.iter().all(|s| s.name != "tessera_odd"));
    }

    #[test]
    fn absent_series_are_none_and_rates_need_two_scrapes() {
        let m = LeaderMetrics::from_text("tessera_requests_waiting 1\n");
        assert_eq!(m.running, None);
        let s = m.sample(None);
        assert_eq!(s.value(crate::api::ScalingMetric::QueueDepth), None);
        let m = LeaderMetrics::from_text("tessera_generated_tokens_total 300\n");
        assert_eq!(m.sample(None).tokens_per_second, None);
        assert_eq!(m.sample(Some((150.0, 15.0))).tokens_per_second, Some(10.0));
        // A counter reset gives no rate.
        assert_eq!(m.sample(Some((900.0, 15.0))).tokens_per_second, None);
    }

    #[test]
    fn http_bodies_plain_length_and_chunked() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA";
        assert_eq!(parse_response(r).expect("ok"), "hello");
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        assert_eq!(parse_response(r).expect("ok"), "hello world");
        let r = b"HTTP/1.1 503 Service Unavailable\r\n\r\n";
        assert!(matches!(parse_response(r), Err(ScrapeError::Status(503))));
        assert!(matches!(
            parse_response(b"garbage"),
            Err(ScrapeError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn fetches_over_tcp() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let body = "tessera_requests_waiting 7\ntessera_requests_running 1\n";
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(resp.as_bytes()).await.expect("write");
        });
        let text = fetch(addr, Duration::from_secs(5)).await.expect("fetch");
        let m = LeaderMetrics::from_text(&text);
        assert_eq!((m.waiting, m.running), (Some(7.0), Some(1.0)));
    }
}

#[cfg(test)]
mod interval_tests {
    use super::*;

    fn scrape(
        engine: EngineName,
        base: &str,
        tokens: f64,
        itl: f64,
        requests: f64,
    ) -> LeaderMetrics {
        let (ttft, itl_name, prompt) = match engine {
            EngineName::Tessera => (
                "tessera_time_to_first_token_seconds",
                "tessera_inter_token_latency_seconds",
                "tessera_prompt_tokens_total",
            ),
            EngineName::Vllm => (
                "vllm:time_to_first_token_seconds",
                "vllm:time_per_output_token_seconds",
                "vllm:prompt_tokens_total",
            ),
            EngineName::Sglang => (
                "sglang:time_to_first_token_seconds",
                "sglang:inter_token_latency_seconds",
                "sglang:prompt_tokens_total",
            ),
        };
        let text = format!(
            "{base}{itl_name}_sum {}\n{itl_name}_count {tokens}\n{ttft}_sum {}\n{ttft}_count {requests}\n{prompt} {}\n",
            tokens * itl,
            requests * 0.25,
            requests * 512.0
        );
        LeaderMetrics::from_engine_text(engine, &text)
    }

    #[test]
    fn interval_means_of_every_engine_and_no_interval_across_a_restart() {
        for engine in [EngineName::Tessera, EngineName::Vllm, EngineName::Sglang] {
            let a = scrape(engine, "", 100.0, 0.02, 2.0);
            let b = scrape(engine, "", 300.0, 0.02, 6.0);
            let m = interval_means(&a, &b);
            assert!(
                (m.inter_token_latency_s.unwrap() - 0.02).abs() < 1e-9,
                "{engine:?}"
            );
            assert!((m.time_to_first_token_s.unwrap() - 0.25).abs() < 1e-9);
            assert!((m.prompt_tokens.unwrap() - 512.0).abs() < 1e-9);
            // Too few tokens in the interval: no latency.
            let c = scrape(engine, "", 310.0, 0.02, 6.0);
            assert_eq!(interval_means(&b, &c).inter_token_latency_s, None);
            // The Tessera engine also reports its all-reduces.
            if engine == EngineName::Tessera {
                let ar = |calls: f64, bytes: f64, secs: f64| {
                    LeaderMetrics::from_text(&format!(
                        "tessera_allreduce_calls_total {calls}\ntessera_allreduce_bytes_total {bytes}\ntessera_allreduce_seconds_total {secs}\n"
                    ))
                };
                let m = interval_means(&ar(100.0, 1e6, 0.5), &ar(300.0, 3e6, 0.7));
                assert_eq!(m.allreduce_bytes, Some(1e4));
                assert!((m.allreduce_s.unwrap() - 1e-3).abs() < 1e-12);
                assert_eq!(
                    interval_means(&ar(100.0, 1e6, 0.5), &ar(110.0, 2e6, 0.6)).allreduce_s,
                    None
                );
            }
            // Counters back near zero: a restart, no interval.
            let d = scrape(engine, "", 5.0, 0.02, 1.0);
            assert_eq!(interval_means(&b, &d), IntervalMeans::default());
        }
    }
}
