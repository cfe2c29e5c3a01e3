//! Resolving a set of remote events into the statements that apply them.
//!
//! [`plan_events`] locks every keyed row the events touch and reads the rows'
//! versions in one pipelined round trip (see `locks`), closes the capture race (waits
//! for capture when a locked row was written since its known version, then locks
//! again), then decides each change by last-writer-wins. It returns the writes, the
//! new versions, the versions they were decided against and the conflicts without
//! running them, so the caller can send them together with the rest of the batch's
//! bookkeeping in one more round trip. Only a replicated TRUNCATE runs inline,
//! because the rows it removes depend on the writes before it.
//!
//! A key that is absent when locked is not locked against a local insert: the caller
//! checks under the append lock, before it stores the new versions, that the ones
//! decided against are still stored ([`VERSIONS_UNCHANGED`]); capture raises a local
//! write that committed unseen before the batch above the batch's version (see
//! `versions::advance_local`).

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;
use std::time::Duration;

use futures::future::try_join;
use tokio_postgres::Client;
use tracing::debug;

use super::exec::{self, StatementCache};
use super::locks::{lock_rows, Locked};
use super::records::ConflictRow;
use super::truncate::truncate_older;
use super::{sql, ApplyError};
use crate::capture::Progress;
use crate::catalog::origin_id_for;
use crate::event::{ChangeEvent, Op, Value};
use crate::log::table::APPEND_LOCK;
use crate::log::versions::{RowVersion, VersionMap, WATERMARK};
use crate::pgoutput::Lsn;
use crate::resolve::{decide, plan, Action, Decision, Version, Winner};

/// The columns of [`XIDS`], for a statement that reads them with others (a batch's
/// origin setup does).
pub(super) const XIDS_COLUMNS: &str = "txid_current() % 4294967296,
     txid_current() - (SELECT init_txid FROM mesh.regions WHERE is_local)";

/// This transaction's (32-bit) xid, and how many xids were assigned since `pgmesh
/// init` (NULL before the catalog recorded it).
static XIDS: LazyLock<String> = LazyLock::new(|| format!("SELECT {XIDS_COLUMNS}"));

/// What [`XIDS`] returns.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Xids {
    /// This transaction's (32-bit) xid.
    pub own: i64,
    /// Xids assigned since `pgmesh init`.
    pub since_init: Option<i64>,
}

impl Xids {
    /// From a row whose columns `at` and `at + 1` are [`XIDS`]'s.
    pub fn from_row(r: &tokio_postgres::Row, at: usize) -> Self {
        Self {
            own: r.get(at),
            since_init: r.get(at + 1),
        }
    }
}

/// What applying a set of events takes, not yet run.
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// Row writes, in order.
    pub writes: Vec<exec::Op>,
    /// Versions the rows have afterwards.
    pub touched: VersionMap,
    /// For each key of `touched`, the stored version its first change was resolved
    /// against (None: no version), which must still be the stored one when `touched`
    /// is stored ([`VERSIONS_UNCHANGED`]).
    pub expected: HashMap<(String, String), Option<Version>>,
    pub conflicts: Vec<ConflictRow>,
    /// Whether a write inserts a keyed row that was absent when locked: a local
    /// insert and delete of that key could have committed since, unseen (see
    /// `Applier::scripted_body`).
    pub inserts_absent: bool,
}

/// Takes the change log's append lock (`$1`), then fails with 40001 unless every
/// key of `$2` tables, `$3` keys has the stored version `$4` hlc, `$5` origin (NULL:
/// none); see migration 15. Capture stores the versions of local writes under the
/// same lock, so after this no local write's version can land before the batch's.
pub const VERSIONS_UNCHANGED: &str =
    "SELECT mesh.versions_unchanged($1::int8, $2::text[], $3::text[], $4::int8[], $5::int2[])";

/// The parameters of [`VERSIONS_UNCHANGED`] for a plan's expected versions.
pub(super) struct ExpectedParams<'a> {
    tbl: Vec<&'a str>,
    pk: Vec<&'a str>,
    hlc: Vec<Option<i64>>,
    origin: Vec<Option<i16>>,
}

impl<'a> ExpectedParams<'a> {
    pub fn new(p: &'a Plan) -> Self {
        let mut out = Self {
            tbl: Vec::new(),
            pk: Vec::new(),
            hlc: Vec::new(),
            origin: Vec::new(),
        };
        for ((t, k), v) in &p.expected {
            out.tbl.push(t);
            out.pk.push(k);
            out.hlc.push(v.map(|v| v.hlc.as_u64() as i64));
            out.origin.push(v.map(|v| v.origin));
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.tbl.is_empty()
    }

    /// As SQL literals, for an `EXECUTE` (see `crate::script`).
    pub fn literals(&self) -> [String; 5] {
        [
            sql::quote(Some(&APPEND_LOCK.to_string())),
            sql::quote_array(&self.tbl),
            sql::quote_array(&self.pk),
            sql::quote_opt_array(&self.hlc),
            sql::quote_opt_array(&self.origin),
        ]
    }

    /// References in statement order.
    pub fn refs(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 5] {
        [&APPEND_LOCK, &self.tbl, &self.pk, &self.hlc, &self.origin]
    }
}

/// How many times [`plan_locked`] waits for capture before it gives the batch up
/// (to be tried again): each wait is followed by locking the rows again, and local
/// writers may keep writing them.
const MAX_CAPTURE_WAITS: usize = 10;

/// Whether a locked row may have been written by a local transaction that capture has
/// not logged yet: its xmin is not the xid of its known version, it exists without a
/// version and was written since `pgmesh init` (`since_init` xids ago), or it is
/// missing while its version says it lives.
fn stale(
    keys: &[(String, String)],
    exists: &HashMap<(String, String), (i64, i64)>,
    current: &VersionMap,
    since_init: Option<i64>,
) -> bool {
    keys.iter().any(|k| match (exists.get(k), current.get(k)) {
        // A row truncated here (its table's watermark is newer, or the same
        // transaction's: it wrote the row, then truncated) is not stale.
        (None, Some(v))
            if current
                .get(&(k.0.clone(), WATERMARK.to_string()))
                .is_some_and(|w| w.version >= v.version) =>
        {
            false
        }
        (Some((xmin, _)), Some(v)) => v.xid != Some(*xmin),
        (Some((_, age)), None) => since_init.is_none_or(|s| *age <= s),
        (None, Some(v)) => !v.deleted,
        (None, None) => false,
    })
}

/// Locks, waits for capture when it must, and resolves the changes of `events`.
/// TRUNCATEs run here; everything else is returned as a [`Plan`].
pub(super) async fn plan_events(
    tx: &Client,
    cache: &mut StatementCache,
    events: &[ChangeEvent],
    progress: Option<&mut Progress>,
    wait: Duration,
) -> Result<Plan, ApplyError> {
    let xids = cache.get(tx, &XIDS).await?;
    let (locked, row) = try_join(lock_rows(tx, cache, events), async {
        tx.query_one(&xids, &[]).await.map_err(ApplyError::from)
    })
    .await?;
    plan_locked(
        tx,
        cache,
        locked,
        Xids::from_row(&row, 0),
        events,
        progress,
        wait,
    )
    .await
}

/// [`plan_events`] after [`lock_rows`]: `locked` must cover every row of `events`
/// (it may cover more); `xids` are the transaction's.
pub(super) async fn plan_locked(
    tx: &Client,
    cache: &mut StatementCache,
    locked: Locked,
    xids: Xids,
    events: &[ChangeEvent],
    progress: Option<&mut Progress>,
    wait: Duration,
) -> Result<Plan, ApplyError> {
    let Locked {
        keys,
        mut exists,
        mut current,
    } = locked;
    let Xids {
        own: own_xid,
        since_init,
    } = xids;
    // The capture race: a local write that committed before we locked must count.
    // If every locked row was last written by the version we know of (its xmin
    // matches), or predates capture, nothing is uncaptured and we need not wait.
    if let Some(p) = progress {
        let mut waits = 0;
        loop {
            let stale = stale(&keys, &exists, &current, since_init);
            debug!(stale, rows = keys.len(), "capture race check");
            if !stale {
                break;
            }
            // The insert position, not the flush: a local transaction committed
            // asynchronously is visible before its commit record is flushed.
            let lsn: String = tx
                .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
                .await?
                .get(0);
            let lsn: Lsn = lsn.parse().unwrap_or(Lsn(u64::MAX));
            if waits == MAX_CAPTURE_WAITS || !p.wait_for(lsn, wait).await {
                return Err(ApplyError::CaptureBehind(lsn));
            }
            waits += 1;
            // Locked again, not only reloaded: a row inserted since the first lock
            // (whose version capture may have logged meanwhile) is locked now, and
            // the changes are resolved against it as it is.
            let again = lock_rows(tx, cache, events).await?;
            exists = again.exists;
            current = again.current;
        }
    }
    let mut out = Plan::default();
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
                exec::execute_all(tx, cache, &std::mem::take(&mut out.writes)).await?;
                let wm_key = (c.table.clone(), WATERMARK.to_string());
                // A watermark at this event's own version (no other write has it) is
                // its earlier TRUNCATE: this one removes what it wrote since.
                if current.get(&wm_key).is_some_and(|w| w.version > remote) {
                    continue;
                }
                // Older rows go, and so do the rows this event wrote before (they
                // carry its own version, which no other write has).
                let removed = |v: Version| v <= remote;
                // Rows this batch wrote newer than the TRUNCATE (an earlier event, in
                // a batch that arrived out of order) survive it, though their
                // versions are not stored yet.
                let keep: Vec<&str> = out
                    .touched
                    .iter()
                    .filter(|(k, v)| k.0 == c.table && k.1 != WATERMARK && !removed(v.version))
                    .map(|(k, _)| k.1.as_str())
                    .collect();
                truncate_older(tx, &c.table, remote, &keep, own_xid).await?;
                let tomb = RowVersion {
                    version: remote,
                    deleted: true,
                    xid: Some(own_xid),
                };
                // The watermark it resolved against, before it becomes this one.
                out.expected
                    .entry(wm_key.clone())
                    .or_insert(current.get(&wm_key).map(|v| v.version));
                for (k, v) in current.iter_mut() {
                    if k.0 == c.table && removed(v.version) {
                        *v = tomb;
                    }
                }
                // The batch's own versions of the table's rows, as `truncate_older`
                // left them: older ones are the tombstone now, stored (so the check
                // expects it) or to be stored.
                for (k, v) in out.touched.iter_mut() {
                    if k.0 == c.table && k.1 != WATERMARK && removed(v.version) {
                        *v = tomb;
                    }
                }
                for (k, e) in out.expected.iter_mut() {
                    if k.0 == c.table && k.1 != WATERMARK && e.is_some_and(|v| v < remote) {
                        *e = Some(remote);
                    }
                }
                exists.retain(|k, _| {
                    k.0 != c.table || current.get(k).is_some_and(|v| v.version > remote)
                });
                current.insert(wm_key.clone(), tomb);
                out.touched.insert(wm_key, tomb);
                continue;
            }
            if c.pk.is_empty() {
                // Tables without a key: inserts replicate as they are.
                if let (Op::Insert, Some(row)) = (c.op, &c.new) {
                    out.writes.push(insert_op(&c.table, row));
                }
                continue;
            }
            let key = (c.table.clone(), c.key_json());
            let row = current.get(&key).copied();
            let watermark = current
                .get(&(c.table.clone(), WATERMARK.to_string()))
                .copied();
            // A TRUNCATE newer than the row's own version (or of the transaction
            // that wrote it, after it) is the row's version.
            let local = match (row, watermark) {
                (Some(r), Some(w)) if w.version >= r.version => Some(w),
                (None, w) => w,
                (r, _) => r,
            };
            // The tombstone of this event's own TRUNCATE (TRUNCATE, then INSERT):
            // it carries the event's version, and the change after it applies.
            let own_tombstone = watermark.is_some_and(|w| w.version == remote)
                && local.is_some_and(|v| v.version == remote);
            let d = if written.contains(&key) || own_tombstone {
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
                out.conflicts.push(ConflictRow {
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
                    out.inserts_absent = true;
                    out.writes
                        .push(insert_op(&c.table, c.new.as_deref().unwrap_or_default()));
                    exists.insert(key.clone(), (own_xid, 0));
                }
                Action::Update => {
                    let row = c.new.as_deref().unwrap_or_default();
                    let cols: Vec<&str> = row.iter().map(|(k, _)| k.as_str()).collect();
                    let pk: Vec<&str> = c.pk.iter().map(|(k, _)| k.as_str()).collect();
                    out.writes.push(exec::Op {
                        sql: sql::update(&c.table, &cols, &pk),
                        values: row.iter().chain(&c.pk).map(|(_, v)| v.clone()).collect(),
                    });
                }
                Action::Delete => {
                    let pk: Vec<&str> = c.pk.iter().map(|(k, _)| k.as_str()).collect();
                    out.writes.push(exec::Op {
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
                out.expected
                    .entry(key.clone())
                    .or_insert(current.get(&key).map(|v| v.version));
                // And the table's watermark: a local TRUNCATE that capture logs
                // meanwhile must win over an older change written here.
                out.expected
                    .entry((c.table.clone(), WATERMARK.to_string()))
                    .or_insert(watermark.map(|w| w.version));
                current.insert(key.clone(), v);
                out.touched.insert(key.clone(), v);
                written.insert(key);
            }
        }
    }
    Ok(out)
}

fn insert_op(tbl: &str, row: &[(String, Value)]) -> exec::Op {
    let cols: Vec<&str> = row.iter().map(|(k, _)| k.as_str()).collect();
    exec::Op {
        sql: sql::insert(tbl, &cols),
        values: row.iter().map(|(_, v)| v.clone()).collect(),
    }
}
