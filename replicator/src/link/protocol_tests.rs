//! Tests of the link protocol: shapes, encodings, framing and the handshake check.

use super::*;
use crate::event::{Change, ChangeEvent, Stamp, STAMP_VERSION};
use crate::hlc::Hlc;

fn logged(seq: i64) -> Logged {
    Logged {
        seq,
        event: ChangeEvent {
            origin: "eu".into(),
            // Above 2^53: must survive JSON exactly.
            hlc: Hlc::from_u64(u64::MAX - 7),
            source_lsn: 0x1_0000_0000_0000,
            xid: u32::MAX,
            commit_ts_us: 1_732_270_000_123_456,
            stamp: Some(Stamp {
                v: STAMP_VERSION,
                hlc: Hlc::from_parts(1_732_270_000_123, 4),
                region: "eu".into(),
                node: "n1".into(),
                user: "app\u{e9}".into(),
                app: "psql".into(),
                addr: "10.0.0.1:5000".into(),
                local: false,
            }),
            local_only: false,
            // Built from JSON so the test keeps up with new optional fields.
            changes: vec![serde_json::from_str::<Change>(
                r#"{"table":"public.t","op":"update","pk":[["id","1"]],
                    "new":[["id","1"],["n",null],["x","3.14159265358979323846264"]],
                    "unchanged":["blob"],"types":[23,25,1700]}"#,
            )
            .unwrap()],
        },
    }
}

fn client_round_trip(m: ClientMsg) {
    let bytes = encode_client(&m).unwrap();
    assert_eq!(decode_client(&bytes).unwrap(), m);
}

fn server_round_trip(m: ServerMsg) {
    let bytes = encode_server(&m).unwrap();
    assert_eq!(decode_server(&bytes).unwrap(), m);
}

fn hello() -> Hello {
    Hello {
        proto: PROTO_VERSION,
        mesh: "prod".into(),
        region: "us".into(),
        node: "us-1".into(),
        after: 42,
        max_batch: 500,
        window: 4,
    }
}

#[test]
fn hello_round_trip() {
    client_round_trip(ClientMsg::Hello(hello()));
}

#[test]
fn ack_round_trip() {
    client_round_trip(ClientMsg::Ack {
        upto: i64::MAX,
        durable: None,
    });
    client_round_trip(ClientMsg::Ack {
        upto: 7,
        durable: Some(5),
    });
}

#[test]
fn welcome_round_trip() {
    server_round_trip(ServerMsg::Welcome(Welcome {
        proto: PROTO_VERSION,
        region: "eu".into(),
        node: "eu-1".into(),
        head: 7,
        regions: vec!["eu".into(), "us".into()],
    }));
}

#[test]
fn refused_round_trip() {
    server_round_trip(ServerMsg::Refused {
        reason: "mesh \"a\" is not \"b\"".into(),
    });
}

#[test]
fn batch_round_trip() {
    server_round_trip(ServerMsg::Batch(Batch {
        events: vec![logged(1), logged(5)],
        upto: 9,
        head: 12,
    }));
    server_round_trip(ServerMsg::Batch(Batch {
        events: vec![],
        upto: 3,
        head: 3,
    }));
}

#[test]
fn batch_frames_take_the_direct_path_and_others_still_decode() {
    let batch = ServerMsg::Batch(Batch {
        events: vec![logged(2)],
        upto: 4,
        head: 4,
    });
    let bytes = encode_server(&batch).unwrap();
    assert!(bytes.starts_with(BATCH_TAG));
    // The same batch with its tag last (another encoder) decodes the same.
    let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let tag = v.as_object_mut().unwrap().remove("type").unwrap();
    let mut reordered = serde_json::to_string(&v).unwrap();
    reordered.pop();
    reordered.push_str(&format!(",\"type\":{tag}}}"));
    assert!(!reordered.as_bytes().starts_with(BATCH_TAG));
    assert_eq!(decode_server(reordered.as_bytes()).unwrap(), batch);
    // A frame that starts like a batch but is not one is an error, not a batch.
    assert!(decode_server(br#"{"type":"batch","upto":1}"#).is_err());
}

#[test]
fn heartbeat_round_trip() {
    server_round_trip(ServerMsg::Heartbeat {
        head: 0,
        now_ms: u64::MAX,
        floors: None,
    });
    let floors = [("r1".to_string(), i64::MAX), ("r3".to_string(), 1)];
    server_round_trip(ServerMsg::Heartbeat {
        head: 7,
        now_ms: 1,
        floors: Some(floors.into_iter().collect()),
    });
}

#[test]
fn heartbeats_with_and_without_floors_are_understood_both_ways() {
    // A heartbeat from a server that predates floors has none.
    let old = br#"{"type":"heartbeat","head":3,"now_ms":5}"#;
    let ServerMsg::Heartbeat { head, floors, .. } = decode_server(old).unwrap() else {
        panic!("not a heartbeat");
    };
    assert_eq!((head, floors), (3, None));
    // A peer that predates floors reads only the fields it knows.
    #[derive(Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum OldServerMsg {
        Heartbeat { head: i64, now_ms: u64 },
    }
    let new = encode_server(&ServerMsg::Heartbeat {
        head: 4,
        now_ms: 6,
        floors: Some([("r2".to_string(), 9)].into_iter().collect()),
    })
    .unwrap();
    let OldServerMsg::Heartbeat { head, now_ms } = serde_json::from_slice(&new).unwrap();
    assert_eq!((head, now_ms), (4, 6));
}

#[test]
fn parse_hello_accepts_current_version() {
    let bytes = encode_client(&ClientMsg::Hello(hello())).unwrap();
    assert_eq!(parse_hello(&bytes).unwrap(), hello());
}

#[test]
fn parse_hello_names_an_unknown_version_even_with_another_shape() {
    let frame = br#"{"type":"hello","proto":2,"cluster":{"name":"x"}}"#;
    let reason = parse_hello(frame).unwrap_err();
    assert!(reason.contains("version 2"), "{reason}");
    assert!(reason.contains("version 1"), "{reason}");
}

#[test]
fn parse_hello_refuses_other_messages_and_garbage() {
    let ack = encode_client(&ClientMsg::Ack {
        upto: 1,
        durable: None,
    })
    .unwrap();
    assert!(parse_hello(&ack).unwrap_err().contains("ack"));
    assert!(parse_hello(b"\xff\x00").unwrap_err().contains("malformed"));
    assert!(parse_hello(br#"{"type":"hello"}"#)
        .unwrap_err()
        .contains("no protocol version"));
}

#[test]
fn codec_frames_are_big_endian_u32_and_capped() {
    use tokio_util::codec::{Decoder, Encoder};
    let prefix = |n: usize| BytesMut::from(&(n as u32).to_be_bytes()[..]);
    let mut server = LinkCodec::server();
    let mut client = LinkCodec::client();
    let mut buf = BytesMut::new();
    server.encode(Bytes::from_static(b"abc"), &mut buf).unwrap();
    assert_eq!(&buf[..], b"\x00\x00\x00\x03abc");
    assert_eq!(&client.decode(&mut buf).unwrap().unwrap()[..], b"abc");
    // A length prefix above the reader's cap is refused before any payload is
    // buffered: a server reads no client frame above MAX_CLIENT_FRAME, a puller
    // reads batches up to MAX_EVENT_FRAME.
    assert!(server.decode(&mut prefix(MAX_CLIENT_FRAME + 1)).is_err());
    assert!(client.decode(&mut prefix(MAX_FRAME + 1)).unwrap().is_none());
    assert!(LinkCodec::client()
        .decode(&mut prefix(MAX_EVENT_FRAME + 1))
        .is_err());
    // Nor does either write above its own cap.
    let over = Bytes::from(vec![b' '; MAX_CLIENT_FRAME + 1]);
    assert!(LinkCodec::client()
        .encode(over.clone(), &mut BytesMut::new())
        .is_err());
    server.encode(over, &mut BytesMut::new()).unwrap();
    // An incomplete frame is "not yet", not an error.
    let mut part = BytesMut::from(&b"\x00\x00\x00\x05ab"[..]);
    assert!(server.decode(&mut part).unwrap().is_none());
}

#[test]
fn batch_frames_are_what_encode_server_writes() {
    let mut events: Vec<Logged> = (1..=3)
        .map(|n| Logged {
            seq: n,
            event: crate::scratch::event("us", n as u64, n == 2),
        })
        .collect();
    events[0].event.stamp = None;
    for evs in [vec![], events] {
        let mut w = BatchWriter::new();
        for l in &evs {
            w.push(l).unwrap();
        }
        let msg = ServerMsg::Batch(Batch {
            events: evs,
            upto: 7,
            head: -1,
        });
        assert_eq!(w.finish(7, -1), encode_server(&msg).unwrap());
    }
}
