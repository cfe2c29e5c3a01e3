//! The pgoutput message types (protocol version 1 plus logical decoding messages).
//!
//! This file owns the in-memory shape of every message pgoutput sends inside
//! XLogData, with field names taken from PostgreSQL's "Logical Replication Message
//! Formats". It must never interpret column values: a [`TupleValue`] keeps the exact
//! bytes PostgreSQL sent (text output or binary send format) as [`Bytes`], and flag
//! bytes keep unknown bits so that re-encoding gives back the original bytes.

use bytes::Bytes;

use super::{Lsn, PgTimestamp};

/// A PostgreSQL object identifier (relation or type).
pub type Oid = u32;
/// A PostgreSQL transaction id (32-bit, as pgoutput sends it).
pub type Xid = u32;

/// One pgoutput message: the payload of one XLogData.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutputMessage {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(TypeMessage),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(LogicalMessage),
}

impl PgOutputMessage {
    /// The message's tag byte on the wire.
    pub fn tag(&self) -> u8 {
        match self {
            Self::Begin(_) => b'B',
            Self::Commit(_) => b'C',
            Self::Origin(_) => b'O',
            Self::Relation(_) => b'R',
            Self::Type(_) => b'Y',
            Self::Insert(_) => b'I',
            Self::Update(_) => b'U',
            Self::Delete(_) => b'D',
            Self::Truncate(_) => b'T',
            Self::Message(_) => b'M',
        }
    }
}

/// `B`: a transaction starts. Changes follow, then a [`Commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    pub commit_ts: PgTimestamp,
    pub xid: Xid,
}

/// `C`: the transaction committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Currently always 0; kept raw so re-encoding is exact.
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// End of the commit record: the position to confirm once this transaction is
    /// durable downstream.
    pub end_lsn: Lsn,
    pub commit_ts: PgTimestamp,
}

/// `O`: the transaction was replayed from a replication origin. pgmesh's apply step
/// sets one, so this is how capture recognises its own writes (loop prevention).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// LSN of the commit on the origin server.
    pub commit_lsn: Lsn,
    pub name: String,
}

/// `R`: describes a relation; sent before the first change to it in a session and
/// again whenever its definition changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: Oid,
    /// Schema name; the empty string means `pg_catalog`.
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    /// Published columns in attribute order. Tuples of this relation have exactly
    /// these columns, in this order.
    pub columns: Vec<Column>,
}

/// A relation's `REPLICA IDENTITY` setting (`pg_class.relreplident`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// `d`: the primary key, if any.
    Default,
    /// `n`: nothing; updates and deletes carry no old values.
    Nothing,
    /// `f`: all columns; every column is flagged as key.
    Full,
    /// `i`: a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    /// Parses `relreplident`. `None` for any other byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'd' => Some(Self::Default),
            b'n' => Some(Self::Nothing),
            b'f' => Some(Self::Full),
            b'i' => Some(Self::Index),
            _ => None,
        }
    }

    /// The `relreplident` byte.
    pub fn as_byte(self) -> u8 {
        match self {
            Self::Default => b'd',
            Self::Nothing => b'n',
            Self::Full => b'f',
            Self::Index => b'i',
        }
    }
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Bit [`Column::FLAG_KEY`] marks a replica identity column; other bits are kept.
    pub flags: u8,
    pub name: String,
    pub type_oid: Oid,
    /// `atttypmod`, -1 when the type has none.
    pub type_modifier: i32,
}

impl Column {
    /// The column is part of the replica identity (primary key, chosen index, or
    /// every column under `REPLICA IDENTITY FULL`).
    pub const FLAG_KEY: u8 = 1;

    pub fn is_key(&self) -> bool {
        self.flags & Self::FLAG_KEY != 0
    }
}

/// `Y`: describes a non-built-in data type used by a following Relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMessage {
    pub oid: Oid,
    /// Schema name; the empty string means `pg_catalog`.
    pub namespace: String,
    pub name: String,
}

/// `I`: a row was inserted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    pub relation_oid: Oid,
    pub new: TupleData,
}

/// `U`: a row was updated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub relation_oid: Oid,
    /// Present when the key changed (`K`) or under `REPLICA IDENTITY FULL` (`O`).
    pub old: Option<OldTuple>,
    /// The new row. Unchanged TOASTed values arrive as [`TupleValue::UnchangedToast`].
    pub new: TupleData,
}

/// `D`: a row was deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub relation_oid: Oid,
    pub old: OldTuple,
}

/// The old row of an Update or Delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: only the replica identity columns hold values; the rest are NULL.
    Key(TupleData),
    /// `O`: the whole old row (`REPLICA IDENTITY FULL`).
    Full(TupleData),
}

impl OldTuple {
    pub fn tuple(&self) -> &TupleData {
        match self {
            Self::Key(t) | Self::Full(t) => t,
        }
    }

    /// The marker byte on the wire, `K` or `O`.
    pub fn marker(&self) -> u8 {
        match self {
            Self::Key(_) => b'K',
            Self::Full(_) => b'O',
        }
    }
}

/// `T`: one TRUNCATE statement, possibly over several relations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    pub options: TruncateOptions,
    pub relation_oids: Vec<Oid>,
}

/// The option bits of a Truncate message; unknown bits are kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct TruncateOptions(pub u8);

impl TruncateOptions {
    pub const CASCADE: u8 = 1;
    pub const RESTART_IDENTITY: u8 = 2;

    pub fn cascade(self) -> bool {
        self.0 & Self::CASCADE != 0
    }

    pub fn restart_identity(self) -> bool {
        self.0 & Self::RESTART_IDENTITY != 0
    }
}

/// `M`: a `pg_logical_emit_message` record (needs the `messages 'true'` option).
/// pgmesh stamps each proxied write transaction with one, prefix `pgmesh`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    /// Bit [`LogicalMessage::FLAG_TRANSACTIONAL`]; other bits are kept.
    pub flags: u8,
    pub lsn: Lsn,
    pub prefix: String,
    /// The payload exactly as emitted; it is bytea, not necessarily UTF-8.
    pub content: Bytes,
}

impl LogicalMessage {
    pub const FLAG_TRANSACTIONAL: u8 = 1;

    /// Transactional messages arrive between Begin and Commit, only if the
    /// transaction commits. Non-transactional ones arrive on their own, immediately.
    pub fn is_transactional(&self) -> bool {
        self.flags & Self::FLAG_TRANSACTIONAL != 0
    }
}

/// A row as pgoutput sends it: one value per column of its relation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TupleData(pub Vec<TupleValue>);

impl TupleData {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, index: usize) -> Option<&TupleValue> {
        self.0.get(index)
    }

    pub fn iter(&self) -> std::slice::Iter<'_, TupleValue> {
        self.0.iter()
    }
}

impl From<Vec<TupleValue>> for TupleData {
    fn from(v: Vec<TupleValue>) -> Self {
        TupleData(v)
    }
}

/// One column value. Never parsed: the bytes are PostgreSQL's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// `n`: SQL NULL.
    Null,
    /// `u`: a TOASTed value that did not change; the value itself is not sent.
    UnchangedToast,
    /// `t`: the type's text output, in the database encoding (not always UTF-8).
    Text(Bytes),
    /// `b`: the type's binary send format (only with the `binary` option).
    Binary(Bytes),
}

impl TupleValue {
    /// The kind byte on the wire.
    pub fn kind(&self) -> u8 {
        match self {
            Self::Null => b'n',
            Self::UnchangedToast => b'u',
            Self::Text(_) => b't',
            Self::Binary(_) => b'b',
        }
    }

    /// The value's bytes for `Text` and `Binary`, `None` otherwise.
    pub fn bytes(&self) -> Option<&Bytes> {
        match self {
            Self::Text(b) | Self::Binary(b) => Some(b),
            Self::Null | Self::UnchangedToast => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Self::Null)
    }
}
