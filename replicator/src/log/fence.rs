//! Fencing capture leaders: at most one node's appends of captured events land.
//!
//! Leadership is a session advisory lock, and a leader learns it lost the lock only
//! at its next heartbeat. Meanwhile it may still append, and an append may already
//! be on the server when its node is cut off. A new leader that read where to
//! resume before such an append committed would capture the same transactions
//! again and log them a second time, under other HLCs.
//!
//! So each new leader takes the next epoch of its region (`mesh.capture_epochs`)
//! under the change log's append lock, and only then reads where to resume; and
//! every append of captured events reads the epoch under the same lock, in its
//! first round trip, and gives up if it is no longer its leader's. An append of the
//! previous leader either committed before the new epoch was taken (and the new
//! leader resumes after it) or sees the new epoch and rolls back.

use tokio_postgres::Client;

use super::table::APPEND_LOCK;
use super::LogError;

/// Takes region `$1`'s next epoch for node `$2` under the append lock, so once it
/// returns no append that checked the previous epoch is still running.
const TAKE: &str = "WITH l AS (SELECT pg_advisory_xact_lock($3))
     INSERT INTO mesh.capture_epochs (region, epoch, node)
     SELECT $1, 1, $2 FROM l
     ON CONFLICT (region) DO UPDATE
        SET epoch = mesh.capture_epochs.epoch + 1, node = EXCLUDED.node, taken_at = now()
     RETURNING epoch";

/// Region `$1`'s current epoch (0 before any leader took one).
pub const CURRENT: &str =
    "SELECT coalesce((SELECT epoch FROM mesh.capture_epochs WHERE region = $1), 0)::int8";

/// The epoch a capture leader appends under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub region: String,
    pub epoch: i64,
}

impl Fence {
    /// The error of an append that found `current` instead of this epoch.
    pub fn lost(&self, current: i64) -> LogError {
        LogError::Fenced {
            region: self.region.clone(),
            ours: self.epoch,
            current,
        }
    }
}

/// Makes `node` the leader whose appends land for `region`: takes the next epoch.
/// Synchronous like every commit of the log's connection.
pub async fn take(c: &Client, region: &str, node: &str) -> Result<Fence, LogError> {
    let epoch: i64 = c
        .query_one(TAKE, &[&region, &node, &APPEND_LOCK])
        .await?
        .get(0);
    Ok(Fence {
        region: region.to_string(),
        epoch,
    })
}

#[cfg(test)]
#[path = "fence_tests.rs"]
mod tests;
