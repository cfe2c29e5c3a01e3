//! Remote changes to a key that is absent when apply locks it, raced by a local write
//! of the same key: the three races `apply_stress` found, each held open on purpose.
//!
//! An absent key has no row to lock, so a local insert can commit while a batch that
//! found the key absent is under way. Each test makes that happen at one point of
//! the batch and checks that the row and its stored version end as last-writer-wins
//! says every region ends them.

use std::time::Duration;

use anyhow::Result;
use pgmesh_proxy::node::{self, CaptureHandle};
use pgmesh_replicator::apply::Applier;
use pgmesh_replicator::capture::leader::leader_key;
use pgmesh_replicator::capture::{CaptureConfig, Role};
use pgmesh_replicator::catalog::{self, origin_id_for, TableSelection};
use pgmesh_replicator::event::{Change, ChangeEvent};
use pgmesh_replicator::hlc::Hlc;
use pgmesh_replicator::log::table::APPEND_LOCK;
use pgmesh_replicator::log::Logged;
use pgmesh_tests::{wait_for, wait_row, wait_until, ClusterOptions, PgCluster, DEFAULT_TIMEOUT};

use crate::apply_stress::remote_change;

/// A minute from now: newer than any local write of these tests.
pub(crate) fn future() -> Result<Hlc> {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    Ok(Hlc::from_parts(ms + 60_000, 0))
}

/// An event from region `far` at `hlc`, logged at `seq` in its log.
pub(crate) fn remote(seq: i64, hlc: Hlc, changes: Vec<Change>) -> Logged {
    Logged {
        seq,
        event: ChangeEvent {
            origin: "far".into(),
            hlc,
            source_lsn: seq as u64,
            xid: seq as u32,
            commit_ts_us: (hlc.physical_ms() * 1000) as i64,
            stamp: None,
            local_only: false,
            changes,
        },
    }
}

/// A database of region `near` with table `kv`, and capture running.
pub(crate) async fn near() -> Result<(PgCluster, tokio_postgres::Client, CaptureHandle)> {
    let cluster = PgCluster::start_async(ClusterOptions::default()).await?;
    let admin = cluster.connect().await?;
    admin
        .batch_execute("CREATE TABLE kv (id int PRIMARY KEY, val text NOT NULL)")
        .await?;
    let url = cluster.url("postgres");
    catalog::init(&url, "near", &TableSelection::default()).await?;
    let capture = node::spawn(CaptureConfig::new(&url, "near", "n1"));
    wait_until(DEFAULT_TIMEOUT, "capture to lead", || async {
        capture.role() == Role::Leader
    })
    .await?;
    Ok((cluster, admin, capture))
}

/// The apply session of the link from `far`, waiting for `capture` as a node's does.
pub(crate) async fn applier(url: &str, capture: &CaptureHandle) -> Result<Applier> {
    let regions = vec!["far".to_string()];
    Ok(Applier::connect(url, "near", "far", &regions, Some(capture.progress())).await?)
}

/// The value of `kv` row `id` (`NULL` when null), if any.
pub(crate) async fn row(c: &tokio_postgres::Client, id: i32) -> Result<Option<String>> {
    Ok(
        c.query_opt("SELECT coalesce(val, 'NULL') FROM kv WHERE id = $1", &[&id])
            .await?
            .map(|r| r.get(0)),
    )
}

/// The stored version of `kv` row `id`: (hlc, origin, deleted).
pub(crate) async fn version(
    c: &tokio_postgres::Client,
    id: i32,
) -> Result<Option<(i64, i16, bool)>> {
    Ok(c.query_opt(
        "SELECT hlc, origin, deleted FROM mesh.row_versions
          WHERE tbl = 'public.kv' AND pk = jsonb_build_array(jsonb_build_array('id', $1::text))::text",
        &[&id.to_string()],
    )
    .await?
    .map(|r| (r.get(0), r.get(1), r.get(2))))
}

/// The HLC and the `prev` hlc of the local event that changed `kv` row `id`, once
/// capture has logged it.
pub(crate) async fn logged_local(
    c: &tokio_postgres::Client,
    id: i32,
) -> Result<(i64, Option<i64>)> {
    wait_for(DEFAULT_TIMEOUT, "the local write logged", || async {
        let r = c
            .query_opt(
                "SELECT hlc, changes->0->'prev'->>'hlc' FROM mesh.changelog
                  WHERE origin = 'near' AND changes->0->'pk'->0->>1 = $1
                  ORDER BY seq DESC LIMIT 1",
                &[&id.to_string()],
            )
            .await?;
        Ok(r.map(|r| {
            (
                r.get(0),
                r.get::<_, Option<String>>(1).and_then(|h| h.parse().ok()),
            )
        }))
    })
    .await
}

/// Stops `capture` and starts it again held down: a session of ours (returned) holds
/// the region's leader lock, so the new capture waits as standby until it lets go.
pub(crate) async fn capture_down(
    cluster: &PgCluster,
    capture: CaptureHandle,
) -> Result<(tokio_postgres::Client, CaptureHandle)> {
    capture.stop().await;
    let lock = cluster.connect().await?;
    lock.execute("SELECT pg_advisory_lock($1)", &[&leader_key("near")])
        .await?;
    let capture = node::spawn(CaptureConfig::new(&cluster.url("postgres"), "near", "n1"));
    Ok((lock, capture))
}

/// Lets the capture that [`capture_down`] held down lead.
pub(crate) async fn capture_up(lock: &tokio_postgres::Client) -> Result<()> {
    lock.execute("SELECT pg_advisory_unlock($1)", &[&leader_key("near")])
        .await?;
    Ok(())
}

/// Checks that `kv` row `id` ended deleted by a local delete: no row, and a local
/// tombstone as its version.
pub(crate) async fn local_delete_won(admin: &tokio_postgres::Client, id: i32) -> Result<()> {
    assert_eq!(
        row(admin, id).await?,
        None,
        "the local delete is the newest"
    );
    let v = version(admin, id).await?.expect("a version");
    assert_eq!((v.1, v.2), (origin_id_for("near"), true));
    Ok(())
}

/// Waits until the session named `app` waits on backend `pid`.
pub(crate) async fn waits_on(admin: &tokio_postgres::Client, app: &str, pid: i32) -> Result<()> {
    wait_row(
        admin,
        DEFAULT_TIMEOUT,
        &format!("{app} to wait on backend {pid}"),
        "SELECT 1 FROM pg_stat_activity WHERE application_name = $1
           AND $2 = ANY (pg_blocking_pids(pid))",
        &[&app, &pid],
    )
    .await
}

/// A local transaction holding a key with an uncommitted insert.
pub(crate) struct Blocker {
    client: tokio_postgres::Client,
    pub(crate) pid: i32,
}

impl Blocker {
    pub(crate) async fn begin(cluster: &PgCluster, id: i32) -> Result<Self> {
        let client = cluster.connect().await?;
        let pid = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await?
            .get(0);
        client.execute("BEGIN", &[]).await?;
        client
            .execute("INSERT INTO kv VALUES ($1, 'blocker')", &[&id])
            .await?;
        Ok(Self { client, pid })
    }

    /// Waits until the apply session waits on this transaction.
    pub(crate) async fn waited_on_by_apply(&self, admin: &tokio_postgres::Client) -> Result<()> {
        waits_on(admin, "pgmesh-apply-far", self.pid).await
    }

    pub(crate) async fn rollback(self) -> Result<()> {
        self.client.batch_execute("ROLLBACK").await?;
        Ok(())
    }

    pub(crate) async fn commit(self) -> Result<()> {
        self.client.batch_execute("COMMIT").await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_insert_committed_unseen_under_a_newer_remote_delete_wins() -> Result<()> {
    pgmesh_tests::init_tracing();
    let (cluster, admin, capture) = near().await?;
    let url = cluster.url("postgres");
    // A session of ours holds the change log's append lock. The batch, which found
    // key 1 absent and resolved its delete (a tombstone, no row written), waits for
    // it to store its versions...
    let mut applier = applier(&url, &capture).await?;
    let holder = cluster.connect().await?;
    let holder_pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0);
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&APPEND_LOCK])
        .await?;
    let delete = future()?;
    let apply = tokio::spawn(async move {
        let batch = [remote(1, delete, vec![remote_change(1, None)])];
        applier.apply_batch("far", &batch, 1, 1).await
    });
    waits_on(&admin, "pgmesh-apply-far", holder_pid).await?;
    // ...then a local insert of key 1 commits, and capture waits for the lock to log
    // it, behind the batch.
    admin
        .execute("INSERT INTO kv VALUES (1, 'local')", &[])
        .await?;
    waits_on(&admin, "pgmesh-capture-log", holder_pid).await?;
    holder
        .execute("SELECT pg_advisory_unlock($1)", &[&APPEND_LOCK])
        .await?;
    apply.await??;
    // The insert committed before the batch, a minute older than the delete, but its
    // row stands on top of the tombstone here: capture logs it newer than the delete,
    // which it overwrote, so it wins everywhere.
    let (logged, prev) = logged_local(&admin, 1).await?;
    let delete = delete.as_u64() as i64;
    assert!(
        logged > delete,
        "the local insert ({logged}) must be newer than {delete}"
    );
    assert_eq!(
        prev,
        Some(delete),
        "and record the delete as what it overwrote"
    );
    assert_eq!(row(&admin, 1).await?.as_deref(), Some("local"));
    assert_eq!(
        version(&admin, 1).await?,
        Some((logged, origin_id_for("near"), false))
    );
    capture.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_resolves_again_when_a_local_write_was_logged_while_it_ran() -> Result<()> {
    pgmesh_tests::init_tracing();
    let (cluster, admin, capture) = near().await?;
    let url = cluster.url("postgres");
    // A local transaction holds key 5 (an uncommitted insert), so the batch's insert
    // of 5 waits on it, after the batch has resolved key 1 as absent.
    let blocker = Blocker::begin(&cluster, 5).await?;
    let mut applier = applier(&url, &capture).await?;
    let hlc = future()?;
    let batch = [
        remote(1, hlc, vec![remote_change(5, Some("remote"))]),
        remote(2, hlc.saturating_next(), vec![remote_change(1, None)]),
    ];
    let apply = tokio::spawn(async move { applier.apply_batch("far", &batch, 2, 2).await });
    blocker.waited_on_by_apply(&admin).await?;
    // Meanwhile a local insert of key 1 commits and capture logs it.
    admin
        .execute("INSERT INTO kv VALUES (1, 'local')", &[])
        .await?;
    logged_local(&admin, 1).await?;
    blocker.rollback().await?;
    apply.await??;
    // The batch found the version it resolved key 1 against replaced, and resolved
    // again: the (newer) remote delete wins against the local insert and deletes it,
    // instead of leaving the row under its tombstone.
    assert_eq!(
        row(&admin, 1).await?,
        None,
        "the delete must remove the row"
    );
    let delete = hlc.saturating_next().as_u64() as i64;
    assert_eq!(
        version(&admin, 1).await?,
        Some((delete, origin_id_for("far"), true))
    );
    let winner: String = admin
        .query_one(
            "SELECT winner FROM mesh.conflicts WHERE pk @> '[[\"id\", \"1\"]]'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(winner, "remote");
    assert_eq!(row(&admin, 5).await?.as_deref(), Some("remote"));
    capture.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_inserted_while_apply_waits_for_capture_is_locked_and_resolved() -> Result<()> {
    pgmesh_tests::init_tracing();
    let (cluster, admin, capture) = near().await?;
    let url = cluster.url("postgres");
    admin
        .execute("INSERT INTO kv VALUES (1, 'old')", &[])
        .await?;
    logged_local(&admin, 1).await?;
    // Capture goes down, and the row is deleted: its version still says it lives, so
    // the batch waits for capture.
    let (lock, capture) = capture_down(&cluster, capture).await?;
    admin.execute("DELETE FROM kv WHERE id = 1", &[]).await?;
    let mut applier = applier(&url, &capture).await?;
    let delete = future()?;
    let apply = tokio::spawn(async move {
        let batch = [remote(1, delete, vec![remote_change(1, None)])];
        let r = applier.apply_batch("far", &batch, 1, 1).await;
        (applier, r)
    });
    wait_row(
        &admin,
        DEFAULT_TIMEOUT,
        "apply to wait for capture",
        "SELECT 1 FROM pg_stat_activity WHERE application_name = 'pgmesh-apply-far'
           AND state = 'idle in transaction' AND query LIKE '%pg_current_wal_insert_lsn%'",
        &[],
    )
    .await?;
    // While it waits, the key is inserted again; then capture comes up.
    admin
        .execute("INSERT INTO kv VALUES (1, 'again')", &[])
        .await?;
    capture_up(&lock).await?;
    let (_applier, outcome) = apply.await?;
    outcome?;
    // The batch locked the new row after the wait: the remote delete (newer) wins
    // against it and deletes it.
    assert_eq!(
        row(&admin, 1).await?,
        None,
        "the delete must remove the new row"
    );
    assert_eq!(
        version(&admin, 1).await?,
        Some((delete.as_u64() as i64, origin_id_for("far"), true))
    );
    tokio::time::timeout(Duration::from_secs(30), capture.stop()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_insert_and_delete_between_the_locks_and_the_insert_are_seen() -> Result<()> {
    pgmesh_tests::init_tracing();
    let (cluster, admin, capture) = near().await?;
    let url = cluster.url("postgres");
    let blocker = Blocker::begin(&cluster, 5).await?;
    let (lock, capture) = capture_down(&cluster, capture).await?;
    let mut applier = applier(&url, &capture).await?;
    // Remote inserts of keys 5 and 1, a minute old: the batch finds both absent, then
    // waits on the local transaction holding 5 before it inserts 1.
    let old = Hlc::from_u64(future()?.as_u64() - (120_000 << 16));
    let batch = [
        remote(1, old, vec![remote_change(5, Some("remote"))]),
        remote(
            2,
            old.saturating_next(),
            vec![remote_change(1, Some("remote"))],
        ),
    ];
    let apply = tokio::spawn(async move { applier.apply_batch("far", &batch, 2, 2).await });
    blocker.waited_on_by_apply(&admin).await?;
    // Meanwhile key 1 is inserted and deleted locally (newer than the batch), and
    // capture, down, logs neither: the batch's insert finds the key absent again.
    admin
        .batch_execute("INSERT INTO kv VALUES (1, 'local'); DELETE FROM kv WHERE id = 1")
        .await?;
    blocker.rollback().await?;
    // The batch waits for capture before it checks its versions...
    wait_row(
        &admin,
        DEFAULT_TIMEOUT,
        "the batch to wait for capture past its insert",
        "SELECT 1 FROM pg_stat_activity WHERE application_name = 'pgmesh-apply-far'
           AND state = 'idle in transaction' AND query LIKE '%pg_current_wal_insert_lsn%'",
        &[],
    )
    .await?;
    // ...which logs the local pair once it is up: the check finds the key's version
    // changed, and the batch, resolved again, loses to the newer local delete.
    capture_up(&lock).await?;
    apply.await??;
    local_delete_won(&admin, 1).await?;
    assert_eq!(row(&admin, 5).await?.as_deref(), Some("remote"));
    capture.stop().await;
    Ok(())
}
