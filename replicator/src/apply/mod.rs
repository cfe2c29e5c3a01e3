//! Apply: remote events become local rows, one local transaction per batch.
//!
//! In that transaction the events already in `mesh.changelog` are set aside
//! (duplicates and replays do nothing), the target rows are locked, capture is made
//! to catch up past any local commit that touched them and that it has not logged
//! yet (the capture race), versions are read, each change is resolved by
//! last-writer-wins, winners are written, and the events (in the change log),
//! versions, conflicts and the link checkpoint are recorded. A crash at any point
//! applies the whole batch or none of it. When a batch fails on data (a constraint
//! or type error), its events are applied again one per transaction, each with the
//! checkpoint up to it, and one that fails is sent to `mesh.dead_letters` (logged and
//! checkpointed in its own transaction); the link keeps going.
//!
//! The session uses a replication origin, so capture knows these writes are not
//! local changes (loop prevention), and `session_replication_role = replica` when the
//! role may set it, so triggers and foreign keys behave as in native logical
//! replication: the origin already enforced them, and cascades arrive as their own
//! row changes.

mod batch;
pub mod exec;
mod locks;
mod plan;
mod quiesce;
mod records;
pub mod sql;
mod truncate;

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use futures::future::try_join;
use thiserror::Error;
use tokio_postgres::{Client, Statement};
use tracing::{debug, warn};

use crate::capture::{Progress, APPLIED_PREFIX};
use crate::catalog::{self, origin_id_for};
use crate::event::ChangeEvent;
use crate::log::table::{APPEND_LOCKED_INSERT, APPEND_NOTIFY, APPEND_ROWS};
use crate::log::versions;
use crate::log::Logged;
use crate::pgoutput::Lsn;
use plan::{plan_events, Plan};
use records::record_conflicts;
pub use records::LOGGED;

/// Sets the transaction's replication-origin LSN (`$1`) and commit timestamp (`$2`)
/// to the source's, and reads the transaction's xids ([`plan::XIDS_COLUMNS`]) and
/// which of the events (`$3` origins, `$4` hlcs) are applied already (the positions
/// [`LOGGED`] returns, as an array).
static ORIGIN_SETUP: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT pg_replication_origin_xact_setup($1::text::pg_lsn,
     timestamptz 'epoch' + $2::int8 * interval '1 microsecond')::text,
     {},
     ARRAY({})",
        plan::XIDS_COLUMNS,
        sql::shift_params(LOGGED, 2)
    )
});

/// Advances the link checkpoint, in the batch's transaction.
const CHECKPOINT: &str = "UPDATE mesh.link_state SET checkpoint = greatest(checkpoint, $2::int8),
        peer_head = greatest($3::int8, $2::int8),
        applied_hlc = greatest(applied_hlc, $4::int8),
        last_commit_ts = coalesce(timestamptz 'epoch' + $5::int8 * interval '1 microsecond', last_commit_ts),
        last_applied_at = now(), updated_at = now(), contact_at = now(), error = NULL
     WHERE peer = $1";

/// The end of a batch that applied events, in one statement: the events appended to
/// the log under the append lock ([`APPEND_LOCKED_INSERT`], `$1`..`$10`), the rows'
/// new versions ([`versions::STORE`], `$11`..`$16`), and the checkpoint
/// ([`CHECKPOINT`], `$17`..`$21`), which also tells capture the highest HLC the batch
/// applied (a transactional logical message, `$22` prefix and `$23` content). The
/// link's row exists from [`Applier::connect`] on, so the message is emitted once.
/// The append notifies the log's readers only when `$24` is true (see
/// [`Applier::set_notify_appends`]). The CTEs modify different tables, so their
/// shared snapshot does not matter.
static TAIL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH ins AS ({APPEND_LOCKED_INSERT}),
     ver AS ({}),
     cp AS ({} RETURNING pg_logical_emit_message(true, $22, $23))
SELECT {APPEND_ROWS}, CASE WHEN $24::bool THEN {APPEND_NOTIFY} END, (SELECT count(*) FROM cp)
FROM ins",
        sql::shift_params(versions::STORE, 10),
        sql::shift_params(CHECKPOINT, 16)
    )
});

/// Statements of the paths outside a scripted batch (dead letters, their retries),
/// prepared once per session.
#[derive(Debug)]
struct Statements {
    tail: Statement,
    store: Statement,
    conflict: Statement,
    unchanged: Statement,
}

impl Statements {
    async fn prepare(c: &Client) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            tail: c.prepare(&TAIL).await?,
            store: c.prepare(versions::STORE).await?,
            conflict: c.prepare(records::CONFLICT).await?,
            unchanged: c.prepare(plan::VERSIONS_UNCHANGED).await?,
        })
    }
}

/// Settles a retried dead letter (`$1`) as applied and, like a batch, tells capture the
/// HLC it applied (`$2`): in the link's `applied_hlc` (for a new capture leader) and in a
/// transactional logical message (prefix `$4`) for the running one. Otherwise a local
/// write right after the retry could get a lower HLC than the change it overwrote, and
/// lose to it in every other region while it stands here.
const RETRIED: &str = "WITH letter AS (
         UPDATE mesh.dead_letters SET status = 'applied', attempts = attempts + 1, updated_at = now()
          WHERE id = $1),
     link AS (UPDATE mesh.link_state SET applied_hlc = greatest(applied_hlc, $2::int8) WHERE peer = $3)
     SELECT pg_logical_emit_message(true, $4, $2::int8::text)";

/// Errors of apply. `Retry` errors leave the batch for the next attempt.
#[derive(Debug, Error)]
pub enum ApplyError {
    #[error("database: {}", crate::catalog::pg_error(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Catalog(#[from] catalog::CatalogError),
    #[error("capture did not reach {0} in time; retrying the batch")]
    CaptureBehind(Lsn),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApplyError {
    /// An error a concurrent write explains, after which the batch is resolved
    /// again: a unique violation (23505: a local insert of a key the batch inserts
    /// committed while ours waited on it), a serialization failure (40001: a row
    /// version the batch resolved against changed before it stored its own, see
    /// [`plan::VERSIONS_UNCHANGED`]), or a deadlock (40P01: with a local transaction
    /// or another link's batch, over the table locks of a batch that truncates, see
    /// `quiesce`).
    pub fn raced_a_local_write(&self) -> bool {
        matches!(self, ApplyError::Db(e) if e.code().is_some_and(|c| ["23505", "40001", "40P01"].contains(&c.code())))
    }

    /// An error after which a retried dead letter is left marked for retry, to be
    /// tried again later ([`Applier::retry_deferred`]), rather than ending the link's
    /// session: capture is behind, or the tables it writes stayed locked.
    fn defers_a_retry(&self) -> bool {
        match self {
            ApplyError::CaptureBehind(_) => true,
            ApplyError::Db(e) => {
                e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
            }
            _ => self.raced_a_local_write(),
        }
    }

    /// Whether the error is about the data of one event (so it belongs in dead
    /// letters) rather than about the connection or the database as a whole.
    pub fn is_data_error(&self) -> bool {
        match self {
            ApplyError::Db(e) => e.code().is_some_and(|c| {
                let c = c.code();
                // 22 data exception, 23 integrity, 42 syntax/undefined object, 2B, 44,
                // P0 raised by a trigger (one that fires when apply may not set
                // session_replication_role)
                ["22", "23", "42", "2B", "44", "P0"]
                    .iter()
                    .any(|p| c.starts_with(p))
                    && c != "40001"
                    && c != "40P01"
            }),
            _ => false,
        }
    }
}

/// What one batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    pub applied: usize,
    pub duplicates: usize,
    pub conflicts: usize,
    pub dead_letters: usize,
    pub max_commit_ts_us: Option<i64>,
}

/// The apply session of one link.
#[derive(Debug)]
pub struct Applier {
    client: Client,
    peer: String,
    /// The statements every batch runs, prepared when the session opens.
    st: Statements,
    /// Row statements, prepared on first use.
    cache: exec::StatementCache,
    /// The same at the SQL level, for scripts.
    named: crate::script::Named,
    region: String,
    names: HashMap<i16, String>,
    progress: Option<Progress>,
    capture_wait: Duration,
    /// Whether appends of applied events notify the log's readers.
    notify_appends: bool,
    /// The database, for [`Self::flusher`].
    url: String,
    /// A second session, opened on first use, that flushes the WAL (see
    /// [`flush_wal`]).
    flusher: Option<Client>,
    /// See [`Self::retry_deferred`].
    retry_deferred: bool,
}

impl Applier {
    /// Opens the apply session for the link from `peer`: replication origin
    /// `pgmesh_from_<peer>`, replica role when allowed, and `synchronous_commit =
    /// off`. That is safe because the link checkpoint commits in the same
    /// transaction as the batch: a crash that loses an unflushed batch loses its
    /// checkpoint too, and the batch is pulled again (`mesh_crash` tests it). A local
    /// write that read an applied row flushes the WAL up to its own commit, which
    /// includes the applied batch, so nothing observed is lost either.
    pub async fn connect(
        url: &str,
        region: &str,
        peer: &str,
        regions: &[String],
        progress: Option<Progress>,
    ) -> Result<Self, ApplyError> {
        let client = catalog::connect_as(url, &format!("pgmesh-apply-{peer}")).await?;
        client
            .batch_execute(&format!(
                "SET synchronous_commit = off; SET standard_conforming_strings = on; \
                 SET default_transaction_isolation = 'read committed'; \
                 SET DateStyle = ISO; SET IntervalStyle = postgres; SET extra_float_digits = 3; \
                 SET TimeZone = 'UTC'; {}",
                catalog::GENERIC_PLANS
            ))
            .await?;
        if let Err(e) = client
            .batch_execute("SET session_replication_role = replica")
            .await
        {
            warn!(error = %e, "cannot set session_replication_role; applying with triggers and foreign keys active");
        }
        let origin = format!("pgmesh_from_{peer}");
        client
            .execute(
                "SELECT pg_replication_origin_create($1)
                 WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1)",
                &[&origin],
            )
            .await?;
        client
            .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
            .await?;
        client
            .execute(
                "INSERT INTO mesh.link_state (peer) VALUES ($1) ON CONFLICT (peer) DO NOTHING",
                &[&peer],
            )
            .await?;
        // Apply appends to the log too: after a crash, never on rewound numbers.
        crate::log::table::TableLog::skip_ahead(&client)
            .await
            .map_err(|e| ApplyError::Internal(e.to_string()))?;
        let mut names: HashMap<i16, String> = regions
            .iter()
            .map(|r| (origin_id_for(r), r.clone()))
            .collect();
        names.insert(origin_id_for(region), region.to_string());
        let st = Statements::prepare(&client).await?;
        Ok(Self {
            client,
            peer: peer.to_string(),
            st,
            cache: exec::StatementCache::default(),
            named: crate::script::Named::default(),
            region: region.to_string(),
            names,
            progress,
            capture_wait: Duration::from_secs(10),
            notify_appends: true,
            url: url.to_string(),
            flusher: None,
            retry_deferred: false,
        })
    }

    /// How long a batch waits for capture (10 s by default) before it fails with
    /// [`ApplyError::CaptureBehind`].
    pub fn set_capture_wait(&mut self, wait: Duration) {
        self.capture_wait = wait;
    }

    /// Whether the appends of applied events `NOTIFY` the log's readers (the default).
    /// Only a node that relays serves other origins' events from its log, so only
    /// then does a reader need waking for them; every NOTIFY wakes every listening
    /// session of the database, the applications' too.
    pub fn set_notify_appends(&mut self, on: bool) {
        self.notify_appends = on;
    }

    /// The session's connection (for link bookkeeping outside batches).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The checkpoint of the link from `peer`.
    pub async fn checkpoint(&self, peer: &str) -> Result<i64, ApplyError> {
        Ok(self
            .client
            .query_opt(
                "SELECT checkpoint FROM mesh.link_state WHERE peer = $1",
                &[&peer],
            )
            .await?
            .map_or(0, |r| r.get(0)))
    }

    /// The link's checkpoint, made durable: a synchronous commit flushes the WAL up
    /// to it, and with it every batch applied before (batches commit
    /// asynchronously). Also kept as `mesh.link_state.durable_checkpoint`.
    pub async fn durable_checkpoint(&self, peer: &str) -> Result<i64, ApplyError> {
        let c = &self.client;
        // One after the other: pipelined, the UPDATE (a statement prepared on the
        // way) would reach the server after the COMMIT and run on its own,
        // asynchronously committed.
        c.batch_execute("BEGIN; SET LOCAL synchronous_commit = on")
            .await?;
        let row = c
            .query_opt(
                "UPDATE mesh.link_state SET durable_checkpoint = checkpoint WHERE peer = $1
                 RETURNING checkpoint",
                &[&peer],
            )
            .await;
        let row = match row {
            Ok(r) => r,
            Err(e) => {
                let _ = c.batch_execute("ROLLBACK").await;
                return Err(e.into());
            }
        };
        c.batch_execute("COMMIT").await?;
        Ok(row.map_or(0, |r| r.get(0)))
    }

    /// Applies one batch in one transaction and advances the checkpoint to `upto`.
    /// A batch that fails on data is applied again event by event, the failing ones
    /// going to dead letters.
    pub async fn apply_batch(
        &mut self,
        peer: &str,
        events: &[Logged],
        upto: i64,
        head: i64,
    ) -> Result<BatchOutcome, ApplyError> {
        match self.retrying(peer, events, upto, head).await {
            Err(e) if e.is_data_error() => {
                debug!(error = %e, "batch failed on data; isolating events");
                self.isolated_body(peer, events, upto, head).await
            }
            other => other,
        }
    }

    /// Whether a retry of dead letters was deferred (capture behind, tables locked):
    /// the link calls [`Self::retry_dead_letters`] again on its next heartbeat.
    pub fn retry_deferred(&self) -> bool {
        self.retry_deferred
    }

    /// Re-applies dead letters marked for retry (`mesh.retry_dead_letter`). One that
    /// cannot be applied yet ([`ApplyError::CaptureBehind`], its tables locked) stays
    /// marked, ends the pass, and sets [`Self::retry_deferred`].
    pub async fn retry_dead_letters(&mut self) -> Result<usize, ApplyError> {
        self.retry_deferred = false;
        // Only this link's dead letters; another link never retries them.
        let rows = self
            .client
            .query(
                "SELECT id FROM mesh.dead_letters WHERE status = 'retry' AND peer = $1 ORDER BY id",
                &[&self.peer],
            )
            .await?;
        let mut done = 0;
        let names = self.names.clone();
        let wait = self.capture_wait;
        let mut progress = self.progress.clone();
        let st = &self.st;
        let mut ids: std::collections::VecDeque<(i64, u32)> =
            rows.iter().map(|r| (r.get(0), 0)).collect();
        while let Some((id, tries)) = ids.pop_front() {
            let tx = &self.client;
            tx.batch_execute("BEGIN").await?;
            // Locked, and still marked for retry: a skip that committed since the list
            // was read wins, and one that comes later waits for this transaction and
            // then finds the letter settled.
            let locked = tx
                .query_opt(
                    "SELECT event::text FROM mesh.dead_letters WHERE id = $1 AND status = 'retry' FOR UPDATE",
                    &[&id],
                )
                .await;
            let event = match locked {
                Ok(row) => row.and_then(|r| serde_json::from_str::<ChangeEvent>(r.get(0)).ok()),
                Err(e) => {
                    let _ = tx.batch_execute("ROLLBACK").await;
                    return Err(e.into());
                }
            };
            let Some(event) = event else {
                tx.batch_execute("COMMIT").await?;
                continue;
            };
            tx.batch_execute("SAVEPOINT retry").await?;
            let one = std::slice::from_ref(&event);
            // Run without waiting for capture after its writes, it holds local writes
            // off its tables instead (see `quiesce`).
            let applied = async {
                let url = &self.url;
                quiesce::hold_local_writes(
                    tx,
                    false,
                    one,
                    &mut self.flusher,
                    url,
                    progress.as_mut(),
                    wait,
                )
                .await?;
                let p = plan_events(tx, &mut self.cache, one, progress.as_mut(), wait).await?;
                run_plan(tx, st, &mut self.cache, &p, &names).await
            }
            .await;
            let settled = match applied {
                Ok(_) => {
                    done += 1;
                    let hlc = event.hlc.as_u64() as i64;
                    tx.execute(RETRIED, &[&id, &hlc, &self.peer, &APPLIED_PREFIX])
                        .await
                        .map_err(ApplyError::from)
                }
                Err(e) if e.is_data_error() => {
                    let (sqlstate, msg) = records::letter_error(&e);
                    let note = async {
                        tx.batch_execute("ROLLBACK TO SAVEPOINT retry").await?;
                        tx.execute(
                            "UPDATE mesh.dead_letters SET status = 'pending', attempts = attempts + 1,
                                    error = $2, sqlstate = $3, updated_at = now() WHERE id = $1",
                            &[&id, &msg, &sqlstate],
                        )
                        .await
                    };
                    note.await.map_err(ApplyError::from)
                }
                Err(e) => Err(e),
            };
            if let Err(e) = settled {
                let _ = tx.batch_execute("ROLLBACK").await;
                // A local write raced it (see `raced_a_local_write`): resolve it again.
                if e.raced_a_local_write() && tries < 3 {
                    ids.push_front((id, tries + 1));
                    continue;
                }
                if e.defers_a_retry() {
                    warn!(error = %e, dead_letter = id, "dead-letter retry deferred; it stays marked for retry");
                    self.retry_deferred = true;
                    return Ok(done);
                }
                return Err(e);
            }
            tx.batch_execute("COMMIT").await?;
        }
        Ok(done)
    }
}

/// Flushes the WAL up to now, through `flusher` (connected to `url` on first use): a
/// transaction that writes a logical message (which capture ignores) and commits
/// synchronously, within `timeout`. Capture reads only flushed WAL, and an apply
/// transaction that waits for capture past its own writes cannot flush them itself
/// before it commits.
async fn flush_wal(
    flusher: &mut Option<Client>,
    url: &str,
    timeout: Duration,
) -> Result<(), ApplyError> {
    if flusher.as_ref().is_none_or(|c| c.is_closed()) {
        let c = catalog::connect_as(url, "pgmesh-apply-flush").await?;
        // `local`: flushed here, without waiting for a synchronous standby.
        c.batch_execute("SET synchronous_commit = local").await?;
        *flusher = Some(c);
    }
    let c = flusher.as_ref().expect("connected above");
    let flush = c.batch_execute("SELECT pg_logical_emit_message(true, 'pgmesh_flush', '')");
    match tokio::time::timeout(timeout, flush).await {
        Ok(r) => Ok(r?),
        Err(_) => {
            *flusher = None;
            Err(ApplyError::Internal(format!(
                "the WAL flush took over {timeout:?}; retrying the batch"
            )))
        }
    }
}

/// Runs a plan's writes, then checks (under the append lock, see
/// [`plan::VERSIONS_UNCHANGED`]) that the versions it resolved against are still
/// stored, then stores its versions and conflict records, pipelined. The writes come
/// first: they may wait on a local transaction, and capture must not wait with them.
async fn run_plan(
    tx: &Client,
    st: &Statements,
    cache: &mut exec::StatementCache,
    p: &Plan,
    names: &HashMap<i16, String>,
) -> Result<(), ApplyError> {
    let stmts = exec::prepare_all(tx, cache, &p.writes).await?;
    exec::run_all(tx, &stmts, &p.writes).await?;
    let expected = plan::ExpectedParams::new(p);
    if !expected.is_empty() {
        tx.query_one(&st.unchanged, &expected.refs()).await?;
    }
    try_join(
        async {
            versions::store(tx, &st.store, &p.touched)
                .await
                .map_err(ApplyError::from)
        },
        record_conflicts(tx, &st.conflict, &p.conflicts, names),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests;
