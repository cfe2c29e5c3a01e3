//! Encoding pgoutput messages back into their wire bytes.
//!
//! This file owns the [`PgOutputMessage`] → bytes direction, used by round-trip tests
//! and by test doubles that play the walsender. Production capture only decodes. It
//! must produce exactly the bytes PostgreSQL would, and must never write a partial
//! message: on error the destination buffer is left as it was.

use bytes::{BufMut, Bytes, BytesMut};

use super::types::{OldTuple, PgOutputMessage, TupleData, TupleValue};
use super::wire::{count, put_cstr, put_len_prefixed};
use super::PgOutputError;

impl PgOutputMessage {
    /// Appends this message's wire form to `dst`.
    ///
    /// Fails only when a field cannot be represented: a name containing NUL, more
    /// than 65535 columns, or a value longer than `i32::MAX` bytes.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), PgOutputError> {
        let start = dst.len();
        let res = self.encode_inner(dst);
        if res.is_err() {
            dst.truncate(start);
        }
        res
    }

    /// The message's wire form as a fresh buffer.
    pub fn to_bytes(&self) -> Result<Bytes, PgOutputError> {
        let mut dst = BytesMut::new();
        self.encode(&mut dst)?;
        Ok(dst.freeze())
    }

    fn encode_inner(&self, dst: &mut BytesMut) -> Result<(), PgOutputError> {
        dst.put_u8(self.tag());
        match self {
            Self::Begin(m) => {
                dst.put_u64(m.final_lsn.0);
                dst.put_i64(m.commit_ts.0);
                dst.put_u32(m.xid);
            }
            Self::Commit(m) => {
                dst.put_u8(m.flags);
                dst.put_u64(m.commit_lsn.0);
                dst.put_u64(m.end_lsn.0);
                dst.put_i64(m.commit_ts.0);
            }
            Self::Origin(m) => {
                dst.put_u64(m.commit_lsn.0);
                put_cstr(dst, &m.name, "origin name")?;
            }
            Self::Relation(m) => {
                dst.put_u32(m.oid);
                put_cstr(dst, &m.namespace, "relation namespace")?;
                put_cstr(dst, &m.name, "relation name")?;
                dst.put_u8(m.replica_identity.as_byte());
                dst.put_u16(count(m.columns.len(), "relation columns")?);
                for c in &m.columns {
                    dst.put_u8(c.flags);
                    put_cstr(dst, &c.name, "column name")?;
                    dst.put_u32(c.type_oid);
                    dst.put_i32(c.type_modifier);
                }
            }
            Self::Type(m) => {
                dst.put_u32(m.oid);
                put_cstr(dst, &m.namespace, "type namespace")?;
                put_cstr(dst, &m.name, "type name")?;
            }
            Self::Insert(m) => {
                dst.put_u32(m.relation_oid);
                dst.put_u8(b'N');
                put_tuple(dst, &m.new)?;
            }
            Self::Update(m) => {
                dst.put_u32(m.relation_oid);
                if let Some(old) = &m.old {
                    put_old(dst, old)?;
                }
                dst.put_u8(b'N');
                put_tuple(dst, &m.new)?;
            }
            Self::Delete(m) => {
                dst.put_u32(m.relation_oid);
                put_old(dst, &m.old)?;
            }
            Self::Truncate(m) => {
                dst.put_u32(count(m.relation_oids.len(), "truncated relations")?);
                dst.put_u8(m.options.0);
                for oid in &m.relation_oids {
                    dst.put_u32(*oid);
                }
            }
            Self::Message(m) => {
                dst.put_u8(m.flags);
                dst.put_u64(m.lsn.0);
                put_cstr(dst, &m.prefix, "message prefix")?;
                put_len_prefixed(dst, &m.content, "message content")?;
            }
        }
        Ok(())
    }
}

/// Appends a standalone TupleData (column count, then values) to `dst`; the inverse
/// of [`super::decode::decode_tuple`]. On error `dst` is left as it was.
pub fn encode_tuple(dst: &mut BytesMut, tuple: &TupleData) -> Result<(), PgOutputError> {
    let start = dst.len();
    let res = put_tuple(dst, tuple);
    if res.is_err() {
        dst.truncate(start);
    }
    res
}

fn put_old(dst: &mut BytesMut, old: &OldTuple) -> Result<(), PgOutputError> {
    dst.put_u8(old.marker());
    put_tuple(dst, old.tuple())
}

fn put_tuple(dst: &mut BytesMut, tuple: &TupleData) -> Result<(), PgOutputError> {
    dst.put_u16(count(tuple.len(), "tuple columns")?);
    for v in tuple.iter() {
        dst.put_u8(v.kind());
        match v {
            TupleValue::Null | TupleValue::UnchangedToast => {}
            TupleValue::Text(b) | TupleValue::Binary(b) => {
                put_len_prefixed(dst, b, "column value")?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::{Lsn, Origin};

    #[test]
    fn failed_encode_leaves_buffer_untouched() {
        let mut dst = BytesMut::from(&b"keep"[..]);
        let bad = PgOutputMessage::Origin(Origin {
            commit_lsn: Lsn(1),
            name: "a\0b".into(),
        });
        assert_eq!(
            bad.encode(&mut dst),
            Err(PgOutputError::InteriorNul {
                field: "origin name"
            })
        );
        assert_eq!(&dst[..], b"keep");
    }

    #[test]
    fn too_many_columns_is_refused() {
        let t = TupleData(vec![TupleValue::Null; 70_000]);
        let mut dst = BytesMut::new();
        assert!(matches!(
            encode_tuple(&mut dst, &t),
            Err(PgOutputError::TooLarge { .. })
        ));
        assert!(dst.is_empty());
    }
}
