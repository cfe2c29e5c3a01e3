//! The peer-link wire protocol: message types, framing and the versioned handshake.
//!
//! Every frame is a big-endian `u32` length followed by that many bytes of JSON (one
//! [`ClientMsg`] or [`ServerMsg`]), at most [`MAX_FRAME`] bytes, except a batch of one
//! event, which may take up to [`MAX_EVENT_FRAME`]: one source transaction is one event,
//! and a large one must not stop its link. The puller (client)
//! opens with [`Hello`], the server answers [`Welcome`] or [`ServerMsg::Refused`], then
//! streams [`Batch`]es and heartbeats while the client sends cumulative acks.
//!
//! This module owns the shapes and their encoding only. It never touches sockets or the
//! change log, and it never decides policy (which events a peer may see): that is the
//! server's job. Message shapes may only grow by optional fields within one
//! [`PROTO_VERSION`]; anything else needs a new version.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::log::floors::FloorMap;
use crate::log::Logged;

/// The protocol version this build speaks. A server refuses any other.
pub const PROTO_VERSION: u32 = 1;

/// Largest frame either side sends, but for a batch of one event: 64 MiB. A batch of
/// several events is cut to fit it.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// Largest frame a server reads from a client (a hello or an ack): 1 MiB.
pub const MAX_CLIENT_FRAME: usize = 1024 * 1024;

/// Largest batch of one event: 1 GiB, PostgreSQL's own limit on a value. The change log
/// keeps an event in one `jsonb` value (just under 256 MiB at most), so an event it holds
/// fits as JSON text unless most of its characters are ones JSON escapes. Only the puller accepts frames this large, from the server it
/// dialled; a server accepts no client frame above [`MAX_CLIENT_FRAME`].
pub const MAX_EVENT_FRAME: usize = 1024 * 1024 * 1024;

/// TLS ALPN identifier of the link protocol.
pub const ALPN: &[u8] = b"pgmesh-link/1";

/// Errors encoding or decoding one message.
#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("malformed {what} frame: {source}")]
    Decode {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("encoded {what} is {bytes} bytes, above its {limit}-byte frame limit")]
    TooLarge {
        what: &'static str,
        bytes: usize,
        limit: usize,
    },
}

/// First message of a link: who is pulling and from where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version, [`PROTO_VERSION`].
    pub proto: u32,
    /// Mesh name; must equal the server's.
    pub mesh: String,
    /// Region of the puller. The server never sends it its own events back.
    pub region: String,
    /// Node name of the puller, for logs.
    pub node: String,
    /// Checkpoint: serve events with a log sequence number above this one.
    pub after: i64,
    /// Most events per batch (the server may lower it).
    pub max_batch: u32,
    /// Most unacknowledged batches in flight (the server may lower it).
    pub window: u32,
}

/// The server's answer to an accepted [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub proto: u32,
    /// Region of the server.
    pub region: String,
    /// Node name of the server.
    pub node: String,
    /// Highest log sequence number when the link opened.
    pub head: i64,
    /// Every region the server knows of in the mesh (its own and its peers), so that
    /// a spoke learns the regions it hears of only through its hub. Optional.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
}

/// Events after the previous batch, in log order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// The events this peer may see, in log order.
    pub events: Vec<Logged>,
    /// Highest log sequence number this batch covers, filtered events included, so the
    /// puller's checkpoint moves past events it will never be sent.
    pub upto: i64,
    /// Highest log sequence number the server knew of when it sent the batch.
    pub head: i64,
}

/// Client → server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    Hello(Hello),
    /// Everything up to and including log sequence `upto` is applied (cumulative).
    Ack {
        upto: i64,
        /// Everything up to here is applied durably (a synchronous commit covered it),
        /// so the server may prune its log below it. Sent now and then.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        durable: Option<i64>,
    },
}

/// Server → client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    Welcome(Welcome),
    /// The handshake failed; the server closes the link after sending this.
    Refused {
        reason: String,
    },
    Batch(Batch),
    /// Sent when nothing else was sent for a heartbeat interval, and with floors.
    Heartbeat {
        head: i64,
        /// Server wall clock, Unix milliseconds (for lag estimates only).
        now_ms: u64,
        /// Region floors the peer may adopt: every event of each region below its
        /// floor that this server ships to the peer was sent before this heartbeat
        /// (see [`crate::log::floors`]). Optional, so older peers ignore it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        floors: Option<FloorMap>,
    },
}

impl ClientMsg {
    fn kind(&self) -> &'static str {
        match self {
            ClientMsg::Hello(_) => "hello",
            ClientMsg::Ack { .. } => "ack",
        }
    }
}

impl ServerMsg {
    fn kind(&self) -> &'static str {
        match self {
            ServerMsg::Welcome(_) => "welcome",
            ServerMsg::Refused { .. } => "refused",
            ServerMsg::Batch(_) => "batch",
            ServerMsg::Heartbeat { .. } => "heartbeat",
        }
    }
}

/// The frame codec of one end of a link: big-endian `u32` length prefixes, with a cap
/// on the frames it reads and another on those it writes.
#[derive(Debug)]
pub struct LinkCodec {
    read: LengthDelimitedCodec,
    write_max: usize,
}

impl LinkCodec {
    fn new(read_max: usize, write_max: usize) -> Self {
        let read = LengthDelimitedCodec::builder()
            .big_endian()
            .length_field_length(4)
            .max_frame_length(read_max)
            .new_codec();
        Self { read, write_max }
    }

    /// A server's: client frames up to [`MAX_CLIENT_FRAME`], batches up to
    /// [`MAX_EVENT_FRAME`].
    pub fn server() -> Self {
        Self::new(MAX_CLIENT_FRAME, MAX_EVENT_FRAME)
    }

    /// A puller's: batches up to [`MAX_EVENT_FRAME`], its own frames up to
    /// [`MAX_CLIENT_FRAME`].
    pub fn client() -> Self {
        Self::new(MAX_EVENT_FRAME, MAX_CLIENT_FRAME)
    }
}

impl Decoder for LinkCodec {
    type Item = BytesMut;
    type Error = std::io::Error;

    /// A length prefix above the read cap is refused before its payload is buffered.
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, std::io::Error> {
        self.read.decode(src)
    }
}

impl Encoder<Bytes> for LinkCodec {
    type Error = std::io::Error;

    fn encode(&mut self, frame: Bytes, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        if frame.len() > self.write_max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "a {}-byte frame is above the {}-byte cap",
                    frame.len(),
                    self.write_max
                ),
            ));
        }
        dst.reserve(4 + frame.len());
        dst.put_u32(frame.len() as u32);
        dst.extend_from_slice(&frame);
        Ok(())
    }
}

fn encode_json<T: Serialize>(
    what: &'static str,
    msg: &T,
    limit: usize,
) -> Result<Bytes, ProtocolError> {
    let v = serde_json::to_vec(msg).map_err(|source| ProtocolError::Encode { what, source })?;
    if v.len() > limit {
        return Err(ProtocolError::TooLarge {
            what,
            bytes: v.len(),
            limit,
        });
    }
    Ok(Bytes::from(v))
}

/// Encodes a client message as one frame payload.
pub fn encode_client(msg: &ClientMsg) -> Result<Bytes, ProtocolError> {
    encode_json(msg.kind(), msg, MAX_CLIENT_FRAME)
}

/// Encodes a server message as one frame payload: up to [`MAX_EVENT_FRAME`] bytes for
/// a batch of one event, [`MAX_FRAME`] for anything else.
pub fn encode_server(msg: &ServerMsg) -> Result<Bytes, ProtocolError> {
    let limit = match msg {
        ServerMsg::Batch(b) if b.events.len() <= 1 => MAX_EVENT_FRAME,
        _ => MAX_FRAME,
    };
    encode_json(msg.kind(), msg, limit)
}

/// Decodes one frame payload sent by a client.
pub fn decode_client(frame: &[u8]) -> Result<ClientMsg, ProtocolError> {
    serde_json::from_slice(frame).map_err(|source| ProtocolError::Decode {
        what: "client",
        source,
    })
}

/// One event encoded for [`batch_frame`].
pub fn encode_event(l: &Logged) -> Result<Vec<u8>, ProtocolError> {
    serde_json::to_vec(l).map_err(|source| ProtocolError::Encode {
        what: "event",
        source,
    })
}

/// Bytes a batch frame adds to its events: the tag, the field names, two numbers.
pub const BATCH_OVERHEAD: usize = 128;

/// A batch frame of events encoded one by one ([`encode_event`]), byte for byte what
/// [`encode_server`] writes for the same [`ServerMsg::Batch`]; so the server encodes
/// each event once while it fits a batch to a frame. Checking the size is the caller's.
pub fn batch_frame(events: &[Vec<u8>], upto: i64, head: i64) -> Bytes {
    let len: usize = events.iter().map(|e| e.len() + 1).sum();
    let mut out = Vec::with_capacity(len + BATCH_OVERHEAD);
    out.extend_from_slice(BATCH_TAG);
    out.extend_from_slice(br#""events":["#);
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(e);
    }
    out.extend_from_slice(format!(r#"],"upto":{upto},"head":{head}}}"#).as_bytes());
    Bytes::from(out)
}

/// How [`encode_server`] starts a batch frame: the tag first.
const BATCH_TAG: &[u8] = br#"{"type":"batch","#;

/// Decodes one frame payload sent by a server.
///
/// Batches, the most frequent and largest frames, are read straight into [`Batch`]
/// when their tag leads (as [`encode_server`] writes it; `Batch` ignores the `type`
/// field). serde reads an internally tagged enum by buffering the whole message first,
/// which cost a tenth of a receiving node's CPU. Any other frame takes that path.
pub fn decode_server(frame: &[u8]) -> Result<ServerMsg, ProtocolError> {
    let msg = if frame.starts_with(BATCH_TAG) {
        serde_json::from_slice::<Batch>(frame).map(ServerMsg::Batch)
    } else {
        serde_json::from_slice(frame)
    };
    msg.map_err(|source| ProtocolError::Decode {
        what: "server",
        source,
    })
}

/// Reads the first frame of a link as a [`Hello`].
///
/// The version is read before the rest of the message, so a peer speaking another
/// version is told so even when its hello has a different shape. `Err` carries the
/// reason to send back in [`ServerMsg::Refused`].
pub fn parse_hello(frame: &[u8]) -> Result<Hello, String> {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(rename = "type")]
        kind: Option<String>,
        proto: Option<u64>,
    }
    let probe: Probe = serde_json::from_slice(frame)
        .map_err(|e| format!("expected a hello message, got malformed JSON: {e}"))?;
    if probe.kind.as_deref() != Some("hello") {
        return Err(format!(
            "expected a hello message, got {:?}",
            probe.kind.as_deref().unwrap_or("no type")
        ));
    }
    match probe.proto {
        Some(p) if p == u64::from(PROTO_VERSION) => {}
        Some(p) => {
            return Err(format!(
                "unsupported link protocol version {p}: this server speaks version {PROTO_VERSION}"
            ))
        }
        None => return Err("hello carries no protocol version".into()),
    }
    match decode_client(frame) {
        Ok(ClientMsg::Hello(h)) => Ok(h),
        Ok(other) => Err(format!("expected a hello message, got {}", other.kind())),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
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
            let encoded: Vec<Vec<u8>> = evs.iter().map(|l| encode_event(l).unwrap()).collect();
            let msg = ServerMsg::Batch(Batch {
                events: evs,
                upto: 7,
                head: -1,
            });
            assert_eq!(batch_frame(&encoded, 7, -1), encode_server(&msg).unwrap());
        }
    }
}
