//! Faults in a row while every region writes and prunes its change log every
//! second: nodes SIGKILLed and restarted, databases crashed (SIGKILL of the
//! postmaster, then crash recovery) under their running nodes, both at once, and
//! links paused; then the mesh must converge (identical checksums), with every
//! acknowledged write everywhere and no event logged twice anywhere. A crashed
//! database loses the batches apply committed asynchronously, so this is also the
//! test that pruning only goes below what peers applied durably: a peer that has to
//! pull again what was pruned is refused, and the mesh never converges. (The
//! last-writer-wins winners are checked by the convergence test, which keeps the
//! whole log to predict them.)
//!
//! Three regions run real `pgmesh run` processes. Writers in each region mix
//! conflicting writes on a small key space with unique inserts; a unique insert
//! counts as acknowledged only when its commit returned, and a writer whose node
//! or database is down reconnects and goes on. The faults and their timing come
//! from a seed that is printed, so a failure can be replayed
//! (`PGMESH_CHAOS_SEED`). The short form (3 faults) runs in every test run;
//! `PGMESH_CHAOS=1` runs 25.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pgmesh_tests::regions::{Mesh, NodeSpec, CONVERGE_TIMEOUT};
use pgmesh_tests::wait_until;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

pub(crate) const SCHEMA: &str = "
CREATE TABLE kv (id int PRIMARY KEY, val text NOT NULL);
CREATE TABLE acks (id bigint PRIMARY KEY, origin text NOT NULL);";

const KEYS: i32 = 10;
const WRITERS_PER_REGION: u64 = 2;

/// Writes until `stop`: conflicting upserts, updates and deletes on `kv`, and
/// unique inserts into `acks` (ids `base + n`). Returns the acks whose commit
/// returned. Connection failures (a dead node or database) mean reconnecting;
/// errors the server reports (deadlocks between local writers) are skipped.
async fn writer(
    conn: String,
    base: i64,
    seed: u64,
    stop: watch::Receiver<bool>,
) -> Result<Vec<i64>> {
    let tag = format!("w{base}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut acked = Vec::new();
    let mut n = 0i64;
    let mut client: Option<tokio_postgres::Client> = None;
    while !*stop.borrow() {
        let Some(c) = client.as_ref().filter(|c| !c.is_closed()) else {
            client = pgmesh_tests::connect(&conn).await.ok();
            if client.is_none() {
                // Pacing a workload while its node restarts, not waiting on a result.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            continue;
        };
        let key: i32 = rng.gen_range(0..KEYS);
        let val = format!("{tag}-{n}");
        let r = match rng.gen_range(0..10) {
            0..=3 => {
                let id = base + n;
                let r = c
                    .execute("INSERT INTO acks VALUES ($1, $2)", &[&id, &tag])
                    .await;
                if r.is_ok() {
                    acked.push(id);
                }
                r
            }
            4..=6 => {
                c.execute(
                    "INSERT INTO kv VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET val = excluded.val",
                    &[&key, &val],
                )
                .await
            }
            7..=8 => {
                c.execute("UPDATE kv SET val = $2 WHERE id = $1", &[&key, &val])
                    .await
            }
            _ => c.execute("DELETE FROM kv WHERE id = $1", &[&key]).await,
        };
        n += 1;
        if let Err(e) = r {
            if e.code().is_none() {
                client = None;
            }
        }
        // About 100 writes a second per writer: catch-ups stay short on 2 cores.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(acked)
}

/// One fault, chosen and timed by `rng`; returns what it did.
async fn fault(mesh: &mut Mesh, rng: &mut StdRng) -> Result<String> {
    let i = rng.gen_range(0..3);
    let name = mesh.region(i).name.clone();
    let down = Duration::from_millis(rng.gen_range(200..2000));
    Ok(match rng.gen_range(0..4) {
        0 => {
            mesh.kill_node(i).await?;
            tokio::time::sleep(down).await;
            mesh.restart_node(i).await?;
            format!("SIGKILL {name}'s node for {down:?}")
        }
        1 => {
            mesh.crash_database(i).await?;
            format!("crash {name}'s database under its node")
        }
        2 => {
            mesh.kill_node(i).await?;
            mesh.crash_database(i).await?;
            tokio::time::sleep(down).await;
            mesh.restart_node(i).await?;
            format!("SIGKILL {name}'s node and crash its database, {down:?}")
        }
        _ => {
            let peer = mesh.region((i + rng.gen_range(1..3)) % 3).name.clone();
            mesh.pause_link(i, &peer).await?;
            tokio::time::sleep(down).await;
            mesh.resume_link(i, &peer).await?;
            format!("pause {name}'s link from {peer} for {down:?}")
        }
    })
}

/// Prints the tail of every node's log (for a failure).
fn dump_logs(mesh: &Mesh) {
    for r in &mesh.regions {
        if let Some(p) = r.process() {
            let log = p.log();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!("--- {}'s node, last lines:", r.name);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// For a divergence: each region's `kv` row, version and conflicts, for every key
/// whose row differs between regions (what the next look at a failure starts from).
async fn dump_kv(mesh: &Mesh) {
    let rows = "SELECT k.id::text, coalesce(t.val, '<none>'), coalesce(v.hlc::text, '-'),
                       coalesce(v.origin::text, '-'), coalesce(v.deleted::text, '-')
                FROM generate_series(0, 99) k(id)
                LEFT JOIN kv t ON t.id = k.id
                LEFT JOIN mesh.row_versions v
                       ON v.tbl = 'public.kv' AND v.pk = '[[\"id\", \"' || k.id || '\"]]'
                WHERE t.id IS NOT NULL OR v.hlc IS NOT NULL ORDER BY k.id";
    let mut seen: Vec<(String, Vec<Vec<String>>)> = Vec::new();
    for r in &mesh.regions {
        let got = match r.admin.query(rows, &[]).await {
            Ok(rows) => rows
                .iter()
                .map(|row| (0..5).map(|i| row.get::<_, String>(i)).collect())
                .collect(),
            Err(e) => {
                eprintln!("--- {}: cannot read kv: {e}", r.name);
                continue;
            }
        };
        seen.push((r.name.clone(), got));
    }
    let key_row = |rows: &[Vec<String>], id: &str| rows.iter().find(|r| r[0] == id).cloned();
    let mut ids: Vec<String> = seen
        .iter()
        .flat_map(|(_, rows)| rows.iter().map(|r| r[0].clone()))
        .collect();
    ids.sort_by_key(|id| id.parse::<i64>().unwrap_or(0));
    ids.dedup();
    for id in ids {
        let each: Vec<_> = seen
            .iter()
            .map(|(_, rows)| key_row(rows, &id).map(|r| r[1].clone()))
            .collect();
        if each.windows(2).all(|w| w[0] == w[1]) {
            continue;
        }
        eprintln!("--- kv key {id} differs (value, version hlc, origin id, deleted):");
        for (name, rows) in &seen {
            eprintln!("  {name}: {:?}", key_row(rows, &id));
        }
        for r in &mesh.regions {
            let conflicts = r
                .admin
                .query(
                    "SELECT local_origin, local_hlc::text, local_op, remote_origin, remote_hlc::text,
                            remote_op, winner FROM mesh.conflicts
                     WHERE tbl = 'public.kv' AND pk = jsonb_build_array(jsonb_build_array('id', $1::text))
                     ORDER BY id",
                    &[&id],
                )
                .await
                .unwrap_or_default();
            for c in conflicts {
                let f: Vec<Option<String>> = (0..7).map(|i| c.get(i)).collect();
                eprintln!("  {} conflict: {f:?}", r.name);
            }
        }
    }
}

/// How many faults (`short`, or `long` with `PGMESH_CHAOS=1`) and their seed
/// (`PGMESH_CHAOS_SEED`, else random), printed so a failure can be replayed.
pub(crate) fn plan(short: usize, long: usize) -> Result<(usize, u64)> {
    let rounds = if std::env::var("PGMESH_CHAOS").as_deref() == Ok("1") {
        long
    } else {
        short
    };
    let seed: u64 = match std::env::var("PGMESH_CHAOS_SEED") {
        Ok(s) => s.parse().context("PGMESH_CHAOS_SEED")?,
        Err(_) => rand::random(),
    };
    eprintln!("{rounds} faults, seed {seed} (PGMESH_CHAOS_SEED={seed} replays them)");
    Ok((rounds, seed))
}

/// [`writer`]s in every region of a mesh with [`SCHEMA`]'s tables.
pub(crate) struct Writers {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<Result<Vec<i64>>>>,
}

impl Writers {
    /// Starts [`WRITERS_PER_REGION`] writers per region, seeded from `seed`.
    pub(crate) fn start(mesh: &Mesh, seed: u64) -> Result<Writers> {
        let (stop, rx) = watch::channel(false);
        let mut tasks = Vec::new();
        for region in 0..mesh.regions.len() {
            for w in 0..WRITERS_PER_REGION {
                let base = (region as i64 * 10 + w as i64 + 1) * 1_000_000_000;
                let conn = mesh.proxy_conn_string(region)?;
                tasks.push(tokio::spawn(writer(
                    conn,
                    base,
                    seed ^ base as u64,
                    rx.clone(),
                )));
            }
        }
        Ok(Writers { stop, tasks })
    }

    /// Stops them; returns every acknowledged insert.
    pub(crate) async fn stop(self) -> Result<BTreeSet<i64>> {
        self.stop.send(true)?;
        let mut acked = BTreeSet::new();
        for t in self.tasks {
            acked.extend(t.await??);
        }
        anyhow::ensure!(
            acked.len() > 100,
            "only {} acknowledged inserts",
            acked.len()
        );
        Ok(acked)
    }
}

/// Every region holds every acknowledged insert, and logged no event twice.
pub(crate) async fn nothing_lost_or_repeated(mesh: &Mesh, acked: &BTreeSet<i64>) -> Result<()> {
    for (i, r) in mesh.regions.iter().enumerate() {
        let lost = mesh.missing(i, "SELECT id FROM acks", acked).await?;
        assert!(
            lost.is_empty(),
            "{}: {} acknowledged inserts missing, e.g. {:?}",
            r.name,
            lost.len(),
            &lost[..lost.len().min(10)]
        );
        assert_eq!(
            mesh.logged_twice(i).await?,
            0,
            "events logged twice in {}",
            r.name
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_converges_and_loses_nothing_through_a_run_of_faults() -> Result<()> {
    let (rounds, seed) = plan(3, 25)?;
    let started = Instant::now();
    let mut mesh = Mesh::start(&["ch_a", "ch_b", "ch_c"]).await?;
    mesh.exec_all(SCHEMA).await?;
    mesh.init_all().await?;
    mesh.start_nodes(|_| NodeSpec {
        process: true,
        prune_secs: Some(1),
        ..NodeSpec::default()
    })
    .await?;

    let writers = Writers::start(&mesh, seed)?;
    let mut rng = StdRng::seed_from_u64(seed);
    for round in 0..rounds {
        // Writes flow between faults (the workload's rhythm, not a wait for a result).
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..1500))).await;
        let what = match fault(&mut mesh, &mut rng).await {
            Ok(what) => what,
            Err(e) => {
                dump_logs(&mesh);
                return Err(e.context(format!("fault {round}")));
            }
        };
        eprintln!("fault {round}: {what} (at {:?})", started.elapsed());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acked = writers.stop().await?;
    let sums = mesh.wait_converged(CONVERGE_TIMEOUT).await;
    eprintln!(
        "{} acknowledged inserts; converged at {:?}: {sums:?}",
        acked.len(),
        started.elapsed()
    );
    if sums.is_err() {
        dump_logs(&mesh);
        dump_kv(&mesh).await;
    }
    sums?;
    nothing_lost_or_repeated(&mesh, &acked).await?;
    // ch_a prunes its log: during the faults, or (when they came early and close
    // together, each crash of its database restarting capture and the links) once its
    // peers have reported their durable positions again.
    let pruned = "SELECT pruned_upto > 0 FROM mesh.log_prune";
    let admin = &mesh.region(0).admin;
    wait_until(CONVERGE_TIMEOUT, "ch_a to prune its log", || async {
        admin
            .query_one(pruned, &[])
            .await
            .is_ok_and(|r| r.get::<_, bool>(0))
    })
    .await?;
    // Tombstones are pruned through the faults as the frontier allows. Once every
    // region writes again, nothing older than the last deletes can arrive: every
    // tombstone goes, and the regions still agree.
    let tombstones = "SELECT count(*) FROM mesh.row_versions WHERE deleted AND pk <> '\"*\"'";
    let pruned = "SELECT tombstones_pruned FROM mesh.log_prune";
    for i in 0..3 {
        let admin = &mesh.region(i).admin;
        let left: i64 = admin.query_one(tombstones, &[]).await?.get(0);
        let gone: i64 = admin.query_one(pruned, &[]).await?.get(0);
        eprintln!(
            "{}: {gone} tombstones pruned during the faults, {left} left",
            mesh.region(i).name
        );
    }
    for i in 0..3 {
        let c = mesh.connect_proxy(i).await?;
        c.execute("INSERT INTO acks VALUES ($1, 'last')", &[&(-1 - i as i64)])
            .await?;
        mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    }
    for i in 0..3 {
        let what = format!("{} to prune every tombstone", mesh.region(i).name);
        wait_until(CONVERGE_TIMEOUT, &what, || async {
            let r = mesh.region(i).admin.query_one(tombstones, &[]).await;
            r.is_ok_and(|r| r.get::<_, i64>(0) == 0)
        })
        .await?;
    }
    mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    eprintln!("chaos done in {:?}", started.elapsed());
    mesh.shutdown().await;
    Ok(())
}
