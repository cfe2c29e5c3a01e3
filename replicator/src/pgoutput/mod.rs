//! Sans-IO codec for PostgreSQL's logical replication wire format, as capture reads it.
//!
//! This module owns two layers. [`replication`] holds the streaming replication
//! CopyData sub-messages (`w` XLogData, `k` primary keepalive, `r` standby status
//! update). The `pgoutput` messages that ride inside XLogData (`B C O R Y I U D T M`)
//! live in [`types`], with [`decode`] and [`encode`] beside them. It also owns
//! [`Lsn`], [`PgTimestamp`] and the [`RelationCache`] that turns relation OIDs back
//! into column lists.
//!
//! It must never do IO, hold a socket, or look at a clock except through
//! [`PgTimestamp::now`] when the caller asks. It must never panic on bytes from the
//! server, and it must never reinterpret column values: text values stay their exact
//! PostgreSQL text bytes and binary values stay their exact wire bytes, so that no
//! number ever goes through `f64` or JSON. It decodes protocol version 1 without
//! streaming (`proto_version '1'`, `messages 'true'`, no `streaming`): streamed
//! transactions prefix each change with an xid, which this decoder would report as
//! trailing bytes or a wrong tag rather than guess.

pub mod decode;
pub mod encode;
mod error;
mod lsn;
pub mod relation;
pub mod replication;
pub mod types;
mod wire;

#[cfg(test)]
mod tests;

pub use error::PgOutputError;
pub use lsn::{Lsn, PgTimestamp, PG_EPOCH_UNIX_MICROS};
pub use relation::RelationCache;
pub use replication::{PrimaryKeepalive, ReplicationMessage, StandbyStatusUpdate, XLogData};
pub use types::{
    Begin, Column, Commit, Delete, Insert, LogicalMessage, Oid, OldTuple, Origin, PgOutputMessage,
    Relation, ReplicaIdentity, Truncate, TruncateOptions, TupleData, TupleValue, TypeMessage,
    Update, Xid,
};
