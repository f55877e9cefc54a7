//! Ranks as real processes of the built binary: `serve` followers from the env contract, a killed
//! rank ending the group, and the `local` launcher's checks.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tessera_worker::dist::{self, GroupConfig};

const BIN: &str = env!("CARGO_BIN_EXE_tessera-worker");

use common::{Proc, free_port, http, model_path};

/// Every line the launcher wrote, after it exited: waits (up to 10 s) for the reader thread to
/// pass on the last lines and hang up, instead of taking only those already passed on.
fn drain(rx: &mpsc::Receiver<String>) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        lines.push(line);
    }
    lines
}

/// Start `serve` as rank `rank` of `world`, its stderr lines sent to `lines`.
fn serve_rank(
    rank: usize,
    world: usize,
    port: u16,
    group: &str,
    lines: mpsc::Sender<(usize, String)>,
) -> Proc {
    let mut child = Command::new(BIN)
        .arg("serve")
        .env_clear()
        .env("RUST_LOG", "info")
        .env("TESSERA_TP", world.to_string())
        .env("TESSERA_PP", "1")
        .env("TESSERA_WORLD_SIZE", world.to_string())
        .env("TESSERA_RANK_OFFSET", rank.to_string())
        .env("TESSERA_LOCAL_RANKS", "1")
        .env("TESSERA_LEADER_ADDRESS", format!("127.0.0.1:{port}"))
        .env("TESSERA_RENDEZVOUS_PORT", port.to_string())
        .env("TESSERA_PORT", free_port().to_string())
        .env("TESSERA_HOST", "127.0.0.1")
        .env("TESSERA_MODEL_PATH", model_path())
        .env("TESSERA_INCARNATION", group)
        .env("TESSERA_THREADS", "1")
        .env("TESSERA_STALL_TIMEOUT_SECS", "3")
        .env("TESSERA_GROUP_SECRET", "e2e-secret")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send((rank, line));
        }
    });
    Proc(child)
}

fn wait_exit(p: &mut Proc, within: Duration) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(st) = p.0.try_wait().unwrap() {
            return st;
        }
        assert!(
            t.elapsed() < within,
            "the rank did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn killing_a_rank_process_ends_the_group_naming_it() {
    // Rank 0 is a thread of this test (its exit hook reports instead of exiting); ranks 1 and 2
    // are `tessera-worker serve` processes configured from the env contract.
    let port = free_port();
    let (tx, rx) = mpsc::channel();
    let mut r1 = serve_rank(1, 3, port, "e2e-kill", tx.clone());
    let mut r2 = serve_rank(2, 3, port, "e2e-kill", tx);
    let (exit_tx, exit_rx) = mpsc::channel::<String>();
    let group = dist::join_with_exit(
        &GroupConfig {
            rank: 0,
            world: 3,
            pp: 1,
            leader_host: "127.0.0.1".into(),
            port,
            group_id: "e2e-kill".into(),
            connect_deadline: Duration::from_secs(120),
            stall_timeout: Duration::from_secs(3),
            secret: b"e2e-secret".to_vec(),
        },
        Box::new(move |why: &str| {
            let _ = exit_tx.send(why.to_owned());
        }),
    )
    .unwrap();
    // Both followers load their shard and wait for steps.
    let mut following = 0;
    let mut log = Vec::new();
    let t = Instant::now();
    while following < 2 {
        let (rank, line) = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("followers never started following: {log:#?}"));
        if line.contains("following the leader's steps") {
            following += 1;
        }
        log.push(format!("{rank}: {line}"));
        assert!(t.elapsed() < Duration::from_secs(120));
    }
    assert_eq!(group.health.check(), Ok(()));

    r2.0.kill().unwrap();
    let t = Instant::now();
    let reason = loop {
        if let Err(e) = group.health.check() {
            break e;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "still healthy");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(reason.contains("rank 2 lost"), "{reason}");
    let why = exit_rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(why.contains("rank 2"), "{why}");

    // Rank 1 exits non-zero (the group-lost status) and says which rank was lost.
    let st = wait_exit(&mut r1, Duration::from_secs(30));
    assert_eq!(st.code(), Some(dist::EXIT_GROUP_LOST), "{st}");
    let rank1: Vec<String> = rx
        .try_iter()
        .filter(|(r, _)| *r == 1)
        .map(|(_, l)| l)
        .collect();
    assert!(
        rank1.iter().any(|l| l.contains("rank 2 lost")),
        "rank 1's log names rank 2: {rank1:#?}"
    );
}

#[test]
fn serve_refuses_a_bad_environment_naming_the_variable() {
    let out = Command::new(BIN)
        .arg("serve")
        .env_clear()
        .env("TESSERA_TP", "3")
        .env("TESSERA_PP", "2")
        .env("TESSERA_PORT", "8000")
        .env("TESSERA_MODEL_PATH", model_path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TESSERA_RANK_OFFSET is not set"), "{err}");

    // A layout the model cannot take fails before joining, naming the variable.
    let out = Command::new(BIN)
        .arg("serve")
        .env_clear()
        .env("TESSERA_TP", "1")
        .env("TESSERA_PP", "31")
        .env("TESSERA_RANK_OFFSET", "0")
        .env("TESSERA_LEADER_ADDRESS", "127.0.0.1:1")
        .env("TESSERA_INCARNATION", "x")
        .env("TESSERA_PORT", "8000")
        .env("TESSERA_MODEL_PATH", model_path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TESSERA_PP=31"), "{err}");
    assert!(err.contains("exceeds the model's 30 layers"), "{err}");

    // CUDA asked for where it cannot be had: an error before the model loads, naming the
    // setting and why (no CUDA in this build; or, on a CUDA build, no GPU).
    let out = Command::new(BIN)
        .arg("serve")
        .env_clear()
        .env("TESSERA_TP", "1")
        .env("TESSERA_PORT", "8000")
        .env("TESSERA_DEVICE", "cuda")
        .env("TESSERA_MODEL_PATH", model_path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TESSERA_DEVICE=cuda"), "{err}");
    if cfg!(feature = "cuda") {
        assert!(
            err.contains("no GPU") || err.contains("sees no GPU"),
            "{err}"
        );
    } else {
        assert!(err.contains("built without CUDA"), "{err}");
    }
}

#[test]
fn local_checks_the_layout_before_starting_ranks() {
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("local")
            .arg("--model")
            .arg(model_path())
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(&["--tp", "2", "--port", "1"]);
    assert!(e.contains("--tp 2"), "{e}");
    assert!(e.contains("9 attention heads"), "{e}");
    let e = run(&["--tp", "3", "--pp", "31", "--port", "1"]);
    assert!(e.contains("--pp 31"), "{e}");
    assert!(e.contains("exceeds the model's 30 layers"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// `tessera-worker local` end to end: the OpenAI API from rank 0, TP=3 against TP=1, a killed rank.

/// Start `local` and wait until its API is ready.
fn start_local(tp: usize, lines: mpsc::Sender<String>) -> (Proc, u16) {
    start_layout(tp, 1, lines)
}

/// Start `local --tp TP --pp PP` and wait until its API is ready.
fn start_layout(tp: usize, pp: usize, lines: mpsc::Sender<String>) -> (Proc, u16) {
    let (tp, pp) = (tp.to_string(), pp.to_string());
    common::start_local(
        &["--tp", &tp, "--pp", &pp],
        &[("TESSERA_GROUP_SECRET", "e2e-secret")],
        lines,
    )
}

fn ask_france(port: u16) -> String {
    let body = serde_json::json!({
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 24,
        "temperature": 0
    })
    .to_string();
    let (status, body) = http(port, "POST", "/v1/chat/completions", Some(&body)).unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Pids of `pid`'s children with their `TESSERA_RANK_OFFSET`.
fn ranks_of(pid: u32) -> Vec<(usize, u32)> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    children
        .split_whitespace()
        .filter_map(|c| {
            let c: u32 = c.parse().ok()?;
            let env = std::fs::read(format!("/proc/{c}/environ")).ok()?;
            let rank = env
                .split(|b| *b == 0)
                .filter_map(|kv| std::str::from_utf8(kv).ok())
                .find_map(|kv| kv.strip_prefix("TESSERA_RANK_OFFSET="))?
                .parse()
                .ok()?;
            Some((rank, c))
        })
        .collect()
}

#[test]
fn local_tp3_answers_like_tp1_and_a_killed_rank_ends_the_group() {
    let (tx1, _rx1) = mpsc::channel();
    let (p1, port1) = start_local(1, tx1);
    let want = ask_france(port1);
    assert!(want.contains("Paris"), "{want:?}");
    drop(p1);

    let (tx, rx) = mpsc::channel();
    let (mut p3, port) = start_local(3, tx);
    let got = ask_france(port);
    assert_eq!(got, want, "TP=3 gives TP=1's greedy text");
    // The leader's /metrics: serving counters, all-reduce counters of the group, and the GPU
    // gauges' health (no NVML here: tessera_nvml_up 0, and the worker keeps serving).
    let (code, metrics) = http(port, "GET", "/metrics", None).expect("metrics");
    assert_eq!(code, 200);
    for needle in [
        "tessera_requests_running",
        "tessera_generated_tokens_total",
        "tessera_allreduce_calls_total",
        "tessera_nvml_up 0",
    ] {
        assert!(
            metrics.contains(needle),
            "{needle} missing from:\n{metrics}"
        );
    }

    let ranks = ranks_of(p3.0.id());
    assert_eq!(ranks.len(), 3, "{ranks:?}");
    let victim = ranks.iter().find(|(r, _)| *r == 2).unwrap().1;
    let killed = Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());

    // The leader's /readyz fails (503) before the group goes away.
    let t = Instant::now();
    let first_failure = loop {
        match http(port, "GET", "/readyz", None) {
            Some((200, _)) => {}
            other => break other,
        }
        assert!(t.elapsed() < Duration::from_secs(20), "still ready");
        std::thread::sleep(Duration::from_millis(20));
    };
    let (status, body) = first_failure.expect("a 503 before the leader exits");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("rank 2"), "{body}");

    let st = wait_exit(&mut p3, Duration::from_secs(30));
    assert!(!st.success());
    let log = drain(&rx);
    assert!(
        log.iter()
            .any(|l| l.contains("rank 2 exited") && l.contains("the group was stopped")),
        "{log:#?}"
    );
    assert!(
        log.iter()
            .any(|l| l.starts_with("rank 0 |") && l.contains("rank 2 lost")),
        "{log:#?}"
    );
}

#[test]
fn local_pp2_answers_like_tp1_and_a_killed_stage1_rank_ends_the_group() {
    let (tx1, _rx1) = mpsc::channel();
    let (p1, port1) = start_local(1, tx1);
    let want = ask_france(port1);
    assert!(want.contains("Paris"), "{want:?}");
    drop(p1);

    let (tx, rx) = mpsc::channel();
    let (mut p, port) = start_layout(1, 2, tx);
    let got = ask_france(port);
    assert_eq!(got, want, "PP=2 gives TP=1's greedy text");

    // Rank 1 is stage 1 (layers 15..30, the LM head).
    let ranks = ranks_of(p.0.id());
    assert_eq!(ranks.len(), 2, "{ranks:?}");
    let victim = ranks.iter().find(|(r, _)| *r == 1).unwrap().1;
    assert!(
        Command::new("kill")
            .args(["-9", &victim.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let t = Instant::now();
    let first_failure = loop {
        match http(port, "GET", "/readyz", None) {
            Some((200, _)) => {}
            other => break other,
        }
        assert!(t.elapsed() < Duration::from_secs(20), "still ready");
        std::thread::sleep(Duration::from_millis(20));
    };
    let (status, body) = first_failure.expect("a 503 before the leader exits");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("rank 1"), "{body}");
    let st = wait_exit(&mut p, Duration::from_secs(30));
    assert!(!st.success());
    let log = drain(&rx);
    assert!(
        log.iter()
            .any(|l| l.contains("rank 1 exited") && l.contains("the group was stopped")),
        "{log:#?}"
    );
    assert!(
        log.iter()
            .any(|l| l.starts_with("rank 0 |") && l.contains("rank 1 lost")),
        "{log:#?}"
    );
    assert!(
        log.iter()
            .any(|l| l.starts_with("rank 1 |") && l.contains("holding layers 15..30")),
        "{log:#?}"
    );
}

#[test]
fn sigterm_drains_the_request_in_flight_and_every_rank_exits_cleanly() {
    use std::io::{Read, Write};
    let (tx, rx) = mpsc::channel();
    let (mut p, port) = start_local(3, tx);
    let body = serde_json::json!({
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "messages": [{"role": "user", "content": "Write a poem about Paris."}],
        "max_tokens": 40,
        "temperature": 0,
        "stream": true
    })
    .to_string();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Once the first chunk arrived the request is in flight: stop the launcher.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("data: ") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early");
        got.extend_from_slice(&buf[..n]);
    }
    let term = Command::new("kill")
        .args(["-TERM", &p.0.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    s.read_to_end(&mut got).unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("\"finish_reason\":\"length\""),
        "drained to the end: {text}"
    );
    assert!(text.contains("data: [DONE]"), "{text}");

    let st = wait_exit(&mut p, Duration::from_secs(60));
    assert!(st.success(), "{st}");
    let log = drain(&rx);
    for r in [1, 2] {
        assert!(
            log.iter().any(|l| l.starts_with(&format!("rank {r} |"))
                && l.contains("the leader closed the group")),
            "{log:#?}"
        );
    }
    assert!(
        log.iter().any(|l| l.contains("every rank stopped")),
        "{log:#?}"
    );
}

/// `VmRSS` or `VmHWM` (peak) of a process, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Under full concurrency (every sequence slot taken, each sequence filling its context) the
/// rank's peak RSS stays within what it held when ready plus the KV-cache budget it was given
/// (4 sequences x 1,024 tokens x 46,080 bytes = 180 MiB) and a little working memory: the
/// caches reserve exactly what the scheduler admitted.
#[test]
fn rss_under_full_concurrency_stays_within_the_kv_budget() {
    let port = free_port();
    let child = Command::new(BIN)
        .arg("serve")
        .env_clear()
        .env("RUST_LOG", "warn")
        .env("TESSERA_TP", "1")
        .env("TESSERA_PORT", port.to_string())
        .env("TESSERA_HOST", "127.0.0.1")
        .env("TESSERA_MODEL_PATH", model_path())
        .env("TESSERA_SERVED_MODEL_NAME", "m")
        .env("TESSERA_MAX_CONCURRENCY", "4")
        .env("TESSERA_CONTEXT_LENGTH", "1024")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut proc = Proc(child); // killed when the test ends, whatever happens
    let t = Instant::now();
    while http(port, "GET", "/readyz", None).map(|r| r.0) != Some(200) {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "serve never became ready"
        );
        assert!(proc.0.try_wait().unwrap().is_none(), "serve exited");
        std::thread::sleep(Duration::from_millis(200));
    }
    let ready_kib = status_kib(pid, "VmRSS");
    let prompt = "word ".repeat(440);
    let body = serde_json::json!({
        "model": "m", "prompt": prompt, "max_tokens": 560, "temperature": 0, "ignore_eos": true
    })
    .to_string();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || http(port, "POST", "/v1/completions", Some(&body)))
        })
        .collect();
    for c in clients {
        let (status, text) = c.join().unwrap().expect("an answer");
        assert_eq!(status, 200, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let used = v["usage"]["prompt_tokens"].as_u64().unwrap()
            + v["usage"]["completion_tokens"].as_u64().unwrap();
        assert!(
            used > 900 && used <= 1024,
            "each sequence fills most of its context: {used}"
        );
    }
    let peak_kib = status_kib(pid, "VmHWM");
    drop(proc);
    let budget_kib = 4 * 1024 * 46_080 / 1024;
    let slack_kib = 64 * 1024;
    assert!(
        peak_kib <= ready_kib + budget_kib + slack_kib,
        "peak {peak_kib} KiB > ready {ready_kib} + KV budget {budget_kib} + {slack_kib} KiB"
    );
    eprintln!(
        "RSS when ready {} MiB, peak {} MiB under 4 full sequences (KV budget {} MiB)",
        ready_kib / 1024,
        peak_kib / 1024,
        budget_kib / 1024
    );
}
