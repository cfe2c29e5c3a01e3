//! A raw PostgreSQL wire-protocol client, for what real drivers never send.
//!
//! This module owns building frames byte by byte (StartupMessage of any version,
//! SSLRequest, GSSENCRequest, tagged messages with any length) and reading the
//! server's replies as `(tag, body)` pairs, so fault tests can send malformed
//! input and check the exact ErrorResponse and close that come back. Every read
//! has a deadline. It must never interpret more than tests assert on.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::{Buf, BytesMut};
use pgmesh_tests::DEFAULT_TIMEOUT;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Protocol 3.0 (196608).
pub const PROTOCOL_3_0: u32 = 3 << 16;
/// Protocol 3.2 (196610).
pub const PROTOCOL_3_2: u32 = (3 << 16) | 2;
/// SSLRequest code.
const SSL_REQUEST: u32 = 80_877_103;
/// GSSENCRequest code.
const GSSENC_REQUEST: u32 = 80_877_104;

/// One backend message.
#[derive(Debug, Clone)]
pub struct Message {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Message {
    /// A field (`b'C'` SQLSTATE, `b'M'` message, `b'V'` severity) of an
    /// ErrorResponse or NoticeResponse.
    pub fn field(&self, code: u8) -> Option<String> {
        let mut rest = &self.body[..];
        while let Some((&c, r)) = rest.split_first() {
            if c == 0 {
                return None;
            }
            let end = r.iter().position(|&b| b == 0)?;
            if c == code {
                return Some(String::from_utf8_lossy(&r[..end]).into_owned());
            }
            rest = &r[end + 1..];
        }
        None
    }

    /// The SQLSTATE of an ErrorResponse.
    pub fn sqlstate(&self) -> Option<String> {
        self.field(b'C')
    }

    /// The first big-endian `i32` of the body (e.g. an Authentication code).
    pub fn int(&self) -> Option<i32> {
        Some(i32::from_be_bytes(self.body.get(..4)?.try_into().ok()?))
    }
}

/// A tagged frame with a correct length.
pub fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// A simple Query frame.
pub fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    frame(b'Q', &body)
}

/// A StartupMessage with protocol `version` and `params`.
pub fn startup(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// A startup-phase request (SSLRequest, GSSENCRequest) with `code`.
fn request(code: u32) -> Vec<u8> {
    let mut out = 8u32.to_be_bytes().to_vec();
    out.extend_from_slice(&code.to_be_bytes());
    out
}

/// An SSLRequest.
pub fn ssl_request() -> Vec<u8> {
    request(SSL_REQUEST)
}

/// A GSSENCRequest.
pub fn gssenc_request() -> Vec<u8> {
    request(GSSENC_REQUEST)
}

/// A plain TCP connection speaking raw protocol.
#[derive(Debug)]
pub struct RawClient {
    stream: TcpStream,
    buf: BytesMut,
}

impl RawClient {
    /// Open a TCP connection to `addr`.
    pub async fn connect(addr: SocketAddr) -> Result<RawClient> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        Ok(RawClient {
            stream,
            buf: BytesMut::with_capacity(8192),
        })
    }

    /// Connect and log in as `postgres` to `postgres` with protocol 3.0 (trust
    /// auth), returning once ReadyForQuery arrives.
    pub async fn login(addr: SocketAddr) -> Result<RawClient> {
        let mut c = Self::connect(addr).await?;
        c.send(&startup(
            PROTOCOL_3_0,
            &[("user", "postgres"), ("database", "postgres")],
        ))
        .await?;
        let msgs = c.until_ready().await?;
        if let Some(e) = msgs.iter().find(|m| m.tag == b'E') {
            bail!("login failed: {:?}", e.field(b'M'));
        }
        Ok(c)
    }

    /// Write all of `bytes`.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).await.context("sending")?;
        Ok(())
    }

    /// Read one byte that is not framed (the answer to SSLRequest/GSSENCRequest).
    pub async fn recv_byte(&mut self) -> Result<u8> {
        if !self.buf.is_empty() {
            return Ok(self.buf.get_u8());
        }
        let b = tokio::time::timeout(DEFAULT_TIMEOUT, self.stream.read_u8())
            .await
            .context("timed out waiting for a one-byte answer")??;
        Ok(b)
    }

    /// Read the next message; `Ok(None)` at end of stream (a reset counts as
    /// the end: the peer closed while our bytes were unread).
    pub async fn recv(&mut self) -> Result<Option<Message>> {
        self.recv_within(DEFAULT_TIMEOUT).await
    }

    /// [`RawClient::recv`] with its own deadline.
    pub async fn recv_within(&mut self, timeout: Duration) -> Result<Option<Message>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes(self.buf[1..5].try_into().expect("4 bytes"));
                if len < 4 {
                    bail!("server sent a frame with length {len}");
                }
                let total = len as usize + 1;
                if self.buf.len() >= total {
                    let frame = self.buf.split_to(total);
                    return Ok(Some(Message {
                        tag: frame[0],
                        body: frame[5..].to_vec(),
                    }));
                }
            }
            let read = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf))
                .await
                .with_context(|| format!("no message from the server within {timeout:?}"))?;
            match read {
                Ok(0) => {
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    bail!("the server closed mid-frame: {:?}", &self.buf[..]);
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
                Err(e) => return Err(e).context("reading from the server"),
            }
        }
    }

    /// Read messages through the next ReadyForQuery (inclusive).
    pub async fn until_ready(&mut self) -> Result<Vec<Message>> {
        let mut out = Vec::new();
        loop {
            let Some(m) = self.recv().await? else {
                bail!("connection closed before ReadyForQuery; got {out:?}");
            };
            let done = m.tag == b'Z';
            out.push(m);
            if done {
                return Ok(out);
            }
        }
    }

    /// Read every message until the server closes the connection, within
    /// `timeout`.
    pub async fn until_closed(&mut self, timeout: Duration) -> Result<Vec<Message>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_within(left).await {
                Ok(Some(m)) => out.push(m),
                Ok(None) => return Ok(out),
                Err(e) => return Err(e.context(format!("waiting for a close; got {out:?}"))),
            }
        }
    }

    /// Expect the server to answer with an ErrorResponse of severity FATAL and
    /// then close; returns that error.
    pub async fn expect_fatal_close(&mut self) -> Result<Message> {
        let msgs = self.until_closed(DEFAULT_TIMEOUT).await?;
        let Some(err) = msgs.iter().find(|m| m.tag == b'E') else {
            bail!("closed without an ErrorResponse; got {msgs:?}");
        };
        let severity = err.field(b'V').or_else(|| err.field(b'S'));
        if severity.as_deref() != Some("FATAL") {
            bail!("error is not FATAL: {err:?}");
        }
        Ok(err.clone())
    }
}
