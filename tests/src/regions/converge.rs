//! Waiting for a mesh to settle: every local write captured, every link caught
//! up with its peer's change log, no log growing, and then the same checksum of
//! every table in every region.
//!
//! Quiet is judged from the databases alone (slot positions, `mesh.links`,
//! `mesh.changelog` heads), never from a node's own opinion, and every wait has
//! a deadline. A mesh that is quiet yet different is divergence, not lag, and is
//! reported early instead of waiting out the deadline.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use pgmesh_replicator::catalog;

use super::Mesh;
use crate::wait::{wait_for, wait_until};

/// How long a quiet mesh may show different checksums before it counts as
/// diverged (nothing is in flight then, so this only absorbs slow scheduling).
const DIVERGED_FOR: Duration = Duration::from_secs(10);

impl Mesh {
    /// Wait until every region with a node has logged everything committed in it
    /// so far (its capture slot confirmed past the current WAL position).
    pub async fn wait_captured(&self, timeout: Duration) -> Result<()> {
        for r in self.regions.iter().filter(|r| r.node.is_some()) {
            let lsn: String = r
                .admin
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await?
                .get(0);
            let slot = catalog::slot_name(&r.name);
            let what = format!("capture of {} to pass {lsn}", r.name);
            wait_until(timeout, &what, || async {
                r.admin
                    .query_opt(
                        "SELECT 1 FROM pg_replication_slots
                         WHERE slot_name = $1 AND confirmed_flush_lsn >= $2::text::pg_lsn",
                        &[&slot, &lsn],
                    )
                    .await
                    .ok()
                    .flatten()
                    .is_some()
            })
            .await?;
        }
        Ok(())
    }

    /// `Ok(Some)` when every link's checkpoint equals its source's change-log
    /// head and no head moved while checking; `Err` describes what still lags.
    async fn quiescent_once(&self) -> Result<Option<()>> {
        let heads = self.heads().await?;
        for (i, r) in self.regions.iter().enumerate() {
            if r.node.is_none() {
                continue;
            }
            for p in &r.peers {
                let want = heads[self.index(p)?];
                // The view must agree: checkpoint = peer_head = the peer's real head.
                let got = self.link(i, p).await?.map(|l| (l.checkpoint, l.peer_head));
                if got != Some((want, want)) {
                    bail!(
                        "{}: (checkpoint, peer_head) of {p} is {got:?}, {p}'s head is {want}",
                        r.name
                    );
                }
            }
        }
        if self.heads().await? != heads {
            bail!("change logs still growing: {heads:?}");
        }
        Ok(Some(()))
    }

    async fn heads(&self) -> Result<Vec<i64>> {
        let mut heads = Vec::new();
        for i in 0..self.regions.len() {
            heads.push(self.head(i).await?);
        }
        Ok(heads)
    }

    /// Wait until the mesh is quiet: every local write captured, every link caught
    /// up with its peer's log, and no log growing.
    pub async fn wait_quiescent(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        self.wait_captured(timeout).await?;
        let left = deadline.saturating_duration_since(Instant::now());
        wait_for(left, "every link to catch up with its peer", || {
            self.quiescent_once()
        })
        .await
    }

    /// Wait until the mesh is quiet and every table has the same checksum in every
    /// region; returns the checksums.
    pub async fn wait_converged(&self, timeout: Duration) -> Result<BTreeMap<String, String>> {
        let deadline = Instant::now() + timeout;
        self.wait_captured(timeout).await?;
        let left = deadline.saturating_duration_since(Instant::now());
        // Quiet yet different is divergence, not lag: give up on it early.
        let diverged_since = Mutex::new(None::<Instant>);
        let verdict = wait_for(left, "every region to converge", || async {
            self.quiescent_once().await?;
            let first = self.checksums(0).await?;
            for i in 1..self.regions.len() {
                let other = self.checksums(i).await?;
                if other != first {
                    let msg = format!(
                        "quiet, but checksums differ: {} {first:?} vs {} {other:?}",
                        self.regions[0].name, self.regions[i].name
                    );
                    let mut since = diverged_since.lock().unwrap_or_else(|e| e.into_inner());
                    if since.get_or_insert_with(Instant::now).elapsed() > DIVERGED_FOR {
                        return Ok(Some(Err(anyhow!(msg))));
                    }
                    bail!(msg);
                }
            }
            Ok(Some(Ok(first)))
        })
        .await?;
        verdict
    }
}
