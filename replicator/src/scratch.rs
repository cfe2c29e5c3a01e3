//! Test support: events to log, and a fresh database with the mesh catalog on the
//! server of `PGMESH_TEST_DATABASE_URL` for unit tests that need a real one.

use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

use crate::catalog;
use crate::event::ChangeEvent;
use crate::hlc::Hlc;

/// An event without changes; `n` makes its id and source LSN unique per origin.
pub(crate) fn event(origin: &str, n: u64, local_only: bool) -> ChangeEvent {
    ChangeEvent {
        origin: origin.into(),
        hlc: Hlc::from_parts(1_700_000_000_000 + n, 0),
        source_lsn: n * 16,
        xid: n as u32,
        commit_ts_us: 0,
        stamp: None,
        local_only,
        changes: vec![],
    }
}

/// A new, empty database `name` (dropped first if it exists) with the catalog
/// migrated in it; returns its URL, or `None` when `PGMESH_TEST_DATABASE_URL` is
/// not set (the caller skips itself).
pub(crate) async fn database(name: &str) -> Option<String> {
    let base = std::env::var("PGMESH_TEST_DATABASE_URL").ok()?;
    let db = format!("{name}_{}", std::process::id());
    let (admin, conn) = tokio_postgres::connect(&base, NoTls).await.unwrap();
    tokio::spawn(conn);
    for sql in [
        format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
        format!("CREATE DATABASE {db}"),
    ] {
        admin.batch_execute(&sql).await.unwrap();
    }
    let mut url = url::Url::parse(&base).unwrap();
    url.set_path(&db);
    let url = url.to_string();
    let mut c = catalog::connect(&url).await.unwrap();
    catalog::migrate(&mut c).await.unwrap();
    Some(url)
}

/// Drops the database of `url` (made by [`database`]).
pub(crate) async fn drop_database(url: &str) {
    let base = std::env::var("PGMESH_TEST_DATABASE_URL").expect("set when the database was made");
    let db = url::Url::parse(url)
        .unwrap()
        .path()
        .trim_start_matches('/')
        .to_string();
    let (admin, conn) = tokio_postgres::connect(&base, NoTls).await.unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}

/// Waits (with a deadline) until session `pid` waits on a lock.
pub(crate) async fn until_waiting_on_lock(c: &Client, pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: bool = c
            .query_one(
                "SELECT coalesce(wait_event_type = 'Lock', false) FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .unwrap()
            .get(0);
        if waiting {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "session {pid} never waited on a lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Logs an event of `origin` with HLC `hlc` (and a source LSN made of it) in
/// `mesh.changelog`, as apply or capture would.
pub(crate) async fn logged(c: &Client, origin: &str, hlc: i64) {
    c.execute(
        "INSERT INTO mesh.changelog (origin, hlc, source_lsn, xid, commit_ts, stamped, changes)
         VALUES ($1, $2::int8, (to_hex($2::int8 >> 32) || '/' || to_hex($2::int8 & 4294967295))::pg_lsn,
                 1, now(), false, '[]')",
        &[&origin, &hlc],
    )
    .await
    .unwrap();
}
