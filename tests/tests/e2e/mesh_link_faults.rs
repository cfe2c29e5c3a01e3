//! The network between two regions fails as a partition does: connections reset
//! mid-stream, and traffic stalls with the connections left open, briefly and for
//! longer than a link's idle timeout. Every link must notice, reconnect, resume
//! from its checkpoint and lose or repeat nothing.
//!
//! Each region pulls from the other through a [`Forwarder`]. Writers in both
//! regions run throughout (the chaos test's), faults come from a printed seed
//! (`PGMESH_CHAOS_SEED`); 6 short faults in every run, 20 with `PGMESH_CHAOS=1`,
//! then one stall past the idle timeout. This module owns that scenario.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use pgmesh_replicator::link::client::IDLE_TIMEOUT;
use pgmesh_tests::faultnet::Forwarder;
use pgmesh_tests::regions::{Mesh, NodeSpec, CONVERGE_TIMEOUT};
use pgmesh_tests::wait_for;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::mesh_chaos::{nothing_lost_or_repeated, plan, Writers, SCHEMA};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_survive_resets_and_stalls_and_lose_nothing() -> Result<()> {
    let (rounds, seed) = plan(6, 20)?;
    let started = Instant::now();
    let mut mesh = Mesh::start(&["lf_a", "lf_b"]).await?;
    mesh.exec_all(SCHEMA).await?;
    mesh.init_all().await?;
    let peer = |i: usize| SocketAddr::from(([127, 0, 0, 1], mesh.region(i).peer_port));
    // nets[i] carries region i's pulls from the other region.
    let nets = [
        Forwarder::start(peer(1)).await?,
        Forwarder::start(peer(0)).await?,
    ];
    let names = ["lf_a", "lf_b"];
    mesh.start_nodes(|i| NodeSpec {
        peer_addrs: [(names[1 - i].to_string(), nets[i].addr())].into(),
        ..NodeSpec::default()
    })
    .await?;

    let writers = Writers::start(&mesh, seed)?;
    let mut rng = StdRng::seed_from_u64(seed);
    for round in 0..rounds {
        // Writes flow between faults (the workload's rhythm, not a wait for a result).
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..800))).await;
        let i = rng.gen_range(0..2);
        let what = match rng.gen_range(0..3) {
            0 => {
                nets[i].cut();
                format!("reset {}'s link", names[i])
            }
            1 => {
                nets.iter().for_each(Forwarder::cut);
                "reset both links".to_string()
            }
            _ => {
                let held = Duration::from_millis(rng.gen_range(300..3000));
                nets[i].stall(true);
                tokio::time::sleep(held).await;
                nets[i].stall(false);
                format!("stall {}'s link for {held:?}", names[i])
            }
        };
        eprintln!("fault {round}: {what} (at {:?})", started.elapsed());
    }

    // A stall longer than the idle timeout: the links must notice on their own,
    // connected (nothing from the peer) or reconnecting (the handshake times out).
    for r in &mesh.regions {
        r.admin
            .execute("UPDATE mesh.link_state SET error = NULL", &[])
            .await?;
    }
    nets.iter().for_each(|n| n.stall(true));
    for (i, name) in names.iter().enumerate() {
        let other = names[1 - i];
        let what = format!("{name}'s link to notice the stall");
        let error = wait_for(IDLE_TIMEOUT + CONVERGE_TIMEOUT, &what, || async {
            let link = mesh.link(i, other).await?;
            Ok(link
                .and_then(|l| l.error)
                .filter(|e| e.contains("nothing from peer") || e.contains("timed out")))
        })
        .await?;
        eprintln!("{name}: {error} (at {:?})", started.elapsed());
    }
    nets.iter().for_each(|n| n.stall(false));

    let acked = writers.stop().await?;
    let sums = mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    eprintln!(
        "{} acknowledged inserts; converged at {:?}: {sums:?}",
        acked.len(),
        started.elapsed()
    );
    nothing_lost_or_repeated(&mesh, &acked).await?;
    let (_, wrong) = mesh.lww_check().await?;
    assert!(
        wrong.is_empty(),
        "not the LWW winners:\n{}",
        wrong.join("\n")
    );
    mesh.shutdown().await;
    Ok(())
}
