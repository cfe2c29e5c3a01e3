//! Exactly-once capture: every committed change of a mixed workload is in
//! `mesh.changelog` once, in commit order, and nothing rolled back is.
//!
//! The workload runs through a stamping in-process proxy with capture running
//! beside it: plain INSERT/UPDATE/DELETE, upsert, a writable CTE, TRUNCATE,
//! COPY, a plpgsql function, an ON DELETE CASCADE, savepoints, rolled-back and
//! failed transactions, a primary-key change, a write that bypasses the proxy,
//! and concurrent sessions. The
//! expectation comes from two sources that do not involve pgmesh: the client's
//! own bookkeeping, and a `test_decoding` slot created before the workload. This
//! module owns those checks; it never reads the log through pgmesh's decoder.

use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};
use pgmesh_tests::mesh::{drain_reference, ChangeKey, LogEvent, RefTxn, Region};
use pgmesh_tests::{connect, ProxyNode};
use tokio_postgres::Client;

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, v text, n int NOT NULL DEFAULT 0);
CREATE TABLE archive (id int PRIMARY KEY, v text);
CREATE TABLE parent (id int PRIMARY KEY, name text);
CREATE TABLE child (id int PRIMARY KEY,
                    parent_id int NOT NULL REFERENCES parent (id) ON DELETE CASCADE);
CREATE TABLE copied (id int PRIMARY KEY, v text);
CREATE TABLE audit (id bigserial PRIMARY KEY, what text);
CREATE TABLE conc (id int PRIMARY KEY, session int NOT NULL, v int NOT NULL);
CREATE FUNCTION bump(k int) RETURNS int LANGUAGE plpgsql AS $$
BEGIN
  UPDATE items SET n = n + 1 WHERE id = k;
  INSERT INTO audit (what) VALUES ('bump ' || k);
  RETURN k;
END $$;";

/// Concurrent sessions and transactions per session.
const SESSIONS: i32 = 4;
const PER_SESSION: i32 = 30;

/// Expected `(table, op, key)` changes, kept by the client as it goes.
#[derive(Debug, Default)]
struct Expected(Vec<ChangeKey>);

impl Expected {
    fn add(&mut self, table: &str, op: &str, id: impl std::fmt::Display) {
        self.0.push((
            format!("public.{table}"),
            op.to_string(),
            format!("id={id}"),
        ));
    }

    fn sorted(&self) -> Vec<ChangeKey> {
        let mut v = self.0.clone();
        v.sort();
        v
    }
}

/// One event of the log as `(xid, changes)`, comparable with the reference.
fn log_txns(events: &[LogEvent]) -> Vec<(i64, Vec<ChangeKey>)> {
    events
        .iter()
        .map(|e| {
            let changes = e
                .changes
                .iter()
                .map(|c| (c.table.clone(), c.op.clone(), c.pk_text()))
                .collect();
            (e.xid, changes)
        })
        .collect()
}

fn ref_txns(txns: &[RefTxn]) -> Vec<(i64, Vec<ChangeKey>)> {
    txns.iter().map(|t| (t.xid, t.changes.clone())).collect()
}

/// Checks that hold for any log: strictly increasing final HLC and source LSN
/// along `seq`, final HLC at or after the commit time and the stamp.
pub fn assert_log_order(events: &[LogEvent]) -> Result<()> {
    for w in events.windows(2) {
        ensure!(
            w[1].hlc > w[0].hlc,
            "final HLC not increasing: seq {} has {} after seq {} with {}",
            w[1].seq,
            w[1].hlc,
            w[0].seq,
            w[0].hlc
        );
        ensure!(
            w[1].source_lsn > w[0].source_lsn,
            "source LSN not increasing at seq {}",
            w[1].seq
        );
    }
    for e in events {
        ensure!(
            (e.hlc >> 16) as i64 >= e.commit_ts_ms,
            "seq {}: final HLC {} is before its commit time {} ms",
            e.seq,
            e.hlc,
            e.commit_ts_ms
        );
        if let Some(s) = &e.stamp {
            ensure!(e.hlc >= s.hlc, "seq {}: final HLC below its stamp", e.seq);
        }
        ensure!(!e.changes.is_empty(), "seq {} has no changes", e.seq);
    }
    Ok(())
}

/// The fixed part of the workload, through the proxy (`p`) and directly (`d`).
/// Returns the xid of the direct write.
async fn single_session_work(
    proxy: &ProxyNode,
    p: &Client,
    d: &Client,
    exp: &mut Expected,
) -> Result<i64> {
    // Plain writes, extended and simple protocol.
    p.execute(
        "INSERT INTO items (id, v) VALUES (1, 'a'), (2, 'b'), (3, 'c')",
        &[],
    )
    .await?;
    (1..=3).for_each(|i| exp.add("items", "insert", i));
    p.batch_execute("UPDATE items SET v = 'a2' WHERE id = 1")
        .await?;
    exp.add("items", "update", 1);
    p.execute("DELETE FROM items WHERE id = $1", &[&3i32])
        .await?;
    exp.add("items", "delete", 3);
    // Upsert: one row updates, one inserts.
    p.execute(
        "INSERT INTO items (id, v) VALUES (2, 'b2'), (4, 'd')
         ON CONFLICT (id) DO UPDATE SET v = excluded.v",
        &[],
    )
    .await?;
    exp.add("items", "update", 2);
    exp.add("items", "insert", 4);
    // Writable CTE moving a row to another table.
    p.execute(
        "WITH moved AS (DELETE FROM items WHERE id = 4 RETURNING id, v)
         INSERT INTO archive SELECT id, v FROM moved",
        &[],
    )
    .await?;
    exp.add("items", "delete", 4);
    exp.add("archive", "insert", 4);
    // TRUNCATE, then the table is used again.
    p.batch_execute("TRUNCATE archive; INSERT INTO archive VALUES (5, 'after truncate')")
        .await?;
    exp.0
        .push(("public.archive".into(), "truncate".into(), String::new()));
    exp.add("archive", "insert", 5);
    // COPY FROM STDIN (psql's \copy speaks the simple protocol).
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("copied.tsv");
    let rows: String = (1..=50).map(|i| format!("{i}\tcopy {i}\n")).collect();
    std::fs::write(&file, rows)?;
    let env = proxy.libpq_env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let copy = format!("\\copy copied FROM '{}'", file.display());
    pgmesh_tests::psql(&["-v", "ON_ERROR_STOP=1", "-c", &copy], &env)
        .await?
        .ok()?;
    (1..=50).for_each(|i| exp.add("copied", "insert", i));
    // A plpgsql function that writes two tables.
    let k: i32 = p.query_one("SELECT bump(1)", &[]).await?.get(0);
    ensure!(k == 1);
    exp.add("items", "update", 1);
    exp.add("audit", "insert", 1);
    // ON DELETE CASCADE.
    p.batch_execute(
        "INSERT INTO parent VALUES (10, 'p10'), (11, 'p11');
         INSERT INTO child VALUES (100, 10), (101, 10), (102, 11);",
    )
    .await?;
    exp.add("parent", "insert", 10);
    exp.add("parent", "insert", 11);
    for c in [100, 101, 102] {
        exp.add("child", "insert", c);
    }
    p.execute("DELETE FROM parent WHERE id = 10", &[]).await?;
    exp.add("parent", "delete", 10);
    exp.add("child", "delete", 100);
    exp.add("child", "delete", 101);
    // Savepoints rolled back and kept, including one whose statement failed.
    p.batch_execute("BEGIN").await?;
    p.execute("INSERT INTO items (id, v) VALUES (20, 'kept')", &[])
        .await?;
    p.batch_execute("SAVEPOINT s1").await?;
    p.execute("INSERT INTO items (id, v) VALUES (21, 'rolled back')", &[])
        .await?;
    p.batch_execute("ROLLBACK TO SAVEPOINT s1").await?;
    p.batch_execute("SAVEPOINT s2").await?;
    let dup = p
        .execute("INSERT INTO items (id, v) VALUES (20, 'dup')", &[])
        .await;
    ensure!(dup.is_err(), "duplicate key must fail");
    p.batch_execute("ROLLBACK TO SAVEPOINT s2").await?;
    p.execute("INSERT INTO items (id, v) VALUES (22, 'kept')", &[])
        .await?;
    p.batch_execute("SAVEPOINT s3; INSERT INTO items (id, v) VALUES (23, 'released'); RELEASE s3")
        .await?;
    p.batch_execute("COMMIT").await?;
    for i in [20, 22, 23] {
        exp.add("items", "insert", i);
    }
    // Rolled back: simple, extended (tokio-postgres transaction), failed COMMIT.
    p.batch_execute("BEGIN; INSERT INTO items (id, v) VALUES (30, 'never'); ROLLBACK")
        .await?;
    let mut p2 = connect(&proxy.conn_string()).await?;
    let tx = p2.transaction().await?;
    tx.execute("INSERT INTO items (id, v) VALUES (31, 'never')", &[])
        .await?;
    tx.rollback().await?;
    p.batch_execute("BEGIN").await?;
    p.execute("INSERT INTO items (id, v) VALUES (32, 'never')", &[])
        .await?;
    ensure!(p
        .execute("INSERT INTO items (id, v) VALUES (32, 'x')", &[])
        .await
        .is_err());
    p.batch_execute("COMMIT").await?;
    // A primary key change: the key is the old one.
    p.execute("UPDATE items SET id = 24 WHERE id = 23", &[])
        .await?;
    exp.add("items", "update", 23);
    // A direct write that bypasses the proxy.
    let xid: String = d
        .query_one(
            "INSERT INTO items (id, v) VALUES (40, 'direct') RETURNING pg_current_xact_id()::text",
            &[],
        )
        .await?
        .get(0);
    exp.add("items", "insert", 40);
    Ok(xid.parse()?)
}

/// `SESSIONS` concurrent proxy sessions, each mixing autocommit inserts,
/// insert+update transactions and rolled-back transactions.
async fn concurrent_work(proxy: &ProxyNode, exp: &mut Expected) -> Result<()> {
    let mut tasks = Vec::new();
    for s in 0..SESSIONS {
        let conn = proxy.conn_string();
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&conn).await?;
            let mut done = Vec::new();
            for i in 0..PER_SESSION {
                let id = s * 1000 + i;
                if i % 5 == 4 {
                    let tx = c.transaction().await?;
                    tx.execute("INSERT INTO conc VALUES ($1, $2, 0)", &[&(id + 500), &s])
                        .await?;
                    tx.rollback().await?;
                } else if i % 2 == 1 {
                    let tx = c.transaction().await?;
                    tx.execute("INSERT INTO conc VALUES ($1, $2, 0)", &[&id, &s])
                        .await?;
                    tx.execute("UPDATE conc SET v = v + 1 WHERE id = $1", &[&id])
                        .await?;
                    tx.commit().await?;
                    done.push((id, true));
                } else {
                    c.execute("INSERT INTO conc VALUES ($1, $2, 0)", &[&id, &s])
                        .await?;
                    done.push((id, false));
                }
            }
            anyhow::Ok(done)
        }));
    }
    for t in tasks {
        for (id, updated) in t.await.context("session task panicked")?? {
            exp.add("conc", "insert", id);
            if updated {
                exp.add("conc", "update", id);
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_workload_is_captured_exactly_once_in_commit_order() -> Result<()> {
    let region = Region::start("exactly").await?;
    region.admin.batch_execute(SCHEMA).await?;
    region.init().await?.ok()?;
    region.create_reference_slot("ref").await?;
    let capture = region.capture("cap1");
    let proxy = region.proxy("proxy1").await?;
    let p = connect(&proxy.conn_string()).await?;
    let d = region.cluster.connect().await?;
    let mut exp = Expected::default();
    let direct_xid = single_session_work(&proxy, &p, &d, &mut exp).await?;
    concurrent_work(&proxy, &mut exp).await?;

    region.wait_caught_up().await?;
    let reference = drain_reference(&region.admin, "ref").await?;
    let events = region.changelog().await?;
    capture.stop().await;

    // The reference agrees with the client's own bookkeeping...
    let mut ref_all: Vec<_> = reference.iter().flat_map(|t| t.changes.clone()).collect();
    ref_all.sort();
    assert_eq!(
        ref_all,
        exp.sorted(),
        "test_decoding disagrees with the client"
    );
    // ...and the log equals the reference: same transactions, same changes, same
    // order, nothing more (rolled-back work never reached the reference).
    assert_eq!(
        log_txns(&events),
        ref_txns(&reference),
        "mesh.changelog differs from the committed history"
    );
    assert_log_order(&events)?;
    let mut per_xid = BTreeMap::new();
    for e in &events {
        *per_xid.entry(e.xid).or_insert(0) += 1;
        assert_eq!(e.origin, region.name, "seq {}", e.seq);
        if e.xid == direct_xid {
            assert!(!e.stamped && e.stamp.is_none(), "direct write is unstamped");
        } else {
            let s = e.stamp.as_ref().context("a proxied write is stamped")?;
            assert_eq!((s.region.as_str(), s.node.as_str()), ("exactly", "proxy1"));
        }
    }
    assert!(per_xid.values().all(|&n| n == 1), "an xid logged twice");
    assert!(
        per_xid.contains_key(&direct_xid),
        "the direct write is logged"
    );
    for never in ["id=21", "id=30", "id=31", "id=32"] {
        assert!(
            !events
                .iter()
                .flat_map(|e| &e.changes)
                .any(|c| c.table == "public.items" && c.pk_text() == never && c.op == "insert"),
            "rolled-back insert {never} was captured"
        );
    }
    Ok(())
}

/// COPY FROM STDIN in the extended protocol (tokio-postgres `copy_in`), through
/// a stamping proxy, commits and is captured once.
#[tokio::test]
async fn extended_protocol_copy_in_is_captured_once() -> Result<()> {
    use futures::SinkExt;
    let region = Region::start("copyext").await?;
    region
        .admin
        .batch_execute("CREATE TABLE copied (id int PRIMARY KEY, v text)")
        .await?;
    region.init().await?.ok()?;
    let _capture = region.capture("cap1");
    let proxy = region.proxy("proxy1").await?;
    let p = connect(&proxy.conn_string()).await?;
    let sink = p.copy_in("COPY copied FROM STDIN").await?;
    futures::pin_mut!(sink);
    let rows: String = (1..=20).map(|i| format!("{i}\trow {i}\n")).collect();
    sink.send(bytes::Bytes::from(rows)).await?;
    let n = sink.finish().await?;
    assert_eq!(n, 20);
    let count: i64 = p
        .query_one("SELECT count(*) FROM copied", &[])
        .await?
        .get(0);
    assert_eq!(count, 20, "the session stays usable and the rows are there");
    region.wait_caught_up().await?;
    let events = region.changelog().await?;
    assert_eq!(events.len(), 1, "one COPY, one event: {events:?}");
    let keys: Vec<String> = events[0].changes.iter().map(|c| c.pk_text()).collect();
    let want: Vec<String> = (1..=20).map(|i| format!("id={i}")).collect();
    assert_eq!(keys, want);
    assert!(events[0].stamped, "a COPY through the proxy is stamped");
    Ok(())
}
