//! Value round-trips: what capture stores is PostgreSQL's own text of each
//! value, bit for bit.
//!
//! Rows with awkward values (huge and special numerics, timestamptz at the
//! edges, jsonb, every byte in a bytea, non-ASCII text and emoji, arrays with
//! quotes, commas and NULLs, NULL columns, a TOASTed text) are written through a
//! stamping proxy. Each captured new-image value must equal a direct
//! `SELECT col::text` of the committed row and be stored as a JSON string, the
//! type OIDs must be the columns' own, and a TOASTed value that an UPDATE left
//! alone must be named in `unchanged` instead of appearing as a value. This
//! module owns those comparisons.

use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};
use pgmesh_tests::mesh::{LogChange, Region};
use pgmesh_tests::{connect, ClusterOptions};

const COLUMNS: &[&str] = &[
    "id", "num", "ts", "js", "by", "tx", "ia", "ta", "f8", "iv", "u", "nothing", "big",
];

pub(crate) const SCHEMA: &str = "
CREATE TABLE vals (
  id int PRIMARY KEY, num numeric, ts timestamptz, js jsonb, by bytea, tx text,
  ia int[], ta text[], f8 float8, iv interval, u uuid, nothing text, big text);
ALTER TABLE vals ALTER COLUMN big SET STORAGE EXTERNAL;";

/// A 64 KiB text that is stored out of line (STORAGE EXTERNAL, no compression).
const BIG: &str = "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 2000) g)";

pub(crate) const ROWS: &[&str] = &[
    r#"INSERT INTO vals VALUES (1,
      '123456789012345678901234567890123456789.000000000000000000000000000000000000001',
      '2024-02-29 23:59:59.999999+00',
      '{"a": [1, 2.50, "x"], "b": null, "c": {"d": "é🎉"}, "big": 123456789012345678901234567890.5}',
      decode((SELECT string_agg(lpad(to_hex(g), 2, '0'), '') FROM generate_series(0, 255) g), 'hex'),
      E'naïve café — 日本語 🎉👍🏽 "q" \\ back\nline2\ttab',
      '{1,-2,NULL,2147483647}',
      ARRAY['a,b', 'quote"d', 'back\slash', NULL, '', 'NULL', ' spaced ', '{brace}', 'ü🎉'],
      0.1::float8 + 0.2::float8,
      '1 year 2 mons 3 days 04:05:06.789',
      'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
      NULL, (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 2000) g))"#,
    "INSERT INTO vals (id) VALUES (2)",
    r#"INSERT INTO vals VALUES (3, 'NaN', 'infinity', '[]', '\x', '', '{{1,2},{3,4}}', '{}',
      'NaN', '-177999999 years', '00000000-0000-0000-0000-000000000000', NULL, NULL)"#,
    r#"INSERT INTO vals VALUES (4, '-0.000000000000000000000000000001', '-infinity',
      '"just a string with \u00e9"', '\x00', ' ', '{}', '{"",NULL}', '-1.7976931348623157e308',
      '-00:00:00.000001', 'ffffffff-ffff-ffff-ffff-ffffffffffff', NULL, 'short')"#,
    r#"INSERT INTO vals VALUES (5, 'Infinity', '1999-12-31 23:59:59.5-08', 'null', NULL, NULL,
      NULL, NULL, '-0', NULL, NULL, NULL, NULL)"#,
];

/// `SELECT col::text` of every column of every row, as committed now.
async fn snapshot(region: &Region) -> Result<BTreeMap<(i32, &'static str), Option<String>>> {
    let mut out = BTreeMap::new();
    // Capture prints timestamptz in UTC (so keys print alike in every region);
    // read the rows the same way. The instants are what must be equal.
    region.admin.batch_execute("SET TimeZone = 'UTC'").await?;
    for col in COLUMNS {
        let rows = region
            .admin
            .query(&format!("SELECT id, {col}::text FROM vals"), &[])
            .await?;
        for r in rows {
            out.insert((r.get(0), *col), r.get(1));
        }
    }
    Ok(out)
}

/// Compare each captured value of `change` with the snapshot of row `id`;
/// `skip` names columns expected in `unchanged` instead.
fn compare_row(
    snap: &BTreeMap<(i32, &'static str), Option<String>>,
    change: &LogChange,
    id: i32,
    skip: &[&str],
) -> Vec<String> {
    let mut problems = Vec::new();
    if !change.values_are_text {
        problems.push(format!(
            "id {id}: a value is stored as a non-string JSON value"
        ));
    }
    let short = |v: &Option<String>| {
        v.as_deref()
            .map(|s| s.chars().take(120).collect::<String>())
    };
    for col in COLUMNS {
        let direct = snap.get(&(id, *col)).cloned().flatten();
        let captured = change.new_value(col);
        if skip.contains(col) {
            if captured.is_some() {
                problems.push(format!("id {id}: {col} should be unchanged, not a value"));
            }
            if !change.unchanged.iter().any(|u| u == col) {
                problems.push(format!(
                    "id {id}: {col} missing from unchanged {:?}",
                    change.unchanged
                ));
            }
            continue;
        }
        match captured {
            Some(v) if v == direct => {}
            Some(v) => problems.push(format!(
                "id {id}: {col} captured {:?} but the row has {:?}",
                short(&v),
                short(&direct)
            )),
            None => problems.push(format!("id {id}: {col} missing from the new image")),
        }
    }
    problems
}

/// The type OIDs of `vals`' columns, in column order.
async fn column_types(region: &Region) -> Result<Vec<(String, i64)>> {
    let rows = region
        .admin
        .query(
            "SELECT attname::text, atttypid::int8 FROM pg_attribute
             WHERE attrelid = 'vals'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

#[tokio::test]
async fn captured_values_equal_the_committed_rows() -> Result<()> {
    // A non-UTC zone with a half-hour offset, so timestamptz text is not trivial.
    let opts = ClusterOptions::default().setting("timezone", "Asia/Kolkata");
    let region = Region::start_with("values", opts).await?;
    region.admin.batch_execute(SCHEMA).await?;
    region.init().await?.ok()?;
    let _capture = region.capture("cap");
    let proxy = region.proxy("val-node").await?;
    let p = connect(&proxy.conn_string()).await?;
    for row in ROWS {
        p.batch_execute(row)
            .await
            .with_context(|| row.to_string())?;
    }
    let inserted = snapshot(&region).await?;
    // Later updates: one leaves the TOASTed column alone, one rewrites it.
    p.execute("UPDATE vals SET tx = 'changed' WHERE id = 1", &[])
        .await?;
    p.execute(
        &format!("UPDATE vals SET big = {BIG} || 'x' WHERE id = 4"),
        &[],
    )
    .await?;
    let stored: i64 = region
        .admin
        .query_one(
            "SELECT pg_column_size(big)::int8 FROM vals WHERE id = 1",
            &[],
        )
        .await?
        .get(0);
    ensure!(
        stored > 60_000,
        "big must be stored uncompressed out of line ({stored} bytes)"
    );

    region.wait_caught_up().await?;
    let events = region.changelog().await?;
    let changes: Vec<&LogChange> = events.iter().flat_map(|e| &e.changes).collect();
    ensure!(
        changes.len() == ROWS.len() + 2,
        "one change per statement: {}",
        changes.len()
    );
    let types = column_types(&region).await?;
    let updated = snapshot(&region).await?;
    let mut problems = Vec::new();
    for (i, c) in changes.iter().enumerate().take(ROWS.len()) {
        let id = i as i32 + 1;
        ensure!(
            c.op == "insert" && c.pk_text() == format!("id={id}"),
            "change {i}: {c:?}"
        );
        problems.extend(compare_row(&inserted, c, id, &[]));
        let want: Vec<i64> = types.iter().map(|(_, t)| *t).collect();
        if c.types != want {
            problems.push(format!(
                "id {id}: types {:?}, columns have {want:?}",
                c.types
            ));
        }
    }
    let upd_toast = changes[ROWS.len()];
    ensure!(upd_toast.op == "update" && upd_toast.pk_text() == "id=1");
    problems.extend(compare_row(&updated, upd_toast, 1, &["big"]));
    let upd_big = changes[ROWS.len() + 1];
    ensure!(upd_big.op == "update" && upd_big.pk_text() == "id=4");
    problems.extend(compare_row(&updated, upd_big, 4, &[]));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

/// The captured text must not depend on the server's output settings: a
/// region whose default `extra_float_digits` rounds floats or whose `DateStyle`
/// is not ISO must still capture values that read back as the same value.
#[tokio::test]
async fn captured_values_do_not_depend_on_server_output_settings() -> Result<()> {
    let opts = ClusterOptions::default()
        .setting("extra_float_digits", "0")
        .setting("datestyle", "SQL, DMY")
        .setting("intervalstyle", "sql_standard");
    let region = Region::start_with("outset", opts).await?;
    region
        .admin
        .batch_execute(
            "CREATE TABLE f (id int PRIMARY KEY, x float8, d date, ts timestamptz, iv interval)",
        )
        .await?;
    region.init().await?.ok()?;
    let _capture = region.capture("cap");
    let proxy = region.proxy("node").await?;
    let p = connect(&proxy.conn_string()).await?;
    p.batch_execute(
        "INSERT INTO f VALUES (1, 0.1::float8 + 0.2::float8, '2024-03-04', '2024-03-04 05:06:07+00',
                               '1 day -02:00:00')",
    )
    .await?;
    region.wait_caught_up().await?;
    let events = region.changelog().await?;
    let c = events
        .first()
        .and_then(|e| e.changes.first())
        .context("nothing captured")?;
    // Read each captured text back in a neutral session and compare values.
    let neutral = region.cluster.connect().await?;
    neutral
        .batch_execute("SET extra_float_digits = 3; SET datestyle = 'ISO, MDY'; SET intervalstyle = 'postgres'")
        .await?;
    let mut problems = Vec::new();
    for (col, ty) in [
        ("x", "float8"),
        ("d", "date"),
        ("ts", "timestamptz"),
        ("iv", "interval"),
    ] {
        let text = c
            .new_value(col)
            .flatten()
            .with_context(|| format!("{col} missing"))?;
        let same: Option<bool> = neutral
            .query_one(
                &format!("SELECT $1::text::{ty} = {col} FROM f WHERE id = 1"),
                &[&text],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(None);
        if same != Some(true) {
            problems.push(format!(
                "{col}: captured {text:?} does not read back as the stored value"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}
