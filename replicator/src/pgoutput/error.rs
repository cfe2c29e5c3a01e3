//! The single error type of the pgoutput codec.
//!
//! It owns the split between "the buffer ended too early" ([`PgOutputError::Truncated`])
//! and "the bytes can never be a valid message" (every other decode variant), plus the
//! few ways an encoder input cannot be put on the wire. It must never carry the
//! offending payload itself: column values can hold user data, and errors end up in
//! logs.

use std::fmt;

/// Everything that can go wrong while decoding or encoding replication messages.
///
/// All faults here come from the upstream PostgreSQL walsender (decode) or from the
/// caller (encode); nothing comes from a peer region.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PgOutputError {
    /// The buffer ended before the message did. `need` is the minimum total length
    /// known so far, `have` the length actually given.
    #[error("truncated message: need at least {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    /// The first byte is not a message tag this decoder knows.
    #[error("unknown message tag {}", Tag(*.0))]
    UnknownTag(u8),
    /// A TupleData column kind other than `n`, `u`, `t` or `b`.
    #[error("unknown tuple column kind {}", Tag(*.0))]
    UnknownTupleKind(u8),
    /// Update/Insert/Delete had a byte where a tuple marker (`K`, `O`, `N`) belongs.
    #[error("expected tuple marker {expected}, found {}", Tag(*.found))]
    UnexpectedTupleMarker { expected: &'static str, found: u8 },
    /// A Relation message with a replica identity other than `d`, `n`, `f`, `i`.
    #[error("unknown replica identity {}", Tag(*.0))]
    UnknownReplicaIdentity(u8),
    /// A name (schema, table, column, type, origin, message prefix) is not UTF-8.
    #[error("string field is not valid UTF-8")]
    InvalidUtf8,
    /// A length field was negative where the protocol only allows `0..`.
    #[error("negative length {0}")]
    NegativeLength(i32),
    /// The message was complete but bytes were left after it. pgoutput sends exactly
    /// one message per XLogData, so this means a protocol mismatch (e.g. streaming).
    #[error("{0} trailing bytes after message")]
    TrailingBytes(usize),
    /// Text that should be an LSN in `X/X` hexadecimal form is not.
    #[error("invalid LSN {0:?}: expected two hexadecimal halves like 0/16B3748")]
    InvalidLsn(String),
    /// Encode only: a string that goes on the wire NUL-terminated contains a NUL.
    #[error("{field} contains a NUL byte and cannot be sent as a C string")]
    InteriorNul { field: &'static str },
    /// Encode only: a count or length does not fit its wire field.
    #[error("{field} is too large for its wire field: {len}")]
    TooLarge { field: &'static str, len: usize },
    /// A change referenced a relation OID that no Relation message has described.
    #[error("relation {0} has not been described by a Relation message")]
    UnknownRelation(u32),
    /// A tuple's column count differs from its relation's.
    #[error("tuple for relation {relation} has {found} columns, relation has {expected}")]
    ColumnCountMismatch {
        relation: u32,
        expected: usize,
        found: usize,
    },
}

impl PgOutputError {
    /// True when more bytes could still make the message valid.
    pub fn is_truncated(&self) -> bool {
        matches!(self, Self::Truncated { .. })
    }

    /// True when no amount of further bytes can make the message valid.
    pub fn is_invalid(&self) -> bool {
        !self.is_truncated()
    }
}

/// Shows a protocol tag byte as `'B'` when printable and `0x42` otherwise.
struct Tag(u8);

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}'", self.0 as char)
        } else {
            write!(f, "0x{:02x}", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_display_printable_or_hex() {
        assert_eq!(
            PgOutputError::UnknownTag(b'Z').to_string(),
            "unknown message tag 'Z'"
        );
        assert_eq!(
            PgOutputError::UnknownTag(0).to_string(),
            "unknown message tag 0x00"
        );
    }

    #[test]
    fn classifiers() {
        assert!(PgOutputError::Truncated { need: 2, have: 1 }.is_truncated());
        assert!(PgOutputError::InvalidUtf8.is_invalid());
    }
}
