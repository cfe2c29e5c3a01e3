//! Capture leader epochs on a real database: a fenced leader's append does not land,
//! and taking an epoch waits for an append already under way.

use super::*;
use crate::catalog;
use crate::log::{LogError, TableLog};
use crate::scratch::{self, event};

async fn count(c: &Client) -> i64 {
    c.query_one("SELECT count(*) FROM mesh.changelog", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn the_append_of_a_fenced_leader_does_not_land() {
    let Some(url) = scratch::database("pgmesh_fence_append").await else {
        return;
    };
    let mut a = TableLog::new(catalog::connect(&url).await.unwrap())
        .await
        .unwrap();
    let mut b = TableLog::new(catalog::connect(&url).await.unwrap())
        .await
        .unwrap();
    let fa = take(a.client(), "r1", "a").await.unwrap();
    assert_eq!(fa.epoch, 1);
    a.set_fence(fa);
    a.append_local(&mut vec![event("r1", 1, false)])
        .await
        .unwrap();

    // b takes over: a's next append is refused and leaves nothing behind.
    let fb = take(b.client(), "r1", "b").await.unwrap();
    assert_eq!(fb.epoch, 2);
    b.set_fence(fb);
    let err = a
        .append_local(&mut vec![event("r1", 2, false)])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            LogError::Fenced {
                ours: 1,
                current: 2,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(count(a.client()).await, 1);
    // The connection is usable again, and the new leader appends.
    b.append_local(&mut vec![event("r1", 2, false)])
        .await
        .unwrap();
    assert_eq!(count(a.client()).await, 2);
    // Another region's epochs are its own.
    assert_eq!(take(b.client(), "r2", "b").await.unwrap().epoch, 1);
    scratch::drop_database(&url).await;
}

#[tokio::test]
async fn taking_an_epoch_waits_for_an_append_under_way() {
    let Some(url) = scratch::database("pgmesh_fence_wait").await else {
        return;
    };
    let old = catalog::connect(&url).await.unwrap();
    let new = catalog::connect(&url).await.unwrap();
    let admin = catalog::connect(&url).await.unwrap();
    // The old leader's append holds the append lock, its rows not yet committed.
    old.batch_execute(&format!(
        "BEGIN; SELECT pg_advisory_xact_lock({APPEND_LOCK});
         INSERT INTO mesh.changelog (origin, hlc, source_lsn, xid, commit_ts, stamped, changes)
         VALUES ('r1', 1, '0/10', 1, now(), false, '[]')"
    ))
    .await
    .unwrap();
    let pid: i32 = new
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let taking = tokio::spawn(async move {
        let f = take(&new, "r1", "new").await.unwrap();
        (f, count(&new).await)
    });
    scratch::until_waiting_on_lock(&admin, pid).await;
    assert!(!taking.is_finished());
    old.batch_execute("COMMIT").await.unwrap();
    // Once the epoch is taken, what the new leader reads includes that append.
    let (f, logged) = taking.await.unwrap();
    assert_eq!((f.epoch, logged), (1, 1));
    scratch::drop_database(&url).await;
}
