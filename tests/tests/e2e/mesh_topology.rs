//! Hub-and-spoke: spokes talk only to the hub, and the hub relays with the
//! origin preserved.
//!
//! `hub` runs with `relay` and pulls from both spokes; each spoke pulls only
//! from the hub. A write in one spoke must reach the other spoke exactly once,
//! still naming the spoke it came from (not the hub), and the hub must never
//! ship a spoke's own events back to it. Every region's change log ends up
//! holding each event of each origin exactly once. Only the hub's appends of
//! applied events notify the log's readers (it is the only one that serves them).
//! This module owns the topology checks.

use std::collections::BTreeMap;

use anyhow::Result;
use pgmesh_tests::regions::{Mesh, NodeSpec, CONVERGE_TIMEOUT};
use pgmesh_tests::wait_row;
use tokio_postgres::AsyncMessage;

use crate::support::WatchedConn;

const SCHEMA: &str = "CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL)";

/// Events per origin in region `i`'s change log.
async fn events_by_origin(mesh: &Mesh, i: usize) -> Result<BTreeMap<String, i64>> {
    Ok(mesh
        .region(i)
        .admin
        .query(
            "SELECT origin, count(*) FROM mesh.changelog GROUP BY origin",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// `LISTEN pgmesh_changelog` on region `i`'s database.
async fn listen_log(mesh: &Mesh, i: usize) -> Result<WatchedConn> {
    let c = WatchedConn::connect(&mesh.region(i).url()).await?;
    c.client.batch_execute("LISTEN pgmesh_changelog").await?;
    Ok(c)
}

/// The origins (`ORIGIN SEQ` payloads) of the log notifications `c` received, up to
/// a marker this sends now: notifications arrive in commit order, so every append
/// committed before this call is in.
async fn notified_origins(c: &mut WatchedConn) -> Result<Vec<String>> {
    c.client
        .batch_execute("NOTIFY pgmesh_changelog, 'marker'")
        .await?;
    let mut origins = Vec::new();
    loop {
        if let AsyncMessage::Notification(n) = c.next_message().await? {
            match n.payload() {
                "marker" => return Ok(origins),
                p => origins.push(p.split(' ').next().unwrap_or_default().to_string()),
            }
        }
    }
}

/// Waits until note `id` exists in region `i`.
async fn wait_note(mesh: &Mesh, i: usize, id: i32) -> Result<()> {
    let admin = &mesh.region(i).admin;
    let what = format!("note {id} to reach {}", mesh.region(i).name);
    let sql = "SELECT 1 FROM notes WHERE id = $1";
    wait_row(admin, CONVERGE_TIMEOUT, &what, sql, &[&id]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_relays_spoke_writes_once_with_their_origin() -> Result<()> {
    let mut mesh = Mesh::start(&["hub", "spoke_a", "spoke_b"]).await?;
    mesh.exec_all(SCHEMA).await?;
    mesh.init_all().await?;
    mesh.start_nodes(|i| match i {
        0 => NodeSpec {
            relay: true,
            ..NodeSpec::default()
        },
        _ => NodeSpec {
            peers: Some(vec!["hub".into()]),
            ..NodeSpec::default()
        },
    })
    .await?;
    let (hub, a, b) = (0, 1, 2);
    assert_eq!(mesh.region(a).peers(), ["hub"]);
    let mut hub_log = listen_log(&mesh, hub).await?;
    let mut b_log = listen_log(&mesh, b).await?;

    mesh.connect_proxy(a)
        .await?
        .execute("INSERT INTO notes VALUES (1, 'from a')", &[])
        .await?;
    wait_note(&mesh, b, 1).await?;
    mesh.connect_proxy(b)
        .await?
        .execute("INSERT INTO notes VALUES (2, 'from b')", &[])
        .await?;
    wait_note(&mesh, a, 2).await?;
    mesh.connect_proxy(hub)
        .await?
        .execute("INSERT INTO notes VALUES (3, 'from the hub')", &[])
        .await?;
    let sums = mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    assert_eq!(sums["public.notes"].split(':').next(), Some("3"));

    // The hub relays, so its append of spoke_a's event woke its readers; spoke_b
    // does not, so only its own write did (capture's append), not what it applied.
    let hub_heard = notified_origins(&mut hub_log).await?;
    assert!(
        hub_heard.iter().any(|o| o == "spoke_a"),
        "the hub's readers hear of applied events: {hub_heard:?}"
    );
    let b_heard = notified_origins(&mut b_log).await?;
    assert!(
        !b_heard.is_empty() && b_heard.iter().all(|o| o == "spoke_b"),
        "spoke_b's readers hear of its own appends only: {b_heard:?}"
    );

    // spoke_b holds spoke_a's event under spoke_a's name, with its HLC.
    let a_event: (String, i64) = {
        let r = mesh
            .region(a)
            .admin
            .query_one(
                "SELECT origin, hlc FROM mesh.changelog WHERE origin = 'spoke_a'",
                &[],
            )
            .await?;
        (r.get(0), r.get(1))
    };
    let in_b = mesh
        .region(b)
        .admin
        .query(
            "SELECT origin, hlc FROM mesh.changelog WHERE changes::text LIKE '%from a%'",
            &[],
        )
        .await?;
    let in_b: Vec<(String, i64)> = in_b.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        in_b,
        [a_event],
        "spoke_b must log spoke_a's write once, as spoke_a's"
    );

    // Every region logs every origin's events exactly once.
    let mut own = BTreeMap::new();
    for (i, r) in mesh.regions.iter().enumerate() {
        own.insert(r.name.clone(), events_by_origin(&mesh, i).await?[&r.name]);
    }
    for i in 0..3 {
        assert_eq!(
            events_by_origin(&mesh, i).await?,
            own,
            "events per origin in {}",
            mesh.region(i).name
        );
    }
    // Each spoke applied exactly the events of the other two regions, all
    // from the hub, and nothing was delivered twice.
    for (spoke, other) in [(a, "spoke_b"), (b, "spoke_a")] {
        let c = mesh
            .region(spoke)
            .handle()
            .expect("in-process")
            .metrics
            .link_counters("hub");
        assert_eq!(
            c.applied_events as i64,
            own["hub"] + own[other],
            "events {} applied from the hub",
            mesh.region(spoke).name
        );
        let spoke_links: Vec<String> = mesh
            .region(spoke)
            .admin
            .query("SELECT name FROM mesh.links", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(spoke_links, ["hub"], "a spoke has one link");
    }
    mesh.shutdown().await;
    Ok(())
}
