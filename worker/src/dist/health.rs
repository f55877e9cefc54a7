//! Group health and the watchdog: heartbeats on a connection of their own, from threads of
//! their own (so a long prefill never starves them), and the one-way trip from "a rank is lost"
//! to "every rank exits".
//!
//! When anything detects a loss (a heartbeat reader, a broken or stalled all-reduce, a failed
//! step broadcast), [`Shared::fail`] records the first reason (so [`GroupHealth::check`] and the
//! leader's `/readyz` fail at once), relays it to the peers over the heartbeat connections,
//! shuts every group connection down (so blocked reads on this rank return) and, after a short
//! grace, calls the exit hook (by default: log and `std::process::exit`).

use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::wire::{self, kind};

/// What a rank does once its group is lost: receives the reason. The default logs it and exits
/// the process with [`EXIT_GROUP_LOST`].
pub type ExitHook = Box<dyn FnOnce(&str) + Send>;

/// Exit status of a rank whose group was lost.
pub const EXIT_GROUP_LOST: i32 = 3;

/// Time between detecting a loss and calling the exit hook: long enough for the leader's
/// `/readyz` to answer 503 and for the reason to reach the other ranks.
pub const EXIT_GRACE: Duration = Duration::from_millis(1500);

/// The default exit hook.
pub fn exit_process(reason: &str) {
    tracing::error!("tensor-parallel group lost: {reason}; exiting");
    eprintln!("error: tensor-parallel group lost: {reason}");
    crate::logging::write_termination_message(&format!("tensor-parallel group lost: {reason}"));
    std::process::exit(EXIT_GROUP_LOST);
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// State shared by a rank's collective, step transport, watchdog threads and health handle.
pub(crate) struct Shared {
    pub rank: usize,
    lost: Mutex<Option<String>>,
    wake: Condvar,
    closing: AtomicBool,
    exit: Mutex<Option<ExitHook>>,
    grace: Duration,
    /// Clones of every group connection, shut down when the group is lost.
    conns: Mutex<Vec<TcpStream>>,
    /// Heartbeat writers: (peer rank, stream). The leader has one per follower, a follower one.
    hb_out: Mutex<Vec<(usize, TcpStream)>>,
}

impl Shared {
    pub fn new(rank: usize, exit: ExitHook, grace: Duration) -> Arc<Self> {
        Arc::new(Self {
            rank,
            lost: Mutex::new(None),
            wake: Condvar::new(),
            closing: AtomicBool::new(false),
            exit: Mutex::new(Some(exit)),
            grace,
            conns: Mutex::new(Vec::new()),
            hb_out: Mutex::new(Vec::new()),
        })
    }

    /// Remember a connection to shut down if the group is lost.
    pub fn track(&self, s: &TcpStream) {
        if let Ok(c) = s.try_clone() {
            lock(&self.conns).push(c);
        }
    }

    pub fn lost(&self) -> Option<String> {
        lock(&self.lost).clone()
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// The group ends cleanly: losses from now on are departures, not failures.
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let _guard = lock(&self.lost);
        self.wake.notify_all();
    }

    /// Record that the group is lost (the first reason wins), relay it, unblock this rank's
    /// reads and schedule the exit hook. Returns the reason in force.
    pub fn fail(&self, reason: String) -> String {
        if self.is_closing() {
            return reason;
        }
        {
            let mut lost = lock(&self.lost);
            if let Some(first) = lost.as_ref() {
                return first.clone();
            }
            *lost = Some(reason.clone());
            self.wake.notify_all();
        }
        tracing::error!(rank = self.rank, "tensor-parallel group lost: {reason}");
        for (_, s) in lock(&self.hb_out).iter_mut() {
            let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
            let _ = wire::write_frame(s, kind::LOST, reason.as_bytes());
        }
        for c in lock(&self.conns).iter() {
            let _ = c.shutdown(Shutdown::Both);
        }
        if let Some(hook) = lock(&self.exit).take() {
            let grace = self.grace;
            let msg = reason.clone();
            let _ = std::thread::Builder::new()
                .name("group-exit".into())
                .spawn(move || {
                    std::thread::sleep(grace);
                    hook(&msg);
                });
        }
        reason
    }

    /// Wait up to `timeout` for a verdict from the watchdog (a relayed reason names the rank
    /// that was really lost, better than "my connection closed"); otherwise fail with `own`.
    pub fn verdict_or_fail(&self, timeout: Duration, own: String) -> String {
        let deadline = Instant::now() + timeout;
        let mut lost = lock(&self.lost);
        loop {
            if let Some(r) = lost.as_ref() {
                return r.clone();
            }
            if self.is_closing() {
                return own;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            lost = self
                .wake
                .wait_timeout(lost, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(lost);
        self.fail(own)
    }

    /// Sleep up to `d`; true when the group was lost or closed meanwhile.
    fn sleep_or_end(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut lost = lock(&self.lost);
        loop {
            if lost.is_some() || self.is_closing() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            lost = self
                .wake
                .wait_timeout(lost, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// The group's health as the leader's `/readyz` sees it.
#[derive(Clone)]
pub struct GroupHealth(pub(crate) Arc<Shared>);

impl GroupHealth {
    /// `Ok` while every rank is connected; `Err` names the lost rank and why.
    pub fn check(&self) -> Result<(), String> {
        match self.0.lost() {
            Some(r) => Err(r),
            None => Ok(()),
        }
    }

    /// This rank's number.
    pub fn rank(&self) -> usize {
        self.0.rank
    }

    /// Whether the group was closed cleanly by the leader.
    pub fn is_closed(&self) -> bool {
        self.0.is_closing()
    }

    /// Cut every connection of this rank without a word to the peers, as a crash would (tests
    /// use it to lose a rank inside one process).
    #[doc(hidden)]
    pub fn simulate_crash(&self) {
        // `closing` keeps this rank's own threads from failing the group; the heartbeat
        // sender reads it as a clean close and says goodbye (BYE) to the peers, which would
        // make them close quietly instead of exiting. Holding the heartbeat writers' lock until
        // they are shut down means that goodbye can only meet closed sockets.
        let out = lock(&self.0.hb_out);
        self.0.closing.store(true, Ordering::SeqCst);
        for (_, c) in out.iter() {
            let _ = c.shutdown(Shutdown::Both);
        }
        for c in lock(&self.0.conns).iter() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// A health handle that is always healthy (a single rank has no group to lose).
    pub fn single() -> Self {
        Self(Shared::new(0, Box::new(|_| {}), Duration::ZERO))
    }
}

pub(crate) fn name_of(rank: usize) -> String {
    if rank == 0 {
        "rank 0 (the leader)".into()
    } else {
        format!("rank {rank}")
    }
}

/// Start the heartbeat threads over `peers` (rank, heartbeat connection): one reader per peer
/// that fails the group after `stall` without a frame, one sender pinging every peer.
pub(crate) fn start_watchdog(
    shared: &Arc<Shared>,
    peers: Vec<(usize, TcpStream)>,
    stall: Duration,
) {
    let interval = (stall / 5).clamp(Duration::from_millis(20), Duration::from_secs(1));
    for (peer, s) in &peers {
        let (peer, shared) = (*peer, Arc::clone(shared));
        let Ok(mut reader) = s.try_clone() else {
            shared.fail(format!(
                "{} lost: cannot clone its heartbeat connection",
                name_of(peer)
            ));
            continue;
        };
        let _ = reader.set_read_timeout(Some(stall));
        let _ = std::thread::Builder::new()
            .name(format!("hb-read-{peer}"))
            .spawn(move || read_heartbeats(&shared, peer, &mut reader, stall));
    }
    for (_, s) in &peers {
        let _ = s.set_write_timeout(Some(stall));
    }
    *lock(&shared.hb_out) = peers;
    let shared = Arc::clone(shared);
    let _ = std::thread::Builder::new()
        .name("hb-send".into())
        .spawn(move || {
            loop {
                if shared.sleep_or_end(interval) {
                    if shared.is_closing() && shared.lost().is_none() {
                        for (_, s) in lock(&shared.hb_out).iter_mut() {
                            let _ = wire::write_frame(s, kind::BYE, &[]);
                        }
                    }
                    return;
                }
                let mut broken = Vec::new();
                for (peer, s) in lock(&shared.hb_out).iter_mut() {
                    if let Err(e) = wire::write_frame(s, kind::PING, &[]) {
                        broken.push((*peer, e));
                    }
                }
                if let Some((peer, e)) = broken.into_iter().next() {
                    let why = if wire::is_timeout(&e) {
                        format!(
                            "its heartbeats are not being read for {:.1} s",
                            stall.as_secs_f64()
                        )
                    } else {
                        wire::describe(&e)
                    };
                    shared.fail(format!("{} lost: {why}", name_of(peer)));
                    return;
                }
            }
        });
}

fn read_heartbeats(shared: &Shared, peer: usize, s: &mut TcpStream, stall: Duration) {
    loop {
        match wire::read_frame(s) {
            Ok((kind::PING, _)) => {}
            Ok((kind::BYE, _)) => {
                if peer == 0 {
                    // The leader closes the group cleanly.
                    shared.close();
                } else if !shared.is_closing() {
                    shared.fail(format!("{} left the group", name_of(peer)));
                }
                return;
            }
            Ok((kind::LOST, reason)) => {
                let reason = String::from_utf8_lossy(&reason).into_owned();
                if shared.rank == 0 {
                    shared.fail(format!("{reason} (reported by {})", name_of(peer)));
                } else {
                    shared.fail(reason);
                }
                return;
            }
            Ok(_) => {}
            Err(e) => {
                if shared.is_closing() || shared.lost().is_some() {
                    return;
                }
                let why = if wire::is_timeout(&e) {
                    format!("no heartbeat for {:.1} s", stall.as_secs_f64())
                } else {
                    wire::describe(&e)
                };
                shared.fail(format!("{} lost: {why}", name_of(peer)));
                return;
            }
        }
    }
}
