//! The horizon rules and what a prune leaves, on a real database.

use super::*;
use crate::catalog;
use crate::log::Logged;
use crate::log::TableLog;
use crate::scratch;

async fn ack(c: &Client, peer: &str, seq: i64) {
    c.execute(
        "INSERT INTO mesh.peer_acks (peer, durable_seq) VALUES ($1, $2)
         ON CONFLICT (peer) DO UPDATE SET durable_seq = $2",
        &[&peer, &seq],
    )
    .await
    .unwrap();
}

/// `(seq, origin, changes)` of every row.
async fn rows(c: &Client) -> Vec<(i64, String, String)> {
    c.query(
        "SELECT seq, origin, changes::text FROM mesh.changelog ORDER BY seq",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

#[tokio::test]
async fn prunes_below_the_lowest_durable_ack_and_keeps_what_apply_and_capture_need() {
    let Some(url) = scratch::database("pgmesh_prune").await else {
        return;
    };
    let c = catalog::connect(&url).await.unwrap();
    let mut log = TableLog::new(catalog::connect(&url).await.unwrap())
        .await
        .unwrap();
    // r1 is this region; r2's events were applied here. Changes are made non-empty
    // so that stripping shows.
    let mut events: Vec<_> = (1..=8)
        .map(|n| scratch::event(if n % 2 == 0 { "r2" } else { "r1" }, n, false))
        .collect();
    let logged: Vec<Logged> = log.append_local(&mut events).await.unwrap();
    c.batch_execute("UPDATE mesh.changelog SET changes = '[{\"op\": \"insert\"}]'")
        .await
        .unwrap();
    let seq = |i: usize| logged[i].seq;
    let peers = vec!["r2".to_string(), "r3".to_string()];

    // No horizon while a configured peer has reported nothing; it is named.
    ack(&c, "r2", seq(7)).await;
    let p = prune(&c, "r1", &peers).await.unwrap();
    assert_eq!((p.upto, p.deleted, p.stripped), (0, 0, 0));
    assert_eq!(p.waiting_for, ["r3"]);
    // A region that once pulled from here holds pruning back as well.
    ack(&c, "r3", seq(7)).await;
    ack(&c, "r4", seq(1)).await;
    let p = prune_in_chunks(&c, "r1", &peers, 1).await.unwrap();
    assert_eq!((p.upto, p.deleted, p.stripped), (seq(1), 1, 1));
    // Forgotten, it no longer does: the horizon is the lowest of r2 and r3.
    let forgot: bool = c
        .query_one("SELECT mesh.forget_peer('r4')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(forgot);
    ack(&c, "r3", seq(5)).await;
    let p = prune_in_chunks(&c, "r1", &peers, 2).await.unwrap();
    assert_eq!((p.upto, p.deleted, p.stripped), (seq(5), 2, 2));
    let after = rows(&c).await;
    let full = "[{\"op\": \"insert\"}]".to_string();
    // r1's events at or below the horizon are gone; r2's keep their ids, stripped.
    assert_eq!(
        after,
        vec![
            (seq(1), "r2".into(), "[]".into()),
            (seq(3), "r2".into(), "[]".into()),
            (seq(5), "r2".into(), "[]".into()),
            (seq(6), "r1".into(), full.clone()),
            (seq(7), "r2".into(), full.clone()),
        ]
    );
    // Nothing new: nothing done.
    let p = prune(&c, "r1", &peers).await.unwrap();
    assert_eq!((p.upto, p.deleted, p.stripped), (seq(5), 0, 0));
    // Everything acknowledged: r1's newest event stays, for capture to resume from.
    ack(&c, "r2", seq(7)).await;
    ack(&c, "r3", seq(7)).await;
    prune(&c, "r1", &peers).await.unwrap();
    let left: Vec<(i64, String)> = rows(&c).await.into_iter().map(|r| (r.0, r.1)).collect();
    assert!(left.contains(&(seq(6), "r1".to_string())), "{left:?}");
    assert_eq!(left.iter().filter(|r| r.1 == "r1").count(), 1, "{left:?}");
    let upto: i64 = c
        .query_one("SELECT pruned_upto FROM mesh.log_prune", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(upto, seq(7));
    drop((c, log));
    scratch::drop_database(&url).await;
}

#[tokio::test]
async fn the_log_and_the_versions_are_analyzed_from_small_samples() {
    let Some(url) = scratch::database("pgmesh_analyze_sample").await else {
        return;
    };
    let c = catalog::connect(&url).await.unwrap();
    // ANALYZE samples 300 rows per unit of a table's largest statistics target: the
    // default (100, shown as -1) would make it 30,000.
    for table in ["mesh.changelog", "mesh.row_versions"] {
        let targets: Vec<(String, i32)> = c
            .query(
                "SELECT attname::text, attstattarget::int4 FROM pg_attribute
                  WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped
                  ORDER BY attnum",
                &[&table],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert!(targets.len() >= 6, "{table}: {targets:?}");
        for (col, target) in &targets {
            assert!((0..=10).contains(target), "{table}.{col}: {target}");
        }
    }
}
