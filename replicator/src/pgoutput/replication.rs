//! Streaming replication CopyData sub-messages: what wraps pgoutput on the wire.
//!
//! This file owns the server's `w` (XLogData) and `k` (primary keepalive) messages
//! and the client's `r` (standby status update), each the body of one CopyData
//! frame in `START_REPLICATION ... LOGICAL` mode. It must never touch the CopyData
//! framing itself (the connection library does that) and must never decide what to
//! acknowledge: the caller reports only positions whose changes are durable in the
//! change log, or the slot would release WAL we still need.

use bytes::{BufMut, Bytes, BytesMut};

use super::wire::Reader;
use super::{Lsn, PgOutputError, PgOutputMessage, PgTimestamp};

/// A CopyData body sent by the server during logical replication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    XLogData(XLogData),
    PrimaryKeepalive(PrimaryKeepalive),
}

/// `w`: a chunk of decoded WAL; for pgoutput, exactly one pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XLogData {
    /// WAL position this data starts at (0 for some pgoutput messages).
    pub wal_start: Lsn,
    /// Current end of WAL on the server.
    pub wal_end: Lsn,
    /// Server clock at send time.
    pub server_clock: PgTimestamp,
    /// The pgoutput message bytes.
    pub data: Bytes,
}

impl XLogData {
    /// Decodes the carried pgoutput message.
    pub fn message(&self) -> Result<PgOutputMessage, PgOutputError> {
        PgOutputMessage::decode(self.data.clone())
    }
}

/// `k`: the server's heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrimaryKeepalive {
    /// Current end of WAL on the server.
    pub wal_end: Lsn,
    /// Server clock at send time.
    pub server_clock: PgTimestamp,
    /// The server wants a [`StandbyStatusUpdate`] soon, or it will time us out
    /// (`wal_sender_timeout`).
    pub reply_requested: bool,
}

/// `r`: the client's progress report. `flush_lsn` is what PostgreSQL records as the
/// slot's `confirmed_flush_lsn`, so it must only cover durable changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandbyStatusUpdate {
    /// Last WAL byte + 1 received and written.
    pub write_lsn: Lsn,
    /// Last WAL byte + 1 made durable. For pgoutput, a Commit's `end_lsn`.
    pub flush_lsn: Lsn,
    /// Last WAL byte + 1 applied.
    pub apply_lsn: Lsn,
    /// Client clock at send time.
    pub client_clock: PgTimestamp,
    /// Ask the server to answer with a keepalive right away.
    pub reply_requested: bool,
}

const XLOG_HEADER_LEN: usize = 1 + 8 + 8 + 8;
const KEEPALIVE_LEN: usize = 1 + 8 + 8 + 1;
const STATUS_UPDATE_LEN: usize = 1 + 8 + 8 + 8 + 8 + 1;

impl ReplicationMessage {
    /// Decodes one CopyData body from the server. XLogData's payload shares `buf`.
    pub fn decode(buf: Bytes) -> Result<Self, PgOutputError> {
        let mut r = Reader::new(buf);
        match r.u8()? {
            b'w' => Ok(Self::XLogData(XLogData {
                wal_start: Lsn(r.u64()?),
                wal_end: Lsn(r.u64()?),
                server_clock: PgTimestamp(r.i64()?),
                data: r.rest(),
            })),
            b'k' => {
                let m = PrimaryKeepalive {
                    wal_end: Lsn(r.u64()?),
                    server_clock: PgTimestamp(r.i64()?),
                    reply_requested: r.u8()? != 0,
                };
                r.finish()?;
                Ok(Self::PrimaryKeepalive(m))
            }
            tag => Err(PgOutputError::UnknownTag(tag)),
        }
    }

    /// Appends the wire form to `dst` (for test servers).
    pub fn encode(&self, dst: &mut BytesMut) {
        match self {
            Self::XLogData(m) => {
                dst.reserve(XLOG_HEADER_LEN + m.data.len());
                dst.put_u8(b'w');
                dst.put_u64(m.wal_start.0);
                dst.put_u64(m.wal_end.0);
                dst.put_i64(m.server_clock.0);
                dst.put_slice(&m.data);
            }
            Self::PrimaryKeepalive(m) => {
                dst.reserve(KEEPALIVE_LEN);
                dst.put_u8(b'k');
                dst.put_u64(m.wal_end.0);
                dst.put_i64(m.server_clock.0);
                dst.put_u8(u8::from(m.reply_requested));
            }
        }
    }

    /// The wire form as a fresh buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut dst = BytesMut::new();
        self.encode(&mut dst);
        dst.freeze()
    }
}

impl StandbyStatusUpdate {
    /// A report that everything up to `lsn` is written, flushed and applied.
    pub fn confirm(lsn: Lsn, client_clock: PgTimestamp) -> Self {
        StandbyStatusUpdate {
            write_lsn: lsn,
            flush_lsn: lsn,
            apply_lsn: lsn,
            client_clock,
            reply_requested: false,
        }
    }

    /// Appends the wire form (the CopyData body) to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.reserve(STATUS_UPDATE_LEN);
        dst.put_u8(b'r');
        dst.put_u64(self.write_lsn.0);
        dst.put_u64(self.flush_lsn.0);
        dst.put_u64(self.apply_lsn.0);
        dst.put_i64(self.client_clock.0);
        dst.put_u8(u8::from(self.reply_requested));
    }

    /// The wire form as a fresh buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut dst = BytesMut::with_capacity(STATUS_UPDATE_LEN);
        self.encode(&mut dst);
        dst.freeze()
    }

    /// Decodes a status update (what a test walsender receives).
    pub fn decode(buf: Bytes) -> Result<Self, PgOutputError> {
        let mut r = Reader::new(buf);
        match r.u8()? {
            b'r' => {}
            tag => return Err(PgOutputError::UnknownTag(tag)),
        }
        let m = StandbyStatusUpdate {
            write_lsn: Lsn(r.u64()?),
            flush_lsn: Lsn(r.u64()?),
            apply_lsn: Lsn(r.u64()?),
            client_clock: PgTimestamp(r.i64()?),
            reply_requested: r.u8()? != 0,
        };
        r.finish()?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xlogdata_round_trips_and_shares_payload() {
        let m = ReplicationMessage::XLogData(XLogData {
            wal_start: Lsn(0x16B3748),
            wal_end: Lsn(0x16B3778),
            server_clock: PgTimestamp(757_382_400_123_456),
            data: Bytes::from_static(b"B\x01\x02"),
        });
        let bytes = m.to_bytes();
        assert_eq!(bytes.len(), XLOG_HEADER_LEN + 3);
        assert_eq!(ReplicationMessage::decode(bytes), Ok(m));
    }

    #[test]
    fn keepalive_round_trips() {
        for reply_requested in [false, true] {
            let m = ReplicationMessage::PrimaryKeepalive(PrimaryKeepalive {
                wal_end: Lsn(u64::MAX),
                server_clock: PgTimestamp(-1),
                reply_requested,
            });
            let bytes = m.to_bytes();
            assert_eq!(bytes.len(), KEEPALIVE_LEN);
            assert_eq!(ReplicationMessage::decode(bytes), Ok(m));
        }
    }

    #[test]
    fn status_update_round_trips() {
        let m = StandbyStatusUpdate {
            write_lsn: Lsn(3),
            flush_lsn: Lsn(2),
            apply_lsn: Lsn(1),
            client_clock: PgTimestamp(42),
            reply_requested: true,
        };
        let bytes = m.to_bytes();
        assert_eq!(bytes.len(), STATUS_UPDATE_LEN);
        assert_eq!(StandbyStatusUpdate::decode(bytes), Ok(m));
        let c = StandbyStatusUpdate::confirm(Lsn(9), PgTimestamp(1));
        assert_eq!(StandbyStatusUpdate::decode(c.to_bytes()), Ok(c));
    }

    #[test]
    fn keepalive_wrong_length_is_classified() {
        let full = ReplicationMessage::PrimaryKeepalive(PrimaryKeepalive {
            wal_end: Lsn(1),
            server_clock: PgTimestamp(2),
            reply_requested: false,
        })
        .to_bytes();
        let short = full.slice(..full.len() - 1);
        assert!(ReplicationMessage::decode(short)
            .unwrap_err()
            .is_truncated());
        let mut long = BytesMut::from(&full[..]);
        long.put_u8(0);
        assert_eq!(
            ReplicationMessage::decode(long.freeze()),
            Err(PgOutputError::TrailingBytes(1))
        );
        assert_eq!(
            ReplicationMessage::decode(Bytes::from_static(b"r")),
            Err(PgOutputError::UnknownTag(b'r'))
        );
    }
}
