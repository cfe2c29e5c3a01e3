//! Pruning tombstones (the versions of deleted rows) below each region's frontier.
//!
//! Three regions in a full mesh prune every second, tombstones as soon as the
//! frontier allows. Tombstones go once every region has written after the deletes;
//! and a tombstone that a held-back older write must still lose to stays until that
//! write has arrived, which then loses everywhere. This module owns those checks;
//! the chaos test prunes tombstones through its faults too.

use anyhow::Result;
use pgmesh_tests::regions::{Mesh, CONVERGE_TIMEOUT};
use pgmesh_tests::wait_until;

use crate::mesh_prune::{scalar, start_pruning};

/// Tombstones of rows (not TRUNCATE watermarks) in region `i`.
const TOMBSTONES: &str = "SELECT count(*) FROM mesh.row_versions WHERE deleted AND pk <> '\"*\"'";

/// Runs `sql` through region `i`'s proxy.
async fn write(mesh: &Mesh, i: usize, sql: &str) -> Result<()> {
    mesh.connect_proxy(i).await?.batch_execute(sql).await?;
    Ok(())
}

/// One more write in every region, one after the other, replicated everywhere: each
/// region's newest event is then newer than anything before.
async fn write_everywhere(mesh: &Mesh, id: i32) -> Result<()> {
    for i in 0..mesh.regions.len() {
        let id = id + i as i32;
        write(mesh, i, &format!("INSERT INTO t VALUES ({id}, 'later')")).await?;
    }
    mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    Ok(())
}

/// Waits until every region has pruned all its tombstones.
async fn wait_no_tombstones(mesh: &Mesh) -> Result<()> {
    for i in 0..mesh.regions.len() {
        let what = format!("{} to prune its tombstones", mesh.region(i).name);
        wait_until(CONVERGE_TIMEOUT, &what, || async {
            scalar(mesh, i, TOMBSTONES).await.is_ok_and(|n| n == 0)
        })
        .await?;
    }
    Ok(())
}

/// Waits until region `i`'s pruner has run twice more (its log pruning reached the
/// head twice, with a write in between): a whole tombstone pass ran after the call.
async fn wait_prune_pass(mesh: &Mesh, i: usize, id: i32) -> Result<()> {
    for round in 0..2 {
        if round == 1 {
            write(mesh, i, &format!("INSERT INTO t VALUES ({id}, 'tick')")).await?;
        }
        let head = mesh.head(i).await?;
        let what = format!("{} to prune its log up to {head}", mesh.region(i).name);
        wait_until(CONVERGE_TIMEOUT, &what, || async {
            scalar(mesh, i, "SELECT pruned_upto FROM mesh.log_prune")
                .await
                .is_ok_and(|p| p >= head)
        })
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_are_pruned_only_when_no_older_change_can_arrive() -> Result<()> {
    let mesh = start_pruning(&["ts_a", "ts_b", "ts_c"]).await?;
    write(
        &mesh,
        0,
        "INSERT INTO t SELECT g, 'x' FROM generate_series(1, 20) g",
    )
    .await?;
    mesh.wait_converged(CONVERGE_TIMEOUT).await?;

    // Deletes leave tombstones everywhere; once every region has written after
    // them, nothing older can arrive, and every region prunes them.
    write(&mesh, 0, "DELETE FROM t WHERE id <= 10").await?;
    mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    for i in 0..3 {
        assert_eq!(scalar(&mesh, i, TOMBSTONES).await?, 10);
    }
    write_everywhere(&mesh, 100).await?;
    wait_no_tombstones(&mesh).await?;

    // ts_c updates row 15 while ts_a and ts_b do not hear from it; then ts_a deletes
    // the row, later by HLC. The update must lose when it arrives, so the delete's
    // tombstone stays in ts_a and ts_b however far they prune meanwhile.
    mesh.pause_link(0, "ts_c").await?;
    mesh.pause_link(1, "ts_c").await?;
    write(&mesh, 2, "UPDATE t SET v = 'c, held back' WHERE id = 15").await?;
    write(&mesh, 0, "DELETE FROM t WHERE id = 15").await?;
    write(
        &mesh,
        1,
        "INSERT INTO t VALUES (200, 'b, after the delete')",
    )
    .await?;
    let gone = "SELECT count(*) FROM t WHERE id = 15";
    for i in 0..3 {
        let what = format!("the delete to reach {}", mesh.region(i).name);
        wait_until(CONVERGE_TIMEOUT, &what, || async {
            scalar(&mesh, i, gone).await.is_ok_and(|n| n == 0)
        })
        .await?;
    }
    wait_prune_pass(&mesh, 0, 300).await?;
    wait_prune_pass(&mesh, 1, 301).await?;
    let tomb = "SELECT count(*) FROM mesh.row_versions WHERE deleted AND pk = '[[\"id\", \"15\"]]'";
    for i in 0..2 {
        assert_eq!(
            scalar(&mesh, i, tomb).await?,
            1,
            "{} kept the tombstone of row 15",
            mesh.region(i).name
        );
    }
    mesh.resume_link(0, "ts_c").await?;
    mesh.resume_link(1, "ts_c").await?;
    mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    for i in 0..3 {
        assert_eq!(scalar(&mesh, i, gone).await?, 0, "row 15 came back");
    }
    // And once ts_c writes again, that tombstone goes too.
    write_everywhere(&mesh, 400).await?;
    wait_no_tombstones(&mesh).await?;
    mesh.shutdown().await;
    Ok(())
}
