//! Duplicate delivery and replay from an old checkpoint apply nothing twice.
//!
//! Region `rp_a` writes rows, deletes and counter increments (`n = n + 1`, the
//! write that a double apply would betray); `rp_b` receives them. Then `rp_b`
//! gets everything again three ways: its link's checkpoint is reset to 0 and the
//! link paused and resumed; the whole log is handed to apply directly, twice in
//! one batch; and the checkpoint is reset again and the node restarted. After
//! each, rows, counters, row versions, conflicts and the change log (no repeated
//! `(origin, hlc)`) must be exactly as before, and a new increment must still
//! count once. This module owns that scenario.

use std::collections::BTreeMap;

use anyhow::Result;
use pgmesh_replicator::apply::Applier;
use pgmesh_replicator::catalog;
use pgmesh_replicator::log::{ChangeLog, TableLog};
use pgmesh_tests::regions::{Mesh, NodeSpec, CONVERGE_TIMEOUT, LOGGED_TWICE};
use pgmesh_tests::wait_until;

const SCHEMA: &str = "
CREATE TABLE counters (id int PRIMARY KEY, n int NOT NULL);
CREATE TABLE items (id int PRIMARY KEY, v text);";

/// Everything a double apply could change in a region.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    tables: BTreeMap<String, String>,
    counters: Vec<(i32, i32)>,
    conflicts: i64,
    log_events: i64,
    repeated_ids: i64,
    versions: String,
    dead_letters: i64,
}

async fn snapshot(mesh: &Mesh, i: usize) -> Result<Snapshot> {
    let c = &mesh.region(i).admin;
    let one = |sql: &'static str| async move {
        anyhow::Ok(c.query_one(sql, &[]).await?.get::<_, i64>(0))
    };
    Ok(Snapshot {
        tables: mesh.checksums(i).await?,
        counters: c
            .query("SELECT id, n FROM counters ORDER BY id", &[])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect(),
        conflicts: one("SELECT count(*) FROM mesh.conflicts").await?,
        log_events: one("SELECT count(*) FROM mesh.changelog").await?,
        repeated_ids: one(LOGGED_TWICE).await?,
        versions: c
            .query_one(
                "SELECT md5(coalesce(string_agg(concat_ws(' ', tbl, pk, hlc, origin, deleted), ',' ORDER BY tbl, pk::text), ''))
                 FROM mesh.row_versions",
                &[],
            )
            .await?
            .get(0),
        dead_letters: one("SELECT count(*) FROM mesh.dead_letters").await?,
    })
}

/// Waits until `rp_b` has re-received all of `rp_a`'s log: its checkpoint is
/// back at `rp_a`'s head and its node counted at least `shipped` duplicates.
async fn wait_replayed(mesh: &Mesh, shipped: u64, dup_before: u64) -> Result<()> {
    let head = mesh.head(0).await?;
    wait_until(
        CONVERGE_TIMEOUT,
        "rp_b to re-receive rp_a's whole log",
        || async {
            let dups = mesh
                .region(1)
                .handle()
                .map_or(0, |h| h.metrics.link_counters("rp_a").duplicate_events);
            let at = mesh
                .link(1, "rp_a")
                .await
                .ok()
                .flatten()
                .map(|l| l.checkpoint);
            at == Some(head) && dups >= dup_before + shipped
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_and_replays_apply_nothing_twice() -> Result<()> {
    let mut mesh = Mesh::start(&["rp_a", "rp_b"]).await?;
    mesh.exec_all(SCHEMA).await?;
    mesh.init_all().await?;
    mesh.start_nodes(|_| NodeSpec::default()).await?;
    let a = mesh.connect_proxy(0).await?;
    a.batch_execute("INSERT INTO counters SELECT g, 0 FROM generate_series(1, 5) g")
        .await?;
    for k in 0..30 {
        a.execute(
            "UPDATE counters SET n = n + 1 WHERE id = $1",
            &[&(k % 5 + 1)],
        )
        .await?;
    }
    for k in 1..=40 {
        a.execute("INSERT INTO items VALUES ($1::int, 'v' || $1::int)", &[&k])
            .await?;
    }
    a.batch_execute(
        "DELETE FROM items WHERE id % 4 = 0; UPDATE items SET v = v || '!' WHERE id % 3 = 0",
    )
    .await?;
    mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    // rp_b's own writes, so its log holds both origins.
    mesh.connect_proxy(1)
        .await?
        .batch_execute("INSERT INTO items SELECT g, 'b' FROM generate_series(100, 110) g; UPDATE counters SET n = n + 100 WHERE id = 1")
        .await?;
    mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    let before = snapshot(&mesh, 1).await?;
    assert_eq!(before.counters, [(1, 106), (2, 6), (3, 6), (4, 6), (5, 6)]);
    assert_eq!(before.repeated_ids, 0);
    let shipped: i64 = mesh
        .region(0)
        .admin
        .query_one(
            "SELECT count(*) FROM mesh.changelog WHERE origin = 'rp_a'",
            &[],
        )
        .await?
        .get(0);
    let shipped = shipped as u64;

    // 1. Replay from checkpoint 0 through the running link (pause, reset, resume).
    let counters = |m: &Mesh| {
        m.region(1)
            .handle()
            .expect("in-process")
            .metrics
            .link_counters("rp_a")
    };
    let (applied0, dups0) = (
        counters(&mesh).applied_events,
        counters(&mesh).duplicate_events,
    );
    mesh.pause_link(1, "rp_a").await?;
    mesh.region(1)
        .admin
        .execute(
            "UPDATE mesh.link_state SET checkpoint = 0 WHERE peer = 'rp_a'",
            &[],
        )
        .await?;
    mesh.resume_link(1, "rp_a").await?;
    wait_replayed(&mesh, shipped, dups0).await?;
    mesh.wait_quiescent(CONVERGE_TIMEOUT).await?;
    assert_eq!(
        snapshot(&mesh, 1).await?,
        before,
        "after replay from checkpoint 0"
    );
    assert_eq!(
        counters(&mesh).applied_events,
        applied0,
        "a replayed event was applied"
    );

    // 2. Duplicate delivery straight into apply: the whole log, twice in one batch.
    mesh.stop_node(1).await?;
    let mut log = TableLog::new(catalog::connect(&mesh.region(0).url()).await?).await?;
    let once = log.read_after(0, 1_000_000).await?;
    let twice: Vec<_> = once.iter().chain(once.iter()).cloned().collect();
    let regions = ["rp_a".to_string()];
    let mut applier =
        Applier::connect(&mesh.region(1).url(), "rp_b", "rp_a", &regions, None).await?;
    let checkpoint = applier.checkpoint("rp_a").await?;
    let head = mesh.head(0).await?;
    let out = applier
        .apply_batch("rp_a", &twice, checkpoint, head)
        .await?;
    assert_eq!(
        (out.applied, out.duplicates, out.conflicts, out.dead_letters),
        (0, twice.len(), 0, 0),
        "a batch of duplicates: {out:?}"
    );
    drop(applier);
    assert_eq!(
        snapshot(&mesh, 1).await?,
        before,
        "after a batch of duplicates"
    );

    // 3. Replay from checkpoint 0 by restarting the node.
    mesh.region(1)
        .admin
        .execute(
            "UPDATE mesh.link_state SET checkpoint = 0 WHERE peer = 'rp_a'",
            &[],
        )
        .await?;
    mesh.restart_node(1).await?;
    wait_replayed(&mesh, shipped, 0).await?;
    mesh.wait_quiescent(CONVERGE_TIMEOUT).await?;
    assert_eq!(
        snapshot(&mesh, 1).await?,
        before,
        "after a restart from checkpoint 0"
    );
    assert_eq!(
        counters(&mesh).applied_events,
        0,
        "a replayed event was applied"
    );

    // A new increment still counts exactly once.
    a.execute("UPDATE counters SET n = n + 1 WHERE id = 2", &[])
        .await?;
    mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    let after = snapshot(&mesh, 1).await?;
    assert_eq!(after.counters, [(1, 106), (2, 7), (3, 6), (4, 6), (5, 6)]);
    assert_eq!((after.repeated_ids, after.conflicts), (0, before.conflicts));
    mesh.shutdown().await;
    Ok(())
}
