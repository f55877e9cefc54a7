//! Helpers shared by the worker's test crates (each uses some of them).
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, Barrier, Mutex};

use tessera_worker::engine::sampling::Rng;
use tessera_worker::kernels::{Pool, quant};
use tessera_worker::model::gguf::GgmlType;
use tessera_worker::model::kv_cache::KvCache;
use tessera_worker::model::llama::{Input, Llama, Logits, Output};
use tessera_worker::model::parallel::Identity;
use tessera_worker::model::parallel::{Collective, Shard};

/// The real test model, SmolLM2-135M-Instruct (Q4_1 GGUF); fails with the fix when missing.
pub fn model_path() -> PathBuf {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-model.sh (scripts/test.sh does)",
        path.display()
    );
    path
}

/// `tokens` through two pipeline stages chained by hand in one thread (stage 0's hidden state
/// handed to stage 1, each with its cache): that hidden state and every token's logits.
pub fn chain_stages(
    pool: &Pool,
    (s0, c0): (&Llama, &mut KvCache),
    (s1, c1): (&Llama, &mut KvCache),
    tokens: &[u32],
) -> (Vec<f32>, Vec<f32>) {
    let x = s0
        .forward_from(pool, &Identity, c0, Input::Tokens(tokens), Output::Hidden)
        .unwrap();
    let logits = s1
        .forward_from(
            pool,
            &Identity,
            c1,
            Input::Hidden(&x),
            Output::Logits(Logits::All),
        )
        .unwrap();
    (x, logits)
}

/// `prompt` alone in a fresh cache, then `decode` greedy steps (`pick` chooses each next token):
/// the last position's logits of every pass (the batched tests' reference).
pub fn greedy_alone(
    model: &Llama,
    pool: &Pool,
    prompt: &[u32],
    decode: usize,
    pick: fn(&[f32]) -> u32,
) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache(1 << 20).unwrap();
    let mut steps = vec![
        model
            .forward(pool, &Identity, &mut cache, prompt, Logits::Last)
            .unwrap(),
    ];
    for _ in 0..decode {
        let next = pick(steps.last().unwrap());
        steps.push(
            model
                .forward(pool, &Identity, &mut cache, &[next], Logits::Last)
                .unwrap(),
        );
    }
    steps
}

/// An in-memory all-reduce for tensor-parallel ranks running as threads of one test.
struct Group {
    acc: Mutex<Vec<f32>>,
    barrier: Barrier,
    world: usize,
}

/// One rank of a [`thread_collectives`] group.
pub struct Member {
    group: Arc<Group>,
    rank: usize,
}

/// The collectives of `world` ranks that will run as threads (rank `i` is element `i`).
pub fn thread_collectives(world: usize) -> Vec<Member> {
    let group = Arc::new(Group {
        acc: Mutex::new(Vec::new()),
        barrier: Barrier::new(world),
        world,
    });
    (0..world)
        .map(|rank| Member {
            group: Arc::clone(&group),
            rank,
        })
        .collect()
}

impl Collective for Member {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.group.world
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> anyhow::Result<()> {
        {
            let mut acc = self.group.acc.lock().unwrap();
            if acc.is_empty() {
                acc.resize(buf.len(), 0.0);
            }
            acc.iter_mut().zip(buf.iter()).for_each(|(a, b)| *a += b);
        }
        self.group.barrier.wait();
        buf.copy_from_slice(&self.group.acc.lock().unwrap());
        if self.group.barrier.wait().is_leader() {
            self.group.acc.lock().unwrap().clear();
        }
        self.group.barrier.wait();
        Ok(())
    }
}

/// Logits of a prefill of `prefill` (every token) followed by one single-token decode step per
/// token of `decode`, with `world` tensor-parallel ranks as threads. Rank 0 gathers the
/// vocabulary-parallel LM head's logits; the other ranks get none.
pub fn tp_logits(
    path: &std::path::Path,
    world: usize,
    prefill: &'static [u32],
    decode: &'static [u32],
) -> Vec<f32> {
    let handles: Vec<_> = thread_collectives(world)
        .into_iter()
        .enumerate()
        .map(|(rank, member)| {
            let path = path.to_owned();
            std::thread::spawn(move || {
                let model = Llama::open(&path, Shard::new(rank, world).unwrap()).unwrap();
                let pool = Pool::new(1).unwrap();
                let mut cache = model.new_cache(1 << 20).unwrap();
                let mut out = model
                    .forward(&pool, &member, &mut cache, prefill, Logits::All)
                    .unwrap();
                for t in decode {
                    out.extend(
                        model
                            .forward(&pool, &member, &mut cache, &[*t], Logits::Last)
                            .unwrap(),
                    );
                }
                out
            })
        })
        .collect();
    let mut results = handles.into_iter().map(|h| h.join().unwrap());
    let leader = results.next().unwrap();
    for (rank, r) in results.enumerate() {
        assert!(r.is_empty(), "rank {} got {} logits", rank + 1, r.len());
    }
    leader
}

/// The head of an HTTP/1.1 request on `s`: the request target (path and query) and where a
/// `Range: bytes=N-` header starts the body (0 without one). `None` for a connection that
/// closed before a request line.
pub fn read_request_head(s: &std::net::TcpStream) -> Option<(String, usize)> {
    use std::io::BufRead;
    let mut r = std::io::BufReader::new(s.try_clone().ok()?);
    let mut first = String::new();
    if r.read_line(&mut first).unwrap_or(0) == 0 {
        return None;
    }
    let target = first.split_whitespace().nth(1).unwrap_or("").to_owned();
    let mut from = 0usize;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
            from = v.trim().trim_end_matches('-').parse().unwrap_or(0);
        }
    }
    Some((target, from))
}

/// The response head for the body of a `len`-byte file from byte `from`: 200, or 206 with its
/// Content-Range when `from` > 0.
pub fn range_head(from: usize, len: usize) -> String {
    if from > 0 {
        format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{len}\r\nConnection: close\r\n\r\n",
            len - from,
            len - 1
        )
    } else {
        format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
    }
}

// ---------------------------------------------------------------------------------------------
// Processes of the built binary (local_e2e.rs, moe_tiny.rs, pd_e2e.rs).

/// A free TCP port on 127.0.0.1 (free when asked; bound again by whoever uses it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the child when dropped (a failing test leaves no process behind).
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start the built binary's `local` on the test model with `args` and `envs` (one thread per
/// rank, `RUST_LOG=info`, a 3 s stall timeout) and wait until `/readyz` says ready; its stderr
/// lines go to `lines` (local_e2e.rs, pd_e2e.rs).
pub fn start_local(
    args: &[&str],
    envs: &[(&str, &str)],
    lines: std::sync::mpsc::Sender<String>,
) -> (Proc, u16) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera-worker"))
        .arg("local")
        .arg("--model")
        .arg(model_path())
        .args(args)
        .args(["--port", &port.to_string(), "--threads", "1"])
        .env("RUST_LOG", "info")
        .env("TESSERA_STALL_TIMEOUT_SECS", "3")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let mut p = Proc(child);
    let t = Instant::now();
    loop {
        if let Some((200, _)) = http(port, "GET", "/readyz", None) {
            break;
        }
        assert!(
            p.0.try_wait().unwrap().is_none(),
            "local {args:?} exited before it was ready"
        );
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "local {args:?} not ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (p, port)
}

/// One HTTP/1.1 request to 127.0.0.1:`port`; (status, body). `None` when nothing listens.
pub fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(300)))
        .ok()?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|x| x.1.to_owned())?;
    Some((status, body))
}

// ---------------------------------------------------------------------------------------------
// Tiny random models and their naive f64 reference (llama_tiny.rs, moe_tiny.rs).

/// `n` roughly normal values: a sum of four uniforms, centred on 0, times `scale`.
pub fn randn(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| ((0..4).map(|_| rng.next_f32()).sum::<f32>() - 2.0) * scale)
        .collect()
}

/// `v` encoded as `ty`, and the values the encoding gives back (what the model sees).
pub fn encode(ty: GgmlType, v: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let bytes = quant::quantize_row(ty, v);
    let mut back = vec![0f32; v.len()];
    quant::dequantize_row(ty, &bytes, &mut back);
    (bytes, back)
}

/// Largest |a - b| over the largest |b|.
pub fn rel_err(a: &[f32], b: &[Vec<f64>]) -> f64 {
    let b: Vec<f64> = b.iter().flatten().copied().collect();
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((f64::from(*x) - y).abs()))
        / scale
}

/// Counts all-reduces (one rank).
#[derive(Default)]
pub struct Counting(pub std::sync::atomic::AtomicUsize);

impl Counting {
    pub fn calls(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Collective for Counting {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> anyhow::Result<()> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

/// The shape of a tiny Llama for [`naive_forward`].
pub struct NaiveDims {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub eps: f32,
    pub base: f32,
}

/// `m · x` for a row-major `[rows, x.len()]` matrix, in f64.
pub fn naive_mv(m: &[f32], x: &[f64], rows: usize) -> Vec<f64> {
    let cols = x.len();
    (0..rows)
        .map(|r| (0..cols).map(|c| f64::from(m[r * cols + c]) * x[c]).sum())
        .collect()
}

/// A SwiGLU FFN of width `width` in f64: `down(silu(gate · x) * (up · x))`.
pub fn naive_swiglu(gate: &[f32], up: &[f32], down: &[f32], x: &[f64], width: usize) -> Vec<f64> {
    let g = naive_mv(gate, x, width);
    let u = naive_mv(up, x, width);
    let a: Vec<f64> = g
        .iter()
        .zip(&u)
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect();
    naive_mv(down, &a, x.len())
}

/// An independent, naive Llama forward pass in f64 of one sequence from position 0 (the embedding
/// doubles as the LM head): every token's logits. `layers[i]` holds layer `i`'s attention
/// weights as f32, `[attn_norm, q, k, v, o, ffn_norm]`; `ffn(i, xn)` is its feed-forward network
/// of the normed hidden state; RoPE pair `p`'s angle is multiplied by `rope[p]`.
pub fn naive_forward(
    d: &NaiveDims,
    embed: &[f32],
    layers: &[[&[f32]; 6]],
    norm: &[f32],
    tokens: &[u32],
    rope: &[f64],
    ffn: &mut dyn FnMut(usize, &[f64]) -> Vec<f64>,
) -> Vec<Vec<f64>> {
    let (h, hd) = (d.hidden, d.hidden / d.heads);
    let rms = |x: &[f64], w: &[f32]| -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let s = 1.0 / (ms + f64::from(d.eps)).sqrt();
        x.iter()
            .zip(w)
            .map(|(v, w)| v * s * f64::from(*w))
            .collect()
    };
    let apply_rope = |v: &mut [f64], pos: usize| {
        for head in v.chunks_mut(hd) {
            for i in 0..hd / 2 {
                let theta =
                    pos as f64 * f64::from(d.base).powf(-2.0 * i as f64 / hd as f64) * rope[i];
                let (s, c) = theta.sin_cos();
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * c - b * s;
                head[2 * i + 1] = a * s + b * c;
            }
        }
    };
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| {
            embed[t as usize * h..(t as usize + 1) * h]
                .iter()
                .map(|&v| f64::from(v))
                .collect()
        })
        .collect();
    for (li, [an, wq, wk, wv, wo, fnm]) in layers.iter().enumerate() {
        let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
        for (pos, x) in xs.iter().enumerate() {
            let xn = rms(x, an);
            let mut q = naive_mv(wq, &xn, d.heads * hd);
            let mut k = naive_mv(wk, &xn, d.kv_heads * hd);
            apply_rope(&mut q, pos);
            apply_rope(&mut k, pos);
            qs.push(q);
            ks.push(k);
            vs.push(naive_mv(wv, &xn, d.kv_heads * hd));
        }
        for (pos, x) in xs.iter_mut().enumerate() {
            let mut att = vec![0f64; d.heads * hd];
            for hh in 0..d.heads {
                let g = hh / (d.heads / d.kv_heads);
                let q = &qs[pos][hh * hd..(hh + 1) * hd];
                let scores: Vec<f64> = (0..=pos)
                    .map(|j| {
                        let k = &ks[j][g * hd..(g + 1) * hd];
                        q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, p) in e.iter().enumerate() {
                    for c in 0..hd {
                        att[hh * hd + c] += p / z * vs[j][g * hd + c];
                    }
                }
            }
            let o = naive_mv(wo, &att, h);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let y = ffn(li, &rms(x, fnm));
            x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
        }
    }
    xs.iter()
        .map(|x| naive_mv(embed, &rms(x, norm), d.vocab))
        .collect()
}
