//! Apply against a real database: what [`Applier::durable_checkpoint`] promises.

use super::*;
use crate::scratch;

/// The checkpoint it returns is flushed: the WAL is on disk past a batch that
/// committed asynchronously just before (pruning at peers relies on it).
#[tokio::test]
async fn a_durable_checkpoint_is_flushed_with_the_batches_before_it() {
    let Some(url) = scratch::database("pgmesh_durable_cp").await else {
        return;
    };
    let a = Applier::connect(&url, "r1", "r2", &["r2".into()], None)
        .await
        .unwrap();
    let c = a.client();
    // A batch's checkpoint, committed as apply commits (asynchronously).
    c.execute(
        "UPDATE mesh.link_state SET checkpoint = 42 WHERE peer = 'r2'",
        &[],
    )
    .await
    .unwrap();
    let lsn =
        |sql: &'static str| async move { c.query_one(sql, &[]).await.unwrap().get::<_, String>(0) };
    let committed = lsn("SELECT pg_current_wal_insert_lsn()::text").await;
    assert_eq!(a.durable_checkpoint("r2").await.unwrap(), 42);
    let behind: bool = c
        .query_one(
            "SELECT pg_current_wal_flush_lsn() < $1::text::pg_lsn",
            &[&committed],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        !behind,
        "the WAL is not flushed past the batch ({committed})"
    );
    let kept: i64 = c
        .query_one(
            "SELECT durable_checkpoint FROM mesh.link_state WHERE peer = 'r2'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 42);
    drop(a);
    scratch::drop_database(&url).await;
}
