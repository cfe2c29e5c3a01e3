//! The capture race (DESIGN.md §4): a local write that committed but is not yet
//! captured must still count when a remote change to the same row is applied.
//!
//! Capture is kept down (standby behind a leader lock this test holds) while a local
//! row is written, so the race window is held open on purpose. A remote update with
//! an older HLC is then applied. With the protocol (apply waits until capture has
//! logged every local commit below the WAL position it read after locking), apply
//! is seen waiting until capture comes up, and the local write wins. The control applies the
//! same kind of event without waiting and shows the race would otherwise be lost.

use std::time::Duration;

use anyhow::Result;
use pgmesh_proxy::node;
use pgmesh_replicator::apply::Applier;
use pgmesh_replicator::capture::leader::leader_key;
use pgmesh_replicator::capture::{CaptureConfig, Role};
use pgmesh_replicator::catalog::{self, TableSelection};
use pgmesh_replicator::event::{Change, ChangeEvent, Op};
use pgmesh_replicator::hlc::Hlc;
use pgmesh_replicator::log::Logged;
use pgmesh_tests::{wait_row, wait_until, ClusterOptions, PgCluster};

fn remote_update(id: i32, value: &str, hlc: Hlc) -> Logged {
    let row = vec![
        ("id".to_string(), Some(id.to_string())),
        ("v".to_string(), Some(value.to_string())),
    ];
    Logged {
        seq: id as i64,
        event: ChangeEvent {
            origin: "far".into(),
            hlc,
            source_lsn: 1000 + id as u64,
            xid: 1,
            commit_ts_us: (hlc.physical_ms() * 1000) as i64,
            stamp: None,
            local_only: false,
            changes: vec![Change {
                table: "public.t".into(),
                op: Op::Update,
                pk: vec![row[0].clone()],
                old: None,
                new: Some(row),
                unchanged: Vec::new(),
                types: vec![23, 25],
                prev: None,
            }],
        },
    }
}

async fn value(c: &tokio_postgres::Client, id: i32) -> Result<String> {
    Ok(c.query_one("SELECT v FROM t WHERE id = $1", &[&id])
        .await?
        .get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_write_not_yet_captured_wins_against_an_older_remote_change() -> Result<()> {
    pgmesh_tests::init_tracing();
    let cluster = PgCluster::start_async(ClusterOptions::default()).await?;
    let url = cluster.url("postgres");
    let admin = cluster.connect().await?;
    admin
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await?;
    catalog::init(&url, "near", &TableSelection::default()).await?;
    let regions = vec!["far".to_string()];
    // A remote change made ten seconds ago: older than the local writes below.
    let old = Hlc::from_parts(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64
            - 10_000,
        0,
    );

    // Control: without waiting for capture, the uncaptured local write is invisible
    // to apply and the older remote change overwrites it.
    admin
        .execute("INSERT INTO t VALUES (1, 'local')", &[])
        .await?;
    let mut blind = Applier::connect(&url, "near", "far", &regions, None).await?;
    blind
        .apply_batch("far", &[remote_update(1, "remote", old)], 1, 1)
        .await?;
    assert_eq!(
        value(&admin, 1).await?,
        "remote",
        "control: the race is real"
    );
    drop(blind);

    // The protocol: capture is down while the local write commits (a session of
    // ours holds the leader lock, so the node waits as standby)...
    let lock = cluster.connect().await?;
    let key = leader_key("near");
    lock.execute("SELECT pg_advisory_lock($1)", &[&key]).await?;
    admin
        .execute("INSERT INTO t VALUES (2, 'local')", &[])
        .await?;
    let capture = node::spawn(CaptureConfig::new(&url, "near", "n1"));
    let mut applier =
        Applier::connect(&url, "near", "far2", &regions, Some(capture.progress())).await?;
    let apply = tokio::spawn(async move {
        let batch = [remote_update(2, "remote", old.saturating_next())];
        let outcome = applier.apply_batch("far2", &batch, 2, 2).await;
        (applier, outcome)
    });
    // ...apply finds the row written since its known version and waits for capture,
    // inside its transaction, after reading the WAL position to wait for...
    wait_row(
        &admin,
        Duration::from_secs(30),
        "apply to wait for capture",
        "SELECT 1 FROM pg_stat_activity WHERE application_name = 'pgmesh-apply-far2'
           AND state = 'idle in transaction' AND query LIKE '%pg_current_wal_insert_lsn%'",
        &[],
    )
    .await?;
    assert_ne!(capture.role(), Role::Leader, "capture is still down");
    assert!(!apply.is_finished(), "apply did not wait for capture");
    // ...and capture comes up only then.
    lock.execute("SELECT pg_advisory_unlock($1)", &[&key])
        .await?;
    let (_applier, outcome) = apply.await?;
    let outcome = outcome?;
    assert_eq!(capture.role(), Role::Leader);
    assert_eq!(value(&admin, 2).await?, "local", "the local write must win");
    assert_eq!(outcome.conflicts, 1, "and the conflict is recorded");
    let winner: String = admin
        .query_one(
            "SELECT winner FROM mesh.conflicts WHERE pk @> '[[\"id\", \"2\"]]'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(winner, "local");
    // The local write is in the log exactly once, with its own (newer) HLC.
    wait_until(Duration::from_secs(30), "local insert logged", || async {
        admin
            .query_one(
                "SELECT count(*) FROM mesh.changelog WHERE origin = 'near' AND changes::text LIKE '%\"2\"%'",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) == 1)
            .unwrap_or(false)
    })
    .await?;
    capture.stop().await;
    Ok(())
}
