//! Pruning the change log: below what every peer has durably applied, a region's
//! own events are deleted (but the newest) and other regions' events keep only
//! their ids; replication, restarts and capture go on as before, and a peer whose
//! checkpoint falls behind the pruned log is refused with the reason instead of
//! being served a hole.
//!
//! Three regions in a full mesh prune every second; so does a hub-and-spoke mesh,
//! where a spoke's events reach the other spoke only through the hub's log. This
//! module owns those checks; the chaos test runs its faults with pruning on too.

use anyhow::Result;
use pgmesh_tests::regions::{Mesh, NodeSpec, CONVERGE_TIMEOUT};
use pgmesh_tests::{wait_for, wait_until};

const SCHEMA: &str = "CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL)";

/// A full mesh of `names` with table `t`, pruning every second, serving `/metrics`.
pub(crate) async fn start_pruning(names: &[&str]) -> Result<Mesh> {
    let mut mesh = Mesh::start(names).await?;
    mesh.exec_all(SCHEMA).await?;
    mesh.init_all().await?;
    let spec = NodeSpec {
        prune_secs: Some(1),
        metrics: true,
        ..NodeSpec::default()
    };
    mesh.start_nodes(|_| spec.clone()).await?;
    Ok(mesh)
}

/// The first column of the first row `sql` returns in region `i`.
pub(crate) async fn scalar(mesh: &Mesh, i: usize, sql: &str) -> Result<i64> {
    Ok(mesh.region(i).admin.query_one(sql, &[]).await?.get(0))
}

/// Inserts ids `from..to` through region `i`'s proxy.
async fn insert(mesh: &Mesh, i: usize, from: i32, to: i32) -> Result<()> {
    let c = mesh.connect_proxy(i).await?;
    for id in from..to {
        c.execute("INSERT INTO t VALUES ($1, 'x')", &[&id]).await?;
    }
    Ok(())
}

/// Waits until region `i` has pruned its log up to at least `seq`.
async fn wait_pruned(mesh: &Mesh, i: usize, seq: i64) -> Result<()> {
    let what = format!("{} to prune up to {seq}", mesh.region(i).name);
    wait_until(CONVERGE_TIMEOUT, &what, || async {
        scalar(mesh, i, "SELECT pruned_upto FROM mesh.log_prune")
            .await
            .is_ok_and(|p| p >= seq)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_pruned_below_what_every_peer_applied_durably() -> Result<()> {
    let mut mesh = start_pruning(&["pr_a", "pr_b", "pr_c"]).await?;
    insert(&mesh, 0, 0, 200).await?;
    insert(&mesh, 1, 1000, 1050).await?;
    mesh.wait_converged(CONVERGE_TIMEOUT).await?;

    // pr_a prunes everything both peers have: its own events but the newest are
    // gone, pr_b's keep their ids without their changes.
    let head = mesh.head(0).await?;
    wait_pruned(&mesh, 0, head).await?;
    let own = "SELECT count(*) FROM mesh.changelog WHERE origin = 'pr_a'";
    assert_eq!(
        scalar(&mesh, 0, own).await?,
        1,
        "pr_a kept only its newest event"
    );
    let others = "SELECT count(*) FILTER (WHERE changes::text = '[]'), count(*)
                  FROM mesh.changelog WHERE origin = 'pr_b'";
    let row = mesh.region(0).admin.query_one(others, &[]).await?;
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (50, 50));
    let acks: Vec<(String, i64)> = mesh
        .region(0)
        .admin
        .query(
            "SELECT peer, durable_seq FROM mesh.peer_acks ORDER BY peer",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(acks.len(), 2, "{acks:?}");
    assert!(acks.iter().all(|(_, s)| *s >= head), "{acks:?}");
    // The receiving regions still have every row.
    assert_eq!(scalar(&mesh, 2, "SELECT count(*) FROM t").await?, 250);

    // Replication, a node restart (capture resumes from the newest own event) and
    // duplicates detection all go on.
    mesh.stop_node(0).await?;
    insert(&mesh, 1, 1050, 1060).await?;
    mesh.restart_node(0).await?;
    insert(&mesh, 0, 200, 220).await?;
    let sums = mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    assert!(sums["public.t"].starts_with("280:"), "{sums:?}");
    for i in 0..3 {
        assert_eq!(mesh.logged_twice(i).await?, 0, "an event logged twice");
    }

    // A peer whose checkpoint went back behind the pruned log is refused, says why,
    // and applies nothing twice.
    let b = &mesh.region(1).admin;
    let kept: i64 = b
        .query_one(
            "SELECT checkpoint FROM mesh.link_state WHERE peer = 'pr_a'",
            &[],
        )
        .await?
        .get(0);
    mesh.stop_node(1).await?;
    mesh.region(1)
        .admin
        .execute(
            "UPDATE mesh.link_state SET checkpoint = 0 WHERE peer = 'pr_a'",
            &[],
        )
        .await?;
    mesh.restart_node(1).await?;
    let error = wait_for(
        CONVERGE_TIMEOUT,
        "pr_b's link from pr_a to fail",
        || async { Ok(mesh.link(1, "pr_a").await?.and_then(|l| l.error)) },
    )
    .await?;
    assert!(error.contains("pruned"), "{error}");
    assert_eq!(scalar(&mesh, 1, "SELECT count(*) FROM t").await?, 280);
    // Put back, it goes on.
    let b = &mesh.region(1).admin;
    b.execute(
        "UPDATE mesh.link_state SET checkpoint = $1 WHERE peer = 'pr_a'",
        &[&kept],
    )
    .await?;
    insert(&mesh, 0, 220, 230).await?;
    let sums = mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    assert!(sums["public.t"].starts_with("290:"), "{sums:?}");
    mesh.shutdown().await;
    Ok(())
}

/// Hub-and-spoke: a spoke prunes once the hub has its events durably, and the hub
/// prunes its relayed copies only once the other spoke has them, so the other spoke
/// misses nothing, across a restart too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_prunes_relayed_events_only_when_every_spoke_has_them() -> Result<()> {
    let mut mesh = Mesh::start(&["ph_hub", "ph_s1", "ph_s2"]).await?;
    mesh.exec_all(SCHEMA).await?;
    mesh.init_all().await?;
    let spec = |i: usize| NodeSpec {
        relay: i == 0,
        peers: (i > 0).then(|| vec!["ph_hub".to_string()]),
        prune_secs: Some(1),
        ..NodeSpec::default()
    };
    mesh.start_nodes(spec).await?;
    insert(&mesh, 1, 0, 100).await?;
    insert(&mesh, 2, 1000, 1100).await?;
    mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    // Every log prunes to its head: the hub's relayed copies are stripped, each
    // spoke's own events are gone but the newest.
    for i in 0..3 {
        let head = mesh.head(i).await?;
        wait_pruned(&mesh, i, head).await?;
    }
    for i in 1..3 {
        let name = &mesh.region(i).name;
        let own = format!("SELECT count(*) FROM mesh.changelog WHERE origin = '{name}'");
        assert_eq!(
            scalar(&mesh, i, &own).await?,
            1,
            "{name} kept only its newest"
        );
    }
    let full = "SELECT count(*) FROM mesh.changelog WHERE changes::text <> '[]'";
    assert_eq!(scalar(&mesh, 0, full).await?, 0, "the hub kept changes");

    // More writes on one spoke while the other restarts: relayed, nothing missing.
    mesh.stop_node(2).await?;
    insert(&mesh, 1, 100, 150).await?;
    mesh.start_node(2, spec(2)).await?;
    insert(&mesh, 2, 1100, 1120).await?;
    let sums = mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    assert!(sums["public.t"].starts_with("270:"), "{sums:?}");
    for i in 0..3 {
        assert_eq!(mesh.logged_twice(i).await?, 0, "an event logged twice");
    }
    mesh.shutdown().await;
    Ok(())
}

/// A node started on a catalog from before pruning upgrades it (the migrations
/// `pgmesh init` applies) and replicates with pruning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_upgrades_an_older_catalog_when_it_starts() -> Result<()> {
    let mut mesh = Mesh::start(&["pu_a", "pu_b"]).await?;
    mesh.exec_all(SCHEMA).await?;
    mesh.init_all().await?;
    // Back to catalog version 6, as a node of the previous release left it.
    mesh.exec_all(
        "DROP FUNCTION mesh.forget_peer(text);
         DROP TABLE mesh.peer_acks, mesh.log_prune;
         ALTER TABLE mesh.link_state DROP COLUMN durable_checkpoint CASCADE,
             DROP COLUMN contact_at CASCADE;
         CREATE VIEW mesh.checkpoints AS
             SELECT peer, checkpoint, applied_hlc, updated_at FROM mesh.link_state;
         CREATE VIEW mesh.links AS
             SELECT l.peer AS name, l.peer AS source,
                    (SELECT name FROM mesh.regions WHERE is_local) AS target,
                    l.address, l.status, l.checkpoint, l.peer_head,
                    greatest(l.peer_head - l.checkpoint, 0) AS backlog_events,
                    0::bigint AS lag_ms, l.last_applied_at, l.error
             FROM mesh.link_state l;
         DELETE FROM mesh.schema_versions WHERE version > 6",
    )
    .await?;
    mesh.start_nodes(|_| NodeSpec {
        prune_secs: Some(1),
        ..NodeSpec::default()
    })
    .await?;
    for i in 0..2 {
        let v = scalar(
            &mesh,
            i,
            "SELECT max(version)::int8 FROM mesh.schema_versions",
        )
        .await?;
        assert_eq!(
            v,
            i64::from(pgmesh_sql::migrations::latest()),
            "{} was not upgraded",
            mesh.region(i).name
        );
    }
    insert(&mesh, 0, 0, 20).await?;
    mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    let head = mesh.head(0).await?;
    wait_pruned(&mesh, 0, head).await?;
    mesh.shutdown().await;
    Ok(())
}
