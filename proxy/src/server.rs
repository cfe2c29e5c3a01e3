//! The listener: accepts clients, caps connections, and drains on shutdown.
//!
//! Owns the shared state every session reads (config, upstream target, TLS acceptor,
//! cancel registry, shutdown signal) and the set of session tasks. Shutdown has two
//! steps: `Draining` closes the listener and lets sessions finish their transaction,
//! `Terminating` (after the grace period) closes the rest. It never touches protocol
//! bytes itself, except the one refusal sent when the connection cap is reached.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::cancel::CancelRegistry;
use crate::config::{Config, Validated};
use crate::net::messages::{error_response, Severity};
use crate::session;
use crate::session::stamp::Stamper;
use crate::tls;
use crate::upstream::UpstreamTarget;

/// Errors starting the proxy.
#[derive(Debug, Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("client TLS: {0}")]
    Tls(#[from] tls::TlsError),
}

/// Lifecycle of the whole proxy, seen by every session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownState {
    Running,
    /// Listener closed; sessions close once idle between transactions.
    Draining,
    /// Grace period over; every session closes now.
    Terminating,
}

/// State shared by all sessions.
pub struct Shared {
    validated: Validated,
    tls: Option<TlsAcceptor>,
    cancels: Arc<CancelRegistry>,
    stamper: Option<Arc<Stamper>>,
    shutdown: watch::Receiver<ShutdownState>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("listen", &self.validated.listen)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub fn config(&self) -> &Config {
        &self.validated.config
    }
    pub fn upstream(&self) -> &UpstreamTarget {
        &self.validated.upstream
    }
    pub fn cancels(&self) -> &Arc<CancelRegistry> {
        &self.cancels
    }
    /// The node's stamper, unless stamping is off.
    pub fn stamper(&self) -> Option<&Arc<Stamper>> {
        self.stamper.as_ref()
    }
    pub fn tls_acceptor(&self) -> Option<&TlsAcceptor> {
        self.tls.as_ref()
    }
    pub fn login_timeout(&self) -> Duration {
        Duration::from_secs(self.validated.config.login_timeout_secs)
    }
    pub fn shutdown_rx(&self) -> watch::Receiver<ShutdownState> {
        self.shutdown.clone()
    }
}

/// A running proxy.
#[derive(Debug)]
pub struct ProxyHandle {
    local_addr: SocketAddr,
    shutdown: watch::Sender<ShutdownState>,
    task: JoinHandle<()>,
    shared: Arc<Shared>,
}

impl ProxyHandle {
    /// Address the listener is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Live cancel keys, i.e. sessions that completed startup.
    pub fn live_sessions(&self) -> usize {
        self.shared.cancels.len()
    }

    /// Stops accepting, lets sessions finish within `grace`, then closes the rest and
    /// waits for every session task to end.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.shutdown.send(ShutdownState::Draining);
        let sender = self.shutdown;
        let mut task = self.task;
        if tokio::time::timeout(grace, &mut task).await.is_err() {
            info!("grace period over, closing remaining sessions");
            let _ = sender.send(ShutdownState::Terminating);
            let _ = task.await;
        }
    }
}

/// Binds the listener and starts accepting.
pub async fn start(validated: Validated) -> Result<ProxyHandle, ServerError> {
    start_counting(validated, Arc::new(AtomicI64::new(0))).await
}

/// Like [`start`], keeping `sessions` equal to the number of open client sessions
/// (for the `pgmesh_proxy_sessions` gauge).
pub async fn start_counting(
    validated: Validated,
    sessions: Arc<AtomicI64>,
) -> Result<ProxyHandle, ServerError> {
    let tls = match (&validated.config.tls.cert, &validated.config.tls.key) {
        (Some(c), Some(k)) => Some(TlsAcceptor::from(tls::server_config(c, k)?)),
        _ => None,
    };
    let listener = TcpListener::bind(validated.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: validated.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: validated.listen,
        source,
    })?;
    let (tx, rx) = watch::channel(ShutdownState::Running);
    let c = &validated.config;
    let stamper = c
        .stamping
        .then(|| Arc::new(Stamper::new(&c.region, &c.node_name())));
    let shared = Arc::new(Shared {
        validated,
        tls,
        cancels: Arc::new(CancelRegistry::default()),
        stamper,
        shutdown: rx,
    });
    info!(listen = %local_addr, upstream = %shared.upstream().addr(), "proxy listening");
    let task = tokio::spawn(accept_loop(listener, shared.clone(), sessions));
    Ok(ProxyHandle {
        local_addr,
        shutdown: tx,
        task,
        shared,
    })
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, sessions: Arc<AtomicI64>) {
    let limit = Arc::new(Semaphore::new(shared.config().max_connections));
    let tracker = TaskTracker::new();
    let mut shutdown = shared.shutdown_rx();
    let next_id = AtomicU64::new(1);
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    match limit.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let shared = shared.clone();
                            let sessions = sessions.clone();
                            tracker.spawn(async move {
                                sessions.fetch_add(1, Ordering::Relaxed);
                                session::serve(shared, tcp, peer, id).await;
                                sessions.fetch_sub(1, Ordering::Relaxed);
                                drop(permit);
                            });
                        }
                        Err(_) => {
                            tracker.spawn(refuse_full(tcp, peer));
                        }
                    }
                }
                Err(e) => {
                    // Usually EMFILE: back off briefly instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            r = shutdown.changed() => {
                if r.is_err() || *shutdown.borrow() != ShutdownState::Running {
                    break;
                }
            }
        }
    }
    drop(listener);
    tracker.close();
    info!(
        sessions = tracker.len(),
        "listener closed, draining sessions"
    );
    tracker.wait().await;
    info!("all sessions closed");
}

async fn refuse_full(mut tcp: TcpStream, peer: SocketAddr) {
    debug!(peer = %peer, "connection limit reached");
    let msg = error_response(
        Severity::Fatal,
        "53300",
        "pgmesh: sorry, too many clients already",
    );
    let _ = tcp.write_all(&msg).await;
    let _ = tcp.shutdown().await;
}
