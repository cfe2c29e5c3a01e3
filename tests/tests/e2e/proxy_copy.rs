//! COPY through the proxy, both directions, including COPYs that fail.
//!
//! This module owns the streaming paths: CopyData from the client (`d`, `c`,
//! `f`) and from the server (`H`, `d`, `c`), compared byte for byte with a
//! direct connection. It checks that a COPY which fails halfway, on the server
//! (bad row) or on the client (CopyFail), leaves no rows and a usable session,
//! in the simple protocol (raw frames, psql) and the extended one
//! (tokio-postgres), the latter with write stamping both off and on.

use std::pin::pin;

use anyhow::Result;
use bytes::Bytes;
use futures::{SinkExt, TryStreamExt};
use pgmesh_tests::{connect, wait_until, ClusterOptions, PgCluster, ProxyNode, DEFAULT_TIMEOUT};
use tokio_postgres::Client;

use crate::support::{cluster_and_proxy, env_refs, sqlstate};
use crate::wire::{self, RawClient};

const ROWS: usize = 10_000;

/// `ROWS` lines of COPY text: escapes, non-ASCII and NULLs included. COPY OUT
/// of the loaded table gives back exactly these bytes.
fn copy_text() -> String {
    (0..ROWS)
        .map(|i| {
            let note = if i % 7 == 0 { "\\N" } else { "tab\\tin ✓" };
            format!("{i}\tname {i} ü\t{}.{:02}\t{note}\n", i * 3, i % 100)
        })
        .collect()
}

const TABLE: &str = "(id int PRIMARY KEY, name text, score numeric(12,2), note text)";

/// Send `data` to `COPY <table> FROM STDIN` in uneven chunks (rows split across
/// CopyData messages) and return the row count or the error.
async fn copy_in(client: &Client, table: &str, data: &[u8]) -> Result<u64, tokio_postgres::Error> {
    let sink = client.copy_in(&format!("COPY {table} FROM STDIN")).await?;
    let mut sink = pin!(sink);
    for chunk in data.chunks(7_919) {
        sink.send(Bytes::copy_from_slice(chunk)).await?;
    }
    sink.as_mut().finish().await
}

/// Everything `COPY ... TO STDOUT` sends, concatenated.
async fn copy_out(client: &Client, sql: &str) -> Result<Vec<u8>> {
    let stream = client.copy_out(sql).await?;
    let chunks: Vec<Bytes> = pin!(stream).try_collect().await?;
    Ok(chunks.concat())
}

/// A cluster and a proxy with write stamping on or off.
async fn setup(stamping: bool) -> Result<(PgCluster, ProxyNode)> {
    pgmesh_tests::init_tracing();
    let cluster = PgCluster::start_async(ClusterOptions::default()).await?;
    let proxy = ProxyNode::start_with(&cluster, |c| c.stamping = stamping).await?;
    Ok((cluster, proxy))
}

// The bug the `_with_stamping` variants guard against (fixed; they were once
// ignored for it): tokio-postgres sends
// `Bind, Execute, Sync` for `COPY ... FROM STDIN` and only then the CopyData (a
// server in copy-in mode ignores that Sync, as the protocol allows). The proxy
// takes that first Sync for the end of an implicit write transaction and
// injects its stamp's Parse/Bind/Execute/Close there, which PostgreSQL receives
// in copy-in mode: `ERROR: unexpected message type 0x50 during COPY from
// stdin`, then `FATAL: terminating connection because protocol synchronization
// was lost`. The `_without_stamping` variants show the relay itself is right.

async fn extended_copy_in_matches_direct(stamping: bool) -> Result<()> {
    let (cluster, proxy) = setup(stamping).await?;
    let direct = cluster.connect().await?;
    let proxied = connect(&proxy.conn_string()).await?;
    direct
        .batch_execute(&format!(
            "CREATE TABLE items_d {TABLE}; CREATE TABLE items_p {TABLE}"
        ))
        .await?;
    let data = copy_text();
    assert_eq!(
        copy_in(&direct, "items_d", data.as_bytes()).await?,
        ROWS as u64
    );
    assert_eq!(
        copy_in(&proxied, "items_p", data.as_bytes()).await?,
        ROWS as u64
    );
    let d = digest(&direct, "items_d").await?;
    assert!(d.starts_with(&format!("{ROWS}:")), "{d}");
    assert_eq!(
        d,
        digest(&direct, "items_p").await?,
        "rows loaded through the proxy differ"
    );
    let text = copy_out(
        &proxied,
        "COPY (SELECT * FROM items_p ORDER BY id) TO STDOUT",
    )
    .await?;
    assert!(
        text == data.as_bytes(),
        "COPY OUT does not give back the input"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_copy_in_matches_direct_without_stamping() -> Result<()> {
    extended_copy_in_matches_direct(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_copy_in_matches_direct_with_stamping() -> Result<()> {
    extended_copy_in_matches_direct(true).await
}

/// `count:md5` of a table's rows in id order.
async fn digest(client: &Client, table: &str) -> Result<String> {
    let sql = format!(
        "SELECT count(*)::text || ':' || md5(string_agg(t::text, ',' ORDER BY id)) FROM {table} t"
    );
    Ok(client.query_one(&sql, &[]).await?.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_out_matches_direct_byte_for_byte() -> Result<()> {
    let (cluster, proxy) = cluster_and_proxy(ClusterOptions::default()).await?;
    let direct = cluster.connect().await?;
    let proxied = connect(&proxy.conn_string()).await?;
    direct
        .batch_execute(&format!("CREATE TABLE items {TABLE}"))
        .await?;
    let data = copy_text();
    copy_in(&direct, "items", data.as_bytes()).await?;
    for sql in [
        "COPY (SELECT * FROM items ORDER BY id) TO STDOUT",
        "COPY (SELECT * FROM items ORDER BY id) TO STDOUT (FORMAT binary)",
        // About 6 MB: many reads and writes on both legs.
        "COPY (SELECT g, repeat(md5(g::text), 40) FROM generate_series(1, 5000) g) TO STDOUT (FORMAT csv, HEADER)",
    ] {
        let via_proxy = copy_out(&proxied, sql).await?;
        let via_direct = copy_out(&direct, sql).await?;
        assert!(!via_proxy.is_empty());
        assert!(via_proxy == via_direct, "{sql}: bytes differ");
    }
    let text = copy_out(&proxied, "COPY (SELECT * FROM items ORDER BY id) TO STDOUT").await?;
    assert!(
        text == data.as_bytes(),
        "COPY OUT does not give back the input"
    );
    Ok(())
}

async fn extended_copy_in_failing_halfway(stamping: bool) -> Result<()> {
    let (cluster, proxy) = setup(stamping).await?;
    let direct = cluster.connect().await?;
    let proxied = connect(&proxy.conn_string()).await?;
    direct
        .batch_execute(&format!("CREATE TABLE bad {TABLE}"))
        .await?;
    // Row 5000 has a non-integer id; 5000 more rows follow it.
    let data = copy_text().replacen("5000\t", "abc\t", 1);
    let err = copy_in(&proxied, "bad", data.as_bytes())
        .await
        .expect_err("a bad row must fail the COPY");
    assert_eq!(sqlstate(&err), Some("22P02"), "{err}");
    let db = err.as_db_error().expect("server error");
    assert!(db.message().contains("\"abc\""), "{db:?}");

    // The session is usable and the COPY left nothing behind.
    let n: i64 = proxied
        .query_one("SELECT count(*) FROM bad", &[])
        .await?
        .get(0);
    assert_eq!(n, 0);
    assert_eq!(
        copy_in(&proxied, "bad", copy_text().as_bytes()).await?,
        ROWS as u64
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_copy_in_failing_halfway_without_stamping() -> Result<()> {
    extended_copy_in_failing_halfway(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_copy_in_failing_halfway_with_stamping() -> Result<()> {
    extended_copy_in_failing_halfway(true).await
}

async fn extended_copy_in_aborted_by_the_client(stamping: bool) -> Result<()> {
    let (cluster, proxy) = setup(stamping).await?;
    let proxied = connect(&proxy.conn_string()).await?;
    proxied
        .batch_execute(&format!("CREATE TABLE aborted {TABLE}"))
        .await?;
    {
        let sink = proxied.copy_in("COPY aborted FROM STDIN").await?;
        let mut sink = pin!(sink);
        sink.send(Bytes::from_static(b"1\ta\t1.00\t\\N\n")).await?;
        // Dropped unfinished: tokio-postgres sends CopyFail + Sync.
    }
    wait_until(
        DEFAULT_TIMEOUT,
        "the server to log the CopyFail",
        || async { cluster.log_contents().contains("COPY from stdin failed") },
    )
    .await?;
    let n: i64 = proxied
        .query_one("SELECT count(*) FROM aborted", &[])
        .await?
        .get(0);
    assert_eq!(n, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_copy_in_aborted_by_the_client_without_stamping() -> Result<()> {
    extended_copy_in_aborted_by_the_client(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_copy_in_aborted_by_the_client_with_stamping() -> Result<()> {
    extended_copy_in_aborted_by_the_client(true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_copy_in_good_bad_and_abandoned() -> Result<()> {
    let (cluster, proxy) = cluster_and_proxy(ClusterOptions::default()).await?;
    let direct = cluster.connect().await?;
    direct
        .batch_execute(&format!("CREATE TABLE raw_copy {TABLE}"))
        .await?;
    let mut client = RawClient::login(proxy.addr()).await?;
    let data = copy_text();
    let bad = data.replacen("5000\t", "abc\t", 1);
    for (what, rows, end) in [
        ("bad row", bad.as_bytes(), wire::frame(b'c', b"")),
        (
            "CopyFail",
            data.as_bytes(),
            wire::frame(b'f', b"client gave up\0"),
        ),
        ("good", data.as_bytes(), wire::frame(b'c', b"")),
    ] {
        client
            .send(&wire::query("COPY raw_copy FROM STDIN"))
            .await?;
        let start = client.recv().await?.expect("CopyInResponse");
        assert_eq!(start.tag, b'G', "{what}: {start:?}");
        for chunk in rows.chunks(8_000) {
            client.send(&wire::frame(b'd', chunk)).await?;
        }
        client.send(&end).await?;
        let msgs = client.until_ready().await?;
        let tags: String = msgs.iter().map(|m| m.tag as char).collect();
        match what {
            "good" => {
                assert_eq!(tags, "CZ", "{what}");
                assert_eq!(msgs[0].body, format!("COPY {ROWS}\0").as_bytes());
            }
            _ => {
                assert_eq!(tags, "EZ", "{what}: {msgs:?}");
                let want = if what == "CopyFail" { "57014" } else { "22P02" };
                assert_eq!(msgs[0].sqlstate().as_deref(), Some(want), "{what}");
            }
        }
    }
    let d = digest(&direct, "raw_copy").await?;
    assert!(
        d.starts_with(&format!("{ROWS}:")),
        "only the good COPY left rows: {d}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_copy_with_a_bad_row_matches_direct() -> Result<()> {
    let (cluster, proxy) = cluster_and_proxy(ClusterOptions::default()).await?;
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("copy.sql");
    // Simple-protocol COPY with inline data; psql keeps going after the error.
    std::fs::write(
        &script,
        "CREATE TEMP TABLE c (id int);\n\
         COPY c FROM STDIN;\n1\n2\nabc\n4\n\\.\n\
         SELECT count(*) AS after_bad FROM c;\n\
         COPY c FROM STDIN;\n1\n2\n\\.\n\
         SELECT count(*) AS after_good FROM c;\n",
    )?;
    let script = script.to_string_lossy().into_owned();
    let args = ["-f", script.as_str()];
    let direct = cluster.psql(&args).await?;
    let env = proxy.libpq_env();
    let proxied = pgmesh_tests::psql(&args, &env_refs(&env)).await?;
    assert!(direct.success() && proxied.success(), "{proxied:?}");
    assert!(
        proxied
            .stderr
            .contains("invalid input syntax for type integer: \"abc\""),
        "{}",
        proxied.stderr
    );
    assert!(proxied.stdout.contains("after_good"), "{}", proxied.stdout);
    assert_eq!(direct.stdout, proxied.stdout);
    assert_eq!(direct.stderr, proxied.stderr);
    Ok(())
}
