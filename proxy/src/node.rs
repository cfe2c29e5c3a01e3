//! A whole node: the proxy, and when the regional database has the `mesh` catalog,
//! capture, the peer server, the pull links and metrics.
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

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgmesh_replicator::capture::{self, CaptureConfig, Progress, Role};
use pgmesh_replicator::link::backoff::Backoff;
use pgmesh_replicator::link::server::{LinkServer, ServeConfig, SharedTableLog, TailedLog};
use pgmesh_replicator::log::notify::LogNotifier;
use pgmesh_replicator::log::prune;
use pgmesh_replicator::log::tail::{self, Tail};
use pgmesh_replicator::pgtls::SslMode;
use pgmesh_replicator::pull::{self, LinkTarget, OnBatch, PullConfig, TargetTls};
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

/// The first wait for an unreachable database, and the longest.
const REACH_BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(5));
/// How often the wait for an unreachable database is logged again.
const REACH_LOG_EVERY: Duration = Duration::from_secs(30);

/// A connection to the regional database when the mesh catalog is installed there;
/// `None` when it is not, or when the database refuses this node (logged).
///
/// A database that cannot be reached at all (down, starting up, out of connection
/// slots) is waited for, with backoff, and the wait is logged every 30 s: a node
/// started before its database (a reboot, a container that comes up first) must
/// still capture once the database is up, not run as a proxy only until restarted.
async fn installed_catalog(url: &str) -> Option<tokio_postgres::Client> {
    let (base, cap) = REACH_BACKOFF;
    let mut backoff = Backoff::new(base, cap);
    let started = Instant::now();
    let mut logged: Option<Instant> = None;
    let (c, installed) = loop {
        let checked = match pgmesh_replicator::catalog::connect(url).await {
            Ok(c) => match c.query_one(CATALOG_INSTALLED, &[]).await {
                Ok(r) => Ok((c, r.get::<_, bool>(0))),
                // Reached, then lost (a server shutting down): wait, as below.
                Err(source) => Err(pgmesh_replicator::catalog::CatalogError::Connect {
                    url: pgmesh_replicator::catalog::redact(url),
                    source,
                }),
            },
            Err(e) => Err(e),
        };
        match checked {
            Ok(found) => break found,
            Err(e) if e.is_unreachable() => {
                if logged.is_none_or(|t| t.elapsed() >= REACH_LOG_EVERY) {
                    warn!(
                        error = %e,
                        waited_secs = started.elapsed().as_secs(),
                        "cannot reach the regional database; waiting for it (the node starts once it answers)"
                    );
                    logged = Some(Instant::now());
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => {
                warn!(error = %e, "the regional database refused this node's session; running as a proxy only");
                return None;
            }
        }
    };
    if logged.is_some() {
        info!(
            waited_secs = started.elapsed().as_secs(),
            "reached the regional database"
        );
    }
    installed.then_some(c)
}

/// Whether the mesh catalog is installed.
const CATALOG_INSTALLED: &str = "SELECT to_regclass('mesh.changelog') IS NOT NULL";

/// Starts capture on `rt` if enabled and the catalog is installed.
/// Logged rows are published to `tail` when given.
pub async fn start_capture(
    v: &Validated,
    tail: Option<Arc<Tail>>,
    rt: &Handle,
) -> anyhow::Result<Option<CaptureHandle>> {
    if !v.config.capture {
        return Ok(None);
    }
    let url = capture_url(v);
    let Some(mut c) = installed_catalog(&url).await else {
        info!("mesh catalog not installed; running as a proxy only (run `pgmesh init` to enable capture)");
        return Ok(None);
    };
    pgmesh_replicator::catalog::validate_region(&v.config.region)?;
    // A newer binary upgrades the catalog it finds: the migrations `pgmesh init`
    // applies, idempotent and under an advisory lock. An older binary stops here.
    let applied = pgmesh_replicator::catalog::migrate(&mut c).await?;
    if !applied.is_empty() {
        info!(versions = ?applied, "upgraded the mesh catalog");
    }
    let mut cfg = CaptureConfig::new(&url, &v.config.region, &v.config.node_name());
    cfg.tail = tail;
    cfg.relay = v.config.relay;
    Ok(Some(spawn_on(cfg, rt)))
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
    pub capture: Option<CaptureHandle>,
    /// Where peers pull from, when serving.
    pub peer_addr: Option<SocketAddr>,
    /// Where `/metrics` is served.
    pub metrics_addr: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// The pull links' supervisor, stopped by `links_stop` before anything else.
    links: Option<JoinHandle<()>>,
    links_stop: watch::Sender<bool>,
    /// Declared last: shut down after everything running on it has stopped.
    _replication: ReplicationRuntime,
}

impl NodeHandle {
    /// Stops pulling from peers and waits until every link has ended; the node goes
    /// on serving its own log. [`Self::shutdown`] starts with this. Whoever stops
    /// several nodes of one mesh (the demo) calls it on each before shutting any
    /// down, so no link sees its peer go away and warns about it.
    pub async fn stop_links(&mut self) {
        let _ = self.links_stop.send(true);
        if let Some(t) = self.links.take() {
            let _ = t.await;
        }
    }

    /// Stops links, peer server, capture, then drains the proxy within `grace`.
    pub async fn shutdown(mut self, grace: Duration) {
        self.stop_links().await;
        let _ = self.stop.send(true);
        self.cancel.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        if let Some(c) = self.capture {
            c.stop().await;
        }
        self.proxy.shutdown(grace).await;
    }
}

/// Starts every part of a node that its configuration and database allow.
pub async fn start(v: Validated) -> anyhow::Result<NodeHandle> {
    let metrics = Metrics::new(&v.config.region);
    let (stop, stop_rx) = watch::channel(false);
    let (links_stop, links_stop_rx) = watch::channel(false);
    let cancel = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut links = None;
    let url = capture_url(&v);
    // What capture logs is served to peers from memory while it is fresh.
    let tail = v
        .config
        .peer_listen
        .is_some()
        .then(|| Arc::new(Tail::new(tail::DEFAULT_CAPACITY)));
    let repl = ReplicationRuntime::new()?;
    let capture = start_capture(&v, tail.clone(), &repl.handle).await?;
    let mut peer_addr = None;
    if capture.is_some() {
        if let (Some(listen), Some(tail)) = (&v.config.peer_listen, tail) {
            let tls = peer_server_tls(&v)?;
            let log = TailedLog::new(tail.clone(), SharedTableLog::reconnecting(&url));
            // A hub relays every origin; any other node ships only its own events.
            let wake = tail.subscribe();
            metrics.watch_tail(tail.clone());
            let notifier = {
                let _on = repl.handle.enter();
                LogNotifier::start_on(&url, &v.config.region, v.config.relay, tail)
            };
            let mut cfg = ServeConfig::new(
                listen.parse()?,
                &v.config.mesh,
                &v.config.region,
                v.config.node_name(),
            );
            cfg.relay = v.config.relay;
            cfg.peers = v.peers.iter().map(|p| p.name.clone()).collect();
            let (addr, task) = repl
                .handle
                .spawn(LinkServer::start(
                    cfg,
                    Arc::new(log),
                    wake,
                    tls,
                    cancel.clone(),
                ))
                .await??;
            info!(peer_listen = %addr, relay = v.config.relay, "serving the change log to peers");
            peer_addr = Some(addr);
            tasks.push(task);
            tasks.push(notifier);
        }
        if let Some(c) = &capture {
            if !v.peers.is_empty() {
                links = Some(repl.handle.spawn(supervise_links(
                    v.clone(),
                    url.clone(),
                    c.watch_role(),
                    c.progress(),
                    metrics.clone(),
                    links_stop_rx,
                )));
            }
        }
    } else if v.config.peer_listen.is_some() || !v.peers.is_empty() {
        warn!("this node does not capture, so it neither serves its change log to peers nor pulls from them: --peer-listen and --peer are ignored");
    }
    let metrics_addr = match &v.config.metrics_listen {
        Some(addr) => Some(
            metrics::serve(
                addr.parse()?,
                metrics.clone(),
                capture.is_some().then(|| url.clone()),
                stop_rx.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let proxy = server::start_counting(v, metrics.session_counter()).await?;
    Ok(NodeHandle {
        proxy,
        capture,
        peer_addr,
        metrics_addr,
        metrics,
        stop,
        cancel,
        tasks,
        links,
        links_stop,
        _replication: repl,
    })
}

fn peer_server_tls(v: &Validated) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    let t = &v.config.peer_tls;
    match (&t.cert, &t.key, &t.ca) {
        (Some(c), Some(k), Some(ca)) => Ok(Some(pgmesh_replicator::link::tls::server_config(
            c,
            k,
            Some(ca),
        )?)),
        _ => Ok(None),
    }
}

fn peer_client_tls(v: &Validated, peer_host: &str) -> anyhow::Result<Option<TargetTls>> {
    let t = &v.config.peer_tls;
    match (&t.cert, &t.key, &t.ca) {
        (Some(c), Some(k), Some(ca)) => Ok(Some((
            pgmesh_replicator::link::tls::client_config(ca, Some((c, k)))?,
            rustls::pki_types::ServerName::try_from(peer_host.to_string())?,
        ))),
        _ => Ok(None),
    }
}

/// Runs the pull links while this node is the region's leader.
async fn supervise_links(
    v: Validated,
    url: String,
    mut role: watch::Receiver<Role>,
    progress: Progress,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let regions: Vec<String> = v.peers.iter().map(|p| p.name.clone()).collect();
    let on_batch: OnBatch = {
        let metrics = metrics.clone();
        Arc::new(
            move |peer: &str, out: &pgmesh_replicator::apply::BatchOutcome| {
                metrics.link(peer, |c| {
                    c.applied_events += out.applied as u64;
                    c.duplicate_events += out.duplicates as u64;
                    c.conflicts += out.conflicts as u64;
                    c.dead_letters += out.dead_letters as u64;
                    c.batches += 1;
                });
            },
        )
    };
    loop {
        while *role.borrow_and_update() != Role::Leader {
            tokio::select! {
                r = role.changed() => if r.is_err() { return },
                _ = stop.changed() => return,
            }
        }
        let (links_stop, links_rx) = watch::channel(false);
        let mut links = Vec::new();
        let signals = pull::LinkSignals::start(&url);
        for p in &v.peers {
            let targets = p
                .addrs
                .iter()
                .map(|addr| {
                    let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
                    // An IPv6 literal goes in brackets before the port, not in the name.
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    let tls = peer_client_tls(&v, host)?;
                    anyhow::Ok(LinkTarget {
                        addr: addr.clone(),
                        tls,
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>();
            let targets = match targets {
                Ok(t) => t,
                Err(e) => {
                    warn!(peer = %p.name, error = %e, "peer TLS setup failed; link not started");
                    continue;
                }
            };
            let cfg = PullConfig {
                url: url.clone(),
                mesh: v.config.mesh.clone(),
                region: v.config.region.clone(),
                node: v.config.node_name(),
                peer: p.name.clone(),
                targets,
                regions: regions.clone(),
                max_batch: 500,
                relay: v.config.relay,
            };
            links.push(tokio::spawn(pull::run(
                cfg,
                Some(progress.clone()),
                on_batch.clone(),
                signals.subscribe(),
                links_rx.clone(),
            )));
        }
        if v.config.prune_interval_secs > 0 {
            links.push(tokio::spawn(prune::run(
                url.clone(),
                v.config.region.clone(),
                regions.clone(),
                Duration::from_secs(v.config.prune_interval_secs),
                Duration::from_secs(v.config.tombstone_retention_secs),
                links_rx.clone(),
            )));
        }
        info!(links = v.peers.len(), "leader: pull links started");
        let stopping = loop {
            tokio::select! {
                r = role.changed() => {
                    if r.is_err() || *role.borrow() != Role::Leader { break false; }
                }
                _ = stop.changed() => break true,
            }
        };
        let _ = links_stop.send(true);
        for l in links {
            let _ = l.await;
        }
        if stopping {
            return;
        }
    }
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
