//! A region's node is SIGKILLed for more than 30 seconds while the other regions
//! keep writing, then started again: it catches up and no acknowledged write is
//! lost anywhere.
//!
//! All three nodes are real `pgmesh run` processes (a kill must be a real
//! process death). Every write inserts a unique key and is recorded only once
//! its commit returned to the client, so no later write can supersede it and
//! each must exist in every region at the end. The killed region's database
//! stays up and takes writes that bypass its dead node; capture must pick those
//! up from its slot after the restart. This module owns that scenario.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pgmesh_tests::regions::{Mesh, NodeSpec, CONVERGE_TIMEOUT};

const SCHEMA: &str = "CREATE TABLE writes (id bigint PRIMARY KEY, origin text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())";
/// How long the node stays dead while the others write.
const OUTAGE: Duration = Duration::from_secs(31);
/// At most one write per writer per this interval.
const PACE: Duration = Duration::from_millis(15);

/// Inserts unique ids `base + n` until `until`; returns the ids whose commit
/// returned. The first error ends the writer (and fails the test).
async fn writer(conn: String, base: i64, tag: String, until: Instant) -> Result<Vec<i64>> {
    let c = pgmesh_tests::connect(&conn).await?;
    let mut acked = Vec::new();
    let mut n = 0;
    // Paced, so the catch-up stays a few thousand events on a small machine.
    let mut pace = tokio::time::interval(PACE);
    while Instant::now() < until {
        pace.tick().await;
        let id = base + n;
        n += 1;
        c.execute(
            "INSERT INTO writes (id, origin) VALUES ($1, $2)",
            &[&id, &tag],
        )
        .await
        .with_context(|| format!("{tag}: insert {id}"))?;
        acked.push(id);
    }
    Ok(acked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_catches_up_and_no_acknowledged_write_is_lost() -> Result<()> {
    let started = Instant::now();
    let mut mesh = Mesh::start(&["out_a", "out_b", "out_c"]).await?;
    mesh.exec_all(SCHEMA).await?;
    mesh.init_all().await?;
    mesh.start_nodes(|_| NodeSpec {
        process: true,
        ..NodeSpec::default()
    })
    .await?;
    // The mesh replicates before the outage.
    for i in 0..3 {
        let id = -(i as i64) - 1;
        mesh.connect_proxy(i)
            .await?
            .execute(
                "INSERT INTO writes (id, origin) VALUES ($1, 'warmup')",
                &[&id],
            )
            .await?;
    }
    mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    eprintln!("mesh of processes up and warm at {:?}", started.elapsed());

    mesh.kill_node(2).await?;
    let killed_at = Instant::now();
    // The writers run for the whole outage: the workload's length.
    let until = killed_at + OUTAGE;
    let mut writers = Vec::new();
    for (k, (conn, tag)) in [
        (mesh.proxy_conn_string(0)?, "out_a"),
        (mesh.proxy_conn_string(0)?, "out_a"),
        (mesh.proxy_conn_string(1)?, "out_b"),
        (mesh.proxy_conn_string(1)?, "out_b"),
        // Straight into the killed region's database: captured after restart.
        (mesh.region(2).cluster.conn_string(), "out_c_direct"),
    ]
    .into_iter()
    .enumerate()
    {
        let base = (k as i64 + 1) * 1_000_000_000;
        writers.push(tokio::spawn(writer(conn, base, tag.to_string(), until)));
    }
    let mut acked = BTreeSet::new();
    for w in writers {
        let ids = w.await??;
        assert!(!ids.is_empty(), "a writer committed nothing");
        acked.extend(ids);
    }
    eprintln!(
        "{} writes acknowledged during a {:?} outage",
        acked.len(),
        killed_at.elapsed()
    );

    mesh.restart_node(2).await?;
    let restarted = Instant::now();
    let sums = mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    eprintln!(
        "the restarted node caught up in {:?}: {sums:?}",
        restarted.elapsed()
    );
    for r in &mesh.regions {
        let present: BTreeSet<i64> = r
            .admin
            .query("SELECT id FROM writes WHERE id > 0", &[])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let lost: Vec<_> = acked.difference(&present).take(10).collect();
        assert!(
            lost.is_empty(),
            "{}: {} acknowledged writes missing, e.g. {lost:?}",
            r.name,
            acked.difference(&present).count()
        );
        assert_eq!(
            present.len(),
            acked.len(),
            "{}: unexpected extra rows",
            r.name
        );
    }
    eprintln!("outage test done in {:?}", started.elapsed());
    mesh.shutdown().await;
    Ok(())
}

/// Inserts `id` through region 0's proxy, on a new connection.
async fn insert(mesh: &Mesh, id: i64) -> Result<()> {
    pgmesh_tests::connect(&mesh.proxy_conn_string(0)?)
        .await?
        .execute(
            "INSERT INTO writes (id, origin) VALUES ($1, 'restart_a')",
            &[&id],
        )
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_keeps_serving_its_log_after_its_database_restarts() -> Result<()> {
    let mut mesh = Mesh::start(&["restart_a", "restart_b"]).await?;
    mesh.exec_all(SCHEMA).await?;
    mesh.init_all().await?;
    mesh.start_nodes(|_| NodeSpec::default()).await?;
    insert(&mesh, 1).await?;
    mesh.wait_converged(CONVERGE_TIMEOUT).await?;

    mesh.restart_database(0).await?;
    // The node's proxy, capture and links reconnect; a new write must still
    // reach the other region.
    insert(&mesh, 2).await?;
    mesh.wait_converged(Duration::from_secs(60)).await?;
    mesh.shutdown().await;
    Ok(())
}
