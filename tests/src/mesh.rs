//! pgmesh regions under test: `pgmesh init`, capture nodes, and what they logged.
//!
//! This module owns the pieces every capture test needs besides a cluster:
//! [`Region`] (a cluster, its region name and a direct admin connection) runs
//! the real `pgmesh init`, starts an in-process stamping proxy, an in-process
//! capture loop ([`CaptureNode`]) or the real `pgmesh run` binary, waits until
//! capture has made a WAL position durable, and reads `mesh.changelog` back
//! ([`LogEvent`]). The change log is read with plain SQL over its JSON, never
//! with pgmesh's own decoder, so a test checks what is stored, not what pgmesh
//! thinks it stored. [`drain_reference`] reads a `test_decoding` slot, the
//! independent reference of what PostgreSQL committed. This module never
//! asserts; tests do.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use pgmesh_proxy::node::{self, CaptureHandle};
use pgmesh_replicator::capture::{CaptureConfig, Role};
use tokio_postgres::Client;

use crate::client::CmdOutput;
use crate::cluster::{ClusterOptions, PgCluster};
use crate::node::{pgmesh_output, PgmeshProcess, ProxyNode};
use crate::wait::{wait_for, wait_until};

/// How long capture may take to catch up with a workload on a loaded machine.
pub const CAPTURE_TIMEOUT: Duration = Duration::from_secs(60);

/// One region: a real cluster, its pgmesh region name and a direct connection.
#[derive(Debug)]
pub struct Region {
    /// A direct (not proxied) superuser connection.
    pub admin: Client,
    pub name: String,
    pub cluster: PgCluster,
}

impl Region {
    /// Start a default cluster (`wal_level=logical`) for region `name`.
    pub async fn start(name: &str) -> Result<Region> {
        Self::start_with(name, ClusterOptions::default()).await
    }

    /// Start a cluster with `opts` for region `name`.
    pub async fn start_with(name: &str, opts: ClusterOptions) -> Result<Region> {
        crate::init_tracing();
        let cluster = PgCluster::start_async(opts).await?;
        let admin = cluster.connect().await?;
        Ok(Region {
            admin,
            name: name.to_string(),
            cluster,
        })
    }

    /// Start a region and run `pgmesh init` on it.
    pub async fn start_initialized(name: &str) -> Result<Region> {
        let region = Self::start(name).await?;
        region.init().await?.ok().context("pgmesh init")?;
        Ok(region)
    }

    /// The superuser URL of the regional database.
    pub fn url(&self) -> String {
        self.cluster.url("postgres")
    }

    /// Run the real `pgmesh init --upstream <url> --region <name>`.
    pub async fn init(&self) -> Result<CmdOutput> {
        pgmesh_output(&["init", "--upstream", &self.url(), "--region", &self.name]).await
    }

    /// The name of this region's capture slot.
    pub fn slot(&self) -> String {
        format!("pgmesh_{}", self.name)
    }

    /// An in-process proxy-only node of this region that stamps as `node`.
    pub async fn proxy(&self, node: &str) -> Result<ProxyNode> {
        let (region, node) = (self.name.clone(), node.to_string());
        ProxyNode::start_with(&self.cluster, move |c| {
            c.region = region;
            c.node = Some(node);
            c.stamping = true;
            c.capture = false;
        })
        .await
    }

    /// The capture loop of this region, in-process, as node `node`.
    pub fn capture(&self, node: &str) -> CaptureNode {
        let cfg = CaptureConfig::new(&self.url(), &self.name, node);
        CaptureNode {
            handle: node::spawn(cfg),
        }
    }

    /// The real binary: `pgmesh run --listen 127.0.0.1:0 --upstream <url>
    /// --region <name> --node <node>` (capture on), once it listens.
    pub async fn spawn_node(&self, node: &str) -> Result<PgmeshProcess> {
        PgmeshProcess::run(&self.cluster, &["--region", &self.name, "--node", node]).await
    }

    /// The server's `clock_timestamp()`, as text, to compare later rows with.
    pub async fn db_clock(&self) -> Result<String> {
        Ok(self
            .admin
            .query_one("SELECT clock_timestamp()::text", &[])
            .await?
            .get(0))
    }

    /// Wait until `mesh.node_state` says `node` took `role` (`leader`,
    /// `standby`) at or after the server time `since` (from [`Region::db_clock`]).
    pub async fn wait_node_role(&self, node: &str, role: &str, since: &str) -> Result<()> {
        self.wait_node_role_within(node, role, since, CAPTURE_TIMEOUT)
            .await
    }

    /// [`Region::wait_node_role`] with its own deadline.
    pub async fn wait_node_role_within(
        &self,
        node: &str,
        role: &str,
        since: &str,
        timeout: Duration,
    ) -> Result<()> {
        let what = format!("node {node} to become {role}");
        wait_for(timeout, &what, || async {
            let row = self
                .admin
                .query_opt(
                    "SELECT 1 FROM mesh.node_state
                     WHERE node = $1 AND role = $2 AND heartbeat >= $3::text::timestamptz",
                    &[&node, &role, &since],
                )
                .await?;
            Ok(row.map(|_| ()))
        })
        .await
    }

    /// `pg_current_wal_lsn()`, as text.
    pub async fn wal_lsn(&self) -> Result<String> {
        Ok(self
            .admin
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?
            .get(0))
    }

    /// Wait until capture confirmed the slot at or past `lsn`, which it only
    /// does once everything committed before `lsn` is durable in the log.
    pub async fn wait_captured(&self, lsn: &str) -> Result<()> {
        let slot = self.slot();
        let what = format!("capture to confirm {slot} past {lsn}");
        wait_until(CAPTURE_TIMEOUT, &what, || async {
            self.admin
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
        .await
    }

    /// Wait until everything committed so far is in the change log.
    pub async fn wait_caught_up(&self) -> Result<()> {
        let lsn = self.wal_lsn().await?;
        self.wait_captured(&lsn).await
    }

    /// The whole change log, in `seq` order.
    pub async fn changelog(&self) -> Result<Vec<LogEvent>> {
        read_changelog(&self.admin, 0).await
    }

    /// Create a `test_decoding` slot: from now on it records every committed
    /// change and logical message, the reference a test compares the log with.
    pub async fn create_reference_slot(&self, slot: &str) -> Result<()> {
        self.admin
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
                &[&slot],
            )
            .await
            .context("creating a test_decoding slot")?;
        Ok(())
    }
}

/// An in-process capture loop; dropping it stops the loop in the background.
#[derive(Debug)]
pub struct CaptureNode {
    handle: CaptureHandle,
}

impl CaptureNode {
    /// The current role.
    pub fn role(&self) -> Role {
        self.handle.role()
    }

    /// Wait until the role is `role`.
    pub async fn wait_role(&self, role: Role) -> Result<()> {
        let mut rx = self.handle.watch_role();
        tokio::time::timeout(CAPTURE_TIMEOUT, rx.wait_for(|r| *r == role))
            .await
            .with_context(|| format!("capture did not become {role:?} in time"))?
            .context("the capture task ended")?;
        Ok(())
    }

    /// Stop the loop and wait for it.
    pub async fn stop(self) {
        self.handle.stop().await;
    }
}

/// One row of `mesh.changelog`: one committed source transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEvent {
    pub seq: i64,
    pub origin: String,
    /// The final HLC, raw (48 bits of ms, 16 logical).
    pub hlc: u64,
    /// The commit LSN, as a number.
    pub source_lsn: u64,
    pub xid: i64,
    /// `commit_ts` in Unix milliseconds.
    pub commit_ts_ms: i64,
    pub stamped: bool,
    pub local_only: bool,
    /// The proxy's stamp (`tags`), when stamped.
    pub stamp: Option<StampTags>,
    pub changes: Vec<LogChange>,
}

/// The stamp fields kept in `tags`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StampTags {
    pub hlc: u64,
    pub region: String,
    pub node: String,
    pub user: String,
    pub app: String,
    pub addr: String,
    pub local: bool,
}

/// A column name and its value as PostgreSQL text (`None` is NULL).
pub type Column = (String, Option<String>);

/// One change inside an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChange {
    /// `schema.table`.
    pub table: String,
    /// `insert`, `update`, `delete`, `truncate`, `ddl`.
    pub op: String,
    pub pk: Vec<Column>,
    pub new: Option<Vec<Column>>,
    pub unchanged: Vec<String>,
    pub types: Vec<i64>,
    /// Every stored value (pk and new image) is a JSON string or null, never a
    /// JSON number or other type.
    pub values_are_text: bool,
}

impl LogChange {
    /// The key as `name=value,...` (`NULL` for nulls).
    pub fn pk_text(&self) -> String {
        columns_text(&self.pk)
    }

    /// The value of column `name` in the new image: `None` when the column is
    /// absent, `Some(None)` when it is NULL.
    pub fn new_value(&self, name: &str) -> Option<Option<String>> {
        let new = self.new.as_ref()?;
        new.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
    }
}

/// `name=value,...` of a list of columns.
pub fn columns_text(cols: &[Column]) -> String {
    cols.iter()
        .map(|(k, v)| format!("{k}={}", v.as_deref().unwrap_or("NULL")))
        .collect::<Vec<_>>()
        .join(",")
}

/// Split a raw HLC into its `<ms>.<logical>` text form.
pub fn hlc_text(raw: u64) -> String {
    format!("{}.{}", raw >> 16, raw & 0xffff)
}

const EVENTS: &str = "
SELECT seq, origin, hlc, (source_lsn - '0/0'::pg_lsn)::int8, xid,
       floor(extract(epoch FROM commit_ts) * 1000)::int8, stamped, local_only,
       CASE WHEN stamped THEN tags->>'hlc' END,
       tags->>'region', tags->>'node', tags->>'user', tags->>'app', tags->>'addr',
       (tags->>'local')::bool
FROM mesh.changelog WHERE seq > $1 ORDER BY seq";

const CHANGES: &str = "
SELECT c.seq, x.e->>'table', x.e->>'op',
       ARRAY(SELECT p->>0 FROM jsonb_array_elements(coalesce(x.e->'pk', '[]')) WITH ORDINALITY k(p, o) ORDER BY o),
       ARRAY(SELECT p->>1 FROM jsonb_array_elements(coalesce(x.e->'pk', '[]')) WITH ORDINALITY k(p, o) ORDER BY o),
       x.e->'new' IS NOT NULL AND jsonb_typeof(x.e->'new') <> 'null',
       ARRAY(SELECT p->>0 FROM jsonb_array_elements(coalesce(x.e->'new', '[]')) WITH ORDINALITY k(p, o) ORDER BY o),
       ARRAY(SELECT p->>1 FROM jsonb_array_elements(coalesce(x.e->'new', '[]')) WITH ORDINALITY k(p, o) ORDER BY o),
       ARRAY(SELECT u FROM jsonb_array_elements_text(coalesce(x.e->'unchanged', '[]')) WITH ORDINALITY k(u, o) ORDER BY o),
       ARRAY(SELECT t::text::int8 FROM jsonb_array_elements(coalesce(x.e->'types', '[]')) WITH ORDINALITY k(t, o) ORDER BY o),
       NOT EXISTS (SELECT 1 FROM jsonb_array_elements(coalesce(x.e->'pk', '[]') || coalesce(x.e->'new', '[]')) p
                   WHERE jsonb_typeof(p->1) NOT IN ('string', 'null'))
FROM mesh.changelog c CROSS JOIN LATERAL jsonb_array_elements(c.changes::jsonb) WITH ORDINALITY x(e, ord)
WHERE c.seq > $1 ORDER BY c.seq, x.ord";

/// Read the change log after `after` (a `seq`), in order, through `client`.
pub async fn read_changelog(client: &Client, after: i64) -> Result<Vec<LogEvent>> {
    let rows = client.query(EVENTS, &[&after]).await?;
    let mut events = Vec::with_capacity(rows.len());
    for r in &rows {
        let stamp = match r.get::<_, Option<String>>(8) {
            Some(hlc) => Some(StampTags {
                hlc: hlc.parse().with_context(|| format!("stamp hlc {hlc:?}"))?,
                region: r.get::<_, Option<String>>(9).unwrap_or_default(),
                node: r.get::<_, Option<String>>(10).unwrap_or_default(),
                user: r.get::<_, Option<String>>(11).unwrap_or_default(),
                app: r.get::<_, Option<String>>(12).unwrap_or_default(),
                addr: r.get::<_, Option<String>>(13).unwrap_or_default(),
                local: r.get::<_, Option<bool>>(14).unwrap_or_default(),
            }),
            None => None,
        };
        events.push(LogEvent {
            seq: r.get(0),
            origin: r.get(1),
            hlc: r.get::<_, i64>(2) as u64,
            source_lsn: r.get::<_, i64>(3) as u64,
            xid: r.get(4),
            commit_ts_ms: r.get(5),
            stamped: r.get(6),
            local_only: r.get(7),
            stamp,
            changes: Vec::new(),
        });
    }
    let rows = client.query(CHANGES, &[&after]).await?;
    let mut at = 0;
    for r in &rows {
        let seq: i64 = r.get(0);
        while events.get(at).is_some_and(|e| e.seq != seq) {
            at += 1;
        }
        let Some(event) = events.get_mut(at) else {
            bail!("change of seq {seq} has no event (the log grew between reads?)");
        };
        let zip = |names: Vec<String>, values: Vec<Option<String>>| -> Vec<Column> {
            names.into_iter().zip(values).collect()
        };
        let has_new: bool = r.get(5);
        event.changes.push(LogChange {
            table: r.get::<_, Option<String>>(1).unwrap_or_default(),
            op: r.get::<_, Option<String>>(2).unwrap_or_default(),
            pk: zip(r.get(3), r.get(4)),
            new: has_new.then(|| zip(r.get(6), r.get(7))),
            unchanged: r.get(8),
            types: r.get(9),
            values_are_text: r.get(10),
        });
    }
    Ok(events)
}

/// One change as `(schema.table, op, key)`: op in lower case, key as
/// `name=value` (empty for TRUNCATE).
pub type ChangeKey = (String, String, String);

/// One committed transaction as `test_decoding` saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefTxn {
    pub xid: i64,
    /// Changes to tables outside `mesh`, as `(schema.table, op, key)` with op
    /// in lower case and key `name=value` of the first column shown.
    pub changes: Vec<ChangeKey>,
    /// Transactional logical messages with prefix `pgmesh` (stamps).
    pub stamps: usize,
}

/// Consume everything a `test_decoding` slot holds, keeping the transactions
/// that changed a table outside schema `mesh` or carry a pgmesh stamp.
pub async fn drain_reference(client: &Client, slot: &str) -> Result<Vec<RefTxn>> {
    let rows = client
        .query(
            "SELECT xid::text::int8, data FROM pg_logical_slot_get_changes($1, NULL, NULL,
                 'include-xids', '1', 'skip-empty-xacts', '1')",
            &[&slot],
        )
        .await
        .context("reading the reference slot")?;
    let mut out = Vec::new();
    let mut open: Option<RefTxn> = None;
    for r in &rows {
        let xid: i64 = r.get(0);
        let data: String = r.get(1);
        if data.starts_with("BEGIN") {
            open = Some(RefTxn {
                xid,
                changes: Vec::new(),
                stamps: 0,
            });
        } else if data.starts_with("COMMIT") {
            let txn = open
                .take()
                .context("COMMIT without BEGIN in test_decoding output")?;
            if !txn.changes.is_empty() || txn.stamps > 0 {
                out.push(txn);
            }
        } else if data.starts_with("message: transactional: 1 prefix: pgmesh,") {
            open.as_mut()
                .context("message outside a transaction")?
                .stamps += 1;
        } else if let Some(change) = parse_ref_change(&data) {
            if !change.0.starts_with("mesh.") {
                open.as_mut()
                    .context("change outside a transaction")?
                    .changes
                    .push(change);
            }
        }
    }
    Ok(out)
}

/// `table public.t: INSERT: id[integer]:1 v[text]:'a'` → `(public.t, insert, id=1)`.
/// The key is the old key when the line has one (`old-key: ...`).
fn parse_ref_change(line: &str) -> Option<ChangeKey> {
    let rest = line.strip_prefix("table ")?;
    let (table, rest) = rest.split_once(": ")?;
    let (op, rest) = rest.split_once(':')?;
    let rest = rest.trim_start();
    let rest = rest.strip_prefix("old-key: ").unwrap_or(rest);
    let key = match rest.split_once('[') {
        Some((name, after)) if !name.contains(' ') && !name.starts_with('(') => {
            let value = after.split_once("]:")?.1;
            let value = value.split(' ').next().unwrap_or_default();
            format!("{name}={}", value.trim_matches('\''))
        }
        _ => String::new(),
    };
    Some((table.to_string(), op.to_ascii_lowercase(), key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_lines_parse() {
        let p = |l: &str| parse_ref_change(l).unwrap();
        assert_eq!(
            p("table public.t: INSERT: id[integer]:1 v[text]:'a b'"),
            ("public.t".into(), "insert".into(), "id=1".into())
        );
        assert_eq!(
            p("table public.t: UPDATE: old-key: id[integer]:40 new-tuple: id[integer]:41 v[text]:'x'"),
            ("public.t".into(), "update".into(), "id=40".into())
        );
        assert_eq!(
            p("table public.t: DELETE: id[bigint]:3"),
            ("public.t".into(), "delete".into(), "id=3".into())
        );
        assert_eq!(
            p("table public.t: TRUNCATE: (no-flags)"),
            ("public.t".into(), "truncate".into(), String::new())
        );
        assert!(parse_ref_change("BEGIN 5").is_none());
    }

    #[test]
    fn hlc_text_splits_raw() {
        assert_eq!(hlc_text((1_700_000_000_000 << 16) | 7), "1700000000000.7");
    }
}
