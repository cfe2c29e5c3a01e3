//! The durable change log behind a narrow trait.
//!
//! Capture appends events and learns where to resume; peers and `pgmesh log tail`
//! read events after a sequence number. `append` returns only once the events are
//! durable, which is what lets capture acknowledge its slot. The default
//! implementation is `mesh.changelog` in the regional database ([`table::TableLog`]);
//! Kafka comes later behind the same trait. Implementations must never reorder the
//! events of one append.

mod append;
pub mod fence;
pub mod floors;
pub mod notify;
pub mod prune;
pub mod table;
pub mod tail;
pub mod tombstones;
pub mod versions;

use thiserror::Error;

use crate::event::ChangeEvent;
use crate::hlc::Hlc;
use crate::pgoutput::Lsn;

pub use table::TableLog;

/// Errors of the change log.
#[derive(Debug, Error)]
pub enum LogError {
    #[error("change log database: {}", crate::catalog::pg_error(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("change log database unavailable: {0}")]
    Unavailable(String),
    #[error("change log row {seq} is corrupt: {reason}")]
    Corruption { seq: i64, reason: String },
    #[error("another node leads capture of region {region} now (epoch {current}, this one {ours}); this append did not happen")]
    Fenced {
        region: String,
        ours: i64,
        current: i64,
    },
}

/// Where capture of one origin resumes: the last logged commit LSN and final HLC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumePoint {
    pub lsn: Lsn,
    pub hlc: Hlc,
}

/// One logged event with its position in the log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Logged {
    pub seq: i64,
    pub event: ChangeEvent,
}

/// Which events a peer may receive from this server (see [`ShipFilter::ships`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShipFilter {
    /// This server's region.
    pub server_region: String,
    /// Hub mode: other regions' events are served too.
    pub relay: bool,
    /// The pulling peer's region.
    pub peer_region: String,
}

impl ShipFilter {
    /// Never local-only events, never the peer's own events back to it; this
    /// region's events always; other regions' events only in hub mode, with their
    /// origin preserved. `TableLog::read_for` evaluates the same rule in SQL.
    pub fn ships(&self, e: &ChangeEvent) -> bool {
        !e.local_only
            && e.origin != self.peer_region
            && (e.origin == self.server_region || self.relay)
    }
}

/// One read of the log for a peer: the events it may see, and the highest sequence
/// number the read covered (`None` when there was nothing after the cursor).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    pub events: Vec<Logged>,
    pub upto: Option<i64>,
    /// Nothing after `upto` was committed when the read started, as far as the
    /// reader knows: a later append wakes the reader, so it need not read again.
    pub drained: bool,
}

/// A durable, ordered log of change events.
pub trait ChangeLog {
    /// Appends events in order; durable when this returns. Events already in the log
    /// (same origin and source LSN, or same event id) are skipped, not duplicated.
    fn append(
        &mut self,
        events: &[ChangeEvent],
    ) -> impl std::future::Future<Output = Result<(), LogError>> + Send;

    /// The resume point of `origin`, or `None` when nothing of it is logged.
    fn resume_point(
        &mut self,
        origin: &str,
    ) -> impl std::future::Future<Output = Result<Option<ResumePoint>, LogError>> + Send;

    /// Up to `limit` events with a sequence number above `after`, in log order.
    fn read_after(
        &mut self,
        after: i64,
        limit: i64,
    ) -> impl std::future::Future<Output = Result<Vec<Logged>, LogError>> + Send;
}
