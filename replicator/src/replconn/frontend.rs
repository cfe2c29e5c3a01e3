//! Messages a replication client sends to PostgreSQL, as types.
//!
//! This file owns the encoding of the few frontend messages a replication
//! session needs: the startup packet, the password/SASL responses, simple Query,
//! and the copy-mode messages that carry standby status updates. It must never
//! decide *what* to send (authentication lives in `auth.rs`, replication
//! commands in [`super::command`]) and must never put a string with a NUL byte on
//! the wire: the server would cut it short and misread every following field.

use bytes::{BufMut, Bytes, BytesMut};

use super::frame::{put_cstr, write_frame};
use super::ReplError;

/// Protocol version 3.0, the only one PostgreSQL 15 speaks.
pub const PROTOCOL_VERSION: i32 = 3 << 16;

/// A message to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendMessage {
    /// The untagged startup packet: protocol version and `(name, value)` pairs.
    Startup { params: Vec<(String, String)> },
    /// `p` PasswordMessage: a cleartext password or an `md5...` hash.
    Password(Bytes),
    /// `p` SASLInitialResponse.
    SaslInitialResponse { mechanism: String, data: Bytes },
    /// `p` SASLResponse.
    SaslResponse(Bytes),
    /// `Q` simple query.
    Query(String),
    /// `d` CopyData (a standby status update during replication).
    CopyData(Bytes),
    /// `c` CopyDone: we will send no more CopyData.
    CopyDone,
    /// `X` Terminate.
    Terminate,
}

impl FrontendMessage {
    /// Appends the wire form to `dst`. On error `dst` is left as it was.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), ReplError> {
        let tag = match self {
            Self::Startup { .. } => None,
            Self::Password(_) | Self::SaslInitialResponse { .. } | Self::SaslResponse(_) => {
                Some(b'p')
            }
            Self::Query(_) => Some(b'Q'),
            Self::CopyData(_) => Some(b'd'),
            Self::CopyDone => Some(b'c'),
            Self::Terminate => Some(b'X'),
        };
        let start = dst.len();
        let mut res = Ok(());
        write_frame(dst, tag, |d| res = self.encode_body(d))?;
        if res.is_err() {
            dst.truncate(start);
        }
        res
    }

    fn encode_body(&self, d: &mut BytesMut) -> Result<(), ReplError> {
        match self {
            Self::Startup { params } => {
                d.put_i32(PROTOCOL_VERSION);
                for (name, value) in params {
                    put_cstr(d, "startup parameter name", name)?;
                    put_cstr(d, "startup parameter value", value)?;
                }
                d.put_u8(0);
            }
            Self::Password(p) => {
                if p.contains(&0) {
                    return Err(ReplError::InvalidArgument(
                        "password contains a NUL byte".into(),
                    ));
                }
                d.put_slice(p);
                d.put_u8(0);
            }
            Self::SaslInitialResponse { mechanism, data } => {
                put_cstr(d, "SASL mechanism", mechanism)?;
                let len = i32::try_from(data.len())
                    .map_err(|_| ReplError::InvalidArgument("SASL response too large".into()))?;
                d.put_i32(len);
                d.put_slice(data);
            }
            Self::SaslResponse(data) | Self::CopyData(data) => d.put_slice(data),
            Self::Query(sql) => put_cstr(d, "query", sql)?,
            Self::CopyDone | Self::Terminate => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::frontend as reference;

    fn encoded(msg: &FrontendMessage) -> BytesMut {
        let mut buf = BytesMut::new();
        msg.encode(&mut buf).unwrap();
        buf
    }

    /// Writes the same message with postgres-protocol's encoder.
    type Reference = fn(&mut BytesMut);

    /// postgres-protocol is an independent implementation of the same messages, so
    /// byte equality with it checks our framing and field order.
    #[test]
    fn matches_postgres_protocol_byte_for_byte() {
        let mut want = BytesMut::new();
        reference::startup_message(
            [("user", "postgres"), ("replication", "database")],
            &mut want,
        )
        .unwrap();
        let ours = FrontendMessage::Startup {
            params: vec![
                ("user".into(), "postgres".into()),
                ("replication".into(), "database".into()),
            ],
        };
        assert_eq!(encoded(&ours), want);

        let cases: Vec<(FrontendMessage, Reference)> = vec![
            (
                FrontendMessage::Password(Bytes::from_static(b"md5abc")),
                |b| reference::password_message(b"md5abc", b).unwrap(),
            ),
            (
                FrontendMessage::SaslInitialResponse {
                    mechanism: "SCRAM-SHA-256".into(),
                    data: Bytes::from_static(b"n,,n=,r=nonce"),
                },
                |b| reference::sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=nonce", b).unwrap(),
            ),
            (
                FrontendMessage::SaslResponse(Bytes::from_static(b"c=biws,r=x,p=y")),
                |b| reference::sasl_response(b"c=biws,r=x,p=y", b).unwrap(),
            ),
            (FrontendMessage::Query("IDENTIFY_SYSTEM".into()), |b| {
                reference::query("IDENTIFY_SYSTEM", b).unwrap()
            }),
            (FrontendMessage::CopyDone, reference::copy_done),
            (FrontendMessage::Terminate, reference::terminate),
        ];
        for (ours, reference) in cases {
            let mut want = BytesMut::new();
            reference(&mut want);
            assert_eq!(encoded(&ours), want, "{ours:?}");
        }
    }

    #[test]
    fn copy_data_frames_the_status_update() {
        let body = Bytes::from_static(b"r0123456789abcdef0123456789abcdef!");
        let buf = encoded(&FrontendMessage::CopyData(body.clone()));
        assert_eq!(buf[0], b'd');
        assert_eq!(&buf[1..5], &(4 + body.len() as i32).to_be_bytes());
        assert_eq!(&buf[5..], &body[..]);
    }

    #[test]
    fn refuses_nul_and_leaves_buffer_untouched() {
        let mut buf = BytesMut::from(&b"keep"[..]);
        for msg in [
            FrontendMessage::Query("SELECT 1\0; DROP".into()),
            FrontendMessage::Password(Bytes::from_static(b"pa\0ss")),
            FrontendMessage::Startup {
                params: vec![("application_name".into(), "a\0b".into())],
            },
        ] {
            assert!(matches!(
                msg.encode(&mut buf),
                Err(ReplError::InvalidArgument(_))
            ));
            assert_eq!(&buf[..], b"keep");
        }
    }
}
