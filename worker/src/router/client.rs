//! The router's HTTP/1.1 calls to the replicas: one connection per call (hyper's client
//! connection over a tokio socket), every step bounded in time.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// Why a call to a replica failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallError {
    /// Nothing accepts connections there (the process is gone, or not started yet).
    Unreachable(String),
    /// The replica did not answer in time.
    Timeout(String),
    /// The connection broke, or the answer was not HTTP.
    Broken(String),
    /// The answer was larger than the router takes.
    TooLarge(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unreachable(m)
            | CallError::Timeout(m)
            | CallError::Broken(m)
            | CallError::TooLarge(m) => f.write_str(m),
        }
    }
}

/// Ends the connection's task when the call is done or abandoned (the replica then sees the
/// connection close, which cancels what it was generating for it).
pub struct Conn(tokio::task::JoinHandle<()>);

impl Drop for Conn {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Send `req` to `addr` and wait for the response head: connecting within `connect`, the head
/// within `head` (for a non-streamed answer the head comes with the whole body).
pub async fn open(
    addr: SocketAddr,
    req: Request<Full<Bytes>>,
    connect: Duration,
    head: Duration,
) -> Result<(Response<Incoming>, Conn), CallError> {
    let stream = match tokio::time::timeout(connect, tokio::net::TcpStream::connect(addr)).await {
        Err(_) => {
            return Err(CallError::Timeout(format!(
                "connecting to {addr} took over {:.0} s",
                connect.as_secs_f64()
            )));
        }
        Ok(Err(e)) => return Err(CallError::Unreachable(format!("connecting to {addr}: {e}"))),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| CallError::Broken(format!("HTTP handshake with {addr}: {e}")))?;
    let conn = Conn(tokio::spawn(async move {
        let _ = conn.await;
    }));
    match tokio::time::timeout(head, sender.send_request(req)).await {
        Err(_) => Err(CallError::Timeout(format!(
            "{addr} sent no answer within {:.0} s",
            head.as_secs_f64()
        ))),
        Ok(Err(e)) => Err(CallError::Broken(format!(
            "{addr} broke the connection before answering ({e})"
        ))),
        Ok(Ok(resp)) => Ok((resp, conn)),
    }
}

/// The rest of a body, at most `limit` bytes, within `within`.
pub async fn read_all(
    body: &mut Incoming,
    limit: usize,
    within: Duration,
) -> Result<Bytes, CallError> {
    let read = async {
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|e| CallError::Broken(format!("the answer broke off ({e})")))?;
            if let Ok(data) = frame.into_data() {
                if out.len() + data.len() > limit {
                    return Err(CallError::TooLarge(format!(
                        "the answer is larger than {limit} bytes"
                    )));
                }
                out.extend_from_slice(&data);
            }
        }
        Ok(Bytes::from(out))
    };
    tokio::time::timeout(within, read).await.map_err(|_| {
        CallError::Timeout(format!(
            "the answer did not end within {:.0} s",
            within.as_secs_f64()
        ))
    })?
}

/// The next piece of a body (`None` at its end), waiting at most `idle` for it.
pub async fn next_chunk(body: &mut Incoming, idle: Duration) -> Result<Option<Bytes>, CallError> {
    loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => {
                return Err(CallError::Timeout(format!(
                    "the stream was silent for {:.0} s",
                    idle.as_secs_f64()
                )));
            }
            Ok(None) => return Ok(None),
            Ok(Some(Err(e))) => {
                return Err(CallError::Broken(format!("the stream broke off ({e})")));
            }
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    return Ok(Some(data));
                }
            }
        }
    }
}
