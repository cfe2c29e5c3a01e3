//! Typed forms of the few messages the proxy decodes or synthesizes.
//!
//! Everything here is a small hand-written type with an encoder and a decoder, each
//! with a round-trip test. The relay forwards every message it does not change as the
//! original bytes; these types exist only for the messages it must read
//! (ReadyForQuery, BackendKeyData, ErrorResponse severity, AuthenticationSASL) or
//! write itself (ErrorResponse, BackendKeyData, ReadyForQuery).

use bytes::{BufMut, Bytes, BytesMut};

/// Transaction status reported by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TxStatus {
    /// `I`: not in a transaction block.
    #[default]
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block.
    Failed,
}

impl TxStatus {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'I' => Some(Self::Idle),
            b'T' => Some(Self::InTransaction),
            b'E' => Some(Self::Failed),
            _ => None,
        }
    }

    pub fn as_byte(self) -> u8 {
        match self {
            Self::Idle => b'I',
            Self::InTransaction => b'T',
            Self::Failed => b'E',
        }
    }
}

fn tagged(tag: u8, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(tag);
    out.put_u32(body.len() as u32 + 4);
    out.put_slice(body);
    out.freeze()
}

/// Encodes ReadyForQuery.
pub fn ready_for_query(status: TxStatus) -> Bytes {
    tagged(b'Z', &[status.as_byte()])
}

/// Backend key: a process id and a secret of 4 bytes (protocol 3.0) or up to 256
/// bytes (protocol 3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendKey {
    pub pid: u32,
    pub secret: Bytes,
}

impl BackendKey {
    /// Decodes the body of a BackendKeyData message.
    pub fn decode(body: &[u8]) -> Option<Self> {
        if body.len() < 8 {
            return None;
        }
        Some(Self {
            pid: u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
            secret: Bytes::copy_from_slice(&body[4..]),
        })
    }

    /// Encodes a whole BackendKeyData message.
    pub fn encode(&self) -> Bytes {
        let mut body = Vec::with_capacity(4 + self.secret.len());
        body.extend_from_slice(&self.pid.to_be_bytes());
        body.extend_from_slice(&self.secret);
        tagged(b'K', &body)
    }
}

/// Severity of an ErrorResponse the proxy sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

/// Encodes an ErrorResponse with severity, SQLSTATE and message.
pub fn error_response(severity: Severity, sqlstate: &str, message: &str) -> Bytes {
    let sev = match severity {
        Severity::Error => "ERROR",
        Severity::Fatal => "FATAL",
    };
    let mut body = Vec::with_capacity(message.len() + 32);
    for (code, val) in [(b'S', sev), (b'V', sev), (b'C', sqlstate), (b'M', message)] {
        body.push(code);
        body.extend_from_slice(val.as_bytes());
        body.push(0);
    }
    body.push(0);
    tagged(b'E', &body)
}

/// Reads one field (e.g. `b'C'` for SQLSTATE, `b'V'` for severity) of an
/// ErrorResponse or NoticeResponse body.
pub fn error_field(body: &[u8], code: u8) -> Option<&[u8]> {
    let mut rest = body;
    while let Some((&c, r)) = rest.split_first() {
        if c == 0 {
            return None;
        }
        let end = r.iter().position(|&b| b == 0)?;
        if c == code {
            return Some(&r[..end]);
        }
        rest = &r[end + 1..];
    }
    None
}

/// Rewrites the error cursor position (`P` field) of an ErrorResponse or
/// NoticeResponse body. Returns the whole new message, or `None` when the body has
/// no `P` field or `map` keeps it unchanged.
pub fn map_error_position(tag: u8, body: &[u8], map: impl Fn(usize) -> usize) -> Option<Bytes> {
    let pos: usize = std::str::from_utf8(error_field(body, b'P')?)
        .ok()?
        .parse()
        .ok()?;
    let new = map(pos);
    if new == pos {
        return None;
    }
    let mut out = Vec::with_capacity(body.len());
    let mut rest = body;
    while let Some((&c, r)) = rest.split_first() {
        if c == 0 {
            break;
        }
        let end = r.iter().position(|&b| b == 0)?;
        out.push(c);
        if c == b'P' {
            out.extend_from_slice(new.to_string().as_bytes());
        } else {
            out.extend_from_slice(&r[..end]);
        }
        out.push(0);
        rest = &r[end + 1..];
    }
    out.push(0);
    Some(tagged(tag, &out))
}

/// Whether an ErrorResponse body has severity FATAL or PANIC (the server closes next).
pub fn is_fatal(body: &[u8]) -> bool {
    let sev = error_field(body, b'V').or_else(|| error_field(body, b'S'));
    matches!(sev, Some(b"FATAL") | Some(b"PANIC"))
}

/// Authentication request code of AuthenticationSASL.
pub const AUTH_SASL: u32 = 10;

/// If `body` is an AuthenticationSASL body, returns it with every channel-binding
/// (`-PLUS`) mechanism removed. The proxy terminates TLS itself, so the client's
/// channel binding would describe the proxy's certificate, never the server's.
pub fn strip_channel_binding(body: &[u8]) -> Option<Bytes> {
    if body.len() < 4 || u32::from_be_bytes([body[0], body[1], body[2], body[3]]) != AUTH_SASL {
        return None;
    }
    let mut out = Vec::with_capacity(body.len());
    out.extend_from_slice(&body[..4]);
    for mech in body[4..].split(|&b| b == 0).filter(|m| !m.is_empty()) {
        if !mech.ends_with(b"-PLUS") {
            out.extend_from_slice(mech);
            out.push(0);
        }
    }
    out.push(0);
    Some(tagged(b'R', &out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_key_round_trip() {
        for len in [4usize, 32] {
            let k = BackendKey {
                pid: 42,
                secret: Bytes::from(vec![7u8; len]),
            };
            let enc = k.encode();
            assert_eq!(enc[0], b'K');
            assert_eq!(BackendKey::decode(&enc[5..]), Some(k));
        }
        assert_eq!(BackendKey::decode(&[0; 7]), None);
    }

    #[test]
    fn error_round_trip() {
        let e = error_response(Severity::Fatal, "08006", "upstream gone");
        let body = &e[5..];
        assert_eq!(error_field(body, b'C'), Some(&b"08006"[..]));
        assert_eq!(error_field(body, b'M'), Some(&b"upstream gone"[..]));
        assert!(is_fatal(body));
        assert!(!is_fatal(
            &error_response(Severity::Error, "42601", "x")[5..]
        ));
    }

    #[test]
    fn error_position_is_mapped() {
        let mut body = Vec::new();
        for (c, v) in [(b'S', "ERROR"), (b'C', "42P01"), (b'P', "336"), (b'M', "x")] {
            body.push(c);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let out = map_error_position(b'E', &body, |p| p - 275).unwrap();
        assert_eq!(out[0], b'E');
        assert_eq!(error_field(&out[5..], b'P'), Some(&b"61"[..]));
        assert_eq!(error_field(&out[5..], b'C'), Some(&b"42P01"[..]));
        assert!(map_error_position(b'E', &body, |p| p).is_none());
    }

    #[test]
    fn ready_round_trip() {
        for s in [TxStatus::Idle, TxStatus::InTransaction, TxStatus::Failed] {
            let m = ready_for_query(s);
            assert_eq!(TxStatus::from_byte(m[5]), Some(s));
        }
    }

    #[test]
    fn sasl_plus_is_removed() {
        let mut body = AUTH_SASL.to_be_bytes().to_vec();
        body.extend_from_slice(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        let out = strip_channel_binding(&body).unwrap();
        let mut want = AUTH_SASL.to_be_bytes().to_vec();
        want.extend_from_slice(b"SCRAM-SHA-256\0\0");
        assert_eq!(&out[5..], &want[..]);
        assert_eq!(strip_channel_binding(&[0, 0, 0, 0]), None);
    }
}
