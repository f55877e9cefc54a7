//! Helpers shared by the worker's test crates (each uses some of them).
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, Barrier, Mutex};

use tessera_worker::kernels::Pool;
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
