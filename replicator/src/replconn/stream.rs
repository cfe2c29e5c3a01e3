//! A replication connection in streaming (CopyBoth) mode.
//!
//! This file owns [`ReplStream`]: reading the walsender's CopyData frames and
//! decoding them into [`ReplicationMessage`]s, sending standby status updates, and
//! leaving copy mode cleanly. It must never choose what to acknowledge (the caller
//! confirms only positions that are durable in the change log, or the slot would
//! release WAL we still need) and never reply to keepalives on its own: the caller
//! owns the status-update schedule.

use tracing::debug;

use crate::pgoutput::{ReplicationMessage, StandbyStatusUpdate};

use super::auth::{log_notice, Session};
use super::backend::BackendMessage;
use super::frontend::FrontendMessage;
use super::transport::Transport;
use super::{ReplConnection, ReplError};

/// The server side of a `START_REPLICATION ... LOGICAL` stream.
#[derive(Debug)]
pub struct ReplStream {
    transport: Transport,
    session: Session,
    /// The server ended copy mode (CopyDone, or CommandComplete at shutdown).
    server_done: bool,
    /// We sent CopyDone.
    client_done: bool,
}

impl ReplStream {
    pub(super) fn new(transport: Transport, session: Session) -> Self {
        ReplStream {
            transport,
            session,
            server_done: false,
            client_done: false,
        }
    }

    /// The next XLogData or keepalive, or `None` once the server has ended the
    /// stream (CopyDone; or CommandComplete, which a walsender sends instead when
    /// the server shuts down). Keeps returning `None` after that.
    ///
    /// Cancel-safe: use it in `tokio::select!` next to a status-update timer. A
    /// partially received frame stays buffered and is completed by the next call.
    /// A socket that closes without either end marker is
    /// [`ReplError::Closed`], not `None`: the stream did not end, it broke.
    /// Whether the next message is already received, so `next` will not wait. The
    /// capture loop uses this to batch appends without timers.
    pub fn has_buffered(&self) -> bool {
        self.transport.has_complete_frame()
    }

    pub async fn next(&mut self) -> Result<Option<ReplicationMessage>, ReplError> {
        while !self.server_done {
            match self.transport.recv().await? {
                BackendMessage::CopyData(data) => {
                    return Ok(Some(ReplicationMessage::decode(data)?));
                }
                BackendMessage::CopyDone | BackendMessage::CommandComplete { .. } => {
                    debug!("server ended the replication stream");
                    self.server_done = true;
                }
                BackendMessage::ErrorResponse(e) => return Err(e.into_error()),
                BackendMessage::NoticeResponse(n) => log_notice(&n),
                BackendMessage::ParameterStatus { name, value } => {
                    self.session.parameters.insert(name, value);
                }
                other => {
                    return Err(ReplError::UnexpectedMessage {
                        tag: other.tag(),
                        during: "logical replication streaming",
                    })
                }
            }
        }
        Ok(None)
    }

    /// Sends a standby status update and flushes it.
    ///
    /// Its `flush_lsn` becomes the slot's `confirmed_flush_lsn`: the server may
    /// then recycle WAL before it, so it must only cover changes that are durable
    /// downstream. If this future is dropped mid-write, the rest of the message is
    /// sent first by the next call (the stream never carries half a frame).
    pub async fn send_status(&mut self, status: StandbyStatusUpdate) -> Result<(), ReplError> {
        if self.client_done {
            return Err(ReplError::InvalidArgument(
                "status update after the replication stream was stopped".into(),
            ));
        }
        self.transport
            .send(&FrontendMessage::CopyData(status.to_bytes()))
            .await
    }

    /// Leaves copy mode and returns the connection in command mode.
    ///
    /// Sends CopyDone (if not yet sent), discards the XLogData the server had
    /// already sent (the slot keeps it: nothing past the last confirmed position is
    /// lost), and reads through the end of `START_REPLICATION` to ReadyForQuery.
    /// Send a final status update first if there is progress to confirm.
    ///
    /// The returned connection runs SQL and replication commands, but not a
    /// second logical `START_REPLICATION`: the walsender resets its end-of-copy
    /// state only for physical replication, so PostgreSQL 15 ends such a stream
    /// at once. Reconnect to stream again.
    pub async fn stop(mut self) -> Result<ReplConnection, ReplError> {
        if !self.client_done {
            self.transport.send(&FrontendMessage::CopyDone).await?;
            self.client_done = true;
        }
        let mut discarded = 0usize;
        loop {
            match self.transport.recv().await? {
                BackendMessage::CopyData(_) => discarded += 1,
                BackendMessage::CopyDone | BackendMessage::CommandComplete { .. } => {}
                BackendMessage::ReadyForQuery { .. } => break,
                BackendMessage::ErrorResponse(e) => return Err(e.into_error()),
                BackendMessage::NoticeResponse(n) => log_notice(&n),
                BackendMessage::ParameterStatus { name, value } => {
                    self.session.parameters.insert(name, value);
                }
                other => {
                    return Err(ReplError::UnexpectedMessage {
                        tag: other.tag(),
                        during: "stopping logical replication",
                    })
                }
            }
        }
        debug!(discarded, "left replication streaming mode");
        Ok(ReplConnection::from_parts(self.transport, self.session))
    }

    /// A session parameter the server reported (`server_version`, ...).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.session.parameters.get(name).map(String::as_str)
    }

    /// Bytes of a partial frame waiting for the rest (for tests).
    #[cfg(test)]
    pub(super) fn buffered(&self) -> usize {
        self.transport.buffered()
    }
}
