//! The frontier rules and what a tombstone prune leaves, on a real database.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;
use crate::catalog;
use crate::scratch;

/// The HLC of `secs` seconds ago.
fn ago(secs: i64) -> i64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    (now.as_millis() as i64 - secs * 1000) << 16
}

async fn version(c: &Client, pk: &str, hlc: i64, deleted: bool) {
    c.execute(
        "INSERT INTO mesh.row_versions (tbl, pk, hlc, origin, deleted) VALUES ('public.t', $1, $2, 2, $3)",
        &[&pk, &hlc, &deleted],
    )
    .await
    .unwrap();
}

/// The keys left in `mesh.row_versions`.
async fn left(c: &Client) -> Vec<String> {
    c.query("SELECT pk FROM mesh.row_versions ORDER BY pk", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn tombstones_go_below_the_frontier_of_every_remote_origin_and_the_retention() {
    let Some(url) = scratch::database("pgmesh_tombstones").await else {
        return;
    };
    let c = catalog::connect(&url).await.unwrap();
    let peers = vec!["r2".to_string(), "r3".to_string()];
    let none = Duration::ZERO;
    // This region (r1) logged its own event long ago: its own writes never arrive
    // here as events, so it does not hold the frontier back.
    scratch::logged(&c, "r1", ago(500)).await;
    scratch::logged(&c, "r2", ago(100)).await;
    scratch::logged(&c, "r2", ago(50)).await;
    version(&c, "a", ago(90), true).await;
    version(&c, "b", ago(60), true).await;
    version(&c, "c", ago(10), true).await;
    version(&c, "live", ago(95), false).await;
    version(&c, WATERMARK, ago(95), true).await;
    let all = ["\"*\"", "a", "b", "c", "live"];

    // r3 is configured and has no event here: nothing can be pruned, and it is named.
    let p = prune(&c, "r1", &peers, none).await.unwrap();
    assert_eq!((p.frontier, p.deleted), (Some(0), 0));
    assert_eq!(p.waiting_for, ["r3"]);
    assert_eq!(left(&c).await, all);

    // The frontier is the lowest of r2's and r3's newest events here.
    scratch::logged(&c, "r3", ago(70)).await;
    let p = prune(&c, "r1", &peers, none).await.unwrap();
    assert!(p.waiting_for.is_empty());
    assert_eq!(p.deleted, 1, "only a is below r3's newest event");
    assert_eq!(left(&c).await, ["\"*\"", "b", "c", "live"]);

    // A pending dead letter from r2 at -75 s would be applied late by a retry: the
    // frontier stays below it even though r3 moved on.
    scratch::logged(&c, "r3", ago(5)).await;
    c.execute(
        "INSERT INTO mesh.dead_letters (peer, origin, hlc, event, error) VALUES ('r2', 'r2', $1, '{}', 'x')",
        &[&ago(75)],
    )
    .await
    .unwrap();
    let p = prune(&c, "r1", &peers, none).await.unwrap();
    assert_eq!(p.deleted, 0);
    assert!(p.frontier.is_some_and(|f| f < ago(74)), "{p:?}");
    c.execute("UPDATE mesh.dead_letters SET status = 'skipped'", &[])
        .await
        .unwrap();
    let p = prune(&c, "r1", &peers, none).await.unwrap();
    assert_eq!(p.deleted, 1, "b goes once the dead letter is skipped");
    // A region that once sent events counts even when not configured.
    scratch::logged(&c, "r4", ago(57)).await;
    version(&c, "d", ago(58), true).await;
    version(&c, "e", ago(56), true).await;
    let p = prune(&c, "r1", &peers, none).await.unwrap();
    assert_eq!(p.deleted, 1, "d is below r4's newest event, e is not");
    assert_eq!(left(&c).await, ["\"*\"", "c", "e", "live"]);

    // With every origin recent, the retention keeps what is younger than it.
    for r in ["r2", "r3", "r4"] {
        scratch::logged(&c, r, ago(1)).await;
    }
    let p = prune(&c, "r1", &peers, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(p.deleted, 0);
    let p = prune(&c, "r1", &peers, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(p.deleted, 1, "e is older than 30 s, c is not");
    // Live rows' versions and the TRUNCATE watermark stay.
    assert_eq!(left(&c).await, ["\"*\"", "c", "live"]);
    scratch::drop_database(&url).await;
}

#[tokio::test]
async fn no_remote_origin_no_frontier() {
    let Some(url) = scratch::database("pgmesh_tombstones_alone").await else {
        return;
    };
    let c = catalog::connect(&url).await.unwrap();
    scratch::logged(&c, "r1", ago(100)).await;
    version(&c, "a", ago(90), true).await;
    let p = prune(&c, "r1", &[], Duration::ZERO).await.unwrap();
    assert_eq!((p.frontier, p.deleted), (None, 0));
    assert_eq!(left(&c).await, ["a"]);
    scratch::drop_database(&url).await;
}

#[tokio::test]
async fn regions_heard_of_count_until_forgotten() {
    let Some(url) = scratch::database("pgmesh_tombstones_heard").await else {
        return;
    };
    let c = catalog::connect(&url).await.unwrap();
    // A spoke (s1) whose hub told it of another spoke (s2) that has not written.
    let hub = vec!["hub".to_string()];
    scratch::logged(&c, "hub", ago(10)).await;
    version(&c, "a", ago(90), true).await;
    c.execute(
        "INSERT INTO mesh.mesh_regions (name, learned_from) VALUES ('hub', 'hub'), ('s1', 'hub'), ('s2', 'hub')",
        &[],
    )
    .await
    .unwrap();
    let p = prune(&c, "s1", &hub, Duration::ZERO).await.unwrap();
    assert_eq!((p.frontier, p.deleted), (Some(0), 0));
    assert_eq!(p.waiting_for, ["s2"]);
    let (f, checked): (Option<i64>, bool) = {
        let r = c
            .query_one(
                "SELECT tombstone_frontier, tombstones_checked_at IS NOT NULL FROM mesh.log_prune",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((f, checked), (Some(0), true), "the pass is recorded");

    // Forgotten (gone for good), s2 no longer holds it back; the count is kept.
    let known: bool = c
        .query_one("SELECT mesh.forget_peer('s2')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(known);
    let unknown: bool = c
        .query_one("SELECT mesh.forget_peer('nobody')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!unknown);
    // A region that forgot itself under version 10 is restored by version 13...
    catalog::register_region(&c, "s1").await.unwrap();
    c.execute(
        "UPDATE mesh.mesh_regions SET forgotten = true WHERE name = 's1'",
        &[],
    )
    .await
    .unwrap();
    let v13 = pgmesh_sql::migrations::MIGRATIONS
        .iter()
        .find(|m| m.version == 13)
        .unwrap();
    c.batch_execute(v13.sql).await.unwrap();
    // ...and its own name is refused from then on, changing nothing.
    let err = c
        .query_one("SELECT mesh.forget_peer('s1')", &[])
        .await
        .expect_err("the local region cannot be forgotten");
    assert_eq!(err.code().map(|s| s.code()), Some("22023"), "{err:?}");
    let forgotten: bool = c
        .query_one(
            "SELECT forgotten FROM mesh.mesh_regions WHERE name = 's1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!forgotten);
    let p = prune(&c, "s1", &hub, Duration::ZERO).await.unwrap();
    assert_eq!(p.deleted, 1);
    assert!(p.waiting_for.is_empty());
    let total: i64 = c
        .query_one("SELECT tombstones_pruned FROM mesh.log_prune", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 1);
    scratch::drop_database(&url).await;
}

/// `(tuples updated, of which HOT)` in `mesh.row_versions` by the open transaction.
async fn updates_here(c: &Client) -> (i64, i64) {
    let r = c
        .query_one(
            "SELECT pg_stat_get_xact_tuples_updated('mesh.row_versions'::regclass),
                    pg_stat_get_xact_tuples_hot_updated('mesh.row_versions'::regclass)",
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

#[tokio::test]
async fn a_version_that_stays_live_is_updated_in_place_and_a_tombstone_is_indexed() {
    let Some(url) = scratch::database("pgmesh_hot_versions").await else {
        return;
    };
    let c = catalog::connect(&url).await.unwrap();
    version(&c, "a", ago(90), false).await;
    let store = |hlc: i64, deleted: bool| {
        let c = &c;
        async move {
            c.execute(
                crate::log::versions::STORE,
                &[
                    &vec!["public.t"],
                    &vec!["a"],
                    &vec![hlc],
                    &vec![2i16],
                    &vec![deleted],
                    &vec![None::<i64>],
                ],
            )
            .await
            .unwrap()
        }
    };
    c.batch_execute("BEGIN").await.unwrap();
    // A newer live version over a live one: every transaction does this to the rows
    // it changes, in its origin and in every peer. No index entry for it (HOT).
    store(ago(80), false).await;
    assert_eq!(updates_here(&c).await, (1, 1));
    // A delete turns it into a tombstone, which the tombstone index must then hold.
    store(ago(70), true).await;
    assert_eq!(updates_here(&c).await, (2, 1));
    c.batch_execute("COMMIT").await.unwrap();
    c.batch_execute("SET enable_seqscan = off").await.unwrap();
    let plan: Vec<String> = c
        .query(
            "EXPLAIN SELECT pk FROM mesh.row_versions WHERE deleted AND hlc < 0",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        plan.iter().any(|l| l.contains("row_versions_deleted")),
        "{plan:?}"
    );
    c.batch_execute("RESET enable_seqscan").await.unwrap();
    // And pruning, which now reads the tombstones through it, still finds it.
    scratch::logged(&c, "r2", ago(50)).await;
    let pruned = prune(&c, "r1", &["r2".to_string()], Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(pruned.deleted, 1, "{pruned:?}");
    assert_eq!(left(&c).await, Vec::<String>::new());
}
