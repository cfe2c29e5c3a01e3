//! The lingers (`--capture-linger-ms`, `--apply-linger-ms`): work that arrives soon
//! after a batch waits and joins the next one; work after a quiet spell goes at once.
//!
//! Three regions in full mesh. `la` captures with a long linger, `lb` applies with
//! one, `lc` lingers nowhere. After a quiet spell, one write in `la` and one in `lc`
//! must be logged and applied in `lb` well within the linger. Right after them, a
//! burst of transactions in each: `la` must log its burst in one append (one
//! transaction of its change log; two when its status tick falls inside), `lc` in
//! several, and `lb` must apply `lc`'s burst in one transaction (two when a
//! heartbeat falls inside) although it arrived in several batches. Every row
//! arrives.

use std::time::Duration;

use anyhow::{ensure, Result};
use pgmesh_tests::regions::{Mesh, NodeSpec, CONVERGE_TIMEOUT};
use pgmesh_tests::wait_row;
use tokio_postgres::Client;

/// Long enough that a write that lingered cannot pass for one that did not, even on
/// a loaded machine, and that a burst of a few quick transactions fits in it.
const LINGER_MS: u64 = 3000;
const BURST: i32 = 5;

/// Waits until region `admin` has row `id` of `notes`.
async fn wait_note(admin: &Client, region: &str, id: i32) -> Result<()> {
    let what = format!("note {id} in {region}");
    let sql = "SELECT 1 FROM notes WHERE id = $1";
    wait_row(admin, CONVERGE_TIMEOUT, &what, sql, &[&id]).await
}

/// Milliseconds from the origin's commit of `origin`'s event that wrote note `id` to
/// its append in the change log of `admin`'s region.
async fn logged_after_ms(admin: &Client, origin: &str, id: i32) -> Result<f64> {
    let row = admin
        .query_one(
            "SELECT (extract(epoch FROM logged_at - commit_ts) * 1000)::float8
               FROM mesh.changelog
              WHERE origin = $1 AND changes->0->'pk'->0->>1 = $2::int::text",
            &[&origin, &id],
        )
        .await?;
    Ok(row.get(0))
}

/// Transactions of `admin`'s change log that logged `origin`'s notes from `from` to
/// `to`.
async fn log_transactions(admin: &Client, origin: &str, from: i32, to: i32) -> Result<i64> {
    let row = admin
        .query_one(
            "SELECT count(DISTINCT xmin::text)
               FROM mesh.changelog
              WHERE origin = $1
                AND (changes->0->'pk'->0->>1)::int BETWEEN $2 AND $3",
            &[&origin, &from, &to],
        )
        .await?;
    Ok(row.get(0))
}

#[tokio::test]
async fn a_burst_joins_one_batch_and_a_write_after_a_quiet_spell_goes_at_once() -> Result<()> {
    let mut mesh = Mesh::start(&["la", "lb", "lc"]).await?;
    mesh.exec_all("CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL)")
        .await?;
    mesh.init_all().await?;
    mesh.start_nodes(|i| NodeSpec {
        linger_ms: Some(match i {
            0 => (LINGER_MS, 0),
            1 => (0, LINGER_MS),
            _ => (0, 0),
        }),
        ..NodeSpec::default()
    })
    .await?;
    let la = mesh.connect_proxy(0).await?;
    let lc = mesh.connect_proxy(2).await?;
    let lb_admin = &mesh.region(1).admin;

    // Every link and capture has done its first batch; then a quiet spell.
    la.execute("INSERT INTO notes VALUES (1, 'first')", &[])
        .await?;
    lc.execute("INSERT INTO notes VALUES (2, 'first')", &[])
        .await?;
    for id in [1, 2] {
        wait_note(lb_admin, "lb", id).await?;
    }
    tokio::time::sleep(Duration::from_millis(LINGER_MS + 500)).await;

    // After the quiet spell: at once, in the origin's log and in lb.
    la.execute("INSERT INTO notes VALUES (10, 'lone')", &[])
        .await?;
    lc.execute("INSERT INTO notes VALUES (20, 'lone')", &[])
        .await?;
    for id in [10, 20] {
        wait_note(lb_admin, "lb", id).await?;
    }
    for (origin, id, admin) in [
        ("la", 10, &mesh.region(0).admin),
        ("la", 10, lb_admin),
        ("lc", 20, lb_admin),
    ] {
        let ms = logged_after_ms(admin, origin, id).await?;
        ensure!(
            ms < LINGER_MS as f64,
            "note {id} of {origin} was logged {ms:.0} ms after its commit: it lingered"
        );
    }

    // A burst right after: one transaction each, a few milliseconds apart.
    for n in 0..BURST {
        la.execute("INSERT INTO notes VALUES ($1, 'burst')", &[&(100 + n)])
            .await?;
        lc.execute("INSERT INTO notes VALUES ($1, 'burst')", &[&(200 + n)])
            .await?;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    for id in (100..100 + BURST).chain(200..200 + BURST) {
        wait_note(lb_admin, "lb", id).await?;
    }
    // One batch each, or two: capture's status tick (once a second) appends a
    // lingering batch early, and a peer's heartbeat (once a second) ends a fold; either
    // may fall inside the burst. Without the lingers, each takes one per transaction.
    let la_appends = log_transactions(&mesh.region(0).admin, "la", 100, 100 + BURST - 1).await?;
    ensure!(
        la_appends <= 2,
        "la logged its burst in {la_appends} appends"
    );
    let lc_appends = log_transactions(&mesh.region(2).admin, "lc", 200, 200 + BURST - 1).await?;
    ensure!(
        lc_appends >= 3,
        "lc (no linger) logged its burst in {lc_appends} append(s): the burst was too quick to \
         show lb's apply linger"
    );
    let lb_applies = log_transactions(lb_admin, "lc", 200, 200 + BURST - 1).await?;
    ensure!(
        lb_applies <= 2,
        "lb applied lc's burst ({lc_appends} appends) in {lb_applies} transactions"
    );
    mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    mesh.shutdown().await;
    Ok(())
}
