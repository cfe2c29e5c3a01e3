//! Pruning tombstones (the versions of deleted rows) below each region's frontier.
//!
//! Three regions in a full mesh prune every second, tombstones as soon as the
//! frontier allows. Tombstones go even though the other regions never write (their
//! floors, heard in heartbeats, bound what they can still send); a tombstone that a
//! held-back older write must still lose to stays until that write has arrived,
//! which then loses everywhere; and a spoke hears the other spokes' floors through
//! its hub. This module owns those checks; the chaos test prunes tombstones through
//! its faults too.

use anyhow::{Context, Result};
use pgmesh_tests::regions::{http_get, Mesh, NodeSpec, CONVERGE_TIMEOUT};
use pgmesh_tests::{wait_for, wait_until};

use crate::mesh_metrics::sample;
use crate::mesh_prune::{scalar, start_pruning};

/// Tombstones of rows (not TRUNCATE watermarks) in region `i`.
const TOMBSTONES: &str = "SELECT count(*) FROM mesh.row_versions WHERE deleted AND pk <> '\"*\"'";

/// Runs `sql` through region `i`'s proxy.
async fn write(mesh: &Mesh, i: usize, sql: &str) -> Result<()> {
    mesh.connect_proxy(i).await?.batch_execute(sql).await?;
    Ok(())
}

/// Waits until `sql` counts `n` in region `i`.
async fn wait_count(mesh: &Mesh, i: usize, sql: &str, n: i64) -> Result<()> {
    let what = format!("{sql} = {n} in {}", mesh.region(i).name);
    wait_until(CONVERGE_TIMEOUT, &what, || async {
        scalar(mesh, i, sql).await.is_ok_and(|c| c == n)
    })
    .await
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

/// Waits until a whole tombstone pass of region `i` ran after the call: two passes
/// started since (each records when it read the frontier, then deletes).
async fn wait_tombstone_pass(mesh: &Mesh, i: usize) -> Result<()> {
    let checked = "SELECT coalesce(extract(epoch FROM tombstones_checked_at) * 1e6, 0)::int8
                   FROM mesh.log_prune";
    let mut since = scalar(mesh, i, "SELECT (extract(epoch FROM now()) * 1e6)::int8").await?;
    for _ in 0..2 {
        let what = format!("a tombstone pass of {}", mesh.region(i).name);
        since = wait_for(CONVERGE_TIMEOUT, &what, || async {
            let at = scalar(mesh, i, checked).await?;
            Ok((at > since).then_some(at))
        })
        .await?;
    }
    Ok(())
}

/// The frontier region `i` found in its last tombstone pass (-1: none).
async fn frontier(mesh: &Mesh, i: usize) -> Result<i64> {
    scalar(
        mesh,
        i,
        "SELECT coalesce(tombstone_frontier, -1) FROM mesh.log_prune",
    )
    .await
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

    // Deletes leave tombstones everywhere. ts_b and ts_c never write, but their
    // floors tell that nothing older can come from them, and every region prunes.
    write(&mesh, 0, "DELETE FROM t WHERE id <= 10").await?;
    mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    // Each region holds the ten tombstones, or pruned some already (a pass runs every
    // second): one snapshot counts both.
    let made = format!(
        "SELECT ({TOMBSTONES}) + (SELECT coalesce(sum(tombstones_pruned), 0)::int8 FROM mesh.log_prune)"
    );
    for i in 0..3 {
        assert_eq!(scalar(&mesh, i, &made).await?, 10);
    }
    wait_no_tombstones(&mesh).await?;
    let origins = "SELECT count(DISTINCT origin) FROM mesh.changelog";
    assert_eq!(scalar(&mesh, 0, origins).await?, 1, "only ts_a wrote");
    // The metrics say so: what was pruned, and a frontier of a moment ago.
    let addr = mesh.metrics_addr(0).context("ts_a serves metrics")?;
    let (_, body) = http_get(addr, "/metrics").await?;
    let pruned = sample(&body, "pgmesh_tombstones_pruned_total{region=\"ts_a\"}")?;
    assert!(pruned >= 10.0, "{pruned} tombstones pruned");
    let frontier = sample(&body, "pgmesh_tombstone_frontier_seconds{region=\"ts_a\"}")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    assert!(
        frontier > now - 600.0 && frontier <= now + 1.0,
        "frontier {frontier}, now {now}"
    );

    // ts_c updates row 15 while ts_a and ts_b do not hear from it; then ts_a deletes
    // the row, later by HLC. The update must lose when it arrives, so the delete's
    // tombstone stays in ts_a and ts_b however far they prune meanwhile.
    mesh.pause_link(0, "ts_c").await?;
    mesh.pause_link(1, "ts_c").await?;
    let own_floor =
        "SELECT coalesce(max(floor_hlc), 0) FROM mesh.region_floors WHERE region = 'ts_c'";
    let floor = scalar(&mesh, 2, own_floor).await?;
    assert!(floor > 0, "ts_c's capture publishes its floor");
    write(&mesh, 2, "UPDATE t SET v = 'c, held back' WHERE id = 15").await?;
    // The delete is later by HLC: ts_a has not seen the update, so make sure its
    // clock has passed the update's millisecond.
    let update = wait_for(CONVERGE_TIMEOUT, "ts_c to log its update", || async {
        let h = scalar(
            &mesh,
            2,
            "SELECT coalesce(max(hlc), 0) FROM mesh.changelog WHERE origin = 'ts_c'",
        )
        .await?;
        Ok((h > 0).then_some(h))
    })
    .await?;
    assert!(
        update >= floor,
        "update {update} below ts_c's floor {floor}"
    );
    let update_ms = update >> 16;
    let now_ms = "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::int8";
    wait_until(
        CONVERGE_TIMEOUT,
        "ts_a's clock to pass the update",
        || async {
            scalar(&mesh, 0, now_ms)
                .await
                .is_ok_and(|ms| ms > update_ms)
        },
    )
    .await?;
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
    // ts_b's write after the delete is in ts_a too: only ts_c holds the frontier.
    wait_until(CONVERGE_TIMEOUT, "row 200 to reach ts_a", || async {
        scalar(&mesh, 0, "SELECT count(*) FROM t WHERE id = 200")
            .await
            .is_ok_and(|n| n == 1)
    })
    .await?;
    wait_tombstone_pass(&mesh, 0).await?;
    wait_tombstone_pass(&mesh, 1).await?;
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
    // And once ts_c is heard from again, that tombstone goes too.
    wait_no_tombstones(&mesh).await?;
    mesh.shutdown().await;
    Ok(())
}

/// A spoke hears of the other spokes, and of their floors, only through its hub.
/// While the hub does not hear from a spoke, that spoke holds the other spoke's
/// frontier below a delete made meanwhile (its first change may be older); once
/// the hub hears from it again, its floor comes through and the tombstones go,
/// though it never wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoke_hears_the_other_spokes_and_their_floors_through_its_hub() -> Result<()> {
    let mut mesh = Mesh::start(&["th_hub", "th_s1", "th_s2"]).await?;
    mesh.exec_all("CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL)")
        .await?;
    mesh.init_all().await?;
    mesh.start_nodes(|i| NodeSpec {
        relay: i == 0,
        peers: (i > 0).then(|| vec!["th_hub".to_string()]),
        prune_secs: Some(1),
        ..NodeSpec::default()
    })
    .await?;
    write(
        &mesh,
        1,
        "INSERT INTO t SELECT g, 'x' FROM generate_series(1, 10) g",
    )
    .await?;
    mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    let heard = "SELECT count(*) FROM mesh.mesh_regions WHERE name = 'th_s2' AND NOT forgotten";
    assert_eq!(scalar(&mesh, 1, heard).await?, 1, "th_s1 heard of th_s2");
    let s2_floor =
        "SELECT coalesce(max(floor_hlc), 0) FROM mesh.region_floors WHERE region = 'th_s2'";
    wait_until(CONVERGE_TIMEOUT, "th_s2's floor to reach th_s1", || async {
        scalar(&mesh, 1, s2_floor).await.is_ok_and(|f| f > 0)
    })
    .await?;

    // The hub stops pulling from th_s2, so the mesh does not converge meanwhile:
    // wait for the rows instead.
    mesh.pause_link(0, "th_s2").await?;
    write(&mesh, 1, "DELETE FROM t WHERE id <= 5").await?;
    for i in [0, 2] {
        wait_count(&mesh, i, "SELECT count(*) FROM t WHERE id <= 5", 0).await?;
    }
    let delete = scalar(
        &mesh,
        1,
        "SELECT max(hlc) FROM mesh.changelog WHERE origin = 'th_s1'",
    )
    .await?;
    write(&mesh, 0, "INSERT INTO t VALUES (100, 'hub')").await?;
    write(&mesh, 1, "INSERT INTO t VALUES (101, 's1')").await?;
    wait_count(&mesh, 0, "SELECT count(*) FROM t WHERE id = 101", 1).await?;
    wait_count(&mesh, 1, "SELECT count(*) FROM t WHERE id = 100", 1).await?;
    wait_tombstone_pass(&mesh, 1).await?;
    let f = frontier(&mesh, 1).await?;
    assert!(
        f < delete,
        "th_s2 holds th_s1's frontier ({f}) below the delete ({delete})"
    );
    assert_eq!(scalar(&mesh, 1, TOMBSTONES).await?, 5);

    mesh.resume_link(0, "th_s2").await?;
    mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    wait_no_tombstones(&mesh).await?;
    assert_eq!(
        scalar(
            &mesh,
            1,
            "SELECT count(*) FROM mesh.changelog WHERE origin = 'th_s2'"
        )
        .await?,
        0,
        "th_s2 never wrote"
    );
    mesh.shutdown().await;
    Ok(())
}

/// A region's floor trails its database clock, so a write after it keeps its
/// commit time as its HLC (the floor decides no conflict), and a capture leader
/// that starts later never goes below a stored floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_floor_trails_the_clock_and_binds_the_next_capture_leader() -> Result<()> {
    let mut mesh = start_pruning(&["tf_a", "tf_b"]).await?;
    let own = "SELECT coalesce(max(floor_hlc), 0) FROM mesh.region_floors WHERE region = 'tf_a'";
    let floor = wait_for(CONVERGE_TIMEOUT, "tf_a's floor", || async {
        let f = scalar(&mesh, 0, own).await?;
        Ok((f > 0).then_some(f))
    })
    .await?;
    let now_ms = "SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::int8";
    let now = scalar(&mesh, 0, now_ms).await?;
    assert!(
        floor >> 16 <= now - 2000,
        "floor {} ms, database clock {now} ms",
        floor >> 16
    );

    // Written directly (no stamp): its HLC is its commit time, not the floor.
    mesh.region(0)
        .admin
        .batch_execute("INSERT INTO t VALUES (1, 'direct')")
        .await?;
    let (hlc, commit_ms) = nth_logged(&mesh, 1).await?;
    assert_eq!(hlc >> 16, commit_ms, "the floor raised a later write's HLC");

    // A floor far ahead, stored while no leader runs, binds the next one.
    mesh.stop_node(0).await?;
    let ahead = (now + 3_600_000) << 16;
    mesh.region(0)
        .admin
        .execute(
            "UPDATE mesh.region_floors SET floor_hlc = $1 WHERE region = 'tf_a'",
            &[&ahead],
        )
        .await?;
    mesh.restart_node(0).await?;
    mesh.region(0)
        .admin
        .batch_execute("INSERT INTO t VALUES (2, 'after the restart')")
        .await?;
    let (hlc, _) = nth_logged(&mesh, 2).await?;
    assert!(hlc >= ahead, "HLC {hlc} below the stored floor {ahead}");
    mesh.shutdown().await;
    Ok(())
}

/// Once region 0 has logged `n` events of its own: the HLC and the commit time
/// (Unix ms) of the last.
async fn nth_logged(mesh: &Mesh, n: i64) -> Result<(i64, i64)> {
    let own = "SELECT count(*) FROM mesh.changelog WHERE origin = 'tf_a'";
    wait_count(mesh, 0, own, n).await?;
    let last = "SELECT hlc, floor(extract(epoch FROM commit_ts) * 1000)::int8
                FROM mesh.changelog WHERE origin = 'tf_a' ORDER BY seq DESC LIMIT 1";
    let r = mesh.region(0).admin.query_one(last, &[]).await?;
    Ok((r.get(0), r.get(1)))
}
