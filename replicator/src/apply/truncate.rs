//! A replicated TRUNCATE, resolved by last-writer-wins: the TRUNCATE becomes the
//! table's watermark version and removes only the rows older than it.

use tokio_postgres::Client;

use super::{sql, ApplyError};
use crate::resolve::Version;

/// A replicated TRUNCATE at version `v`: deletes every row of `tbl` whose stored
/// version is not newer (or unknown: rows the same batch wrote, their versions not
/// stored yet, go too), but for the rows keyed `keep` (`mesh.row_versions.pk` text:
/// written newer than `v` by the same batch), and turns the older stored versions
/// into tombstones at `v`. Rows written after the TRUNCATE survive, as they would
/// anywhere else, so the result does not depend on arrival order.
pub(super) async fn truncate_older(
    tx: &Client,
    tbl: &str,
    v: Version,
    keep: &[&str],
    own_xid: i64,
) -> Result<(), ApplyError> {
    // The replica identity's columns, in attribute order, as capture keys rows.
    let pk: Vec<String> = tx
        .query(
            "SELECT a.attname FROM pg_class c
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
                                  AND NOT a.attisdropped AND a.attgenerated = ''
              WHERE c.oid = $1::text::regclass
                AND (c.relreplident = 'f'
                     OR a.attnum = ANY (ARRAY(
                          SELECT unnest(i.indkey::int2[]) FROM pg_index i
                           WHERE i.indrelid = c.oid
                             AND CASE c.relreplident WHEN 'd' THEN i.indisprimary
                                                     WHEN 'i' THEN i.indisreplident
                                                     ELSE false END)))
              ORDER BY a.attnum",
            &[&sql::table(tbl)],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let hlc = v.hlc.as_u64() as i64;
    if pk.is_empty() {
        tx.batch_execute(&format!("DELETE FROM {}", sql::table(tbl)))
            .await?;
        return Ok(());
    }
    let key = pk
        .iter()
        .map(|c| {
            // `format`: the type's output function, as capture prints keys (a
            // cast to text would trim char(n) and spell booleans out).
            format!(
                "jsonb_build_array({}, format('%s', x.{}))",
                literal_text(c),
                sql::ident(c)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    tx.execute(
        &format!(
            "DELETE FROM {} x WHERE jsonb_build_array({key})::text <> ALL($4::text[])
               AND NOT EXISTS (
                SELECT 1 FROM mesh.row_versions v
                WHERE v.tbl = $1 AND v.pk = jsonb_build_array({key})::text AND (v.hlc, v.origin) > ($2::int8, $3::int2))",
            sql::table(tbl)
        ),
        &[&tbl, &hlc, &v.origin, &keep],
    )
    .await?;
    // The kept rows' stored versions are older too: they become the tombstone here,
    // as the check expects, and the batch stores their new versions over it.
    tx.execute(
        "UPDATE mesh.row_versions SET hlc = $2, origin = $3, deleted = true, xid = $4
         WHERE tbl = $1 AND pk LIKE '[%' AND (hlc, origin) < ($2::int8, $3::int2)",
        &[&tbl, &hlc, &v.origin, &own_xid],
    )
    .await?;
    Ok(())
}

/// A string as a SQL literal (identifiers in generated SQL text).
fn literal_text(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
