//! The serving side of peer links: the listener, its configuration, and the narrow
//! read interface to the change log that sessions use.
//!
//! The accept loop caps concurrent peers with a semaphore, runs one tracked task per
//! peer (TLS handshake included, so a slow handshake never blocks accepting), and on
//! shutdown stops accepting, closes every session and waits for them to finish.
//!
//! It never writes to the change log and never decides what a peer may see; the
//! per-peer rules live in [`super::session`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, info_span, warn, Instrument};

use super::backoff::Backoff;
use super::protocol::ProtocolError;
use super::session::Session;
use crate::capture::leader;
use crate::log::floors::{self, Floors};
use crate::log::table::HEAD;
use crate::log::tail::Tail;
use crate::log::{LogError, Scan, ShipFilter, TableLog};

/// Errors of the serving side. Variants say whether the peer or the local log failed.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error("cannot listen for peers on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("peer did not finish the handshake in time")]
    HandshakeTimeout,
    #[error("peer TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("peer connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer stopped answering for {0:?}")]
    Stalled(Duration),
    #[error("peer sent a bad message: {0}")]
    PeerMessage(ProtocolError),
    #[error("peer broke the protocol: {0}")]
    PeerViolation(String),
    #[error("refused peer: {0}")]
    Refused(String),
    #[error("change log: {0}")]
    Log(#[from] LogError),
    #[error("cannot encode a batch: {0}")]
    Encode(ProtocolError),
    #[error(
        "event at log seq {seq} encodes to {bytes} bytes, above the limit of a batch of one event"
    )]
    EventTooLarge { seq: i64, bytes: usize },
}

impl ServeError {
    /// The peer went away (EOF, reset): expected, not worth a warning.
    pub fn is_disconnect(&self) -> bool {
        use std::io::ErrorKind::*;
        match self {
            ServeError::Io(e) => matches!(
                e.kind(),
                UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
            ),
            _ => false,
        }
    }
}

/// [`LogReader::open_for`] in one statement (`$1` peer, `$2` after): the prune mark,
/// locked as the pruner locks it, and the peer registered.
const OPEN_FOR: &str = "WITH mark AS (SELECT pruned_upto FROM mesh.log_prune FOR UPDATE),
     reg AS (INSERT INTO mesh.peer_acks (peer, durable_seq)
             SELECT $1, 0 FROM mark WHERE $2 >= mark.pruned_upto
             ON CONFLICT (peer) DO UPDATE
                SET durable_seq = CASE WHEN mesh.peer_acks.durable_seq <= $2
                                       THEN mesh.peer_acks.durable_seq ELSE 0 END,
                    updated_at = now()
             RETURNING 1)
SELECT coalesce((SELECT pruned_upto FROM mark), 0)::int8";

/// A puller's durable position (`$1` region, `$2` seq); it only moves up.
const RECORD_DURABLE: &str = "INSERT INTO mesh.peer_acks (peer, durable_seq) VALUES ($1, $2)
     ON CONFLICT (peer) DO UPDATE SET durable_seq = greatest(mesh.peer_acks.durable_seq, $2),
                                      updated_at = now()";

/// Reads the change log for peer sessions. Shared by every session of a server.
pub trait LogReader: Send + Sync {
    /// Reads up to `limit` log rows above `after`, in log order, and returns the
    /// events among them that `filter` lets through, with how far the read went.
    fn read_for(
        &self,
        after: i64,
        limit: i64,
        filter: &ShipFilter,
    ) -> BoxFuture<'_, Result<Scan, LogError>>;
    /// The highest sequence number in the log (0 when it is empty).
    fn head(&self) -> BoxFuture<'_, Result<i64, LogError>>;
    /// The region floors a peer with `filter` may adopt once it has everything up
    /// to the head returned with them (see [`floors::advertised`]); `None` from a
    /// log that keeps none (the default).
    fn floors<'a>(
        &'a self,
        _filter: &'a ShipFilter,
    ) -> BoxFuture<'a, Result<Option<Floors>, LogError>> {
        Box::pin(std::future::ready(Ok(None)))
    }
    /// Why this server (node `node` of `region`, relaying or not) must not serve
    /// peers now: a node of its region disagrees on `--relay`
    /// ([`leader::relay_conflict`]). `None` from a log that does not know the
    /// region's nodes (the default).
    fn relay_conflict<'a>(
        &'a self,
        _region: &'a str,
        _node: &'a str,
        _relay: bool,
    ) -> BoxFuture<'a, Result<Option<String>, LogError>> {
        Box::pin(std::future::ready(Ok(None)))
    }
    /// A peer asks for events after `after`: returns how far the log was pruned
    /// (0: not at all), and unless `after` is below that, registers the peer for
    /// pruning atomically with the check: a peer seen for the first time, or one
    /// whose checkpoint went back below what it reported, holds pruning at 0 until
    /// it reports a durable position again (`after` itself may not be durable yet).
    fn open_for<'a>(&'a self, _peer: &'a str, _after: i64) -> BoxFuture<'a, Result<i64, LogError>> {
        Box::pin(std::future::ready(Ok(0)))
    }
    /// Records that region `peer` has applied everything up to `seq` durably.
    fn record_durable<'a>(
        &'a self,
        _peer: &'a str,
        _seq: i64,
    ) -> BoxFuture<'a, Result<(), LogError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// [`TableLog`] connections shared by all sessions: a few, so that peers woken by
/// the same append read at the same time instead of queueing on one connection.
/// Each connection is reopened when it has closed (the database restarted).
#[derive(Debug)]
pub struct SharedTableLog {
    url: Option<String>,
    slots: Vec<tokio::sync::Mutex<Option<TableLog>>>,
    next: std::sync::atomic::AtomicUsize,
}

/// Connections a [`SharedTableLog::reconnecting`] log opens at most.
const READ_CONNECTIONS: usize = 4;

impl SharedTableLog {
    /// Wraps an open log; it is not reopened if its connection closes.
    pub fn new(log: TableLog) -> Self {
        Self {
            url: None,
            slots: vec![tokio::sync::Mutex::new(Some(log))],
            next: Default::default(),
        }
    }

    /// A log on `url`, with up to [`READ_CONNECTIONS`] connections, each opened on
    /// first use and reopened after a failure.
    pub fn reconnecting(url: &str) -> Self {
        Self {
            url: Some(url.to_string()),
            slots: (0..READ_CONNECTIONS)
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: Default::default(),
        }
    }

    async fn with_log<T>(
        &self,
        f: impl for<'a> FnOnce(&'a mut TableLog) -> BoxFuture<'a, Result<T, LogError>>,
    ) -> Result<T, LogError> {
        // A free connection if there is one, else wait for the next in turn.
        let mut guard = match self.slots.iter().find_map(|s| s.try_lock().ok()) {
            Some(g) => g,
            None => {
                let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.slots[i % self.slots.len()].lock().await
            }
        };
        if let Some(url) = &self.url {
            if guard.as_ref().is_none_or(|l| l.client().is_closed()) {
                let client = crate::catalog::connect_as(url, "pgmesh-serve")
                    .await
                    .map_err(|e| LogError::Unavailable(e.to_string()))?;
                *guard = Some(TableLog::new(client).await?);
            }
        }
        let log = guard
            .as_mut()
            .ok_or_else(|| LogError::Unavailable("no connection".into()))?;
        let r = f(log).await;
        if r.is_err() && log.client().is_closed() {
            *guard = None;
        }
        r
    }
}

impl LogReader for SharedTableLog {
    fn read_for(
        &self,
        after: i64,
        limit: i64,
        filter: &ShipFilter,
    ) -> BoxFuture<'_, Result<Scan, LogError>> {
        let filter = filter.clone();
        Box::pin(self.with_log(move |log| {
            Box::pin(async move { log.read_for(after, limit, &filter).await })
        }))
    }

    fn head(&self) -> BoxFuture<'_, Result<i64, LogError>> {
        Box::pin(self.with_log(|log| {
            Box::pin(async move {
                let row = log.client().query_one(HEAD, &[]).await?;
                Ok(row.get(0))
            })
        }))
    }

    fn floors<'a>(
        &'a self,
        filter: &'a ShipFilter,
    ) -> BoxFuture<'a, Result<Option<Floors>, LogError>> {
        let filter = filter.clone();
        Box::pin(self.with_log(move |log| {
            Box::pin(async move { floors::advertised(log.client(), &filter).await.map(Some) })
        }))
    }

    fn relay_conflict<'a>(
        &'a self,
        region: &'a str,
        node: &'a str,
        relay: bool,
    ) -> BoxFuture<'a, Result<Option<String>, LogError>> {
        let (region, node) = (region.to_string(), node.to_string());
        Box::pin(self.with_log(move |log| {
            Box::pin(async move {
                Ok(leader::relay_conflict(log.client(), &region, &node, relay).await?)
            })
        }))
    }

    fn open_for<'a>(&'a self, peer: &'a str, after: i64) -> BoxFuture<'a, Result<i64, LogError>> {
        let peer = peer.to_string();
        Box::pin(self.with_log(move |log| {
            Box::pin(async move {
                let row = log.client().query_one(OPEN_FOR, &[&peer, &after]).await?;
                Ok(row.get(0))
            })
        }))
    }

    fn record_durable<'a>(
        &'a self,
        peer: &'a str,
        seq: i64,
    ) -> BoxFuture<'a, Result<(), LogError>> {
        let peer = peer.to_string();
        Box::pin(self.with_log(move |log| {
            Box::pin(async move {
                log.client().execute(RECORD_DURABLE, &[&peer, &seq]).await?;
                Ok(())
            })
        }))
    }
}

/// A [`LogReader`] that serves reads from the node's in-memory [`Tail`] when it holds
/// them (see there for why that is exact) and from `inner` otherwise.
#[derive(Debug)]
pub struct TailedLog<R> {
    tail: Arc<Tail>,
    inner: R,
}

impl<R> TailedLog<R> {
    pub fn new(tail: Arc<Tail>, inner: R) -> Self {
        Self { tail, inner }
    }
}

impl<R: LogReader> LogReader for TailedLog<R> {
    fn read_for(
        &self,
        after: i64,
        limit: i64,
        filter: &ShipFilter,
    ) -> BoxFuture<'_, Result<Scan, LogError>> {
        let scan = self.tail.read(after, limit, filter);
        self.tail.count_read(scan.is_some());
        match scan {
            Some(scan) => Box::pin(std::future::ready(Ok(scan))),
            None => {
                debug!(after, "read from the table");
                self.inner.read_for(after, limit, filter)
            }
        }
    }

    fn head(&self) -> BoxFuture<'_, Result<i64, LogError>> {
        self.inner.head()
    }

    fn floors<'a>(
        &'a self,
        filter: &'a ShipFilter,
    ) -> BoxFuture<'a, Result<Option<Floors>, LogError>> {
        self.inner.floors(filter)
    }

    fn relay_conflict<'a>(
        &'a self,
        region: &'a str,
        node: &'a str,
        relay: bool,
    ) -> BoxFuture<'a, Result<Option<String>, LogError>> {
        self.inner.relay_conflict(region, node, relay)
    }

    fn open_for<'a>(&'a self, peer: &'a str, after: i64) -> BoxFuture<'a, Result<i64, LogError>> {
        self.inner.open_for(peer, after)
    }

    fn record_durable<'a>(
        &'a self,
        peer: &'a str,
        seq: i64,
    ) -> BoxFuture<'a, Result<(), LogError>> {
        self.inner.record_durable(peer, seq)
    }
}

fn default_heartbeat_ms() -> u64 {
    1_000
}
fn default_handshake_timeout_ms() -> u64 {
    10_000
}
fn default_max_batch_cap() -> u32 {
    10_000
}
fn default_max_window_cap() -> u32 {
    64
}
fn default_max_peers() -> usize {
    64
}

fn default_peer_timeout_ms() -> u64 {
    60_000
}

/// How a node serves its change log to peers. Not reloadable: restart the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Address to accept peers on (`--peer-listen`). Required; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Mesh name. A peer naming another mesh is refused. Required.
    pub mesh: String,
    /// This node's region. Required.
    pub region: String,
    /// This node's name. Required.
    pub node: String,
    /// Hub mode: also serve events of other origins (never the puller's own).
    /// Default: false (serve only this region's events).
    #[serde(default)]
    pub relay: bool,
    /// Heartbeat after this long without sending, milliseconds. Default: 1000.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// A peer must finish TLS and hello within this, milliseconds. Default: 10000.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Upper bound on a peer's `max_batch`, events. Default: 10000.
    #[serde(default = "default_max_batch_cap")]
    pub max_batch_cap: u32,
    /// Upper bound on a peer's `window`, batches. Default: 64.
    #[serde(default = "default_max_window_cap")]
    pub max_window_cap: u32,
    /// Most peer connections at once; more wait to be accepted. Default: 64.
    #[serde(default = "default_max_peers")]
    pub max_peers: usize,
    /// A peer that neither reads (a write blocks) nor answers unacknowledged batches
    /// for this long, as behind a partition without resets, loses its session and
    /// its slot, milliseconds. Default: 60000.
    #[serde(default = "default_peer_timeout_ms")]
    pub peer_timeout_ms: u64,
    /// The regions this node peers with, told to pullers (with this region) in the
    /// welcome. Default: none.
    #[serde(default)]
    pub peers: Vec<String>,
}

impl ServeConfig {
    /// A config with every optional field at its default.
    pub fn new(
        listen: SocketAddr,
        mesh: impl Into<String>,
        region: impl Into<String>,
        node: impl Into<String>,
    ) -> Self {
        Self {
            listen,
            mesh: mesh.into(),
            region: region.into(),
            node: node.into(),
            relay: false,
            heartbeat_ms: default_heartbeat_ms(),
            handshake_timeout_ms: default_handshake_timeout_ms(),
            max_batch_cap: default_max_batch_cap(),
            max_window_cap: default_max_window_cap(),
            max_peers: default_max_peers(),
            peer_timeout_ms: default_peer_timeout_ms(),
            peers: Vec::new(),
        }
    }

    /// This region and its peers, sorted: what a welcome tells a puller.
    pub fn regions(&self) -> Vec<String> {
        let mut r: Vec<String> = std::iter::once(self.region.clone())
            .chain(self.peers.iter().cloned())
            .collect();
        r.sort();
        r.dedup();
        r
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms.max(1))
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms.max(1))
    }

    pub fn peer_timeout(&self) -> Duration {
        Duration::from_millis(self.peer_timeout_ms.max(1))
    }
}

/// State every session of one server shares.
pub struct LinkServer {
    pub(super) cfg: ServeConfig,
    pub(super) log: Arc<dyn LogReader>,
    pub(super) wake: watch::Receiver<u64>,
    tls: Option<TlsAcceptor>,
}

impl std::fmt::Debug for LinkServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkServer")
            .field("cfg", &self.cfg)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl LinkServer {
    /// Binds `cfg.listen` and serves `log` to peers until `shutdown` is cancelled.
    ///
    /// `wake` changes whenever the log may have grown (see
    /// [`crate::log::notify::LogNotifier`]). With `tls`, every peer must complete a TLS
    /// handshake first (and present a client certificate if the config requires one).
    /// Returns the bound address and the task, which ends after every session closed.
    pub async fn start(
        cfg: ServeConfig,
        log: Arc<dyn LogReader>,
        wake: watch::Receiver<u64>,
        tls: Option<Arc<rustls::ServerConfig>>,
        shutdown: CancellationToken,
    ) -> Result<(SocketAddr, JoinHandle<()>), ServeError> {
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| ServeError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ServeError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let server = Arc::new(LinkServer {
            cfg,
            log,
            wake,
            tls: tls.map(TlsAcceptor::from),
        });
        info!(listen = %addr, region = %server.cfg.region, tls = server.tls.is_some(), "serving change log to peers");
        let task = tokio::spawn(accept_loop(server, listener, shutdown));
        Ok((addr, task))
    }
}

async fn accept_loop(server: Arc<LinkServer>, listener: TcpListener, shutdown: CancellationToken) {
    let limit = Arc::new(Semaphore::new(server.cfg.max_peers.max(1)));
    let tracker = TaskTracker::new();
    let mut errors = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p.expect("the peer semaphore is never closed"),
            _ = shutdown.cancelled() => break,
        };
        let (sock, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => { errors.reset(); a }
                Err(e) => {
                    // Typically EMFILE: wait a little instead of spinning.
                    warn!(error = %e, "accepting a peer failed");
                    tokio::select! {
                        _ = tokio::time::sleep(errors.next_delay()) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let span = info_span!(
            "link_serve",
            peer = %peer,
            region = tracing::field::Empty,
            node = tracing::field::Empty
        );
        let server = server.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(
            async move {
                let r = tokio::select! {
                    r = serve_peer(&server, sock) => r,
                    _ = shutdown.cancelled() => Ok(()),
                };
                report(r);
                drop(permit);
            }
            .instrument(span),
        );
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
    debug!("peer link server stopped");
}

async fn serve_peer(server: &LinkServer, sock: TcpStream) -> Result<(), ServeError> {
    let deadline = tokio::time::Instant::now() + server.cfg.handshake_timeout();
    // Batches are written whole; small acks and heartbeats should not wait for Nagle.
    let _ = sock.set_nodelay(true);
    match &server.tls {
        Some(acceptor) => {
            let tls = tokio::time::timeout_at(deadline, acceptor.accept(sock))
                .await
                .map_err(|_| ServeError::HandshakeTimeout)?
                .map_err(ServeError::Tls)?;
            // The verifier checked the chain; the session checks the names.
            let identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.clone().into_owned());
            Session::new(server, tls, identity).run(deadline).await
        }
        None => Session::new(server, sock, None).run(deadline).await,
    }
}

fn report(r: Result<(), ServeError>) {
    match r {
        Ok(()) => debug!("peer link closed"),
        Err(e) if e.is_disconnect() => debug!(error = %e, "peer disconnected"),
        Err(e @ (ServeError::Refused(_) | ServeError::Tls(_))) => {
            warn!(error = %e, "peer refused")
        }
        Err(
            e @ (ServeError::Log(_) | ServeError::EventTooLarge { .. } | ServeError::Encode(_)),
        ) => {
            error!(error = %e, "peer link failed on this side")
        }
        Err(e) => warn!(error = %e, "peer link dropped"),
    }
}
