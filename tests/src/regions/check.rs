//! What convergence is judged by: per-table checksums, rows as text, the
//! regions' own changes read back from `mesh.changelog`, and the
//! last-writer-wins prediction computed from them; plus a tiny HTTP GET for
//! `/metrics`.
//!
//! Everything here reads; nothing writes to a region or waits. Rows and keys are
//! rendered by PostgreSQL itself (`::text`, canonical jsonb), the same way the
//! change log stores them, so a prediction and a table can be compared without
//! pgmesh's own decoder.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use pgmesh_replicator::catalog::{origin_id_for, quote_ident};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::Client;

use super::Mesh;

/// How many event ids `(origin, hlc)` a change log holds more than once (0: none).
pub const LOGGED_TWICE: &str =
    "SELECT count(*) FROM (SELECT 1 FROM mesh.changelog GROUP BY origin, hlc HAVING count(*) > 1) d";

/// One row change of a region's own origin, read back from `mesh.changelog`.
#[derive(Debug, Clone)]
pub struct RowChange {
    pub origin: String,
    pub hlc: i64,
    /// Position of the change inside its event.
    pub ord: i64,
    /// `schema.table`.
    pub table: String,
    pub op: String,
    /// The key as canonical jsonb text, `[["id", "5"]]`.
    pub pk: String,
    pub new: Option<Vec<(String, Option<String>)>>,
}

/// Rows keyed by `(schema.table, key jsonb text)`: `None` is deleted.
pub type Expected = BTreeMap<(String, String), Option<Vec<(String, Option<String>)>>>;

impl Mesh {
    /// `count:md5` of every table in schema `public` of region `i`, rows in key
    /// order, keyed by `schema.table`.
    pub async fn checksums(&self, i: usize) -> Result<BTreeMap<String, String>> {
        let admin = &self.regions[i].admin;
        let mut out = BTreeMap::new();
        for t in tables(admin).await? {
            let (_, pk) = columns(admin, &t).await?;
            let order = if pk.is_empty() {
                "t::text".to_string()
            } else {
                pk.iter()
                    .map(|c| format!("t.{}", quote_ident(c)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let sql = format!(
                "SELECT count(*)::text || ':' || md5(coalesce(string_agg(t::text, ',' ORDER BY {order}), '')) FROM {t} t"
            );
            out.insert(t, admin.query_one(&sql, &[]).await?.get(0));
        }
        Ok(out)
    }

    /// Every row change region `i` originated, from its own change log.
    pub async fn own_changes(&self, i: usize) -> Result<Vec<RowChange>> {
        let r = &self.regions[i];
        let rows = r
            .admin
            .query(
                "SELECT c.origin, c.hlc, x.ord, x.e->>'table', x.e->>'op', (x.e->'pk')::text,
                        x.e ? 'new',
                        ARRAY(SELECT p->>0 FROM jsonb_array_elements(coalesce(x.e->'new', '[]')) WITH ORDINALITY k(p, o) ORDER BY o),
                        ARRAY(SELECT p->>1 FROM jsonb_array_elements(coalesce(x.e->'new', '[]')) WITH ORDINALITY k(p, o) ORDER BY o)
                 FROM mesh.changelog c CROSS JOIN LATERAL jsonb_array_elements(c.changes::jsonb) WITH ORDINALITY x(e, ord)
                 WHERE c.origin = $1 ORDER BY c.seq, x.ord",
                &[&r.name],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| {
                let names: Vec<String> = row.get(7);
                let values: Vec<Option<String>> = row.get(8);
                RowChange {
                    origin: row.get(0),
                    hlc: row.get(1),
                    ord: row.get(2),
                    table: row.get::<_, Option<String>>(3).unwrap_or_default(),
                    op: row.get::<_, Option<String>>(4).unwrap_or_default(),
                    pk: row.get::<_, Option<String>>(5).unwrap_or_default(),
                    new: row
                        .get::<_, bool>(6)
                        .then(|| names.into_iter().zip(values).collect()),
                }
            })
            .collect())
    }

    /// Every row as its key (canonical jsonb text, like the change log's) and its
    /// columns as text, for table `table` (`schema.table`) of region `i`.
    pub async fn rows(
        &self,
        i: usize,
        table: &str,
    ) -> Result<BTreeMap<String, Vec<(String, Option<String>)>>> {
        let admin = &self.regions[i].admin;
        let (cols, pk) = columns(admin, table).await?;
        let key = pk
            .iter()
            .map(|c| {
                format!(
                    "jsonb_build_array('{}', {}::text)",
                    c.replace('\'', "''"),
                    quote_ident(c)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let vals = cols
            .iter()
            .map(|c| format!("{}::text", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(", ");
        let sql =
            format!("SELECT jsonb_build_array({key})::text, ARRAY[{vals}]::text[] FROM {table}");
        let mut out = BTreeMap::new();
        for r in admin.query(&sql, &[]).await? {
            let values: Vec<Option<String>> = r.get(1);
            out.insert(r.get(0), cols.iter().cloned().zip(values).collect());
        }
        Ok(out)
    }

    /// Rows of region `i` that differ from the LWW prediction `expected`, for the
    /// tables it names, as human-readable lines (empty when all match). Rows not
    /// named by any change must not exist.
    pub async fn lww_mismatches(&self, i: usize, expected: &Expected) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let tables: BTreeSet<&String> = expected.keys().map(|(t, _)| t).collect();
        for t in tables {
            let actual = self.rows(i, t).await?;
            for ((tbl, key), want) in expected.range((t.clone(), String::new())..) {
                if tbl != t {
                    break;
                }
                let got = actual.get(key);
                let ok = match (want, got) {
                    (None, None) => true,
                    (Some(img), Some(row)) => img.iter().all(|c| row.contains(c)),
                    _ => false,
                };
                if !ok {
                    out.push(format!("{t} {key}: expected {want:?}, found {got:?}"));
                }
            }
            for key in actual.keys() {
                if !expected.contains_key(&(t.clone(), key.clone())) {
                    out.push(format!("{t} {key}: exists but no change wrote it"));
                }
            }
        }
        Ok(out)
    }

    /// The LWW prediction over every region's own changes, and every row of every
    /// region that differs from it (as `lww_mismatches` lines, prefixed with the
    /// region). Fails when no region originated anything.
    pub async fn lww_check(&self) -> Result<(Expected, Vec<String>)> {
        let mut changes = Vec::new();
        for i in 0..self.regions.len() {
            changes.extend(self.own_changes(i).await?);
        }
        anyhow::ensure!(!changes.is_empty(), "no region originated a change");
        let expected = predict_lww(&changes);
        let mut wrong = Vec::new();
        for (i, r) in self.regions.iter().enumerate() {
            for w in self.lww_mismatches(i, &expected).await? {
                wrong.push(format!("{}: {w}", r.name));
            }
        }
        Ok((expected, wrong))
    }

    /// [`LOGGED_TWICE`] in region `i`.
    pub async fn logged_twice(&self, i: usize) -> Result<i64> {
        Ok(self.regions[i]
            .admin
            .query_one(LOGGED_TWICE, &[])
            .await?
            .get(0))
    }

    /// The ids of `acked` that `sql` (one bigint column) does not return in region
    /// `i`: acknowledged writes that are missing there.
    pub async fn missing(&self, i: usize, sql: &str, acked: &BTreeSet<i64>) -> Result<Vec<i64>> {
        let present: BTreeSet<i64> = self.regions[i]
            .admin
            .query(sql, &[])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        Ok(acked.difference(&present).copied().collect())
    }
}

/// Last-writer-wins over the union of every region's own changes: per key, the
/// change with the highest `(hlc, origin_id)` decides (later changes of the same
/// event win over earlier ones).
pub fn predict_lww(changes: &[RowChange]) -> Expected {
    let mut sorted: Vec<&RowChange> = changes
        .iter()
        .filter(|c| matches!(c.op.as_str(), "insert" | "update" | "delete"))
        .collect();
    sorted.sort_by_key(|c| (c.hlc, origin_id_for(&c.origin), c.ord));
    let mut out = Expected::new();
    for c in sorted {
        let state = if c.op == "delete" {
            None
        } else {
            c.new.clone()
        };
        out.insert((c.table.clone(), c.pk.clone()), state);
    }
    out
}

/// `GET path` over plain HTTP/1.1; returns the status line and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(String, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .context("HTTP response timed out")??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    let status = head.lines().next().unwrap_or_default().to_string();
    Ok((status, body.to_string()))
}

/// `schema.table` of every table in schema `public`.
async fn tables(c: &Client) -> Result<Vec<String>> {
    let rows = c
        .query(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables
             WHERE schemaname = 'public' ORDER BY 1",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The columns (in order) and the primary-key columns (in key order) of `table`.
async fn columns(c: &Client, table: &str) -> Result<(Vec<String>, Vec<String>)> {
    let cols = c
        .query(
            "SELECT attname::text FROM pg_attribute
             WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&table],
        )
        .await?;
    let pk = c
        .query(
            "SELECT a.attname::text FROM pg_index i
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = $1::text::regclass AND i.indisprimary ORDER BY k.ord",
            &[&table],
        )
        .await?;
    Ok((
        cols.iter().map(|r| r.get(0)).collect(),
        pk.iter().map(|r| r.get(0)).collect(),
    ))
}
