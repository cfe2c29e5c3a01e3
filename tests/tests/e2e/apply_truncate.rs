//! Replicated TRUNCATEs of every shape a transaction can give them, applied where
//! rows, versions and watermarks already are: each test checks the rows and stored
//! versions end as they do in the region the TRUNCATE came from.

use anyhow::Result;
use pgmesh_proxy::node::CaptureHandle;
use pgmesh_replicator::apply::Applier;
use pgmesh_replicator::catalog::origin_id_for;
use pgmesh_replicator::event::{Change, Op};
use pgmesh_replicator::hlc::Hlc;
use pgmesh_tests::PgCluster;

use crate::apply_absent::{applier, capture_down, capture_up, future, near, remote, row, version};
use crate::apply_held::{past, truncate, waits_or_ends};
use crate::apply_stress::remote_change;

/// A database of region `near` with capture running, and the apply session of the
/// link from `far`.
async fn applying() -> Result<(PgCluster, tokio_postgres::Client, CaptureHandle, Applier)> {
    pgmesh_tests::init_tracing();
    let (cluster, admin, capture) = near().await?;
    let applier = applier(&cluster.url("postgres"), &capture).await?;
    Ok((cluster, admin, capture, applier))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_truncates_then_inserts_applies_both() -> Result<()> {
    let (_cluster, admin, capture, mut applier) = applying().await?;
    // An older TRUNCATE first: the table has a watermark.
    applier
        .apply_batch("far", &[remote(1, past()?, vec![truncate()])], 1, 1)
        .await?;
    admin
        .execute("INSERT INTO kv VALUES (1, 'old'), (2, 'old')", &[])
        .await?;
    let at = future()?;
    let batch = [remote(
        2,
        at,
        vec![truncate(), remote_change(2, Some("new"))],
    )];
    applier.apply_batch("far", &batch, 2, 2).await?;
    assert_eq!(row(&admin, 1).await?, None, "truncated");
    assert_eq!(
        row(&admin, 2).await?.as_deref(),
        Some("new"),
        "inserted after"
    );
    assert_eq!(
        version(&admin, 2).await?,
        Some((at.as_u64() as i64, origin_id_for("far"), false))
    );
    capture.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_truncates_twice_keeps_what_it_wrote_after_the_second() -> Result<()> {
    let (_cluster, admin, capture, mut applier) = applying().await?;
    let at = future()?;
    let batch = [remote(
        1,
        at,
        vec![
            truncate(),
            remote_change(1, Some("first")),
            truncate(),
            remote_change(2, Some("second")),
        ],
    )];
    applier.apply_batch("far", &batch, 1, 1).await?;
    // As in the region it came from.
    assert_eq!(
        row(&admin, 1).await?,
        None,
        "the second TRUNCATE removes it"
    );
    assert_eq!(
        version(&admin, 1).await?,
        Some((at.as_u64() as i64, origin_id_for("far"), true))
    );
    assert_eq!(row(&admin, 2).await?.as_deref(), Some("second"));
    capture.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_keeps_a_newer_row_written_earlier_in_its_batch() -> Result<()> {
    let (_cluster, admin, capture, mut applier) = applying().await?;
    // A relay can deliver a newer insert before an older TRUNCATE, in one batch.
    let newer = future()?;
    let older = past()?;
    let batch = [
        remote(1, newer, vec![remote_change(1, Some("newer"))]),
        remote(2, older, vec![truncate()]),
    ];
    applier.apply_batch("far", &batch, 2, 2).await?;
    assert_eq!(row(&admin, 1).await?.as_deref(), Some("newer"));
    assert_eq!(
        version(&admin, 1).await?,
        Some((newer.as_u64() as i64, origin_id_for("far"), false))
    );
    capture.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_a_transaction_wrote_before_its_truncate_are_removed() -> Result<()> {
    let (_cluster, admin, capture, mut applier) = applying().await?;
    let at = future()?;
    let batch = [remote(
        1,
        at,
        vec![remote_change(1, Some("gone")), truncate()],
    )];
    applier.apply_batch("far", &batch, 1, 1).await?;
    assert_eq!(row(&admin, 1).await?, None, "inserted, then truncated");
    let tomb = Some((at.as_u64() as i64, origin_id_for("far"), true));
    assert_eq!(version(&admin, 1).await?, tomb);
    // A later change of the key applies (nothing waits on a row that is not there).
    let later = Hlc::from_u64(at.as_u64() + (1_000 << 16));
    let batch = [remote(2, later, vec![remote_change(1, Some("later"))])];
    applier.apply_batch("far", &batch, 2, 2).await?;
    assert_eq!(row(&admin, 1).await?.as_deref(), Some("later"));
    capture.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_insert_loses_to_a_local_truncate_capture_had_not_logged() -> Result<()> {
    pgmesh_tests::init_tracing();
    let (cluster, admin, capture) = near().await?;
    let url = cluster.url("postgres");
    // A local TRUNCATE that capture, down, has not logged: no watermark yet.
    let (lock, capture) = capture_down(&cluster, capture).await?;
    admin.batch_execute("TRUNCATE kv").await?;
    let mut applier = applier(&url, &capture).await?;
    let old = past()?;
    let apply = tokio::spawn(async move {
        let batch = [remote(1, old, vec![remote_change(1, Some("older"))])];
        applier.apply_batch("far", &batch, 1, 1).await
    });
    // The insert of an absent key waits for capture, which then logs the TRUNCATE:
    // the check finds the watermark changed, and the older insert loses to it.
    waits_or_ends(
        &admin,
        &apply,
        "the batch to wait for capture past its insert",
        "state = 'idle in transaction' AND query LIKE '%pg_current_wal_insert_lsn%'",
    )
    .await?;
    capture_up(&lock).await?;
    apply.await??;
    assert_eq!(row(&admin, 1).await?, None, "the newer TRUNCATE wins");
    capture.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_keeps_newer_rows_keyed_out_of_index_order_or_by_char_and_bool() -> Result<()> {
    pgmesh_tests::init_tracing();
    let (cluster, admin, capture) = near().await?;
    admin
        .batch_execute(
            "CREATE TABLE pk2 (a boolean, b char(3), v text, PRIMARY KEY (b, a));
             INSERT INTO pk2 VALUES (false, 'o', 'older')",
        )
        .await?;
    let url = cluster.url("postgres");
    let mut applier = applier(&url, &capture).await?;
    // A newer remote insert, keyed as capture keys it (attribute order, values as
    // their types print them), then an older TRUNCATE, in batches of their own.
    let col = |n: &str, v: &str| (n.to_string(), Some(v.to_string()));
    let insert = Change {
        op: Op::Insert,
        pk: vec![col("a", "t"), col("b", "x  ")],
        new: Some(vec![col("a", "t"), col("b", "x  "), col("v", "newer")]),
        types: vec![16, 1042, 25],
        ..Change::truncate("public.pk2".into())
    };
    let insert = [remote(1, future()?, vec![insert])];
    applier.apply_batch("far", &insert, 1, 1).await?;
    // Newer than the local row, older than the remote one.
    let between = Hlc::from_u64(future()?.as_u64() - (30_000 << 16));
    let truncate = [remote(
        2,
        between,
        vec![Change::truncate("public.pk2".into())],
    )];
    applier.apply_batch("far", &truncate, 2, 2).await?;
    let rows: Vec<String> = admin
        .query("SELECT v FROM pk2 ORDER BY v", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, ["newer"], "the older row goes, the newer one stays");
    capture.stop().await;
    Ok(())
}
