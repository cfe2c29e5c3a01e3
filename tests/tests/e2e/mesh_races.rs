//! Apply against the exact interleavings that random workloads only hit now and
//! then, made deterministic by holding local transactions open.
//!
//! - A transaction that writes the same row twice (insert, then update) is one
//!   event with two changes to one key; every region must end with the row's
//!   final image, not the first one.
//! - A local INSERT of a key that is still uncommitted while apply inserts the
//!   same key from a peer: apply's insert waits, then fails with a unique
//!   violation once the local one commits. That is an ordinary insert/insert
//!   conflict for last-writer-wins to settle, never a dead letter. The test
//!   makes it happen in apply's first attempt and again in its per-event retry.
//! - A dead letter marked for retry, while a region has two links: every link's
//!   apply session retries every dead letter marked `retry`, so two of them
//!   apply the same event at once; it must end applied once and marked
//!   `applied`, not `pending` with the loser's unique violation.
//! - A TRUNCATE and an insert written after it in another region: the insert is
//!   the later write and must survive everywhere, whatever order the two
//!   arrive in (pgbench's pre-run TRUNCATE of `pgbench_history` hits this).
//!
//! Each test waits on what PostgreSQL reports (`pg_stat_activity` lock waits),
//! never on time. This module owns those scenarios only.

use anyhow::Result;
use pgmesh_replicator::apply::Applier;
use pgmesh_tests::regions::{Mesh, NodeSpec, CONVERGE_TIMEOUT};
use pgmesh_tests::{wait_for, wait_until, DEFAULT_TIMEOUT};

const SCHEMA: &str = "CREATE TABLE kv (id int PRIMARY KEY, val text NOT NULL)";

async fn two_regions(a: &str, b: &str) -> Result<Mesh> {
    let mut mesh = Mesh::start(&[a, b]).await?;
    mesh.exec_all(SCHEMA).await?;
    mesh.init_all().await?;
    mesh.start_nodes(|_| NodeSpec::default()).await?;
    Ok(mesh)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_written_twice_in_one_transaction_replicates_its_final_image() -> Result<()> {
    let mesh = two_regions("twice_a", "twice_b").await?;
    let mut a = mesh.connect_proxy(0).await?;
    let tx = a.transaction().await?;
    tx.execute("INSERT INTO kv VALUES (1, 'first')", &[])
        .await?;
    tx.execute("UPDATE kv SET val = 'second' WHERE id = 1", &[])
        .await?;
    tx.execute("INSERT INTO kv VALUES (2, 'old')", &[]).await?;
    tx.commit().await?;
    let tx = a.transaction().await?;
    tx.execute("UPDATE kv SET val = 'new' WHERE id = 2", &[])
        .await?;
    tx.execute("UPDATE kv SET val = val || '+' WHERE id = 2", &[])
        .await?;
    tx.commit().await?;
    mesh.wait_quiescent(CONVERGE_TIMEOUT).await?;
    let rows = |i: usize| {
        let admin = &mesh.region(i).admin;
        async move {
            let rows = admin
                .query("SELECT id, val FROM kv ORDER BY id", &[])
                .await?;
            anyhow::Ok(
                rows.iter()
                    .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1)))
                    .collect::<Vec<_>>(),
            )
        }
    };
    let want = vec![(1, "second".to_string()), (2, "new+".to_string())];
    assert_eq!(rows(0).await?, want, "the origin itself");
    assert_eq!(rows(1).await?, want, "the peer must hold the final images");
    mesh.shutdown().await;
    Ok(())
}

/// Backends of region `i` waiting for a lock that backend `pid` holds.
async fn blocked_by(mesh: &Mesh, i: usize, pid: i32) -> Result<i64> {
    Ok(mesh
        .region(i)
        .admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
            &[&pid],
        )
        .await?
        .get(0))
}

/// Waits until something in region `i` (apply: nothing else runs there) waits
/// for backend `pid`, which holds an uncommitted insert of `key`.
async fn apply_waits_on(mesh: &Mesh, i: usize, pid: i32, key: i32) -> Result<()> {
    let what = format!("apply to wait on the local insert of {key}");
    wait_until(DEFAULT_TIMEOUT, &what, || async {
        blocked_by(mesh, i, pid).await.is_ok_and(|n| n > 0)
    })
    .await
}

/// The upstream backend pid of a connection (through a proxy, too).
async fn backend_pid(c: &tokio_postgres::Client) -> Result<i32> {
    Ok(c.query_one("SELECT pg_backend_pid()", &[]).await?.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_local_insert_of_the_same_key_is_resolved_not_dead_lettered() -> Result<()> {
    let mesh = two_regions("race_a", "race_b").await?;
    // Two local writers in race_b insert 501 and 602 and keep their
    // transactions open.
    let l1 = mesh.connect_proxy(1).await?;
    let l2 = mesh.connect_proxy(1).await?;
    let (pid1, pid2) = (backend_pid(&l1).await?, backend_pid(&l2).await?);
    l1.batch_execute("BEGIN; INSERT INTO kv VALUES (501, 'local')")
        .await?;
    l2.batch_execute("BEGIN; INSERT INTO kv VALUES (602, 'local')")
        .await?;
    // race_a inserts both keys in one transaction; race_b's apply blocks on 501.
    mesh.connect_proxy(0)
        .await?
        .batch_execute("BEGIN; INSERT INTO kv VALUES (501, 'remote'), (602, 'remote'); COMMIT")
        .await?;
    apply_waits_on(&mesh, 1, pid1, 501).await?;
    // Its insert of 501 now fails; the per-event retry sees 501 and blocks on 602.
    l1.batch_execute("COMMIT").await?;
    apply_waits_on(&mesh, 1, pid2, 602).await?;
    l2.batch_execute("COMMIT").await?;

    let converged = mesh.wait_converged(CONVERGE_TIMEOUT).await;
    let dead: Vec<(String, Option<String>)> = mesh
        .region(1)
        .admin
        .query("SELECT error, sqlstate FROM mesh.dead_letters", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        dead.is_empty(),
        "an insert/insert conflict was dead-lettered: {dead:?}"
    );
    converged?;
    // The local inserts committed last, so they win everywhere.
    for r in &mesh.regions {
        let vals: Vec<String> = r
            .admin
            .query("SELECT val FROM kv ORDER BY id", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(vals, ["local", "local"], "in {}", r.name);
    }
    mesh.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_dead_letter_is_applied_once_and_marked_applied() -> Result<()> {
    let mut mesh = Mesh::start(&["retry_a", "retry_b", "retry_c"]).await?;
    mesh.exec_all("CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL)")
        .await?;
    let b = 1;
    mesh.region(b)
        .admin
        .batch_execute("ALTER TABLE accounts ADD CONSTRAINT nonneg CHECK (balance >= 0)")
        .await?;
    mesh.init_all().await?;
    mesh.start_nodes(|_| NodeSpec::default()).await?;
    mesh.connect_proxy(0)
        .await?
        .execute("INSERT INTO accounts VALUES (3, -7)", &[])
        .await?;
    let admin = &mesh.region(b).admin;
    let letter: i64 = wait_for(CONVERGE_TIMEOUT, "the dead letter", || async {
        Ok(admin
            .query_opt("SELECT id FROM mesh.dead_letters", &[])
            .await?
            .map(|r| r.get(0)))
    })
    .await?;
    // retry_b's two links, as its node runs them: one apply session per peer.
    // They are driven by hand so both certainly retry at the same moment.
    mesh.stop_node(b).await?;
    let admin = &mesh.region(b).admin;
    admin
        .batch_execute("ALTER TABLE accounts DROP CONSTRAINT nonneg")
        .await?;
    admin
        .execute("SELECT mesh.retry_dead_letter($1)", &[&letter])
        .await?;
    let local = mesh.region(b).cluster.connect().await?;
    let local_pid = backend_pid(&local).await?;
    local
        .batch_execute("BEGIN; INSERT INTO accounts VALUES (3, 999)")
        .await?;
    let regions = ["retry_a".to_string(), "retry_c".to_string()];
    let mut retries = Vec::new();
    for peer in ["retry_a", "retry_c"] {
        let mut applier =
            Applier::connect(&mesh.region(b).url(), "retry_b", peer, &regions, None).await?;
        retries.push(tokio::spawn(
            async move { applier.retry_dead_letters().await },
        ));
    }
    // Each session either waits behind the held insert or has nothing to do.
    wait_until(
        DEFAULT_TIMEOUT,
        "both retries to wait or finish",
        || async {
            let done = retries.iter().filter(|t| t.is_finished()).count() as i64;
            blocked_by(&mesh, b, local_pid)
                .await
                .is_ok_and(|w| w >= 1 && w + done >= 2)
        },
    )
    .await?;
    local.batch_execute("ROLLBACK").await?;
    let mut applied = 0;
    for t in retries {
        applied += t.await??;
    }
    let (status, error): (String, String) = {
        let r = admin
            .query_one(
                "SELECT status, error FROM mesh.dead_letters WHERE id = $1",
                &[&letter],
            )
            .await?;
        (r.get(0), r.get(1))
    };
    let balance: i32 = admin
        .query_one("SELECT balance FROM accounts WHERE id = 3", &[])
        .await?
        .get(0);
    assert_eq!(balance, -7);
    assert_eq!(applied, 1, "the event was applied {applied} times");
    assert_eq!(
        status, "applied",
        "the applied dead letter is {status}: {error}"
    );
    mesh.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_does_not_remove_rows_written_after_it() -> Result<()> {
    let mesh = two_regions("trunc_a", "trunc_b").await?;
    let (a, b) = (mesh.connect_proxy(0).await?, mesh.connect_proxy(1).await?);
    a.batch_execute("INSERT INTO kv VALUES (1, 'old'), (2, 'old')")
        .await?;
    mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    // trunc_b does not see trunc_a's TRUNCATE until after its own later insert.
    mesh.pause_link(1, "trunc_a").await?;
    a.batch_execute("TRUNCATE kv").await?;
    b.batch_execute("INSERT INTO kv VALUES (10, 'written after the truncate')")
        .await?;
    mesh.resume_link(1, "trunc_a").await?;
    mesh.wait_quiescent(CONVERGE_TIMEOUT).await?;
    for r in &mesh.regions {
        let ids = ids(&r.admin).await?;
        assert_eq!(ids, [10], "rows in {}", r.name);
    }
    // A transaction that truncates and then inserts keeps its insert everywhere.
    a.batch_execute("BEGIN; TRUNCATE kv; INSERT INTO kv VALUES (20, 'after'); COMMIT")
        .await?;
    mesh.wait_quiescent(CONVERGE_TIMEOUT).await?;
    for r in &mesh.regions {
        let ids = ids(&r.admin).await?;
        assert_eq!(ids, [20], "rows in {} after TRUNCATE; INSERT", r.name);
    }
    mesh.shutdown().await;
    Ok(())
}

/// The ids in `kv`, in order.
async fn ids(c: &tokio_postgres::Client) -> Result<Vec<i32>> {
    Ok(c.query("SELECT id FROM kv ORDER BY id", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect())
}
