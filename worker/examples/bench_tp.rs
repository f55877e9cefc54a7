//! Measurements behind `scripts/bench-tp.sh` (run it rather than this directly).
//!
//! - `bench_tp net`: loopback TCP latency (half the round trip of 8-byte ping-pongs, TCP_NODELAY)
//!   (median and best of five batches) and bandwidth (one stream of 1 MiB writes), as one JSON
//!   line.
//! - `bench_tp rank --rank R --world W [--pp S] --port P --model M --threads T --tokens N --calls K`: one
//!   rank (a process of its own) joins the group, times K all-reduces of the model's hidden size
//!   and K/10 of a 64-token prefill message, then greedy-decodes N tokens after a fixed prompt
//!   (rank 0 drives; the others follow), and prints one JSON line with its timings, all-reduce
//!   counters and peak RSS (VmHWM).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tessera_worker::dist::{self, GroupConfig, Role};
use tessera_worker::engine::Engine;
use tessera_worker::engine::runner::{Runner, Step};
use tessera_worker::model::parallel::{ALLREDUCE_STATS, Collective, Identity, Stage};

const PROMPT: &str = "The history of the city of Paris begins about 250 BC, when a tribe of Celtic Senones known as the Parisii settled on the banks of the Seine. Write a short story about a young merchant who arrives in the city during that time:";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("net") => net(),
        Some("rank") => {
            let kv: HashMap<String, String> = args[1..]
                .chunks(2)
                .filter_map(|c| Some((c[0].trim_start_matches("--").to_owned(), c.get(1)?.clone())))
                .collect();
            let get = |k: &str| -> anyhow::Result<String> {
                kv.get(k)
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("--{k} is required"))
            };
            rank(
                get("rank")?.parse()?,
                get("world")?.parse()?,
                get("port")?.parse()?,
                PathBuf::from(get("model")?),
                get("threads")?.parse()?,
                get("tokens")?.parse()?,
                get("calls")?.parse()?,
                kv.get("pp").map_or(Ok(1), |v| v.parse())?,
            )
        }
        _ => anyhow::bail!(
            "usage: bench_tp net | bench_tp rank --rank R --world W --port P --model M --threads T --tokens N --calls K"
        ),
    }
}

fn net() -> anyhow::Result<()> {
    // Latency: 8-byte ping-pong.
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 8];
        while s.read_exact(&mut b).is_ok() {
            s.write_all(&b)?;
        }
        Ok(())
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let mut b = [0u8; 8];
    for _ in 0..500 {
        c.write_all(&b)?;
        c.read_exact(&mut b)?;
    }
    // Five batches of 2000 round trips; the median batch (the machine may be shared).
    let mut batches = Vec::new();
    for _ in 0..5 {
        let n = 2000;
        let t = Instant::now();
        for _ in 0..n {
            c.write_all(&b)?;
            c.read_exact(&mut b)?;
        }
        batches.push(t.elapsed().as_secs_f64() / n as f64 / 2.0);
    }
    batches.sort_by(f64::total_cmp);
    let (latency, latency_best) = (batches[2], batches[0]);
    drop(c);
    let _ = echo.join();

    // Bandwidth: 256 MiB in 1 MiB writes, timed at the receiver.
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let total: usize = 256 << 20;
    let sink = std::thread::spawn(move || -> std::io::Result<f64> {
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        let t = Instant::now();
        while got < total {
            let k = s.read(&mut buf)?;
            if k == 0 {
                break;
            }
            got += k;
        }
        Ok(got as f64 / t.elapsed().as_secs_f64())
    });
    let mut c = TcpStream::connect(addr)?;
    let buf = vec![1u8; 1 << 20];
    for _ in 0..(total >> 20) {
        c.write_all(&buf)?;
    }
    drop(c);
    let bandwidth = sink.join().expect("the sink thread")?;
    println!(
        "{}",
        serde_json::json!({"latency_s": latency, "latency_best_s": latency_best, "bandwidth_bytes_per_s": bandwidth})
    );
    Ok(())
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Resident KiB of the mappings of `path` (the model file's weights read in place), from
/// /proc/self/smaps.
fn mapped_rss_kib(path: &std::path::Path) -> u64 {
    let Ok(path) = std::fs::canonicalize(path) else {
        return 0;
    };
    let path = path.to_string_lossy().into_owned();
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let mut inside = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            inside = line.ends_with(path.as_str());
        } else if inside && first == "Rss:" {
            kib += line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    kib
}

fn stats() -> (u64, u64, u64) {
    (
        ALLREDUCE_STATS.calls.load(Relaxed),
        ALLREDUCE_STATS.bytes.load(Relaxed),
        ALLREDUCE_STATS.nanos.load(Relaxed),
    )
}

fn time_calls(c: &dyn Collective, floats: usize, calls: usize) -> anyhow::Result<f64> {
    let mut buf = vec![0.5f32; floats];
    for _ in 0..calls.min(50) {
        c.all_reduce_sum(&mut buf)?;
        buf.fill(0.5);
    }
    let t = Instant::now();
    for _ in 0..calls {
        c.all_reduce_sum(&mut buf)?;
        buf.fill(0.5);
    }
    Ok(t.elapsed().as_secs_f64() / calls as f64)
}

#[allow(clippy::too_many_arguments)]
fn rank(
    rank: usize,
    world: usize,
    port: u16,
    model: PathBuf,
    threads: usize,
    tokens: usize,
    calls: usize,
    pp: usize,
) -> anyhow::Result<()> {
    let (collective, role, stage, pipe): (Box<dyn Collective>, Option<Role>, _, _) = if world == 1 {
        (Box::new(Identity), None, Stage::WHOLE, None)
    } else {
        let g = dist::join(&GroupConfig {
            rank,
            world,
            pp,
            leader_host: "127.0.0.1".into(),
            port,
            group_id: "bench".into(),
            connect_deadline: Duration::from_secs(120),
            stall_timeout: Duration::from_secs(60),
            secret: Vec::new(),
        })?;
        (g.collective, Some(g.role), g.stage, g.pipe)
    };
    let engine = Engine::open_stage(&model, threads, collective, stage)?;
    let hidden = engine.model.config.hidden;
    let (small, large) = if engine.collective.world() > 1 {
        (
            time_calls(engine.collective.as_ref(), hidden, calls)?,
            time_calls(
                engine.collective.as_ref(),
                64 * hidden,
                (calls / 10).max(10),
            )?,
        )
    } else {
        (0.0, 0.0)
    };
    let prompt = engine.tokenizer.encode(PROMPT, false);
    let (weights, copied) = engine.model.weight_bytes();
    let mut out = serde_json::json!({
        "rank": rank, "world": world, "pp": pp, "threads": engine.pool.threads(),
        "hidden": hidden, "allreduce_hidden_s": small, "allreduce_64_tokens_s": large,
        "weight_bytes": weights, "copied_weight_bytes": copied,
    });
    match role {
        Some(Role::Follower(mut source)) => {
            let mut runner = Runner::new(engine, 256 << 20, None).with_pipe(pipe);
            dist::follow(&mut runner, source.as_mut())?;
            out["mapped_rss_kib"] = mapped_rss_kib(&model).into();
        }
        other => {
            let broadcast = match other {
                Some(Role::Leader(b)) => Some(b),
                _ => None,
            };
            let mut runner = Runner::new(engine, 256 << 20, broadcast).with_pipe(pipe);
            let t = Instant::now();
            let logits = runner
                .run(&Step::Forward {
                    seq: 1,
                    tokens: prompt.clone(),
                })?
                .expect("logits");
            let prefill = t.elapsed().as_secs_f64();
            let mut next = argmax(&logits);
            let before = stats();
            let t = Instant::now();
            for _ in 0..tokens {
                let logits = runner
                    .run(&Step::Forward {
                        seq: 1,
                        tokens: vec![next],
                    })?
                    .expect("logits");
                next = argmax(&logits);
            }
            let decode = t.elapsed().as_secs_f64();
            let after = stats();
            runner.run(&Step::Release { seq: 1 })?;
            out["mapped_rss_kib"] = mapped_rss_kib(&model).into();
            drop(runner);
            out["prompt_tokens"] = prompt.len().into();
            out["prefill_tokens_per_s"] = (prompt.len() as f64 / prefill).into();
            out["decode_tokens"] = tokens.into();
            out["decode_tokens_per_s"] = (tokens as f64 / decode).into();
            out["decode_allreduce_calls"] = (after.0 - before.0).into();
            out["decode_allreduce_bytes"] = (after.1 - before.1).into();
            out["decode_allreduce_s"] = ((after.2 - before.2) as f64 * 1e-9).into();
            out["decode_s"] = decode.into();
        }
    }
    out["vm_hwm_kib"] = vm_hwm_kib().into();
    println!("{out}");
    Ok(())
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}
