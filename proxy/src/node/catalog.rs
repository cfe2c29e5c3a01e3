//! A node's first look at its regional database: waiting for a database that cannot be
//! reached yet, finding the `mesh` catalog (or waiting for `pgmesh init` to install it),
//! and upgrading it before capture starts.

use std::time::{Duration, Instant};

use pgmesh_replicator::catalog::{self, CatalogError};
use pgmesh_replicator::link::backoff::Backoff;
use tokio::sync::watch;
use tokio_postgres::Client;
use tracing::{debug, info, warn};

/// The first wait for an unreachable database, and the longest.
const REACH_BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(5));
/// How often the wait for an unreachable database is logged again.
const REACH_LOG_EVERY: Duration = Duration::from_secs(30);
/// How often a node whose database has no catalog looks for it again.
pub const INIT_POLL: Duration = Duration::from_secs(2);

/// Whether the mesh catalog is installed.
const CATALOG_INSTALLED: &str = "SELECT to_regclass('mesh.changelog') IS NOT NULL";

/// Whether `pgmesh init` has finished for region `$1`: the catalog and the region's
/// slot, which init creates last.
const INIT_DONE: &str = "SELECT to_regclass('mesh.changelog') IS NOT NULL
     AND EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)";

/// What a node found in its regional database.
pub enum Found {
    /// The catalog, with a connection to upgrade it on.
    Catalog(Client),
    /// A database without the catalog: capture waits for `pgmesh init`.
    NoCatalog,
    /// A database that refused this node's session: no capture.
    Refused(CatalogError),
}

/// Connects and runs `check` (one boolean); `Err` only when the database cannot be
/// reached.
async fn look(
    url: &str,
    check: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Found, CatalogError> {
    let c = match catalog::connect(url).await {
        Ok(c) => c,
        Err(e) if e.is_unreachable() => return Err(e),
        Err(e) => return Ok(Found::Refused(e)),
    };
    match c.query_one(check, params).await {
        Ok(r) if r.get::<_, bool>(0) => Ok(Found::Catalog(c)),
        Ok(_) => Ok(Found::NoCatalog),
        // Reached, then lost (a server shutting down): wait, as for a database that
        // cannot be reached.
        Err(source) => Err(CatalogError::Connect {
            url: catalog::redact(url),
            source,
        }),
    }
}

/// What the regional database holds, once it can be reached.
///
/// A database that cannot be reached at all (down, starting up, out of connection
/// slots) is waited for, with backoff, and the wait is logged every 30 s: a node
/// started before its database (a reboot, a container that comes up first) must
/// still capture once the database is up, not run as a proxy only until restarted.
pub async fn find(url: &str) -> Found {
    let (base, cap) = REACH_BACKOFF;
    let mut backoff = Backoff::new(base, cap);
    let started = Instant::now();
    let mut logged: Option<Instant> = None;
    let found = loop {
        match look(url, CATALOG_INSTALLED, &[]).await {
            Ok(Found::Refused(e)) => {
                warn!(error = %e, "the regional database refused this node's session; running as a proxy only");
                break Found::Refused(e);
            }
            Ok(found) => break found,
            Err(e) => {
                if logged.is_none_or(|t| t.elapsed() >= REACH_LOG_EVERY) {
                    warn!(
                        error = %e,
                        waited_secs = started.elapsed().as_secs(),
                        "cannot reach the regional database; waiting for it (the node starts once it answers)"
                    );
                    logged = Some(Instant::now());
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    };
    if logged.is_some() {
        info!(
            waited_secs = started.elapsed().as_secs(),
            "reached the regional database"
        );
    }
    found
}

/// Waits until `pgmesh init` has run for `region` (looking every [`INIT_POLL`]), and
/// returns a connection to its catalog; `None` once `stop` turns true. A database
/// that cannot be reached, or refuses this node, meanwhile is only looked at again.
pub async fn wait_for_init(
    url: &str,
    region: &str,
    stop: &mut watch::Receiver<bool>,
) -> Option<Client> {
    let slot = catalog::slot_name(region);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(INIT_POLL) => {}
            _ = stop.changed() => return None,
        }
        if *stop.borrow() {
            return None;
        }
        match look(url, INIT_DONE, &[&slot]).await {
            Ok(Found::Catalog(c)) => return Some(c),
            Ok(Found::NoCatalog) => {}
            Ok(Found::Refused(e)) => {
                debug!(error = %e, "the regional database refused this node's session; looking again")
            }
            Err(e) => debug!(error = %e, "cannot reach the regional database; looking again"),
        }
    }
}

/// Applies the migrations a newer binary brings to the catalog it finds (idempotent,
/// under an advisory lock, as `pgmesh init` does). An older binary stops here.
pub async fn upgrade(c: &mut Client) -> Result<(), CatalogError> {
    let applied = catalog::migrate(c).await?;
    if !applied.is_empty() {
        info!(versions = ?applied, "upgraded the mesh catalog");
    }
    Ok(())
}
