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
        "BEGIN; SELECT pg_advisory_xact_lock({APPEND_LOCK})"
    ))
    .await
    .unwrap();
    scratch::logged(&old, "r1", 1).await;
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

#[tokio::test]
async fn an_append_queued_behind_a_new_epoch_is_refused() {
    let Some(url) = scratch::database("pgmesh_fence_queue").await else {
        return;
    };
    let mut old = TableLog::new(catalog::connect(&url).await.unwrap())
        .await
        .unwrap();
    let fence = take(old.client(), "r1", "old").await.unwrap();
    old.set_fence(fence);
    let new = catalog::connect(&url).await.unwrap();
    let holder = catalog::connect(&url).await.unwrap();
    let admin = catalog::connect(&url).await.unwrap();
    // Another append holds the lock; the new leader's take queues on it, then the
    // old leader's append queues behind the take.
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({APPEND_LOCK})"
        ))
        .await
        .unwrap();
    let new_pid = backend(&new).await;
    let old_pid = backend(old.client()).await;
    let taking = tokio::spawn(async move { take(&new, "r1", "new").await.unwrap() });
    scratch::until_waiting_on_lock(&admin, new_pid).await;
    let appending = tokio::spawn(async move {
        let r = old.append_local(&mut vec![event("r1", 1, false)]).await;
        (old, r)
    });
    scratch::until_waiting_on_lock(&admin, old_pid).await;
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(taking.await.unwrap().epoch, 2);
    let (old, r) = tokio::time::timeout(std::time::Duration::from_secs(10), appending)
        .await
        .expect("the refused append ends")
        .unwrap();
    assert!(
        matches!(
            r,
            Err(LogError::Fenced {
                ours: 1,
                current: 2,
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(count(&admin).await, 0);
    // The refused append let go of the lock: the log takes appends again.
    let again = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        take(old.client(), "r1", "old"),
    )
    .await
    .expect("the append lock is free")
    .unwrap();
    assert_eq!(again.epoch, 3);
    scratch::drop_database(&url).await;
}

async fn backend(c: &Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}
