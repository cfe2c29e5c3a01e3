//! A region with two nodes: its peers pull from whichever of them serves.
//!
//! Region 1 runs its node as the real binary and a second, in-process node that
//! waits as standby. Region 2's node lists both in `--peer NAME=A,B`. Once the
//! first node is SIGKILLed, the second takes over capture and the pull links, and
//! the link from region 1 moves on to it: region 2 keeps getting region 1's writes,
//! and region 1 region 2's. With one address per peer, region 1's writes would
//! wait for the dead node.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use pgmesh_replicator::capture::Role;
use pgmesh_tests::regions::{free_port, Mesh, NodeSpec, CONVERGE_TIMEOUT, READY_TIMEOUT};
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
    let second = mesh.start_second_node(0, "fo1-second", second_port).await?;
    let mut role = second.capture.as_ref().context("no capture")?.watch_role();
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
