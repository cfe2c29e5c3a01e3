//! Pruning `mesh.changelog` below the horizon: the lowest log position that every
//! region pulling from this one has durably applied.
//!
//! Pullers report their durable checkpoints over the link (`Ack.durable`, recorded in
//! `mesh.peer_acks`); a configured peer that never reported one holds pruning back,
//! and so does any region listed there, until `mesh.forget_peer`. Below the horizon
//! this region's own events are deleted (but the newest, from which capture resumes),
//! and other regions' events lose their changes but keep their ids (origin, hlc),
//! which apply checks for duplicates. `mesh.log_prune.pruned_upto` records how far it
//! went, so that a peer asking for older events is refused rather than served a hole.
//!
//! It runs on the region's leader only, in chunks of [`CHUNK`] sequence numbers, each
//! its own transaction. It never touches rows above the horizon, and never decides
//! what a peer has applied: the peers say so.

use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Client;
use tracing::{debug, info, warn};

use super::{tombstones, LogError};

/// Log rows pruned per transaction.
pub const CHUNK: i64 = 10_000;

/// The end of the next chunk above `$1`: the `$3`-th row's seq, or the horizon `$2`
/// when fewer rows are left.
const NEXT: &str = "SELECT CASE WHEN count(*) < $3 THEN $2 ELSE max(seq) END::int8
   FROM (SELECT seq FROM mesh.changelog WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3) s";

/// Locks the prune mark: a peer's handshake takes the same lock to check it and
/// register its position, so the horizon never passes a peer that is streaming.
const LOCK_MARK: &str = "SELECT pruned_upto FROM mesh.log_prune FOR UPDATE";

/// The horizon: the lowest durable position over the configured peers (`$1`) and
/// every region in `mesh.peer_acks` (NULL while any has reported none), and the
/// regions that have reported none (or 0, as registered by a handshake).
const HORIZON: &str =
    "SELECT CASE WHEN bool_or(a.peer IS NULL) THEN NULL ELSE min(a.durable_seq) END::int8,
        coalesce(array_agg(p.peer ORDER BY p.peer)
                 FILTER (WHERE a.peer IS NULL OR a.durable_seq = 0), '{}')
   FROM (SELECT unnest($1::text[]) AS peer UNION SELECT peer FROM mesh.peer_acks) p
   LEFT JOIN mesh.peer_acks a USING (peer)";

/// One chunk, `$1` region, `$2` the previous `pruned_upto`, `$3` the new one: own
/// events deleted but the newest, others stripped (their ids stay); returns both
/// counts. The mark only moves up.
const CHUNK_SQL: &str =
    "WITH newest AS (SELECT max(seq) AS seq FROM mesh.changelog WHERE origin = $1),
     del AS (DELETE FROM mesh.changelog
              WHERE seq > $2 AND seq <= $3 AND origin = $1 AND seq < (SELECT seq FROM newest)
              RETURNING 1),
     strip AS (UPDATE mesh.changelog SET changes = '[]', tags = '{}', stamped = false
                WHERE seq > $2 AND seq <= $3 AND origin <> $1 AND changes::text <> '[]'
                RETURNING 1),
     mark AS (UPDATE mesh.log_prune SET pruned_upto = greatest(pruned_upto, $3), pruned_at = now()
              RETURNING 1)
SELECT (SELECT count(*) FROM del), (SELECT count(*) FROM strip), (SELECT count(*) FROM mark)";

/// What one [`prune`] did, and what holds it back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    /// `pruned_upto` afterwards.
    pub upto: i64,
    /// Own events deleted and other regions' events stripped.
    pub deleted: u64,
    pub stripped: u64,
    /// Regions that have reported no durable position: nothing is pruned until each
    /// has (or is forgotten with `mesh.forget_peer`).
    pub waiting_for: Vec<String>,
}

/// Prunes the log of `region` up to the horizon over `peers` (the regions this node
/// pulls from; every one of them is assumed to pull from it too).
pub async fn prune(client: &Client, region: &str, peers: &[String]) -> Result<Pruned, LogError> {
    prune_in_chunks(client, region, peers, CHUNK).await
}

async fn prune_in_chunks(
    client: &Client,
    region: &str,
    peers: &[String],
    chunk: i64,
) -> Result<Pruned, LogError> {
    let mut out = Pruned::default();
    loop {
        // Each chunk is a transaction under the mark's lock, with the horizon read
        // afresh: a peer that connected meanwhile counts.
        client.batch_execute("BEGIN").await?;
        let step = one_chunk(client, region, peers, chunk, &mut out).await;
        match step {
            Ok(more) => {
                client.batch_execute("COMMIT").await?;
                if !more {
                    return Ok(out);
                }
                info!(upto = out.upto, "pruning the change log");
            }
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(e);
            }
        }
    }
}

/// Prunes one chunk in the open transaction; false when the horizon is reached.
async fn one_chunk(
    client: &Client,
    region: &str,
    peers: &[String],
    chunk: i64,
    out: &mut Pruned,
) -> Result<bool, LogError> {
    let upto: i64 = client.query_one(LOCK_MARK, &[]).await?.get(0);
    out.upto = upto;
    let row = client.query_one(HORIZON, &[&peers]).await?;
    let horizon: Option<i64> = row.get(0);
    out.waiting_for = row.get(1);
    let Some(horizon) = horizon.filter(|h| *h > upto) else {
        return Ok(false);
    };
    let next: i64 = client
        .query_one(NEXT, &[&upto, &horizon, &chunk])
        .await?
        .get(0);
    let r = client
        .query_one(CHUNK_SQL, &[&region, &upto, &next])
        .await?;
    out.deleted += r.get::<_, i64>(0) as u64;
    out.stripped += r.get::<_, i64>(1) as u64;
    out.upto = next;
    Ok(next < horizon)
}

/// Prunes the log, then the tombstones older than `tombstone_retention` (see
/// [`super::tombstones`]), every `every` until `stop`, on its own connection to `url`.
pub async fn run(
    url: String,
    region: String,
    peers: Vec<String>,
    every: Duration,
    tombstone_retention: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client: Option<Client> = None;
    let mut waiting_for = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if client.as_ref().is_none_or(Client::is_closed) {
            client = match crate::catalog::connect_as(&url, "pgmesh-prune").await {
                Ok(c) => Some(c),
                Err(e) => {
                    debug!(error = %e, "pruning: database unavailable");
                    continue;
                }
            };
        }
        let Some(c) = &client else { continue };
        match prune(c, &region, &peers).await {
            Ok(p) => {
                if p.deleted + p.stripped > 0 {
                    info!(
                        upto = p.upto,
                        deleted = p.deleted,
                        stripped = p.stripped,
                        "change log pruned"
                    );
                }
                if p.waiting_for != waiting_for {
                    if !p.waiting_for.is_empty() {
                        info!(regions = ?p.waiting_for, "change log pruning waits for regions that have reported no durable position (mesh.forget_peer drops one for good)");
                    }
                    waiting_for = p.waiting_for;
                }
            }
            Err(e) => warn!(error = %e, "pruning the change log failed; retrying later"),
        }
        match tombstones::prune(c, &region, &peers, tombstone_retention).await {
            Ok(t) if t.deleted > 0 => {
                info!(
                    deleted = t.deleted,
                    frontier = t.frontier,
                    "tombstones pruned"
                );
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "pruning tombstones failed; retrying later"),
        }
    }
}

#[cfg(test)]
mod tests;
