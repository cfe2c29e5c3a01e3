//! The pulling side of one link: this region applies a peer's change log.
//!
//! It connects to the peer (with backoff and jitter), asks for events after the
//! link's checkpoint, applies each batch in one local transaction through
//! [`Applier`], and acknowledges it, which is the backpressure. A paused link stays
//! disconnected (the peer's log buffers) until resumed; both are signalled by
//! `NOTIFY pgmesh_links` from `mesh.pause_link`/`mesh.resume_link`, heard by one
//! [`LinkSignals`] connection for all of a node's links. While paused it
//! only asks the peer for its log head now and then (a handshake, then it hangs up),
//! so `mesh.links` shows the backlog growing.
//! It never writes user tables itself: that is apply's job.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use thiserror::Error;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::AsyncMessage;
use tracing::{debug, info, warn, Instrument};

use crate::apply::{Applier, ApplyError, BatchOutcome};
use crate::capture::Progress;
use crate::linger::Linger;
use crate::link::backoff::Backoff;
use crate::link::client::{ClientConfig, LinkClient, LinkEvent};
use crate::link::LinkError;
use crate::log::floors::{self, FloorMap};
use crate::log::LogError;

/// How often a paused link asks the peer for its log head.
const PAUSED_HEAD_EVERY: Duration = Duration::from_secs(2);

/// How often a link that receives only empty batches records that it heard from
/// its peer (`contact_at`, which `mesh.links` reads) and its checkpoint.
const CONTACT_EVERY: Duration = Duration::from_secs(5);

/// Errors of one pull session; the loop reconnects after each.
#[derive(Debug, Error)]
pub enum PullError {
    #[error("{0}")]
    Apply(#[from] ApplyError),
    #[error("{0}")]
    Link(#[from] LinkError),
    #[error("database: {}", crate::catalog::pg_error(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Log(#[from] LogError),
    /// Not a failure: the link was paused (`mesh.pause_link`) and disconnected.
    #[error("{PAUSED}")]
    Paused,
}

/// How often a link makes its checkpoint durable and reports it to the peer.
const DURABLE_EVERY: Duration = Duration::from_secs(2);

/// Batches that queued up are folded into one apply transaction until their values
/// come to this much: PostgreSQL takes at most 1 GiB in one message, and apply sends a
/// transaction's values in one.
const FOLD_BYTES: usize = 64 * 1024 * 1024;

/// What `mesh.links.error` says while a link is paused and disconnected.
pub const PAUSED: &str = "paused: disconnected until mesh.resume_link";

/// Everything a pull loop needs.
#[derive(Debug, Clone)]
pub struct PullConfig {
    /// Local regional database.
    pub url: String,
    pub mesh: String,
    /// Local region and node.
    pub region: String,
    pub node: String,
    /// The peer's region.
    pub peer: String,
    /// Nodes of the peer region that serve its log, at least one. Every node of a
    /// region serves the same log (the regional database's), with the same sequence
    /// numbers, so the link pulls from one at a time and moves on to the next when
    /// it cannot reach it or loses it.
    pub targets: Vec<LinkTarget>,
    /// Every region name known to this node (for naming conflict origins).
    pub regions: Vec<String>,
    pub max_batch: u32,
    /// Least time from the end of one apply to the start of the next: batches that
    /// arrive sooner wait for the rest of it and are folded into one apply, so a busy
    /// link applies fewer, larger transactions. A batch that arrives later is applied
    /// at once. Zero folds only what has already arrived.
    pub linger: Duration,
    /// Whether this node relays other origins' events (`--relay`): only then do the
    /// appends of applied events notify the log's readers.
    pub relay: bool,
}

/// TLS to a peer node: the client configuration and the name its certificate must
/// show.
pub type TargetTls = (
    Arc<rustls::ClientConfig>,
    rustls::pki_types::ServerName<'static>,
);

/// One node of a peer region.
#[derive(Debug, Clone)]
pub struct LinkTarget {
    /// `HOST:PORT` of its peer listener.
    pub addr: String,
    pub tls: Option<TargetTls>,
}

/// Called after every applied batch (metrics).
pub type OnBatch = Arc<dyn Fn(&str, &BatchOutcome) + Send + Sync>;

impl PullConfig {
    /// The link client's settings for a session with `target` asking for events
    /// after `after`.
    fn client(&self, target: &LinkTarget, after: i64, max_batch: u32, window: u32) -> ClientConfig {
        ClientConfig {
            mesh: self.mesh.clone(),
            region: self.region.clone(),
            node: self.node.clone(),
            after,
            max_batch,
            window,
            tls: target.tls.clone(),
        }
    }
}

/// Runs the link until shutdown, hearing pauses, resumes and dead-letter retries on
/// `signals` (from the node's [`LinkSignals`]).
pub async fn run(
    cfg: PullConfig,
    progress: Option<Progress>,
    on_batch: OnBatch,
    mut signals: broadcast::Receiver<String>,
    mut shutdown: watch::Receiver<bool>,
) {
    let span = tracing::info_span!("link", source = %cfg.peer, target = %cfg.region);
    async move {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut at = 0;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let Some(target) = cfg.targets.get(at) else {
                warn!("no address to pull from");
                break;
            };
            match session(
                &cfg,
                target,
                progress.clone(),
                &on_batch,
                &mut signals,
                &mut shutdown,
                &mut backoff,
            )
            .await
            {
                Ok(()) => break,
                Err(PullError::Paused) => info!("link paused; disconnected"),
                Err(e) => {
                    // A node that cannot be reached or was lost: try the region's
                    // next one. A local failure (apply, database) keeps the node.
                    let next = matches!(e, PullError::Link(_)) && cfg.targets.len() > 1;
                    warn!(error = %e, addr = %target.addr, next, "link session ended; reconnecting");
                    record_error(&cfg, &e.to_string()).await;
                    if next {
                        at = (at + 1) % cfg.targets.len();
                    }
                }
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => break,
            }
        }
    }
    .instrument(span)
    .await
}

async fn record_error(cfg: &PullConfig, error: &str) {
    if let Ok(c) = crate::catalog::connect(&cfg.url).await {
        let _ = c
            .execute(
                "UPDATE mesh.link_state SET error = $2, updated_at = now(),
                        status = CASE WHEN status = 'active' THEN 'degraded' ELSE status END
                 WHERE peer = $1",
                &[&cfg.peer, &error],
            )
            .await;
    }
}

/// One connected session. Returns Ok on shutdown.
async fn session(
    cfg: &PullConfig,
    target: &LinkTarget,
    progress: Option<Progress>,
    on_batch: &OnBatch,
    signals: &mut broadcast::Receiver<String>,
    shutdown: &mut watch::Receiver<bool>,
    backoff: &mut Backoff,
) -> Result<(), PullError> {
    let mut applier =
        Applier::connect(&cfg.url, &cfg.region, &cfg.peer, &cfg.regions, progress).await?;
    applier.set_notify_appends(cfg.relay);
    // A paused link stays disconnected until resumed, but keeps its backlog known.
    let mut heads = tokio::time::interval(PAUSED_HEAD_EVERY);
    let mut logged_pause = false;
    while link_status(&applier, &cfg.peer).await? == "paused" {
        if !logged_pause {
            info!("link paused");
            logged_pause = true;
            // Says so in mesh.links, however the pause found the link (connected,
            // connecting, or waiting to retry).
            applier
                .client()
                .execute(
                    "UPDATE mesh.link_state SET error = $2, updated_at = now()
                     WHERE peer = $1 AND status = 'paused'",
                    &[&cfg.peer, &PAUSED],
                )
                .await?;
        }
        tokio::select! {
            s = signals.recv() => if s == Err(RecvError::Closed) { return Ok(()) },
            _ = shutdown.changed() => return Ok(()),
            _ = heads.tick() => match peer_head(cfg, target, applier.checkpoint(&cfg.peer).await?).await {
                Ok(head) => set_head(&applier, &cfg.peer, head, None).await?,
                // With another node to ask, move on to it (the caller rotates).
                Err(e) if cfg.targets.len() > 1 => return Err(e.into()),
                Err(e) => debug!(error = %e, "paused link: cannot read the peer's head"),
            },
        }
    }
    applier
        .client()
        .execute(
            "UPDATE mesh.link_state SET address = $2,
                    status = CASE WHEN status = 'degraded' THEN 'active' ELSE status END,
                    error = CASE WHEN error = $3 THEN NULL ELSE error END
             WHERE peer = $1",
            &[&cfg.peer, &target.addr, &PAUSED],
        )
        .await?;
    applier.retry_dead_letters().await?;
    let after = applier.checkpoint(&cfg.peer).await?;
    // Batches that queue up are folded into one apply, so a deeper window costs no
    // latency and lets the peer keep sending while we apply.
    let (mut client, welcome) =
        LinkClient::connect(&target.addr, cfg.client(target, after, cfg.max_batch, 16)).await?;
    if welcome.region != cfg.peer {
        warn!(expected = %cfg.peer, got = %welcome.region, "peer reports a different region");
    }
    info!(after, head = welcome.head, "link connected");
    set_head(&applier, &cfg.peer, welcome.head, None).await?;
    // The peer is alive: a link decommissioned by mesh.forget_peer is active again.
    // Every region the peer knows of counts for this region's tombstone frontier
    // (a spoke hears of the other spokes only here).
    applier
        .client()
        .execute(
            "WITH a AS (UPDATE mesh.link_state SET status = 'active'
                        WHERE peer = $1 AND status = 'decommissioned' RETURNING 1)
             INSERT INTO mesh.mesh_regions (name, learned_from)
             SELECT r, $1 FROM unnest($2::text[]) r
             ON CONFLICT (name) DO UPDATE
                SET forgotten = mesh.mesh_regions.forgotten AND excluded.name <> $1,
                    updated_at = now()",
            &[&cfg.peer, &welcome.regions],
        )
        .await?;
    backoff.reset();
    // Batches with no events (the peer filtered everything out) only move the
    // checkpoint; it is saved with the next real batch or heartbeat, not in a
    // transaction of its own.
    let mut unsaved: Option<i64> = None;
    // Now and then the peer hears how far this region has applied durably, so it can
    // prune its log below that.
    let mut durable = tokio::time::interval(DURABLE_EVERY);
    durable.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut acked, mut reported) = (after, 0);
    let mut last_saved = std::time::Instant::now();
    let mut linger = Linger::new(cfg.linger);
    loop {
        tokio::select! {
            ev = client.next() => match ev? {
                LinkEvent::Batch { mut events, mut upto, mut head } => {
                    // Fold in the batches that arrived while the last one applied: one
                    // transaction for all of them keeps the queue (and the lag) short.
                    let mut beat = None;
                    let mut folded = 1;
                    let mut bytes: usize = events.iter().map(|l| l.event.value_bytes()).sum();
                    // Until the linger since the last apply is over, wait for more.
                    let linger_until = linger.deadline();
                    while events.len() < cfg.max_batch as usize && bytes < FOLD_BYTES {
                        // `next` is cancel-safe; once the deadline has passed, this
                        // only takes what has arrived.
                        let next = tokio::time::timeout_at(linger_until, client.next())
                            .await
                            .ok()
                            .or_else(|| client.try_next());
                        match next {
                            Some(Ok(LinkEvent::Batch { events: more, upto: u, head: h })) => {
                                bytes += more.iter().map(|l| l.event.value_bytes()).sum::<usize>();
                                events.extend(more);
                                upto = u;
                                head = h;
                                folded += 1;
                            }
                            Some(Ok(LinkEvent::Heartbeat { head, floors })) => {
                                beat = Some((head, floors));
                                break;
                            }
                            Some(Err(e)) => return Err(e.into()),
                            None => break,
                        }
                    }
                    acked = upto;
                    if events.is_empty() {
                        client.ack(upto).await?;
                        unsaved = Some(upto);
                        // A hub that relays only this region's own events sends
                        // empty batches and no heartbeats: they are contact too.
                        if last_saved.elapsed() >= CONTACT_EVERY {
                            set_head(&applier, &cfg.peer, head, unsaved.take()).await?;
                            last_saved = std::time::Instant::now();
                        }
                    } else {
                        let started = std::time::Instant::now();
                        let out = applier.apply_batch(&cfg.peer, &events, upto, head).await?;
                        client.ack(upto).await?;
                        unsaved = None;
                        debug!(
                            events = events.len(),
                            batches = folded,
                            applied = out.applied,
                            upto,
                            head,
                            ms = started.elapsed().as_millis() as u64,
                            "batch applied"
                        );
                        on_batch(&cfg.peer, &out);
                        linger.ended();
                    }
                    if let Some((head, floors)) = beat {
                        heartbeat(&applier, cfg, head, unsaved.take(), floors).await?;
                    }
                }
                LinkEvent::Heartbeat { head, floors } => {
                    heartbeat(&applier, cfg, head, unsaved.take(), floors).await?;
                    if applier.retry_deferred() {
                        applier.retry_dead_letters().await?;
                    }
                }
            },
            s = signals.recv() => match s.as_deref() {
                Err(RecvError::Closed) => return Ok(()),
                Ok("dead_letters") => { applier.retry_dead_letters().await?; }
                // A signal missed (`Lagged`) may have been either kind.
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    if s.is_err() {
                        applier.retry_dead_letters().await?;
                    }
                    if link_status(&applier, &cfg.peer).await? == "paused" {
                        // The next session waits for the resume, and records it.
                        return Err(PullError::Paused);
                    }
                }
            },
            // Only when something new was acknowledged: an idle link commits nothing.
            _ = durable.tick(), if acked > reported => {
                let cp = applier.durable_checkpoint(&cfg.peer).await?;
                if cp > reported && cp <= acked {
                    client.ack_durable(acked, cp).await?;
                    reported = cp;
                }
            }
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

async fn link_status(a: &Applier, peer: &str) -> Result<String, PullError> {
    Ok(a.client()
        .query_opt(
            "SELECT status FROM mesh.link_state WHERE peer = $1",
            &[&peer],
        )
        .await?
        .map_or_else(|| "active".to_string(), |r| r.get(0)))
}

/// The peer's log head, from a handshake asking for at most one event after `after`;
/// the link is closed right after it.
async fn peer_head(cfg: &PullConfig, target: &LinkTarget, after: i64) -> Result<i64, LinkError> {
    let (_client, welcome) =
        LinkClient::connect(&target.addr, cfg.client(target, after, 1, 1)).await?;
    Ok(welcome.head)
}

/// Records the peer's log head (so the peer was just heard from) and, if given, a
/// checkpoint reached by empty batches.
async fn set_head(
    a: &Applier,
    peer: &str,
    head: i64,
    checkpoint: Option<i64>,
) -> Result<(), PullError> {
    a.client()
        .execute(
            "UPDATE mesh.link_state SET peer_head = $2, updated_at = now(), contact_at = now(),
                    checkpoint = greatest(checkpoint, coalesce($3::int8, checkpoint))
             WHERE peer = $1",
            &[&peer, &head, &checkpoint],
        )
        .await?;
    Ok(())
}

/// A heartbeat: [`set_head`], pipelined with adopting the region floors it carried.
/// Every batch sent before it is applied by now (batches apply in order, each
/// before the next frame is handled), and in this session, so the floors commit
/// after them.
async fn heartbeat(
    a: &Applier,
    cfg: &PullConfig,
    head: i64,
    checkpoint: Option<i64>,
    floors: Option<FloorMap>,
) -> Result<(), PullError> {
    let floors = floors.unwrap_or_default();
    futures::future::try_join(set_head(a, &cfg.peer, head, checkpoint), async {
        Ok(floors::adopt(a.client(), &cfg.region, &floors).await?)
    })
    .await?;
    Ok(())
}

/// The node's one `LISTEN pgmesh_links` connection, shared by all of its links:
/// each listening backend is woken by every NOTIFY in its database (the change
/// log's included), so one per node instead of one per link saves wake-ups on every
/// append. Payloads go to every subscriber; an empty one after each (re)connect
/// asks the links to re-check their state. Dropping it stops the listener.
#[derive(Debug)]
pub struct LinkSignals {
    tx: broadcast::Sender<String>,
    task: JoinHandle<()>,
}

impl LinkSignals {
    /// Starts listening on the regional database `url`.
    pub fn start(url: &str) -> Self {
        let (tx, _) = broadcast::channel(64);
        let task = tokio::spawn(listen_links(url.to_string(), tx.clone()));
        Self { tx, task }
    }

    /// A receiver for one link's [`run`].
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.tx.subscribe()
    }
}

impl Drop for LinkSignals {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Forwards `NOTIFY pgmesh_links` payloads to every subscriber; reconnects when
/// the connection drops. Runs until aborted by [`LinkSignals`]'s drop.
async fn listen_links(url: String, tx: broadcast::Sender<String>) {
    loop {
        if let Ok((mut config, tls)) = crate::pgtls::pg_config(&url) {
            if config.get_application_name().is_none() {
                config.application_name("pgmesh-links");
            }
            if let Ok((client, mut conn)) = config.connect(tls).await {
                let tx2 = tx.clone();
                let driver = tokio::spawn(async move {
                    let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
                    while let Some(Ok(m)) = messages.next().await {
                        if let AsyncMessage::Notification(n) = m {
                            // No subscriber yet is fine: links check their state
                            // when they start.
                            let _ = tx2.send(n.payload().to_string());
                        }
                    }
                });
                if client.batch_execute("LISTEN pgmesh_links").await.is_ok() {
                    // Re-check state after (re)connecting: a change may have been missed.
                    let _ = tx.send(String::new());
                    let _ = driver.await;
                } else {
                    driver.abort();
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
