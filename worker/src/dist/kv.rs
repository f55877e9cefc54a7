//! KV-cache hand-over between replicas over TCP (prefill/decode disaggregation).
//!
//! Every rank of a decode replica listens on a KV port of its own ([`KvReceiver`]). For each
//! sequence, rank `r` of the prefill replica opens one connection to rank `r` of the decode
//! replica and:
//!
//! 1. answers the receiver's challenge with a hello (protocol, the decode replica's group id,
//!    its world size, the rank, channel `kv`) signed with an HMAC keyed by the group secret,
//!    exactly as ranks join their group ([`wire::challenge`], [`wire::answer_challenge`]); the
//!    receiver answers with a welcome or the reason it refuses (wrong secret, another group,
//!    another world size or rank);
//! 2. announces the transfer ([`KvBegin`]: its name, the tokens, layers and keys per token);
//!    the receiver checks the shape against its own cache and its inbox's room and says ready
//!    or why not, before any data moves;
//! 3. sends each layer's keys then values as f32 frames ([`wire::write_f32_frames`], at most
//!    64 MiB a frame); the receiver stores the shard in its [`Inbox`] under the transfer's name
//!    and acknowledges. The sender returns only after that acknowledgement, so once every
//!    prefill rank has returned, every decode rank holds its shard.
//!
//! The decode replica's leader later broadcasts `Step::InstallKv`, and each rank takes its
//! shard out of the inbox. Every socket operation is bounded ([`KV_CONNECT_TIMEOUT`],
//! [`KV_IO_TIMEOUT`]); shards nobody takes expire after [`KV_INBOX_TTL`], and the inbox refuses
//! shards beyond its byte limit.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use super::wire::{self, Channel, Hello, MAGIC, PIECE_FLOATS, Welcome, kind};
use crate::engine::runner::{KvTarget, KvTransport};
use crate::model::kv_cache::{KvCache, KvShard};

/// How long a prefill rank tries to connect to a decode rank's KV port.
pub const KV_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a read or write on a KV connection may block (a wedged peer fails the transfer
/// instead of holding the replica).
pub const KV_IO_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `Step::InstallKv` waits for a shard that is not in the inbox yet.
pub const KV_TAKE_WAIT: Duration = Duration::from_secs(5);
/// How long a shard nobody takes stays in a decode rank's inbox (the request that owned it was
/// never sent to the decode replica, or waited in its queue longer than this).
pub const KV_INBOX_TTL: Duration = Duration::from_secs(300);
/// KV connections a decode rank serves at once; more are closed at once.
pub const MAX_KV_CONNECTIONS: usize = 64;

/// What a prefill rank is about to send (the first frame after the handshake).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct KvBegin {
    /// The transfer's name: the decode replica's `Step::InstallKv` takes the shard by it.
    pub transfer: String,
    pub tokens: usize,
    pub layers: usize,
    pub kv_dim: usize,
}

/// Who a decode rank is, for judging the senders' hellos.
#[derive(Clone, Debug)]
pub struct KvIdentity {
    /// The decode replica's group id (`TESSERA_INCARNATION`).
    pub group_id: String,
    /// Ranks of the decode replica.
    pub world: usize,
    /// This rank.
    pub rank: usize,
    /// The group secret (`TESSERA_GROUP_SECRET`).
    pub secret: Vec<u8>,
}

/// The shape of this rank's KV cache, which every shard it accepts must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    pub layers: usize,
    pub kv_dim: usize,
    /// Most tokens one sequence may hold.
    pub max_tokens: usize,
}

/// Shards received and not yet installed, by transfer name.
pub struct Inbox {
    state: Mutex<InboxState>,
    arrived: Condvar,
    max_bytes: usize,
    ttl: Duration,
}

#[derive(Default)]
struct InboxState {
    shards: HashMap<String, (Instant, KvShard)>,
    bytes: usize,
}

impl Inbox {
    /// An inbox holding at most `max_bytes` of shards, each for at most `ttl`.
    pub fn new(max_bytes: usize, ttl: Duration) -> Self {
        Self {
            state: Mutex::new(InboxState::default()),
            arrived: Condvar::new(),
            max_bytes,
            ttl,
        }
    }

    fn lock(&self) -> MutexGuard<'_, InboxState> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let ttl = self.ttl;
        let before = st.shards.len();
        let mut freed = 0;
        st.shards.retain(|name, (at, shard)| {
            let keep = at.elapsed() < ttl;
            if !keep {
                tracing::warn!(
                    transfer = %name,
                    "dropping a KV cache nobody installed within {} s",
                    ttl.as_secs()
                );
                freed += shard.bytes();
            }
            keep
        });
        if st.shards.len() != before {
            st.bytes -= freed;
        }
        st
    }

    /// Whether `bytes` more would fit now.
    pub fn room_for(&self, bytes: usize) -> Result<(), String> {
        let st = self.lock();
        if st.bytes + bytes > self.max_bytes {
            return Err(format!(
                "this decode rank's KV inbox is full ({} shards, {:.1} of {:.1} MiB waiting to be installed); retry later",
                st.shards.len(),
                st.bytes as f64 / (1 << 20) as f64,
                self.max_bytes as f64 / (1 << 20) as f64
            ));
        }
        Ok(())
    }

    /// Store `shard` under `name` (replacing nothing: a name already there is refused).
    pub fn put(&self, name: &str, shard: KvShard) -> Result<(), String> {
        let bytes = shard.bytes();
        let mut st = self.lock();
        if st.shards.contains_key(name) {
            return Err(format!("a KV cache named {name} is already waiting here"));
        }
        if st.bytes + bytes > self.max_bytes {
            drop(st);
            return self.room_for(bytes);
        }
        st.bytes += bytes;
        st.shards.insert(name.to_owned(), (Instant::now(), shard));
        drop(st);
        self.arrived.notify_all();
        Ok(())
    }

    /// Take the shard stored under `name`, waiting up to `wait` for it.
    pub fn take(&self, name: &str, wait: Duration) -> anyhow::Result<KvShard> {
        let deadline = Instant::now() + wait;
        let mut st = self.lock();
        loop {
            if let Some((_, shard)) = st.shards.remove(name) {
                st.bytes -= shard.bytes();
                return Ok(shard);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "the KV cache {name} did not arrive at this rank within {:.1} s (the prefill rank that sends it failed, or it expired after {} s)",
                    wait.as_secs_f64(),
                    self.ttl.as_secs()
                );
            }
            st = self
                .arrived
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Shards waiting and their bytes.
    pub fn usage(&self) -> (usize, usize) {
        let st = self.lock();
        (st.shards.len(), st.bytes)
    }
}

/// A decode rank's receiving end: a thread accepting KV connections on its port, storing what
/// they bring in the [`Inbox`].
pub struct KvReceiver {
    inbox: Arc<Inbox>,
    addr: SocketAddr,
}

impl KvReceiver {
    /// Listen on `addr` and serve KV connections on threads of their own until the process
    /// ends.
    pub fn listen(
        addr: impl ToSocketAddrs + std::fmt::Debug,
        id: KvIdentity,
        shape: KvShape,
        inbox: Arc<Inbox>,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(&addr)
            .with_context(|| format!("listening for KV-cache transfers on {addr:?}"))?;
        let local = listener.local_addr()?;
        let served = Arc::clone(&inbox);
        let active = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("kv-listener".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let s = match conn {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!("accepting a KV connection: {e}");
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                    };
                    let peer = s
                        .peer_addr()
                        .map_or_else(|_| "?".into(), |a| a.to_string());
                    if active.load(Ordering::SeqCst) >= MAX_KV_CONNECTIONS {
                        tracing::warn!(
                            "dropped a KV connection from {peer}: {MAX_KV_CONNECTIONS} are already open"
                        );
                        continue;
                    }
                    active.fetch_add(1, Ordering::SeqCst);
                    let (id, inbox, done) = (id.clone(), Arc::clone(&served), Arc::clone(&active));
                    let spawned = std::thread::Builder::new()
                        .name("kv-receive".into())
                        .spawn(move || {
                            if let Err(why) = receive(s, &id, shape, &inbox) {
                                tracing::warn!("a KV transfer from {peer} failed: {why}");
                            }
                            done.fetch_sub(1, Ordering::SeqCst);
                        });
                    if spawned.is_err() {
                        active.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            })
            .context("starting the KV listener thread")?;
        Ok(Self { inbox, addr: local })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The inbox its connections fill.
    pub fn inbox(&self) -> &Arc<Inbox> {
        &self.inbox
    }
}

/// Why a hello on a decode rank's KV port is refused, if it is.
fn judge(id: &KvIdentity, nonce: &[u8], h: &Hello) -> Result<(), String> {
    if !wire::verify_hello(&id.secret, nonce, h) {
        return Err(super::AUTH_FAILED.to_owned());
    }
    if h.magic != MAGIC {
        return Err(format!(
            "protocol {:?} is not this decode rank's {MAGIC:?} (another Tessera version)",
            h.magic
        ));
    }
    if h.channel != Channel::Kv {
        return Err(format!(
            "a {:?} connection came to a KV port (only KV-cache transfers go there)",
            h.channel
        ));
    }
    if h.group_id != id.group_id {
        return Err(
            "group id mismatch: this KV port belongs to another decode replica (or another incarnation of it)"
                .into(),
        );
    }
    if h.world != id.world {
        return Err(format!(
            "the sender addressed a decode replica of {} ranks; this one has {} (prefill and decode replicas need the same --tp)",
            h.world, id.world
        ));
    }
    if h.rank != id.rank {
        return Err(format!(
            "rank {}'s shard came to rank {}'s KV port (rank r of the prefill replica sends to rank r of the decode replica)",
            h.rank, id.rank
        ));
    }
    Ok(())
}

/// Serve one KV connection: handshake, announcement, data, acknowledgement.
fn receive(mut s: TcpStream, id: &KvIdentity, shape: KvShape, inbox: &Inbox) -> Result<(), String> {
    let io = |e: std::io::Error| wire::describe(&e);
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(KV_IO_TIMEOUT)).map_err(io)?;
    s.set_write_timeout(Some(KV_IO_TIMEOUT)).map_err(io)?;
    let (nonce, hello) = wire::challenge(&mut s).map_err(|e| format!("{e:#}"))?;
    let verdict = judge(id, &nonce, &hello);
    let welcome = Welcome::of(&verdict);
    wire::write_json(&mut s, kind::WELCOME, &welcome).map_err(io)?;
    verdict?;
    let begin: KvBegin = wire::read_json(&mut s, kind::KV_BEGIN).map_err(|e| format!("{e:#}"))?;
    let bytes = begin.layers * 2 * begin.tokens * begin.kv_dim * 4;
    let ready = if begin.layers != shape.layers || begin.kv_dim != shape.kv_dim {
        Err(format!(
            "the KV cache {} has {} layers of {} keys per token; this decode rank's cache has {} of {} (prefill and decode replicas must run the same model with the same --tp)",
            begin.transfer, begin.layers, begin.kv_dim, shape.layers, shape.kv_dim
        ))
    } else if begin.tokens == 0 || begin.tokens > shape.max_tokens {
        Err(format!(
            "the KV cache {} holds {} tokens; a sequence here holds 1 to {}",
            begin.transfer, begin.tokens, shape.max_tokens
        ))
    } else {
        inbox.room_for(bytes)
    };
    let answer = Welcome::of(&ready);
    wire::write_json(&mut s, kind::KV_ACK, &answer).map_err(io)?;
    ready?;
    let n = begin.tokens * begin.kv_dim;
    let mut layers = Vec::with_capacity(begin.layers);
    let mut half = || {
        wire::read_f32_frames(&mut s, kind::KV_DATA, n, PIECE_FLOATS)
            .map_err(io)?
            .map_err(|why| format!("the sender fell out of step: {why}"))
    };
    for _ in 0..begin.layers {
        // Keys, then values (evaluated in order).
        layers.push((half()?, half()?));
    }
    let stored = inbox.put(
        &begin.transfer,
        KvShard {
            tokens: begin.tokens,
            kv_dim: begin.kv_dim,
            layers,
        },
    );
    let ack = Welcome::of(&stored);
    wire::write_json(&mut s, kind::KV_ACK, &ack).map_err(io)?;
    tracing::debug!(transfer = %begin.transfer, tokens = begin.tokens, "KV cache received");
    stored
}

/// The [`KvTransport`] over TCP: a prefill rank sends with it ([`TcpKvTransport::sender`]); a
/// decode rank takes the shards its [`KvReceiver`] stored ([`TcpKvTransport::receiver`]).
pub struct TcpKvTransport {
    secret: Vec<u8>,
    inbox: Option<Arc<Inbox>>,
    take_wait: Duration,
}

impl TcpKvTransport {
    /// A prefill rank's transport: it authenticates to decode ranks with the group secret.
    pub fn sender(secret: Vec<u8>) -> Self {
        Self {
            secret,
            inbox: None,
            take_wait: KV_TAKE_WAIT,
        }
    }

    /// A decode rank's transport: it takes shards from `inbox`.
    pub fn receiver(inbox: Arc<Inbox>) -> Self {
        Self {
            secret: Vec::new(),
            inbox: Some(inbox),
            take_wait: KV_TAKE_WAIT,
        }
    }

    /// How long [`KvTransport::take`] waits for a shard (default [`KV_TAKE_WAIT`]).
    pub fn with_take_wait(mut self, wait: Duration) -> Self {
        self.take_wait = wait;
        self
    }
}

/// Connect to the first address of `addr` that answers within [`KV_CONNECT_TIMEOUT`].
fn connect(addr: &str) -> anyhow::Result<TcpStream> {
    let mut last = None;
    for a in addr
        .to_socket_addrs()
        .with_context(|| format!("resolving {addr}"))?
    {
        match TcpStream::connect_timeout(&a, KV_CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) => Err(anyhow::Error::new(e).context(format!("connecting to {addr}"))),
        None => bail!("{addr} resolves to no address"),
    }
}

impl KvTransport for TcpKvTransport {
    fn send(
        &mut self,
        target: &KvTarget,
        transfer: &str,
        rank: usize,
        cache: &KvCache,
    ) -> anyhow::Result<()> {
        let addr = target.addrs.get(rank).with_context(|| {
            format!(
                "the decode replica has no rank {rank} (it has {})",
                target.addrs.len()
            )
        })?;
        let what = || {
            format!("sending the KV cache {transfer} to the decode replica's rank {rank} at {addr}")
        };
        let mut s = connect(addr).with_context(what)?;
        let _ = s.set_nodelay(true);
        s.set_read_timeout(Some(KV_IO_TIMEOUT))?;
        s.set_write_timeout(Some(KV_IO_TIMEOUT))?;
        let hello = Hello {
            magic: MAGIC.into(),
            group_id: target.group_id.clone(),
            world: target.addrs.len(),
            rank,
            channel: Channel::Kv,
            pp: 1,
            listen: None,
            mac: String::new(),
        };
        let refused = |w: Welcome, at: &str| {
            anyhow::anyhow!(
                "the decode replica's rank {rank} at {addr} refused the KV cache {transfer} {at}: {}",
                w.error.unwrap_or_default()
            )
        };
        wire::answer_challenge(&mut s, &self.secret, hello).with_context(what)?;
        let welcome: Welcome = wire::read_json(&mut s, kind::WELCOME).with_context(what)?;
        if !welcome.ok {
            return Err(refused(welcome, "at the handshake"));
        }
        let begin = KvBegin {
            transfer: transfer.to_owned(),
            tokens: cache.len(),
            layers: cache.n_layers(),
            kv_dim: cache.kv_dim(),
        };
        wire::write_json(&mut s, kind::KV_BEGIN, &begin).with_context(what)?;
        let ready: Welcome = wire::read_json(&mut s, kind::KV_ACK).with_context(what)?;
        if !ready.ok {
            return Err(refused(ready, "before the data"));
        }
        for l in 0..cache.n_layers() {
            let (k, v) = cache.layer(l);
            wire::write_f32_frames(&mut s, kind::KV_DATA, k, PIECE_FLOATS).with_context(what)?;
            wire::write_f32_frames(&mut s, kind::KV_DATA, v, PIECE_FLOATS).with_context(what)?;
        }
        let stored: Welcome = wire::read_json(&mut s, kind::KV_ACK).with_context(what)?;
        if !stored.ok {
            return Err(refused(stored, "after the data"));
        }
        Ok(())
    }

    fn take(&mut self, transfer: &str) -> anyhow::Result<KvShard> {
        let inbox = self.inbox.as_ref().context(
            "this rank has no KV inbox (only the ranks of a decode replica, TESSERA_PD_ROLE=decode, take KV caches over)",
        )?;
        inbox.take(transfer, self.take_wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: KvShape = KvShape {
        layers: 3,
        kv_dim: 8,
        max_tokens: 64,
    };

    fn cache(tokens: usize) -> KvCache {
        let mut c = KvCache::with_reserved(SHAPE.layers, SHAPE.kv_dim, 64);
        let shard = KvShard {
            tokens,
            kv_dim: SHAPE.kv_dim,
            layers: (0..SHAPE.layers)
                .map(|l| {
                    let k: Vec<f32> = (0..tokens * SHAPE.kv_dim)
                        .map(|i| (l * 10_000 + i) as f32 * 0.25 - 7.0)
                        .collect();
                    let v = k.iter().map(|x| x.sin()).collect();
                    (k, v)
                })
                .collect(),
        };
        c.install(shard).unwrap();
        c
    }

    fn receiver(world: usize, rank: usize) -> KvReceiver {
        let id = KvIdentity {
            group_id: "decode-0".into(),
            world,
            rank,
            secret: b"s3cret".to_vec(),
        };
        let inbox = Arc::new(Inbox::new(1 << 20, KV_INBOX_TTL));
        KvReceiver::listen("127.0.0.1:0", id, SHAPE, inbox).unwrap()
    }

    fn target(r: &KvReceiver, world: usize) -> KvTarget {
        KvTarget {
            group_id: "decode-0".into(),
            addrs: vec![r.local_addr().to_string(); world],
        }
    }

    /// A shard sent over TCP arrives whole, bit for bit, under its name, and is taken once.
    #[test]
    fn a_shard_crosses_over_tcp_bit_for_bit() {
        let r = receiver(1, 0);
        let src = cache(13);
        let mut tx = TcpKvTransport::sender(b"s3cret".to_vec());
        tx.send(&target(&r, 1), "t-1", 0, &src).unwrap();
        assert_eq!(r.inbox().usage(), (1, 3 * 2 * 13 * 8 * 4));
        let mut rx = TcpKvTransport::receiver(Arc::clone(r.inbox()))
            .with_take_wait(Duration::from_millis(50));
        let got = rx.take("t-1").unwrap();
        assert_eq!(got, KvShard::of(&src));
        assert_eq!(r.inbox().usage(), (0, 0));
        let e = rx.take("t-1").unwrap_err().to_string();
        assert!(e.contains("did not arrive"), "{e}");
    }

    /// A sender without the group's secret, of another group, world size or rank, or with a
    /// cache of another shape, is refused with the reason before any data moves.
    #[test]
    fn strangers_and_misfits_are_refused_with_the_reason() {
        let r = receiver(2, 1);
        let src = cache(4);
        let e = TcpKvTransport::sender(b"wrong".to_vec())
            .send(&target(&r, 2), "a", 1, &src)
            .unwrap_err();
        assert!(format!("{e:#}").contains("authentication failed"), "{e:#}");
        let mut tx = TcpKvTransport::sender(b"s3cret".to_vec());
        let mut other = target(&r, 2);
        other.group_id = "decode-9".into();
        let e = tx.send(&other, "b", 1, &src).unwrap_err();
        assert!(format!("{e:#}").contains("group id mismatch"), "{e:#}");
        let e = tx.send(&target(&r, 3), "c", 1, &src).unwrap_err();
        assert!(format!("{e:#}").contains("same --tp"), "{e:#}");
        let e = tx.send(&target(&r, 2), "d", 0, &src).unwrap_err();
        assert!(
            format!("{e:#}").contains("rank 0's shard came to rank 1"),
            "{e:#}"
        );
        let mut wide = KvCache::with_reserved(SHAPE.layers, 16, 8);
        wide.install(KvShard {
            tokens: 1,
            kv_dim: 16,
            layers: vec![(vec![0.0; 16], vec![0.0; 16]); SHAPE.layers],
        })
        .unwrap();
        let e = tx.send(&target(&r, 2), "e", 1, &wide).unwrap_err();
        assert!(format!("{e:#}").contains("3 layers of 16 keys"), "{e:#}");
        assert_eq!(r.inbox().usage(), (0, 0), "nothing was stored");
        // Nobody listening: the error names the address.
        let closed = KvTarget {
            group_id: "decode-0".into(),
            addrs: vec!["127.0.0.1:1".into()],
        };
        let e = tx.send(&closed, "f", 0, &src).unwrap_err();
        assert!(format!("{e:#}").contains("127.0.0.1:1"), "{e:#}");
    }

    /// The inbox refuses shards beyond its byte limit (the sender is told before the data) and
    /// drops shards nobody took within its time to live.
    #[test]
    fn the_inbox_is_bounded_in_bytes_and_time() {
        let inbox = Inbox::new(1000, Duration::from_millis(200));
        let shard = |tokens| KvShard {
            tokens,
            kv_dim: 1,
            layers: vec![(vec![1.0; tokens], vec![2.0; tokens])],
        };
        inbox.put("a", shard(100)).unwrap();
        assert!(
            inbox
                .put("a", shard(1))
                .unwrap_err()
                .contains("already waiting")
        );
        let e = inbox.put("b", shard(50)).unwrap_err();
        assert!(e.contains("inbox is full"), "{e}");
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(inbox.usage(), (0, 0), "expired");
        inbox.put("b", shard(50)).unwrap();
        // A shard that arrives while someone waits for it is handed over at once.
        let inbox = Arc::new(inbox);
        let late = Arc::clone(&inbox);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            late.put("c", shard(2)).unwrap();
        });
        assert_eq!(inbox.take("c", Duration::from_secs(5)).unwrap().tokens, 2);
        t.join().unwrap();
    }
}
