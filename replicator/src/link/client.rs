//! The pulling side of one peer link.
//!
//! [`LinkClient::connect`] dials a peer (TLS when configured), sends [`Hello`] with the
//! caller's checkpoint and returns the peer's [`Welcome`]. [`LinkClient::next`] yields
//! batches and heartbeats and checks that batches only move forward;
//! [`LinkClient::ack`] returns credit to the server once a batch is applied.
//!
//! It never stores checkpoints and never reconnects by itself: the caller owns the
//! checkpoint (committed with the applied batch) and reconnects from it with
//! [`Backoff`](super::backoff::Backoff), so a reconnect can never skip or repeat
//! anything the caller did not decide to.

use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio_rustls::TlsConnector;
use tokio_util::codec::Framed;

use super::protocol::{self, ClientMsg, Hello, ProtocolError, ServerMsg, Welcome, PROTO_VERSION};
use crate::log::floors::FloorMap;
use crate::log::Logged;

/// Errors of the pulling side. Every one of them means "reconnect from the checkpoint"
/// except a refusal, which usually needs an operator.
#[derive(Debug, Error)]
pub enum LinkError {
    #[error("cannot connect to peer {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connecting to peer {addr} timed out after {after:?}")]
    ConnectTimeout { addr: String, after: Duration },
    #[error("TLS with peer: {0}")]
    Tls(std::io::Error),
    #[error("peer connection: {0}")]
    Io(std::io::Error),
    #[error("peer refused the link: {reason}")]
    Refused { reason: String },
    #[error("peer closed the link")]
    Closed,
    #[error("nothing from peer for {0:?}")]
    Idle(Duration),
    #[error("peer sent a bad message: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("peer broke the protocol: {0}")]
    Violation(String),
    #[error("cannot ack {upto}: only received up to {received}")]
    AckBeyondReceived { upto: i64, received: i64 },
}

impl LinkError {
    /// The peer went away (EOF, reset, silence): expected during restarts.
    pub fn is_disconnect(&self) -> bool {
        use std::io::ErrorKind::*;
        match self {
            LinkError::Closed | LinkError::Idle(_) => true,
            LinkError::Io(e) => matches!(
                e.kind(),
                UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
            ),
            _ => false,
        }
    }

    /// The peer said no (wrong mesh, wrong version, bad checkpoint).
    pub fn is_refusal(&self) -> bool {
        matches!(self, LinkError::Refused { .. })
    }
}

/// Maps a transport error, telling TLS failures (bad certificate, alerts) apart.
fn io_error(e: std::io::Error) -> LinkError {
    let is_tls = e
        .get_ref()
        .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some());
    if is_tls {
        LinkError::Tls(e)
    } else {
        LinkError::Io(e)
    }
}

/// Bound on TCP connect, TLS and the handshake of [`LinkClient::connect`].
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Default for [`LinkClient::set_idle_timeout`]: well above the server's heartbeat
/// (1 s by default), so only a dead or wedged peer trips it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// How to pull from one peer.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Mesh name; the server refuses another.
    pub mesh: String,
    /// This node's region (the server never sends its events back).
    pub region: String,
    /// This node's name.
    pub node: String,
    /// Checkpoint: the highest log seq of this peer already applied. Default: 0.
    pub after: i64,
    /// Most events per batch. Default: 500.
    pub max_batch: u32,
    /// Most unacknowledged batches in flight. Default: 4.
    pub window: u32,
    /// TLS client config and the name the peer's certificate must carry. Default: none
    /// (plaintext).
    pub tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

impl ClientConfig {
    /// A config with every optional field at its default.
    pub fn new(
        mesh: impl Into<String>,
        region: impl Into<String>,
        node: impl Into<String>,
    ) -> Self {
        Self {
            mesh: mesh.into(),
            region: region.into(),
            node: node.into(),
            after: 0,
            max_batch: 500,
            window: 4,
            tls: None,
        }
    }
}

/// What the peer sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// Events to apply, then ack `upto` (which may be above the last event's seq when
    /// the server filtered events out; the checkpoint should still move to `upto`).
    Batch {
        events: Vec<Logged>,
        upto: i64,
        head: i64,
    },
    /// Nothing new; `head` is the peer's log head (for lag). `floors`, when given,
    /// may be adopted once every batch before this heartbeat is applied.
    Heartbeat { head: i64, floors: Option<FloorMap> },
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An open link to one peer.
pub struct LinkClient {
    framed: Framed<Box<dyn Io>, protocol::LinkCodec>,
    /// `upto` of the last batch received.
    received: i64,
    idle_timeout: Duration,
    /// When the last frame arrived (or the link opened): the idle deadline counts
    /// from here, not from each call, so a caller that re-polls `next` in a
    /// `select!` with other timers still notices a silent peer.
    last_frame: tokio::time::Instant,
    /// Bytes of an unfinished frame buffered when the idle deadline last passed.
    partial: usize,
}

impl std::fmt::Debug for LinkClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkClient")
            .field("received", &self.received)
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl LinkClient {
    /// Dials `addr`, shakes hands and returns the open link with the peer's welcome.
    pub async fn connect<A: ToSocketAddrs + Display>(
        addr: A,
        cfg: ClientConfig,
    ) -> Result<(LinkClient, Welcome), LinkError> {
        let shown = addr.to_string();
        tokio::time::timeout(CONNECT_TIMEOUT, Self::open(addr, &shown, &cfg))
            .await
            .map_err(|_| LinkError::ConnectTimeout {
                addr: shown.clone(),
                after: CONNECT_TIMEOUT,
            })?
    }

    async fn open<A: ToSocketAddrs>(
        addr: A,
        shown: &str,
        cfg: &ClientConfig,
    ) -> Result<(LinkClient, Welcome), LinkError> {
        let sock = TcpStream::connect(addr)
            .await
            .map_err(|source| LinkError::Connect {
                addr: shown.into(),
                source,
            })?;
        let _ = sock.set_nodelay(true);
        let io: Box<dyn Io> = match &cfg.tls {
            Some((tls, name)) => Box::new(
                TlsConnector::from(tls.clone())
                    .connect(name.clone(), sock)
                    .await
                    .map_err(LinkError::Tls)?,
            ),
            None => Box::new(sock),
        };
        let mut client = LinkClient {
            framed: Framed::new(io, protocol::LinkCodec::client()),
            received: cfg.after,
            idle_timeout: IDLE_TIMEOUT,
            last_frame: tokio::time::Instant::now(),
            partial: 0,
        };
        client
            .send(&ClientMsg::Hello(Hello {
                proto: PROTO_VERSION,
                mesh: cfg.mesh.clone(),
                region: cfg.region.clone(),
                node: cfg.node.clone(),
                after: cfg.after,
                max_batch: cfg.max_batch,
                window: cfg.window,
            }))
            .await?;
        match client.recv().await? {
            ServerMsg::Welcome(w) if w.proto == PROTO_VERSION => Ok((client, w)),
            ServerMsg::Welcome(w) => Err(LinkError::Violation(format!(
                "welcome for protocol version {}, asked for {PROTO_VERSION}",
                w.proto
            ))),
            ServerMsg::Refused { reason } => Err(LinkError::Refused { reason }),
            other => Err(LinkError::Violation(format!(
                "expected a welcome, got {other:?}"
            ))),
        }
    }

    async fn send(&mut self, msg: &ClientMsg) -> Result<(), LinkError> {
        let bytes = protocol::encode_client(msg)?;
        self.framed.send(bytes).await.map_err(io_error)
    }

    /// The next frame, decoded. Cancel-safe: a frame is only taken off the stream
    /// when it is complete.
    ///
    /// Bytes of a frame still arriving count as life: the idle timeout is for a
    /// silent peer, and a batch of one large event may take longer to arrive.
    async fn recv(&mut self) -> Result<ServerMsg, LinkError> {
        let frame = loop {
            let deadline = self.last_frame + self.idle_timeout;
            match tokio::time::timeout_at(deadline, self.framed.next()).await {
                Err(_) if self.framed.read_buffer().len() > self.partial => {
                    self.partial = self.framed.read_buffer().len();
                    self.last_frame = tokio::time::Instant::now();
                }
                Err(_) => return Err(LinkError::Idle(self.idle_timeout)),
                Ok(None) => return Err(LinkError::Closed),
                Ok(Some(r)) => break r.map_err(io_error)?,
            }
        };
        self.partial = 0;
        self.last_frame = tokio::time::Instant::now();
        Ok(protocol::decode_server(&frame)?)
    }

    /// The next batch or heartbeat.
    ///
    /// Cancel-safe, so it can sit in a `select!`: when cancelled, no frame is lost.
    /// After an error the link is unusable; reconnect from the checkpoint.
    pub async fn next(&mut self) -> Result<LinkEvent, LinkError> {
        match self.recv().await? {
            ServerMsg::Batch(b) => {
                self.check_batch(&b.events, b.upto)?;
                self.received = b.upto;
                Ok(LinkEvent::Batch {
                    events: b.events,
                    upto: b.upto,
                    head: b.head,
                })
            }
            ServerMsg::Heartbeat { head, floors, .. } => Ok(LinkEvent::Heartbeat { head, floors }),
            ServerMsg::Refused { reason } => Err(LinkError::Refused { reason }),
            ServerMsg::Welcome(_) => Err(LinkError::Violation("a second welcome".into())),
        }
    }

    /// The next batch or heartbeat if one has already arrived, without waiting.
    /// Lets the puller fold batches that queued up while it applied into one apply.
    pub fn try_next(&mut self) -> Option<Result<LinkEvent, LinkError>> {
        // `next` is cancel-safe: when it is not ready, nothing is taken off the stream.
        futures::FutureExt::now_or_never(self.next())
    }

    /// Batches must move forward: seqs strictly increasing, above the last batch, and
    /// not above the batch's own `upto`.
    fn check_batch(&self, events: &[Logged], upto: i64) -> Result<(), LinkError> {
        if upto <= self.received {
            return Err(LinkError::Violation(format!(
                "batch upto {upto} does not move past {}",
                self.received
            )));
        }
        let mut prev = self.received;
        for l in events {
            if l.seq <= prev || l.seq > upto {
                return Err(LinkError::Violation(format!(
                    "event seq {} out of order (after {prev}, batch upto {upto})",
                    l.seq
                )));
            }
            prev = l.seq;
        }
        Ok(())
    }

    /// Tells the peer everything up to `upto` is applied, returning window credit.
    /// Acks are cumulative; ack each batch's `upto` (or the last of several).
    pub async fn ack(&mut self, upto: i64) -> Result<(), LinkError> {
        if upto > self.received {
            return Err(LinkError::AckBeyondReceived {
                upto,
                received: self.received,
            });
        }
        self.send(&ClientMsg::Ack {
            upto,
            durable: None,
        })
        .await
    }

    /// Tells the server that everything up to `durable` (a checkpoint of this link
    /// that a synchronous commit covered) is applied for good, so it may prune its
    /// log below it; `upto` is the cumulative ack as in [`LinkClient::ack`].
    pub async fn ack_durable(&mut self, upto: i64, durable: i64) -> Result<(), LinkError> {
        if upto > self.received || durable > upto {
            return Err(LinkError::AckBeyondReceived {
                upto: upto.max(durable),
                received: self.received,
            });
        }
        self.send(&ClientMsg::Ack {
            upto,
            durable: Some(durable),
        })
        .await
    }

    /// [`LinkClient::next`] fails with [`LinkError::Idle`] after this long without a
    /// frame (default [`IDLE_TIMEOUT`]); keep it well above the server's heartbeat.
    pub fn set_idle_timeout(&mut self, idle: Duration) {
        self.idle_timeout = idle;
    }

    /// `upto` of the last batch received (the checkpoint given to `connect` before any).
    pub fn received(&self) -> i64 {
        self.received
    }
}
