//! The receiving region's PostgreSQL crashes while it applies a peer's stream.
//!
//! Apply commits with `synchronous_commit = off`: the batch's link checkpoint is in
//! the same transaction as its rows, so a crash that loses the unflushed tail of
//! applied batches rewinds the checkpoint with them, and the link pulls those
//! events again from the peer's durable log. This test crashes `cr_b`'s server
//! (SIGKILL of the postmaster, then crash recovery) three times while `cr_a`
//! writes through its proxy, and checks that every write whose commit returned is
//! in `cr_b` exactly once: rows, and event ids in `cr_b`'s change log.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pgmesh_tests::regions::{Mesh, NodeSpec, CONVERGE_TIMEOUT};
use pgmesh_tests::{wait_until, DEFAULT_TIMEOUT};

const SCHEMA: &str = "CREATE TABLE writes (id bigint PRIMARY KEY, n int NOT NULL)";

/// Inserts (and then bumps) unique ids until `stop` is set; returns the ids whose
/// commits returned.
async fn writer(conn: String, stop: tokio::sync::watch::Receiver<bool>) -> Result<Vec<i64>> {
    let c = pgmesh_tests::connect(&conn).await?;
    let mut acked = Vec::new();
    let mut id = 0i64;
    let mut pace = tokio::time::interval(Duration::from_millis(5));
    while !*stop.borrow() {
        pace.tick().await;
        id += 1;
        c.execute("INSERT INTO writes (id, n) VALUES ($1, 0)", &[&id])
            .await
            .with_context(|| format!("insert {id}"))?;
        c.execute("UPDATE writes SET n = n + 1 WHERE id = $1", &[&id])
            .await
            .with_context(|| format!("update {id}"))?;
        acked.push(id);
    }
    Ok(acked)
}

/// Rows in cr_b (0 while its server is down).
async fn applied(mesh: &Mesh) -> i64 {
    mesh.region(1)
        .admin
        .query_one("SELECT count(*) FROM writes", &[])
        .await
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_of_the_receiving_database_loses_and_repeats_nothing() -> Result<()> {
    let mut mesh = Mesh::start(&["cr_a", "cr_b"]).await?;
    mesh.exec_all(SCHEMA).await?;
    mesh.init_all().await?;
    mesh.start_nodes(|_| NodeSpec::default()).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let w = tokio::spawn(writer(mesh.proxy_conn_string(0)?, stop_rx));
    for crash in 0..3 {
        // Let cr_b apply a fresh stretch of the stream, then crash it mid-stream.
        let before = applied(&mesh).await;
        wait_until(DEFAULT_TIMEOUT, "cr_b to apply more events", || async {
            applied(&mesh).await >= before + 50
        })
        .await?;
        let t = Instant::now();
        mesh.crash_database(1).await?;
        eprintln!(
            "crash {crash}: cr_b's server killed and recovered in {:?}",
            t.elapsed()
        );
    }
    // cr_b keeps applying after the last recovery.
    let before = applied(&mesh).await;
    wait_until(DEFAULT_TIMEOUT, "cr_b to apply after recovery", || async {
        applied(&mesh).await >= before + 50
    })
    .await?;
    stop_tx.send(true)?;
    let acked: BTreeSet<i64> = w.await??.into_iter().collect();
    assert!(acked.len() > 150, "only {} writes", acked.len());
    let sums = mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    eprintln!("{} acknowledged writes; converged: {sums:?}", acked.len());

    let b = &mesh.region(1).admin;
    let rows: BTreeSet<i64> = b
        .query("SELECT id FROM writes WHERE n = 1", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lost: Vec<_> = acked.difference(&rows).take(10).collect();
    assert!(
        lost.is_empty(),
        "acknowledged writes missing or not bumped in cr_b: {lost:?}"
    );
    assert_eq!(
        mesh.logged_twice(1).await?,
        0,
        "an event was logged twice in cr_b"
    );
    let from_a: i64 = b
        .query_one(
            "SELECT count(*) FROM mesh.changelog WHERE origin = 'cr_a'",
            &[],
        )
        .await?
        .get(0);
    let in_a: i64 = mesh
        .region(0)
        .admin
        .query_one(
            "SELECT count(*) FROM mesh.changelog WHERE origin = 'cr_a'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(from_a, in_a, "cr_b logged every cr_a event exactly once");
    mesh.shutdown().await;
    Ok(())
}
