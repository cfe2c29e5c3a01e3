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

/// Encodes a server message as one frame payload of at most [`MAX_FRAME`] bytes. The
/// server writes its batches with a [`BatchWriter`], which may exceed that for one event.
pub fn encode_server(msg: &ServerMsg) -> Result<Bytes, ProtocolError> {
    encode_json(msg.kind(), msg, MAX_FRAME)
}

/// Decodes one frame payload sent by a client.
pub fn decode_client(frame: &[u8]) -> Result<ClientMsg, ProtocolError> {
    serde_json::from_slice(frame).map_err(|source| ProtocolError::Decode {
        what: "client",
        source,
    })
}

/// A batch frame written event by event into one buffer, byte for byte what
/// [`encode_server`] writes for the same [`ServerMsg::Batch`]: so the server encodes
/// each event once while it fits a batch to a frame, and can take the last one back.
#[derive(Debug)]
pub struct BatchWriter {
    out: Vec<u8>,
    events: usize,
}

/// Bytes a batch frame adds after its events: the closing and two numbers.
pub const BATCH_TAIL: usize = 64;

impl BatchWriter {
    pub fn new() -> Self {
        let mut out = Vec::with_capacity(64 * 1024);
        out.extend_from_slice(BATCH_TAG);
        out.extend_from_slice(br#""events":["#);
        Self { out, events: 0 }
    }

    /// The frame's length so far, without [`BATCH_TAIL`].
    pub fn bytes(&self) -> usize {
        self.out.len()
    }

    /// Appends one event.
    pub fn push(&mut self, l: &Logged) -> Result<(), ProtocolError> {
        if self.events > 0 {
            self.out.push(b',');
        }
        serde_json::to_writer(&mut self.out, l).map_err(|source| ProtocolError::Encode {
            what: "event",
            source,
        })?;
        self.events += 1;
        Ok(())
    }

    /// Takes back everything written after the frame was `len` long (see
    /// [`BatchWriter::bytes`]), which must be where an event began.
    pub fn truncate(&mut self, len: usize) {
        self.out.truncate(len);
        self.events -= 1;
    }

    /// The finished frame; checking its size is the caller's.
    pub fn finish(mut self, upto: i64, head: i64) -> Bytes {
        self.out
            .extend_from_slice(format!(r#"],"upto":{upto},"head":{head}}}"#).as_bytes());
        Bytes::from(self.out)
    }
}

impl Default for BatchWriter {
    fn default() -> Self {
        Self::new()
    }
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
#[path = "protocol_tests.rs"]
mod tests;
