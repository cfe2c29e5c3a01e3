//! `pgmesh init`'s migrations against a session that holds a lock on schema mesh:
//! a migration lets go of its lock request every 2 s (so it does not hold up the
//! sessions queued behind it), tries again, and gives up with SQLSTATE 55P03 past
//! its deadline.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Result};
use pgmesh_replicator::catalog::{self, CatalogError, TableSelection};
use pgmesh_sql::migrations;
use pgmesh_tests::{wait_until, ClusterOptions, PgCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_behind_a_lock_retries_and_gives_up_at_its_deadline() -> Result<()> {
    pgmesh_tests::init_tracing();
    let cluster = PgCluster::start_async(ClusterOptions::default()).await?;
    let url = cluster.url("postgres");
    catalog::init(&url, "near", &TableSelection::default()).await?;
    let admin = cluster.connect().await?;
    // The newest migration is to run again (they are idempotent).
    let latest = migrations::latest();
    admin
        .execute(
            "DELETE FROM mesh.schema_versions WHERE version = $1",
            &[&latest],
        )
        .await?;
    let blocker = cluster.connect().await?;
    blocker
        .batch_execute("BEGIN; LOCK TABLE mesh.schema_versions IN ACCESS EXCLUSIVE MODE")
        .await?;
    let connect = || async {
        let (c, conn) = tokio_postgres::connect(
            &format!(
                "{url}{}application_name=pgmesh-migrate-test",
                if url.contains('?') { '&' } else { '?' }
            ),
            tokio_postgres::NoTls,
        )
        .await?;
        tokio::spawn(conn);
        anyhow::Ok(c)
    };
    // Past a short deadline: the error names the lock.
    let mut c = connect().await?;
    match catalog::migrate_within(&mut c, Duration::from_secs(1)).await {
        Err(CatalogError::MigrationLocked(_)) => {}
        other => anyhow::bail!("expected MigrationLocked, got {other:?}"),
    }
    // With time left, it waits in a new transaction every 2 s, and applies once the
    // lock is gone.
    let mut c = connect().await?;
    let migrate =
        tokio::spawn(async move { catalog::migrate_within(&mut c, Duration::from_secs(60)).await });
    // The transactions it waited in (each retry starts a new one).
    let starts = std::sync::Mutex::new(BTreeSet::new());
    wait_until(
        Duration::from_secs(30),
        "the migration to try again",
        || async {
            let waiting = admin
                .query_opt(
                    "SELECT xact_start::text FROM pg_stat_activity
                  WHERE application_name = 'pgmesh-migrate-test' AND wait_event_type = 'Lock'",
                    &[],
                )
                .await;
            let mut starts = starts.lock().unwrap_or_else(|e| e.into_inner());
            if let Ok(Some(r)) = waiting {
                starts.insert(r.get::<_, String>(0));
            }
            starts.len() >= 2
        },
    )
    .await?;
    blocker.batch_execute("COMMIT").await?;
    let applied = migrate.await??;
    ensure!(applied == [latest], "applied {applied:?}");
    Ok(())
}
