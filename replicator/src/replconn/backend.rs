//! Messages PostgreSQL sends to a replication client, as types.
//!
//! This file owns decoding (and, for test servers, encoding) of every backend
//! message a replication session meets: authentication requests, session
//! parameters, simple-query results, errors and notices, and the copy-mode
//! messages of `START_REPLICATION`. postgres-protocol's backend parser does not
//! know CopyBothResponse (`W`), which is why these are ours. Anything else (e.g.
//! NotificationResponse) is kept raw as [`BackendMessage::Other`]. It must never
//! interpret a CopyData payload (that is [`crate::pgoutput`]'s job) and never
//! convert DataRow values: they stay the server's bytes.

use bytes::{BufMut, Bytes, BytesMut};

use super::frame::{put_cstr, write_frame, Body, Frame};
use super::ReplError;

/// An `R` message: what the server wants from us to authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication {
    /// 0: authenticated.
    Ok,
    /// 3: send the password in clear text.
    CleartextPassword,
    /// 5: send `md5(md5(password + user) + salt)`.
    Md5Password { salt: [u8; 4] },
    /// 10: start SASL with one of these mechanisms.
    Sasl { mechanisms: Vec<String> },
    /// 11: the server's SASL challenge.
    SaslContinue(Bytes),
    /// 12: the server's SASL outcome (signature to verify).
    SaslFinal(Bytes),
    /// Any other request (Kerberos 2, SCM 6, GSSAPI 7/8, SSPI 9), kept raw.
    Unsupported { code: i32, data: Bytes },
}

impl Authentication {
    /// Human name of an unsupported method, for the error message.
    pub fn method_name(code: i32) -> String {
        match code {
            2 => "KerberosV5".into(),
            6 => "SCM credential".into(),
            7 | 8 => "GSSAPI".into(),
            9 => "SSPI".into(),
            other => format!("unknown (code {other})"),
        }
    }
}

/// One field description of a RowDescription (`T`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDescription {
    pub name: String,
    pub table_oid: u32,
    pub column_id: i16,
    pub type_oid: u32,
    pub type_size: i16,
    pub type_modifier: i32,
    /// 0 text, 1 binary.
    pub format: i16,
}

/// The body of an ErrorResponse or NoticeResponse: `(field code, value)` pairs in
/// the order the server sent them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields(pub Vec<(u8, String)>);

impl ErrorFields {
    /// The first value of field `code`.
    pub fn get(&self, code: u8) -> Option<&str> {
        self.0
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_str())
    }

    /// The SQLSTATE (`C`), or `XX000` (internal_error) if the server omitted it.
    pub fn code(&self) -> &str {
        self.get(b'C').unwrap_or("XX000")
    }

    /// The primary message (`M`).
    pub fn message(&self) -> &str {
        self.get(b'M').unwrap_or("")
    }

    /// The non-localized severity (`V`, 9.6+), else the localized one (`S`).
    pub fn severity(&self) -> &str {
        self.get(b'V').or_else(|| self.get(b'S')).unwrap_or("ERROR")
    }

    /// Converts an ErrorResponse into the typed error.
    pub fn into_error(self) -> ReplError {
        ReplError::Server {
            code: self.code().to_owned(),
            message: self.message().to_owned(),
            severity: self.severity().to_owned(),
            detail: self.get(b'D').map(str::to_owned),
        }
    }
}

/// Which copy mode a `G`/`H`/`W` response starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyResponse {
    /// 0 text, 1 binary.
    pub format: u8,
    pub column_formats: Vec<i16>,
}

/// A message from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMessage {
    Authentication(Authentication),
    BackendKeyData {
        process_id: i32,
        secret_key: i32,
    },
    ParameterStatus {
        name: String,
        value: String,
    },
    /// Transaction status: `I` idle, `T` in a transaction, `E` failed transaction.
    ReadyForQuery {
        status: u8,
    },
    RowDescription(Vec<FieldDescription>),
    /// Column values; `None` is SQL NULL.
    DataRow(Vec<Option<Bytes>>),
    CommandComplete {
        tag: String,
    },
    EmptyQueryResponse,
    ErrorResponse(ErrorFields),
    NoticeResponse(ErrorFields),
    CopyInResponse(CopyResponse),
    CopyOutResponse(CopyResponse),
    CopyBothResponse(CopyResponse),
    CopyData(Bytes),
    CopyDone,
    /// The server does not support our minor version or some `_pq_` options.
    NegotiateProtocolVersion {
        newest_minor: i32,
        unrecognized: Vec<String>,
    },
    /// Any other tag, body untouched.
    Other {
        tag: u8,
        body: Bytes,
    },
}

impl BackendMessage {
    /// The message's tag byte on the wire.
    pub fn tag(&self) -> u8 {
        match self {
            Self::Authentication(_) => b'R',
            Self::BackendKeyData { .. } => b'K',
            Self::ParameterStatus { .. } => b'S',
            Self::ReadyForQuery { .. } => b'Z',
            Self::RowDescription(_) => b'T',
            Self::DataRow(_) => b'D',
            Self::CommandComplete { .. } => b'C',
            Self::EmptyQueryResponse => b'I',
            Self::ErrorResponse(_) => b'E',
            Self::NoticeResponse(_) => b'N',
            Self::CopyInResponse(_) => b'G',
            Self::CopyOutResponse(_) => b'H',
            Self::CopyBothResponse(_) => b'W',
            Self::CopyData(_) => b'd',
            Self::CopyDone => b'c',
            Self::NegotiateProtocolVersion { .. } => b'v',
            Self::Other { tag, .. } => *tag,
        }
    }

    /// Decodes one complete frame.
    pub fn decode(frame: Frame) -> Result<Self, ReplError> {
        let tag = frame.tag;
        let mut b = Body::new(frame);
        let msg = match tag {
            b'R' => Self::Authentication(decode_auth(&mut b)?),
            b'K' => Self::BackendKeyData {
                process_id: b.i32()?,
                secret_key: b.i32()?,
            },
            b'S' => Self::ParameterStatus {
                name: b.cstr()?,
                value: b.cstr()?,
            },
            b'Z' => Self::ReadyForQuery { status: b.u8()? },
            b'T' => {
                let n = b.count()?;
                let mut fields = Vec::with_capacity(n);
                for _ in 0..n {
                    fields.push(FieldDescription {
                        name: b.cstr()?,
                        table_oid: b.u32()?,
                        column_id: b.i16()?,
                        type_oid: b.u32()?,
                        type_size: b.i16()?,
                        type_modifier: b.i32()?,
                        format: b.i16()?,
                    });
                }
                Self::RowDescription(fields)
            }
            b'D' => {
                let n = b.count()?;
                let mut values = Vec::with_capacity(n);
                for _ in 0..n {
                    let len = b.i32()?;
                    values.push(match usize::try_from(len) {
                        Ok(len) => Some(b.bytes(len)?),
                        Err(_) if len == -1 => None,
                        Err(_) => {
                            return Err(ReplError::Malformed {
                                tag,
                                reason: "negative value length",
                            })
                        }
                    });
                }
                Self::DataRow(values)
            }
            b'C' => Self::CommandComplete { tag: b.cstr()? },
            b'I' => Self::EmptyQueryResponse,
            b'E' => Self::ErrorResponse(decode_fields(&mut b)?),
            b'N' => Self::NoticeResponse(decode_fields(&mut b)?),
            b'G' => Self::CopyInResponse(decode_copy(&mut b)?),
            b'H' => Self::CopyOutResponse(decode_copy(&mut b)?),
            b'W' => Self::CopyBothResponse(decode_copy(&mut b)?),
            b'd' => Self::CopyData(b.rest()),
            b'c' => Self::CopyDone,
            b'v' => {
                let newest_minor = b.i32()?;
                let n = usize::try_from(b.i32()?).map_err(|_| ReplError::Malformed {
                    tag,
                    reason: "negative count",
                })?;
                let mut unrecognized = Vec::new();
                for _ in 0..n {
                    unrecognized.push(b.cstr()?);
                }
                Self::NegotiateProtocolVersion {
                    newest_minor,
                    unrecognized,
                }
            }
            _ => Self::Other {
                tag,
                body: b.rest(),
            },
        };
        b.finish()?;
        Ok(msg)
    }

    /// Appends the wire form to `dst` (for test servers and round-trip tests).
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), ReplError> {
        let start = dst.len();
        let mut res = Ok(());
        write_frame(dst, Some(self.tag()), |d| res = self.encode_body(d))?;
        if res.is_err() {
            dst.truncate(start);
        }
        res
    }

    fn encode_body(&self, d: &mut BytesMut) -> Result<(), ReplError> {
        match self {
            Self::Authentication(a) => encode_auth(a, d)?,
            Self::BackendKeyData {
                process_id,
                secret_key,
            } => {
                d.put_i32(*process_id);
                d.put_i32(*secret_key);
            }
            Self::ParameterStatus { name, value } => {
                put_cstr(d, "parameter name", name)?;
                put_cstr(d, "parameter value", value)?;
            }
            Self::ReadyForQuery { status } => d.put_u8(*status),
            Self::RowDescription(fields) => {
                d.put_i16(count(fields.len())?);
                for f in fields {
                    put_cstr(d, "field name", &f.name)?;
                    d.put_u32(f.table_oid);
                    d.put_i16(f.column_id);
                    d.put_u32(f.type_oid);
                    d.put_i16(f.type_size);
                    d.put_i32(f.type_modifier);
                    d.put_i16(f.format);
                }
            }
            Self::DataRow(values) => {
                d.put_i16(count(values.len())?);
                for v in values {
                    match v {
                        Some(v) => {
                            d.put_i32(i32::try_from(v.len()).map_err(|_| too_large("value"))?);
                            d.put_slice(v);
                        }
                        None => d.put_i32(-1),
                    }
                }
            }
            Self::CommandComplete { tag } => put_cstr(d, "command tag", tag)?,
            Self::EmptyQueryResponse | Self::CopyDone => {}
            Self::ErrorResponse(fields) | Self::NoticeResponse(fields) => {
                for (code, value) in &fields.0 {
                    d.put_u8(*code);
                    put_cstr(d, "error field", value)?;
                }
                d.put_u8(0);
            }
            Self::CopyInResponse(c) | Self::CopyOutResponse(c) | Self::CopyBothResponse(c) => {
                d.put_u8(c.format);
                d.put_i16(count(c.column_formats.len())?);
                for f in &c.column_formats {
                    d.put_i16(*f);
                }
            }
            Self::CopyData(data) => d.put_slice(data),
            Self::NegotiateProtocolVersion {
                newest_minor,
                unrecognized,
            } => {
                d.put_i32(*newest_minor);
                d.put_i32(i32::try_from(unrecognized.len()).map_err(|_| too_large("options"))?);
                for o in unrecognized {
                    put_cstr(d, "option name", o)?;
                }
            }
            Self::Other { body, .. } => d.put_slice(body),
        }
        Ok(())
    }
}

fn too_large(what: &str) -> ReplError {
    ReplError::InvalidArgument(format!("{what} too large for its wire field"))
}

fn count(n: usize) -> Result<i16, ReplError> {
    i16::try_from(n).map_err(|_| too_large("count"))
}

fn decode_auth(b: &mut Body) -> Result<Authentication, ReplError> {
    Ok(match b.i32()? {
        0 => Authentication::Ok,
        3 => Authentication::CleartextPassword,
        5 => {
            let s = b.bytes(4)?;
            Authentication::Md5Password {
                salt: [s[0], s[1], s[2], s[3]],
            }
        }
        10 => {
            let mut mechanisms = Vec::new();
            loop {
                let m = b.cstr()?;
                if m.is_empty() {
                    break;
                }
                mechanisms.push(m);
            }
            Authentication::Sasl { mechanisms }
        }
        11 => Authentication::SaslContinue(b.rest()),
        12 => Authentication::SaslFinal(b.rest()),
        code => Authentication::Unsupported {
            code,
            data: b.rest(),
        },
    })
}

fn encode_auth(a: &Authentication, d: &mut BytesMut) -> Result<(), ReplError> {
    match a {
        Authentication::Ok => d.put_i32(0),
        Authentication::CleartextPassword => d.put_i32(3),
        Authentication::Md5Password { salt } => {
            d.put_i32(5);
            d.put_slice(salt);
        }
        Authentication::Sasl { mechanisms } => {
            d.put_i32(10);
            for m in mechanisms {
                put_cstr(d, "SASL mechanism", m)?;
            }
            d.put_u8(0);
        }
        Authentication::SaslContinue(data) => {
            d.put_i32(11);
            d.put_slice(data);
        }
        Authentication::SaslFinal(data) => {
            d.put_i32(12);
            d.put_slice(data);
        }
        Authentication::Unsupported { code, data } => {
            d.put_i32(*code);
            d.put_slice(data);
        }
    }
    Ok(())
}

fn decode_fields(b: &mut Body) -> Result<ErrorFields, ReplError> {
    let mut fields = Vec::new();
    loop {
        match b.u8()? {
            0 => return Ok(ErrorFields(fields)),
            code => fields.push((code, b.cstr()?)),
        }
    }
}

fn decode_copy(b: &mut Body) -> Result<CopyResponse, ReplError> {
    let format = b.u8()?;
    let n = b.count()?;
    let mut column_formats = Vec::with_capacity(n);
    for _ in 0..n {
        column_formats.push(b.i16()?);
    }
    Ok(CopyResponse {
        format,
        column_formats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(msg: BackendMessage) {
        let mut buf = BytesMut::new();
        msg.encode(&mut buf).unwrap();
        assert_eq!(buf[0], msg.tag());
        let frame = Frame::parse(&mut buf).unwrap().expect("complete frame");
        assert!(buf.is_empty());
        assert_eq!(BackendMessage::decode(frame).unwrap(), msg);
    }

    fn b(s: &[u8]) -> Bytes {
        Bytes::copy_from_slice(s)
    }

    #[test]
    fn every_message_round_trips() {
        let fields = ErrorFields(vec![
            (b'S', "FATAL".into()),
            (b'V', "FATAL".into()),
            (b'C', "28P01".into()),
            (b'M', "password authentication failed for user \"x\"".into()),
        ]);
        let copy = CopyResponse {
            format: 0,
            column_formats: vec![],
        };
        for msg in [
            BackendMessage::Authentication(Authentication::Ok),
            BackendMessage::Authentication(Authentication::CleartextPassword),
            BackendMessage::Authentication(Authentication::Md5Password { salt: [1, 2, 3, 4] }),
            BackendMessage::Authentication(Authentication::Sasl {
                mechanisms: vec!["SCRAM-SHA-256-PLUS".into(), "SCRAM-SHA-256".into()],
            }),
            BackendMessage::Authentication(Authentication::SaslContinue(b(b"r=abc,s=xyz,i=4096"))),
            BackendMessage::Authentication(Authentication::SaslFinal(b(b"v=sig"))),
            BackendMessage::Authentication(Authentication::Unsupported {
                code: 7,
                data: Bytes::new(),
            }),
            BackendMessage::BackendKeyData {
                process_id: 4242,
                secret_key: -7,
            },
            BackendMessage::ParameterStatus {
                name: "server_version".into(),
                value: "15.18".into(),
            },
            BackendMessage::ReadyForQuery { status: b'I' },
            BackendMessage::RowDescription(vec![FieldDescription {
                name: "systemid".into(),
                table_oid: 0,
                column_id: 0,
                type_oid: 25,
                type_size: -1,
                type_modifier: -1,
                format: 0,
            }]),
            BackendMessage::DataRow(vec![Some(b(b"1")), None, Some(Bytes::new())]),
            BackendMessage::CommandComplete {
                tag: "SELECT 1".into(),
            },
            BackendMessage::EmptyQueryResponse,
            BackendMessage::ErrorResponse(fields.clone()),
            BackendMessage::NoticeResponse(fields),
            BackendMessage::CopyInResponse(copy.clone()),
            BackendMessage::CopyOutResponse(CopyResponse {
                format: 1,
                column_formats: vec![1, 1],
            }),
            BackendMessage::CopyBothResponse(copy),
            BackendMessage::CopyData(b(b"k\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0\x02\x01")),
            BackendMessage::CopyDone,
            BackendMessage::NegotiateProtocolVersion {
                newest_minor: 0,
                unrecognized: vec!["_pq_.x".into()],
            },
            BackendMessage::Other {
                tag: b'A',
                body: b(b"\0\0\0\x01chan\0payload\0"),
            },
        ] {
            round_trip(msg);
        }
    }

    #[test]
    fn copy_both_matches_walsender_bytes() {
        // What PostgreSQL 15's walsender sends for START_REPLICATION ... LOGICAL.
        let mut buf = BytesMut::from(&b"W\x00\x00\x00\x07\x00\x00\x00"[..]);
        let frame = Frame::parse(&mut buf).unwrap().unwrap();
        assert_eq!(
            BackendMessage::decode(frame).unwrap(),
            BackendMessage::CopyBothResponse(CopyResponse {
                format: 0,
                column_formats: vec![]
            })
        );
    }

    #[test]
    fn error_fields_become_a_typed_error() {
        let e = ErrorFields(vec![
            (b'S', "ERREUR".into()),
            (b'V', "ERROR".into()),
            (b'C', "42704".into()),
            (b'M', "slot missing".into()),
            (b'D', "more".into()),
        ])
        .into_error();
        match e {
            ReplError::Server {
                code,
                message,
                severity,
                detail,
            } => {
                assert_eq!(code, "42704");
                assert_eq!(message, "slot missing");
                assert_eq!(severity, "ERROR");
                assert_eq!(detail.as_deref(), Some("more"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_malformed_bodies() {
        for (tag, body) in [
            (b'K', &b"\0\0\0\x01"[..]),
            (b'Z', b"IX"),
            (b'D', b"\0\x01\xff\xff\xff\xfe"),
            (b'D', b"\0\x01\0\0\0\x05ab"),
            (b'E', b"Cxx"),
            (b'R', b"\0\0\0\x05ab"),
        ] {
            let frame = Frame { tag, body: b(body) };
            assert!(
                matches!(
                    BackendMessage::decode(frame),
                    Err(ReplError::Malformed { .. })
                ),
                "{} {body:?}",
                tag as char
            );
        }
    }
}
