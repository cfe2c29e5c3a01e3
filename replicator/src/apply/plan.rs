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
use std::sync::LazyLock;
use std::time::Duration;

use futures::future::try_join;
use tokio_postgres::{Client, SimpleQueryRow};
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
use crate::script::{self, Named, Script};

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
    pub conflicts: Vec<ConflictRow>,
}

/// Lock statements for the rows `events` touch, and the distinct keys.
struct RowLocks {
    /// Every distinct keyed row, as (table, key text).
    keys: Vec<(String, String)>,
    /// The statements: each returns one row (position, xmin, age(xmin)) per locked
    /// row that exists.
    ops: Vec<exec::Op>,
    /// For each statement, the index in `keys` of each position it may return.
    targets: Vec<Vec<usize>>,
}

/// Whether a key value can go into an array parameter as one element (arrays and
/// composite values would need their own literal syntax there).
fn plain_scalar(v: &Option<String>) -> bool {
    v.as_deref()
        .is_some_and(|s| !s.starts_with('{') && !s.starts_with('('))
}

/// A table, its key columns, and its rows to lock: (index in `keys`, key values).
type TableRows<'a> = (&'a str, Vec<&'a str>, Vec<(usize, &'a [(String, Value)])>);

/// One statement per table for the rows of a one-column key (`sql::lock_many`),
/// else one per row.
fn row_locks(events: &[ChangeEvent]) -> RowLocks {
    let mut out = RowLocks {
        keys: Vec::new(),
        ops: Vec::new(),
        targets: Vec::new(),
    };
    // Per table, in order of first appearance: the key column names and the rows.
    let mut tables: Vec<TableRows<'_>> = Vec::new();
    let mut seen: HashSet<(String, String)> = HashSet::new();
    for c in events.iter().flat_map(|e| &e.changes) {
        if c.pk.is_empty() || !matches!(c.op, Op::Insert | Op::Update | Op::Delete) {
            continue;
        }
        let key = (c.table.clone(), c.key_json());
        if !seen.insert(key.clone()) {
            continue;
        }
        let cols: Vec<&str> = c.pk.iter().map(|(k, _)| k.as_str()).collect();
        let i = match tables.iter().position(|t| t.0 == c.table && t.1 == cols) {
            Some(i) => i,
            None => {
                tables.push((&c.table, cols, Vec::new()));
                tables.len() - 1
            }
        };
        tables[i].2.push((out.keys.len(), &c.pk));
        out.keys.push(key);
    }
    for (tbl, cols, rows) in tables {
        let many =
            cols.len() == 1 && rows.len() > 1 && rows.iter().all(|r| plain_scalar(&r.1[0].1));
        if many {
            let values: Vec<&Value> = rows.iter().map(|r| &r.1[0].1).collect();
            out.ops.push(exec::Op {
                sql: sql::lock_many(tbl, cols[0]),
                values: vec![Some(sql::array_literal(&values))],
            });
            out.targets.push(rows.iter().map(|r| r.0).collect());
        } else {
            for (k, pk) in rows {
                out.ops.push(exec::Op {
                    sql: sql::lock(tbl, &cols),
                    values: pk.iter().map(|(_, v)| v.clone()).collect(),
                });
                out.targets.push(vec![k]);
            }
        }
    }
    out
}

/// The rows a set of events touches, locked, with what the database knew of them.
#[derive(Debug, Default)]
pub(super) struct Locked {
    /// Keyed rows, in lock order.
    keys: Vec<(String, String)>,
    /// `keys` plus each table's TRUNCATE watermark.
    vkeys: Vec<(String, String)>,
    /// key -> (xmin, age(xmin)) of the locked rows that exist.
    exists: HashMap<(String, String), (i64, i64)>,
    /// Versions of `vkeys`, read after the locks.
    current: VersionMap,
}

/// What locking the rows of a set of events takes: the statements, and how to read
/// their answers.
struct LockRequest {
    keys: Vec<(String, String)>,
    /// `keys` plus each table's TRUNCATE watermark.
    vkeys: Vec<(String, String)>,
    ops: Vec<exec::Op>,
    targets: Vec<Vec<usize>>,
}

impl LockRequest {
    fn new(events: &[ChangeEvent]) -> Self {
        let RowLocks { keys, ops, targets } = row_locks(events);
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
        Self {
            keys,
            vkeys,
            ops,
            targets,
        }
    }

    /// The locked rows from each lock statement's rows (position, xmin, age), and
    /// the versions read after them.
    fn finish(self, locked: Vec<Vec<Vec<i64>>>, current: VersionMap) -> Result<Locked, ApplyError> {
        let mut exists = HashMap::new();
        for (rows, target) in locked.into_iter().zip(&self.targets) {
            for r in rows {
                // Position 1-based in the statement's array (always 1 for one row).
                let k = usize::try_from(r[0] - 1)
                    .ok()
                    .and_then(|p| target.get(p))
                    .ok_or_else(|| {
                        ApplyError::Internal(format!("lock returned position {}", r[0]))
                    })?;
                exists.insert(self.keys[*k].clone(), (r[1], r[2]));
            }
        }
        Ok(Locked {
            keys: self.keys,
            vkeys: self.vkeys,
            exists,
            current,
        })
    }
}

/// Locks every keyed row `events` touch and reads their versions and each table's
/// TRUNCATE watermark: one round trip, sent on the first poll (after any statements
/// still to prepare), so it pipelines behind whatever the caller sent before.
pub(super) async fn lock_rows(
    tx: &Client,
    cache: &mut StatementCache,
    events: &[ChangeEvent],
) -> Result<Locked, ApplyError> {
    let req = LockRequest::new(events);
    let keys = cache.get(tx, KEY_LOCKS).await?;
    let [tbls, pks] = versions::key_arrays(&req.vkeys);
    tx.query_one(&keys, &[&tbls, &pks]).await?;
    let lock_stmts = exec::prepare_all(tx, cache, &req.ops).await?;
    let load = cache.get(tx, versions::LOAD).await?;
    // The locks run first, so the versions read are the locked rows'.
    let (locked, current) = try_join(
        exec::query_all_run(tx, &lock_stmts, &req.ops),
        versions::load(tx, &load, &req.vkeys),
    )
    .await?;
    req.finish(locked, current)
}

/// Transaction advisory locks on every (table, key) of `$1`, `$2` (as
/// [`versions::LOAD`] takes them), in one order. Row locks cover only rows that
/// exist; these also cover absent ones, so two apply sessions (two links) never decide
/// on the same key at once: one inserting a row the other has already read as absent
/// would leave a row under the other's tombstone. Two-key advisory locks, apart from
/// pgmesh's one-key ones (leader, append).
pub const KEY_LOCKS: &str = "SELECT count(pg_advisory_xact_lock(1885826416, k))
     FROM (SELECT DISTINCT hashtext(t || chr(31) || p) AS k
           FROM unnest($1::text[], $2::text[]) AS u(t, p) ORDER BY 1) s";

/// [`lock_rows`] as statements of a script, read back by [`ScriptedLocks::finish`].
pub(super) struct ScriptedLocks {
    req: LockRequest,
    /// Position of each lock statement in the script, then of the versions' read.
    at: Vec<usize>,
    load: usize,
}

impl ScriptedLocks {
    /// Adds the locks and the versions' read to `script` (preparing what is new).
    pub async fn push(
        tx: &Client,
        named: &mut Named,
        script: &mut Script,
        events: &[ChangeEvent],
    ) -> Result<Self, ApplyError> {
        let req = LockRequest::new(events);
        let name = named.get(tx, KEY_LOCKS).await?;
        script.execute(&name, &versions::load_literals(&req.vkeys));
        let mut at = Vec::with_capacity(req.ops.len());
        for op in &req.ops {
            let name = named.get(tx, &op.sql).await?;
            at.push(script.execute_text(&name, op.values.iter().map(|v| v.as_deref())));
        }
        let name = named.get(tx, versions::LOAD).await?;
        let load = script.execute(&name, &versions::load_literals(&req.vkeys));
        Ok(Self { req, at, load })
    }

    /// What the script's statements returned, as [`lock_rows`] would.
    pub fn finish(self, results: &[Vec<SimpleQueryRow>]) -> Result<Locked, ApplyError> {
        let rows = |i: usize| {
            results
                .get(i)
                .ok_or_else(|| ApplyError::Internal(format!("script has no statement {i}")))
        };
        let mut locked = Vec::with_capacity(self.at.len());
        for &i in &self.at {
            locked.push(
                rows(i)?
                    .iter()
                    .map(|r| (0..3).map(|c| script::int(r, c)).collect())
                    .collect(),
            );
        }
        let current = versions::from_text_rows(rows(self.load)?);
        self.req.finish(locked, current)
    }
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
        vkeys,
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
            // The insert position, not the flush: a local transaction committed
            // asynchronously is visible before its commit record is flushed.
            let lsn: String = tx
                .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
                .await?
                .get(0);
            let lsn: Lsn = lsn.parse().unwrap_or(Lsn(u64::MAX));
            if !p.wait_for(lsn, wait).await {
                return Err(ApplyError::CaptureBehind(lsn));
            }
            let load = cache.get(tx, versions::LOAD).await?;
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
    Ok(out)
}

fn insert_op(tbl: &str, row: &[(String, Value)]) -> exec::Op {
    let cols: Vec<&str> = row.iter().map(|(k, _)| k.as_str()).collect();
    exec::Op {
        sql: sql::insert(tbl, &cols),
        values: row.iter().map(|(_, v)| v.clone()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Change;
    use crate::hlc::Hlc;

    fn change(table: &str, pk: &[(&str, &str)]) -> Change {
        let pk: Vec<(String, Value)> = pk
            .iter()
            .map(|(k, v)| (k.to_string(), Some(v.to_string())))
            .collect();
        Change {
            table: table.into(),
            op: Op::Update,
            pk: pk.clone(),
            old: None,
            new: Some(pk),
            unchanged: vec![],
            types: vec![],
            prev: None,
        }
    }

    #[test]
    fn one_lock_per_table_with_a_one_column_key_else_one_per_row() {
        let event = ChangeEvent {
            origin: "r1".into(),
            hlc: Hlc::from_u64(1),
            source_lsn: 1,
            xid: 1,
            commit_ts_us: 0,
            stamp: None,
            local_only: false,
            changes: vec![
                change("a", &[("id", "1")]),
                change("b", &[("x", "1"), ("y", "2")]),
                change("a", &[("id", "2")]),
                change("a", &[("id", "1")]),
                change("b", &[("x", "3"), ("y", "4")]),
                change("c", &[("id", "7")]),
                change("d", &[("id", "{1,2}")]),
                change("d", &[("id", "{3}")]),
            ],
        };
        let l = row_locks(std::slice::from_ref(&event));
        let keys: Vec<&str> = l.keys.iter().map(|k| k.0.as_str()).collect();
        assert_eq!(keys, ["a", "b", "a", "b", "c", "d", "d"], "distinct rows");
        let sqls: Vec<bool> = l.ops.iter().map(|o| o.sql.contains("ANY")).collect();
        // a: one statement for both rows; b (two key columns), c (one row) and d
        // (array values) one per row.
        assert_eq!(sqls, [true, false, false, false, false, false]);
        assert_eq!(l.ops[0].values, vec![Some(r#"{"1","2"}"#.to_string())]);
        assert_eq!(
            l.targets,
            vec![vec![0, 2], vec![1], vec![3], vec![4], vec![5], vec![6]]
        );
    }
}
