//! Crash safety and leader failover of capture.
//!
//! A steady write load runs against the region from connections that survive
//! every kill (straight to PostgreSQL, and through a separate proxy-only node
//! that stamps); each write is one INSERT of a unique id in its own
//! transaction, recorded by the client only once its commit returned. The real
//! `pgmesh run` binary captures and is SIGKILLed at random moments and started
//! again, or a standby takes over from a killed leader. At the end the change
//! log must equal the committed history exactly: every committed id once, no
//! other, final HLC and source LSN strictly increasing along `seq`. This module
//! owns the load, the kill loops and that check.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pgmesh_replicator::capture::Role;
use pgmesh_tests::mesh::{Region, CAPTURE_TIMEOUT};
use pgmesh_tests::{connect, wait_for, wait_until, PgmeshProcess};
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::capture_exactly_once::assert_log_order;

pub(crate) const TABLE: &str =
    "CREATE TABLE load (id bigint PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())";

/// Writers inserting unique ids, one transaction each, until stopped.
pub(crate) struct Load {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<Result<Vec<i64>>>>,
}

impl Load {
    pub(crate) fn start(conn_strings: &[String]) -> Load {
        let (stop, rx) = watch::channel(false);
        let next = Arc::new(AtomicI64::new(1));
        let tasks = conn_strings
            .iter()
            .map(|conn| {
                let (conn, rx, next) = (conn.clone(), rx.clone(), next.clone());
                tokio::spawn(async move {
                    let c = connect(&conn).await?;
                    let mut committed = Vec::new();
                    while !*rx.borrow() {
                        let id = next.fetch_add(1, Ordering::Relaxed);
                        c.execute("INSERT INTO load (id) VALUES ($1)", &[&id])
                            .await
                            .with_context(|| format!("insert {id}"))?;
                        committed.push(id);
                    }
                    anyhow::Ok(committed)
                })
            })
            .collect();
        Load { stop, tasks }
    }

    /// Stop the writers; every id whose commit returned.
    pub(crate) async fn stop(self) -> Result<BTreeSet<i64>> {
        let _ = self.stop.send(true);
        let mut all = BTreeSet::new();
        for t in self.tasks {
            all.extend(t.await.context("writer panicked")??);
        }
        Ok(all)
    }
}

/// The highest `seq` in the change log (0 when empty).
pub(crate) async fn max_seq(region: &Region) -> Result<i64> {
    Ok(region
        .admin
        .query_one("SELECT coalesce(max(seq), 0) FROM mesh.changelog", &[])
        .await?
        .get(0))
}

/// Wait until the log holds more than `after` rows' worth of `seq`.
pub(crate) async fn wait_log_growth(region: &Region, after: i64, by: i64) -> Result<()> {
    let what = format!("the change log to grow past seq {}", after + by);
    wait_until(CAPTURE_TIMEOUT, &what, || async {
        max_seq(region).await.is_ok_and(|s| s >= after + by)
    })
    .await
}

/// The log must equal `committed`: each id once, nothing else, in order.
pub(crate) async fn assert_log_equals(region: &Region, committed: &BTreeSet<i64>) -> Result<()> {
    region.wait_caught_up().await?;
    let events = region.changelog().await?;
    assert_log_order(&events)?;
    let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
    for e in &events {
        assert_eq!(e.origin, region.name);
        assert_eq!(
            e.changes.len(),
            1,
            "seq {}: one insert per transaction",
            e.seq
        );
        for c in &e.changes {
            assert_eq!((c.table.as_str(), c.op.as_str()), ("public.load", "insert"));
            let id: i64 = c.pk[0].1.as_deref().context("null key")?.parse()?;
            *counts.entry(id).or_default() += 1;
        }
    }
    let logged: BTreeSet<i64> = counts.keys().copied().collect();
    let missing: Vec<_> = committed.difference(&logged).take(20).collect();
    let extra: Vec<_> = logged.difference(committed).take(20).collect();
    let dups: Vec<_> = counts.iter().filter(|(_, &n)| n > 1).take(20).collect();
    assert!(
        missing.is_empty() && extra.is_empty() && dups.is_empty(),
        "log != committed history ({} committed, {} logged): missing {missing:?}, extra {extra:?}, duplicated {dups:?}",
        committed.len(),
        logged.len()
    );
    eprintln!(
        "{} committed writes, each logged exactly once",
        committed.len()
    );
    Ok(())
}

/// Start `pgmesh run` as `node` and wait until it leads capture.
async fn start_leader(region: &Region, node: &str) -> Result<PgmeshProcess> {
    let since = region.db_clock().await?;
    let p = region.spawn_node(node).await?;
    region
        .wait_node_role(node, "leader", &since)
        .await
        .map_err(|e| e.context(format!("pgmesh log:\n{}", p.log())))?;
    Ok(p)
}

async fn kill(mut p: PgmeshProcess) -> Result<()> {
    p.signal("KILL")?;
    p.wait_exit(Duration::from_secs(30)).await?;
    Ok(())
}

async fn crash_loop(name: &str, kills: usize) -> Result<()> {
    let started = Instant::now();
    let region = Region::start(name).await?;
    region.admin.batch_execute(TABLE).await?;
    region.init().await?.ok()?;
    let proxy = region.proxy("loadgen").await?;
    let load = Load::start(&[proxy.conn_string(), region.cluster.conn_string()]);
    let mut rng = rand::rngs::StdRng::from_entropy();
    for k in 0..kills {
        let before = max_seq(&region).await?;
        let node = start_leader(&region, "crashy").await?;
        // This incarnation captured something before it dies.
        wait_log_growth(&region, before, 1)
            .await
            .map_err(|e| e.context(format!("kill {k}; pgmesh log:\n{}", node.log())))?;
        let delay = rng.gen_range(50..=500);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        kill(node).await?;
    }
    let committed = load.stop().await?;
    let _node = start_leader(&region, "crashy").await?;
    assert_log_equals(&region, &committed).await?;
    eprintln!("{kills} kills in {:?}", started.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_20_times_under_load_loses_and_duplicates_nothing() -> Result<()> {
    crash_loop("crash", 20).await
}

/// The long form: `PGMESH_CHAOS=1` runs 100 kills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_sigkill_100_times_under_load() -> Result<()> {
    if std::env::var("PGMESH_CHAOS").as_deref() != Ok("1") {
        eprintln!("skipped: set PGMESH_CHAOS=1 for the 100-kill variant");
        return Ok(());
    }
    crash_loop("chaos", 100).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_from_a_killed_leader_without_a_gap() -> Result<()> {
    let region = Region::start("failover").await?;
    region.admin.batch_execute(TABLE).await?;
    region.init().await?.ok()?;
    let a = start_leader(&region, "node_a").await?;
    let since = region.db_clock().await?;
    let b = region.spawn_node("node_b").await?;
    region.wait_node_role("node_b", "standby", &since).await?;

    let load = Load::start(&[region.cluster.conn_string()]);
    let before = max_seq(&region).await?;
    wait_log_growth(&region, before, 20).await?;
    assert!(
        !b.logged_capture_leader(),
        "b leads while a is alive:\n{}",
        b.log()
    );
    let since = region.db_clock().await?;
    kill(a).await?;
    region
        .wait_node_role("node_b", "leader", &since)
        .await
        .map_err(|e| e.context(format!("node_b log:\n{}", b.log())))?;
    let taken = max_seq(&region).await?;
    wait_log_growth(&region, taken, 20).await?;
    let committed = load.stop().await?;
    assert_log_equals(&region, &committed).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_standby_takes_over_when_the_leader_stops() -> Result<()> {
    let region = Region::start("inproc").await?;
    region.admin.batch_execute(TABLE).await?;
    region.init().await?.ok()?;
    let x = region.capture("x");
    let y = region.capture("y");
    wait_until(CAPTURE_TIMEOUT, "one leader and one standby", || async {
        matches!(
            (x.role(), y.role()),
            (Role::Leader, Role::Standby) | (Role::Standby, Role::Leader)
        )
    })
    .await?;
    let (leader, standby, standby_name) = if x.role() == Role::Leader {
        (x, y, "y")
    } else {
        (y, x, "x")
    };
    // A standby waiting for the lock keeps its heartbeat fresh (every 2 s, well
    // inside the 10 s a heartbeat may be old): it moves on, and mesh.nodes shows the
    // standby alive.
    let (_, first, _) = node_row(&region, standby_name).await?;
    wait_for(
        CAPTURE_TIMEOUT,
        "the standby's heartbeat to move on",
        || async {
            let (role, beat, alive) = node_row(&region, standby_name).await?;
            Ok((beat > first).then_some((role, alive)))
        },
    )
    .await
    .and_then(|(role, alive)| {
        anyhow::ensure!(
            role == "standby" && alive,
            "standby row: {role}, alive {alive}"
        );
        Ok(())
    })?;
    let d = region.cluster.connect().await?;
    let mut committed = BTreeSet::new();
    for id in 1..=10i64 {
        d.execute("INSERT INTO load (id) VALUES ($1)", &[&id])
            .await?;
        committed.insert(id);
    }
    region.wait_caught_up().await?;
    leader.stop().await;
    for id in 11..=15i64 {
        d.execute("INSERT INTO load (id) VALUES ($1)", &[&id])
            .await?;
        committed.insert(id);
    }
    standby.wait_role(Role::Leader).await?;
    for id in 16..=20i64 {
        d.execute("INSERT INTO load (id) VALUES ($1)", &[&id])
            .await?;
        committed.insert(id);
    }
    assert_log_equals(&region, &committed).await?;
    // Nodes that shut down cleanly say so, a standby as well as a leader.
    let z = region.capture("z");
    z.wait_role(Role::Standby).await?;
    z.stop().await;
    standby.stop().await;
    for node in ["z", standby_name] {
        let (role, _, alive) = node_row(&region, node).await?;
        assert_eq!((role.as_str(), alive), ("stopped", false), "node {node}");
    }
    Ok(())
}

/// `node`'s row of `mesh.nodes`: role, heartbeat (as microseconds since the epoch),
/// alive.
async fn node_row(region: &Region, node: &str) -> Result<(String, i64, bool)> {
    let r = region
        .admin
        .query_one(
            "SELECT role, (extract(epoch FROM heartbeat) * 1e6)::int8, alive
             FROM mesh.nodes WHERE node = $1",
            &[&node],
        )
        .await?;
    Ok((r.get(0), r.get(1), r.get(2)))
}

/// Inserts unique ids over a connection it re-opens after every failure, so it
/// keeps writing across a PostgreSQL crash. Returns the acknowledged ids.
fn tolerant_writer(conn: String, stop: watch::Receiver<bool>) -> JoinHandle<BTreeSet<i64>> {
    tokio::spawn(async move {
        let mut acked = BTreeSet::new();
        let mut id = 0i64;
        while !*stop.borrow() {
            let Ok(c) = pgmesh_tests::wait_for(CAPTURE_TIMEOUT, "a connection", || async {
                Ok(connect(&conn).await.ok())
            })
            .await
            else {
                break;
            };
            while !*stop.borrow() {
                id += 1;
                match c.execute("INSERT INTO load (id) VALUES ($1)", &[&id]).await {
                    Ok(_) => acked.insert(id),
                    Err(_) => break,
                };
            }
        }
        acked
    })
}

/// After PostgreSQL itself crashes, the slot may hand capture transactions it
/// already logged (a slot's position is only saved at checkpoints). The log
/// must still hold every committed row exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash_and_restart_keeps_the_log_equal_to_the_table() -> Result<()> {
    let mut region = Region::start("pgcrash").await?;
    region.admin.batch_execute(TABLE).await?;
    region.init().await?.ok()?;
    let _capture = region.capture("cap");
    let (stop, rx) = watch::channel(false);
    let writer = tolerant_writer(region.cluster.conn_string(), rx);
    wait_log_growth(&region, 0, 100).await?;
    // Crash in the middle of the load, then start again on the same data.
    let cluster = &region.cluster;
    std::thread::scope(|s| {
        s.spawn(|| cluster.kill9().and_then(|()| cluster.start_again()))
            .join()
    })
    .map_err(|_| anyhow::anyhow!("crash thread panicked"))??;
    region.admin = region.cluster.connect().await?;
    let after = max_seq(&region).await?;
    wait_log_growth(&region, after, 100).await?;
    let _ = stop.send(true);
    let acked = writer.await?;
    let rows: BTreeSet<i64> = region
        .admin
        .query("SELECT id FROM load", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lost: Vec<_> = acked.difference(&rows).take(20).collect();
    assert!(
        lost.is_empty(),
        "acknowledged but not in the table: {lost:?}"
    );
    assert_log_equals(&region, &rows).await?;
    Ok(())
}
