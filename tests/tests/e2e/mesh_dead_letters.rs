//! Dead letters (skip and retry) and pausing and resuming a link.
//!
//! Region `dl_b` alone has `CHECK (balance >= 0)`, so negative balances written
//! in `dl_a` cannot be applied there: each such event must land in `dl_b`'s
//! `mesh.dead_letters` with its error and SQLSTATE 23514 while the link keeps
//! going. `mesh.skip_dead_letter` gives one up; after the constraint is dropped,
//! `mesh.retry_dead_letter` applies the other. Then `dl_b` pauses its link from
//! `dl_a`: new writes in `dl_a` reach the unpaused control region `dl_c` but not
//! `dl_b`, whose backlog grows, until the link is resumed and catches up. `dl_b`
//! and `dl_c` pull only from `dl_a`, so one link owns each dead letter (two
//! links retrying one dead letter race: see `mesh_races`). This module owns
//! that scenario.

use anyhow::Result;
use pgmesh_tests::regions::{Mesh, NodeSpec, CONVERGE_TIMEOUT};
use pgmesh_tests::{wait_for, wait_row};
use tokio_postgres::Client;

const SCHEMA: &str = "CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL)";

/// Ids of `accounts` rows in `c`.
async fn ids(c: &Client) -> Result<Vec<i32>> {
    Ok(c.query("SELECT id FROM accounts ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Waits for the dead letter of the event that wrote account `id`; returns its
/// id, error, SQLSTATE and status.
async fn dead_letter(c: &Client, id: i32) -> Result<(i64, String, Option<String>, String)> {
    let pattern = format!("%[\"id\", \"{id}\"]%");
    wait_for(
        CONVERGE_TIMEOUT,
        &format!("a dead letter for account {id}"),
        || async {
            let row = c
                .query_opt(
                    "SELECT id, error, sqlstate, status FROM mesh.dead_letters
                 WHERE origin = 'dl_a' AND event::text LIKE $1",
                    &[&pattern],
                )
                .await?;
            Ok(row.map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))))
        },
    )
    .await
}

/// Waits until account `id` exists in `c`.
async fn wait_account(c: &Client, id: i32) -> Result<()> {
    let what = format!("account {id} to arrive");
    let sql = "SELECT 1 FROM accounts WHERE id = $1";
    wait_row(c, CONVERGE_TIMEOUT, &what, sql, &[&id]).await
}

/// How far `dl_b` is behind `dl_a`'s change log, in log entries.
async fn backlog(mesh: &Mesh) -> Result<i64> {
    Ok(mesh.head(0).await? - mesh.link(1, "dl_a").await?.expect("link").checkpoint)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_skip_and_retry_and_a_paused_link_catches_up() -> Result<()> {
    let mut mesh = Mesh::start(&["dl_a", "dl_b", "dl_c"]).await?;
    mesh.exec_all(SCHEMA).await?;
    mesh.region(1)
        .admin
        .batch_execute("ALTER TABLE accounts ADD CONSTRAINT balance_nonneg CHECK (balance >= 0)")
        .await?;
    mesh.init_all().await?;
    // dl_b and dl_c pull only from dl_a (dl_c is the control for the pause).
    mesh.start_nodes(|i| NodeSpec {
        peers: (i > 0).then(|| vec!["dl_a".to_string()]),
        ..NodeSpec::default()
    })
    .await?;
    let a = mesh.connect_proxy(0).await?;
    let b = &mesh.region(1).admin;

    // Violations become dead letters; the valid write between them still arrives.
    a.execute("INSERT INTO accounts VALUES (1, -5)", &[])
        .await?;
    a.execute("INSERT INTO accounts VALUES (2, 10)", &[])
        .await?;
    a.execute("INSERT INTO accounts VALUES (3, -7)", &[])
        .await?;
    let (skip_id, error, sqlstate, status) = dead_letter(b, 1).await?;
    assert_eq!(sqlstate.as_deref(), Some("23514"), "error: {error}");
    assert!(error.contains("balance_nonneg"), "error: {error}");
    assert_eq!(status, "pending");
    let (retry_id, _, sqlstate, _) = dead_letter(b, 3).await?;
    assert_eq!(sqlstate.as_deref(), Some("23514"));
    wait_account(b, 2).await?;
    mesh.wait_quiescent(CONVERGE_TIMEOUT).await?;
    assert_eq!(
        ids(b).await?,
        [2],
        "only the valid account is applied in dl_b"
    );
    assert_eq!(
        ids(&mesh.region(2).admin).await?,
        [1, 2, 3],
        "dl_c has no constraint"
    );
    let counters = mesh
        .region(1)
        .handle()
        .expect("in-process")
        .metrics
        .link_counters("dl_a");
    assert_eq!(counters.dead_letters, 2);

    // Skip one.
    b.execute("SELECT mesh.skip_dead_letter($1)", &[&skip_id])
        .await?;
    let status: String = b
        .query_one(
            "SELECT status FROM mesh.dead_letters WHERE id = $1",
            &[&skip_id],
        )
        .await?
        .get(0);
    assert_eq!(status, "skipped");
    let again = b
        .execute("SELECT mesh.skip_dead_letter($1)", &[&skip_id])
        .await;
    assert_eq!(
        again
            .as_ref()
            .err()
            .and_then(|e| e.code())
            .map(|c| c.code()),
        Some("42704"),
        "a skipped dead letter cannot be skipped again: {again:?}"
    );

    // A retry that fails again records the new error and its SQLSTATE.
    b.batch_execute(
        "ALTER TABLE accounts DROP CONSTRAINT balance_nonneg;
         CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN RAISE EXCEPTION 'refused by a trigger'; END $$;
         CREATE TRIGGER refuse BEFORE INSERT ON accounts FOR EACH ROW EXECUTE FUNCTION refuse();
         ALTER TABLE accounts ENABLE ALWAYS TRIGGER refuse",
    )
    .await?;
    b.execute("SELECT mesh.retry_dead_letter($1)", &[&retry_id])
        .await?;
    let (error, sqlstate) = wait_for(CONVERGE_TIMEOUT, "the retry to fail again", || async {
        let r = b
            .query_one(
                "SELECT status, attempts, error, sqlstate FROM mesh.dead_letters WHERE id = $1",
                &[&retry_id],
            )
            .await?;
        let (status, attempts): (String, i32) = (r.get(0), r.get(1));
        Ok((status == "pending" && attempts >= 2)
            .then(|| (r.get::<_, String>(2), r.get::<_, Option<String>>(3))))
    })
    .await?;
    // P0001, as a trigger raises it: a data error too, not one that stalls the link.
    assert_eq!(sqlstate.as_deref(), Some("P0001"), "error: {error}");
    assert!(error.contains("refused by a trigger"), "error: {error}");

    // Fix the cause and retry again.
    b.batch_execute("DROP TRIGGER refuse ON accounts").await?;
    b.execute("SELECT mesh.retry_dead_letter($1)", &[&retry_id])
        .await?;
    wait_account(b, 3).await?;
    let (status, attempts, balance): (String, i32, i32) = {
        let r = b
            .query_one(
                "SELECT d.status, d.attempts, a.balance FROM mesh.dead_letters d, accounts a
                 WHERE d.id = $1 AND a.id = 3",
                &[&retry_id],
            )
            .await?;
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!((status.as_str(), balance), ("applied", -7), "after a retry");
    assert!(attempts >= 3, "attempts {attempts}");
    assert_eq!(ids(b).await?, [2, 3], "the skipped account stays skipped");

    // Pause dl_b's link from dl_a.
    mesh.wait_quiescent(CONVERGE_TIMEOUT).await?;
    mesh.pause_link(1, "dl_a").await?;
    let paused = mesh.link(1, "dl_a").await?.expect("the link exists");
    assert_eq!(paused.status, "paused");
    let backlog_before = backlog(&mesh).await?;
    for id in 10..15 {
        a.execute("INSERT INTO accounts VALUES ($1, 1)", &[&id])
            .await?;
    }
    // The control region, which pulls from dl_a too, has them ...
    wait_account(&mesh.region(2).admin, 14).await?;
    // ... and dl_b does not, and knows it is behind.
    assert_eq!(ids(b).await?, [2, 3], "writes arrived over a paused link");
    let link = mesh.link(1, "dl_a").await?.expect("link");
    assert_eq!(link.status, "paused");
    assert_eq!(
        link.checkpoint, paused.checkpoint,
        "a paused link applied something"
    );
    let backlog_paused = backlog(&mesh).await?;
    assert!(
        backlog_paused >= backlog_before + 5,
        "backlog {backlog_before} -> {backlog_paused}"
    );
    // mesh.links in dl_b shows it too, and keeps up with later writes: a paused link
    // still reads the peer's head now and then.
    let shown = |at_least: i64| {
        let mesh = &mesh;
        wait_for(
            CONVERGE_TIMEOUT,
            "mesh.links to show the paused backlog",
            move || async move {
                let link = mesh.link(1, "dl_a").await?.expect("link");
                Ok((link.backlog >= at_least && link.lag_ms > 0).then_some(link))
            },
        )
    };
    let first = shown(backlog_paused).await?;
    assert_eq!(first.status, "paused");
    for id in 15..17 {
        a.execute("INSERT INTO accounts VALUES ($1, 1)", &[&id])
            .await?;
    }
    let later = shown(first.backlog + 2).await?;
    assert_eq!(later.checkpoint, paused.checkpoint);

    // Resume: it catches up.
    mesh.resume_link(1, "dl_a").await?;
    wait_account(b, 16).await?;
    mesh.wait_quiescent(CONVERGE_TIMEOUT).await?;
    let link = mesh.link(1, "dl_a").await?.expect("link");
    assert_eq!((link.status.as_str(), link.backlog), ("active", 0));
    assert_eq!(ids(b).await?, [2, 3, 10, 11, 12, 13, 14, 15, 16]);
    assert_eq!(
        mesh.checksums(0).await?,
        mesh.checksums(2).await?,
        "dl_a and dl_c agree"
    );
    mesh.shutdown().await;
    Ok(())
}
