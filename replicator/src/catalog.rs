//! The `mesh` catalog in a regional database: prerequisite checks, migrations, the
//! publication and the replication slot. This is what `pgmesh init` does.
//!
//! Everything here is idempotent: running it twice changes nothing the second time,
//! and a newer binary upgrades the catalog by applying only the migrations it lacks.
//! It never drops user data and never installs anything but plain SQL objects in
//! schema `mesh` (no extension, no superuser-only feature it cannot do without).

use std::time::Duration;

use pgmesh_sql::migrations::{self, MIGRATIONS};
use thiserror::Error;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use tracing::warn;

/// Name of the publication capture reads.
pub const PUBLICATION: &str = "pgmesh";
/// Advisory-lock key that serialises migrations (`'pgmesh'` as an integer).
const MIGRATION_LOCK: i64 = 0x7067_6d65_7368_0001;
/// How long one migration waits for a lock before it lets go and tries again, so
/// that the sessions queued behind its lock request (capture, apply, clients on
/// `mesh` tables) are not held up by a transaction it waits for.
const MIGRATION_LOCK_WAIT_MS: u64 = 2_000;
/// How long [`migrate`] keeps trying before [`CatalogError::MigrationLocked`].
pub const MIGRATION_DEADLINE: Duration = Duration::from_secs(120);

/// Errors of catalog setup.
#[derive(Debug, Error)]
pub enum CatalogError {
    #[error("cannot connect to {url}: {}", pg_error(.source))]
    Connect {
        url: String,
        source: tokio_postgres::Error,
    },
    #[error("cannot connect to {url}: {source}")]
    Tls {
        url: String,
        source: crate::pgtls::PgTlsError,
    },
    #[error("the database is not ready for pgmesh:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Prerequisites(Vec<String>),
    #[error(
        "catalog version {found} is newer than this binary supports ({supported}); upgrade pgmesh"
    )]
    TooNew { found: i32, supported: i32 },
    #[error("invalid region name {0:?}: use lowercase letters, digits and underscores (not \"localhost\")")]
    RegionName(String),
    #[error("{0} is in schema mesh, pgmesh's own catalog, which never replicates (capture logs into it): leave it out of --schemas and --tables")]
    MeshSelected(String),
    #[error(
        "the catalog migration waited {0:?} for locks on schema mesh that other sessions hold \
         (SQLSTATE 55P03): end the transactions holding them (see pg_locks) and run it again"
    )]
    MigrationLocked(Duration),
    #[error(
        "schema mesh exists and is not pgmesh's catalog (it has {0} objects and no \
         mesh.schema_versions; SQLSTATE 42P06): pgmesh keeps its catalog in schema mesh, so \
         rename that schema before pgmesh init"
    )]
    ForeignSchema(i64),
    #[error("{}", pg_error(.0))]
    Sql(#[from] tokio_postgres::Error),
}

impl CatalogError {
    /// Whether the database could not be reached at all: the server answered that it
    /// is starting up, shutting down or out of connection slots, or the connection
    /// was refused, reset, cut or timed out. Anything else (authentication, a missing
    /// password or database, TLS) is the server or this client refusing, and waiting
    /// would not change it.
    pub fn is_unreachable(&self) -> bool {
        let CatalogError::Connect { source, .. } = self else {
            return false;
        };
        if let Some(db) = source.as_db_error() {
            let code = db.code().code();
            return code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300");
        }
        if source.is_closed() {
            return true;
        }
        use std::io::ErrorKind::*;
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source);
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                return matches!(
                    io.kind(),
                    ConnectionRefused
                        | ConnectionReset
                        | ConnectionAborted
                        | NotConnected
                        | TimedOut
                        | HostUnreachable
                        | NetworkUnreachable
                        | AddrNotAvailable
                        | BrokenPipe
                        | UnexpectedEof
                );
            }
            cause = e.source();
        }
        false
    }
}

/// Which tables replicate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableSelection {
    /// Every table in these schemas, including tables created later.
    Schemas(Vec<String>),
    /// Exactly these tables (`schema.table` or `table` in public).
    Tables(Vec<String>),
}

impl TableSelection {
    /// Refuses a selection that reaches into schema `mesh`: publishing the change log
    /// would make every append a change to capture, and so another append.
    pub fn check(&self) -> Result<(), CatalogError> {
        let unquote = |s: &str| s.trim().trim_matches('"').to_string();
        let bad = match self {
            TableSelection::Schemas(s) => s.iter().find(|s| unquote(s) == "mesh"),
            TableSelection::Tables(t) => t
                .iter()
                .find(|t| t.split_once('.').is_some_and(|(s, _)| unquote(s) == "mesh")),
        };
        match bad {
            Some(b) => Err(CatalogError::MeshSelected(b.clone())),
            None => Ok(()),
        }
    }
}

impl Default for TableSelection {
    fn default() -> Self {
        TableSelection::Schemas(vec!["public".into()])
    }
}

/// What `init` found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    pub catalog_version: i32,
    pub migrations_applied: Vec<i32>,
    pub slot: String,
    pub slot_created: bool,
    pub publication_tables: i64,
}

/// Replication slot name of a region.
pub fn slot_name(region: &str) -> String {
    format!("pgmesh_{region}")
}

/// The stable small integer that breaks HLC ties for a region, derived from its name
/// (FNV-1a folded to 15 bits) so every region computes the same value.
pub fn origin_id_for(region: &str) -> i16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in region.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    ((h ^ (h >> 15)) & 0x7fff) as i16
}

/// Checks a region name: it becomes part of slot and topic names.
pub fn validate_region(region: &str) -> Result<(), CatalogError> {
    // `localhost` is a name every development certificate carries for loopback.
    let ok = !region.is_empty()
        && region != "localhost"
        && region.len() <= 40
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(CatalogError::RegionName(region.into()))
    }
}

/// A database error with its SQLSTATE, message and detail (tokio-postgres's own
/// Display says only "db error").
pub fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => {
            let mut s = format!("{} ({})", d.message(), d.code().code());
            if let Some(detail) = d.detail() {
                s.push_str(": ");
                s.push_str(detail);
            }
            s
        }
        None => {
            let mut s = e.to_string();
            if let Some(src) = std::error::Error::source(e) {
                s.push_str(": ");
                s.push_str(&src.to_string());
            }
            s
        }
    }
}

/// Session setting of capture's append session and of apply sessions: plan each
/// prepared statement once. Their statements take whole batches as array parameters
/// and look rows up through them (`unnest($1::text[]) ... LATERAL (... WHERE key =
/// k.key LIMIT 1)`). With the default `plan_cache_mode`, PostgreSQL keeps choosing a
/// custom plan for such a statement (its estimate sees the array's real length, the
/// generic plan's assumes 100 elements), so it planned the statement again at every
/// execution: 0.066 ms of planning for a 0.11 ms lookup of 7 row versions, against
/// 0.008 ms with a generic plan, which is the same nested loop over the unique index.
/// Their statements find rows by a unique key (versions, applied events, row locks and
/// writes) or by a key's maximum (capture's resume point); with EXPLAIN on PostgreSQL
/// 15 the generic plans of those shapes use the same indexes as the custom ones.
pub const GENERIC_PLANS: &str = "SET plan_cache_mode = force_generic_plan";

/// Opens a plain SQL connection and drives it in the background.
pub async fn connect(url: &str) -> Result<Client, CatalogError> {
    connect_as(url, "pgmesh").await
}

/// [`connect`], reporting `application_name` = `role` unless the URL sets one, so a
/// DBA can tell pgmesh's sessions apart in `pg_stat_activity`.
pub async fn connect_as(url: &str, role: &str) -> Result<Client, CatalogError> {
    let bad = |source| CatalogError::Connect {
        url: redact(url),
        source,
    };
    let (mut config, tls) = crate::pgtls::pg_config(url).map_err(|source| CatalogError::Tls {
        url: redact(url),
        source,
    })?;
    if config.get_application_name().is_none() {
        config.application_name(role);
    }
    let (client, conn) = config.connect(tls).await.map_err(bad)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "catalog connection closed");
        }
    });
    // The server must notice when this node vanishes, too (see `keepalive`).
    client
        .execute(crate::keepalive::SERVER, &[])
        .await
        .map_err(bad)?;
    Ok(client)
}

/// A URL with its password replaced, for messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// Lists every missing prerequisite, each naming the setting to change.
pub async fn check_prerequisites(c: &Client, region: &str) -> Result<(), CatalogError> {
    let mut missing = Vec::new();
    let row = c
        .query_one(
            "SELECT current_setting('wal_level'),
                    current_setting('max_replication_slots')::int
                      - (SELECT count(*) FROM pg_replication_slots WHERE slot_name <> $1)::int,
                    current_setting('max_wal_senders')::int
                      - (SELECT count(*) FROM pg_stat_replication)::int,
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)
                      OR EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = 'rds_replication'
                                 AND pg_has_role(current_user, r.oid, 'member'))",
            &[&slot_name(region)],
        )
        .await?;
    let wal_level: String = row.get(0);
    if wal_level != "logical" {
        missing.push(format!(
            "wal_level is '{wal_level}': set wal_level = logical (on RDS: rds.logical_replication = 1; on Cloud SQL: cloudsql.logical_decoding = on) and restart PostgreSQL"
        ));
    }
    let free_slots: i32 = row.get(1);
    if free_slots < 1 {
        missing.push(
            "no free replication slot: raise max_replication_slots and restart PostgreSQL".into(),
        );
    }
    let free_senders: i32 = row.get(2);
    if free_senders < 1 {
        missing.push("no free WAL sender: raise max_wal_senders and restart PostgreSQL".into());
    }
    let can_replicate: Option<bool> = row.get(3);
    if can_replicate != Some(true) {
        missing.push(
            "the role lacks the REPLICATION privilege: ALTER ROLE <user> REPLICATION (on RDS: GRANT rds_replication TO <user>)"
                .into(),
        );
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CatalogError::Prerequisites(missing))
    }
}

/// Applies the migrations the database lacks; returns the versions applied.
///
/// Each migration commits on its own, under the migration lock, so a long upgrade
/// releases each migration's table locks as it goes instead of holding them all to
/// the end; one that fails leaves the versions before it applied, and the next run
/// goes on from there. A migration that waits more than 2 s for a lock lets go and
/// tries again, for up to [`MIGRATION_DEADLINE`].
pub async fn migrate(c: &mut Client) -> Result<Vec<i32>, CatalogError> {
    migrate_within(c, MIGRATION_DEADLINE).await
}

/// [`migrate`], trying for up to `deadline`.
pub async fn migrate_within(c: &mut Client, deadline: Duration) -> Result<Vec<i32>, CatalogError> {
    let give_up = tokio::time::Instant::now() + deadline;
    let mut applied = Vec::new();
    loop {
        match migrate_next(c, &mut applied).await {
            Ok(true) => {}
            Ok(false) => return Ok(applied),
            Err(CatalogError::Sql(e)) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                if tokio::time::Instant::now() >= give_up {
                    return Err(CatalogError::MigrationLocked(deadline));
                }
                warn!(
                    "a catalog migration waits for a lock another session holds on schema mesh; trying again"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Applies the next migration the database lacks, if any (`false`: none), and adds
/// its version to `applied`.
async fn migrate_next(c: &mut Client, applied: &mut Vec<i32>) -> Result<bool, CatalogError> {
    let tx = c.transaction().await?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = {MIGRATION_LOCK_WAIT_MS}"
    ))
    .await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let current = catalog_version(&tx).await?;
    if current > migrations::latest() {
        return Err(CatalogError::TooNew {
            found: current,
            supported: migrations::latest(),
        });
    }
    // Past what this loop applied too, so a file that failed to record its
    // version cannot make it loop.
    let done = current.max(applied.last().copied().unwrap_or(0));
    let Some(m) = MIGRATIONS.iter().find(|m| m.version > done) else {
        return Ok(false);
    };
    tx.batch_execute(m.sql).await?;
    tx.commit().await?;
    applied.push(m.version);
    Ok(true)
}

/// The catalog's version: the highest in `mesh.schema_versions`, 0 without one.
async fn catalog_version(tx: &tokio_postgres::Transaction<'_>) -> Result<i32, CatalogError> {
    let exists: bool = tx
        .query_one(
            "SELECT to_regclass('mesh.schema_versions') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        // Not ours, unless empty (say, created by hand for pgmesh to fill).
        let objects: i64 = tx
            .query_opt(
                "SELECT (SELECT count(*) FROM pg_class WHERE relnamespace = n.oid)
                      + (SELECT count(*) FROM pg_proc WHERE pronamespace = n.oid)
                      + (SELECT count(*) FROM pg_type WHERE typnamespace = n.oid
                                                       AND typrelid = 0 AND typelem = 0)
                   FROM (SELECT to_regnamespace('mesh') AS oid) n WHERE n.oid IS NOT NULL",
                &[],
            )
            .await?
            .map_or(0, |r| r.get(0));
        if objects > 0 {
            return Err(CatalogError::ForeignSchema(objects));
        }
        return Ok(0);
    }
    Ok(tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM mesh.schema_versions",
            &[],
        )
        .await?
        .get(0))
}

/// Registers the local region (idempotent).
pub async fn register_region(c: &Client, region: &str) -> Result<(), CatalogError> {
    c.execute(
        "INSERT INTO mesh.regions (name, origin_id, is_local, init_txid) VALUES ($1, $2, true, txid_current())
         ON CONFLICT (name) DO UPDATE SET is_local = true,
             init_txid = coalesce(mesh.regions.init_txid, excluded.init_txid)",
        &[&region, &origin_id_for(region)],
    )
    .await?;
    Ok(())
}

/// Creates or updates the publication for the selection. Falls back to an explicit
/// table list when the role may not publish whole schemas (PostgreSQL 15 reserves
/// `FOR TABLES IN SCHEMA` to superusers). Returns the number of published tables.
pub async fn ensure_publication(c: &Client, sel: &TableSelection) -> Result<i64, CatalogError> {
    let exists: bool = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)",
            &[&PUBLICATION],
        )
        .await?
        .get(0);
    let verb = if exists {
        format!("ALTER PUBLICATION {PUBLICATION} SET")
    } else {
        format!("CREATE PUBLICATION {PUBLICATION} FOR")
    };
    let tables = match sel {
        TableSelection::Schemas(schemas) => {
            let list = schemas
                .iter()
                .map(|s| quote_ident(s))
                .collect::<Vec<_>>()
                .join(", ");
            match c
                .batch_execute(&format!("{verb} TABLES IN SCHEMA {list}"))
                .await
            {
                Ok(()) => None,
                Err(e)
                    if e.code()
                        == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) =>
                {
                    let rows = c
                        .query(
                            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables
                             WHERE schemaname = ANY($1) ORDER BY 1",
                            &[schemas],
                        )
                        .await?;
                    Some(
                        rows.iter()
                            .map(|r| r.get::<_, String>(0))
                            .collect::<Vec<_>>(),
                    )
                }
                Err(e) => return Err(e.into()),
            }
        }
        TableSelection::Tables(t) => Some(t.iter().map(|t| qualify(t)).collect()),
    };
    if let Some(tables) = tables {
        if tables.is_empty() && !exists {
            c.batch_execute(&format!("CREATE PUBLICATION {PUBLICATION}"))
                .await?;
        } else if !tables.is_empty() {
            c.batch_execute(&format!("{verb} TABLE {}", tables.join(", ")))
                .await?;
        }
    }
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = $1",
            &[&PUBLICATION],
        )
        .await?
        .get(0);
    Ok(n)
}

/// Creates the region's logical slot (pgoutput) if it does not exist. Returns true
/// when it was created now.
pub async fn ensure_slot(c: &Client, region: &str) -> Result<bool, CatalogError> {
    let slot = slot_name(region);
    let exists: bool = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&slot],
        )
        .await?
        .get(0);
    if !exists {
        c.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await?;
    }
    Ok(!exists)
}

/// Everything `pgmesh init` does, in order.
pub async fn init(
    url: &str,
    region: &str,
    sel: &TableSelection,
) -> Result<InitReport, CatalogError> {
    validate_region(region)?;
    let mut c = connect(url).await?;
    sel.check()?;
    check_prerequisites(&c, region).await?;
    let applied = migrate(&mut c).await?;
    register_region(&c, region).await?;
    let publication_tables = ensure_publication(&c, sel).await?;
    let slot_created = ensure_slot(&c, region).await?;
    Ok(InitReport {
        catalog_version: migrations::latest(),
        migrations_applied: applied,
        slot: slot_name(region),
        slot_created,
        publication_tables,
    })
}

/// Double-quotes an identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn qualify(t: &str) -> String {
    match t.split_once('.') {
        Some((s, n)) => format!("{}.{}", quote_ident(s), quote_ident(n)),
        None => format!("public.{}", quote_ident(t)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_mesh_is_never_selected() {
        let schemas =
            |s: &[&str]| TableSelection::Schemas(s.iter().map(|x| x.to_string()).collect());
        let tables = |t: &[&str]| TableSelection::Tables(t.iter().map(|x| x.to_string()).collect());
        assert!(schemas(&["public", "app"]).check().is_ok());
        assert!(tables(&["public.t", "mesh_data.t", "mesh"]).check().is_ok());
        for bad in [
            schemas(&["public", "mesh"]),
            tables(&["t", "mesh.changelog"]),
            tables(&["\"mesh\".links"]),
        ] {
            let e = bad.check().unwrap_err();
            assert!(matches!(e, CatalogError::MeshSelected(_)), "{e}");
        }
    }

    #[test]
    fn origin_ids_are_stable_and_small() {
        assert_eq!(origin_id_for("us_east"), origin_id_for("us_east"));
        assert_ne!(origin_id_for("us_east"), origin_id_for("eu_west"));
        assert!(origin_id_for("x") >= 0);
    }

    #[test]
    fn region_names() {
        assert!(validate_region("eu_west_1").is_ok());
        for bad in ["", "EU", "a-b", "a b", &"x".repeat(41)] {
            assert!(validate_region(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(qualify("t"), "public.\"t\"");
        assert_eq!(qualify("s.T"), "\"s\".\"T\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
    }
}
