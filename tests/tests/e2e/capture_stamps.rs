//! Stamp fidelity and `SET pgmesh.replicate = off`.
//!
//! Writes through a stamping proxy must reach `mesh.changelog` with the
//! region, node, user, application_name and client address of the session that
//! made them; writes that bypass the proxy are captured unstamped with the
//! local region as origin. A transaction marked with `SET [LOCAL]
//! pgmesh.replicate = off` is still captured, flagged `local_only`, and the
//! flag follows PostgreSQL's own scoping of the setting. This module owns those
//! checks on the stored log; it never inspects the proxy's internals.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use pgmesh_tests::mesh::{LogEvent, Region};
use pgmesh_tests::{connect, ProxyNode};
use tokio_postgres::Client;

/// The event whose first change touched `public.t` row `id`, keyed `id=N`.
fn by_key(events: &[LogEvent]) -> BTreeMap<String, LogEvent> {
    events
        .iter()
        .filter_map(|e| {
            let c = e.changes.first()?;
            (c.table == "public.t").then(|| (c.pk_text(), e.clone()))
        })
        .collect()
}

async fn setup(name: &str) -> Result<(Region, ProxyNode)> {
    let region = Region::start(name).await?;
    region
        .admin
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             CREATE ROLE alice LOGIN;
             GRANT ALL ON t TO alice;",
        )
        .await?;
    region.init().await?.ok()?;
    let proxy = region.proxy("edge-1").await?;
    Ok((region, proxy))
}

/// Wait until capture caught up, then return the events by key.
async fn logged(region: &Region) -> Result<BTreeMap<String, LogEvent>> {
    region.wait_caught_up().await?;
    Ok(by_key(&region.changelog().await?))
}

#[tokio::test]
async fn stamps_carry_region_node_user_and_application_name() -> Result<()> {
    let (region, proxy) = setup("stamps").await?;
    let _capture = region.capture("cap");
    let alice = format!(
        "{} application_name=billing",
        proxy.conn_string_for("postgres", "alice", None)
    );
    let a = connect(&alice).await?;
    a.execute("INSERT INTO t VALUES (1, 'extended')", &[])
        .await?;
    a.batch_execute("INSERT INTO t VALUES (2, 'simple')")
        .await?;
    a.batch_execute(
        "BEGIN; INSERT INTO t VALUES (3, 'block'); UPDATE t SET v = 'b' WHERE id = 3; COMMIT",
    )
    .await?;
    a.batch_execute("SET application_name = 'billing-v2'")
        .await?;
    a.execute("INSERT INTO t VALUES (4, 'renamed')", &[])
        .await?;
    let ops = connect(&format!("{} application_name=ops", proxy.conn_string())).await?;
    ops.execute("INSERT INTO t VALUES (6, 'ops')", &[]).await?;
    let direct = format!(
        "{} application_name=direct-app",
        region.cluster.conn_string_for("postgres", "alice", None)
    );
    connect(&direct)
        .await?
        .execute("INSERT INTO t VALUES (5, 'direct')", &[])
        .await?;

    let events = logged(&region).await?;
    let want = [
        ("id=1", "alice", "billing"),
        ("id=2", "alice", "billing"),
        ("id=3", "alice", "billing"),
        ("id=4", "alice", "billing-v2"),
        ("id=6", "postgres", "ops"),
    ];
    for (key, user, app) in want {
        let e = events
            .get(key)
            .with_context(|| format!("{key} not logged"))?;
        let s = e
            .stamp
            .as_ref()
            .with_context(|| format!("{key} unstamped"))?;
        assert!(e.stamped, "{key}");
        assert_eq!(e.origin, "stamps", "{key}");
        assert_eq!(
            (
                s.region.as_str(),
                s.node.as_str(),
                s.user.as_str(),
                s.app.as_str()
            ),
            ("stamps", "edge-1", user, app),
            "{key}"
        );
        assert!(s.addr.starts_with("127.0.0.1:"), "{key}: addr {}", s.addr);
        assert!(!s.local && !e.local_only, "{key}");
        assert!(e.hlc >= s.hlc, "{key}: final HLC below the stamp");
    }
    assert_eq!(events["id=3"].changes.len(), 2, "insert+update, one event");
    let d = events.get("id=5").context("direct write not logged")?;
    assert!(!d.stamped && d.stamp.is_none(), "direct write is unstamped");
    assert_eq!(d.origin, "stamps");
    assert!(!d.local_only);
    Ok(())
}

/// Runs `sql` statements one by one in the simple protocol.
async fn simple(c: &Client, sql: &[&str]) -> Result<()> {
    for s in sql {
        c.batch_execute(s).await.with_context(|| s.to_string())?;
    }
    Ok(())
}

#[tokio::test]
async fn replicate_off_marks_transactions_local_only() -> Result<()> {
    let (region, proxy) = setup("localonly").await?;
    let _capture = region.capture("cap");
    let c = connect(&proxy.conn_string()).await?;
    // SET LOCAL: only that transaction, simple and extended protocol.
    simple(
        &c,
        &[
            "BEGIN",
            "SET LOCAL pgmesh.replicate = off",
            "INSERT INTO t VALUES (1, 'local')",
            "COMMIT",
        ],
    )
    .await?;
    c.execute("INSERT INTO t VALUES (2, 'shipped')", &[])
        .await?;
    let mut c2 = connect(&proxy.conn_string()).await?;
    let tx = c2.transaction().await?;
    tx.batch_execute("SET LOCAL pgmesh.replicate TO 'off'")
        .await?;
    tx.execute("INSERT INTO t VALUES (3, 'local')", &[]).await?;
    tx.commit().await?;
    c2.execute("INSERT INTO t VALUES (10, 'shipped')", &[])
        .await?;
    // SET inside a committed transaction: the session keeps it until SET on.
    simple(
        &c,
        &[
            "BEGIN",
            "SET pgmesh.replicate = off",
            "INSERT INTO t VALUES (4, 'local')",
            "COMMIT",
        ],
    )
    .await?;
    c.execute("INSERT INTO t VALUES (5, 'local')", &[]).await?;
    simple(
        &c,
        &[
            "SET pgmesh.replicate = on",
            "INSERT INTO t VALUES (6, 'shipped')",
        ],
    )
    .await?;
    // Session SET outside a transaction, then back to the default.
    c.batch_execute("SET pgmesh.replicate = false").await?;
    c.execute("INSERT INTO t VALUES (7, 'local')", &[]).await?;
    c.batch_execute("SET pgmesh.replicate TO DEFAULT").await?;
    c.execute("INSERT INTO t VALUES (8, 'shipped')", &[])
        .await?;
    // Multi-statement simple query with SET LOCAL inside its block.
    c.batch_execute(
        "BEGIN; SET LOCAL pgmesh.replicate = off; INSERT INTO t VALUES (9, 'local'); COMMIT",
    )
    .await?;

    let events = logged(&region).await?;
    for (id, local) in [
        (1, true),
        (2, false),
        (3, true),
        (10, false),
        (4, true),
        (5, true),
        (6, false),
        (7, true),
        (8, false),
        (9, true),
    ] {
        let key = format!("id={id}");
        let e = events
            .get(&key)
            .with_context(|| format!("{key} not captured"))?;
        assert_eq!(e.local_only, local, "{key}: local_only");
        let s = e
            .stamp
            .as_ref()
            .with_context(|| format!("{key} unstamped"))?;
        assert_eq!(s.local, local, "{key}: stamp's local flag");
    }
    Ok(())
}

/// PostgreSQL undoes a `SET` made in a transaction that rolls back; the
/// proxy's view of the session must follow.
#[tokio::test]
async fn replicate_off_in_a_rolled_back_transaction_does_not_stick() -> Result<()> {
    let (region, proxy) = setup("localrb").await?;
    let _capture = region.capture("cap");
    let c = connect(&proxy.conn_string()).await?;
    simple(&c, &["BEGIN", "SET pgmesh.replicate = off", "ROLLBACK"]).await?;
    let setting: Option<String> = c
        .query_one("SELECT current_setting('pgmesh.replicate', true)", &[])
        .await?
        .get(0);
    assert_ne!(setting.as_deref(), Some("off"), "PostgreSQL undid the SET");
    c.execute("INSERT INTO t VALUES (1, 'shipped')", &[])
        .await?;
    let events = logged(&region).await?;
    assert!(
        !events["id=1"].local_only,
        "SET was rolled back: not local-only"
    );
    Ok(())
}

/// `RESET pgmesh.replicate` (and `RESET ALL`, `DISCARD ALL`) turn replication
/// back on, as PostgreSQL sees it.
#[tokio::test]
async fn reset_turns_replication_back_on() -> Result<()> {
    let (region, proxy) = setup("localreset").await?;
    let _capture = region.capture("cap");
    let c = connect(&proxy.conn_string()).await?;
    for (id, reset) in [
        (1, "RESET pgmesh.replicate"),
        (2, "RESET ALL"),
        (3, "DISCARD ALL"),
    ] {
        simple(&c, &["SET pgmesh.replicate = off", reset]).await?;
        c.execute("INSERT INTO t VALUES ($1, 'shipped')", &[&id])
            .await?;
    }
    let events = logged(&region).await?;
    let wrong: Vec<&str> = [
        (1, "RESET pgmesh.replicate"),
        (2, "RESET ALL"),
        (3, "DISCARD ALL"),
    ]
    .into_iter()
    .filter(|(id, _)| events[&format!("id={id}")].local_only)
    .map(|(_, reset)| reset)
    .collect();
    assert!(wrong.is_empty(), "still local-only after {wrong:?}");
    Ok(())
}

/// A capture leader starts above the highest HLC apply has recorded: a local write
/// after a restart still wins against a remote write applied before it (the
/// messages that told the previous leader are not decoded again).
#[tokio::test]
async fn a_new_leader_starts_above_what_apply_recorded() -> Result<()> {
    let region = Region::start("hwm").await?;
    region
        .admin
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await?;
    region.init().await?.ok()?;
    // A remote event applied here with an HLC an hour ahead of this clock.
    let ahead: i64 = region
        .admin
        .query_one(
            "INSERT INTO mesh.link_state (peer, applied_hlc)
             VALUES ('far', ((extract(epoch FROM clock_timestamp()) * 1000)::int8 + 3600000) << 16)
             RETURNING applied_hlc",
            &[],
        )
        .await?
        .get(0);
    let x = region.capture("x");
    x.wait_role(pgmesh_replicator::capture::Role::Leader)
        .await?;
    region
        .admin
        .batch_execute("INSERT INTO t VALUES (1)")
        .await?;
    region.wait_caught_up().await?;
    let log = region.changelog().await?;
    let local = log
        .iter()
        .find(|e| e.changes.iter().any(|c| c.table == "public.t"))
        .context("the local insert is logged")?;
    assert!(
        local.hlc > ahead as u64,
        "local HLC {} is not above the applied {ahead}",
        local.hlc
    );
    x.stop().await;
    Ok(())
}
