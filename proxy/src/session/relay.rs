//! The relay state machine of one session, free of I/O.
//!
//! It consumes bytes read from either side, splits them at frame boundaries, and
//! appends what must go to the other side. Frames it does not act on are forwarded as
//! the original bytes, streamed even before they are complete, so a large COPY or
//! DataRow never has to fit in memory. The frames it acts on are read whole: from the
//! client the requests (`Q P B E S C D F X`), from the server the answers that end a
//! request plus `K` (cancel key rewrite), `E` (fatal errors), `R` (SASL mechanisms)
//! and `S` (application_name). It stamps write transactions (see `stamp`; the
//! simple-protocol splicing is in `splice`) and
//! swallows exactly the answers to what it injected (see `track`). It must never
//! re-encode a frame it does not change.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use pgmesh_sql::Kind;
use thiserror::Error;

use super::stamp::{self, read_cstr, Stamper};
use super::track::{Awaiting, Expectations, TxTrack};
use super::ClientInfo;
use crate::cancel::{CancelGuard, CancelRegistry};
use crate::net::frame::{self, FrameError};
use crate::net::messages::{self, BackendKey, TxStatus};

/// Faults found in the byte streams. `Client*` are the client's, `Server*` upstream's.
#[derive(Debug, Error)]
pub enum RelayError {
    #[error("{0}")]
    ClientFrame(#[from] FrameError),
    #[error("malformed {tag:?} message from client")]
    ClientMessage { tag: char },
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
    info: ClientInfo,
    stamper: Option<Arc<Stamper>>,
    /// Bytes of a passthrough client frame still to stream.
    client_skip: usize,
    /// Bytes of a passthrough server frame still to stream.
    server_skip: usize,
    tx: TxStatus,
    logged_in: bool,
    server_fatal: bool,
    track: TxTrack,
    expect: Expectations,
    /// Prepared statements and portals: their kind, and whether they are
    /// `COPY ... FROM STDIN`.
    statements: HashMap<Vec<u8>, (Kind, bool)>,
    portals: HashMap<Vec<u8>, (Kind, bool)>,
    /// The session is (or is about to be) in extended-protocol copy-in mode, where
    /// the server ignores Sync: no stamp may go in and no answer is due.
    copy_in: bool,
    /// Execute/Query/FunctionCall requests forwarded since the last Sync: when zero,
    /// a ReadyForQuery that leaves no Sync pending describes the current state.
    exec_since_sync: usize,
    /// Stamp statements spliced into simple queries whose answers are still due.
    simple_stamps: usize,
    /// Inside the answer (RowDescription .. CommandComplete) of a spliced stamp.
    in_stamp_answer: bool,
    /// Where stamps were spliced into the current simple query, as (start, length)
    /// in characters of the rewritten text, to map error positions back.
    splices: Vec<(usize, usize)>,
    /// Client bytes held back: a COMMIT that needs a stamp waits until every earlier
    /// request is answered, because only then is it known whether the transaction
    /// failed (a stamp in a failed transaction would turn ROLLBACK into an error).
    held: BytesMut,
}

impl Relay {
    pub fn new(
        max_message: usize,
        cancels: Arc<CancelRegistry>,
        info: ClientInfo,
        stamper: Option<Arc<Stamper>>,
    ) -> Self {
        Self {
            max_message,
            cancels,
            cancel_guard: None,
            info,
            stamper,
            client_skip: 0,
            server_skip: 0,
            tx: TxStatus::Idle,
            logged_in: false,
            server_fatal: false,
            track: TxTrack::default(),
            expect: Expectations::default(),
            statements: HashMap::new(),
            portals: HashMap::new(),
            copy_in: false,
            exec_since_sync: 0,
            simple_stamps: 0,
            in_stamp_answer: false,
            splices: Vec::new(),
            held: BytesMut::new(),
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
        self.logged_in
            && self.expect.is_empty()
            && self.tx == TxStatus::Idle
            && self.held.is_empty()
    }

    /// Held-back client bytes that may go now (every earlier request is answered).
    /// The caller feeds them to [`Relay::on_client`] before any newer input.
    pub fn take_released(&mut self) -> Option<BytesMut> {
        (!self.held.is_empty() && self.expect.pending_ready() == 0).then(|| self.held.split())
    }

    /// Whether a whole client request must wait for earlier answers (see `held`).
    fn must_wait(&self, tag: u8, body: &[u8]) -> bool {
        if self.stamper.is_none() || self.expect.pending_ready() == 0 {
            return false;
        }
        let commits = |k: Kind| matches!(k, Kind::Commit { .. } | Kind::PrepareTransaction);
        match tag {
            b'E' => {
                let Some((portal, _)) = read_cstr(body) else {
                    return false;
                };
                let kind = self.portals.get(portal).map_or(Kind::MayWrite, |p| p.0);
                commits(kind) && self.track.wrote
            }
            b'Q' => {
                let sql = String::from_utf8_lossy(body);
                let mut probe = self.track.clone();
                pgmesh_sql::classify_all(&sql)
                    .into_iter()
                    .any(|k| commits(k) && probe.statement(k))
            }
            _ => false,
        }
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
        if !self.held.is_empty() {
            self.held.extend_from_slice(input);
            input.clear();
            return Ok(ClientAction::Continue);
        }
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
            if matches!(tag, b'c' | b'f') {
                // CopyDone / CopyFail end copy-in mode.
                self.copy_in = false;
            }
            if !matches!(
                tag,
                b'Q' | b'P' | b'B' | b'E' | b'S' | b'C' | b'D' | b'F' | b'X'
            ) {
                let n = h.total.min(input.len());
                move_bytes(input, out, n);
                self.client_skip = h.total - n;
                continue;
            }
            if input.len() < h.total {
                return Ok(ClientAction::Continue);
            }
            if tag == b'X' {
                move_bytes(input, out, h.total);
                return Ok(ClientAction::Terminate);
            }
            if self.must_wait(tag, &input[5..h.total]) {
                self.held = input.split();
                return Ok(ClientAction::Continue);
            }
            let msg = input.split_to(h.total);
            self.client_request(tag, msg, out)?;
        }
    }

    /// Handles one whole client request message.
    fn client_request(
        &mut self,
        tag: u8,
        msg: BytesMut,
        out: &mut BytesMut,
    ) -> Result<(), RelayError> {
        let body = &msg[5..];
        let bad = || RelayError::ClientMessage { tag: tag as char };
        match tag {
            b'Q' => {
                let text = body.strip_suffix(&[0]).ok_or_else(bad)?;
                self.expect.push(Awaiting::Query, false);
                self.exec_since_sync = 0;
                match self.rewrite_query(text) {
                    Some(q) => stamp::message(out, b'Q', |b| {
                        b.extend_from_slice(q.as_bytes());
                        b.extend_from_slice(&[0]);
                    }),
                    None => out.extend_from_slice(&msg),
                }
                return Ok(());
            }
            b'P' => {
                let (name, rest) = read_cstr(body).ok_or_else(bad)?;
                let (query, _) = read_cstr(rest).ok_or_else(bad)?;
                let query = String::from_utf8_lossy(query);
                let kind = combined_kind(&query);
                self.statements.insert(
                    name.to_vec(),
                    (kind, pgmesh_sql::is_copy_from_stdin(&query)),
                );
                self.expect.push(Awaiting::Parse, false);
            }
            b'B' => {
                let (portal, rest) = read_cstr(body).ok_or_else(bad)?;
                let (stmt, _) = read_cstr(rest).ok_or_else(bad)?;
                let stmt = self
                    .statements
                    .get(stmt)
                    .copied()
                    .unwrap_or((Kind::MayWrite, false));
                self.portals.insert(portal.to_vec(), stmt);
                self.expect.push(Awaiting::Bind, false);
            }
            b'E' => {
                let (portal, _) = read_cstr(body).ok_or_else(bad)?;
                let (kind, copy_in) = self
                    .portals
                    .get(portal)
                    .copied()
                    .unwrap_or((Kind::MayWrite, false));
                if self.track.statement(kind) {
                    self.inject_extended_stamp(out);
                }
                self.expect.push(Awaiting::Execute, false);
                self.exec_since_sync += 1;
                self.copy_in |= copy_in;
            }
            b'S' if self.copy_in => {
                // Ignored by the server in copy-in mode: no answer, no stamp.
            }
            b'S' => {
                if self.track.end_implicit() {
                    self.inject_extended_stamp(out);
                }
                self.expect.push(Awaiting::Sync, false);
                self.exec_since_sync = 0;
            }
            b'C' => {
                let (&kind, rest) = body.split_first().ok_or_else(bad)?;
                let (name, _) = read_cstr(rest).ok_or_else(bad)?;
                match kind {
                    b'S' => self.statements.remove(name),
                    _ => self.portals.remove(name),
                };
                self.expect.push(Awaiting::Close, false);
            }
            b'D' => self.expect.push(Awaiting::Describe, false),
            _ => {
                // FunctionCall: may write (large objects); stampable only in a block.
                if self.track.in_block {
                    self.track.statement(Kind::MayWrite);
                }
                self.expect.push(Awaiting::FunctionCall, false);
                self.exec_since_sync = 0;
            }
        }
        out.extend_from_slice(&msg);
        Ok(())
    }

    fn payload(&self) -> Option<(Arc<Stamper>, String)> {
        let stamper = self.stamper.clone()?;
        match stamper.payload(&self.info) {
            Ok(p) => Some((stamper, p)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot stamp transaction; it will be captured unstamped");
                None
            }
        }
    }

    fn inject_extended_stamp(&mut self, out: &mut BytesMut) {
        let Some((stamper, payload)) = self.payload() else {
            return;
        };
        stamper.extended(&payload, out);
        tracing::debug!("stamp injected before the transaction ends");
        for w in [
            Awaiting::Parse,
            Awaiting::Bind,
            Awaiting::Execute,
            Awaiting::Close,
        ] {
            self.expect.push(w, true);
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
            let whole = self.expect.injected_next()
                || self.in_stamp_answer
                || (h.tag == b'N' && !self.splices.is_empty())
                || matches!(
                    h.tag,
                    b'1' | b'2'
                        | b'3'
                        | b'C'
                        | b'I'
                        | b's'
                        | b'n'
                        | b'T'
                        | b'Z'
                        | b'E'
                        | b'K'
                        | b'R'
                        | b'S'
                );
            if !whole {
                let n = h.total.min(input.len());
                move_bytes(input, out, n);
                self.server_skip = h.total - n;
                continue;
            }
            if input.len() < h.total {
                return Ok(());
            }
            let msg = input.split_to(h.total);
            self.server_message(h.tag, msg, out)?;
        }
    }

    fn server_message(
        &mut self,
        tag: u8,
        msg: BytesMut,
        out: &mut BytesMut,
    ) -> Result<(), RelayError> {
        let body = &msg[5..];
        let verdict = self.expect.on_server(tag);
        if self.simple_stamp_answer(tag, body) {
            return Ok(());
        }
        match tag {
            b'Z' => {
                if let Some(s) = body.first().and_then(|&b| TxStatus::from_byte(b)) {
                    if s != self.tx {
                        tracing::trace!(tx_status = ?s, "transaction status");
                    }
                    self.tx = s;
                    if self.expect.pending_ready() == 0 && self.exec_since_sync == 0 {
                        // Nothing executed since this Sync: the server's status is
                        // the current one (it knows about failures we cannot see).
                        self.track.sync(s);
                    }
                    if verdict.settled {
                        // A COPY that failed before copy-in mode ends at its Sync.
                        self.copy_in = false;
                    }
                }
                self.logged_in = true;
                if verdict.settled {
                    // A stamp that did not run (an earlier statement failed) has no
                    // answer; nothing is in flight now, so none is still due.
                    self.simple_stamps = 0;
                    self.in_stamp_answer = false;
                    self.splices.clear();
                }
            }
            b'K' => {
                let upstream = BackendKey::decode(body).ok_or(RelayError::ServerKey)?;
                let (mine, guard) = self.cancels.register(upstream);
                self.cancel_guard = Some(guard);
                out.extend_from_slice(&mine.encode());
                return Ok(());
            }
            b'E' | b'N' if !self.splices.is_empty() => {
                self.server_fatal |= tag == b'E' && messages::is_fatal(body);
                let splices = self.splices.clone();
                let map = move |p: usize| {
                    let mut orig = p;
                    for (start, len) in &splices {
                        if p > start + len {
                            orig -= len;
                        }
                    }
                    orig
                };
                if let Some(m) = messages::map_error_position(tag, body, map) {
                    if !verdict.swallow {
                        out.extend_from_slice(&m);
                    }
                    return Ok(());
                }
            }
            b'E' => self.server_fatal |= messages::is_fatal(body),
            b'R' => {
                if let Some(rewritten) = messages::strip_channel_binding(body) {
                    out.extend_from_slice(&rewritten);
                    return Ok(());
                }
            }
            b'S' => {
                if let Some((name, rest)) = read_cstr(body) {
                    if name == b"application_name" {
                        if let Some((value, _)) = read_cstr(rest) {
                            self.info.application_name =
                                String::from_utf8_lossy(value).into_owned();
                        }
                    }
                }
            }
            _ => {}
        }
        if !verdict.swallow {
            out.extend_from_slice(&msg);
        }
        Ok(())
    }
}

/// The kind of a (normally single-statement) extended-protocol query.
fn combined_kind(sql: &str) -> Kind {
    let kinds = pgmesh_sql::classify_all(sql);
    match kinds.as_slice() {
        [one] => *one,
        [] => Kind::Neutral,
        _ if kinds.contains(&Kind::MayWrite) => Kind::MayWrite,
        _ => kinds[0],
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

#[path = "splice.rs"]
mod splice;

#[cfg(test)]
#[path = "relay_tests.rs"]
mod tests;
