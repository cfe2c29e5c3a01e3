//! Row versions of local changes, kept in `mesh.row_versions` by capture.
//!
//! When capture logs local events it also records, in the same transaction, the
//! version each changed row now has, and stamps every change with the version it
//! overwrote (`prev`), so a peer can tell a concurrent write (a real conflict) from a
//! write that saw the previous one. This module only reads and upserts versions.

use std::collections::HashMap;

use tokio_postgres::{GenericClient, SimpleQueryRow, Statement};

use crate::apply::sql::{quote_array, quote_opt_array};
use crate::catalog::origin_id_for;
use crate::event::{ChangeEvent, Op};
use crate::hlc::Hlc;
use crate::resolve::Version;
use crate::script;

/// What `mesh.row_versions` says about one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowVersion {
    pub version: Version,
    /// The row was deleted (a tombstone).
    pub deleted: bool,
    /// The (32-bit) xid of the transaction that wrote this version here, when known:
    /// a row whose `xmin` differs was written since.
    pub xid: Option<i64>,
}

/// Key json of a table's TRUNCATE watermark: every change older than it loses.
pub const WATERMARK: &str = "\"*\"";

/// Versions of rows keyed by `(table, key json)`.
pub type VersionMap = HashMap<(String, String), RowVersion>;

/// Reads versions: `$1` tables, `$2` key texts (see `Change::key_json`). The LIMIT keeps the lookup a
/// per-key index probe: as a plain join, a cached generic plan (which knows neither
/// the array's length nor the table's current size) can turn into a full scan.
pub const LOAD: &str = "SELECT k.tbl, k.pk, v.hlc, v.origin, v.deleted, v.xid
     FROM unnest($1::text[], $2::text[]) AS k(tbl, pk),
     LATERAL (SELECT r.hlc, r.origin, r.deleted, r.xid FROM mesh.row_versions r
              WHERE r.tbl = k.tbl AND r.pk = k.pk LIMIT 1) v";

/// Upserts versions from arrays (see [`StoreParams`]).
pub const STORE: &str = "INSERT INTO mesh.row_versions (tbl, pk, hlc, origin, deleted, xid)
     SELECT t, k, h, o, d, x
     FROM unnest($1::text[], $2::text[], $3::int8[], $4::int2[], $5::bool[], $6::int8[]) AS u(t, k, h, o, d, x)
     ON CONFLICT (tbl, pk) DO UPDATE SET hlc = excluded.hlc, origin = excluded.origin,
         deleted = excluded.deleted, xid = excluded.xid";

/// Reads the current versions of the given keys with `st`, the prepared [`LOAD`].
/// The request is sent on the first poll, so it pipelines with other statements.
pub async fn load<C: GenericClient>(
    c: &C,
    st: &Statement,
    keys: &[(String, String)],
) -> Result<VersionMap, tokio_postgres::Error> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let tbls: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    let pks: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
    let rows = c.query(st, &[&tbls, &pks]).await?;
    Ok(rows
        .iter()
        .map(|r| entry(r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect())
}

/// One row of [`LOAD`]: the key and its version.
fn entry(
    tbl: String,
    pk: String,
    hlc: i64,
    origin: i16,
    deleted: bool,
    xid: Option<i64>,
) -> ((String, String), RowVersion) {
    let version = Version {
        hlc: Hlc::from_u64(hlc as u64),
        origin,
    };
    (
        (tbl, pk),
        RowVersion {
            version,
            deleted,
            xid,
        },
    )
}

/// The tables and keys of `keys` as the two arrays [`LOAD`] takes.
pub fn key_arrays(keys: &[(String, String)]) -> [Vec<&str>; 2] {
    [
        keys.iter().map(|k| k.0.as_str()).collect(),
        keys.iter().map(|k| k.1.as_str()).collect(),
    ]
}

/// The values of [`LOAD`] for `keys`, as SQL literals for an `EXECUTE` (see
/// `crate::script`).
pub fn load_literals(keys: &[(String, String)]) -> [String; 2] {
    let [tbls, pks] = key_arrays(keys);
    [quote_array(&tbls), quote_array(&pks)]
}

/// What [`LOAD`] returned, as text rows of a script: what [`load`] returns.
pub fn from_text_rows(rows: &[SimpleQueryRow]) -> VersionMap {
    rows.iter()
        .map(|r| {
            entry(
                r.get(0).unwrap_or_default().to_string(),
                r.get(1).unwrap_or_default().to_string(),
                script::int(r, 2),
                script::int(r, 3) as i16,
                script::boolean(r, 4),
                script::opt_int(r, 5),
            )
        })
        .collect()
}

/// The parameters of [`STORE`] for a set of versions.
#[derive(Debug, Default)]
pub struct StoreParams<'a> {
    tbl: Vec<&'a str>,
    pk: Vec<&'a str>,
    hlc: Vec<i64>,
    origin: Vec<i16>,
    deleted: Vec<bool>,
    xid: Vec<Option<i64>>,
}

impl<'a> StoreParams<'a> {
    /// The arrays that store `versions`.
    pub fn new(versions: &'a VersionMap) -> Self {
        let mut p = Self::default();
        for ((t, k), v) in versions {
            p.tbl.push(t.as_str());
            p.pk.push(k.as_str());
            p.hlc.push(v.version.hlc.as_u64() as i64);
            p.origin.push(v.version.origin);
            p.deleted.push(v.deleted);
            p.xid.push(v.xid);
        }
        p
    }

    /// [`Self::refs`] as SQL literals, for an `EXECUTE` (see `crate::script`).
    pub fn literals(&self) -> Vec<String> {
        vec![
            quote_array(&self.tbl),
            quote_array(&self.pk),
            quote_array(&self.hlc),
            quote_array(&self.origin),
            quote_array(&self.deleted),
            quote_opt_array(&self.xid),
        ]
    }

    /// References in statement order.
    pub fn refs(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 6] {
        [
            &self.tbl,
            &self.pk,
            &self.hlc,
            &self.origin,
            &self.deleted,
            &self.xid,
        ]
    }
}

/// Upserts `versions` with `st`, the prepared [`STORE`] (nothing when empty).
pub async fn store<C: GenericClient>(
    c: &C,
    st: &Statement,
    versions: &VersionMap,
) -> Result<(), tokio_postgres::Error> {
    if versions.is_empty() {
        return Ok(());
    }
    c.execute(st, &StoreParams::new(versions).refs()).await?;
    Ok(())
}

/// The keys of every row change in `events`, and the TRUNCATE watermark of each
/// table they change.
pub fn keys_of(events: &[ChangeEvent]) -> Vec<(String, String)> {
    let mut keys: Vec<(String, String)> = Vec::new();
    for c in events.iter().flat_map(|e| e.changes.iter()) {
        if keyed(c) {
            keys.push((c.table.clone(), c.key_json()));
        }
        if keyed(c) || c.op == Op::Truncate {
            keys.push((c.table.clone(), WATERMARK.to_string()));
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

/// A row change with a key (not a TRUNCATE, nor a change of a keyless table).
fn keyed(c: &crate::event::Change) -> bool {
    !c.pk.is_empty() && matches!(c.op, Op::Insert | Op::Update | Op::Delete)
}

/// Stamps each local change with the version it overwrote and returns the versions
/// the rows have afterwards (only the touched keys). `current` holds the stored
/// versions of [`keys_of`]`(events)`.
///
/// A stored version newer than the event means a remote change was applied after
/// the local write committed, without seeing it (apply waits for capture on every
/// row it finds written since its version, so it saw no such row):
/// - A tombstone (not a TRUNCATE's): the key was absent when apply locked it and
///   the local write an insert still uncommitted then, and apply wrote no row (a
///   delete of an absent row leaves only a tombstone). The local row stands here on
///   top of it, so it must win everywhere: the event gets an HLC above it (and the
///   events after it above that). The caller raises its HLC clock to the last
///   event's.
/// - A live version, or a TRUNCATE's tombstone: apply's write (an insert into a key
///   the local writes had left absent, or the TRUNCATE's delete) stands here on top
///   of the local one, and is newer, as it is everywhere. The stored version stays.
pub fn advance_local(events: &mut [ChangeEvent], mut current: VersionMap) -> VersionMap {
    let mut touched: VersionMap = HashMap::new();
    let mut last = Hlc::ZERO;
    for e in events.iter_mut() {
        let under = e
            .changes
            .iter()
            .filter(|c| keyed(c))
            .filter_map(|c| {
                let v = current.get(&(c.table.clone(), c.key_json()))?;
                let wm = current.get(&(c.table.clone(), WATERMARK.to_string()));
                let truncated = wm.is_some_and(|w| w.version == v.version);
                (v.deleted && !truncated).then_some(v.version.hlc)
            })
            .max();
        if let Some(under) = under.filter(|u| *u >= e.hlc) {
            e.hlc = under.saturating_next();
        }
        if e.hlc <= last {
            e.hlc = last.saturating_next();
        }
        last = e.hlc;
        let version = Version {
            hlc: e.hlc,
            origin: origin_id_for(&e.origin),
        };
        for c in e.changes.iter_mut() {
            if c.op == Op::Truncate {
                // Rows this transaction wrote before it truncated their table are gone.
                for (k, v) in touched.iter_mut() {
                    if k.0 == c.table && k.1 != WATERMARK && v.version == version {
                        v.deleted = true;
                        current.insert(k.clone(), *v);
                    }
                }
            }
            let key = match c.op {
                Op::Truncate => (c.table.clone(), WATERMARK.to_string()),
                _ if keyed(c) => (c.table.clone(), c.key_json()),
                _ => continue,
            };
            let stored = current.get(&key).copied();
            if c.op != Op::Truncate {
                c.prev = stored.map(|v| v.version);
            }
            if stored.is_some_and(|v| v.version > version) {
                continue;
            }
            let next = RowVersion {
                version,
                deleted: matches!(c.op, Op::Delete | Op::Truncate),
                xid: Some(e.xid as i64),
            };
            current.insert(key.clone(), next);
            touched.insert(key, next);
        }
    }
    touched
}

#[cfg(test)]
#[path = "versions_tests.rs"]
mod tests;
