//! Large frames: a batch of one event above [`protocol::MAX_FRAME`], and frames that
//! take longer to cross the wire than the link's timeouts allow for a silent peer.
//! Real time and real loopback sockets: the kernel's buffers are part of the test.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{client, next_batch, seqs, Harness, MESH};
use crate::event::{Change, Op};
use crate::link::protocol::{self, Batch, ClientMsg, Hello, LinkCodec, ServerMsg, PROTO_VERSION};
use crate::link::{LinkClient, LinkEvent, Welcome};
use crate::log::Logged;

/// An insert into `public.big` of one `bytes`-long value.
fn big_change(bytes: usize) -> Change {
    Change {
        table: "public.big".into(),
        op: Op::Insert,
        pk: vec![("id".into(), Some("1".into()))],
        old: None,
        new: Some(vec![("body".into(), Some("x".repeat(bytes)))]),
        unchanged: vec![],
        types: vec![25],
        prev: None,
    }
}

/// One source transaction is one event: one larger than a frame must still reach the
/// peer (alone in its batch), not stop the link at its sequence number for good.
#[tokio::test]
async fn an_event_larger_than_a_frame_travels_alone_in_its_batch() {
    let h = Harness::start(|_| {}, None).await;
    let value = "x".repeat(protocol::MAX_FRAME);
    h.log.push("eu", false);
    h.log.push_with("eu", false, |e| {
        e.changes = vec![big_change(protocol::MAX_FRAME)]
    });
    h.log.push("eu", false);
    let (mut c, _) = LinkClient::connect(h.addr, client("us")).await.unwrap();
    let mut got = Vec::new();
    while got.last().is_none_or(|(_, upto)| *upto < 3) {
        let ev = next_batch(&mut c).await;
        if let LinkEvent::Batch { events, .. } = &ev {
            if let Some(big) = events.iter().find(|l| l.seq == 2) {
                let new = big.event.changes[0].new.as_ref().unwrap();
                assert!(
                    new[0].1.as_deref() == Some(value.as_str()),
                    "the event arrives whole"
                );
            }
        }
        let (seqs, upto) = seqs(&ev);
        c.ack(upto).await.unwrap();
        got.push((seqs, upto));
    }
    assert_eq!(got, vec![(vec![1], 1), (vec![2], 2), (vec![3], 3)]);
    h.stop().await;
}

/// The puller's idle timeout is for a silent peer: a frame whose bytes keep arriving
/// is not one, however long the whole takes.
#[tokio::test]
async fn a_frame_still_arriving_is_not_an_idle_link() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        let mut framed = tokio_util::codec::Framed::new(sock, LinkCodec::server());
        let hello = framed.next().await.unwrap().unwrap();
        assert!(protocol::parse_hello(&hello).is_ok());
        let welcome = ServerMsg::Welcome(Welcome {
            proto: PROTO_VERSION,
            region: "eu".into(),
            node: "eu-1".into(),
            head: 1,
            regions: vec![],
        });
        framed
            .send(protocol::encode_server(&welcome).unwrap())
            .await
            .unwrap();
        let mut sock = framed.into_inner();
        let mut event = Logged {
            seq: 1,
            event: crate::scratch::event("eu", 1, false),
        };
        event.event.changes = vec![big_change(1000)];
        let batch = ServerMsg::Batch(Batch {
            events: vec![event],
            upto: 1,
            head: 1,
        });
        let payload = protocol::encode_server(&batch).unwrap();
        let mut frame = BytesMut::new();
        frame.put_u32(payload.len() as u32);
        frame.extend_from_slice(&payload);
        // Five parts, 250 ms apart: 1 s in all, against an idle timeout of 400 ms.
        for part in frame.chunks(frame.len().div_ceil(5)) {
            sock.write_all(part).await.unwrap();
            sock.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        sock
    });
    let (mut c, _) = LinkClient::connect(addr, client("us")).await.unwrap();
    c.set_idle_timeout(Duration::from_millis(400));
    let got = c.next().await.expect("the slow frame arrives");
    assert_eq!(seqs(&got), (vec![1], 1));
    drop(server.await.unwrap());
}

/// The server's write timeout is for a peer that stopped reading: one that reads a
/// large frame slowly keeps its link until the frame is through.
#[tokio::test]
async fn a_slow_reader_of_a_large_frame_keeps_its_link() {
    const BIG: usize = 24 * 1024 * 1024;
    let h = Harness::start(|c| c.peer_timeout_ms = 400, None).await;
    h.log
        .push_with("eu", false, |e| e.changes = vec![big_change(BIG)]);
    let mut sock = TcpStream::connect(h.addr).await.unwrap();
    let hello = protocol::encode_client(&ClientMsg::Hello(Hello {
        proto: PROTO_VERSION,
        mesh: MESH.into(),
        region: "us".into(),
        node: "us-1".into(),
        after: 0,
        max_batch: 10,
        window: 1,
    }))
    .unwrap();
    sock.write_all(&(hello.len() as u32).to_be_bytes())
        .await
        .unwrap();
    sock.write_all(&hello).await.unwrap();
    // 1 MiB every 100 ms: the frame takes over 2 s to read, the kernel's buffers
    // hold a few MiB of it, so the server's write lasts well past 400 ms.
    let mut buf = BytesMut::new();
    let mut part = vec![0u8; 1024 * 1024];
    let batch = loop {
        if buf.len() >= 4 {
            let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
            if buf.len() >= 4 + len {
                let frame = buf.split_to(4 + len);
                match protocol::decode_server(&frame[4..]).unwrap() {
                    ServerMsg::Batch(b) => break b,
                    _ => continue,
                }
            }
        }
        let n = sock.read(&mut part).await.unwrap();
        assert!(
            n > 0,
            "the server closed the link {} bytes into it",
            buf.len()
        );
        buf.extend_from_slice(&part[..n]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(batch.events.len(), 1);
    let new = batch.events[0].event.changes[0].new.as_ref().unwrap();
    assert_eq!(new[0].1.as_ref().map(String::len), Some(BIG));
    h.stop().await;
}
