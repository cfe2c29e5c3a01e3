//! Apply: remote events become local rows, one local transaction per batch.
//!
//! In that transaction the events already in `mesh.changelog` are set aside
//! (duplicates and replays do nothing), the target rows are locked, capture is made
//! to catch up past any local commit that touched them and that it has not logged
//! yet (the capture race), versions are read, each change is resolved by
//! last-writer-wins, winners are written, and the events (in the change log),
//! versions, conflicts and the link checkpoint are recorded. A crash at any point applies the whole batch or none of
//! it. An event that cannot be applied (a constraint or type error) is isolated in
//! its own savepoint and sent to `mesh.dead_letters`; the link keeps going.
//!
//! The session uses a replication origin, so capture knows these writes are not
//! local changes (loop prevention), and `session_replication_role = replica` when the
//! role may set it, so triggers and foreign keys behave as in native logical
//! replication: the origin already enforced them, and cascades arrive as their own
//! row changes.

pub mod exec;
mod records;
pub mod sql;
mod truncate;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use thiserror::Error;
use tokio_postgres::{Client, Transaction};
use tracing::{debug, warn};

use crate::capture::{Progress, APPLIED_PREFIX};
use crate::catalog::{self, origin_id_for};
use crate::event::{ChangeEvent, Op};
use crate::hlc::Hlc;
use crate::log::table::{append_params, APPEND, APPEND_LOCK};
use crate::log::versions::{self, RowVersion, VersionMap, WATERMARK};
use crate::log::Logged;
use crate::pgoutput::Lsn;
use crate::resolve::{decide, plan, Action, Decision, Version, Winner};
use records::{dead_letter, not_logged, record_conflicts, ConflictRow};
use truncate::truncate_older;

/// Errors of apply. `Retry` errors leave the batch for the next attempt.
#[derive(Debug, Error)]
pub enum ApplyError {
    #[error("database: {}", crate::catalog::pg_error(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Catalog(#[from] catalog::CatalogError),
    #[error("capture did not reach {0} in time; retrying the batch")]
    CaptureBehind(Lsn),
}

impl ApplyError {
    /// A unique violation (23505), which a concurrent local insert can cause.
    pub fn is_unique_violation(&self) -> bool {
        matches!(self, ApplyError::Db(e) if e.code().is_some_and(|c| c.code() == "23505"))
    }

    /// Whether the error is about the data of one event (so it belongs in dead
    /// letters) rather than about the connection or the database as a whole.
    pub fn is_data_error(&self) -> bool {
        match self {
            ApplyError::Db(e) => e.code().is_some_and(|c| {
                let c = c.code();
                // 22 data exception, 23 integrity, 42 syntax/undefined object, 2B, 44
                ["22", "23", "42", "2B", "44"]
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
    cache: exec::StatementCache,
    region: String,
    names: HashMap<i16, String>,
    progress: Option<Progress>,
    capture_wait: Duration,
}

impl Applier {
    /// Opens the apply session for the link from `peer`: replication origin
    /// `pgmesh_from_<peer>`, replica role when allowed, synchronous commit.
    pub async fn connect(
        url: &str,
        region: &str,
        peer: &str,
        regions: &[String],
        progress: Option<Progress>,
    ) -> Result<Self, ApplyError> {
        let client = catalog::connect(url).await?;
        client
            .batch_execute(
                "SET synchronous_commit = on; SET standard_conforming_strings = on; \
                 SET DateStyle = ISO; SET IntervalStyle = postgres; SET extra_float_digits = 3; \
                 SET TimeZone = 'UTC'",
            )
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
        let mut names: HashMap<i16, String> = regions
            .iter()
            .map(|r| (origin_id_for(r), r.clone()))
            .collect();
        names.insert(origin_id_for(region), region.to_string());
        Ok(Self {
            client,
            peer: peer.to_string(),
            cache: exec::StatementCache::default(),
            region: region.to_string(),
            names,
            progress,
            capture_wait: Duration::from_secs(10),
        })
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

    /// Applies one batch in one transaction and advances the checkpoint to `upto`.
    pub async fn apply_batch(
        &mut self,
        peer: &str,
        events: &[Logged],
        upto: i64,
        head: i64,
    ) -> Result<BatchOutcome, ApplyError> {
        let mut result = self.run_batch(peer, events, upto, head, false).await;
        // A unique violation usually means a local insert of the same key committed
        // while we waited on it: run the batch again, and it is resolved by
        // last-writer-wins against the now-visible row.
        for _ in 0..3 {
            match &result {
                Err(e) if e.is_unique_violation() => {
                    debug!(error = %e, "batch raced a local insert; retrying");
                    result = self.run_batch(peer, events, upto, head, false).await;
                }
                _ => break,
            }
        }
        match result {
            Err(e) if e.is_data_error() => {
                debug!(error = %e, "batch failed on data; isolating events");
                self.run_batch(peer, events, upto, head, true).await
            }
            other => other,
        }
    }

    async fn run_batch(
        &mut self,
        peer: &str,
        events: &[Logged],
        upto: i64,
        head: i64,
        isolate: bool,
    ) -> Result<BatchOutcome, ApplyError> {
        let remote: Vec<ChangeEvent> = events
            .iter()
            .filter(|l| l.event.origin != self.region)
            .map(|l| l.event.clone())
            .collect();
        let mut out = BatchOutcome::default();
        let region = self.region.clone();
        let names = self.names.clone();
        let wait = self.capture_wait;
        let mut progress = self.progress.clone();
        let tx = self.client.transaction().await?;
        if let Some(last) = remote.last() {
            // Commit timestamps and origin LSN of this transaction are the source's.
            tx.execute(
                "SELECT pg_replication_origin_xact_setup($1::text::pg_lsn, timestamptz 'epoch' + $2::int8 * interval '1 microsecond')",
                &[&Lsn(last.source_lsn).to_string(), &last.commit_ts_us],
            )
            .await?;
        }
        let fresh = not_logged(&tx, &remote).await?;
        out.duplicates = events.len() - fresh.len();
        if !fresh.is_empty() {
            let max = fresh.iter().map(|e| e.hlc).max().unwrap_or(Hlc::ZERO);
            tx.execute(
                "SELECT pg_logical_emit_message(true, $1, $2)",
                &[&APPLIED_PREFIX, &max.as_u64().to_string()],
            )
            .await?;
            if isolate {
                for (i, e) in fresh.iter().enumerate() {
                    tx.batch_execute(&format!("SAVEPOINT ev{i}")).await?;
                    match apply_events(
                        &tx,
                        &mut self.cache,
                        std::slice::from_ref(e),
                        &names,
                        progress.as_mut(),
                        wait,
                    )
                    .await
                    {
                        Ok(r) => {
                            tx.batch_execute(&format!("RELEASE SAVEPOINT ev{i}"))
                                .await?;
                            out.applied += 1;
                            out.conflicts += r;
                        }
                        Err(err) if err.is_data_error() => {
                            tx.batch_execute(&format!("ROLLBACK TO SAVEPOINT ev{i}"))
                                .await?;
                            dead_letter(&tx, peer, e, &err).await?;
                            out.dead_letters += 1;
                        }
                        Err(err) => return Err(err),
                    }
                }
            } else {
                out.conflicts = apply_events(
                    &tx,
                    &mut self.cache,
                    &fresh,
                    &names,
                    progress.as_mut(),
                    wait,
                )
                .await?;
                out.applied = fresh.len();
            }
        }
        // Log the applied events last, under the append lock, so sequence numbers
        // become visible in order and capture never waits on a batch that waits on it.
        if !fresh.is_empty() {
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&APPEND_LOCK])
                .await?;
            tx.execute(APPEND, &append_params(&fresh).refs()).await?;
        }
        out.max_commit_ts_us = events.iter().map(|l| l.event.commit_ts_us).max();
        let max_hlc = events
            .iter()
            .map(|l| l.event.hlc.as_u64() as i64)
            .max()
            .unwrap_or(0);
        tx.execute(
            "UPDATE mesh.link_state SET checkpoint = $2::int8, peer_head = greatest($3::int8, $2::int8),
                    applied_hlc = greatest(applied_hlc, $4::int8),
                    last_commit_ts = coalesce(timestamptz 'epoch' + $5::int8 * interval '1 microsecond', last_commit_ts),
                    last_applied_at = now(), updated_at = now(), error = NULL
             WHERE peer = $1",
            &[&peer, &upto, &head, &max_hlc, &out.max_commit_ts_us],
        )
        .await?;
        tx.commit().await?;
        let _ = region;
        Ok(out)
    }

    /// Re-applies dead letters marked for retry (`mesh.retry_dead_letter`).
    pub async fn retry_dead_letters(&mut self) -> Result<usize, ApplyError> {
        // Only this link's dead letters; another link never retries them.
        let rows = self
            .client
            .query(
                "SELECT id, event::text FROM mesh.dead_letters WHERE status = 'retry' AND peer = $1 ORDER BY id",
                &[&self.peer],
            )
            .await?;
        let mut done = 0;
        let names = self.names.clone();
        let wait = self.capture_wait;
        let mut progress = self.progress.clone();
        for r in rows {
            let id: i64 = r.get(0);
            let Ok(event) = serde_json::from_str::<ChangeEvent>(r.get(1)) else {
                continue;
            };
            let tx = self.client.transaction().await?;
            tx.batch_execute("SAVEPOINT retry").await?;
            match apply_events(
                &tx,
                &mut self.cache,
                std::slice::from_ref(&event),
                &names,
                progress.as_mut(),
                wait,
            )
            .await
            {
                Ok(_) => {
                    tx.execute(
                        "UPDATE mesh.dead_letters SET status = 'applied', attempts = attempts + 1, updated_at = now() WHERE id = $1",
                        &[&id],
                    )
                    .await?;
                    done += 1;
                }
                Err(e) if e.is_data_error() => {
                    tx.batch_execute("ROLLBACK TO SAVEPOINT retry").await?;
                    tx.execute(
                        "UPDATE mesh.dead_letters SET status = 'pending', attempts = attempts + 1,
                                error = $2, updated_at = now() WHERE id = $1",
                        &[&id, &e.to_string()],
                    )
                    .await?;
                }
                Err(e) => return Err(e),
            }
            tx.commit().await?;
        }
        Ok(done)
    }
}

/// Locks, waits for capture when it must, resolves and writes the changes of
/// `events`. Returns the number of conflicts recorded.
async fn apply_events(
    tx: &Transaction<'_>,
    cache: &mut exec::StatementCache,
    events: &[ChangeEvent],
    names: &HashMap<i16, String>,
    progress: Option<&mut Progress>,
    wait: Duration,
) -> Result<usize, ApplyError> {
    // Lock every keyed row the batch touches; learn which exist, and their xmin.
    let mut keys: Vec<(String, String)> = Vec::new();
    let mut locks: Vec<exec::Op> = Vec::new();
    let mut seen: HashSet<(String, String)> = HashSet::new();
    for c in events.iter().flat_map(|e| &e.changes) {
        if c.pk.is_empty() || !matches!(c.op, Op::Insert | Op::Update | Op::Delete) {
            continue;
        }
        let key = (c.table.clone(), c.key_json());
        if seen.insert(key.clone()) {
            let cols: Vec<&str> = c.pk.iter().map(|(k, _)| k.as_str()).collect();
            locks.push(exec::Op {
                sql: sql::lock(&c.table, &cols),
                values: c.pk.iter().map(|(_, v)| v.clone()).collect(),
            });
            keys.push(key);
        }
    }
    // key -> (xmin, age(xmin)) of rows that exist.
    let mut exists: HashMap<(String, String), (i64, i64)> = HashMap::new();
    for (key, row) in keys
        .iter()
        .zip(exec::query_first_all(tx, cache, &locks).await?)
    {
        if let Some(r) = row {
            exists.insert(key.clone(), (r[0], r[1]));
        }
    }
    // Versions of the rows, plus each table's TRUNCATE watermark.
    let mut vkeys = keys.clone();
    let mut tables: Vec<&str> = events
        .iter()
        .flat_map(|e| &e.changes)
        .map(|c| c.table.as_str())
        .collect();
    tables.sort_unstable();
    tables.dedup();
    vkeys.extend(
        tables
            .iter()
            .map(|t| (t.to_string(), WATERMARK.to_string())),
    );
    let mut current: VersionMap = versions::load(tx, &vkeys).await?;
    // The capture race: a local write that committed before we locked must count.
    // If every locked row was last written by the version we know of (its xmin
    // matches), or predates capture, nothing is uncaptured and we need not wait.
    if let Some(p) = progress {
        let since_init: Option<i64> = tx
            .query_one(
                "SELECT txid_current() - init_txid FROM mesh.regions WHERE is_local",
                &[],
            )
            .await?
            .get(0);
        let stale = keys.iter().any(|k| match (exists.get(k), current.get(k)) {
            // A row truncated here (its table's watermark is newer) is not stale.
            (None, Some(v))
                if current
                    .get(&(k.0.clone(), WATERMARK.to_string()))
                    .is_some_and(|w| w.version > v.version) =>
            {
                false
            }
            (Some((xmin, _)), Some(v)) => v.xid != Some(*xmin),
            (Some((_, age)), None) => since_init.is_none_or(|s| *age <= s),
            (None, Some(v)) => !v.deleted,
            (None, None) => false,
        });
        debug!(stale, rows = keys.len(), "capture race check");
        if stale {
            let lsn: String = tx
                .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
                .await?
                .get(0);
            let lsn: Lsn = lsn.parse().unwrap_or(Lsn(u64::MAX));
            if !p.wait_for(lsn, wait).await {
                return Err(ApplyError::CaptureBehind(lsn));
            }
            current = versions::load(tx, &vkeys).await?;
        }
    }
    let own_xid: i64 = tx
        .query_one("SELECT txid_current() % 4294967296", &[])
        .await?
        .get(0);
    let mut touched: VersionMap = HashMap::new();
    let mut writes: Vec<exec::Op> = Vec::new();
    let mut conflicts = Vec::new();
    for e in events {
        let remote = Version {
            hlc: e.hlc,
            origin: origin_id_for(&e.origin),
        };
        // Rows this event already wrote: a second change to the same row in one
        // transaction carries the same version and must still apply.
        let mut written: HashSet<(String, String)> = HashSet::new();
        for c in &e.changes {
            if c.op == Op::Truncate {
                exec::execute_all(tx, cache, &std::mem::take(&mut writes)).await?;
                let wm_key = (c.table.clone(), WATERMARK.to_string());
                if current.get(&wm_key).is_some_and(|w| w.version >= remote) {
                    continue;
                }
                truncate_older(tx, &c.table, remote, own_xid).await?;
                let tomb = RowVersion {
                    version: remote,
                    deleted: true,
                    xid: Some(own_xid),
                };
                for (k, v) in current.iter_mut() {
                    if k.0 == c.table && v.version < remote {
                        *v = tomb;
                    }
                }
                exists.retain(|k, _| {
                    k.0 != c.table || current.get(k).is_some_and(|v| v.version > remote)
                });
                current.insert(wm_key.clone(), tomb);
                touched.insert(wm_key, tomb);
                continue;
            }
            if c.pk.is_empty() {
                // Tables without a key: inserts replicate as they are.
                if let (Op::Insert, Some(row)) = (c.op, &c.new) {
                    writes.push(insert_op(&c.table, row));
                }
                continue;
            }
            let key = (c.table.clone(), c.key_json());
            let row = current.get(&key).copied();
            let watermark = current
                .get(&(c.table.clone(), WATERMARK.to_string()))
                .copied();
            // A TRUNCATE newer than the row's own version is the row's version.
            let local = match (row, watermark) {
                (Some(r), Some(w)) if w.version > r.version => Some(w),
                (None, w) => w,
                (r, _) => r,
            };
            let d = if written.contains(&key) {
                Decision {
                    winner: Winner::Remote,
                    duplicate: false,
                    conflict: false,
                }
            } else {
                decide(local.map(|v| v.version), remote, c.prev)
            };
            let here = exists.contains_key(&key);
            if d.conflict {
                let lv = local.expect("a conflict has a local version").version;
                conflicts.push(ConflictRow {
                    tbl: c.table.clone(),
                    pk: key.1.clone(),
                    local: lv,
                    remote,
                    remote_origin: e.origin.clone(),
                    remote_op: c.op,
                    winner: d.winner,
                });
            }
            match plan(c.op, d, here) {
                Action::Skip => {}
                Action::Insert => {
                    writes.push(insert_op(&c.table, c.new.as_deref().unwrap_or_default()));
                    exists.insert(key.clone(), (own_xid, 0));
                }
                Action::Update => {
                    let row = c.new.as_deref().unwrap_or_default();
                    let cols: Vec<&str> = row.iter().map(|(k, _)| k.as_str()).collect();
                    let pk: Vec<&str> = c.pk.iter().map(|(k, _)| k.as_str()).collect();
                    writes.push(exec::Op {
                        sql: sql::update(&c.table, &cols, &pk),
                        values: row.iter().chain(&c.pk).map(|(_, v)| v.clone()).collect(),
                    });
                }
                Action::Delete => {
                    let pk: Vec<&str> = c.pk.iter().map(|(k, _)| k.as_str()).collect();
                    writes.push(exec::Op {
                        sql: sql::delete(&c.table, &pk),
                        values: c.pk.iter().map(|(_, v)| v.clone()).collect(),
                    });
                    exists.remove(&key);
                }
            }
            if d.winner == Winner::Remote && !d.duplicate {
                let v = RowVersion {
                    version: remote,
                    deleted: c.op == Op::Delete,
                    xid: Some(own_xid),
                };
                current.insert(key.clone(), v);
                touched.insert(key.clone(), v);
                written.insert(key);
            }
        }
    }
    exec::execute_all(tx, cache, &writes).await?;
    versions::store(tx, &touched).await?;
    record_conflicts(tx, &conflicts, names).await?;
    Ok(conflicts.len())
}

fn insert_op(tbl: &str, row: &[(String, crate::event::Value)]) -> exec::Op {
    let cols: Vec<&str> = row.iter().map(|(k, _)| k.as_str()).collect();
    exec::Op {
        sql: sql::insert(tbl, &cols),
        values: row.iter().map(|(_, v)| v.clone()).collect(),
    }
}
