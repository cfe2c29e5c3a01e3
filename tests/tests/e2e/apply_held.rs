//! Batches that hold local writes off the tables they write (a batch that
//! truncates, and a retried dead letter), raced by local writes: each test holds a
//! race open on purpose and checks the row and its stored version end as
//! last-writer-wins says every region ends them.
//!
//! Such a batch cannot wait for capture after its writes (see `apply_absent`), so it
//! locks its tables against local writes first and waits for capture to log every
//! commit below the lock.

use std::time::Duration;

use anyhow::Result;
use pgmesh_replicator::catalog::origin_id_for;
use pgmesh_replicator::event::Change;
use pgmesh_replicator::hlc::Hlc;
use pgmesh_tests::{wait_row, wait_until, DEFAULT_TIMEOUT};
use tokio::task::JoinHandle;

use crate::apply_absent::{
    applier, capture_down, capture_up, future, local_delete_won, near, remote, row, version,
    Blocker,
};
use crate::apply_stress::remote_change;

/// A remote TRUNCATE of `kv`.
pub(crate) fn truncate() -> Change {
    Change::truncate("public.kv".into())
}

/// Two minutes ago: older than any local write of these tests.
pub(crate) fn past() -> Result<Hlc> {
    Ok(Hlc::from_u64(future()?.as_u64() - (180_000 << 16)))
}

/// Waits until the apply session of the link from `far` waits in the state `sql`
/// selects (a row of `pg_stat_activity` as `a`), or `task` (the batch) ended without
/// waiting: then the outcome shows what its not waiting did.
pub(crate) async fn waits_or_ends<T>(
    admin: &tokio_postgres::Client,
    task: &JoinHandle<T>,
    what: &str,
    sql: &str,
) -> Result<()> {
    let query = format!(
        "SELECT 1 FROM pg_stat_activity a WHERE application_name = 'pgmesh-apply-far' AND {sql}"
    );
    wait_until(DEFAULT_TIMEOUT, what, || async {
        task.is_finished() || admin.query_opt(&query, &[]).await.ok().flatten().is_some()
    })
    .await
}

/// [`waits_or_ends`] until the batch holds its tables and waits for capture.
async fn holds_and_waits<T>(admin: &tokio_postgres::Client, task: &JoinHandle<T>) -> Result<()> {
    waits_or_ends(
        admin,
        task,
        "apply to lock its tables and wait for capture",
        "state = 'idle in transaction' AND query LIKE '%LOCK TABLE%pg_current_wal_insert_lsn%'",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_insert_uncommitted_when_a_newer_truncate_applies_is_truncated() -> Result<()> {
    pgmesh_tests::init_tracing();
    let (cluster, admin, capture) = near().await?;
    let url = cluster.url("postgres");
    // A local insert of key 1, uncommitted while a remote TRUNCATE a minute newer
    // than it arrives.
    let blocker = Blocker::begin(&cluster, 1).await?;
    let mut applier = applier(&url, &capture).await?;
    let at = future()?;
    let apply = tokio::spawn(async move {
        let batch = [remote(1, at, vec![truncate()])];
        // As the link does, it tries again when its table lock waited too long.
        loop {
            match applier.apply_batch("far", &batch, 1, 1).await {
                Err(e) if e.to_string().contains("lock timeout") => continue,
                other => return other,
            }
        }
    });
    // The batch waits for it to end before it reads anything, then for capture to
    // log it: the TRUNCATE removes it, as in every region where it arrives later.
    let pid = blocker.pid;
    waits_or_ends(
        &admin,
        &apply,
        "apply to wait on the local insert",
        &format!("{pid} = ANY (pg_blocking_pids(a.pid))"),
    )
    .await?;
    blocker.commit().await?;
    apply.await??;
    assert_eq!(row(&admin, 1).await?, None, "the newer TRUNCATE removes it");
    assert_eq!(
        version(&admin, 1).await?,
        Some((at.as_u64() as i64, origin_id_for("far"), true))
    );
    capture.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncating_batch_sees_a_local_insert_and_delete_capture_has_not_logged() -> Result<()> {
    pgmesh_tests::init_tracing();
    let (cluster, admin, capture) = near().await?;
    let url = cluster.url("postgres");
    // Capture is down, and key 1 is inserted and deleted locally: no row, no version.
    let (lock, capture) = capture_down(&cluster, capture).await?;
    admin
        .batch_execute("INSERT INTO kv VALUES (1, 'local'); DELETE FROM kv WHERE id = 1")
        .await?;
    // An older remote transaction truncates kv and inserts key 1.
    let mut applier = applier(&url, &capture).await?;
    let old = past()?;
    let apply = tokio::spawn(async move {
        let batch = [remote(
            1,
            old,
            vec![truncate(), remote_change(1, Some("remote"))],
        )];
        applier.apply_batch("far", &batch, 1, 1).await
    });
    // It waits for capture before it reads the versions, and once capture logs the
    // local pair, loses key 1 to the newer local delete.
    holds_and_waits(&admin, &apply).await?;
    capture_up(&lock).await?;
    apply.await??;
    local_delete_won(&admin, 1).await?;
    let v = version(&admin, 1).await?.expect("a version");
    assert!(v.0 > old.as_u64() as i64);
    capture.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_dead_letter_sees_a_local_insert_and_delete_capture_has_not_logged() -> Result<()>
{
    pgmesh_tests::init_tracing();
    let (cluster, admin, capture) = near().await?;
    let url = cluster.url("postgres");
    // An old remote insert of key 1 with a NULL value fails on NOT NULL and goes to
    // dead letters.
    let mut first = applier(&url, &capture).await?;
    let mut insert = remote_change(1, Some("x"));
    insert.new.as_mut().expect("an insert")[1].1 = None;
    let outcome = first
        .apply_batch("far", &[remote(1, past()?, vec![insert])], 1, 1)
        .await?;
    assert_eq!(outcome.dead_letters, 1);
    admin
        .batch_execute("ALTER TABLE kv ALTER val DROP NOT NULL")
        .await?;
    // Capture is down, and key 1 is inserted and deleted locally, newer than it.
    let (lock, capture) = capture_down(&cluster, capture).await?;
    admin
        .batch_execute("INSERT INTO kv VALUES (1, 'local'); DELETE FROM kv WHERE id = 1")
        .await?;
    admin
        .execute(
            "SELECT mesh.retry_dead_letter(id) FROM mesh.dead_letters",
            &[],
        )
        .await?;
    // The link's session ends (its replication origin with it), and one that waits
    // for the new capture takes over.
    drop(first);
    wait_row(
        &admin,
        DEFAULT_TIMEOUT,
        "the first apply session to end",
        "SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity
                                     WHERE application_name = 'pgmesh-apply-far')",
        &[],
    )
    .await?;
    let mut applier = applier(&url, &capture).await?;
    // While capture stays down past the wait, the retry is deferred: the letter
    // stays marked, and the session goes on.
    applier.set_capture_wait(Duration::from_millis(500));
    assert_eq!(applier.retry_dead_letters().await?, 0);
    assert!(applier.retry_deferred());
    let status: String = admin
        .query_one("SELECT status FROM mesh.dead_letters", &[])
        .await?
        .get(0);
    assert_eq!(status, "retry");
    applier.set_capture_wait(Duration::from_secs(30));
    let retry = tokio::spawn(async move { applier.retry_dead_letters().await });
    holds_and_waits(&admin, &retry).await?;
    capture_up(&lock).await?;
    assert_eq!(retry.await??, 1, "the letter is applied");
    // Applied, it lost to the newer local delete.
    local_delete_won(&admin, 1).await?;
    capture.stop().await;
    Ok(())
}
