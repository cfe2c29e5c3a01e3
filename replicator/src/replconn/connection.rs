//! A replication connection in command mode, before streaming starts.
//!
//! This file owns [`ReplConnection`]: connecting and logging in, running
//! replication commands and plain SQL through the simple query protocol, and
//! turning itself into a [`ReplStream`] with `START_REPLICATION`. It must never
//! leave the connection mid-response: every query reads through to ReadyForQuery,
//! even after an ErrorResponse, so the next command starts on a clean protocol
//! state. Its methods are not cancel-safe (a dropped `simple_query` leaves the
//! response unread); only [`ReplStream::next`] is.

use std::collections::HashMap;

use tracing::debug;

use crate::pgoutput::Lsn;

use super::auth::{self, log_notice, BackendKey, Session};
use super::backend::BackendMessage;
use super::command::{self, IdentifySystem};
use super::frontend::FrontendMessage;
use super::transport::Transport;
use super::{ConnParams, ReplError, ReplStream};

/// One logged-in `replication=database` connection to PostgreSQL.
#[derive(Debug)]
pub struct ReplConnection {
    transport: Transport,
    session: Session,
}

impl ReplConnection {
    /// Connects over TCP, negotiates TLS as `params.tls` demands, sends the startup
    /// packet with `replication=database`, authenticates, and waits for the server
    /// to be ready.
    pub async fn connect(params: &ConnParams) -> Result<Self, ReplError> {
        let stream =
            crate::keepalive::connect(&params.host, params.port, params.keepalive.connect_timeout)
                .await?;
        // Status updates are tiny and latency matters for the server's view of lag.
        stream.set_nodelay(true)?;
        // A partition must not leave the slot held by a connection nobody answers on.
        params.keepalive.apply(&stream)?;
        let stream = params.tls.negotiate(stream, &params.host).await?;
        let tls = stream.is_tls();
        let mut transport = Transport::new(stream);
        let session = auth::startup(&mut transport, params).await?;
        debug!(
            host = %params.host,
            port = params.port,
            user = %params.user,
            dbname = %params.dbname,
            tls,
            server_version = session.parameters.get("server_version").map(String::as_str),
            "replication connection ready"
        );
        Ok(ReplConnection { transport, session })
    }

    /// A session parameter the server reported (`server_version`, ...).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.session.parameters.get(name).map(String::as_str)
    }

    /// The backend's process id and cancel key, if the server sent them.
    pub fn backend_key(&self) -> Option<BackendKey> {
        self.session.backend_key
    }

    /// Runs `sql` (one or more statements, or a replication command such as
    /// `IDENTIFY_SYSTEM` or `CREATE_REPLICATION_SLOT`) and returns every data row
    /// of every statement, each value as text (`None` for NULL).
    ///
    /// An ErrorResponse becomes [`ReplError::Server`] once the server is ready
    /// again, so the connection stays usable.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, ReplError> {
        self.transport
            .send(&FrontendMessage::Query(sql.to_owned()))
            .await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.transport.recv().await? {
                BackendMessage::DataRow(values) => {
                    let row = values
                        .into_iter()
                        .map(|v| {
                            v.map(|b| {
                                String::from_utf8(b.to_vec()).map_err(|_| ReplError::Malformed {
                                    tag: b'D',
                                    reason: "column value is not UTF-8",
                                })
                            })
                            .transpose()
                        })
                        .collect::<Result<Vec<_>, _>>();
                    match row {
                        Ok(row) => rows.push(row),
                        Err(e) => {
                            error.get_or_insert(e);
                        }
                    }
                }
                BackendMessage::RowDescription(_)
                | BackendMessage::CommandComplete { .. }
                | BackendMessage::EmptyQueryResponse => {}
                BackendMessage::ErrorResponse(e) => {
                    error.get_or_insert(e.into_error());
                }
                BackendMessage::NoticeResponse(n) => log_notice(&n),
                BackendMessage::ParameterStatus { name, value } => {
                    self.session.parameters.insert(name, value);
                }
                BackendMessage::ReadyForQuery { .. } => {
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    }
                }
                // COPY, START_REPLICATION or BASE_BACKUP through simple_query would
                // need a copy sub-protocol we do not drive here; the connection is
                // unusable after this.
                other => {
                    return Err(ReplError::UnexpectedMessage {
                        tag: other.tag(),
                        during: "a simple query",
                    })
                }
            }
        }
    }

    /// Runs `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<IdentifySystem, ReplError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        IdentifySystem::from_rows(&rows)
    }

    /// Sends `START_REPLICATION SLOT "slot" LOGICAL start_lsn (options...)` and
    /// enters streaming (CopyBoth) mode.
    ///
    /// `start_lsn` [`Lsn::INVALID`] (`0/0`) starts at the slot's
    /// `confirmed_flush_lsn`. For pgoutput, pass at least `proto_version` and
    /// `publication_names`, and `messages 'true'` to receive
    /// `pg_logical_emit_message` stamps. Names are quoted as identifiers and values
    /// as literals. On error the connection is dropped.
    pub async fn start_logical(
        mut self,
        slot: &str,
        start_lsn: Lsn,
        options: &[(&str, &str)],
    ) -> Result<ReplStream, ReplError> {
        let cmd = command::start_logical(slot, start_lsn, options)?;
        self.transport.send(&FrontendMessage::Query(cmd)).await?;
        loop {
            match self.transport.recv().await? {
                BackendMessage::CopyBothResponse(_) => {
                    debug!(slot, %start_lsn, "logical replication started");
                    return Ok(ReplStream::new(self.transport, self.session));
                }
                BackendMessage::ErrorResponse(e) => return Err(e.into_error()),
                BackendMessage::NoticeResponse(n) => log_notice(&n),
                BackendMessage::ParameterStatus { name, value } => {
                    self.session.parameters.insert(name, value);
                }
                other => {
                    return Err(ReplError::UnexpectedMessage {
                        tag: other.tag(),
                        during: "starting logical replication",
                    })
                }
            }
        }
    }

    /// Says goodbye (Terminate) and closes the socket.
    pub async fn close(mut self) -> Result<(), ReplError> {
        self.transport.send(&FrontendMessage::Terminate).await
    }

    /// Reassembles a connection from a stream that left copy mode.
    pub(super) fn from_parts(transport: Transport, session: Session) -> Self {
        ReplConnection { transport, session }
    }

    /// Every ParameterStatus value the server has reported.
    pub fn parameters(&self) -> &HashMap<String, String> {
        &self.session.parameters
    }
}
