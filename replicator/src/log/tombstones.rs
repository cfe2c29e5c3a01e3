//! Pruning tombstones (the versions deleted rows leave in `mesh.row_versions`)
//! below this region's frontier.
//!
//! A tombstone is there so that a change older than the delete, arriving later,
//! loses to it. Once no change older than the tombstone can still arrive here it
//! decides nothing: an incoming change wins over a missing version exactly as it
//! wins over an older tombstone, so the rows end the same. This region applies each
//! origin's events in that origin's log order, which is HLC order, so every event of
//! origin P not applied here yet, and every event P writes later, has an HLC above
//! the highest of P's events in this region's change log (duplicates are still
//! recognised: pruned log rows keep their ids). The frontier is the lowest of those
//! over every remote origin (each configured peer and each origin in the log), and
//! below the lowest pending dead letter, which a retry would apply late. A
//! configured peer with no event (and no floor) here yet holds it at nothing. This region's own
//! writes never arrive here as events, so they do not count.
//!
//! A region that has not written for a while would hold the frontier at its last
//! event, and one that never wrote at nothing. Its floor
//! ([`super::floors`]), heard in its links' heartbeats, bounds its events still to
//! arrive just the same, so the higher of the two counts.
//!
//! Besides its configured peers and the origins in its log, a region knows every
//! region its peers know (`mesh.mesh_regions`, told in each link's welcome: a spoke
//! learns the other spokes from its hub); each counts, and holds the frontier at
//! nothing until one of its events or its floor arrives here, unless `mesh.forget_peer` marks it
//! gone for good. A region no node here has heard of yet (one added to the mesh a
//! moment ago) is not counted: tombstones are also kept for a retention period (an
//! hour by default), which covers its changes unless they take longer than that to
//! arrive. Live rows' versions are kept, and so are TRUNCATE watermarks.

use std::time::Duration;

use tokio_postgres::Client;

use super::versions::WATERMARK;
use super::LogError;

/// Tombstones deleted per statement.
pub const CHUNK: i64 = 10_000;

/// The frontier (`$1` configured peers, `$2` this region), recorded in
/// `mesh.log_prune`: the lowest, over remote regions (configured peers, origins in
/// the log, `mesh.mesh_regions` and `mesh.region_floors`, less the forgotten), of
/// the highest HLC applied here or the region's floor, whichever is higher; NULL
/// with no remote region and 0 when one has neither; then the regions with neither. Distinct origins come from the `(origin, hlc)` index, one
/// probe each.
const FRONTIER: &str = "WITH RECURSIVE o(origin) AS (
        SELECT min(origin) FROM mesh.changelog
      UNION ALL
        SELECT (SELECT min(c.origin) FROM mesh.changelog c WHERE c.origin > o.origin)
        FROM o WHERE o.origin IS NOT NULL),
     origins AS (SELECT origin FROM o WHERE origin IS NOT NULL
                 UNION SELECT unnest($1::text[])
                 UNION SELECT name FROM mesh.mesh_regions
                 UNION SELECT region FROM mesh.region_floors),
     applied AS (SELECT origin,
                        greatest((SELECT max(c.hlc) FROM mesh.changelog c WHERE c.origin = origins.origin),
                                 (SELECT f.floor_hlc FROM mesh.region_floors f
                                  WHERE f.region = origins.origin)) AS hlc
                 FROM origins
                 WHERE origin <> $2
                   AND origin NOT IN (SELECT name FROM mesh.mesh_regions WHERE forgotten)),
     f AS (SELECT least((SELECT CASE WHEN bool_or(hlc IS NULL) THEN 0 ELSE min(hlc) END FROM applied),
                        (SELECT min(hlc) - 1 FROM mesh.dead_letters
                          WHERE status IN ('pending', 'retry')))::int8 AS frontier,
                  coalesce((SELECT array_agg(origin ORDER BY origin) FROM applied WHERE hlc IS NULL),
                           '{}') AS waiting)
UPDATE mesh.log_prune SET tombstone_frontier = f.frontier, tombstones_checked_at = now()
FROM f RETURNING f.frontier, f.waiting";

/// Deletes up to `$2` tombstones with an HLC below both the frontier `$1` and the
/// HLC of `$3` milliseconds ago (the retention), counted in `mesh.log_prune`;
/// returns how many. The condition is checked again on the row itself: one that
/// apply or capture turned into a live version meanwhile stays.
static DELETE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH b AS (SELECT least($1::int8,
                        greatest((extract(epoch FROM clock_timestamp()) * 1000)::int8 - $3::int8, 0) << 16) AS below),
              d AS (DELETE FROM mesh.row_versions v USING b
                    WHERE v.ctid = ANY (ARRAY(SELECT ctid FROM mesh.row_versions, b
                                              WHERE deleted AND hlc < b.below AND pk <> '{WATERMARK}'
                                              LIMIT $2))
                      AND v.deleted AND v.hlc < b.below AND v.pk <> '{WATERMARK}'
                    RETURNING 1),
              n AS (SELECT count(*) AS n FROM d),
              s AS (UPDATE mesh.log_prune SET tombstones_pruned = tombstones_pruned + n.n FROM n)
         SELECT n FROM n"
    )
});

/// What one [`prune`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TombstonesPruned {
    /// The frontier found (None: no remote origin, nothing to prune).
    pub frontier: Option<i64>,
    /// Tombstones deleted: those below both the frontier and the retention bound.
    pub deleted: u64,
    /// Other regions (configured or heard of) with no event here yet, which hold the
    /// frontier at nothing.
    pub waiting_for: Vec<String>,
}

/// The frontier of `region`, whose configured peers are `peers` (see the module
/// docs), and the regions that hold it at nothing.
async fn frontier(
    client: &Client,
    region: &str,
    peers: &[String],
) -> Result<(Option<i64>, Vec<String>), LogError> {
    let row = client.query_one(FRONTIER, &[&peers, &region]).await?;
    Ok((row.get(0), row.get(1)))
}

/// Deletes the tombstones below the frontier that are older than `retention`.
pub async fn prune(
    client: &Client,
    region: &str,
    peers: &[String],
    retention: Duration,
) -> Result<TombstonesPruned, LogError> {
    let (frontier, waiting_for) = frontier(client, region, peers).await?;
    let mut out = TombstonesPruned {
        frontier,
        deleted: 0,
        waiting_for,
    };
    let Some(frontier) = frontier.filter(|f| *f > 0) else {
        return Ok(out);
    };
    let ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    loop {
        let n: i64 = client
            .query_one(DELETE.as_str(), &[&frontier, &CHUNK, &ms])
            .await?
            .get(0);
        out.deleted += n as u64;
        if n < CHUNK {
            return Ok(out);
        }
    }
}

#[cfg(test)]
#[path = "tombstones_tests.rs"]
mod tests;
