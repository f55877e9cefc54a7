//! Pipeline parallelism over TCP: the connections between stages and the activation transport.
//!
//! Global rank `g` is TP rank `g % tp` of stage `g / tp` (the operator's `TESSERA_RANK_OFFSET` =
//! stage x TP + local rank). Every rank still joins the global leader (rank 0) with its three
//! connections (steps and heartbeats from rank 0, whatever the stage; the data connection
//! carries stage 0's all-reduces and the last stage's logits). Ranks of stages >= 1 also listen
//! on a port of their own, announced in their hello; the leader sends every rank the directory
//! of those addresses with "ready", and then:
//!
//! - **stage groups**: TP rank t > 0 of stage s >= 1 connects to TP rank 0 of its stage, which is
//!   the hub of that stage's star all-reduce (stage 0's hub is rank 0, as without PP), so
//!   all-reduces stay inside a stage;
//! - **activations**: TP rank t of stage s connects to TP rank t of stage s + 1 and sends it the
//!   stage's hidden state (every TP rank holds all of it after the stage's last all-reduce, so
//!   the TP links run in parallel and no rank fans out);
//! - **logits**: TP rank 0 of the last stage sends the last token's logits to rank 0 over its
//!   data connection; rank 0 samples.
//!
//! Reads on these connections have no timeout (a stage may wait a whole long prefill for its
//! input): a lost or silent rank is caught by the heartbeat watchdog, which shuts every group
//! connection down, so a blocked read returns with the watchdog's verdict naming the rank.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::GroupError;
use super::health::{Shared, name_of};
use super::wire::{self, Channel, Hello, MAGIC, kind};
use crate::engine::runner::Pipe;

/// Where a rank sits in a TP x PP layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub tp: usize,
    pub pp: usize,
}

impl Layout {
    pub fn stage_of(&self, rank: usize) -> usize {
        rank / self.tp
    }
    pub fn tp_rank_of(&self, rank: usize) -> usize {
        rank % self.tp
    }
    pub fn rank(&self, stage: usize, tp_rank: usize) -> usize {
        stage * self.tp + tp_rank
    }
}

/// The pipeline connections of one rank, once formed.
pub(crate) struct Mesh {
    /// TP rank 0 of a stage >= 1: the stage's other ranks, in TP-rank order.
    pub stage_peers: Vec<TcpStream>,
    /// TP rank > 0 of a stage >= 1: the stage's TP rank 0.
    pub stage_hub: Option<TcpStream>,
    /// From the previous stage (stages >= 1).
    pub prev: Option<TcpStream>,
    /// To the next stage (all but the last).
    pub next: Option<TcpStream>,
}

/// Bind the listener of a rank of stage >= 1, on the interface that reaches the leader (the
/// loopback address for a loopback leader, every interface otherwise).
pub(crate) fn bind_listener(leader_host: &str) -> anyhow::Result<TcpListener> {
    let addrs = super::bind_addrs(leader_host, 0);
    let l = TcpListener::bind(&addrs[..])
        .with_context(|| "binding the pipeline listener of this rank".to_string())?;
    l.set_nonblocking(true)?;
    Ok(l)
}

fn tag(cfg: &super::GroupConfig, channel: Channel) -> Hello {
    Hello {
        magic: MAGIC.into(),
        group_id: cfg.group_id.clone(),
        world: cfg.world,
        rank: cfg.rank,
        channel,
        pp: cfg.pp,
        listen: None,
        mac: String::new(),
    }
}

fn connect_peer(
    cfg: &super::GroupConfig,
    to: usize,
    addr: &str,
    channel: Channel,
    deadline: Instant,
) -> anyhow::Result<TcpStream> {
    let mut last = String::new();
    loop {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map(Iterator::collect)
            .unwrap_or_default();
        for a in &addrs {
            match TcpStream::connect_timeout(a, Duration::from_secs(2)) {
                Ok(mut s) => {
                    s.set_nodelay(true)?;
                    // The accepting rank challenges first (as the leader does).
                    s.set_read_timeout(Some(Duration::from_secs(10)))?;
                    wire::answer_challenge(&mut s, &cfg.secret, tag(cfg, channel))
                        .with_context(|| format!("joining {}", name_of(to)))?;
                    s.set_read_timeout(None)?;
                    return Ok(s);
                }
                Err(e) => last = format!("{a}: {e}"),
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "rank {} could not open its {channel:?} connection to {} at {addr}: {last}",
                cfg.rank,
                name_of(to)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Open this rank's pipeline connections (see the module docs) and accept the ones it expects.
pub(crate) fn form_mesh(
    cfg: &super::GroupConfig,
    layout: Layout,
    dir: &[Option<String>],
    listener: Option<TcpListener>,
    shared: &Shared,
) -> anyhow::Result<Mesh> {
    let deadline = Instant::now() + cfg.connect_deadline;
    let (s, t) = (layout.stage_of(cfg.rank), layout.tp_rank_of(cfg.rank));
    let addr_of = |r: usize| -> anyhow::Result<&str> {
        dir.get(r)
            .and_then(Option::as_deref)
            .with_context(|| format!("the leader's directory has no address for rank {r}"))
    };
    let mut mesh = Mesh {
        stage_peers: Vec::new(),
        stage_hub: None,
        prev: None,
        next: None,
    };
    // Outgoing first: the peers' listeners exist (bound before they joined), and a connection
    // completes in the kernel's backlog before the peer accepts it.
    if s >= 1 && t > 0 {
        let hub = layout.rank(s, 0);
        mesh.stage_hub = Some(connect_peer(
            cfg,
            hub,
            addr_of(hub)?,
            Channel::Stage,
            deadline,
        )?);
    }
    if s + 1 < layout.pp {
        let to = layout.rank(s + 1, t);
        mesh.next = Some(connect_peer(
            cfg,
            to,
            addr_of(to)?,
            Channel::Pipe,
            deadline,
        )?);
    }
    let mut want: Vec<(usize, Channel)> = Vec::new();
    if s >= 1 {
        want.push((layout.rank(s - 1, t), Channel::Pipe));
        if t == 0 {
            want.extend((1..layout.tp).map(|u| (layout.rank(s, u), Channel::Stage)));
        }
    }
    let mut got: BTreeMap<(usize, Channel), TcpStream> = BTreeMap::new();
    if !want.is_empty() {
        let listener = listener.context("a rank of stage >= 1 needs its pipeline listener")?;
        while got.len() < want.len() {
            if shared.lost().is_some() {
                bail!(GroupError(shared.lost().unwrap_or_default()));
            }
            if Instant::now() >= deadline {
                let missing: Vec<usize> = want
                    .iter()
                    .filter(|k| !got.contains_key(k))
                    .map(|k| k.0)
                    .collect();
                bail!(
                    "rank {}: ranks {missing:?} never opened their pipeline connections within {:.0} s",
                    cfg.rank,
                    cfg.connect_deadline.as_secs_f64()
                );
            }
            let (mut c, peer) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => {
                    tracing::warn!("accepting a pipeline connection: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            c.set_nonblocking(false)?;
            let _ = c.set_nodelay(true);
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = c.set_write_timeout(Some(Duration::from_secs(5)));
            let (nonce, h) = match wire::challenge(&mut c) {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("ignored a pipeline connection from {peer}: {e:#}");
                    continue;
                }
            };
            let key = (h.rank, h.channel);
            if !wire::verify_hello(&cfg.secret, &nonce, &h) {
                tracing::warn!(
                    "ignored a pipeline connection from {peer}: {}",
                    super::AUTH_FAILED
                );
                continue;
            }
            if h.magic != MAGIC
                || h.group_id != cfg.group_id
                || !want.contains(&key)
                || got.contains_key(&key)
            {
                tracing::warn!(
                    "ignored an unexpected pipeline connection from {peer} (rank {}, {:?}, group {:?})",
                    h.rank,
                    h.channel,
                    h.group_id
                );
                continue;
            }
            let _ = c.set_read_timeout(None);
            got.insert(key, c);
        }
    }
    for ((r, ch), c) in got {
        match ch {
            Channel::Pipe => mesh.prev = Some(c),
            _ => {
                debug_assert_eq!(mesh.stage_peers.len() + 1, layout.tp_rank_of(r));
                mesh.stage_peers.push(c);
            }
        }
    }
    for c in mesh
        .stage_peers
        .iter()
        .chain(&mesh.stage_hub)
        .chain(&mesh.prev)
        .chain(&mesh.next)
    {
        shared.track(c);
        c.set_read_timeout(None)?;
    }
    Ok(mesh)
}

/// [`Pipe`] over the pipeline connections.
pub struct TcpPipe {
    /// (global rank, connection) of the previous stage's peer.
    pub(crate) prev: Option<(usize, TcpStream)>,
    pub(crate) next: Option<(usize, TcpStream)>,
    /// Last stage, TP rank 0: the data connection to rank 0.
    pub(crate) logits_out: Option<TcpStream>,
    /// Rank 0: the data connection of the last stage's TP rank 0.
    pub(crate) logits_in: Option<(usize, TcpStream)>,
    pub(crate) shared: Arc<Shared>,
}

impl TcpPipe {
    fn lost(&self, peer: usize, e: &std::io::Error) -> anyhow::Error {
        let own = format!("{} lost: {}", name_of(peer), wire::describe(e));
        GroupError(self.shared.verdict_or_fail(Duration::from_millis(300), own)).into()
    }

    fn check_alive(&self) -> anyhow::Result<()> {
        match self.shared.lost() {
            Some(r) => Err(GroupError(r).into()),
            None => Ok(()),
        }
    }

    fn send(&self, to: Option<(usize, &TcpStream)>, k: u8, x: &[f32]) -> anyhow::Result<()> {
        self.check_alive()?;
        let (peer, mut s) = to.context("this rank has no such pipeline connection")?;
        wire::write_f32_frames(&mut s, k, x, wire::PIECE_FLOATS).map_err(|e| self.lost(peer, &e))
    }

    fn recv(&self, from: Option<(usize, &TcpStream)>, k: u8, n: usize) -> anyhow::Result<Vec<f32>> {
        self.check_alive()?;
        let (peer, mut s) = from.context("this rank has no such pipeline connection")?;
        match wire::read_f32_frames(&mut s, k, n, wire::PIECE_FLOATS) {
            Ok(Ok(x)) => Ok(x),
            Ok(Err(why)) => {
                let msg = format!("{} is out of step: {why}", name_of(peer));
                Err(GroupError(self.shared.fail(msg)).into())
            }
            Err(e) => Err(self.lost(peer, &e)),
        }
    }
}

impl Pipe for TcpPipe {
    fn recv_hidden(&mut self, n: usize) -> anyhow::Result<Vec<f32>> {
        self.recv(self.prev.as_ref().map(|(r, s)| (*r, s)), kind::HIDDEN, n)
    }

    fn send_hidden(&mut self, x: &[f32]) -> anyhow::Result<()> {
        self.send(self.next.as_ref().map(|(r, s)| (*r, s)), kind::HIDDEN, x)
    }

    fn send_logits(&mut self, logits: &[f32]) -> anyhow::Result<()> {
        self.send(
            self.logits_out.as_ref().map(|s| (0, s)),
            kind::LOGITS,
            logits,
        )
    }

    fn recv_logits(&mut self, n: usize) -> anyhow::Result<Vec<f32>> {
        self.recv(
            self.logits_in.as_ref().map(|(r, s)| (*r, s)),
            kind::LOGITS,
            n,
        )
    }
}
