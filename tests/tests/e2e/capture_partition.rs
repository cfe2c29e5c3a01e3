//! Capture leadership across a network partition between a node and its database.
//!
//! The leader runs in a network namespace and reaches PostgreSQL over a veth link;
//! a standby of the same region runs on loopback. Cutting the link drops packets
//! silently, so the database only learns that the leader is gone from TCP
//! keepalives, and until it does, the leader's session keeps the leader lock and
//! its walsender keeps the slot. With the operating system's defaults that takes
//! about two hours. pgmesh's sessions ask for keepalives and timeouts of their own,
//! so the standby must take over within a couple of minutes, and the old leader,
//! once the link is back, must find it lost the lead and wait as a standby. A write
//! load runs straight to the database the whole time, and at the end the change log
//! holds every committed write exactly once.

use std::time::{Duration, Instant};

use anyhow::Result;
use pgmesh_tests::mesh::Region;
use pgmesh_tests::netns::{self, NetNs, REQUIRE_ENV};
use pgmesh_tests::{ClusterOptions, PgmeshProcess};

use crate::capture_crash::{assert_log_equals, max_seq, wait_log_growth, Load, TABLE};

/// How long a takeover (or the old leader's step-down) may take. The node's
/// settings detect a dead peer in well under a minute.
const DETECTION: Duration = Duration::from_secs(150);

/// Waits until `node` has `role` in `mesh.node_state`, set at or after `since`.
async fn wait_role(region: &Region, node: &str, role: &str, since: &str) -> Result<()> {
    region
        .wait_node_role_within(node, role, since, DETECTION)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_from_a_leader_cut_off_from_its_database() -> Result<()> {
    let ns = match NetNs::create() {
        Ok(ns) => ns,
        Err(e) if !netns::required() => {
            eprintln!("skipped: cannot create a network namespace ({e:#}); {REQUIRE_ENV}=1 makes this a failure");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let opts = ClusterOptions::default()
        .setting("listen_addresses", format!("127.0.0.1,{}", ns.host_ip))
        .hba_line(format!("host all all {} trust", ns.subnet));
    let region = Region::start_with("cut", opts).await?;
    region.admin.batch_execute(TABLE).await?;
    region.init().await?.ok()?;

    // Node a leads, from inside the namespace.
    let since = region.db_clock().await?;
    let upstream = format!(
        "postgres://postgres@{}:{}/postgres",
        ns.host_ip,
        region.cluster.port()
    );
    let listen = format!("{}:0", ns.ns_ip);
    let args = [
        "run",
        "--listen",
        &listen,
        "--upstream",
        &upstream,
        "--region",
        "cut",
        "--node",
        "node_a",
    ];
    let mut a = PgmeshProcess::spawn_wrapped(&ns.wrapper(), &args)?;
    a.listen_addr().await?;
    let with_log = |p: &PgmeshProcess, e: anyhow::Error| e.context(format!("log:\n{}", p.log()));
    wait_role(&region, "node_a", "leader", &since)
        .await
        .map_err(|e| with_log(&a, e))?;
    let since = region.db_clock().await?;
    let b = region.spawn_node("node_b").await?;
    wait_role(&region, "node_b", "standby", &since).await?;

    let load = Load::start(&[region.cluster.conn_string()]);
    wait_log_growth(&region, max_seq(&region).await?, 20).await?;

    // The partition: b must take over.
    let since = region.db_clock().await?;
    let cut = Instant::now();
    ns.cut()?;
    wait_role(&region, "node_b", "leader", &since)
        .await
        .map_err(|e| with_log(&b, e))?;
    eprintln!("node_b took over {:?} after the cut", cut.elapsed());
    let taken = max_seq(&region).await?;
    wait_log_growth(&region, taken, 20)
        .await
        .map_err(|e| with_log(&b, e))?;

    // The link is back: a finds b leading and waits.
    let since = region.db_clock().await?;
    let mended = Instant::now();
    ns.mend()?;
    wait_role(&region, "node_a", "standby", &since)
        .await
        .map_err(|e| with_log(&a, e))?;
    eprintln!(
        "node_a was standby {:?} after the link came back",
        mended.elapsed()
    );
    let leaders: i64 = region
        .admin
        .query_one(
            "SELECT count(*) FROM mesh.node_state WHERE role = 'leader' AND node = 'node_b'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(leaders, 1, "node_b leads after the link came back");

    let taken = max_seq(&region).await?;
    wait_log_growth(&region, taken, 20).await?;
    let committed = load.stop().await?;
    assert_log_equals(&region, &committed).await?;
    assert!(a.try_wait()?.is_none(), "node_a exited:\n{}", a.log());
    Ok(())
}
