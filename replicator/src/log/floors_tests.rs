//! What a link server advertises, what a puller adopts, and the frontier they move,
//! on a real database.

use std::time::Duration;

use super::*;
use crate::catalog;
use crate::log::tombstones;
use crate::scratch;

fn filter(relay: bool, peer: &str) -> ShipFilter {
    ShipFilter {
        server_region: "r1".into(),
        relay,
        peer_region: peer.into(),
    }
}

fn map(pairs: &[(&str, i64)]) -> FloorMap {
    pairs.iter().map(|(r, f)| (r.to_string(), *f)).collect()
}

#[test]
fn the_own_floor_is_the_clock_and_above_the_last_final_hlc() {
    let previous = Hlc::from_parts(5_000, 7);
    assert_eq!(own_floor(previous, 9_000), Hlc::from_parts(9_000, 0));
    assert_eq!(own_floor(previous, 4_000), previous.saturating_next());
    assert_eq!(own_floor(previous, 5_000), previous.saturating_next());
}

#[tokio::test]
async fn advertised_floors_follow_the_ship_filter_and_stay_below_dead_letters() {
    let Some(url) = scratch::database("pgmesh_floors_advertised").await else {
        return;
    };
    let c = catalog::connect(&url).await.unwrap();
    // Nothing known yet: no floors, and the head of an empty log.
    let none = advertised(&c, &filter(true, "r2")).await.unwrap();
    assert_eq!(none, Floors::default());

    scratch::logged(&c, "r1", 10).await;
    scratch::logged(&c, "r3", 20).await;
    let head: i64 = c
        .query_one("SELECT max(seq) FROM mesh.changelog", &[])
        .await
        .unwrap()
        .get(0);
    let all = map(&[("r1", 100), ("r2", 200), ("r3", 300)]);
    adopt(&c, "", &all).await.unwrap();

    // A server that does not relay ships only its own region's events.
    let own = advertised(&c, &filter(false, "r2")).await.unwrap();
    assert_eq!(own.head, head);
    assert_eq!(own.floors, map(&[("r1", 100)]));
    // A hub ships every region's but the peer's own.
    let hub = advertised(&c, &filter(true, "r2")).await.unwrap();
    assert_eq!(hub.floors, map(&[("r1", 100), ("r3", 300)]));

    // A pending dead letter of r3 would reach the peer late: r3's floor stays
    // below it until it is settled. Another region's dead letter does not matter.
    c.execute(
        "INSERT INTO mesh.dead_letters (peer, origin, hlc, event, error)
         VALUES ('r3', 'r3', 250, '{}', 'x'), ('r2', 'r2', 5, '{}', 'x')",
        &[],
    )
    .await
    .unwrap();
    let held = advertised(&c, &filter(true, "r2")).await.unwrap();
    assert_eq!(held.floors, map(&[("r1", 100), ("r3", 249)]));
    c.execute(
        "UPDATE mesh.dead_letters SET status = 'skipped' WHERE origin = 'r3'",
        &[],
    )
    .await
    .unwrap();
    let settled = advertised(&c, &filter(true, "r2")).await.unwrap();
    assert_eq!(settled.floors, map(&[("r1", 100), ("r3", 300)]));
    // A region known here only by its floor can be forgotten, and is no longer
    // passed on.
    adopt(&c, "", &map(&[("r9", 900)])).await.unwrap();
    let known: bool = c
        .query_one("SELECT mesh.forget_peer('r9')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(known);
    let hub = advertised(&c, &filter(true, "r2")).await.unwrap();
    assert_eq!(hub.floors, map(&[("r1", 100), ("r3", 300)]));
    scratch::drop_database(&url).await;
}

#[tokio::test]
async fn adopted_floors_only_rise_and_never_set_this_regions() {
    let Some(url) = scratch::database("pgmesh_floors_adopted").await else {
        return;
    };
    let c = catalog::connect(&url).await.unwrap();
    let read = || async {
        let rows = c
            .query(
                "SELECT region, floor_hlc FROM mesh.region_floors ORDER BY region",
                &[],
            )
            .await
            .unwrap();
        rows.iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
            .collect::<FloorMap>()
    };
    adopt(&c, "r1", &map(&[("r1", 50), ("r2", 5)]))
        .await
        .unwrap();
    assert_eq!(read().await, map(&[("r2", 5)]));
    adopt(&c, "r1", &map(&[("r2", 3), ("r3", 7)]))
        .await
        .unwrap();
    assert_eq!(read().await, map(&[("r2", 5), ("r3", 7)]));
    adopt(&c, "r1", &map(&[("r2", 9)])).await.unwrap();
    assert_eq!(read().await, map(&[("r2", 9), ("r3", 7)]));
    adopt(&c, "r1", &FloorMap::new()).await.unwrap();
    assert_eq!(stored(&c, "r2").await.unwrap(), Some(Hlc::from_u64(9)));
    assert_eq!(stored(&c, "r4").await.unwrap(), None);
    scratch::drop_database(&url).await;
}

#[tokio::test]
async fn a_floor_moves_the_frontier_of_a_region_with_old_or_no_events() {
    let Some(url) = scratch::database("pgmesh_floors_frontier").await else {
        return;
    };
    let c = catalog::connect(&url).await.unwrap();
    let peers = vec!["r2".to_string(), "r3".to_string()];
    let prune = || tombstones::prune(&c, "r1", &peers, Duration::ZERO);
    scratch::logged(&c, "r2", 1_000 << 16).await;
    // r3 never wrote: it holds the frontier at nothing.
    let p = prune().await.unwrap();
    assert_eq!(
        (p.frontier, p.waiting_for.clone()),
        (Some(0), vec!["r3".to_string()])
    );
    // Its floor counts like an event.
    adopt(&c, "r1", &map(&[("r3", 2_000 << 16)])).await.unwrap();
    let p = prune().await.unwrap();
    assert_eq!(p.frontier, Some(1_000 << 16));
    assert!(p.waiting_for.is_empty());
    // A floor above a region's newest event raises that region too.
    adopt(&c, "r1", &map(&[("r2", 3_000 << 16)])).await.unwrap();
    assert_eq!(prune().await.unwrap().frontier, Some(2_000 << 16));
    // A region known only by its floor counts as well, and this region's own
    // floor does not.
    adopt(&c, "", &map(&[("r1", 1), ("r4", 1_500 << 16)]))
        .await
        .unwrap();
    assert_eq!(prune().await.unwrap().frontier, Some(1_500 << 16));
    // Until it is forgotten.
    c.execute("SELECT mesh.forget_peer('r4')", &[])
        .await
        .unwrap();
    assert_eq!(prune().await.unwrap().frontier, Some(2_000 << 16));
    scratch::drop_database(&url).await;
}
