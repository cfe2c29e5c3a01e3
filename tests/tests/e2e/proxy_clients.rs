//! tokio-postgres through the proxy: simple, extended, prepared, pipelined,
//! transactions and errors.
//!
//! This module owns the request/response paths an ordinary driver exercises.
//! Most tests run the same work directly against PostgreSQL and through the proxy
//! and assert both the expected values and that the two agree, so a relay that
//! alters, reorders or drops a message shows up as a difference; the rest check
//! values known in advance (a statement prepared once and run a thousand times,
//! savepoints).

use std::error::Error as StdError;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use bytes::BytesMut;
use futures::future::join_all;
use pgmesh_tests::{connect, ClusterOptions};
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::support::{cluster_and_proxy, sqlstate};

/// A value in its binary wire form, whatever its type: lets a test send and
/// receive types (numeric) that tokio-postgres has no Rust type for, unchanged.
#[derive(Debug, Clone, PartialEq)]
struct Raw(Vec<u8>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        Ok(Raw(raw.to_vec()))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

impl ToSql for Raw {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }
    fn accepts(_: &Type) -> bool {
        true
    }
    to_sql_checked!();
}

/// A simple-query result as comparable text: row values and command tags.
async fn simple_transcript(client: &Client, sql: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for message in client.simple_query(sql).await? {
        match message {
            SimpleQueryMessage::Row(row) => {
                let values: Vec<String> = (0..row.len())
                    .map(|i| row.get(i).unwrap_or("NULL").to_string())
                    .collect();
                out.push(format!("row {}", values.join("|")));
            }
            SimpleQueryMessage::CommandComplete(n) => out.push(format!("complete {n}")),
            SimpleQueryMessage::RowDescription(cols) => {
                let names: Vec<&str> = cols.iter().map(|c| c.name()).collect();
                out.push(format!("columns {}", names.join(",")));
            }
            _ => out.push("other".into()),
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_protocol_multi_statement_matches_direct() -> Result<()> {
    let (cluster, proxy) = cluster_and_proxy(ClusterOptions::default()).await?;
    let direct = cluster.connect().await?;
    let proxied = connect(&proxy.conn_string()).await?;
    let setup = "CREATE TEMP TABLE t (id int PRIMARY KEY, name text);\
                 INSERT INTO t VALUES (1, 'one'), (2, 'twö'), (3, NULL);\
                 UPDATE t SET name = upper(name) WHERE id = 1";
    let script = "SELECT id, name FROM t ORDER BY id; \
                  SELECT count(*) AS n FROM t; \
                  UPDATE t SET name = 'x' WHERE id > 1; \
                  SELECT 'a;b' AS semi, E'tab\\there' AS esc";
    let mut transcripts = Vec::new();
    for client in [&direct, &proxied] {
        client.batch_execute(setup).await?;
        transcripts.push(simple_transcript(client, script).await?);
    }
    assert_eq!(
        transcripts[1],
        vec![
            "columns id,name",
            "row 1|ONE",
            "row 2|twö",
            "row 3|NULL",
            "complete 3",
            "columns n",
            "row 3",
            "complete 1",
            "complete 2",
            "columns semi,esc",
            "row a;b|tab\there",
            "complete 1",
        ]
    );
    assert_eq!(transcripts[0], transcripts[1], "direct vs proxy");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_parameters_of_many_types() -> Result<()> {
    let (cluster, proxy) = cluster_and_proxy(ClusterOptions::default()).await?;
    let direct = cluster.connect().await?;
    let proxied = connect(&proxy.conn_string()).await?;

    let text = "héllo wörld ✓ 日本語 🐘";
    let bytea: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
    let json =
        serde_json::json!({"a": [1, 2.5, {"b": null}], "ü": "✓", "big": 12345678901234567_i64});
    let ints = vec![1i32, -2, i32::MAX, i32::MIN];
    let texts = vec![Some("x".to_string()), None, Some("ÿ".to_string())];
    let none: Option<i32> = None;
    let sql = "SELECT $1::int2, $2::int4, $3::int8, $4::float8, $5::bool, $6::text, \
               $7::bytea, $8::int4, $9::timestamptz, $10::jsonb, $11::int4[], $12::text[], \
               $9::timestamptz::text";
    let mut rows = Vec::new();
    for client in [&direct, &proxied] {
        client.batch_execute("SET TIME ZONE 'UTC'").await?;
        let row = client
            .query_one(
                sql,
                &[
                    &-7i16,
                    &42i32,
                    &-9_007_199_254_740_993i64,
                    &0.1f64,
                    &true,
                    &text,
                    &bytea,
                    &none,
                    &at,
                    &json,
                    &ints,
                    &texts,
                ],
            )
            .await?;
        assert_eq!(row.get::<_, i16>(0), -7);
        assert_eq!(row.get::<_, i32>(1), 42);
        assert_eq!(row.get::<_, i64>(2), -9_007_199_254_740_993);
        assert_eq!(row.get::<_, f64>(3), 0.1);
        assert!(row.get::<_, bool>(4));
        assert_eq!(row.get::<_, String>(5), text);
        assert_eq!(row.get::<_, Vec<u8>>(6), bytea);
        assert_eq!(row.get::<_, Option<i32>>(7), None);
        assert_eq!(row.get::<_, SystemTime>(8), at);
        assert_eq!(row.get::<_, serde_json::Value>(9), json);
        assert_eq!(row.get::<_, Vec<i32>>(10), ints);
        assert_eq!(row.get::<_, Vec<Option<String>>>(11), texts);
        assert_eq!(row.get::<_, String>(12), "2023-11-14 22:13:20.123456+00");
        let raw: Vec<Option<Raw>> = (0..row.len()).map(|i| row.get(i)).collect();
        rows.push(format!("{raw:?}"));
    }
    assert_eq!(
        rows[0], rows[1],
        "binary results differ between direct and proxy"
    );

    // numeric has no Rust type here: take its binary form from the server, send
    // it back through the proxy and check both its value and its bytes survive.
    let literal = "-12345678901234567890.000000000000000123";
    let numeric: Raw = direct
        .query_one(&format!("SELECT '{literal}'::numeric"), &[])
        .await?
        .get(0);
    let row = proxied
        .query_one("SELECT $1::numeric::text, $1::numeric", &[&numeric])
        .await?;
    assert_eq!(row.get::<_, String>(0), literal);
    assert_eq!(row.get::<_, Raw>(1), numeric);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statement_reused_a_thousand_times() -> Result<()> {
    let (cluster, proxy) = cluster_and_proxy(ClusterOptions::default()).await?;
    let proxied = connect(&proxy.conn_string()).await?;
    proxied
        .batch_execute("CREATE TABLE counter (id int PRIMARY KEY, n int NOT NULL)")
        .await?;
    let select_sql = "SELECT $1::int4 * 2, repeat('ab', $1::int4 % 7)";
    let upsert_sql = "INSERT INTO counter VALUES ($1, 1) \
                      ON CONFLICT (id) DO UPDATE SET n = counter.n + 1";
    let select = proxied.prepare(select_sql).await?;
    let upsert = proxied.prepare(upsert_sql).await?;
    for i in 0..1000i32 {
        let row = proxied.query_one(&select, &[&i]).await?;
        assert_eq!(row.get::<_, i32>(0), i * 2);
        assert_eq!(row.get::<_, String>(1), "ab".repeat((i % 7) as usize));
        assert_eq!(proxied.execute(&upsert, &[&(i % 10)]).await?, 1);
    }
    // Each statement was parsed once and stayed prepared on the server.
    let named: i64 = proxied
        .query_one(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement IN ($1, $2)",
            &[&select_sql, &upsert_sql],
        )
        .await?
        .get(0);
    assert_eq!(named, 2);
    let direct = cluster.connect().await?;
    let rows = direct
        .query("SELECT id, n FROM counter ORDER BY id", &[])
        .await?;
    let got: Vec<(i32, i32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let want: Vec<(i32, i32)> = (0..10).map(|id| (id, 100)).collect();
    assert_eq!(got, want);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_concurrent_queries_on_one_client() -> Result<()> {
    let (cluster, proxy) = cluster_and_proxy(ClusterOptions::default()).await?;
    let proxied = connect(&proxy.conn_string()).await?;
    let pid: i32 = proxied
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0);
    let statement = proxied
        .prepare("SELECT $1::int4, md5($1::text), pg_backend_pid()")
        .await?;
    // tokio-postgres writes all 100 Parse/Bind/Execute/Sync groups before it
    // reads any answer, so the proxy sees one deep pipeline.
    let queries = (0..100i32).map(|i| {
        let client = &proxied;
        let statement = &statement;
        async move {
            if i == 50 {
                client.query("SELECT 1 / ($1::int4 - 50)", &[&i]).await
            } else if i % 2 == 0 {
                client.query(statement, &[&i]).await
            } else {
                client
                    .query("SELECT $1::int4, md5($1::text), pg_backend_pid()", &[&i])
                    .await
            }
        }
    });
    let results = join_all(queries).await;
    let direct = cluster.connect().await?;
    for (i, result) in (0..100i32).zip(results) {
        if i == 50 {
            let err = result.expect_err("division by zero");
            assert_eq!(sqlstate(&err), Some("22012"), "{err}");
            continue;
        }
        let rows = result?;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].get::<_, i32>(0), i);
        let want: String = direct
            .query_one("SELECT md5($1::text)", &[&i.to_string()])
            .await?
            .get(0);
        assert_eq!(rows[0].get::<_, String>(1), want);
        assert_eq!(rows[0].get::<_, i32>(2), pid, "one backend for one client");
    }
    // The failure in the middle of the pipeline left the session usable.
    let one: i32 = proxied.query_one("SELECT 1", &[]).await?.get(0);
    assert_eq!(one, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_with_savepoints() -> Result<()> {
    let (cluster, proxy) = cluster_and_proxy(ClusterOptions::default()).await?;
    let direct = cluster.connect().await?;
    direct
        .batch_execute("CREATE TABLE sp (id int PRIMARY KEY)")
        .await?;
    let mut proxied = connect(&proxy.conn_string()).await?;

    // Simple protocol: savepoints rolled back to and released.
    proxied
        .batch_execute(
            "BEGIN; INSERT INTO sp VALUES (1); SAVEPOINT a; INSERT INTO sp VALUES (2); \
             ROLLBACK TO SAVEPOINT a; INSERT INTO sp VALUES (3); SAVEPOINT b; \
             INSERT INTO sp VALUES (4); RELEASE SAVEPOINT b; COMMIT",
        )
        .await?;

    // Extended protocol through the driver's transaction API, with an error
    // inside a savepoint that the outer transaction survives.
    let mut tx = proxied.transaction().await?;
    tx.execute("INSERT INTO sp VALUES (5)", &[]).await?;
    {
        let sp = tx.savepoint("dup").await?;
        let err = sp
            .execute("INSERT INTO sp VALUES (1)", &[])
            .await
            .expect_err("duplicate key");
        assert_eq!(sqlstate(&err), Some("23505"));
        sp.rollback().await?;
    }
    {
        let sp = tx.savepoint("keep").await?;
        sp.execute("INSERT INTO sp VALUES (6)", &[]).await?;
        sp.commit().await?;
    }
    // Not yet visible outside the transaction.
    let outside: i64 = direct
        .query_one("SELECT count(*) FROM sp WHERE id >= 5", &[])
        .await?
        .get(0);
    assert_eq!(outside, 0);
    tx.commit().await?;

    // A rolled-back transaction leaves nothing.
    let tx = proxied.transaction().await?;
    tx.execute("INSERT INTO sp VALUES (7)", &[]).await?;
    tx.rollback().await?;

    // A failed transaction block refuses work until ROLLBACK (25P02).
    proxied.batch_execute("BEGIN").await?;
    let err = proxied
        .batch_execute("SELECT 1/0")
        .await
        .expect_err("22012");
    assert_eq!(sqlstate(&err), Some("22012"));
    let err = proxied
        .batch_execute("SELECT 1")
        .await
        .expect_err("aborted");
    assert_eq!(sqlstate(&err), Some("25P02"));
    proxied.batch_execute("ROLLBACK").await?;

    let rows = direct.query("SELECT id FROM sp ORDER BY id", &[]).await?;
    let ids: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, vec![1, 3, 4, 5, 6]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_carry_the_same_sqlstate_as_direct() -> Result<()> {
    let (cluster, proxy) = cluster_and_proxy(ClusterOptions::default()).await?;
    let direct = cluster.connect().await?;
    direct
        .batch_execute(
            "CREATE TABLE u (id int CONSTRAINT u_pk PRIMARY KEY); INSERT INTO u VALUES (1)",
        )
        .await?;
    let proxied = connect(&proxy.conn_string()).await?;
    let cases = [
        ("SELEC 1", "42601"),
        ("INSERT INTO u VALUES (1)", "23505"),
        ("SELECT 1/0", "22012"),
        ("SELECT * FROM no_such_table", "42P01"),
        ("SELECT 'abc'::int", "22P02"),
    ];
    for (sql, code) in cases {
        let mut seen = Vec::new();
        for client in [&direct, &proxied] {
            // Both protocols: simple and extended.
            let simple = client.batch_execute(sql).await.expect_err(sql);
            let extended = client.query(sql, &[]).await.expect_err(sql);
            for err in [simple, extended] {
                let db = err.as_db_error().expect("a server error");
                assert_eq!(db.code().code(), code, "{sql}: {err}");
                seen.push((
                    db.severity().to_string(),
                    db.message().to_string(),
                    db.detail().map(str::to_string),
                    db.constraint().map(str::to_string),
                    db.position().map(|p| format!("{p:?}")),
                ));
            }
        }
        assert_eq!(seen[..2], seen[2..], "{sql}: direct vs proxy");
    }
    // Errors never broke the session.
    let n: i64 = proxied
        .query_one("SELECT count(*) FROM u", &[])
        .await?
        .get(0);
    assert_eq!(n, 1);
    Ok(())
}
