//! The rank group of one tensor-parallel replica over TCP (CPU ranks).
//!
//! - **Rendezvous** ([`join`]): rank 0 (the leader) listens on `leader_host:port`; every other
//!   rank opens three connections to it (all-reduce data, steps, heartbeats), retrying with
//!   backoff until `connect_deadline`. The leader opens each connection with a random
//!   challenge; the joiner answers with a hello (protocol, group id, world size, rank, channel)
//!   and an HMAC of the challenge and the hello keyed by the group's secret. A wrong HMAC, a
//!   different group id (a rank of a previous incarnation), another world size, a rank outside
//!   the world or one that already joined is refused with a message saying so (never the
//!   leader's group id), and the refused rank's `join` fails with it. Handshakes run on threads
//!   of their own (at most [`MAX_HANDSHAKES`] at once, each bounded by the same deadline), so a
//!   client that trickles bytes or never speaks delays nobody, and a stray connection that fails
//!   is only logged. The leader waits for every rank up to the deadline, then sends "ready" to
//!   all; later arrivals are refused ("the group is already formed").
//! - **Collective** ([`collective::TcpCollective`]): a leader-star all-reduce (2 hops per call
//!   whatever the group size; see the module for why not a ring), TCP_NODELAY, every call
//!   recorded in `ALLREDUCE_STATS`.
//! - **Steps** ([`steps`]): the leader's [`StepBroadcast`] sends every step to every follower
//!   in order; a follower's [`StepSource`] yields them; [`follow`] executes them.
//! - **Pipeline parallelism** ([`pipeline`]): with `pp` > 1 stages, the ranks of each stage form
//!   their own tensor-parallel group (all-reduces stay inside a stage), activations flow from
//!   stage to stage and the last stage's logits return to rank 0; steps and heartbeats still go
//!   through rank 0, so the watchdog sees every rank.
//! - **KV hand-over** ([`kv`]): prefill/decode disaggregation; a prefill rank sends its shard
//!   of a sequence's KV cache to the matching rank of a decode replica, which listens on a KV
//!   port of its own and authenticates senders with the same challenge and HMAC.
//! - **Watchdog** ([`health`]): heartbeats on their own connection and threads; a dead rank
//!   (connection closed), a silent one (no heartbeat for `stall_timeout`) or a stalled
//!   all-reduce makes [`GroupHealth`] unhealthy at once, the reason reaches every rank, and
//!   every rank exits non-zero after a short grace, naming the lost rank.

pub mod collective;
pub mod health;
pub mod kv;
pub mod pipeline;
pub mod steps;
pub mod wire;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::engine::runner::{Pipe, Runner, Step, StepBroadcast};
use crate::model::parallel::{Collective, Identity, Stage};
pub use health::{EXIT_GRACE, EXIT_GROUP_LOST, ExitHook, GroupHealth, exit_process};
use health::{Shared, start_watchdog};
use pipeline::{Layout, TcpPipe};
use wire::{Channel, Directory, Hello, MAGIC, Welcome, kind};

/// Where and how this rank joins its group.
#[derive(Clone, Debug)]
pub struct GroupConfig {
    /// This rank (0 is the leader).
    pub rank: usize,
    /// Ranks in the group: TP x PP.
    pub world: usize,
    /// Pipeline stages (1: tensor parallelism only); `world / pp` ranks per stage, global rank
    /// `g` being TP rank `g % (world / pp)` of stage `g / (world / pp)`.
    pub pp: usize,
    /// The leader's host name or address.
    pub leader_host: String,
    /// The leader's rendezvous port.
    pub port: u16,
    /// Identifies this incarnation of the group; ranks with another id are refused.
    pub group_id: String,
    /// How long followers keep trying to reach the leader, and the leader waits for them.
    pub connect_deadline: Duration,
    /// How long a silent peer or a blocked all-reduce is tolerated before the group is lost.
    pub stall_timeout: Duration,
    /// The group's shared secret (`TESSERA_GROUP_SECRET`): joiners prove they hold it with an
    /// HMAC over the leader's challenge. Empty: no secret (the group id still must match).
    pub secret: Vec<u8>,
}

/// A follower's supply of steps from the leader.
pub trait StepSource: Send {
    /// The next step; `Ok(None)` when the leader closed the group cleanly.
    fn next(&mut self) -> anyhow::Result<Option<Step>>;
}

/// What this rank does in the group.
pub enum Role {
    /// Rank 0: decides the steps and broadcasts them.
    Leader(Box<dyn StepBroadcast>),
    /// Every other rank: executes the leader's steps.
    Follower(Box<dyn StepSource>),
}

/// A joined group: the collective for the engine (this rank's stage's tensor-parallel group),
/// this rank's role, its pipeline stage and transport, and the group's health.
pub struct Group {
    pub collective: Box<dyn Collective>,
    pub role: Role,
    pub health: GroupHealth,
    pub stage: Stage,
    /// The activation transport when there is more than one stage.
    pub pipe: Option<Box<dyn Pipe>>,
}

/// The group is lost (a rank died, went silent or fell out of step); the message names the rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupError(pub String);

impl std::fmt::Display for GroupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tensor-parallel group lost: {}", self.0)
    }
}

impl std::error::Error for GroupError {}

/// Whether `e` (or anything in its chain) is a [`GroupError`].
pub fn is_group_error(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<GroupError>())
}

/// Join the group; when it is lost later, log the reason and exit the process
/// ([`EXIT_GROUP_LOST`]).
pub fn join(cfg: &GroupConfig) -> anyhow::Result<Group> {
    join_with_exit(cfg, Box::new(exit_process))
}

/// [`join`] with another exit hook (tests observe the exit instead of dying).
pub fn join_with_exit(cfg: &GroupConfig, exit: ExitHook) -> anyhow::Result<Group> {
    anyhow::ensure!(cfg.world >= 1, "the group's world size must be at least 1");
    anyhow::ensure!(
        cfg.rank < cfg.world,
        "rank {} is outside a group of {} ranks (ranks are 0..{})",
        cfg.rank,
        cfg.world,
        cfg.world - 1
    );
    anyhow::ensure!(
        !cfg.stall_timeout.is_zero(),
        "the stall timeout must be positive"
    );
    anyhow::ensure!(
        cfg.pp >= 1 && cfg.world.is_multiple_of(cfg.pp),
        "{} pipeline stages do not divide a group of {} ranks",
        cfg.pp,
        cfg.world
    );
    let shared = Shared::new(cfg.rank, exit, EXIT_GRACE);
    if cfg.world == 1 {
        return Ok(Group {
            collective: Box::new(Identity),
            role: Role::Leader(Box::new(NoFollowers)),
            health: GroupHealth(shared),
            stage: Stage::WHOLE,
            pipe: None,
        });
    }
    if cfg.rank == 0 {
        join_leader(cfg, shared)
    } else {
        join_follower(cfg, shared)
    }
}

/// Execute the leader's steps on this rank until the leader closes the group. A step that fails
/// here for a reason every rank shares (a full KV cache, a bad token) fails on the leader too and
/// is skipped; a lost group ends with an error naming the lost rank.
pub fn follow(runner: &mut Runner, source: &mut dyn StepSource) -> anyhow::Result<()> {
    while let Some(step) = source.next()? {
        if let Err(e) = runner.execute(&step) {
            if is_group_error(&e) {
                return Err(e);
            }
            let seqs: Vec<u64> = match &step {
                Step::Forward { seq, .. }
                | Step::Release { seq }
                | Step::Reserve { seq, .. }
                | Step::SendKv { seq, .. }
                | Step::InstallKv { seq, .. } => vec![*seq],
                Step::ForwardBatch { seqs } => seqs.iter().map(|(s, _)| *s).collect(),
            };
            tracing::warn!(
                ?seqs,
                "a step failed on this rank (the leader's fails alike): {e:#}"
            );
        }
    }
    Ok(())
}

struct NoFollowers;

impl StepBroadcast for NoFollowers {
    fn broadcast(&mut self, _step: &Step) -> anyhow::Result<()> {
        Ok(())
    }
}

/// The address the leader listens on: the loopback address when the leader's host is local
/// loopback (laptops, tests), every interface otherwise (a pod's name resolves to its own IP,
/// possibly only once the pod is ready).
pub(crate) fn bind_addrs(host: &str, port: u16) -> Vec<SocketAddr> {
    let loopback: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map(|a| a.filter(|a| a.ip().is_loopback()).collect())
        .unwrap_or_default();
    if !loopback.is_empty() {
        return loopback;
    }
    vec![
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
    ]
}

fn join_leader(cfg: &GroupConfig, shared: Arc<Shared>) -> anyhow::Result<Group> {
    let addrs = bind_addrs(&cfg.leader_host, cfg.port);
    let listener = TcpListener::bind(&addrs[..]).with_context(|| {
        format!(
            "rank 0 cannot listen for the group on port {} ({})",
            cfg.port,
            addrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    listener.set_nonblocking(true)?;
    tracing::info!(
        world = cfg.world,
        group = %cfg.group_id,
        "rank 0 waiting for {} ranks on {}",
        cfg.world - 1,
        listener.local_addr()?
    );
    let deadline = Instant::now() + cfg.connect_deadline;
    let want = 3 * (cfg.world - 1);
    let mut slots: BTreeMap<(usize, Channel), TcpStream> = BTreeMap::new();
    let mut listen: Vec<Option<String>> = vec![None; cfg.world];
    let mut refused: Vec<String> = Vec::new();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Handshake>();
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while slots.len() < want {
        if Instant::now() >= deadline {
            let joined: Vec<usize> = (1..cfg.world)
                .filter(|r| Channel::ALL.iter().all(|c| slots.contains_key(&(*r, *c))))
                .collect();
            let missing: Vec<usize> = (1..cfg.world).filter(|r| !joined.contains(r)).collect();
            bail!(
                "the group did not form within {:.0} s: ranks {missing:?} of {} never joined (joined: {joined:?}){}",
                cfg.connect_deadline.as_secs_f64(),
                cfg.world,
                if refused.is_empty() {
                    String::new()
                } else {
                    format!("; refused: {}", refused.join("; "))
                }
            );
        }
        // Finished handshakes first: each is judged here, one at a time, against the slots.
        let mut progressed = false;
        while let Ok(h) = done_rx.try_recv() {
            progressed = true;
            let (mut s, peer, nonce, hello) = match h {
                Handshake::Failed { peer, why } => {
                    tracing::warn!("a connection from {peer} failed its handshake: {why}");
                    refused.push(format!("{peer}: {why}"));
                    continue;
                }
                Handshake::Hello {
                    stream,
                    peer,
                    nonce,
                    hello,
                } => (stream, peer, nonce, hello),
            };
            let verdict = judge(cfg, &nonce, &hello, |r, c| slots.contains_key(&(r, c)));
            let welcome = Welcome::of(&verdict);
            let sent = wire::write_json(&mut s, kind::WELCOME, &welcome);
            match (verdict, sent) {
                (Ok(()), Ok(())) => {
                    tracing::debug!(rank = hello.rank, channel = ?hello.channel, "rank connected from {peer}");
                    if let Some(p) = hello.listen {
                        listen[hello.rank] = Some(SocketAddr::new(peer.ip(), p).to_string());
                    }
                    slots.insert((hello.rank, hello.channel), s);
                }
                (Ok(()), Err(e)) => {
                    // The joiner went away after its hello: not a member; it may come again.
                    tracing::warn!(
                        rank = hello.rank,
                        "a joiner from {peer} left before its welcome: {e}"
                    );
                    refused.push(format!("{peer}: left before its welcome ({e})"));
                }
                (Err(msg), _) => {
                    tracing::warn!(
                        claimed_group = %hello.group_id,
                        "refused a connection from {peer}: {msg}"
                    );
                    refused.push(format!("{peer}: {msg}"));
                }
            }
        }
        match listener.accept() {
            Ok((s, peer)) => {
                if in_flight.load(std::sync::atomic::Ordering::SeqCst) >= MAX_HANDSHAKES {
                    tracing::warn!(
                        "dropped a connection from {peer}: {MAX_HANDSHAKES} handshakes are already under way"
                    );
                    continue;
                }
                spawn_handshake(s, peer, deadline, done_tx.clone(), Arc::clone(&in_flight));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if !progressed {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            Err(e) => {
                tracing::warn!("accepting a rank's connection: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    let mut data = Vec::new();
    let mut steps = Vec::new();
    let mut beats = Vec::new();
    for ((rank, channel), s) in slots {
        let _ = s.set_read_timeout(None);
        shared.track(&s);
        match channel {
            Channel::Data => data.push(s),
            Channel::Steps => steps.push(s),
            Channel::Heartbeat => beats.push((rank, s)),
            Channel::Stage | Channel::Pipe | Channel::Kv => {
                unreachable!("refused by check_hello")
            }
        }
    }
    let layout = Layout {
        tp: cfg.world / cfg.pp,
        pp: cfg.pp,
    };
    let ready = if cfg.pp > 1 {
        if let Some(r) = (layout.tp..cfg.world).find(|r| listen[*r].is_none()) {
            bail!(
                "rank {r} of pipeline stage {} announced no pipeline port",
                r / layout.tp
            );
        }
        serde_json::to_vec(&Directory {
            listen: listen.clone(),
        })?
    } else {
        Vec::new()
    };
    for (i, s) in steps.iter_mut().enumerate() {
        wire::write_frame(s, kind::READY, &ready)
            .with_context(|| format!("telling rank {} the group is ready", i + 1))?;
    }
    tracing::info!(world = cfg.world, pp = cfg.pp, group = %cfg.group_id, "group formed");
    start_watchdog(&shared, beats, cfg.stall_timeout);
    spawn_late_refuser(listener, cfg.clone(), Arc::clone(&shared));
    if cfg.pp > 1 {
        // Stage 0's all-reduce joins ranks 1..tp; the last stage's TP rank 0 returns logits.
        let mut data: Vec<Option<TcpStream>> = data.into_iter().map(Some).collect();
        let last = layout.rank(cfg.pp - 1, 0);
        let logits_in = data[last - 1]
            .take()
            .context("the last stage's data connection")?;
        let stage0: Vec<TcpStream> = data[..layout.tp - 1]
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        let mesh = pipeline::form_mesh(cfg, layout, &listen, None, &shared)?;
        let collective: Box<dyn Collective> = if layout.tp == 1 {
            Box::new(Identity)
        } else {
            Box::new(collective::TcpCollective::leader(
                layout.tp,
                stage0,
                cfg.stall_timeout,
                cfg.connect_deadline,
                Arc::clone(&shared),
            ))
        };
        return Ok(Group {
            collective,
            role: Role::Leader(Box::new(steps::TcpBroadcast::new(
                steps,
                cfg.stall_timeout,
                Arc::clone(&shared),
            ))),
            health: GroupHealth(Arc::clone(&shared)),
            stage: Stage::new(0, cfg.pp)?,
            pipe: Some(Box::new(TcpPipe {
                prev: None,
                next: mesh.next.map(|s| (layout.rank(1, 0), s)),
                logits_out: None,
                logits_in: Some((last, logits_in)),
                shared,
            })),
        });
    }
    Ok(Group {
        collective: Box::new(collective::TcpCollective::leader(
            cfg.world,
            data,
            cfg.stall_timeout,
            cfg.connect_deadline,
            Arc::clone(&shared),
        )),
        role: Role::Leader(Box::new(steps::TcpBroadcast::new(
            steps,
            cfg.stall_timeout,
            Arc::clone(&shared),
        ))),
        health: GroupHealth(shared),
        stage: Stage::WHOLE,
        pipe: None,
    })
}

/// The leader's verdict on a joiner: its HMAC for the challenge `nonce`, then its hello.
fn judge(
    cfg: &GroupConfig,
    nonce: &[u8],
    h: &Hello,
    joined: impl Fn(usize, Channel) -> bool,
) -> Result<(), String> {
    if !wire::verify_hello(&cfg.secret, nonce, h) {
        return Err(AUTH_FAILED.to_owned());
    }
    check_hello(cfg, h, joined)
}

fn check_hello(
    cfg: &GroupConfig,
    h: &Hello,
    joined: impl Fn(usize, Channel) -> bool,
) -> Result<(), String> {
    if h.magic != MAGIC {
        return Err(format!(
            "protocol {:?} is not this leader's {MAGIC:?} (another program, or another Tessera version)",
            h.magic
        ));
    }
    if h.group_id != cfg.group_id {
        // Neither id is sent back: the refused peer learns nothing about this group.
        return Err(format!(
            "group id mismatch: rank {} belongs to another incarnation of the replica (a rank of a previous incarnation is refused)",
            h.rank
        ));
    }
    if h.world != cfg.world {
        return Err(format!(
            "world size mismatch: rank {} expects {} ranks, the leader {}",
            h.rank, h.world, cfg.world
        ));
    }
    if !Channel::ALL.contains(&h.channel) {
        return Err(format!(
            "rank {} opened a {:?} connection to the leader's rendezvous port (those go between stages, or to a decode replica's KV port)",
            h.rank, h.channel
        ));
    }
    if h.pp != cfg.pp {
        return Err(format!(
            "pipeline degree mismatch: rank {} expects {} stages, the leader {}",
            h.rank, h.pp, cfg.pp
        ));
    }
    if h.rank == 0 || h.rank >= cfg.world {
        return Err(format!(
            "rank {} is not a follower rank of a group of {} (followers are 1..{})",
            h.rank,
            cfg.world,
            cfg.world - 1
        ));
    }
    if joined(h.rank, h.channel) {
        return Err(format!(
            "rank {} already joined this group (two processes claim the same rank)",
            h.rank
        ));
    }
    Ok(())
}

/// Handshakes under way at once at most; further connections are dropped until one ends.
pub const MAX_HANDSHAKES: usize = 64;

/// The refusal of a joiner whose HMAC is wrong (it names neither group id).
pub const AUTH_FAILED: &str = "authentication failed: this rank's TESSERA_GROUP_SECRET is not the group's (a rank of another incarnation or deployment, or not a Tessera rank)";

/// How one connection's handshake ended.
enum Handshake {
    Hello {
        stream: TcpStream,
        peer: SocketAddr,
        nonce: [u8; wire::NONCE_BYTES],
        hello: Hello,
    },
    Failed {
        peer: SocketAddr,
        why: String,
    },
}

/// Challenge the connection and read its hello on a thread of its own, bounded by `deadline`
/// (and 5 s): a slow or silent client holds only this thread.
fn spawn_handshake(
    mut s: TcpStream,
    peer: SocketAddr,
    deadline: Instant,
    done: std::sync::mpsc::Sender<Handshake>,
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
) {
    in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let counter = Arc::clone(&in_flight);
    let run = move || {
        let result = (|| -> anyhow::Result<Handshake> {
            s.set_nonblocking(false)?;
            let _ = s.set_nodelay(true);
            let left = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(100), Duration::from_secs(5));
            s.set_read_timeout(Some(left))?;
            s.set_write_timeout(Some(left))?;
            let (nonce, hello) = wire::challenge(&mut s)?;
            Ok(Handshake::Hello {
                stream: s,
                peer,
                nonce,
                hello,
            })
        })();
        let _ = done.send(result.unwrap_or_else(|e| Handshake::Failed {
            peer,
            why: format!("{e:#}"),
        }));
        counter.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    };
    if std::thread::Builder::new()
        .name("handshake".into())
        .spawn(run)
        .is_err()
    {
        in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// After the group formed, answer every newcomer with a refusal that says why, until the group
/// ends.
fn spawn_late_refuser(listener: TcpListener, cfg: GroupConfig, shared: Arc<Shared>) {
    let _ = std::thread::Builder::new()
        .name("group-refuser".into())
        .spawn(move || {
            while shared.lost().is_none() && !shared.is_closing() {
                match listener.accept() {
                    Ok((mut s, peer)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                        let Ok((nonce, h)) = wire::challenge(&mut s) else {
                            continue;
                        };
                        let msg = match judge(&cfg, &nonce, &h, |_, _| false) {
                            Err(m) => m,
                            Ok(()) => format!(
                                "the group is already formed: rank {} joined it before",
                                h.rank
                            ),
                        };
                        tracing::warn!("refused a late connection from {peer}: {msg}");
                        let _ = wire::write_json(
                            &mut s,
                            kind::WELCOME,
                            &Welcome {
                                ok: false,
                                error: Some(msg),
                            },
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
}

fn join_follower(cfg: &GroupConfig, shared: Arc<Shared>) -> anyhow::Result<Group> {
    let deadline = Instant::now() + cfg.connect_deadline;
    let layout = Layout {
        tp: cfg.world / cfg.pp,
        pp: cfg.pp,
    };
    let stage = layout.stage_of(cfg.rank);
    let listener = if stage >= 1 {
        Some(pipeline::bind_listener(&cfg.leader_host)?)
    } else {
        None
    };
    let listen = match &listener {
        Some(l) => Some(l.local_addr()?.port()),
        None => None,
    };
    let mut conns = BTreeMap::new();
    for channel in Channel::ALL {
        conns.insert(channel, connect(cfg, channel, listen, deadline)?);
    }
    let mut steps = conns.remove(&Channel::Steps).expect("connected");
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    steps.set_read_timeout(Some(left))?;
    let directory = match wire::read_frame(&mut steps) {
        Ok((kind::READY, payload)) if payload.is_empty() => Directory::default(),
        Ok((kind::READY, payload)) => serde_json::from_slice::<Directory>(&payload)
            .with_context(|| format!("rank {}: the leader's directory", cfg.rank))?,
        Ok((k, _)) => bail!(
            "rank {}: the leader sent frame kind {k} instead of ready",
            cfg.rank
        ),
        Err(e) if wire::is_timeout(&e) => bail!(
            "rank {}: the group did not form within {:.0} s: this rank reached the leader at {}:{}, but other ranks are missing",
            cfg.rank,
            cfg.connect_deadline.as_secs_f64(),
            cfg.leader_host,
            cfg.port
        ),
        Err(e) => bail!(
            "rank {}: the leader at {}:{} dropped the connection before the group formed ({e}; it may have given up waiting for other ranks)",
            cfg.rank,
            cfg.leader_host,
            cfg.port
        ),
    };
    let data = conns.remove(&Channel::Data).expect("connected");
    let beat = conns.remove(&Channel::Heartbeat).expect("connected");
    for s in [&data, &steps, &beat] {
        shared.track(s);
        s.set_read_timeout(None)?;
    }
    tracing::info!(rank = cfg.rank, world = cfg.world, pp = cfg.pp, group = %cfg.group_id, "joined the group");
    start_watchdog(&shared, vec![(0, beat)], cfg.stall_timeout);
    if cfg.pp > 1 {
        let mesh = pipeline::form_mesh(cfg, layout, &directory.listen, listener, &shared)?;
        let t = layout.tp_rank_of(cfg.rank);
        let base = layout.rank(stage, 0);
        let stall = cfg.stall_timeout;
        let first = cfg.connect_deadline;
        let mut data = Some(data);
        let collective: Box<dyn Collective> = if layout.tp == 1 {
            Box::new(Identity)
        } else if stage == 0 {
            let d = data.take().expect("unused");
            Box::new(collective::TcpCollective::follower(
                t,
                layout.tp,
                d,
                stall,
                first,
                Arc::clone(&shared),
            ))
        } else if t == 0 {
            Box::new(
                collective::TcpCollective::leader(
                    layout.tp,
                    mesh.stage_peers,
                    stall,
                    first,
                    Arc::clone(&shared),
                )
                .with_base(base),
            )
        } else {
            let hub = mesh.stage_hub.context("the stage's hub connection")?;
            Box::new(
                collective::TcpCollective::follower(
                    t,
                    layout.tp,
                    hub,
                    stall,
                    first,
                    Arc::clone(&shared),
                )
                .with_base(base),
            )
        };
        let last = stage + 1 == cfg.pp;
        let pipe = TcpPipe {
            prev: mesh
                .prev
                .map(|s| (layout.rank(stage.saturating_sub(1), t), s)),
            next: mesh.next.map(|s| (layout.rank(stage + 1, t), s)),
            logits_out: if last && t == 0 { data.take() } else { None },
            logits_in: None,
            shared: Arc::clone(&shared),
        };
        return Ok(Group {
            collective,
            role: Role::Follower(Box::new(steps::TcpStepSource::new(
                steps,
                Arc::clone(&shared),
            ))),
            health: GroupHealth(shared),
            stage: Stage::new(stage, cfg.pp)?,
            pipe: Some(Box::new(pipe)),
        });
    }
    Ok(Group {
        collective: Box::new(collective::TcpCollective::follower(
            cfg.rank,
            cfg.world,
            data,
            cfg.stall_timeout,
            cfg.connect_deadline,
            Arc::clone(&shared),
        )),
        role: Role::Follower(Box::new(steps::TcpStepSource::new(
            steps,
            Arc::clone(&shared),
        ))),
        health: GroupHealth(shared),
        stage: Stage::WHOLE,
        pipe: None,
    })
}

/// Open one channel to the leader, retrying with backoff until `deadline`; a refusal by the
/// leader is final.
fn connect(
    cfg: &GroupConfig,
    channel: Channel,
    listen: Option<u16>,
    deadline: Instant,
) -> anyhow::Result<TcpStream> {
    let mut backoff = Duration::from_millis(50);
    let mut attempts = 0u32;
    let mut last: String;
    loop {
        attempts += 1;
        match try_connect(cfg, channel, listen, deadline) {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(refusal)) => bail!(
                "rank {} was refused by the leader at {}:{}: {refusal}",
                cfg.rank,
                cfg.leader_host,
                cfg.port
            ),
            Err(e) => last = format!("{e:#}"),
        }
        let now = Instant::now();
        if now >= deadline {
            bail!(
                "rank {} could not join the leader at {}:{} within {:.0} s ({attempts} attempts; last error: {last}); check the leader's address and port, and that rank 0 is running",
                cfg.rank,
                cfg.leader_host,
                cfg.port,
                cfg.connect_deadline.as_secs_f64()
            );
        }
        std::thread::sleep(backoff.min(deadline - now));
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// One attempt: `Err` to retry, `Ok(Err(reason))` for a refusal.
fn try_connect(
    cfg: &GroupConfig,
    channel: Channel,
    listen: Option<u16>,
    deadline: Instant,
) -> anyhow::Result<Result<TcpStream, String>> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    let addrs: Vec<SocketAddr> = (cfg.leader_host.as_str(), cfg.port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", cfg.leader_host))?
        .collect();
    let mut err = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(2))) {
            Ok(mut s) => {
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(left.min(Duration::from_secs(10))))?;
                let hello = Hello {
                    magic: MAGIC.into(),
                    group_id: cfg.group_id.clone(),
                    world: cfg.world,
                    rank: cfg.rank,
                    channel,
                    pp: cfg.pp,
                    listen,
                    mac: String::new(),
                };
                wire::answer_challenge(&mut s, &cfg.secret, hello)?;
                let w: Welcome = wire::read_json(&mut s, kind::WELCOME)?;
                return Ok(if w.ok {
                    Ok(s)
                } else {
                    Err(w.error.unwrap_or_else(|| "no reason given".into()))
                });
            }
            Err(e) => err = Some(anyhow::Error::from(e).context(format!("connecting to {addr}"))),
        }
    }
    Err(err.unwrap_or_else(|| anyhow::anyhow!("{} resolves to no address", cfg.leader_host)))
}
