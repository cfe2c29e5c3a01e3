//! Locking the rows a set of remote events touches, and reading their versions.
//!
//! Every keyed row is locked: existing rows with `FOR UPDATE` (one statement per table
//! for a one-column key, else one per row), and every key, present or not, with a
//! transaction advisory lock ([`KEY_LOCKS`]), so two apply sessions never decide on
//! the same key at once. The versions are read after the locks, in the same round
//! trip.

use std::collections::{HashMap, HashSet};

use futures::future::try_join;
use tokio_postgres::{Client, SimpleQueryRow};

use super::exec::{self, StatementCache};
use super::{sql, ApplyError};
use crate::event::{ChangeEvent, Op, Value};
use crate::log::versions::{self, VersionMap, WATERMARK};
use crate::script::{self, Named, Script};

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
    pub keys: Vec<(String, String)>,
    /// key -> (xmin, age(xmin)) of the locked rows that exist.
    pub exists: HashMap<(String, String), (i64, i64)>,
    /// Versions of the keys and the tables' watermarks, read after the locks.
    pub current: VersionMap,
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
