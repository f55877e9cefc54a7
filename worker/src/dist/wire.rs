//! Framing on the group's TCP connections and the rendezvous handshake.
//!
//! Every message is a frame: one kind byte, a little-endian `u32` payload length, the payload.
//! Handshake messages and steps are JSON payloads (small and readable in a packet capture); the
//! all-reduce data path uses its own fixed header (see `collective.rs`).

use std::io::{Read, Write};
use std::net::TcpStream;

use serde::{Deserialize, Serialize};

/// Protocol name and version carried in every hello; a peer speaking anything else is refused.
/// Version 2 added the batched forward step (`Step::ForwardBatch`), which a version-1 rank
/// cannot decode; every other frame is unchanged.
pub const MAGIC: &str = "tessera-group/2";

/// Largest frame accepted (a step carries at most a prompt's tokens).
pub const MAX_FRAME: usize = 64 << 20;

pub mod kind {
    /// Handshake: a rank's hello (JSON [`super::Hello`]).
    pub const HELLO: u8 = 1;
    /// Handshake: the leader's answer (JSON [`super::Welcome`]).
    pub const WELCOME: u8 = 2;
    /// Steps channel: every rank has joined; the group is formed.
    pub const READY: u8 = 3;
    /// Steps channel: one JSON-encoded `Step`.
    pub const STEP: u8 = 4;
    /// Steps channel: the leader closes the group cleanly.
    pub const CLOSE: u8 = 5;
    /// Heartbeat channel: alive.
    pub const PING: u8 = 6;
    /// Heartbeat channel: leaving cleanly.
    pub const BYE: u8 = 7;
    /// Heartbeat channel, leader to followers: the group is lost (UTF-8 reason).
    pub const LOST: u8 = 8;
    /// Pipeline connection: a stage's hidden state for the next stage (f32 little-endian).
    pub const HIDDEN: u8 = 9;
    /// The last stage's logits for the global leader (f32 little-endian).
    pub const LOGITS: u8 = 10;
}

/// The three connections every follower opens to the leader.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// All-reduce payloads (read with the stall timeout).
    Data,
    /// Steps from the leader, in order (idle for as long as there is no work).
    Steps,
    /// Heartbeats in both directions, from threads of their own.
    Heartbeat,
    /// Pipeline parallelism, between followers: a rank of stage s >= 1 to its stage's TP rank 0
    /// (the stage's all-reduce).
    Stage,
    /// Pipeline parallelism: TP rank t of stage s to TP rank t of stage s + 1 (activations).
    Pipe,
}

impl Channel {
    pub const ALL: [Channel; 3] = [Channel::Data, Channel::Steps, Channel::Heartbeat];
}

/// The first frame on every connection, follower to leader.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub magic: String,
    pub group_id: String,
    pub world: usize,
    pub rank: usize,
    pub channel: Channel,
    /// Pipeline-parallel degree (stages); 1 when absent.
    #[serde(default = "one")]
    pub pp: usize,
    /// The port this rank accepts its pipeline connections on (ranks of stages >= 1).
    #[serde(default)]
    pub listen: Option<u16>,
}

fn one() -> usize {
    1
}

/// The leader's "ready" payload when the group has more than one stage: where every rank
/// accepts pipeline connections (`HOST:PORT`; `None` for ranks of stage 0).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Directory {
    pub listen: Vec<Option<String>>,
}

/// The leader's answer to a hello.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
}

/// Write one frame in a single `write_all` (so a small frame is one segment with TCP_NODELAY).
pub fn write_frame(w: &mut impl Write, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(5 + payload.len());
    buf.push(kind);
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(payload);
    w.write_all(&buf)?;
    w.flush()
}

/// Read one frame.
pub fn read_frame(r: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head)?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes exceeds the limit of {MAX_FRAME}"),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok((head[0], payload))
}

/// Write a JSON frame.
pub fn write_json(s: &mut TcpStream, kind: u8, v: &impl Serialize) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    write_frame(s, kind, &bytes)
}

/// Read a frame of the expected kind and decode its JSON payload.
pub fn read_json<T: for<'de> Deserialize<'de>>(s: &mut TcpStream, want: u8) -> anyhow::Result<T> {
    let (k, payload) = read_frame(s)?;
    anyhow::ensure!(
        k == want,
        "expected a frame of kind {want}, got kind {k} (is the peer a Tessera rank of the same version?)"
    );
    Ok(serde_json::from_slice(&payload)?)
}

/// Whether an I/O error is a read timeout (a stall) rather than a broken connection.
pub fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Words for a broken connection.
pub fn describe(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            "its connection closed (the process exited or was killed)".into()
        }
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => {
            format!("its connection broke ({e}; the process exited or was killed)")
        }
        _ => format!("its connection failed: {e}"),
    }
}
