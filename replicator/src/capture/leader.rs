//! Capture leadership: the region's advisory lock, and this node's row in
//! `mesh.node_state` (what `mesh.nodes` shows).
//!
//! The lock connection holds the leader lock for as long as it lives. A node that
//! does not get it waits as standby, in waits of [`STANDBY_BEAT`] each, and records a
//! heartbeat between them, so `mesh.nodes.alive` is true for a live standby as for a
//! live leader (whose heartbeat the capture loop records). A node that shuts down
//! cleanly marks its row `stopped`.

use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use super::run::{CaptureConfig, CaptureError};
use crate::catalog;

/// How long a standby waits on the leader lock between two heartbeats: well under
/// the 10 s after which `mesh.nodes` shows a node as not alive.
pub const STANDBY_BEAT: Duration = Duration::from_secs(2);

/// How long a stopping node tries to mark its row `stopped`.
const STOP_MARK_TIMEOUT: Duration = Duration::from_secs(3);

/// Advisory-lock key of a region's capture leadership.
pub fn leader_key(region: &str) -> i64 {
    0x7067_6d00_0000_0000 | (catalog::origin_id_for(region) as i64)
}

/// Takes the region's leader lock if it is free. Returns whether it did.
pub async fn try_lead(lock: &Client, region: &str) -> Result<bool, CaptureError> {
    Ok(lock
        .query_one("SELECT pg_try_advisory_lock($1)", &[&leader_key(region)])
        .await?
        .get(0))
}

/// Waits as standby until the leader lock is this node's (true), or `shutdown` turns
/// true (false). Records a heartbeat every [`STANDBY_BEAT`] meanwhile.
pub async fn wait_for_lead(
    lock: &Client,
    cfg: &CaptureConfig,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<bool, CaptureError> {
    set_role(lock, cfg, "standby").await?;
    lock.batch_execute(&format!("SET lock_timeout = {}", STANDBY_BEAT.as_millis()))
        .await?;
    let key = leader_key(&cfg.region);
    loop {
        let params: [&(dyn ToSql + Sync); 1] = [&key];
        tokio::select! {
            r = lock.execute("SELECT pg_advisory_lock($1)", &params) => match r {
                Ok(_) => break,
                Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {}
                Err(e) => return Err(e.into()),
            },
            _ = shutdown.changed() => return Ok(false),
        }
        lock.execute(
            "UPDATE mesh.node_state SET heartbeat = now() WHERE node = $1",
            &[&cfg.node],
        )
        .await?;
    }
    lock.batch_execute("RESET lock_timeout").await?;
    Ok(true)
}

/// Records this node's role in its region (`leader` also marks any other node
/// still listed as leader `stopped`: this one holds the lock, so that one is gone).
pub async fn set_role(lock: &Client, cfg: &CaptureConfig, role: &str) -> Result<(), CaptureError> {
    if role == "leader" {
        lock.execute(
            "UPDATE mesh.node_state SET role = 'stopped' WHERE region = $1 AND node <> $2 AND role = 'leader'",
            &[&cfg.region, &cfg.node],
        )
        .await?;
    }
    lock.execute(
        "INSERT INTO mesh.node_state (node, region, role) VALUES ($1, $2, $3)
         ON CONFLICT (node) DO UPDATE SET role = $3, region = $2, heartbeat = now()",
        &[&cfg.node, &cfg.region, &role],
    )
    .await?;
    Ok(())
}

/// Marks this node `stopped` as it shuts down. Best effort: a node that cannot
/// (its database is gone) shows as not alive once its heartbeat is old.
pub async fn mark_stopped(lock: &Client, cfg: &CaptureConfig) {
    let params: [&(dyn ToSql + Sync); 1] = [&cfg.node];
    let mark = lock.execute(
        "UPDATE mesh.node_state SET role = 'stopped' WHERE node = $1",
        &params,
    );
    let _ = tokio::time::timeout(STOP_MARK_TIMEOUT, mark).await;
}
