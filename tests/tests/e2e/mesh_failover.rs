//! A region with two nodes: its peers pull from whichever of them serves.
//!
//! Region 1 runs its node as the real binary and a second, in-process node that
//! waits as standby. Region 2's node lists both in `--peer NAME=A,B`. Once the
//! first node is SIGKILLed, the second takes over capture and the pull links, and
//! the link from region 1 moves on to it: region 2 keeps getting region 1's writes,
//! and region 1 region 2's. With one address per peer, region 1's writes would
//! wait for the dead node.
//!
//! The nodes of a region must agree on `--relay` (a link that moved between a node
//! that relays and one that does not would skip events): a second node that
//! disagrees with its region's leader neither captures nor serves, not even once
//! the leader died, until the dead leader is marked stopped.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use pgmesh_replicator::capture::Role;
use pgmesh_tests::ports::free_port;
use pgmesh_tests::regions::{Mesh, NodeSpec, CONVERGE_TIMEOUT, READY_TIMEOUT};
use pgmesh_tests::wait_row;

async fn wait_item(mesh: &Mesh, i: usize, id: i32) -> Result<()> {
    let r = mesh.region(i);
    let what = format!("item {id} in {}", r.name);
    wait_row(
        &r.admin,
        CONVERGE_TIMEOUT,
        &what,
        "SELECT 1 FROM items WHERE id = $1",
        &[&id],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_pull_from_the_node_that_took_over_its_region() -> Result<()> {
    let mut mesh = Mesh::start(&["fo1", "fo2"]).await?;
    mesh.exec_all("CREATE TABLE items (id int PRIMARY KEY, v text)")
        .await?;
    mesh.init_all().await?;
    let first = NodeSpec {
        process: true,
        ..NodeSpec::default()
    };
    mesh.start_node(0, first).await?;
    let second_port = free_port()?;
    let second = mesh
        .start_second_node(0, "fo1-second", second_port, |_| {})
        .await?;
    let mut role = second.capture().context("no capture")?.watch_role();
    tokio::time::timeout(READY_TIMEOUT, role.wait_for(|r| *r == Role::Standby))
        .await
        .context("the second node never waited as standby")??;
    let second_addr = SocketAddr::from(([127, 0, 0, 1], second_port));
    let spec = NodeSpec {
        more_peer_addrs: [("fo1".to_string(), vec![second_addr])].into(),
        ..NodeSpec::default()
    };
    mesh.start_node(1, spec).await?;

    mesh.region(0)
        .admin
        .execute("INSERT INTO items VALUES (1, 'before')", &[])
        .await?;
    wait_item(&mesh, 1, 1).await?;

    mesh.kill_node(0).await?;
    tokio::time::timeout(READY_TIMEOUT, role.wait_for(|r| *r == Role::Leader))
        .await
        .context("the second node never took over")??;
    mesh.region(0)
        .admin
        .execute("INSERT INTO items VALUES (2, 'after, in fo1')", &[])
        .await?;
    mesh.region(1)
        .admin
        .execute("INSERT INTO items VALUES (3, 'after, in fo2')", &[])
        .await?;
    wait_item(&mesh, 1, 2).await?;
    wait_item(&mesh, 0, 3).await?;
    let address: String = mesh
        .region(1)
        .admin
        .query_one(
            "SELECT address FROM mesh.link_state WHERE peer = 'fo1'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(
        address,
        second_addr.to_string(),
        "fo2 pulls from the second node"
    );
    second.shutdown(std::time::Duration::from_secs(1)).await;
    Ok(())
}

/// Waits until region `i`'s link from `peer` records a refusal about `--relay` made
/// after the database time `since`.
async fn wait_relay_refusal(mesh: &Mesh, i: usize, peer: &str, since: &str) -> Result<()> {
    let r = mesh.region(i);
    let what = format!("{}'s link from {peer} to be refused over --relay", r.name);
    wait_row(
        &r.admin,
        CONVERGE_TIMEOUT,
        &what,
        "SELECT 1 FROM mesh.link_state
         WHERE peer = $1 AND error LIKE '%same --relay%' AND updated_at > $2::text::timestamptz",
        &[&peer, &since],
    )
    .await
}

async fn db_now(mesh: &Mesh, i: usize) -> Result<String> {
    Ok(mesh
        .region(i)
        .admin
        .query_one("SELECT clock_timestamp()::text", &[])
        .await?
        .get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_disagrees_on_relay_neither_captures_nor_serves() -> Result<()> {
    let mut mesh = Mesh::start(&["rl1", "rl2"]).await?;
    mesh.exec_all("CREATE TABLE items (id int PRIMARY KEY, v text)")
        .await?;
    mesh.init_all().await?;
    let first = NodeSpec {
        process: true,
        relay: true,
        ..NodeSpec::default()
    };
    mesh.start_node(0, first).await?;
    let leader: String = mesh
        .region(0)
        .admin
        .query_one(
            "SELECT node FROM mesh.node_state WHERE role = 'leader' AND relay",
            &[],
        )
        .await?
        .get(0);
    let second_port = free_port()?;
    let second = mesh
        .start_second_node(0, "rl1-second", second_port, |c| c.relay = false)
        .await?;
    let role = second.capture().context("no capture")?.watch_role();
    // rl2 pulls from the second node only.
    let second_addr = SocketAddr::from(([127, 0, 0, 1], second_port));
    let spec = NodeSpec {
        peer_addrs: [("rl1".to_string(), second_addr)].into(),
        ..NodeSpec::default()
    };
    let since = db_now(&mesh, 1).await?;
    mesh.start_node(1, spec).await?;
    mesh.region(0)
        .admin
        .execute("INSERT INTO items VALUES (1, 'before')", &[])
        .await?;
    wait_relay_refusal(&mesh, 1, "rl1", &since).await?;
    assert_eq!(registered(&mesh).await?, 0, "the second node registered");
    assert_eq!(*role.borrow(), Role::Starting);

    // The leader dies without a successor: its setting is still the region's.
    mesh.kill_node(0).await?;
    let since = db_now(&mesh, 1).await?;
    wait_relay_refusal(&mesh, 1, "rl1", &since).await?;
    assert_eq!(registered(&mesh).await?, 0, "the second node registered");
    assert_eq!(*role.borrow(), Role::Starting, "the second node captures");

    // Marked stopped, it no longer binds the region: the second node takes over.
    mesh.region(0)
        .admin
        .execute(
            "UPDATE mesh.node_state SET role = 'stopped' WHERE node = $1",
            &[&leader],
        )
        .await?;
    let mut role = role;
    tokio::time::timeout(READY_TIMEOUT, role.wait_for(|r| *r == Role::Leader))
        .await
        .context("the second node never took over")??;
    mesh.region(0)
        .admin
        .execute("INSERT INTO items VALUES (2, 'after')", &[])
        .await?;
    wait_item(&mesh, 1, 1).await?;
    wait_item(&mesh, 1, 2).await?;
    second.shutdown(std::time::Duration::from_secs(1)).await;
    Ok(())
}

/// How many rows of `mesh.node_state` name the second node of region 0.
async fn registered(mesh: &Mesh) -> Result<i64> {
    Ok(mesh
        .region(0)
        .admin
        .query_one(
            "SELECT count(*) FROM mesh.node_state WHERE node = 'rl1-second'",
            &[],
        )
        .await?
        .get(0))
}
