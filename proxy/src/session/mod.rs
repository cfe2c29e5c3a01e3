//! One client connection, from its first byte to its close.
//!
//! A session runs in one task that owns the client socket and its upstream socket.
//! It answers SSLRequest/GSSENCRequest, serves CancelRequests, forwards the
//! StartupMessage untouched, then relays both directions through [`relay::Relay`]
//! until either side leaves, the login timeout fires, or a shutdown asks it to
//! close. Faults are reported to the client as ErrorResponse with a SQLSTATE before
//! the socket closes; a session never panics on client input.

pub mod pump;
pub mod relay;
pub mod stamp;
pub mod track;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, warn, Instrument};

use crate::net::frame;
use crate::net::messages::{error_response, Severity};
use crate::net::startup::{self, StartupMessage, StartupPacket};
use crate::net::stream::Stream;
use crate::server::{Shared, ShutdownState};
use pump::{Event, Pump};
use relay::{ClientAction, Relay};

/// How long a closing session waits to deliver its last bytes.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a session ended abnormally. The variant says which side was at fault.
#[derive(Debug, Error)]
pub enum SessionError {
    #[error("client I/O: {0}")]
    Client(std::io::Error),
    #[error("client TLS handshake: {0}")]
    ClientTls(std::io::Error),
    #[error("client protocol violation: {0}")]
    ClientProtocol(String),
    #[error("upstream: {0}")]
    Upstream(String),
    #[error("login timeout")]
    LoginTimeout,
}

impl SessionError {
    /// Expected disconnects (resets, broken pipes) are logged at debug, not warn.
    pub fn is_disconnect(&self) -> bool {
        use std::io::ErrorKind::*;
        match self {
            SessionError::Client(e) | SessionError::ClientTls(e) => matches!(
                e.kind(),
                ConnectionReset | BrokenPipe | UnexpectedEof | ConnectionAborted
            ),
            _ => false,
        }
    }
}

/// What the session knows about its client, for logs and (later) write stamps.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub peer: SocketAddr,
    pub user: String,
    pub database: String,
    pub application_name: String,
}

/// Runs one session to completion.
pub async fn serve(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, id: u64) {
    let span = tracing::info_span!("session", id, peer = %peer);
    async move {
        let _ = tcp.set_nodelay(true);
        match run(&shared, tcp, peer).await {
            Ok(()) => debug!("session closed"),
            Err(e) if e.is_disconnect() => debug!(error = %e, "client disconnected"),
            Err(e) => warn!(error = %e, "session ended with error"),
        }
    }
    .instrument(span)
    .await
}

async fn run(shared: &Arc<Shared>, tcp: TcpStream, peer: SocketAddr) -> Result<(), SessionError> {
    let login_deadline = Instant::now() + shared.login_timeout();
    let startup = tokio::time::timeout_at(login_deadline, accept_startup(shared, tcp)).await;
    let Some((client, cin, raw, msg)) = startup.map_err(|_| SessionError::LoginTimeout)?? else {
        return Ok(());
    };
    let info = ClientInfo {
        peer,
        user: msg.param("user").unwrap_or_default().to_string(),
        database: msg
            .param("database")
            .or(msg.param("user"))
            .unwrap_or_default()
            .to_string(),
        application_name: msg
            .param("application_name")
            .unwrap_or_default()
            .to_string(),
    };
    debug!(user = %info.user, database = %info.database, tls = client.is_tls(), "startup");
    let mut client = client;
    let server = match shared.upstream().connect().await {
        Ok(s) => s,
        Err(e) => {
            let text = format!("pgmesh: {e}");
            let _ = client
                .write_all(&error_response(Severity::Fatal, "08001", &text))
                .await;
            let _ = client.shutdown().await;
            return Err(SessionError::Upstream(e.to_string()));
        }
    };
    let mut pump = Pump::new(client, server, cin);
    pump.to_server.extend_from_slice(&raw);
    let relay = Relay::new(
        shared.config().max_message_bytes,
        shared.cancels().clone(),
        info,
        shared.stamper().cloned(),
    );
    relay_loop(shared, pump, relay, login_deadline).await
}

/// Reads startup-phase packets until a StartupMessage arrives. Returns `None` when
/// the connection was a CancelRequest or the client left.
async fn accept_startup(
    shared: &Arc<Shared>,
    tcp: TcpStream,
) -> Result<Option<(Stream, BytesMut, BytesMut, StartupMessage)>, SessionError> {
    let mut client = Stream::Plain(tcp);
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let len = loop {
            match frame::peek_startup_len(&buf) {
                Ok(Some(len)) if buf.len() >= len => break len,
                Ok(_) => {}
                // PostgreSQL answers any bad startup length with 08P01.
                Err(e) => {
                    return refuse(
                        client,
                        "08P01",
                        &format!("invalid length of startup packet ({e})"),
                    )
                    .await
                }
            }
            if client
                .read_buf(&mut buf)
                .await
                .map_err(SessionError::Client)?
                == 0
            {
                return Ok(None);
            }
        };
        let packet = buf.split_to(len);
        match startup::parse(&packet) {
            Ok(StartupPacket::Ssl) => {
                // Bytes after an SSLRequest would be read as if encrypted: refuse them.
                if !buf.is_empty() {
                    return refuse(client, "08P01", "unencrypted data after SSL request").await;
                }
                let Stream::Plain(mut tcp) = client else {
                    return refuse(client, "08P01", "SSLRequest on an encrypted connection").await;
                };
                match shared.tls_acceptor() {
                    Some(acceptor) => {
                        tcp.write_all(b"S").await.map_err(SessionError::Client)?;
                        let tls = acceptor
                            .accept(tcp)
                            .await
                            .map_err(SessionError::ClientTls)?;
                        client = Stream::ServerTls(Box::new(tls));
                    }
                    None => {
                        tcp.write_all(b"N").await.map_err(SessionError::Client)?;
                        client = Stream::Plain(tcp);
                    }
                }
            }
            Ok(StartupPacket::GssEnc) => {
                client.write_all(b"N").await.map_err(SessionError::Client)?
            }
            Ok(StartupPacket::Cancel { pid, secret }) => {
                forward_cancel(shared, pid, &secret).await;
                return Ok(None);
            }
            Ok(StartupPacket::Startup(msg)) => return Ok(Some((client, buf, packet, msg))),
            Err(e @ startup::StartupError::Protocol { .. }) => {
                return refuse(client, "0A000", &e.to_string()).await
            }
            Err(e) => return refuse(client, "08P01", &e.to_string()).await,
        }
    }
}

/// Sends a FATAL error during startup and closes.
async fn refuse<T>(mut client: Stream, code: &str, text: &str) -> Result<Option<T>, SessionError> {
    let _ = client
        .write_all(&error_response(
            Severity::Fatal,
            code,
            &format!("pgmesh: {text}"),
        ))
        .await;
    let _ = client.shutdown().await;
    Err(SessionError::ClientProtocol(text.to_string()))
}

/// Replays a client's CancelRequest to upstream with the real backend key.
async fn forward_cancel(shared: &Arc<Shared>, pid: u32, secret: &[u8]) {
    let Some(key) = shared.cancels().lookup(pid, secret) else {
        debug!(pid, "cancel request with an unknown key ignored");
        return;
    };
    match shared.upstream().connect().await {
        Ok(mut s) => {
            let _ = s
                .write_all(&startup::encode_cancel(key.pid, &key.secret))
                .await;
            let _ = s.flush().await;
            // PostgreSQL answers a cancel by closing; wait for that so it is processed.
            let mut sink = [0u8; 64];
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut sink)).await;
            debug!(pid, "cancel forwarded");
        }
        Err(e) => warn!(error = %e, "cannot forward cancel request"),
    }
}

async fn relay_loop(
    shared: &Arc<Shared>,
    mut pump: Pump,
    mut relay: Relay,
    login_deadline: Instant,
) -> Result<(), SessionError> {
    let mut shutdown = shared.shutdown_rx();
    let mut shutdown_open = true;
    // The client may have sent bytes right after its StartupMessage.
    if !pump.cin.is_empty() {
        if let Err(e) = relay.on_client(&mut pump.cin, &mut pump.to_server) {
            return close(&mut pump, &relay, "08P01", &e.to_string()).await;
        }
    }
    loop {
        let event = tokio::select! {
            biased;
            ev = pump.next() => ev,
            _ = tokio::time::sleep_until(login_deadline), if !relay.logged_in() => {
                close(&mut pump, &relay, "08006", "login timeout").await?;
                return Err(SessionError::LoginTimeout);
            }
            r = shutdown.changed(), if shutdown_open => {
                shutdown_open = r.is_ok();
                if !shutdown_open { continue; }
                let state = *shutdown.borrow();
                if let Some(res) = check_shutdown(&mut pump, &relay, state).await {
                    return res;
                }
                continue;
            }
        };
        match event {
            Event::ClientData => match relay.on_client(&mut pump.cin, &mut pump.to_server) {
                Ok(ClientAction::Continue) => {}
                Ok(ClientAction::Terminate) => {
                    let _ = pump.flush_server().await;
                    pump.shutdown().await;
                    return Ok(());
                }
                Err(e) => {
                    let code = match &e {
                        relay::RelayError::ClientFrame(f) => f.sqlstate(),
                        _ => "08P01",
                    };
                    return close(&mut pump, &relay, code, &e.to_string()).await;
                }
            },
            Event::ServerData => {
                if let Err(e) = relay.on_server(&mut pump.sin, &mut pump.to_client) {
                    close(&mut pump, &relay, "08P01", &e.to_string()).await?;
                    return Err(SessionError::Upstream(e.to_string()));
                }
                // Client requests held back for these answers may go now.
                if let Some(mut held) = relay.take_released() {
                    let r = relay.on_client(&mut held, &mut pump.to_server);
                    held.extend_from_slice(&pump.cin);
                    pump.cin = held;
                    match r {
                        Ok(ClientAction::Continue) => {}
                        Ok(ClientAction::Terminate) => {
                            let _ = pump.flush_server().await;
                            pump.shutdown().await;
                            return Ok(());
                        }
                        Err(e) => return close(&mut pump, &relay, "08P01", &e.to_string()).await,
                    }
                }
            }
            Event::ClientEof | Event::ClientError(_) => {
                if relay.client_mid_frame() || !pump.cin.is_empty() {
                    debug!("client hung up mid-message");
                } else if relay.logged_in() {
                    // Say goodbye so the backend ends cleanly instead of logging an EOF.
                    pump.to_server.extend_from_slice(&[b'X', 0, 0, 0, 4]);
                    let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, pump.flush_server()).await;
                }
                pump.shutdown().await;
                return match event {
                    Event::ClientError(e) => Err(SessionError::Client(e)),
                    _ => Ok(()),
                };
            }
            Event::ServerEof | Event::ServerError(_) => {
                if relay.server_sent_fatal() {
                    let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, pump.flush_client()).await;
                    pump.shutdown().await;
                    return Ok(());
                }
                close(
                    &mut pump,
                    &relay,
                    "08006",
                    "upstream connection closed unexpectedly",
                )
                .await?;
                return Err(SessionError::Upstream(
                    "connection closed unexpectedly".into(),
                ));
            }
        }
        let state = *shutdown.borrow();
        if let Some(res) = check_shutdown(&mut pump, &relay, state).await {
            return res;
        }
    }
}

/// Closes the session if the server is shutting down and it may close now: at once
/// when the grace period is over, otherwise only between transactions.
async fn check_shutdown(
    pump: &mut Pump,
    relay: &Relay,
    state: ShutdownState,
) -> Option<Result<(), SessionError>> {
    let close_now = match state {
        ShutdownState::Running => false,
        // `close` flushes what is queued for the client first.
        ShutdownState::Draining => relay.is_idle(),
        ShutdownState::Terminating => true,
    };
    if !close_now {
        return None;
    }
    debug!(tx_status = ?relay.tx_status(), "closing session for shutdown");
    Some(
        close(
            pump,
            relay,
            "57P01",
            "terminating connection due to administrator command",
        )
        .await,
    )
}

/// Sends the client a FATAL error (when the stream is at a frame boundary), tells the
/// server goodbye, and closes both sockets.
async fn close(pump: &mut Pump, relay: &Relay, code: &str, text: &str) -> Result<(), SessionError> {
    if !relay.server_mid_frame() {
        pump.to_client.extend_from_slice(&error_response(
            Severity::Fatal,
            code,
            &format!("pgmesh: {text}"),
        ));
    }
    let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, pump.flush_client()).await;
    if !relay.client_mid_frame() {
        pump.to_server.extend_from_slice(&[b'X', 0, 0, 0, 4]);
        let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, pump.flush_server()).await;
    }
    pump.shutdown().await;
    Ok(())
}
