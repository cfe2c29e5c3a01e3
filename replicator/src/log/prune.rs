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

use super::LogError;

/// Log rows pruned per transaction.
pub const CHUNK: i64 = 10_000;

/// The end of the next chunk above `$1`: the `$3`-th row's seq, or the horizon `$2`
/// when fewer rows are left.
const NEXT: &str = "SELECT CASE WHEN count(*) < $3 THEN $2 ELSE max(seq) END::int8
   FROM (SELECT seq FROM mesh.changelog WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3) s";

/// The horizon: the lowest durable position over the configured peers (`$1`) and
/// every region in `mesh.peer_acks`; NULL while any of them has reported none.
const HORIZON: &str =
    "SELECT CASE WHEN bool_or(a.peer IS NULL) THEN NULL ELSE min(a.durable_seq) END::int8,
        (SELECT pruned_upto FROM mesh.log_prune)
   FROM (SELECT unnest($1::text[]) AS peer UNION SELECT peer FROM mesh.peer_acks) p
   LEFT JOIN mesh.peer_acks a USING (peer)";

/// One chunk, `$1` region, `$2` the previous `pruned_upto`, `$3` the new one: own
/// events deleted but the newest, others stripped; returns both counts.
const CHUNK_SQL: &str =
    "WITH newest AS (SELECT max(seq) AS seq FROM mesh.changelog WHERE origin = $1),
     del AS (DELETE FROM mesh.changelog
              WHERE seq > $2 AND seq <= $3 AND origin = $1 AND seq < (SELECT seq FROM newest)
              RETURNING 1),
     strip AS (UPDATE mesh.changelog SET changes = '[]', tags = '{}'
                WHERE seq > $2 AND seq <= $3 AND origin <> $1 AND changes::text <> '[]'
                RETURNING 1),
     mark AS (UPDATE mesh.log_prune SET pruned_upto = $3, pruned_at = now() RETURNING 1)
SELECT (SELECT count(*) FROM del), (SELECT count(*) FROM strip), (SELECT count(*) FROM mark)";

/// What one [`prune`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// `pruned_upto` afterwards.
    pub upto: i64,
    /// Own events deleted and other regions' events stripped.
    pub deleted: u64,
    pub stripped: u64,
}

/// Prunes the log of `region` up to the horizon over `peers` (the regions this node
/// pulls from; every one of them is assumed to pull from it too). Returns `None`
/// when the horizon has not moved.
pub async fn prune(
    client: &Client,
    region: &str,
    peers: &[String],
) -> Result<Option<Pruned>, LogError> {
    prune_in_chunks(client, region, peers, CHUNK).await
}

async fn prune_in_chunks(
    client: &Client,
    region: &str,
    peers: &[String],
    chunk: i64,
) -> Result<Option<Pruned>, LogError> {
    let row = client.query_one(HORIZON, &[&peers]).await?;
    let (horizon, mut upto): (Option<i64>, i64) = (row.get(0), row.get(1));
    let Some(horizon) = horizon.filter(|h| *h > upto) else {
        return Ok(None);
    };
    let mut out = Pruned::default();
    while upto < horizon {
        let next: i64 = client
            .query_one(NEXT, &[&upto, &horizon, &chunk])
            .await?
            .get(0);
        let r = client
            .query_one(CHUNK_SQL, &[&region, &upto, &next])
            .await?;
        out.deleted += r.get::<_, i64>(0) as u64;
        out.stripped += r.get::<_, i64>(1) as u64;
        upto = next;
        if upto < horizon {
            info!(upto, horizon, "pruning the change log");
        }
    }
    out.upto = upto;
    Ok(Some(out))
}

/// Prunes every `every` until `stop`, on its own connection to `url`.
pub async fn run(
    url: String,
    region: String,
    peers: Vec<String>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client: Option<Client> = None;
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
            Ok(Some(p)) => info!(
                upto = p.upto,
                deleted = p.deleted,
                stripped = p.stripped,
                "change log pruned"
            ),
            Ok(None) => {}
            Err(e) => warn!(error = %e, "pruning the change log failed; retrying later"),
        }
    }
}

#[cfg(test)]
mod tests;
