//! Handshake, filtering, credit window, wake-ups, heartbeats and resume, in plaintext.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::time::Instant;

use super::{client, next_batch, seqs, Harness, MESH};
use crate::link::protocol::{self, ClientMsg, Hello, ServerMsg, PROTO_VERSION};
use crate::link::{LinkClient, LinkError, LinkEvent, Welcome};

#[tokio::test]
async fn handshake_welcomes_with_the_log_head() {
    let h = Harness::start(|_| {}, None).await;
    for _ in 0..3 {
        h.log.push("eu", false);
    }
    let (c, w) = LinkClient::connect(h.addr, client("us")).await.unwrap();
    assert_eq!(
        w,
        Welcome {
            proto: PROTO_VERSION,
            region: "eu".into(),
            node: "eu-1".into(),
            head: 3,
            regions: vec!["eu".into()],
        }
    );
    assert_eq!(c.received(), 0);
    h.stop().await;
}

fn hello(proto: u32, mesh: &str) -> ClientMsg {
    ClientMsg::Hello(Hello {
        proto,
        mesh: mesh.into(),
        region: "us".into(),
        node: "us-1".into(),
        after: 0,
        max_batch: 10,
        window: 1,
    })
}

async fn refusal(h: &Harness, msg: bytes::Bytes) -> String {
    let mut raw = h.raw().await;
    raw.send(msg).await.unwrap();
    let frame = raw.next().await.unwrap().unwrap();
    let ServerMsg::Refused { reason } = protocol::decode_server(&frame).unwrap() else {
        panic!("expected a refusal");
    };
    // The server closes the link after refusing.
    assert!(raw.next().await.is_none());
    reason
}

#[tokio::test]
async fn unknown_protocol_version_is_refused_with_a_reason() {
    let h = Harness::start(|_| {}, None).await;
    let r = refusal(&h, protocol::encode_client(&hello(99, MESH)).unwrap()).await;
    assert!(r.contains("version 99") && r.contains("version 1"), "{r}");
    // A future hello of another shape still gets a clear answer.
    let r = refusal(
        &h,
        bytes::Bytes::from_static(br#"{"type":"hello","proto":2,"mesh":{"id":7}}"#),
    )
    .await;
    assert!(r.contains("version 2"), "{r}");
    let r = refusal(&h, bytes::Bytes::from_static(b"not json")).await;
    assert!(r.contains("hello"), "{r}");
    h.stop().await;
}

#[tokio::test]
async fn other_mesh_own_region_and_future_checkpoint_are_refused() {
    let h = Harness::start(|_| {}, None).await;
    h.log.push("eu", false);

    let mut other = client("us");
    other.mesh = "someone-else".into();
    let e = LinkClient::connect(h.addr, other).await.unwrap_err();
    assert!(e.is_refusal(), "{e}");
    assert!(e.to_string().contains("mesh"), "{e}");

    let e = LinkClient::connect(h.addr, client("eu")).await.unwrap_err();
    assert!(e.to_string().contains("own region"), "{e}");

    // Names that certificates carry for hosts are no regions.
    for name in ["localhost", "10.0.0.7", "db-eu.example.com"] {
        let e = LinkClient::connect(h.addr, client(name)).await.unwrap_err();
        assert!(e.is_refusal(), "{name}: {e}");
        assert!(e.to_string().contains("not a region name"), "{e}");
    }

    let mut ahead = client("us");
    ahead.after = 2;
    let e = LinkClient::connect(h.addr, ahead).await.unwrap_err();
    assert!(e.to_string().contains("ahead of this log's head 1"), "{e}");

    let mut zero = client("us");
    zero.window = 0;
    assert!(LinkClient::connect(h.addr, zero)
        .await
        .unwrap_err()
        .is_refusal());
    h.stop().await;
}

/// 1 eu, 2 eu local-only, 3 us (the puller's own), 4 ap, 5 eu, 6 ap local-only.
fn mixed_log(h: &Harness) {
    for (origin, local) in [
        ("eu", false),
        ("eu", true),
        ("us", false),
        ("ap", false),
        ("eu", false),
        ("ap", true),
    ] {
        h.log.push(origin, local);
    }
}

async fn pull_all(h: &Harness, upto: i64) -> Vec<(Vec<i64>, i64)> {
    let mut cfg = client("us");
    cfg.max_batch = 2;
    let (mut c, _) = LinkClient::connect(h.addr, cfg).await.unwrap();
    let mut got = Vec::new();
    loop {
        let ev = next_batch(&mut c).await;
        let LinkEvent::Batch { head, .. } = &ev else {
            unreachable!()
        };
        assert_eq!(*head, 6);
        let (s, u) = seqs(&ev);
        c.ack(u).await.unwrap();
        got.push((s, u));
        if u >= upto {
            return got;
        }
    }
}

#[tokio::test]
async fn batches_are_in_order_and_upto_covers_filtered_events() {
    let h = Harness::start(|_| {}, None).await;
    mixed_log(&h);
    assert_eq!(
        pull_all(&h, 6).await,
        vec![(vec![1], 2), (vec![], 4), (vec![5], 6)]
    );
    h.stop().await;
}

#[tokio::test]
async fn a_relay_serves_other_origins_but_never_the_pullers_own() {
    let h = Harness::start(|c| c.relay = true, None).await;
    mixed_log(&h);
    assert_eq!(
        pull_all(&h, 6).await,
        vec![(vec![1], 2), (vec![4], 4), (vec![5], 6)]
    );
    h.stop().await;
}

/// Collects frames until `for_` of (paused) time passes; panics on a batch.
async fn only_heartbeats(c: &mut LinkClient, for_: Duration) -> usize {
    let deadline = Instant::now() + for_;
    let mut beats = 0;
    loop {
        match tokio::time::timeout_at(deadline, c.next()).await {
            Err(_) => return beats,
            Ok(Ok(LinkEvent::Heartbeat { .. })) => beats += 1,
            Ok(other) => panic!("expected only heartbeats, got {other:?}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_window_caps_unacked_batches_and_acks_resume_the_stream() {
    let h = Harness::start(|_| {}, None).await;
    for _ in 0..10 {
        h.log.push("eu", false);
    }
    let mut cfg = client("us");
    cfg.max_batch = 1;
    cfg.window = 2;
    let (mut c, _) = LinkClient::connect(h.addr, cfg).await.unwrap();
    assert_eq!(seqs(&next_batch(&mut c).await), (vec![1], 1));
    assert_eq!(seqs(&next_batch(&mut c).await), (vec![2], 2));
    // Window full: the server neither sends nor reads further, only heartbeats.
    let beats = only_heartbeats(&mut c, Duration::from_secs(5)).await;
    assert!(beats >= 4, "heartbeats keep flowing while stalled: {beats}");
    assert_eq!(h.log.reads(), 2);
    // One ack, one more batch.
    c.ack(1).await.unwrap();
    assert_eq!(seqs(&next_batch(&mut c).await), (vec![3], 3));
    only_heartbeats(&mut c, Duration::from_secs(3)).await;
    // A cumulative ack frees both slots.
    c.ack(3).await.unwrap();
    assert_eq!(seqs(&next_batch(&mut c).await), (vec![4], 4));
    assert_eq!(seqs(&next_batch(&mut c).await), (vec![5], 5));
    // Acking beyond what arrived is a caller bug, caught before it reaches the wire.
    assert!(matches!(
        c.ack(9).await,
        Err(LinkError::AckBeyondReceived {
            upto: 9,
            received: 5
        })
    ));
    h.stop().await;
}

/// A peer that stops reading (a partition without resets) loses its session once a
/// write has blocked for the write timeout, which frees its slot for the next peer.
#[tokio::test(start_paused = true)]
async fn a_peer_that_stops_reading_frees_its_slot() {
    let h = Harness::start(
        |c| {
            c.max_peers = 1;
            c.peer_timeout_ms = 2_000;
            c.heartbeat_ms = 3_600_000;
        },
        None,
    )
    .await;
    for _ in 0..40_000 {
        h.log.push("eu", false);
    }
    // Asks for everything, then never reads: the server's writes fill the sockets.
    let mut raw = h.raw().await;
    let greedy = ClientMsg::Hello(Hello {
        max_batch: 10_000,
        window: 64,
        ..match hello(PROTO_VERSION, MESH) {
            ClientMsg::Hello(h) => h,
            _ => unreachable!(),
        }
    });
    raw.send(protocol::encode_client(&greedy).unwrap())
        .await
        .unwrap();
    // The one slot is taken until that session gives up on a blocked write.
    let t0 = Instant::now();
    let (mut c, _) = LinkClient::connect(h.addr, client("us")).await.unwrap();
    assert!(t0.elapsed() >= Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(seqs(&next_batch(&mut c).await).0[0], 1);
    drop(raw);
    h.stop().await;
}

/// The idle deadline counts from the last frame, not from each call: a caller that
/// re-polls `next` in a `select!` beside a faster timer (as the pull loop does with
/// its durable-checkpoint timer) still notices a peer gone silent.
#[tokio::test(start_paused = true)]
async fn a_silent_peer_is_noticed_although_next_is_polled_anew() {
    let h = Harness::start(|c| c.heartbeat_ms = 3_600_000, None).await;
    let (mut c, _) = LinkClient::connect(h.addr, client("us")).await.unwrap();
    c.set_idle_timeout(Duration::from_secs(10));
    let t0 = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            tokio::select! {
                r = c.next() => break r,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    })
    .await
    .expect("the silence was never noticed");
    assert!(matches!(ended, Err(LinkError::Idle(_))), "{ended:?}");
    assert!(
        t0.elapsed() <= Duration::from_secs(11),
        "{:?}",
        t0.elapsed()
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn new_events_arrive_on_the_wake_watch_not_by_polling() {
    let h = Harness::start(|c| c.heartbeat_ms = 3_600_000, None).await;
    let (mut c, w) = LinkClient::connect(h.addr, client("us")).await.unwrap();
    c.set_idle_timeout(Duration::from_secs(7200));
    assert_eq!(w.head, 0);
    // Let the session find the log empty before appending.
    while h.log.reads() == 0 {
        tokio::task::yield_now().await;
    }
    let reads = h.log.reads();
    // Appended but not notified: nothing moves, the log is not re-read.
    h.log.push("eu", false);
    assert!(tokio::time::timeout(Duration::from_secs(60), c.next())
        .await
        .is_err());
    assert_eq!(h.log.reads(), reads);
    // The notification wakes the session at once (no time passes).
    let t0 = Instant::now();
    h.notify();
    let ev = tokio::time::timeout(Duration::from_secs(1), c.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seqs(&ev), (vec![1], 1));
    assert_eq!(Instant::now(), t0);
    // A burst of appends and notifications coalesces into few reads.
    for _ in 0..5 {
        h.log.push("eu", false);
        h.notify();
    }
    assert_eq!(seqs(&next_batch(&mut c).await), (vec![2, 3, 4, 5, 6], 6));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn idle_links_heartbeat_and_heartbeats_catch_missed_notifications() {
    let h = Harness::start(|_| {}, None).await;
    h.log.push("eu", false);
    h.log.push("eu", false);
    let (mut c, _) = LinkClient::connect(h.addr, client("us")).await.unwrap();
    assert_eq!(seqs(&next_batch(&mut c).await), (vec![1, 2], 2));
    c.ack(2).await.unwrap();
    let t0 = Instant::now();
    assert_eq!(
        c.next().await.unwrap(),
        LinkEvent::Heartbeat {
            head: 2,
            floors: None
        }
    );
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited <= Duration::from_millis(1100),
        "{waited:?}"
    );
    // A notification lost (e.g. while the notifier reconnected): the next heartbeat
    // sees the head moved, says so, and the batch follows.
    h.log.push("eu", false);
    assert_eq!(
        c.next().await.unwrap(),
        LinkEvent::Heartbeat {
            head: 3,
            floors: None
        }
    );
    assert_eq!(seqs(&c.next().await.unwrap()), (vec![3], 3));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn floors_follow_every_batch_below_them() {
    let h = Harness::start(|_| {}, None).await;
    for _ in 0..3 {
        h.log.push("eu", false);
    }
    let floors: crate::log::floors::FloorMap = [("eu".to_string(), 77)].into_iter().collect();
    h.log.set_floors(floors.clone());
    // One event per batch and one batch in flight: the floors, read with the log at
    // seq 3, may only follow the batch that reaches 3.
    let mut cfg = client("us");
    cfg.max_batch = 1;
    cfg.window = 1;
    let (mut c, _) = LinkClient::connect(h.addr, cfg).await.unwrap();
    let mut seen = Vec::new();
    loop {
        match c.next().await.unwrap() {
            LinkEvent::Batch { upto, .. } => {
                seen.push(upto);
                c.ack(upto).await.unwrap();
            }
            LinkEvent::Heartbeat { head, floors: got } => {
                if let Some(got) = got {
                    assert_eq!(got, floors);
                    assert_eq!(head, 3);
                    break;
                }
            }
        }
    }
    assert_eq!(
        seen,
        [1, 2, 3],
        "floors arrived before the batches below them"
    );
    // And again about every heartbeat interval while the link is idle.
    let t0 = Instant::now();
    loop {
        if let LinkEvent::Heartbeat {
            floors: Some(_), ..
        } = c.next().await.unwrap()
        {
            break;
        }
    }
    assert!(
        t0.elapsed() <= Duration::from_millis(2100),
        "{:?}",
        t0.elapsed()
    );
    h.stop().await;
}

#[tokio::test]
async fn a_client_resumes_from_its_checkpoint_after_reconnecting() {
    let h = Harness::start(|_| {}, None).await;
    for _ in 0..5 {
        h.log.push("eu", false);
    }
    let mut cfg = client("us");
    cfg.max_batch = 2;
    let (mut c, _) = LinkClient::connect(h.addr, cfg.clone()).await.unwrap();
    let (_, upto) = seqs(&next_batch(&mut c).await);
    c.ack(upto).await.unwrap();
    // The second batch arrives but is never applied, then the link drops.
    next_batch(&mut c).await;
    drop(c);

    cfg.after = upto;
    let (mut c, w) = LinkClient::connect(h.addr, cfg).await.unwrap();
    assert_eq!(w.head, 5);
    assert_eq!(seqs(&next_batch(&mut c).await), (vec![3, 4], 4));
    assert_eq!(seqs(&next_batch(&mut c).await), (vec![5], 5));
    h.stop().await;
}

#[tokio::test]
async fn protocol_violations_close_only_that_link() {
    let h = Harness::start(|_| {}, None).await;
    h.log.push("eu", false);
    let mut raw = h.raw().await;
    raw.send(protocol::encode_client(&hello(PROTO_VERSION, MESH)).unwrap())
        .await
        .unwrap();
    let welcome = protocol::decode_server(&raw.next().await.unwrap().unwrap()).unwrap();
    assert!(matches!(welcome, ServerMsg::Welcome(_)));
    let batch = protocol::decode_server(&raw.next().await.unwrap().unwrap()).unwrap();
    assert!(
        matches!(batch, ServerMsg::Batch(ref b) if b.upto == 1),
        "{batch:?}"
    );
    // Acking what was never sent ends the link...
    raw.send(
        protocol::encode_client(&ClientMsg::Ack {
            upto: 99,
            durable: None,
        })
        .unwrap(),
    )
    .await
    .unwrap();
    assert!(raw.next().await.is_none());
    // ...while the server keeps serving others.
    let (mut c, _) = LinkClient::connect(h.addr, client("us")).await.unwrap();
    assert_eq!(seqs(&next_batch(&mut c).await), (vec![1], 1));
    h.stop().await;
}

#[tokio::test]
async fn shutdown_closes_open_links_and_the_server_drains() {
    let h = Harness::start(|_| {}, None).await;
    let (mut c, _) = LinkClient::connect(h.addr, client("us")).await.unwrap();
    let addr = h.addr;
    h.stop().await;
    let e = c.next().await.unwrap_err();
    assert!(e.is_disconnect(), "{e}");
    assert!(LinkClient::connect(addr, client("us")).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn a_silent_server_is_detected_by_the_connect_timeout() {
    // A listener that accepts and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hold = tokio::spawn(async move { listener.accept().await });
    let e = LinkClient::connect(addr, client("us")).await.unwrap_err();
    assert!(matches!(e, LinkError::ConnectTimeout { .. }), "{e}");
    hold.abort();
}
