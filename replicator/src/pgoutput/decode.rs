//! Decoding pgoutput messages from the payload of one XLogData.
//!
//! This file owns the byte layout → [`PgOutputMessage`] direction. It must never
//! panic, never allocate more than the input can justify, and never accept a message
//! with bytes left over: pgoutput sends exactly one message per XLogData, so extra
//! bytes mean the stream is not what we asked for (for example streaming mode, which
//! adds an xid to each change).

use bytes::Bytes;

use super::types::{
    Begin, Column, Commit, Delete, Insert, LogicalMessage, OldTuple, Origin, PgOutputMessage,
    Relation, ReplicaIdentity, Truncate, TruncateOptions, TupleData, TupleValue, TypeMessage,
    Update,
};
use super::wire::Reader;
use super::{Lsn, PgOutputError, PgTimestamp};

/// Smallest encodings, used to bound preallocation by the bytes actually present.
const MIN_COLUMN_LEN: usize = 1 + 1 + 4 + 4; // flags, "" NUL, type oid, typmod
const MIN_VALUE_LEN: usize = 1; // kind byte of 'n' or 'u'
const OID_LEN: usize = 4;

impl PgOutputMessage {
    /// Decodes one complete pgoutput message (an XLogData payload).
    ///
    /// [`PgOutputError::Truncated`] means the buffer ends early; any other error means
    /// the bytes are not a valid protocol-version-1 message.
    pub fn decode(buf: Bytes) -> Result<Self, PgOutputError> {
        let mut r = Reader::new(buf);
        let msg = match r.u8()? {
            b'B' => Self::Begin(Begin {
                final_lsn: lsn(&mut r)?,
                commit_ts: ts(&mut r)?,
                xid: r.u32()?,
            }),
            b'C' => Self::Commit(Commit {
                flags: r.u8()?,
                commit_lsn: lsn(&mut r)?,
                end_lsn: lsn(&mut r)?,
                commit_ts: ts(&mut r)?,
            }),
            b'O' => Self::Origin(Origin {
                commit_lsn: lsn(&mut r)?,
                name: r.cstr()?,
            }),
            b'R' => Self::Relation(relation(&mut r)?),
            b'Y' => Self::Type(TypeMessage {
                oid: r.u32()?,
                namespace: r.cstr()?,
                name: r.cstr()?,
            }),
            b'I' => {
                let relation_oid = r.u32()?;
                expect_marker(&mut r, b'N', "'N'")?;
                Self::Insert(Insert {
                    relation_oid,
                    new: tuple(&mut r)?,
                })
            }
            b'U' => Self::Update(update(&mut r)?),
            b'D' => {
                let relation_oid = r.u32()?;
                let old = match r.u8()? {
                    b'K' => OldTuple::Key(tuple(&mut r)?),
                    b'O' => OldTuple::Full(tuple(&mut r)?),
                    found => {
                        return Err(PgOutputError::UnexpectedTupleMarker {
                            expected: "'K' or 'O'",
                            found,
                        })
                    }
                };
                Self::Delete(Delete { relation_oid, old })
            }
            b'T' => Self::Truncate(truncate(&mut r)?),
            b'M' => Self::Message(LogicalMessage {
                flags: r.u8()?,
                lsn: lsn(&mut r)?,
                prefix: r.cstr()?,
                content: r.len_prefixed()?,
            }),
            tag => return Err(PgOutputError::UnknownTag(tag)),
        };
        r.finish()?;
        Ok(msg)
    }
}

/// Decodes a standalone TupleData (column count, then values). Exposed for callers
/// that store tuples in this wire form; trailing bytes are an error.
pub fn decode_tuple(buf: Bytes) -> Result<TupleData, PgOutputError> {
    let mut r = Reader::new(buf);
    let t = tuple(&mut r)?;
    r.finish()?;
    Ok(t)
}

fn lsn(r: &mut Reader) -> Result<Lsn, PgOutputError> {
    Ok(Lsn(r.u64()?))
}

fn ts(r: &mut Reader) -> Result<PgTimestamp, PgOutputError> {
    Ok(PgTimestamp(r.i64()?))
}

fn expect_marker(r: &mut Reader, want: u8, expected: &'static str) -> Result<(), PgOutputError> {
    match r.u8()? {
        found if found == want => Ok(()),
        found => Err(PgOutputError::UnexpectedTupleMarker { expected, found }),
    }
}

fn relation(r: &mut Reader) -> Result<Relation, PgOutputError> {
    let oid = r.u32()?;
    let namespace = r.cstr()?;
    let name = r.cstr()?;
    let ident = r.u8()?;
    let replica_identity =
        ReplicaIdentity::from_byte(ident).ok_or(PgOutputError::UnknownReplicaIdentity(ident))?;
    let n = usize::from(r.u16()?);
    let mut columns = Vec::with_capacity(n.min(r.remaining() / MIN_COLUMN_LEN));
    for _ in 0..n {
        columns.push(Column {
            flags: r.u8()?,
            name: r.cstr()?,
            type_oid: r.u32()?,
            type_modifier: r.i32()?,
        });
    }
    Ok(Relation {
        oid,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn update(r: &mut Reader) -> Result<Update, PgOutputError> {
    let relation_oid = r.u32()?;
    let old = match r.u8()? {
        b'K' => Some(OldTuple::Key(tuple(r)?)),
        b'O' => Some(OldTuple::Full(tuple(r)?)),
        b'N' => None,
        found => {
            return Err(PgOutputError::UnexpectedTupleMarker {
                expected: "'K', 'O' or 'N'",
                found,
            })
        }
    };
    if old.is_some() {
        expect_marker(r, b'N', "'N'")?;
    }
    Ok(Update {
        relation_oid,
        old,
        new: tuple(r)?,
    })
}

fn truncate(r: &mut Reader) -> Result<Truncate, PgOutputError> {
    let n = r.u32()?;
    let options = TruncateOptions(r.u8()?);
    let n = usize::try_from(n).unwrap_or(usize::MAX);
    let mut relation_oids = Vec::with_capacity(n.min(r.remaining() / OID_LEN));
    for _ in 0..n {
        relation_oids.push(r.u32()?);
    }
    Ok(Truncate {
        options,
        relation_oids,
    })
}

fn tuple(r: &mut Reader) -> Result<TupleData, PgOutputError> {
    let n = usize::from(r.u16()?);
    let mut values = Vec::with_capacity(n.min(r.remaining() / MIN_VALUE_LEN));
    for _ in 0..n {
        values.push(match r.u8()? {
            b'n' => TupleValue::Null,
            b'u' => TupleValue::UnchangedToast,
            b't' => TupleValue::Text(r.len_prefixed()?),
            b'b' => TupleValue::Binary(r.len_prefixed()?),
            kind => return Err(PgOutputError::UnknownTupleKind(kind)),
        });
    }
    Ok(TupleData(values))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &'static [u8]) -> Result<PgOutputMessage, PgOutputError> {
        PgOutputMessage::decode(Bytes::from_static(bytes))
    }

    #[test]
    fn empty_input_is_truncated() {
        assert_eq!(
            decode(b""),
            Err(PgOutputError::Truncated { need: 1, have: 0 })
        );
    }

    #[test]
    fn streaming_and_two_phase_tags_are_unknown_in_v1() {
        for tag in [b'S', b'E', b'c', b'A', b'b', b'P', b'K', b'r', b'p'] {
            let buf = Bytes::from(vec![tag; 40]);
            assert_eq!(
                PgOutputMessage::decode(buf),
                Err(PgOutputError::UnknownTag(tag))
            );
        }
    }

    #[test]
    fn bad_markers_kinds_and_identities_are_invalid() {
        assert_eq!(
            decode(b"I\0\0\0\x01X"),
            Err(PgOutputError::UnexpectedTupleMarker {
                expected: "'N'",
                found: b'X'
            })
        );
        assert_eq!(
            decode(b"D\0\0\0\x01N\0\0"),
            Err(PgOutputError::UnexpectedTupleMarker {
                expected: "'K' or 'O'",
                found: b'N'
            })
        );
        assert_eq!(
            decode(b"U\0\0\0\x01K\0\0K\0\0"),
            Err(PgOutputError::UnexpectedTupleMarker {
                expected: "'N'",
                found: b'K'
            })
        );
        assert_eq!(
            decode(b"I\0\0\0\x01N\0\x01x"),
            Err(PgOutputError::UnknownTupleKind(b'x'))
        );
        assert_eq!(
            decode(b"R\0\0\0\x01s\0t\0z\0\0"),
            Err(PgOutputError::UnknownReplicaIdentity(b'z'))
        );
        assert_eq!(
            decode(b"I\0\0\0\x01N\0\x01t\xff\xff\xff\xfe"),
            Err(PgOutputError::NegativeLength(-2))
        );
    }

    #[test]
    fn trailing_bytes_are_invalid() {
        // An Insert with zero columns followed by one stray byte.
        assert_eq!(
            decode(b"I\0\0\0\x01N\0\0!"),
            Err(PgOutputError::TrailingBytes(1))
        );
    }

    #[test]
    fn huge_counts_with_little_data_are_truncated_not_oom() {
        // Truncate claiming u32::MAX relations.
        assert!(decode(b"T\xff\xff\xff\xff\0\0\0\0\x01")
            .unwrap_err()
            .is_truncated());
        // Tuple claiming 65535 columns.
        assert!(decode(b"I\0\0\0\x01N\xff\xffn").unwrap_err().is_truncated());
    }

    #[test]
    fn standalone_tuple() {
        let t = decode_tuple(Bytes::from_static(b"\0\x02nt\0\0\0\x02hi")).unwrap();
        assert_eq!(
            t,
            TupleData(vec![
                TupleValue::Null,
                TupleValue::Text(Bytes::from_static(b"hi"))
            ])
        );
    }
}
