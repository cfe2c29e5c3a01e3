//! A whole node: the proxy, and when the regional database has the `mesh` catalog
//! (at start, or once `pgmesh init` installs it), capture, the peer server, the pull
//! links and metrics.
//!
//! Capture and apply belong to the region's leader only (an advisory lock held by
//! capture), so the pull links start when this node becomes leader and stop when it
//! is not. The peer server only reads the change log, so every node may serve it.
//! This module owns task lifecycles, not replication logic.
//!
//! The replication tasks (capture, the peer server, the notifier and the pull links,
//! with their database connections) run on a runtime of their own, one thread by
//! default (`PGMESH_REPLICATION_THREADS`), next to the proxy's runtime. An event
//! passes through several of these tasks on its way to a peer; on one thread each
//! hand-off is a local wake-up rather than a wake-up of another, maybe busy, thread,
//! and the proxy's client sessions never delay them in a run queue.

mod catalog;
mod links;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pgmesh_replicator::capture::{self, CaptureConfig, Progress, Role};
use pgmesh_replicator::link::backoff::Backoff;
use pgmesh_replicator::link::server::{LinkServer, ServeConfig, SharedTableLog, TailedLog};
use pgmesh_replicator::log::notify::LogNotifier;
use pgmesh_replicator::log::tail::{self, Tail};
use pgmesh_replicator::pgtls::SslMode;
use tokio::runtime::{Handle, Runtime};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Validated;
use crate::metrics::{self, Metrics};
use crate::server::{self, ProxyHandle};

/// A running capture task.
#[derive(Debug)]
pub struct CaptureHandle {
    stop: watch::Sender<bool>,
    role: watch::Receiver<Role>,
    progress: Progress,
    task: JoinHandle<()>,
}

impl CaptureHandle {
    /// This node's current capture role.
    pub fn role(&self) -> Role {
        *self.role.borrow()
    }

    /// A receiver that follows role changes.
    pub fn watch_role(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }

    /// What capture has durably logged (for apply's capture-race protocol).
    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }

    /// Stops capture and waits for it.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// The URL the replication side uses: the upstream URL, with user `postgres` when none
/// is given, and the same TLS settings (`sslmode`, `sslrootcert`) and keepalive
/// parameters.
pub fn capture_url(v: &Validated) -> String {
    let u = &v.upstream;
    let user = u.user.clone().unwrap_or_else(|| "postgres".into());
    let auth = match &u.password {
        Some(p) => format!("{user}:{p}"),
        None => user,
    };
    let db = u.database.clone().unwrap_or_else(|| "postgres".into());
    let mut query: Vec<String> = u
        .keepalive_params
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if u.sslmode() != SslMode::Disable {
        query.push(u.tls.url_query());
    }
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{}", query.join("&"))
    };
    format!("postgres://{auth}@{}/{db}{query}", u.addr())
}

/// Spawns the capture loop on the current runtime.
pub fn spawn(cfg: CaptureConfig) -> CaptureHandle {
    spawn_on(cfg, &Handle::current())
}

/// Spawns the capture loop on `rt`.
pub fn spawn_on(cfg: CaptureConfig, rt: &Handle) -> CaptureHandle {
    let (stop, stop_rx) = watch::channel(false);
    let (role_tx, role) = watch::channel(Role::Starting);
    let (progress_tx, progress) = capture::progress_channel();
    let task = rt.spawn(capture::run(cfg, role_tx, progress_tx, stop_rx));
    CaptureHandle {
        stop,
        role,
        progress,
        task,
    }
}

/// The variable that sets the replication runtime's threads (0: share the caller's).
pub const REPLICATION_THREADS_ENV: &str = "PGMESH_REPLICATION_THREADS";

/// The runtime the replication tasks run on: their own, or the caller's.
#[derive(Debug)]
struct ReplicationRuntime {
    own: Option<Runtime>,
    handle: Handle,
}

impl ReplicationRuntime {
    /// `PGMESH_REPLICATION_THREADS` threads, 1 by default; 0 shares the caller's.
    fn new() -> anyhow::Result<Self> {
        let threads = match std::env::var(REPLICATION_THREADS_ENV) {
            Ok(v) => v.trim().parse::<usize>().map_err(|_| {
                anyhow::anyhow!("{REPLICATION_THREADS_ENV} must be a number of threads, got {v:?}")
            })?,
            Err(_) => 1,
        };
        if threads == 0 {
            return Ok(Self {
                own: None,
                handle: Handle::current(),
            });
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("pgmesh-replication")
            .enable_all()
            .build()?;
        Ok(Self {
            handle: rt.handle().clone(),
            own: Some(rt),
        })
    }
}

impl Drop for ReplicationRuntime {
    fn drop(&mut self) {
        // A runtime's own drop blocks, which is not allowed inside another runtime.
        if let Some(rt) = self.own.take() {
            rt.shutdown_background();
        }
    }
}

/// A running node.
#[derive(Debug)]
pub struct NodeHandle {
    pub proxy: ProxyHandle,
    /// Where `/metrics` is served.
    pub metrics_addr: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    cancel: CancellationToken,
    /// Stops the pull links before anything else.
    links_stop: watch::Sender<bool>,
    /// Capture and what runs with it, when the catalog was there at start.
    started: Option<Replication>,
    /// A node whose database had no catalog at start: what waits for `pgmesh init`,
    /// then starts what `started` would have held.
    late: Option<Late>,
    /// Declared last: shut down after everything running on it has stopped.
    _replication: ReplicationRuntime,
}

impl NodeHandle {
    /// Capture, when it started with the node (not after a late `pgmesh init`).
    pub fn capture(&self) -> Option<&CaptureHandle> {
        self.started.as_ref().map(|r| &r.capture)
    }

    /// Where peers pull from, when serving (and started with the node).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.started.as_ref().and_then(|r| r.peer_addr)
    }

    /// Stops pulling from peers and waits until every link has ended; the node goes
    /// on serving its own log. [`Self::shutdown`] starts with this. Whoever stops
    /// several nodes of one mesh (the demo) calls it on each before shutting any
    /// down, so no link sees its peer go away and warns about it.
    pub async fn stop_links(&mut self) {
        let _ = self.links_stop.send(true);
        if let Some(t) = self.started.as_mut().and_then(|r| r.links.take()) {
            let _ = t.await;
        }
        if let Some(late) = &self.late {
            let links = late
                .started
                .lock()
                .await
                .as_mut()
                .and_then(|r| r.links.take());
            if let Some(t) = links {
                let _ = t.await;
            }
        }
    }

    /// Stops links, peer server, capture, then drains the proxy within `grace`.
    pub async fn shutdown(mut self, grace: Duration) {
        self.stop_links().await;
        let _ = self.stop.send(true);
        self.cancel.cancel();
        if let Some(r) = self.started {
            r.stop().await;
        }
        if let Some(late) = self.late {
            // It stops waiting at once; what it started by now is in `started`.
            let _ = late.task.await;
            let started = late.started.lock().await.take();
            if let Some(r) = started {
                r.stop().await;
            }
        }
        self.proxy.shutdown(grace).await;
    }
}

/// The late start of a node whose database had no catalog: the task that waits for
/// `pgmesh init`, and what it started once it had run.
#[derive(Debug)]
struct Late {
    task: JoinHandle<()>,
    started: Arc<tokio::sync::Mutex<Option<Replication>>>,
}

/// Capture and what runs with it: the peer server, its notifier and the pull links'
/// supervisor.
#[derive(Debug)]
struct Replication {
    capture: CaptureHandle,
    peer_addr: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
    links: Option<JoinHandle<()>>,
}

impl Replication {
    /// Waits for the links (told to stop by `links_stop`, unless already awaited),
    /// then for the tasks (told by the cancellation token), then stops capture.
    async fn stop(self) {
        if let Some(l) = self.links {
            let _ = l.await;
        }
        for t in self.tasks {
            let _ = t.await;
        }
        self.capture.stop().await;
    }
}

/// What [`start_replication`] needs, now or once `pgmesh init` installed the catalog.
#[derive(Clone)]
struct Parts {
    v: Validated,
    url: String,
    /// What capture logs is served to peers from memory while it is fresh.
    tail: Option<Arc<Tail>>,
    rt: Handle,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    links_stop: watch::Receiver<bool>,
}

/// Upgrades the catalog on `c`, then starts capture, the peer server (with
/// `--peer-listen`) and the links' supervisor (with peers).
async fn start_replication(p: Parts, mut c: tokio_postgres::Client) -> anyhow::Result<Replication> {
    let v = &p.v;
    p.check()?;
    catalog::upgrade(&mut c).await?;
    // What can fail comes before capture starts, so a failure leaves nothing running.
    let mut served = None;
    if let (Some(listen), Some(tail)) = (&v.config.peer_listen, &p.tail) {
        let tls = links::peer_server_tls(v)?;
        let log = TailedLog::new(tail.clone(), SharedTableLog::reconnecting(&p.url));
        // A hub relays every origin; any other node ships only its own events.
        let wake = tail.subscribe();
        let mut cfg = ServeConfig::new(
            listen.parse()?,
            &v.config.mesh,
            &v.config.region,
            v.config.node_name(),
        );
        cfg.relay = v.config.relay;
        cfg.peers = v.peers.iter().map(|p| p.name.clone()).collect();
        let server = LinkServer::start(cfg, Arc::new(log), wake, tls, p.cancel.clone());
        let (addr, task) = p.rt.spawn(server).await??;
        info!(peer_listen = %addr, relay = v.config.relay, "serving the change log to peers");
        p.metrics.watch_tail(tail.clone());
        let notifier = {
            let _on = p.rt.enter();
            LogNotifier::start_on(&p.url, &v.config.region, v.config.relay, tail.clone())
        };
        served = Some((addr, [task, notifier]));
    }
    let mut cfg = CaptureConfig::new(&p.url, &v.config.region, &v.config.node_name());
    cfg.tail = p.tail.clone();
    cfg.relay = v.config.relay;
    cfg.linger = Duration::from_millis(v.config.capture_linger_ms);
    let capture = spawn_on(cfg, &p.rt);
    let links = (!v.peers.is_empty()).then(|| {
        p.rt.spawn(links::supervise_links(
            v.clone(),
            p.url.clone(),
            capture.watch_role(),
            capture.progress(),
            p.metrics.clone(),
            p.links_stop.clone(),
        ))
    });
    Ok(Replication {
        peer_addr: served.as_ref().map(|(addr, _)| *addr),
        tasks: served.map_or_else(Vec::new, |(_, t)| t.into()),
        links,
        capture,
    })
}

impl Parts {
    /// What would stop [`start_replication`] whatever the database holds: the region's
    /// name, the peer TLS files and the `--peer-listen` address. A node that waits
    /// for `pgmesh init` checks them at start, so it fails then, not later.
    fn check(&self) -> anyhow::Result<()> {
        let v = &self.v;
        pgmesh_replicator::catalog::validate_region(&v.config.region)?;
        if let Some(listen) = &v.config.peer_listen {
            listen.parse::<SocketAddr>()?;
            links::peer_server_tls(v)?;
        }
        Ok(())
    }
}

/// Waits for `pgmesh init`, then starts replication into `started`; a failure to start
/// (the database lost meanwhile, the peer port taken) is logged and tried again.
async fn start_late(
    p: Parts,
    mut stop: watch::Receiver<bool>,
    started: Arc<tokio::sync::Mutex<Option<Replication>>>,
) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        let region = &p.v.config.region;
        let Some(c) = catalog::wait_for_init(&p.url, region, &mut stop).await else {
            return;
        };
        info!("the mesh catalog is installed now; starting capture");
        match start_replication(p.clone(), c).await {
            Ok(r) => {
                *started.lock().await = Some(r);
                return;
            }
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(error = %e, retry_ms = delay.as_millis() as u64, "cannot start capture; running as a proxy only meanwhile");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

/// Starts every part of a node that its configuration and database allow.
///
/// Without the catalog in its database, the node runs as a proxy and looks for the
/// catalog every [`catalog::INIT_POLL`]: once `pgmesh init` has installed it, capture,
/// the peer server and the links start as if they had from the beginning.
pub async fn start(v: Validated) -> anyhow::Result<NodeHandle> {
    let metrics = Metrics::new(&v.config.region);
    let (stop, stop_rx) = watch::channel(false);
    let (links_stop, links_stop_rx) = watch::channel(false);
    let cancel = CancellationToken::new();
    let url = capture_url(&v);
    let repl = ReplicationRuntime::new()?;
    let parts = Parts {
        v: v.clone(),
        url: url.clone(),
        tail: v
            .config
            .peer_listen
            .is_some()
            .then(|| Arc::new(Tail::new(tail::DEFAULT_CAPACITY))),
        rt: repl.handle.clone(),
        metrics: metrics.clone(),
        cancel: cancel.clone(),
        links_stop: links_stop_rx,
    };
    let found = match v.config.capture {
        true => Some(catalog::find(&url).await),
        false => None,
    };
    let (mut now, mut late) = (None, None);
    match found {
        Some(catalog::Found::Catalog(c)) => now = Some(start_replication(parts, c).await?),
        Some(catalog::Found::NoCatalog) => {
            parts.check()?;
            info!("mesh catalog not installed; running as a proxy only until `pgmesh init` installs it");
            let started = Arc::new(tokio::sync::Mutex::new(None));
            let task = repl
                .handle
                .spawn(start_late(parts, stop_rx.clone(), started.clone()));
            late = Some(Late { task, started });
        }
        Some(catalog::Found::Refused(_)) | None => {}
    }
    let replicating = now.is_some() || late.is_some();
    if !replicating && (v.config.peer_listen.is_some() || !v.peers.is_empty()) {
        warn!("this node does not capture, so it neither serves its change log to peers nor pulls from them: --peer-listen and --peer are ignored");
    }
    let metrics_addr = match &v.config.metrics_listen {
        Some(addr) => Some(
            metrics::serve(
                addr.parse()?,
                metrics.clone(),
                replicating.then(|| url.clone()),
                stop_rx.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let proxy = server::start_counting(v, metrics.session_counter()).await?;
    Ok(NodeHandle {
        proxy,
        metrics_addr,
        metrics,
        stop,
        cancel,
        links_stop,
        started: now,
        late,
        _replication: repl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn the_replication_url_keeps_tls_and_keepalive_parameters() {
        let v = |upstream: &str| {
            Config {
                listen: Some("127.0.0.1:1".into()),
                upstream: Some(upstream.into()),
                ..Config::default()
            }
            .validate()
            .unwrap()
        };
        let url = capture_url(&v(
            "postgres://h:5/app?keepalives_idle=4&tcp_user_timeout=9000",
        ));
        assert_eq!(
            url,
            "postgres://postgres@h:5/app?keepalives_idle=4&tcp_user_timeout=9000"
        );
        let params = pgmesh_replicator::replconn::ConnParams::from_url(&url).unwrap();
        assert_eq!(params.keepalive.idle, Duration::from_secs(4));
        assert_eq!(
            params.keepalive.user_timeout,
            Some(Duration::from_millis(9000))
        );
        let (config, _) = pgmesh_replicator::pgtls::pg_config(&url).unwrap();
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(4));
        assert_eq!(
            config.get_tcp_user_timeout(),
            Some(&Duration::from_millis(9000))
        );
        assert_eq!(
            capture_url(&v("postgres://u@h/db")),
            "postgres://u@h:5432/db"
        );
    }
}
