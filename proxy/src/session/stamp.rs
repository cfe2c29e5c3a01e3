//! Write stamping: what the proxy adds to a transaction so capture knows its HLC
//! and origin.
//!
//! The stamp is `pg_logical_emit_message(true, 'pgmesh', <json>)`, run inside the
//! transaction right before it commits, guarded by
//! `pg_current_xact_id_if_assigned() IS NOT NULL` so a transaction that wrote
//! nothing gains no WAL and no commit record. In the simple protocol the statement is
//! spliced into the query text and recognised in the answers by a per-process column
//! alias; in the extended protocol it is a separate Parse/Bind/Execute/Close of a
//! named statement whose answers the relay swallows. This module builds those bytes;
//! it never decides *when* to stamp (that is `track`).

use bytes::{BufMut, BytesMut};
use pgmesh_replicator::event::{Stamp, STAMP_PREFIX, STAMP_VERSION};
use pgmesh_replicator::hlc::{HlcError, HybridClock, SystemClock};
use rand::Rng;

use super::ClientInfo;

/// Turns the payload's `"local":false` into the session's actual
/// `pgmesh.replicate` setting, read by the server inside the transaction, so SET,
/// SET LOCAL, RESET, DISCARD and rollbacks all follow PostgreSQL's own rules. `{}`
/// is the payload expression.
const LOCAL_FLAG: &str = "replace({}, ',\"local\":false}', CASE WHEN lower(coalesce(current_setting('pgmesh.replicate', true), 'on')) IN ('off', 'false', 'no', '0') THEN ',\"local\":true}' ELSE ',\"local\":false}' END)";

fn content(payload_expr: &str) -> String {
    LOCAL_FLAG.replace("{}", payload_expr)
}

/// Name of the statement and portal the proxy uses for extended-protocol stamps.
const STMT: &str = "pgmesh_stamp";
/// PostgreSQL type OID of `text`.
const TEXT_OID: u32 = 25;

/// Produces stamps for every session of a node.
#[derive(Debug)]
pub struct Stamper {
    clock: HybridClock<SystemClock>,
    region: String,
    node: String,
    alias: String,
}

impl Stamper {
    pub fn new(region: &str, node: &str) -> Self {
        Self {
            clock: HybridClock::new(SystemClock),
            region: region.to_string(),
            node: node.to_string(),
            alias: format!("pgmesh_stamp_{:08x}", rand::thread_rng().gen::<u32>()),
        }
    }

    /// Column alias that marks the simple-protocol stamp's RowDescription.
    pub fn alias(&self) -> &str {
        &self.alias
    }

    /// A fresh stamp payload for a session's transaction. Its `local` flag is
    /// decided by the server when the stamp runs (see [`LOCAL_FLAG`]).
    pub fn payload(&self, info: &ClientInfo) -> Result<String, HlcError> {
        Ok(Stamp {
            v: STAMP_VERSION,
            hlc: self.clock.now()?,
            region: self.region.clone(),
            node: self.node.clone(),
            user: info.user.clone(),
            app: info.application_name.clone(),
            addr: info.peer.to_string(),
            local: false,
        }
        .encode())
    }

    /// The stamp as one SQL statement for the simple protocol (no trailing `;`).
    pub fn statement(&self, payload: &str) -> String {
        format!(
            "SELECT pg_logical_emit_message(true, '{STAMP_PREFIX}', {}) AS {} \
             WHERE pg_current_xact_id_if_assigned() IS NOT NULL",
            content(&format!("$pgmesh${payload}$pgmesh$")),
            self.alias
        )
    }

    /// Appends Parse/Bind/Execute/Close messages that stamp the current transaction.
    /// The server answers with ParseComplete, BindComplete, maybe a DataRow,
    /// CommandComplete and CloseComplete.
    pub fn extended(&self, payload: &str, out: &mut BytesMut) {
        let query = format!(
            "SELECT pg_logical_emit_message(true, '{STAMP_PREFIX}', {}) \
             WHERE pg_current_xact_id_if_assigned() IS NOT NULL",
            content("$1::text")
        );
        message(out, b'P', |b| {
            cstr(b, STMT);
            cstr(b, &query);
            b.put_i16(1);
            b.put_u32(TEXT_OID);
        });
        message(out, b'B', |b| {
            cstr(b, STMT);
            cstr(b, STMT);
            b.put_i16(0);
            b.put_i16(1);
            b.put_i32(payload.len() as i32);
            b.put_slice(payload.as_bytes());
            b.put_i16(0);
        });
        message(out, b'E', |b| {
            cstr(b, STMT);
            b.put_i32(0);
        });
        message(out, b'C', |b| {
            b.put_u8(b'S');
            cstr(b, STMT);
        });
    }
}

fn cstr(b: &mut BytesMut, s: &str) {
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}

/// Appends one tagged message whose body `fill` writes.
pub fn message(out: &mut BytesMut, tag: u8, fill: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let len_at = out.len();
    out.put_u32(0);
    fill(out);
    let len = (out.len() - len_at) as u32;
    out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Reads a NUL-terminated string at the start of `buf`; returns it and the rest.
pub fn read_cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = buf.iter().position(|&b| b == 0)?;
    Some((&buf[..end], &buf[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::frame::peek_header;

    fn info() -> ClientInfo {
        ClientInfo {
            peer: "127.0.0.1:9".parse().unwrap(),
            user: "u".into(),
            database: "d".into(),
            application_name: "app".into(),
        }
    }

    #[test]
    fn extended_messages_frame_correctly() {
        let s = Stamper::new("eu", "n1");
        let p = s.payload(&info()).unwrap();
        let mut out = BytesMut::new();
        s.extended(&p, &mut out);
        let mut rest = &out[..];
        let mut tags = Vec::new();
        while let Some(h) = peek_header(rest, 1 << 20).unwrap() {
            tags.push(h.tag);
            rest = &rest[h.total..];
        }
        assert_eq!(tags, b"PBEC");
        assert!(rest.is_empty());
        let stamp = Stamp::decode(p.as_bytes()).unwrap();
        assert_eq!((stamp.region.as_str(), stamp.user.as_str()), ("eu", "u"));
    }

    #[test]
    fn payloads_have_increasing_hlc() {
        let s = Stamper::new("eu", "n1");
        let a = Stamp::decode(s.payload(&info()).unwrap().as_bytes()).unwrap();
        let b = Stamp::decode(s.payload(&info()).unwrap().as_bytes()).unwrap();
        assert!(b.hlc > a.hlc);
        let text = s.payload(&info()).unwrap();
        assert!(
            text.ends_with(",\"local\":false}"),
            "the server-side flag rewrite needs this suffix: {text}"
        );
        assert!(s.statement("{}").contains(s.alias()));
    }
}
