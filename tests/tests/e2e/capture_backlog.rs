//! A capture leader working through a backlog keeps reporting: its heartbeat (what
//! `mesh.nodes.alive` reads) and its status updates go on while the stream always
//! has data ready, instead of waiting for the backlog to end. Before, the stream
//! came first and starved them (a 60,000-transaction backlog: heartbeat still for
//! 3.9 s of its 4.0 s). And the region's floor does not overtake the backlog: every
//! transaction of it keeps its commit time as its HLC.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use pgmesh_replicator::capture::Role;
use pgmesh_tests::mesh::{Region, CAPTURE_TIMEOUT};
use pgmesh_tests::wait_until;

/// Transactions committed while no capture runs.
const BACKLOG: i64 = 150_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_working_through_a_backlog_keeps_its_heartbeat() -> Result<()> {
    let region = Region::start("backlog").await?;
    region
        .admin
        .batch_execute(
            "CREATE TABLE t (id bigint PRIMARY KEY);
             CREATE PROCEDURE fill(n bigint) LANGUAGE plpgsql AS $$
             BEGIN
                 FOR i IN 1..n LOOP INSERT INTO t VALUES (i); COMMIT; END LOOP;
             END $$",
        )
        .await?;
    region.init().await?.ok()?;
    region
        .admin
        .batch_execute(&format!("CALL fill({BACKLOG})"))
        .await?;

    let x = region.capture("x");
    wait_until(CAPTURE_TIMEOUT, "x to lead", || async {
        x.role() == Role::Leader
    })
    .await?;
    // Sample the log and the heartbeat until the backlog is logged: the longest
    // time the heartbeat stood still while the log was still catching up.
    let sample = "SELECT (SELECT count(*) FROM mesh.changelog),
                         (SELECT extract(epoch FROM heartbeat)::float8 FROM mesh.node_state
                          WHERE node = 'x')";
    let started = Instant::now();
    let (mut last_beat, mut since, mut longest) = (0.0, Instant::now(), Duration::ZERO);
    loop {
        let row = region.admin.query_one(sample, &[]).await?;
        let (logged, beat): (i64, f64) = (row.get(0), row.get(1));
        if beat != last_beat {
            (last_beat, since) = (beat, Instant::now());
        }
        if logged >= BACKLOG {
            break;
        }
        longest = longest.max(since.elapsed());
        ensure!(
            started.elapsed() < CAPTURE_TIMEOUT,
            "the backlog was not logged in time ({logged} of {BACKLOG})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    println!("backlog of {BACKLOG} logged in {took:?}; heartbeat still for at most {longest:?}");
    ensure!(
        took > Duration::from_secs(3),
        "the backlog took only {took:?}: too short to show anything"
    );
    ensure!(
        longest < Duration::from_millis(2500),
        "the heartbeat stood still for {longest:?} while capture caught up ({took:?})"
    );
    // One session wrote the backlog, so commit times only grow: an HLC above its
    // commit time was raised by something else (a floor ahead of the backlog).
    let raised: i64 = region
        .admin
        .query_one(
            "SELECT count(*) FROM mesh.changelog
             WHERE hlc >> 16 <> floor(extract(epoch FROM commit_ts) * 1000)::int8",
            &[],
        )
        .await?
        .get(0);
    ensure!(raised == 0, "{raised} HLCs differ from their commit times");
    Ok(())
}
