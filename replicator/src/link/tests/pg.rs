//! The real path against PostgreSQL when `PGMESH_TEST_DATABASE_URL` is set (skipped
//! otherwise): `mesh.changelog` through [`SharedTableLog`], woken by
//! [`LogNotifier`], served to a pulling client. Uses its own scratch database.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{client, event, next_batch, seqs};
use crate::catalog;
use crate::link::{LinkClient, LinkServer, ServeConfig, SharedTableLog};
use crate::log::notify::LogNotifier;
use crate::log::{ChangeLog, TableLog};

#[tokio::test]
async fn table_log_and_notifier_feed_a_link() {
    let Some(url) = crate::scratch::database("pgmesh_link").await else {
        return;
    };
    let mut writer = TableLog::new(catalog::connect(&url).await.unwrap())
        .await
        .unwrap();
    writer
        .append(&[event("eu", 1, false), event("us", 1, false)])
        .await
        .unwrap();

    let reader = TableLog::new(catalog::connect(&url).await.unwrap())
        .await
        .unwrap();
    let (wake, notifier) = LogNotifier::start(&url);
    let shutdown = CancellationToken::new();
    let mut cfg = ServeConfig::new("127.0.0.1:0".parse().unwrap(), super::MESH, "eu", "eu-1");
    // Heartbeats (which also check the head) out of the way: only NOTIFY can wake it.
    cfg.heartbeat_ms = 600_000;
    let (addr, server) = LinkServer::start(
        cfg,
        Arc::new(SharedTableLog::new(reader)),
        wake,
        None,
        shutdown.clone(),
    )
    .await
    .unwrap();

    let (mut link, w) = LinkClient::connect(addr, client("us")).await.unwrap();
    assert_eq!(w.head, 2);
    assert_eq!(seqs(&next_batch(&mut link).await), (vec![1], 2));
    link.ack(2).await.unwrap();

    // An append is delivered by its NOTIFY.
    writer.append(&[event("eu", 2, false)]).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), next_batch(&mut link))
        .await
        .unwrap();
    assert_eq!(seqs(&ev), (vec![3], 3));

    drop(link);
    shutdown.cancel();
    server.await.unwrap();
    notifier.abort();
    drop(writer);
    crate::scratch::drop_database(&url).await;
}

/// A peer's handshake registers it under the prune mark's lock: one that comes back
/// below what it reported (restored) holds pruning at 0 until it reports a durable
/// position again, and a peer asking for pruned events is told how far pruning went
/// and changes nothing.
#[tokio::test]
async fn a_handshake_holds_pruning_back_to_the_peers_position() {
    use crate::link::server::LogReader;
    use crate::log::prune::prune;
    let Some(url) = crate::scratch::database("pgmesh_open_for").await else {
        return;
    };
    let mut writer = TableLog::new(catalog::connect(&url).await.unwrap())
        .await
        .unwrap();
    let mut events: Vec<_> = (1..=4).map(|n| event("eu", n, false)).collect();
    let logged = writer.append_local(&mut events).await.unwrap();
    let seq = |i: usize| logged[i].seq;
    let c = catalog::connect(&url).await.unwrap();
    c.execute(
        "INSERT INTO mesh.peer_acks (peer, durable_seq) VALUES ('us', $1)",
        &[&seq(3)],
    )
    .await
    .unwrap();
    let log = SharedTableLog::new(
        TableLog::new(catalog::connect(&url).await.unwrap())
            .await
            .unwrap(),
    );
    // `us` comes back from an older checkpoint (restored): it streams from seq(1),
    // which may not even be durable there yet.
    assert_eq!(log.open_for("us", seq(1)).await.unwrap(), 0);
    let p = prune(&c, "eu", &["us".to_string()]).await.unwrap();
    assert_eq!(p.upto, 0, "pruned under the streaming peer");
    assert_eq!(p.waiting_for, ["us"]);
    // Its next durable report lets pruning go on, to there.
    log.record_durable("us", seq(1)).await.unwrap();
    let p = prune(&c, "eu", &["us".to_string()]).await.unwrap();
    assert_eq!(p.upto, seq(1));
    // Asking for events below the mark: refused by the caller, nothing registered.
    assert_eq!(log.open_for("us", 0).await.unwrap(), seq(1));
    let kept: i64 = c
        .query_one(
            "SELECT durable_seq FROM mesh.peer_acks WHERE peer = 'us'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, seq(1));
    drop((c, log, writer));
    crate::scratch::drop_database(&url).await;
}
