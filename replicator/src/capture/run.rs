//! The capture loop of one region: leadership, the replication stream, batched
//! appends to the change log, and slot acknowledgement.
//!
//! Invariants it keeps:
//! - Only the holder of the region's advisory lock captures; others wait as standby
//!   and take over when the lock is released (the leader's session ended).
//! - The slot is confirmed only up to the end of the last transaction that is
//!   durable in the log, so a crash at any point re-delivers, never loses.
//! - Re-delivered transactions (commit LSN at or below the log's resume point) are
//!   skipped, so a crash never duplicates either.
//! - Appends batch whatever is already received. With a linger
//!   ([`CaptureConfig::linger`]), a transaction that commits less than the linger
//!   after the last append waits for the rest of it, and the ones that commit
//!   meanwhile join it; the status tick appends a waiting batch early. A lingering
//!   batch is not confirmed to the slot, so a crash during the wait re-delivers it.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::assemble::{AssembleError, Assembler};
use super::leader;
use crate::apply::sql::shift_params;
use crate::catalog::{self, CatalogError, PUBLICATION};
use crate::event::ChangeEvent;
use crate::hlc::Hlc;
use crate::keepalive;
use crate::linger::Linger;
use crate::log::tail::Tail;
use crate::log::{fence, floors};
use crate::log::{ChangeLog, LogError, TableLog};
use crate::pgoutput::{Lsn, PgTimestamp, ReplicationMessage, StandbyStatusUpdate};
use crate::replconn::{ConnParams, ReplConnection, ReplError, ReplStream};

/// Errors of a capture run; the loop retries after each.
#[derive(Debug, Error)]
pub enum CaptureError {
    #[error("{0}")]
    Catalog(#[from] CatalogError),
    #[error("replication stream: {0}")]
    Repl(#[from] ReplError),
    #[error("{0}")]
    Log(#[from] LogError),
    #[error("{0}")]
    Assemble(#[from] AssembleError),
    #[error("database: {}", crate::catalog::pg_error(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("the mesh catalog is not installed in this database: run `pgmesh init` first")]
    NotInitialized,
    #[error("the replication stream ended")]
    StreamEnded,
    #[error("{0}")]
    RelayMismatch(String),
}

/// Capture settings.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// Regional database, `postgres://USER@HOST:PORT/DB`. The role needs REPLICATION.
    pub url: String,
    pub region: String,
    pub node: String,
    /// Most events per append. Default 500.
    pub max_batch: usize,
    /// Interval of standby status updates while idle. Default 1 s.
    pub status_interval: Duration,
    /// Where logged rows are published for the peer server. Default: none.
    pub tail: Option<Arc<Tail>>,
    /// Whether this node relays other regions' events (`--relay`); recorded in
    /// `mesh.node_state`, where every node of the region must agree. Default: false.
    pub relay: bool,
    /// Least time from the end of one append to the start of the next: transactions
    /// that commit sooner wait for the rest of it and share an append, so a busy
    /// region appends fewer, larger batches. One that commits later is appended as
    /// soon as capture has caught up. Default: zero (always at once).
    pub linger: Duration,
}

impl CaptureConfig {
    pub fn new(url: &str, region: &str, node: &str) -> Self {
        Self {
            url: url.to_string(),
            region: region.to_string(),
            node: node.to_string(),
            max_batch: 500,
            status_interval: Duration::from_secs(1),
            tail: None,
            relay: false,
            linger: Duration::ZERO,
        }
    }
}

/// Capture's side of the progress channel: what is durably logged, and pokes from
/// apply asking to prove progress.
#[derive(Debug)]
pub struct ProgressTx {
    logged: watch::Sender<Lsn>,
    poke: Arc<Notify>,
}

/// Apply's side: waits until capture has logged every local commit below an LSN.
#[derive(Debug, Clone)]
pub struct Progress {
    logged: watch::Receiver<Lsn>,
    poke: Arc<Notify>,
}

/// A connected pair.
pub fn progress_channel() -> (ProgressTx, Progress) {
    let (tx, rx) = watch::channel(Lsn(0));
    let poke = Arc::new(Notify::new());
    (
        ProgressTx {
            logged: tx,
            poke: poke.clone(),
        },
        Progress { logged: rx, poke },
    )
}

impl Progress {
    /// Position up to which every local commit is in the change log.
    pub fn logged(&self) -> Lsn {
        *self.logged.borrow()
    }

    /// Waits until capture has logged everything below `lsn`, or `timeout` passes
    /// (returns false then). Each poke makes capture ask the walsender for its
    /// position at once, so this waits for a round trip, not for a timer.
    pub async fn wait_for(&mut self, lsn: Lsn, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if *self.logged.borrow_and_update() >= lsn {
                return true;
            }
            self.poke.notify_one();
            let step = tokio::time::Instant::now() + Duration::from_millis(50);
            tokio::select! {
                r = self.logged.changed() => if r.is_err() { return false },
                _ = tokio::time::sleep_until(step.min(deadline)) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return *self.logged.borrow() >= lsn;
            }
        }
    }
}

/// This node's part in capture for its region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Starting,
    Standby,
    Leader,
}

/// How far a region's floor trails the database clock of its [`FloorMark`]: more
/// than a commit takes from its timestamp to its commit record, so that the
/// transactions whose commit records come after the mark keep their own commit
/// times as HLCs.
const FLOOR_TRAILS_MS: u64 = 2_000;

/// Runs capture until `shutdown` turns true, retrying with backoff after errors.
pub async fn run(
    cfg: CaptureConfig,
    role: watch::Sender<Role>,
    progress: ProgressTx,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            return;
        }
        match run_once(&cfg, &role, &progress, &mut shutdown).await {
            Ok(()) => return,
            Err(e) => {
                let _ = role.send(Role::Starting);
                warn!(region = %cfg.region, error = %e, retry_ms = backoff.as_millis() as u64, "capture stopped; retrying");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn run_once(
    cfg: &CaptureConfig,
    role: &watch::Sender<Role>,
    progress: &ProgressTx,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), CaptureError> {
    // This connection holds the leader lock for as long as it lives.
    let lock = catalog::connect_as(&cfg.url, "pgmesh-capture-lock").await?;
    // The floor it writes must be as durable as the appends below it, whatever the
    // database's default.
    lock.batch_execute("SET synchronous_commit = on").await?;
    let installed: bool = lock
        .query_one("SELECT to_regclass('mesh.changelog') IS NOT NULL", &[])
        .await?
        .get(0);
    if !installed {
        return Err(CaptureError::NotInitialized);
    }
    if !leader::try_lead(&lock, &cfg.region).await? {
        let _ = role.send(Role::Standby);
        info!(region = %cfg.region, "standby: waiting for the capture leader lock");
        if !leader::wait_for_lead(&lock, cfg, shutdown).await? {
            leader::mark_stopped(&lock, cfg).await;
            return Ok(());
        }
    }
    leader::set_role(&lock, cfg, "leader").await?;
    let led = lead(cfg, &lock, role, progress, shutdown).await;
    if led.is_ok() {
        leader::mark_stopped(&lock, cfg).await;
    }
    led
}

/// Captures as the region's leader (`lock` holds the lock) until `shutdown`.
async fn lead(
    cfg: &CaptureConfig,
    lock: &tokio_postgres::Client,
    role: &watch::Sender<Role>,
    progress: &ProgressTx,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), CaptureError> {
    info!(region = %cfg.region, node = %cfg.node, "capture leader");
    let log_client = catalog::connect_as(&cfg.url, "pgmesh-capture-log").await?;
    log_client.batch_execute(catalog::GENERIC_PLANS).await?;
    TableLog::skip_ahead(&log_client).await?;
    let mut log = TableLog::new(log_client).await?;
    let params = ConnParams::from_url(&cfg.url)?
        .with_application_name(format!("pgmesh-capture-{}", cfg.region));
    let conn = connect_replication(&params).await?;
    let slot = catalog::slot_name(&cfg.region);
    let options = [
        ("proto_version", "1"),
        ("publication_names", PUBLICATION),
        ("messages", "true"),
    ];
    let mut stream = start_with_retry(conn, &params, &slot, &options, shutdown).await?;
    let Some(stream) = stream.as_mut() else {
        return Ok(());
    };
    // Where to resume is read only now that the slot is ours, and once this node's
    // epoch fences off any append a previous leader still has on its way.
    let fence = fence::take(log.client(), &cfg.region, &cfg.node).await?;
    info!(region = %cfg.region, epoch = fence.epoch, "capture epoch taken");
    log.set_fence(fence);
    let resume = log.resume_point(&cfg.region).await?;
    let skip_upto = resume.map_or(Lsn(0), |r| r.lsn);
    let mut asm = Assembler::new(&cfg.region, resume.map_or(Hlc::ZERO, |r| r.hlc));
    // A floor a previous leader published binds this one too.
    if let Some(floor) = floors::stored(log.client(), &cfg.region).await? {
        asm.raise_floor(floor);
    }
    // So does the highest HLC apply has recorded: the messages that told a previous
    // leader lie below the slot's confirmed position and are not decoded again, and a
    // local write must still win against a remote one applied before it.
    let applied: i64 = log
        .client()
        .query_one(
            "SELECT coalesce(max(applied_hlc), 0) FROM mesh.link_state",
            &[],
        )
        .await
        .map_err(LogError::from)?
        .get(0);
    asm.observe_applied(Hlc::from_u64(applied as u64));
    let _ = role.send(Role::Leader);
    let _publishing = cfg.tail.as_ref().map(|t| Publishing::start(t.clone()));
    let mut pump = Pump {
        batch: Vec::new(),
        pending_end: Lsn(0),
        confirmed: Lsn(0),
        skip_upto,
        max_batch: cfg.max_batch,
        tail: cfg.tail.clone(),
        linger: Linger::new(cfg.linger),
        append_at: None,
    };
    let beat_stmt = lock.prepare(&BEAT).await?;
    let mut tick = tokio::time::interval(cfg.status_interval);
    // After a stall, one tick, not a burst of them.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The next floor, once every commit below its WAL position is logged (see the
    // tick).
    let mut next_floor: Option<FloorMark> = None;
    loop {
        // Timers and pokes before the stream: they are ready now and then, while a
        // stream working through a backlog is ready every time, which would starve
        // the status updates, the leader heartbeat (`mesh.nodes.alive`) and the floor.
        let msg = tokio::select! {
            biased;
            _ = shutdown.changed() => return Ok(()),
            _ = progress.poke.notified() => {
                stream.send_status(status(pump.confirmed, true)).await?;
                continue;
            }
            _ = tick.tick() => {
                // A batch waiting for its linger goes now: the floor below needs an
                // empty batch, and a busy region lingers much of the time. (The batch
                // holds finished transactions only, so the middle of another one does
                // not matter, as for a keepalive that asks for a reply.)
                if !pump.batch.is_empty() {
                    pump.flush(&mut log, stream, &mut asm).await?;
                    pump.report(progress);
                }
                // The answer (a keepalive) moves `confirmed` on while idle.
                stream.send_status(status(pump.confirmed, true)).await?;
                // A floor mark is taken when every commit below its WAL position is
                // logged, nothing assembled waits for the log, so every event of
                // this region below the floor is logged; from here on none gets a
                // lower HLC. Transactions that commit after the mark's clock keep
                // their commit times as HLCs, never raised to the floor: the floor
                // trails that clock.
                let reached = next_floor.take_if(|m| pump.batch.is_empty() && pump.confirmed >= m.lsn);
                let floor = reached.map(|m| {
                    let f = floors::own_floor(asm.previous(), m.clock_ms.saturating_sub(FLOOR_TRAILS_MS));
                    asm.raise_floor(f);
                    f
                });
                let mark = beat(lock, &beat_stmt, cfg, floor).await?;
                next_floor = next_floor.or(Some(mark));
                continue;
            }
            _ = sleep_until(pump.append_at), if pump.append_at.is_some() => {
                // The linger is over: append, even in the middle of the next
                // transaction (a large one could take minutes to arrive).
                pump.flush(&mut log, stream, &mut asm).await?;
                pump.report(progress);
                continue;
            }
            m = stream.next() => m?,
        };
        match msg {
            None => return Err(CaptureError::StreamEnded),
            Some(ReplicationMessage::XLogData(x)) => {
                if let Some(done) = asm.push(x.message().map_err(AssembleError::from)?)? {
                    pump.add(done.commit_lsn, done.end_lsn, done.event);
                }
            }
            Some(ReplicationMessage::PrimaryKeepalive(k)) => {
                if !asm.in_transaction()
                    && pump.batch.is_empty()
                    && pump.pending_end <= pump.confirmed
                {
                    // Nothing of ours is pending below wal_end: let the slot move on.
                    pump.pending_end = pump.pending_end.max(k.wal_end);
                }
                if k.reply_requested {
                    pump.flush(&mut log, stream, &mut asm).await?;
                    stream.send_status(status(pump.confirmed, false)).await?;
                }
            }
        }
        let caught_up = !stream.has_buffered() || pump.batch.len() >= pump.max_batch;
        if !asm.in_transaction() && caught_up && !pump.lingers() {
            pump.flush(&mut log, stream, &mut asm).await?;
            pump.report(progress);
        }
    }
}

/// A candidate for the region's floor: the database clock when the WAL was at `lsn`.
/// Every transaction that committed before then has its commit record below `lsn`.
#[derive(Debug, Clone, Copy)]
struct FloorMark {
    lsn: Lsn,
    clock_ms: u64,
}

/// The leader's heartbeat (`$1` node), which also proves the lock connection is
/// alive (a dead one means leadership is lost), with its region's new floor
/// ([`floors::RAISE`], `$2`..`$4`; empty arrays raise nothing), and the next
/// [`FloorMark`], in one statement.
static BEAT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH h AS (UPDATE mesh.node_state SET heartbeat = now() WHERE node = $1),
              f AS ({})
         SELECT pg_current_wal_insert_lsn()::text,
                floor(extract(epoch FROM clock_timestamp()) * 1000)::int8",
        shift_params(floors::RAISE, 1)
    )
});

/// Runs [`BEAT`] (prepared as `stmt`): the heartbeat, `floor` if any, and the next
/// [`FloorMark`].
async fn beat(
    lock: &tokio_postgres::Client,
    stmt: &tokio_postgres::Statement,
    cfg: &CaptureConfig,
    floor: Option<Hlc>,
) -> Result<FloorMark, CaptureError> {
    let floors: Vec<i64> = floor.map(|f| f.as_u64() as i64).into_iter().collect();
    let regions: Vec<&str> = floors.iter().map(|_| cfg.region.as_str()).collect();
    let row = lock
        .query_one(stmt, &[&cfg.node, &regions, &floors, &""])
        .await?;
    let lsn: String = row.get(0);
    Ok(FloorMark {
        lsn: lsn.parse().unwrap_or(Lsn(u64::MAX)),
        clock_ms: u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
    })
}

/// Marks the tail as fed by this capture for as long as it lives.
struct Publishing(Arc<Tail>);

impl Publishing {
    fn start(tail: Arc<Tail>) -> Self {
        tail.set_publishing(true);
        Self(tail)
    }
}

impl Drop for Publishing {
    fn drop(&mut self) {
        self.0.set_publishing(false);
    }
}

/// Events waiting for the log, and the positions confirmed to the slot.
struct Pump {
    batch: Vec<ChangeEvent>,
    /// End LSN of the last finished transaction (logged once the batch is).
    pending_end: Lsn,
    /// What the slot has been told is durable.
    confirmed: Lsn,
    skip_upto: Lsn,
    max_batch: usize,
    tail: Option<Arc<Tail>>,
    /// [`CaptureConfig::linger`], since the last append.
    linger: Linger,
    /// When the batch that waits for the linger is to be appended.
    append_at: Option<Instant>,
}

impl Pump {
    fn add(&mut self, commit_lsn: Lsn, end_lsn: Lsn, event: Option<ChangeEvent>) {
        if commit_lsn > self.skip_upto {
            if let Some(e) = event {
                self.batch.push(e);
            }
        } else {
            debug!(commit_lsn = %commit_lsn, "skipping a transaction already in the log");
        }
        self.pending_end = self.pending_end.max(end_lsn);
    }

    /// Whether the batch should wait for more transactions: it has room, and the
    /// linger since the last append is not over. Sets [`Self::append_at`] then.
    fn lingers(&mut self) -> bool {
        let room = !self.batch.is_empty() && self.batch.len() < self.max_batch;
        self.append_at = room.then(|| self.linger.wait_until()).flatten();
        self.append_at.is_some()
    }

    /// Tells apply sessions waiting for capture how far it has logged.
    fn report(&self, progress: &ProgressTx) {
        progress.logged.send_if_modified(|l| {
            let moved = *l < self.confirmed;
            *l = (*l).max(self.confirmed);
            moved
        });
    }

    /// Appends the batch durably, then confirms its end to the slot. The append may
    /// raise events' HLCs (see `versions::advance_local`); `asm` continues above them.
    async fn flush(
        &mut self,
        log: &mut TableLog,
        stream: &mut ReplStream,
        asm: &mut Assembler,
    ) -> Result<(), CaptureError> {
        if !self.batch.is_empty() {
            let started = std::time::Instant::now();
            let logged = log.append_local(&mut self.batch).await?;
            if let Some(h) = logged.iter().map(|l| l.event.hlc).max() {
                asm.observe_applied(h);
            }
            debug!(
                events = logged.len(),
                us = started.elapsed().as_micros() as u64,
                "appended to change log"
            );
            if let Some(tail) = &self.tail {
                tail.publish(logged);
            }
            self.batch.clear();
            self.linger.ended();
        }
        self.append_at = None;
        if self.pending_end > self.confirmed {
            self.confirmed = self.pending_end;
            stream.send_status(status(self.confirmed, false)).await?;
        }
        Ok(())
    }
}

fn status(lsn: Lsn, reply: bool) -> StandbyStatusUpdate {
    let mut s = StandbyStatusUpdate::confirm(lsn, PgTimestamp::now());
    s.reply_requested = reply;
    s
}

/// The replication connection, with the server told to drop it soon after this
/// node vanishes: its walsender holds the slot (see [`keepalive`]).
async fn connect_replication(params: &ConnParams) -> Result<ReplConnection, CaptureError> {
    let mut conn = ReplConnection::connect(params).await?;
    conn.simple_query(keepalive::SERVER).await?;
    Ok(conn)
}

/// How long a new leader waits for a previous leader's walsender to let go of the
/// slot: longer than the server takes to find a vanished client dead (at most
/// [`keepalive::SERVER_USER_TIMEOUT`], or `wal_sender_timeout`'s default of a
/// minute).
const SLOT_WAIT: Duration = Duration::from_secs(90);

/// Starts streaming; retries while the slot is still held by a previous leader's
/// walsender that has not noticed its client is gone.
async fn start_with_retry(
    mut conn: ReplConnection,
    params: &ConnParams,
    slot: &str,
    options: &[(&str, &str)],
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<ReplStream>, CaptureError> {
    let deadline = tokio::time::Instant::now() + SLOT_WAIT;
    loop {
        match conn.start_logical(slot, Lsn(0), options).await {
            Ok(s) => return Ok(Some(s)),
            Err(e) if e.sqlstate() == Some("55006") && tokio::time::Instant::now() < deadline => {
                debug!(slot, "slot still active for a previous leader; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = shutdown.changed() => return Ok(None),
                }
                conn = connect_replication(params).await?;
            }
            Err(e) if e.sqlstate() == Some("42704") => return Err(CaptureError::NotInitialized),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sleeps until `at`; never wakes without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(a) => tokio::time::sleep_until(a).await,
        None => std::future::pending().await,
    }
}
