//! Startup-phase packets: StartupMessage, SSLRequest, GSSENCRequest and
//! CancelRequest.
//!
//! These are the only untagged packets in the protocol. This module parses them into
//! types and encodes the ones the proxy sends itself (a CancelRequest to upstream, an
//! SSLRequest to upstream). The original StartupMessage bytes are forwarded as they
//! came; the parsed form is only read for logging and session tags.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

/// Request code of SSLRequest.
pub const SSL_REQUEST: u32 = 80_877_103;
/// Request code of GSSENCRequest.
pub const GSSENC_REQUEST: u32 = 80_877_104;
/// Request code of CancelRequest.
pub const CANCEL_REQUEST: u32 = 80_877_102;

/// Errors in a startup packet.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StartupError {
    #[error("startup packet too short")]
    Short,
    #[error("startup packet parameters are not NUL-terminated")]
    Unterminated,
    #[error("unsupported frontend protocol {major}.{minor}")]
    Protocol { major: u16, minor: u16 },
}

/// One parsed startup-phase packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    Ssl,
    GssEnc,
    Cancel { pid: u32, secret: Bytes },
    Startup(StartupMessage),
}

/// A StartupMessage: protocol version plus name/value parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub major: u16,
    pub minor: u16,
    pub params: Vec<(String, String)>,
}

impl StartupMessage {
    /// Value of a startup parameter such as `user` or `application_name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Encodes the message (used by tests and by the proxy's own connections).
    pub fn encode(&self) -> Bytes {
        let mut body = BytesMut::new();
        body.put_u16(self.major);
        body.put_u16(self.minor);
        for (k, v) in &self.params {
            body.put_slice(k.as_bytes());
            body.put_u8(0);
            body.put_slice(v.as_bytes());
            body.put_u8(0);
        }
        body.put_u8(0);
        let mut out = BytesMut::with_capacity(body.len() + 4);
        out.put_u32(body.len() as u32 + 4);
        out.put_slice(&body);
        out.freeze()
    }
}

/// Parses a whole startup packet, including its 4-byte length.
pub fn parse(packet: &[u8]) -> Result<StartupPacket, StartupError> {
    if packet.len() < 8 {
        return Err(StartupError::Short);
    }
    let code = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    match code {
        SSL_REQUEST => Ok(StartupPacket::Ssl),
        GSSENC_REQUEST => Ok(StartupPacket::GssEnc),
        CANCEL_REQUEST => {
            if packet.len() < 16 {
                return Err(StartupError::Short);
            }
            let pid = u32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
            Ok(StartupPacket::Cancel {
                pid,
                secret: Bytes::copy_from_slice(&packet[12..]),
            })
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(StartupError::Protocol { major, minor });
            }
            let mut params = Vec::new();
            let mut rest = &packet[8..];
            loop {
                let (key, r) = cstr(rest)?;
                if key.is_empty() {
                    break;
                }
                let (val, r) = cstr(r)?;
                params.push((key, val));
                rest = r;
            }
            Ok(StartupPacket::Startup(StartupMessage {
                major,
                minor,
                params,
            }))
        }
    }
}

fn cstr(buf: &[u8]) -> Result<(String, &[u8]), StartupError> {
    let end = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or(StartupError::Unterminated)?;
    Ok((
        String::from_utf8_lossy(&buf[..end]).into_owned(),
        &buf[end + 1..],
    ))
}

/// Encodes a CancelRequest for the given backend key (any key length, for 3.2).
pub fn encode_cancel(pid: u32, secret: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(12 + secret.len());
    out.put_u32(12 + secret.len() as u32);
    out.put_u32(CANCEL_REQUEST);
    out.put_u32(pid);
    out.put_slice(secret);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_round_trip() {
        let m = StartupMessage {
            major: 3,
            minor: 2,
            params: vec![
                ("user".into(), "alice".into()),
                ("database".into(), "db".into()),
                ("_pq_.test".into(), "x".into()),
            ],
        };
        assert_eq!(parse(&m.encode()), Ok(StartupPacket::Startup(m.clone())));
        assert_eq!(m.param("user"), Some("alice"));
    }

    #[test]
    fn requests_round_trip() {
        // The SSLRequest pgmesh itself sends upstream.
        assert_eq!(
            parse(&pgmesh_replicator::pgtls::SSL_REQUEST),
            Ok(StartupPacket::Ssl)
        );
        let c = encode_cancel(7, &[1, 2, 3, 4]);
        assert_eq!(
            parse(&c),
            Ok(StartupPacket::Cancel {
                pid: 7,
                secret: Bytes::from_static(&[1, 2, 3, 4])
            })
        );
        let long = encode_cancel(9, &[5; 32]);
        assert!(
            matches!(parse(&long), Ok(StartupPacket::Cancel { pid: 9, secret }) if secret.len() == 32)
        );
    }

    #[test]
    fn bad_packets() {
        assert_eq!(
            parse(&[0, 0, 0, 8, 0, 2, 0, 0]),
            Err(StartupError::Protocol { major: 2, minor: 0 })
        );
        assert_eq!(
            parse(&[0, 0, 0, 9, 0, 3, 0, 0, b'u']),
            Err(StartupError::Unterminated)
        );
        assert_eq!(parse(&[0, 0, 0, 4]), Err(StartupError::Short));
    }
}
