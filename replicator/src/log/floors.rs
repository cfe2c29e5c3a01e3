//! Region floors: how a region that does not write still lets the frontier move.
//!
//! The tombstone frontier ([`super::tombstones`]) needs, for every other region, an
//! HLC below which none of that region's events can still arrive. The newest of its
//! events applied here is one; a region that has not written for a while gives an
//! old one, and a region that never wrote gives none, which held pruning back
//! everywhere. A floor is a second such bound, kept in `mesh.region_floors`:
//!
//! - **Own region.** At every status interval the capture leader reads the WAL
//!   insert position and the database clock together (a mark). Once it has logged
//!   every commit below that position, with nothing assembled waiting for the log,
//!   it raises its region's floor to the mark's clock less two seconds, and at least
//!   one above the last final HLC. It first raises the HLC
//!   below which it never assigns a final HLC again to just under the floor (final
//!   HLCs are `max(stamp, commit_ts, previous + 1)`, and `previous` becomes at least
//!   `floor - 1`), writes it with a synchronous commit, and a new leader starts
//!   from the stored floor. So every event of the region below its floor is in its
//!   log already, and no clock has to be right for that. The transactions whose
//!   commit records come after the mark committed after its clock, so their commit
//!   times are above the floor and stay their HLCs: the floor changes no conflict's
//!   winner.
//! - **Other regions.** A link server advertises, in a heartbeat, the floors of the
//!   regions whose events it ships to that peer (its own, and in hub mode the others
//!   but the peer's), capped below its pending dead letters of each region. It reads
//!   them together with its log head and sends them only once it has shipped
//!   everything up to that head; the peer applies batches in order, so when it adopts
//!   them it holds every event below them. By induction over relays, a floor anywhere
//!   means every event of that region below it is in that node's log.
//!
//! Floors only rise. A link that is paused or down carries none, so a region cut
//! off holds the frontier at what was last heard from it, as before.

use std::collections::BTreeMap;

use tokio_postgres::Client;

use super::{LogError, ShipFilter};
use crate::hlc::Hlc;

/// What a link server advertises (`$1` server region, `$2` relay, `$3` peer region):
/// the log head, then the regions and floors the peer may adopt once it has
/// everything up to that head, read in one snapshot. Regions forgotten here
/// (`mesh.forget_peer`) are not passed on.
pub const ADVERTISED: &str = "WITH f AS (
        SELECT r.region,
               least(r.floor_hlc,
                     coalesce((SELECT min(d.hlc) - 1 FROM mesh.dead_letters d
                               WHERE d.origin = r.region AND d.status IN ('pending', 'retry')),
                              r.floor_hlc)) AS floor_hlc
        FROM mesh.region_floors r
        WHERE r.region <> $3 AND (r.region = $1 OR $2)
          AND r.region NOT IN (SELECT name FROM mesh.mesh_regions WHERE forgotten))
SELECT (SELECT coalesce(max(seq), 0) FROM mesh.changelog)::int8,
       coalesce((SELECT array_agg(region ORDER BY region) FROM f), '{}'),
       coalesce((SELECT array_agg(floor_hlc ORDER BY region) FROM f), '{}')";

/// Raises floors (`$1` regions, `$2` floors), never lowering one (nor writing one
/// that stays), skipping region `$3` (this region, when the floors came from a peer;
/// `''` otherwise).
pub const RAISE: &str = "INSERT INTO mesh.region_floors (region, floor_hlc)
     SELECT r, f FROM unnest($1::text[], $2::int8[]) AS u(r, f) WHERE r <> $3
     ON CONFLICT (region) DO UPDATE SET floor_hlc = EXCLUDED.floor_hlc, updated_at = now()
        WHERE EXCLUDED.floor_hlc > mesh.region_floors.floor_hlc";

/// Floors as a peer receives them: region to floor HLC.
pub type FloorMap = BTreeMap<String, i64>;

/// Floors valid once a peer has everything in the log up to `head`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Floors {
    pub head: i64,
    pub floors: FloorMap,
}

/// What a link server with `filter` advertises now (see [`ADVERTISED`]).
pub async fn advertised(c: &Client, filter: &ShipFilter) -> Result<Floors, LogError> {
    let row = c
        .query_one(
            ADVERTISED,
            &[&filter.server_region, &filter.relay, &filter.peer_region],
        )
        .await?;
    let regions: Vec<String> = row.get(1);
    let floors: Vec<i64> = row.get(2);
    Ok(Floors {
        head: row.get(0),
        floors: regions.into_iter().zip(floors).collect(),
    })
}

/// Adopts the floors a peer advertised, except any of `own` region's.
pub async fn adopt(c: &Client, own: &str, floors: &FloorMap) -> Result<(), LogError> {
    if floors.is_empty() {
        return Ok(());
    }
    let (regions, values): (Vec<&str>, Vec<i64>) =
        floors.iter().map(|(r, f)| (r.as_str(), *f)).unzip();
    c.execute(RAISE, &[&regions, &values, &own]).await?;
    Ok(())
}

/// The floor of `region` stored here (capture of that region starts above it).
pub async fn stored(c: &Client, region: &str) -> Result<Option<Hlc>, LogError> {
    Ok(c.query_opt(
        "SELECT floor_hlc FROM mesh.region_floors WHERE region = $1",
        &[&region],
    )
    .await?
    .map(|r| Hlc::from_u64(r.get::<_, i64>(0) as u64)))
}

/// The floor capture raises its region's to: `clock_ms` (capture passes the
/// database clock of a mark it has logged everything below, less a trail), and at
/// least one above `previous`, the last final HLC.
pub fn own_floor(previous: Hlc, clock_ms: u64) -> Hlc {
    previous
        .saturating_next()
        .max(Hlc::from_parts(clock_ms.min(Hlc::MAX_PHYSICAL_MS), 0))
}

#[cfg(test)]
#[path = "floors_tests.rs"]
mod tests;
