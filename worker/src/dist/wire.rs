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
/// cannot decode. Version 3 authenticates joiners: the leader opens every connection with a
/// challenge, and the hello carries an HMAC over it ([`hello_mac`]). Version 4 added the KV
/// hand-over of prefill/decode disaggregation (`Step::SendKv`, `Step::InstallKv`, the
/// [`Channel::Kv`] connection).
pub const MAGIC: &str = "tessera-group/4";

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
    /// Handshake, leader to joiner, first: a random nonce to authenticate against.
    pub const CHALLENGE: u8 = 11;
    /// KV connection, prefill rank to decode rank: what follows (JSON `dist::kv::KvBegin`).
    pub const KV_BEGIN: u8 = 12;
    /// KV connection: keys or values of one layer (f32 little-endian, in pieces).
    pub const KV_DATA: u8 = 13;
    /// KV connection, decode rank to prefill rank: stored or refused (JSON [`super::Welcome`]).
    pub const KV_ACK: u8 = 14;
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
    /// Prefill/decode disaggregation: rank r of a prefill replica to rank r of a decode
    /// replica (one sequence's KV-cache shard per connection).
    Kv,
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
    /// Lowercase hex HMAC-SHA256 of the leader's challenge and this hello ([`hello_mac`]).
    #[serde(default)]
    pub mac: String,
}

/// Bytes of the leader's challenge.
pub const NONCE_BYTES: usize = 32;

/// A fresh challenge from the operating system's random source.
pub fn nonce() -> std::io::Result<[u8; NONCE_BYTES]> {
    let mut n = [0u8; NONCE_BYTES];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut n)?;
    Ok(n)
}

/// The HMAC-SHA256 (hex) a joiner proves it holds the group's secret with: keyed by the secret
/// (`TESSERA_GROUP_SECRET`, which the operator derives per incarnation; empty when none is
/// set, which then authenticates nothing beyond the group id), over the leader's challenge and
/// every field of the hello that the leader acts on. A replayed hello fails: each connection
/// gets a new challenge.
pub fn hello_mac(secret: &[u8], nonce: &[u8], h: &Hello) -> String {
    use hmac::Mac;
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key");
    m.update(nonce);
    let fields = format!(
        "\0{}\0{}\0{}\0{}\0{:?}\0{}\0{:?}",
        h.magic, h.group_id, h.world, h.rank, h.channel, h.pp, h.listen
    );
    m.update(fields.as_bytes());
    crate::hex(&m.finalize().into_bytes())
}

/// Whether `h.mac` is the right HMAC for `secret` and `nonce` (compared in constant time).
pub fn verify_hello(secret: &[u8], nonce: &[u8], h: &Hello) -> bool {
    let want = hello_mac(secret, nonce, h);
    want.len() == h.mac.len()
        && want
            .bytes()
            .zip(h.mac.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The accepting side of a handshake: send a fresh challenge, read the joiner's hello. Returns
/// the challenge with the hello, for [`verify_hello`]. The caller sets the timeouts.
pub fn challenge(s: &mut TcpStream) -> anyhow::Result<([u8; NONCE_BYTES], Hello)> {
    let nonce = nonce()?;
    write_frame(s, kind::CHALLENGE, &nonce)?;
    let hello = read_json(s, kind::HELLO).map_err(|e| anyhow::anyhow!("no valid hello ({e})"))?;
    Ok((nonce, hello))
}

/// The joining side: read the challenge, sign `hello` for it with `secret` and send it.
pub fn answer_challenge(s: &mut TcpStream, secret: &[u8], mut hello: Hello) -> anyhow::Result<()> {
    let (k, nonce) = read_frame(s)?;
    anyhow::ensure!(
        k == kind::CHALLENGE,
        "the peer opened with frame kind {k}, not a challenge (is it a Tessera rank speaking {MAGIC}?)"
    );
    hello.mac = hello_mac(secret, &nonce, &hello);
    write_json(s, kind::HELLO, &hello)?;
    Ok(())
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

impl Welcome {
    /// The answer that reports `verdict`: ok, or refused with its reason.
    pub fn of(verdict: &Result<(), String>) -> Self {
        Self {
            ok: verdict.is_ok(),
            error: verdict.as_ref().err().cloned(),
        }
    }
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

/// Floats per frame of an f32 payload: the most a frame may hold.
pub const PIECE_FLOATS: usize = MAX_FRAME / 4;

/// Write `x` (f32 little-endian) as frames of `kind`, each at most `piece` floats: a hidden
/// state or the logits of many sequences over a large vocabulary exceed one frame's limit
/// (64 sequences x 128k vocabulary x 4 bytes = 32 MiB; 256 prefill tokens x 16k hidden x 4 =
/// 16 MiB; and growing with the batch). The receiver knows the count ([`read_f32_frames`]); a
/// payload under the limit is one frame, as before.
pub fn write_f32_frames(
    w: &mut impl Write,
    kind: u8,
    x: &[f32],
    piece: usize,
) -> std::io::Result<()> {
    let piece = piece.max(1);
    let mut chunks = x.chunks(piece).peekable();
    if chunks.peek().is_none() {
        return write_frame(w, kind, &[]);
    }
    let mut buf = Vec::new();
    for chunk in chunks {
        // Header and payload in one buffer, one `write_all` (as `write_frame`), without a
        // second copy of the payload.
        buf.clear();
        buf.resize(5 + 4 * chunk.len(), 0);
        buf[0] = kind;
        buf[1..5].copy_from_slice(&((4 * chunk.len()) as u32).to_le_bytes());
        for (out, v) in buf[5..].chunks_exact_mut(4).zip(chunk) {
            out.copy_from_slice(&v.to_le_bytes());
        }
        w.write_all(&buf)?;
    }
    w.flush()
}

/// Read `n` floats sent by [`write_f32_frames`] with the same `piece`. `Ok(Err(why))` when
/// the peer sent something else (another kind, or pieces of the wrong size): it is out of step.
pub fn read_f32_frames(
    r: &mut impl Read,
    kind: u8,
    n: usize,
    piece: usize,
) -> std::io::Result<Result<Vec<f32>, String>> {
    let piece = piece.max(1);
    let mut out = Vec::with_capacity(n);
    loop {
        let want = (n - out.len()).min(piece);
        let (got, payload) = read_frame(r)?;
        if got != kind || payload.len() != 4 * want {
            return Ok(Err(format!(
                "it sent a frame of kind {got} with {} bytes where kind {kind} with {want} floats (of {n}) was due",
                payload.len()
            )));
        }
        out.extend(
            payload
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        if out.len() == n {
            return Ok(Ok(out));
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Payloads larger than a frame go as several frames and come back whole; one exactly a
    /// piece, an empty one and one under it stay single frames; a peer out of step is named.
    #[test]
    fn f32_payloads_split_into_frames_and_reassemble() {
        for (n, piece, frames) in [(0, 4, 1), (3, 4, 1), (4, 4, 1), (5, 4, 2), (1000, 7, 143)] {
            let x: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
            let mut buf = Vec::new();
            write_f32_frames(&mut buf, kind::LOGITS, &x, piece).unwrap();
            let mut r = std::io::Cursor::new(&buf);
            let mut count = 0;
            while (r.position() as usize) < buf.len() {
                let (k, p) = read_frame(&mut r).unwrap();
                assert_eq!(k, kind::LOGITS);
                assert!(p.len() <= 4 * piece);
                count += 1;
            }
            assert_eq!(count, frames, "n {n}, piece {piece}");
            let back = read_f32_frames(&mut std::io::Cursor::new(&buf), kind::LOGITS, n, piece)
                .unwrap()
                .unwrap();
            assert_eq!(back, x);
        }
        // The receiver expected more floats than were sent, or another kind.
        let mut buf = Vec::new();
        write_f32_frames(&mut buf, kind::HIDDEN, &[1.0; 10], 4).unwrap();
        let why = read_f32_frames(&mut std::io::Cursor::new(&buf), kind::LOGITS, 10, 4)
            .unwrap()
            .unwrap_err();
        assert!(why.contains("kind 9") && why.contains("kind 10"), "{why}");
        let mut short = Vec::new();
        write_f32_frames(&mut short, kind::HIDDEN, &[1.0; 6], 3).unwrap();
        let why = read_f32_frames(&mut std::io::Cursor::new(&short), kind::HIDDEN, 6, 4)
            .unwrap()
            .unwrap_err();
        assert!(why.contains("4 floats (of 6)"), "{why}");
    }

    /// The limit that made the group fail: the logits of 140 sequences over a 128k vocabulary
    /// (71.8 MB) are more than one frame may hold (64 MiB), and now travel as two.
    #[test]
    fn logits_beyond_the_frame_limit_travel_in_pieces() {
        let n = 140 * 128_256;
        assert!(4 * n > MAX_FRAME);
        let x: Vec<f32> = (0..n).map(|i| (i % 977) as f32).collect();
        let mut buf = Vec::new();
        write_f32_frames(&mut buf, kind::LOGITS, &x, PIECE_FLOATS).unwrap();
        let back = read_f32_frames(
            &mut std::io::Cursor::new(&buf),
            kind::LOGITS,
            n,
            PIECE_FLOATS,
        )
        .unwrap()
        .unwrap();
        assert_eq!(back.len(), n);
        assert_eq!(back[n - 1], x[n - 1]);
    }
}
