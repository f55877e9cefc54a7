//! The step transport: the leader sends every [`Step`] to every follower, in order, on a
//! connection of its own (JSON payloads in length-prefixed frames: a decode step is about 40
//! bytes).

use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use super::health::{Shared, name_of};
use super::wire::{self, kind};
use super::{GroupError, StepSource};
use crate::engine::runner::{Step, StepBroadcast};

/// The leader's [`StepBroadcast`]. Dropping it closes the group cleanly: followers receive a
/// close frame and their [`StepSource`] ends with `Ok(None)`.
pub struct TcpBroadcast {
    /// Step connections to ranks 1..n, in rank order.
    peers: Vec<TcpStream>,
    shared: Arc<Shared>,
}

impl TcpBroadcast {
    pub(crate) fn new(peers: Vec<TcpStream>, stall: Duration, shared: Arc<Shared>) -> Self {
        for s in &peers {
            let _ = s.set_write_timeout(Some(stall));
        }
        Self { peers, shared }
    }
}

impl StepBroadcast for TcpBroadcast {
    fn broadcast(&mut self, step: &Step) -> anyhow::Result<()> {
        if let Some(reason) = self.shared.lost() {
            return Err(GroupError(reason).into());
        }
        let payload = serde_json::to_vec(step)?;
        for (i, s) in self.peers.iter_mut().enumerate() {
            if let Err(e) = wire::write_frame(s, kind::STEP, &payload) {
                let own = format!("{} lost: {}", name_of(i + 1), wire::describe(&e));
                let reason = self.shared.verdict_or_fail(Duration::from_millis(300), own);
                return Err(GroupError(reason).into());
            }
        }
        Ok(())
    }
}

impl Drop for TcpBroadcast {
    fn drop(&mut self) {
        if self.shared.lost().is_some() {
            return;
        }
        self.shared.close();
        for s in &mut self.peers {
            let _ = wire::write_frame(s, kind::CLOSE, &[]);
        }
    }
}

/// A follower's [`StepSource`]: the steps the leader sends, in order.
pub struct TcpStepSource {
    conn: TcpStream,
    shared: Arc<Shared>,
}

impl TcpStepSource {
    pub(crate) fn new(conn: TcpStream, shared: Arc<Shared>) -> Self {
        let _ = conn.set_read_timeout(None);
        Self { conn, shared }
    }
}

impl StepSource for TcpStepSource {
    fn next(&mut self) -> anyhow::Result<Option<Step>> {
        match wire::read_frame(&mut self.conn) {
            Ok((kind::STEP, payload)) => {
                let step: Step = serde_json::from_slice(&payload).map_err(|e| {
                    GroupError(self.shared.fail(format!(
                        "rank 0 (the leader) sent a step this rank cannot decode: {e}"
                    )))
                })?;
                Ok(Some(step))
            }
            Ok((kind::CLOSE, _)) => {
                self.shared.close();
                Ok(None)
            }
            Ok((k, _)) => Err(GroupError(self.shared.fail(format!(
                "rank 0 (the leader) sent an unexpected frame of kind {k} on the steps connection"
            )))
            .into()),
            Err(e) => {
                if self.shared.is_closing() {
                    return Ok(None);
                }
                let own = format!("rank 0 (the leader) lost: {}", wire::describe(&e));
                Err(GroupError(
                    self.shared
                        .verdict_or_fail(Duration::from_millis(1000), own),
                )
                .into())
            }
        }
    }
}
