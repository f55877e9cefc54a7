//! The TCP all-reduce: a leader star.
//!
//! Each follower sends its buffer to the leader; the leader adds them in rank order (0, 1, ...,
//! n-1) and sends the sum back. Why a star and not a ring: a decode step all-reduces one token's
//! hidden state (576 floats, 2.3 KB, on the test model) twice per layer, where latency is
//! everything. A ring takes 2(n-1) dependent hops per call, the star takes 2 whatever the size
//! of the group (3 -> 2 hops instead of 4 at TP=3, 8 -> 2 instead of 14), and on one host or
//! a fast LAN a 2.3 KB message costs a hop's latency, not bandwidth. The price is bandwidth at
//! the leader: it moves (n-1) x size each way where a ring moves 2(n-1)/n x size per rank, which
//! matters only for large prefill messages on slow links. Summing in one place in a fixed order
//! also makes every rank's result bit-identical.
//!
//! Every call carries a sequence number and a length; a rank that is out of step (a different
//! call count or buffer size) is an error naming it, not silently wrong numbers.
//!
//! A slow rank is not a dead one. A rank that dies, or whose process stops, stops its
//! heartbeats, and the watchdog ends the group within the stall timeout whatever the
//! collective is doing. So a read that waits longer than the stall timeout (the leader's; twice
//! it for a follower, so that the leader, which sees every rank, names the stalled one first)
//! only warns, naming the rank and the call, and counts in `tessera_allreduce_slow_waits_total`;
//! the collective gives up on a rank that is alive but does not arrive only after
//! [`SLOW_LIMIT_STALLS`] stall timeouts (60 s at the default 5 s), each lengthened by the time
//! the call's payload takes over a 50 MB/s link (a 256 MB prefill all-reduce: 5 s more each). The first call waits up to
//! the rendezvous deadline: ranks load their shards at different speeds between joining and the
//! first forward pass.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::GroupError;
use super::health::{Shared, name_of};
use super::wire;
use crate::model::parallel::{ALLREDUCE_STATS, Collective};

const HEADER: usize = 12;

/// Stall timeouts a collective waits for a rank whose heartbeats still arrive before it gives
/// up on it (see the module docs).
pub const SLOW_LIMIT_STALLS: u32 = 12;

/// The link speed a collective's limit allows for its payload (see `read_patiently`).
pub const SLOW_LINK_BYTES_PER_SEC: f64 = 50e6;

enum Links {
    /// Data connections to ranks 1..n, in rank order.
    Leader(Vec<TcpStream>),
    /// The data connection to the leader.
    Follower(TcpStream),
}

struct State {
    links: Links,
    seq: u64,
    bytes: Vec<u8>,
}

/// [`Collective`] over TCP between the ranks of one group (see the module docs).
pub struct TcpCollective {
    /// Global rank of this group's rank 0 (a pipeline stage's first rank), for messages.
    base: usize,
    rank: usize,
    world: usize,
    stall: Duration,
    first: Duration,
    state: Mutex<State>,
    shared: Arc<Shared>,
}

impl TcpCollective {
    pub(crate) fn leader(
        world: usize,
        followers: Vec<TcpStream>,
        stall: Duration,
        first: Duration,
        shared: Arc<Shared>,
    ) -> Self {
        Self::new(0, world, Links::Leader(followers), stall, first, shared)
    }

    /// This collective joins a pipeline stage's ranks, the first of which has global rank
    /// `base` (messages name global ranks).
    pub(crate) fn with_base(mut self, base: usize) -> Self {
        self.base = base;
        self
    }

    pub(crate) fn follower(
        rank: usize,
        world: usize,
        leader: TcpStream,
        stall: Duration,
        first: Duration,
        shared: Arc<Shared>,
    ) -> Self {
        Self::new(rank, world, Links::Follower(leader), stall, first, shared)
    }

    fn new(
        rank: usize,
        world: usize,
        links: Links,
        stall: Duration,
        first: Duration,
        shared: Arc<Shared>,
    ) -> Self {
        let c = Self {
            base: 0,
            rank,
            world,
            stall,
            first: first.max(stall),
            state: Mutex::new(State {
                links,
                seq: 0,
                bytes: Vec::new(),
            }),
            shared,
        };
        c.set_timeouts(
            &c.state.lock().unwrap_or_else(|p| p.into_inner()).links,
            c.first,
        );
        c
    }

    /// Read timeouts: `wait` on the leader's links, twice that on a follower's.
    fn set_timeouts(&self, links: &Links, wait: Duration) {
        match links {
            Links::Leader(peers) => {
                for s in peers {
                    let _ = s.set_read_timeout(Some(wait));
                }
            }
            Links::Follower(s) => {
                let _ = s.set_read_timeout(Some(wait * 2));
            }
        }
    }

    /// One collective call over `n` floats: fails at once when the group is lost, numbers the
    /// call, runs `body` with the state, the call's sequence number and how long its reads may
    /// wait; after the first call tightens the read timeouts; records the call.
    fn call<T>(
        &self,
        n: usize,
        body: impl FnOnce(&mut State, u64, Duration) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        if let Some(reason) = self.shared.lost() {
            return Err(GroupError(reason).into());
        }
        let start = Instant::now();
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let st = &mut *guard;
        st.seq += 1;
        let seq = st.seq;
        let wait = if seq == 1 { self.first } else { self.stall };
        let out = body(st, seq, wait)?;
        if seq == 1 {
            self.set_timeouts(&st.links, self.stall);
        }
        drop(guard);
        ALLREDUCE_STATS.record(4 * n, start.elapsed());
        Ok(out)
    }

    /// Leader: read every follower's message of call `seq` (`n` floats) in rank order, checking
    /// its header, and hand its payload to `each`.
    fn read_followers(
        &self,
        peers: &mut [TcpStream],
        bytes: &mut Vec<u8>,
        seq: u64,
        n: usize,
        wait: Duration,
        mut each: impl FnMut(&[u8]),
    ) -> anyhow::Result<()> {
        bytes.resize(HEADER + 4 * n, 0);
        for (i, s) in peers.iter_mut().enumerate() {
            let peer = i + 1;
            self.read_patiently(s, bytes, peer, seq, wait, 1)?;
            if let Err(m) = check_header(&bytes[..HEADER], seq, n, self.base + peer) {
                return Err(GroupError(self.shared.fail(m)).into());
            }
            each(&bytes[HEADER..]);
        }
        Ok(())
    }

    /// Fill `buf` from `peer`'s connection (whose read timeout is `wait`): a timeout while the
    /// group stands is a slow rank (a warning and a count; see the module docs) until the limit,
    /// then the rank is lost; a broken connection is lost at once.
    fn read_patiently(
        &self,
        s: &mut TcpStream,
        buf: &mut [u8],
        peer: usize,
        seq: u64,
        wait: Duration,
        patience: u32,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        // Scaled to the call: a large payload (a long prefill chunk's hidden states) gets the
        // time to cross a slow link (50 MB/s) on top of each stall timeout.
        let transfer = Duration::from_secs_f64(buf.len() as f64 / SLOW_LINK_BYTES_PER_SEC);
        let limit = wait.max((self.stall + transfer) * SLOW_LIMIT_STALLS * patience);
        let mut got = 0;
        while got < buf.len() {
            match s.read(&mut buf[got..]) {
                Ok(0) => {
                    let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                    return Err(self.lost(peer, &eof, start.elapsed()));
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if wire::is_timeout(&e) => {
                    if let Some(reason) = self.shared.lost() {
                        return Err(GroupError(reason).into());
                    }
                    let waited = start.elapsed();
                    if waited >= limit {
                        return Err(self.lost(peer, &e, waited));
                    }
                    ALLREDUCE_STATS
                        .slow_waits
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(
                        rank = self.shared.rank,
                        "{} is slow: collective call #{seq} has waited {:.1} s for it; its heartbeats arrive, so waiting up to {:.0} s",
                        name_of(self.base + peer),
                        waited.as_secs_f64(),
                        limit.as_secs_f64()
                    );
                }
                Err(e) => return Err(self.lost(peer, &e, start.elapsed())),
            }
        }
        Ok(())
    }

    /// Follower: send `buf` as call `seq` to the leader.
    fn send_to_leader(
        &self,
        s: &mut TcpStream,
        bytes: &mut Vec<u8>,
        seq: u64,
        buf: &[f32],
    ) -> anyhow::Result<()> {
        encode(bytes, seq, buf);
        s.write_all(bytes).map_err(|e| self.lost(0, &e, self.stall))
    }

    fn lost(&self, peer: usize, e: &std::io::Error, wait: Duration) -> anyhow::Error {
        let own = if wire::is_timeout(e) {
            format!(
                "{} lost: all-reduce stalled, no data for {:.1} s (alive but not arriving)",
                name_of(self.base + peer),
                wait.as_secs_f64()
            )
        } else {
            format!("{} lost: {}", name_of(self.base + peer), wire::describe(e))
        };
        // A relayed verdict from the watchdog names the rank that was really lost.
        let reason = self.shared.verdict_or_fail(Duration::from_millis(300), own);
        GroupError(reason).into()
    }
}

fn header(seq: u64, n: usize) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(&seq.to_le_bytes());
    h[8..].copy_from_slice(&(n as u32).to_le_bytes());
    h
}

fn check_header(h: &[u8], seq: u64, n: usize, peer: usize) -> Result<(), String> {
    // `peer` is a global rank.
    let their_seq = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
    let their_n = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes")) as usize;
    if their_seq != seq || their_n != n {
        return Err(format!(
            "{} is out of step: collective call #{their_seq} of {their_n} floats against #{seq} of {n} here",
            name_of(peer)
        ));
    }
    Ok(())
}

/// The little-endian f32 values of a payload.
fn floats(b: &[u8]) -> impl Iterator<Item = f32> + '_ {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

fn encode(out: &mut Vec<u8>, seq: u64, buf: &[f32]) {
    out.clear();
    out.extend_from_slice(&header(seq, buf.len()));
    for v in buf {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> anyhow::Result<()> {
        self.call(buf.len(), |st, seq, wait| match &mut st.links {
            Links::Leader(peers) => {
                self.read_followers(peers, &mut st.bytes, seq, buf.len(), wait, |values| {
                    buf.iter_mut()
                        .zip(floats(values))
                        .for_each(|(x, v)| *x += v);
                })?;
                encode(&mut st.bytes, seq, buf);
                for (i, s) in peers.iter_mut().enumerate() {
                    if let Err(e) = s.write_all(&st.bytes) {
                        return Err(self.lost(i + 1, &e, self.stall));
                    }
                }
                Ok(())
            }
            Links::Follower(s) => {
                self.send_to_leader(s, &mut st.bytes, seq, buf)?;
                // Twice the leader's patience: the leader, which sees every rank, names a
                // stalled one first.
                self.read_patiently(s, &mut st.bytes, 0, seq, wait * 2, 2)?;
                if let Err(m) = check_header(&st.bytes[..HEADER], seq, buf.len(), self.base) {
                    return Err(GroupError(self.shared.fail(m)).into());
                }
                buf.iter_mut()
                    .zip(floats(&st.bytes[HEADER..]))
                    .for_each(|(x, v)| *x = v);
                Ok(())
            }
        })
    }

    /// One hop: followers send their part to the leader and go on; the leader reads them in
    /// rank order. Same sequence numbers and checks as the all-reduce; counted with it.
    fn gather(&self, part: &[f32]) -> anyhow::Result<Option<Vec<f32>>> {
        self.call(part.len(), |st, seq, wait| match &mut st.links {
            Links::Leader(peers) => {
                let mut all = Vec::with_capacity(self.world * part.len());
                all.extend_from_slice(part);
                self.read_followers(peers, &mut st.bytes, seq, part.len(), wait, |values| {
                    all.extend(floats(values));
                })?;
                Ok(Some(all))
            }
            Links::Follower(s) => {
                self.send_to_leader(s, &mut st.bytes, seq, part)?;
                Ok(None)
            }
        })
    }
}
