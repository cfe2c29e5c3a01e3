//! Capture leadership: the region's advisory lock, and this node's row in
//! `mesh.node_state` (what `mesh.nodes` shows).
//!
//! The lock connection holds the leader lock for as long as it lives. A node that
//! does not get it waits as standby, in waits of [`STANDBY_BEAT`] each, and records a
//! heartbeat between them, so `mesh.nodes.alive` is true for a live standby as for a
//! live leader (whose heartbeat the capture loop records). A node that shuts down
//! cleanly marks its row `stopped`.
//!
//! The row also records the node's `--relay`. Every node of a region serves the
//! same log with the same sequence numbers, and a peer's link moves between them
//! (several addresses per peer): a link that moved from a node that relays to one
//! that does not (or back) would skip other regions' events below or above its
//! checkpoint. So a node refuses to register, and its link server refuses peers,
//! while the region's setting is the other one: that of its leader (even a dead one
//! that nothing took over from yet) or of a live standby ([`RELAY_CONFLICT`]).

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

/// Transaction advisory-lock key under which the nodes of a region register, so two
/// nodes starting at once with different `--relay` cannot both pass the check.
fn registration_key(region: &str) -> i64 {
    0x7067_6e00_0000_0000 | (catalog::origin_id_for(region) as i64)
}

/// A node of region `$1`, other than `$2`, whose `--relay` is not `$3` and is the
/// region's: its leader (alive or not: a leader that died without a successor is
/// what a standby would take over from) or a live standby. Nodes of versions that
/// did not record the setting are not counted.
pub const RELAY_CONFLICT: &str = "SELECT node, role, relay FROM mesh.node_state
    WHERE region = $1 AND node <> $2 AND relay IS NOT NULL AND relay <> $3
      AND (role = 'leader'
           OR (role = 'standby' AND heartbeat > now() - interval '10 seconds'))
    ORDER BY role = 'leader' DESC, node
    LIMIT 1";

/// Why node `node` of `region`, with `relay`, may not capture or serve: `None` when
/// no node of the region disagrees ([`RELAY_CONFLICT`]).
pub async fn relay_conflict(
    c: &Client,
    region: &str,
    node: &str,
    relay: bool,
) -> Result<Option<String>, tokio_postgres::Error> {
    let row = c
        .query_opt(RELAY_CONFLICT, &[&region, &node, &relay])
        .await?;
    Ok(row.map(|r| {
        let (other, role): (String, String) = (r.get(0), r.get(1));
        let with = |on: bool| {
            if on {
                "with --relay"
            } else {
                "without --relay"
            }
        };
        format!(
            "node {other} ({role} of region {region}) runs {}, but node {node} {}: every \
             node of a region must run with the same --relay, or a peer whose link moves \
             between them skips events. Restart {node} with the region's setting; to \
             change it, stop the region's nodes and start them with the new one (a \
             leader that died without a successor is marked stopped with: UPDATE \
             mesh.node_state SET role = 'stopped' WHERE node = '{other}')",
            with(r.get(2)),
            with(relay),
        )
    }))
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

/// Records this node's role and `--relay` in its region, unless a node of the region
/// disagrees on `--relay` ([`relay_conflict`]; then [`CaptureError::RelayMismatch`]).
/// `leader` also marks any other node still listed as leader `stopped`: this one
/// holds the lock, so that one is gone.
pub async fn set_role(lock: &Client, cfg: &CaptureConfig, role: &str) -> Result<(), CaptureError> {
    lock.batch_execute("BEGIN").await?;
    let r = register(lock, cfg, role).await;
    let end = if r.is_ok() { "COMMIT" } else { "ROLLBACK" };
    let ended = lock.batch_execute(end).await;
    r?;
    Ok(ended?)
}

async fn register(lock: &Client, cfg: &CaptureConfig, role: &str) -> Result<(), CaptureError> {
    lock.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&registration_key(&cfg.region)],
    )
    .await?;
    if let Some(why) = relay_conflict(lock, &cfg.region, &cfg.node, cfg.relay).await? {
        return Err(CaptureError::RelayMismatch(why));
    }
    if role == "leader" {
        lock.execute(
            "UPDATE mesh.node_state SET role = 'stopped' WHERE region = $1 AND node <> $2 AND role = 'leader'",
            &[&cfg.region, &cfg.node],
        )
        .await?;
    }
    lock.execute(
        "INSERT INTO mesh.node_state (node, region, role, relay) VALUES ($1, $2, $3, $4)
         ON CONFLICT (node) DO UPDATE SET role = $3, region = $2, relay = $4, heartbeat = now()",
        &[&cfg.node, &cfg.region, &role, &cfg.relay],
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch;

    fn cfg(url: &str, node: &str, relay: bool) -> CaptureConfig {
        let mut c = CaptureConfig::new(url, "r1", node);
        c.relay = relay;
        c
    }

    #[tokio::test]
    async fn the_regions_relay_setting_is_its_leaders_or_a_live_standbys() {
        let Some(url) = scratch::database("pgmesh_leader_relay").await else {
            return;
        };
        let c = catalog::connect(&url).await.unwrap();
        // A leader that relays, alive or not, binds the region.
        set_role(&c, &cfg(&url, "a", true), "leader").await.unwrap();
        let err = set_role(&c, &cfg(&url, "b", false), "standby")
            .await
            .unwrap_err();
        let CaptureError::RelayMismatch(why) = err else {
            panic!("{err}");
        };
        assert!(
            why.contains("node a (leader of region r1) runs with --relay")
                && why.contains("node b without --relay"),
            "{why}"
        );
        c.execute(
            "UPDATE mesh.node_state SET heartbeat = now() - interval '1 hour'",
            &[],
        )
        .await
        .unwrap();
        assert!(relay_conflict(&c, "r1", "b", false)
            .await
            .unwrap()
            .is_some());
        // The same setting registers, and takes the lead from the dead leader.
        set_role(&c, &cfg(&url, "b", true), "leader").await.unwrap();
        let roles: Vec<(String, String, bool)> = c
            .query(
                "SELECT node, role, relay FROM mesh.node_state ORDER BY node",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(
            roles,
            [
                ("a".into(), "stopped".into(), true),
                ("b".into(), "leader".into(), true)
            ]
        );
        // A stopped node does not count, nor does another region's.
        mark_stopped(&c, &cfg(&url, "b", true)).await;
        assert!(relay_conflict(&c, "r1", "c", false)
            .await
            .unwrap()
            .is_none());
        assert!(relay_conflict(&c, "r2", "c", false)
            .await
            .unwrap()
            .is_none());
        // A standby counts while its heartbeat is fresh, not after.
        set_role(&c, &cfg(&url, "c", false), "standby")
            .await
            .unwrap();
        assert!(relay_conflict(&c, "r1", "d", true).await.unwrap().is_some());
        c.execute(
            "UPDATE mesh.node_state SET heartbeat = now() - interval '11 seconds' WHERE node = 'c'",
            &[],
        )
        .await
        .unwrap();
        assert!(relay_conflict(&c, "r1", "d", true).await.unwrap().is_none());
        // A refused registration leaves no row behind.
        assert!(set_role(&c, &cfg(&url, "e", true), "standby").await.is_ok());
        c.execute(
            "UPDATE mesh.node_state SET heartbeat = now() WHERE node = 'c'",
            &[],
        )
        .await
        .unwrap();
        assert!(set_role(&c, &cfg(&url, "f", true), "standby")
            .await
            .is_err());
        let f: i64 = c
            .query_one("SELECT count(*) FROM mesh.node_state WHERE node = 'f'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(f, 0);
    }
}
