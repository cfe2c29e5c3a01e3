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

/// Custom plans `c` made for 8 reads of versions through one prepared statement.
async fn custom_plans_of_version_reads(c: &Client) -> i64 {
    let keys = vec![("public.t".to_string(), r#"[["id", "1"]]"#.to_string())];
    let load = c.prepare(versions::LOAD).await.unwrap();
    for _ in 0..8 {
        versions::load(c, &load, &keys).await.unwrap();
    }
    c.query_one(
        "SELECT coalesce(sum(custom_plans), 0)::int8 FROM pg_prepared_statements",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// The session plans a batch statement once. A statement over array parameters,
/// like the versions' read, otherwise gets a custom plan, so is planned again, at
/// every execution (PostgreSQL's choice for them, shown here on a plain session).
#[tokio::test]
async fn batch_statements_are_planned_once() {
    let Some(url) = scratch::database("pgmesh_generic_plans").await else {
        return;
    };
    let plain = catalog::connect(&url).await.unwrap();
    assert!(
        custom_plans_of_version_reads(&plain).await >= 8,
        "premise: PostgreSQL plans this statement at every execution by default"
    );
    // Its own peer: replication origins are the cluster's, and tests run at once.
    let a = Applier::connect(&url, "r1", "r9", &["r9".into()], None)
        .await
        .unwrap();
    assert_eq!(custom_plans_of_version_reads(a.client()).await, 0);
    drop((a, plain));
    scratch::drop_database(&url).await;
}
