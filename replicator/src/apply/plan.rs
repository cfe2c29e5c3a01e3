//! Resolving a set of remote events into the statements that apply them.
//!
//! [`plan_events`] locks every keyed row the events touch and reads the rows'
//! versions in one pipelined round trip, closes the capture race (waits for capture
//! when a locked row was written since its known version), then decides each change
//! by last-writer-wins. It returns the writes, the new versions and the conflicts
//! without running them, so the caller can send them together with the rest of the
//! batch's bookkeeping in one more round trip. Only a replicated TRUNCATE runs
//! inline, because the rows it removes depend on the writes before it.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::future::try_join3;
use tokio_postgres::{Client, Statement};
use tracing::debug;

use super::exec::{self, StatementCache};
use super::records::ConflictRow;
use super::truncate::truncate_older;
use super::{sql, ApplyError};
use crate::capture::Progress;
use crate::catalog::origin_id_for;
use crate::event::{ChangeEvent, Op, Value};
use crate::log::versions::{self, RowVersion, VersionMap, WATERMARK};
use crate::pgoutput::Lsn;
use crate::resolve::{decide, plan, Action, Decision, Version, Winner};

/// This transaction's (32-bit) xid, and how many xids were assigned since `pgmesh
/// init` (NULL before the catalog recorded it).
const XIDS: &str = "SELECT txid_current() % 4294967296,
     txid_current() - (SELECT init_txid FROM mesh.regions WHERE is_local)";

/// What applying a set of events takes, not yet run.
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// Row writes, in order.
    pub writes: Vec<exec::Op>,
    /// The prepared statement of each write.
    pub stmts: Vec<Statement>,
    /// Versions the rows have afterwards.
    pub touched: VersionMap,
    pub conflicts: Vec<ConflictRow>,
}

/// The rows `events` touch: one lock statement per distinct keyed row, and its key.
fn row_locks(events: &[ChangeEvent]) -> (Vec<(String, String)>, Vec<exec::Op>) {
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
    (keys, locks)
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
    let (keys, locks) = row_locks(events);
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
    let lock_stmts = exec::prepare_all(tx, cache, &locks).await?;
    let load = cache.get(tx, versions::LOAD).await?;
    let xids = cache.get(tx, XIDS).await?;
    // One round trip: the locks run first, so the versions read are the locked rows'.
    let (locked, mut current, xid_row) = try_join3(
        exec::query_first_run(tx, &lock_stmts, &locks),
        versions::load(tx, &load, &vkeys),
        tx.query_one(&xids, &[]),
    )
    .await?;
    let own_xid: i64 = xid_row.get(0);
    let since_init: Option<i64> = xid_row.get(1);
    // key -> (xmin, age(xmin)) of rows that exist.
    let mut exists: HashMap<(String, String), (i64, i64)> = HashMap::new();
    for (key, row) in keys.iter().zip(locked) {
        if let Some(r) = row {
            exists.insert(key.clone(), (r[0], r[1]));
        }
    }
    // The capture race: a local write that committed before we locked must count.
    // If every locked row was last written by the version we know of (its xmin
    // matches), or predates capture, nothing is uncaptured and we need not wait.
    if let Some(p) = progress {
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
            current = versions::load(tx, &load, &vkeys).await?;
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
                current.insert(key.clone(), v);
                out.touched.insert(key.clone(), v);
                written.insert(key);
            }
        }
    }
    out.stmts = exec::prepare_all(tx, cache, &out.writes).await?;
    Ok(out)
}

fn insert_op(tbl: &str, row: &[(String, Value)]) -> exec::Op {
    let cols: Vec<&str> = row.iter().map(|(k, _)| k.as_str()).collect();
    exec::Op {
        sql: sql::insert(tbl, &cols),
        values: row.iter().map(|(_, v)| v.clone()).collect(),
    }
}
