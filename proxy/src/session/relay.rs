//! The relay state machine of one session, free of I/O.
//!
//! It consumes bytes read from either side, splits them at frame boundaries, and
//! appends what must go to the other side. Frames it does not act on are forwarded as
//! the original bytes, streamed even before they are complete, so a large COPY or
//! DataRow never has to fit in memory. Only the few frames it acts on are buffered
//! whole: from the server `Z` (transaction status), `K` (cancel key rewrite), `E`
//! (fatal errors), `R` (SASL mechanism list); from the client `X`, `S`, `Q`, `F`
//! (request accounting). It must never re-encode a frame it does not change.

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use thiserror::Error;

use crate::cancel::{CancelGuard, CancelRegistry};
use crate::net::frame::{self, FrameError};
use crate::net::messages::{self, BackendKey, TxStatus};

/// Faults found in the byte streams. `Client*` are the client's, `Server*` upstream's.
#[derive(Debug, Error)]
pub enum RelayError {
    #[error("{0}")]
    ClientFrame(#[from] FrameError),
    #[error("upstream sent an unframeable message: {0}")]
    ServerFrame(FrameError),
    #[error("upstream sent a malformed BackendKeyData")]
    ServerKey,
}

/// Largest server message the relay buffers whole (the types it buffers are small).
const SERVER_WHOLE_LIMIT: usize = 64 << 20;

/// What the session should do after a batch of client bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAction {
    Continue,
    /// The client sent Terminate: forward it, flush, close.
    Terminate,
}

/// Per-session relay state.
#[derive(Debug)]
pub struct Relay {
    max_message: usize,
    cancels: Arc<CancelRegistry>,
    cancel_guard: Option<CancelGuard>,
    /// Bytes of a passthrough client frame still to stream.
    client_skip: usize,
    /// Bytes of a passthrough server frame still to stream.
    server_skip: usize,
    tx: TxStatus,
    logged_in: bool,
    /// Requests (Sync, Query, FunctionCall) not yet answered by ReadyForQuery.
    outstanding: usize,
    server_fatal: bool,
}

impl Relay {
    pub fn new(max_message: usize, cancels: Arc<CancelRegistry>) -> Self {
        Self {
            max_message,
            cancels,
            cancel_guard: None,
            client_skip: 0,
            server_skip: 0,
            tx: TxStatus::Idle,
            logged_in: false,
            outstanding: 0,
            server_fatal: false,
        }
    }

    /// Transaction status from the last ReadyForQuery.
    pub fn tx_status(&self) -> TxStatus {
        self.tx
    }

    /// Whether startup and authentication have finished (first ReadyForQuery seen).
    pub fn logged_in(&self) -> bool {
        self.logged_in
    }

    /// Whether the session is between transactions with nothing in flight, so it can
    /// be closed without losing work.
    pub fn is_idle(&self) -> bool {
        self.logged_in && self.outstanding == 0 && self.tx == TxStatus::Idle
    }

    /// Whether a frame from the client is only partly forwarded.
    pub fn client_mid_frame(&self) -> bool {
        self.client_skip > 0
    }

    /// Whether a frame from the server is only partly forwarded to the client, in
    /// which case nothing more may be injected into the client stream.
    pub fn server_mid_frame(&self) -> bool {
        self.server_skip > 0
    }

    /// Whether upstream already told the client it is closing (FATAL/PANIC).
    pub fn server_sent_fatal(&self) -> bool {
        self.server_fatal
    }

    /// Moves complete or streamable client frames from `input` to `out`.
    pub fn on_client(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<ClientAction, RelayError> {
        loop {
            if self.client_skip > 0 {
                let n = self.client_skip.min(input.len());
                if n == 0 {
                    return Ok(ClientAction::Continue);
                }
                move_bytes(input, out, n);
                self.client_skip -= n;
                continue;
            }
            if input.len() < 5 {
                return Ok(ClientAction::Continue);
            }
            let tag = input[0];
            if !frame::is_frontend_tag(tag) {
                return Err(FrameError::UnknownTag { tag: tag as char }.into());
            }
            let limit = frame::frontend_body_limit(tag, self.max_message);
            let Some(h) = frame::peek_header(input, limit)? else {
                return Ok(ClientAction::Continue);
            };
            match tag {
                b'S' | b'Q' | b'F' => self.outstanding += 1,
                b'X' => {
                    if input.len() < h.total {
                        return Ok(ClientAction::Continue);
                    }
                    move_bytes(input, out, h.total);
                    return Ok(ClientAction::Terminate);
                }
                _ => {}
            }
            let n = h.total.min(input.len());
            move_bytes(input, out, n);
            self.client_skip = h.total - n;
        }
    }

    /// Moves server frames from `input` to `out`, acting on the few it must read.
    pub fn on_server(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<(), RelayError> {
        loop {
            if self.server_skip > 0 {
                let n = self.server_skip.min(input.len());
                if n == 0 {
                    return Ok(());
                }
                move_bytes(input, out, n);
                self.server_skip -= n;
                continue;
            }
            let Some(h) = frame::peek_header(input, SERVER_WHOLE_LIMIT.max(self.max_message))
                .map_err(RelayError::ServerFrame)?
            else {
                return Ok(());
            };
            if !matches!(h.tag, b'Z' | b'K' | b'E' | b'R') {
                let n = h.total.min(input.len());
                move_bytes(input, out, n);
                self.server_skip = h.total - n;
                continue;
            }
            if input.len() < h.total {
                return Ok(());
            }
            let msg = input.split_to(h.total);
            let body = &msg[5..];
            match h.tag {
                b'Z' => {
                    if let Some(s) = body.first().and_then(|&b| TxStatus::from_byte(b)) {
                        if s != self.tx {
                            tracing::trace!(tx_status = ?s, "transaction status");
                        }
                        self.tx = s;
                    }
                    self.logged_in = true;
                    self.outstanding = self.outstanding.saturating_sub(1);
                    out.extend_from_slice(&msg);
                }
                b'K' => {
                    let upstream = BackendKey::decode(body).ok_or(RelayError::ServerKey)?;
                    let (mine, guard) = self.cancels.register(upstream);
                    self.cancel_guard = Some(guard);
                    out.extend_from_slice(&mine.encode());
                }
                b'E' => {
                    self.server_fatal |= messages::is_fatal(body);
                    out.extend_from_slice(&msg);
                }
                _ => match messages::strip_channel_binding(body) {
                    Some(rewritten) => out.extend_from_slice(&rewritten),
                    None => out.extend_from_slice(&msg),
                },
            }
        }
    }
}

/// Moves the first `n` bytes of `input` to the end of `out`, without copying when
/// `out` is empty.
fn move_bytes(input: &mut BytesMut, out: &mut BytesMut, n: usize) {
    if out.is_empty() && n == input.len() {
        std::mem::swap(input, out);
    } else {
        out.extend_from_slice(&input[..n]);
        input.advance(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn relay() -> Relay {
        Relay::new(
            frame::PG_LARGE_MESSAGE_LIMIT,
            Arc::new(CancelRegistry::default()),
        )
    }

    #[test]
    fn client_bytes_pass_unchanged_in_any_split() {
        let mut stream = msg(b'Q', b"select 1\0");
        stream.extend(msg(b'P', b"\0select $1\0\0\0"));
        stream.extend(msg(b'S', b""));
        for split in 0..stream.len() {
            let mut r = relay();
            let mut out = BytesMut::new();
            // The session keeps unconsumed bytes and appends the next read to them.
            let mut input = BytesMut::from(&stream[..split]);
            r.on_client(&mut input, &mut out).unwrap();
            input.extend_from_slice(&stream[split..]);
            r.on_client(&mut input, &mut out).unwrap();
            assert_eq!(&out[..], &stream[..], "split at {split}");
            assert_eq!(r.outstanding, 2);
        }
    }

    #[test]
    fn unknown_tag_and_terminate() {
        let mut r = relay();
        let mut out = BytesMut::new();
        let mut bad = BytesMut::from(&msg(b'y', b"")[..]);
        assert!(matches!(
            r.on_client(&mut bad, &mut out),
            Err(RelayError::ClientFrame(FrameError::UnknownTag { tag: 'y' }))
        ));
        let mut term = BytesMut::from(&msg(b'X', b"")[..]);
        assert_eq!(
            r.on_client(&mut term, &mut out).unwrap(),
            ClientAction::Terminate
        );
    }

    #[test]
    fn server_key_is_rewritten_and_status_tracked() {
        let mut r = relay();
        let mut input = BytesMut::new();
        input.extend(msg(b'K', &[0, 0, 0, 7, 1, 2, 3, 4]));
        input.extend(msg(b'D', b"\0\x01\0\0\0\x01x"));
        input.extend(msg(b'Z', b"T"));
        let mut out = BytesMut::new();
        r.on_server(&mut input, &mut out).unwrap();
        let key = BackendKey::decode(&out[5..13]).unwrap();
        assert_ne!(key.pid, 7);
        assert_eq!(
            r.cancels.lookup(key.pid, &key.secret).map(|k| k.pid),
            Some(7)
        );
        assert_eq!(r.tx_status(), TxStatus::InTransaction);
        assert!(r.logged_in());
        assert_eq!(
            &out[13..],
            &[msg(b'D', b"\0\x01\0\0\0\x01x"), msg(b'Z', b"T")].concat()[..]
        );
    }

    #[test]
    fn large_server_frames_stream() {
        let mut r = relay();
        let row = msg(b'D', &vec![b'x'; 100_000]);
        let mut out = BytesMut::new();
        let mut input = BytesMut::from(&row[..1000]);
        r.on_server(&mut input, &mut out).unwrap();
        assert_eq!(out.len(), 1000, "partial DataRow is forwarded at once");
        assert!(r.server_mid_frame());
        let mut input = BytesMut::from(&row[1000..]);
        r.on_server(&mut input, &mut out).unwrap();
        assert_eq!(&out[..], &row[..]);
        assert!(!r.server_mid_frame());
    }
}
