//! `pgmesh init` and `pgmesh log tail`, run as the real binary.
//!
//! `init` must be idempotent (the second run changes nothing and says the
//! catalog is up to date) and must refuse a database that cannot do logical
//! replication, naming the setting to change, before it creates anything.
//! `log tail` must print one readable line per captured change with its hlc,
//! origin, table, op and key, and, when following, print new events as they
//! arrive. `run` started before its database must wait for it and then capture.
//! This module owns those command-line checks.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use pgmesh_tests::mesh::{hlc_text, LogEvent, Region};
use pgmesh_tests::{
    connect, pgmesh_bin, pgmesh_output, wait_for, wait_until, AuthMethod, ClusterOptions,
    PgmeshProcess, DEFAULT_TIMEOUT,
};
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test]
async fn init_is_idempotent() -> Result<()> {
    let region = Region::start("idem").await?;
    region
        .admin
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await?;
    let first = region.init().await?.ok()?;
    assert!(
        first.stdout.contains("applied migrations"),
        "{}",
        first.stdout
    );
    assert!(
        first.stdout.contains("slot: pgmesh_idem (created)"),
        "{}",
        first.stdout
    );
    let catalog = "SELECT (SELECT count(*) FROM mesh.schema_versions),
                          (SELECT count(*) FROM pg_replication_slots),
                          (SELECT count(*) FROM pg_publication_tables WHERE pubname = 'pgmesh'),
                          (SELECT count(*) FROM mesh.regions WHERE is_local)";
    let read = |r: tokio_postgres::Row| -> (i64, i64, i64, i64) {
        (r.get(0), r.get(1), r.get(2), r.get(3))
    };
    let before = read(region.admin.query_one(catalog, &[]).await?);
    let second = region.init().await?.ok()?;
    assert!(
        second.stdout.contains("catalog: up to date"),
        "{}",
        second.stdout
    );
    assert!(
        second.stdout.contains("slot: pgmesh_idem (exists)"),
        "{}",
        second.stdout
    );
    let after = read(region.admin.query_one(catalog, &[]).await?);
    assert_eq!(before, after, "the second init changed the catalog");
    assert_eq!(after.1, 1, "one slot");
    assert_eq!(after.2, 1, "public.t published, mesh.* not");
    Ok(())
}

#[tokio::test]
async fn init_refuses_wal_level_replica_and_names_the_setting() -> Result<()> {
    let opts = ClusterOptions::default().setting("wal_level", "replica");
    let region = Region::start_with("replica", opts).await?;
    let out = region.init().await?;
    assert!(!out.success(), "init must fail: {}", out.stdout);
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(
        text.contains("wal_level"),
        "the error names wal_level:\n{text}"
    );
    assert!(text.contains("logical"), "and the value to set:\n{text}");
    let schema: Option<String> = region
        .admin
        .query_one("SELECT to_regnamespace('mesh')::text", &[])
        .await?
        .get(0);
    assert_eq!(
        schema, None,
        "nothing is installed when a prerequisite is missing"
    );
    Ok(())
}

#[tokio::test]
async fn init_without_replication_privilege_names_it() -> Result<()> {
    let region = Region::start("noprivs").await?;
    region
        .admin
        .batch_execute("CREATE ROLE plain LOGIN")
        .await?;
    let url = format!(
        "postgres://plain@127.0.0.1:{}/postgres",
        region.cluster.port()
    );
    let out = pgmesh_output(&["init", "--upstream", &url, "--region", "noprivs"]).await?;
    assert!(!out.success(), "init must fail");
    assert!(out.stderr.contains("REPLICATION"), "{}", out.stderr);
    Ok(())
}

#[tokio::test]
async fn init_refuses_to_publish_schema_mesh() -> Result<()> {
    let region = Region::start("meshsel").await?;
    let url = region.url();
    for sel in [["--schemas", "public,mesh"], ["--tables", "mesh.changelog"]] {
        let args = [
            "init",
            "--upstream",
            &url,
            "--region",
            "meshsel",
            sel[0],
            sel[1],
        ];
        let out = pgmesh_output(&args).await?;
        assert!(!out.success(), "init {sel:?} must fail: {}", out.stdout);
        assert!(out.stderr.contains("schema mesh"), "{}", out.stderr);
    }
    let published: i64 = region
        .admin
        .query_one("SELECT count(*) FROM pg_publication", &[])
        .await?
        .get(0);
    assert_eq!(published, 0, "a refused init publishes nothing");
    Ok(())
}

#[tokio::test]
async fn init_refuses_a_schema_mesh_that_is_not_its_catalog() -> Result<()> {
    let region = Region::start("foreign").await?;
    let url = region.url();
    let init = ["init", "--upstream", &url, "--region", "foreign"];
    region
        .admin
        .batch_execute("CREATE SCHEMA mesh; CREATE TABLE mesh.orders (id int)")
        .await?;
    let out = pgmesh_output(&init).await?;
    assert!(!out.success(), "init must fail: {}", out.stdout);
    assert!(
        out.stderr.contains("not pgmesh's catalog"),
        "{}",
        out.stderr
    );
    let ours: bool = region
        .admin
        .query_one("SELECT to_regclass('mesh.changelog') IS NOT NULL", &[])
        .await?
        .get(0);
    assert!(!ours, "a refused init creates nothing in the schema");
    // An empty schema mesh is taken.
    region.admin.batch_execute("DROP TABLE mesh.orders").await?;
    let out = pgmesh_output(&init).await?;
    assert!(out.success(), "{}", out.stderr);
    Ok(())
}

/// The line `log tail` prints must name this change's hlc, origin, table, op, key.
fn expect_line(line: &str, e: &LogEvent, i: usize) -> Result<()> {
    let c = &e.changes[i];
    for part in [
        format!("hlc={}", hlc_text(e.hlc)),
        format!("origin={}", e.origin),
        c.table.clone(),
        format!(" {} ", c.op),
        format!("pk=({})", c.pk_text()),
    ] {
        anyhow::ensure!(line.contains(&part), "line {line:?} lacks {part:?}");
    }
    Ok(())
}

/// `pgmesh log tail --last N --no-follow` against `url`, which must succeed.
async fn tail_last(url: &str, n: u32) -> Result<pgmesh_tests::client::CmdOutput> {
    pgmesh_output(&[
        "log",
        "tail",
        "--upstream",
        url,
        "--last",
        &n.to_string(),
        "--no-follow",
    ])
    .await?
    .ok()
}

#[tokio::test]
async fn log_tail_prints_one_line_per_change() -> Result<()> {
    let region = Region::start("tail").await?;
    region
        .admin
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await?;
    region.init().await?.ok()?;
    let _capture = region.capture("cap");
    let proxy = region.proxy("tail-node").await?;
    let p = pgmesh_tests::connect(&proxy.conn_string()).await?;
    p.batch_execute(
        "INSERT INTO t VALUES (1, 'a'), (2, 'b');
         UPDATE t SET v = 'c' WHERE id = 1;
         DELETE FROM t WHERE id = 2;",
    )
    .await?;
    region
        .admin
        .execute("INSERT INTO t VALUES (3, 'direct')", &[])
        .await?;
    region.wait_caught_up().await?;
    let events = region.changelog().await?;
    let expected: Vec<(&LogEvent, usize)> = events
        .iter()
        .flat_map(|e| (0..e.changes.len()).map(move |i| (e, i)))
        .collect();
    assert_eq!(expected.len(), 5);

    let url = region.url();
    let out = tail_last(&url, 100).await?;
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines.len(),
        expected.len(),
        "one line per change:\n{}",
        out.stdout
    );
    for (line, (e, i)) in lines.iter().zip(&expected) {
        expect_line(line, e, *i)?;
    }
    // --last N counts events: the last one is the direct insert.
    let out = tail_last(&url, 1).await?;
    let last: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(last.len(), 1, "{}", out.stdout);
    expect_line(last[0], expected[4].0, expected[4].1)?;
    // ... across gaps in the sequence too (every appender skips ahead on reconnect).
    region
        .admin
        .batch_execute(
            "SELECT setval('mesh.changelog_seq_seq', (SELECT last_value FROM mesh.changelog_seq_seq) + 1000)",
        )
        .await?;
    region
        .admin
        .execute("INSERT INTO t VALUES (5, 'after a gap')", &[])
        .await?;
    region.wait_caught_up().await?;
    let out = tail_last(&url, 2).await?;
    let two: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(two.len(), 2, "{}", out.stdout);
    expect_line(two[0], expected[4].0, expected[4].1)?;
    assert!(two[1].contains("pk=(id=5)"), "{}", two[1]);

    // Following: a new event is printed as it arrives. Only a session that starts
    // from here on is the follower (the runs above may still be listed, idle).
    let spawned: String = region
        .admin
        .query_one("SELECT clock_timestamp()::text", &[])
        .await?
        .get(0);
    let mut child = tokio::process::Command::new(pgmesh_bin()?)
        .args(["log", "tail", "--upstream", &url, "--last", "0"])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?).lines();
    // Wait until the tail is idle after its first read, which follows its LISTEN.
    pgmesh_tests::wait_until(DEFAULT_TIMEOUT, "log tail to follow", || async {
        region
            .admin
            .query_opt(
                "SELECT 1 FROM pg_stat_activity
                 WHERE state = 'idle' AND query LIKE '%FROM mesh.changelog%WHERE seq > $1%'
                   AND backend_start > $1::text::timestamptz",
                &[&spawned],
            )
            .await
            .ok()
            .flatten()
            .is_some()
    })
    .await?;
    p.execute("INSERT INTO t VALUES (4, 'followed')", &[])
        .await?;
    let line = tokio::time::timeout(Duration::from_secs(60), out.next_line())
        .await
        .context("log tail printed nothing for the new event")??
        .context("log tail exited")?;
    region.wait_caught_up().await?;
    let events = region.changelog().await?;
    let e = events.last().context("no events")?;
    expect_line(&line, e, 0)?;
    assert!(line.contains("pk=(id=4)"), "{line}");
    child.kill().await?;
    Ok(())
}

/// A node started while its database is down waits for it, then captures: it must
/// not settle for being a proxy only until someone restarts it.
#[tokio::test]
async fn run_started_before_its_database_captures_once_it_is_up() -> Result<()> {
    let region = Region::start_initialized("late").await?;
    region
        .admin
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await?;
    region.cluster.stop()?;
    let url = region.url();
    let mut node = spawn_run(&url, "late")?;
    wait_until(
        DEFAULT_TIMEOUT,
        "the node to report the database down",
        || {
            let log = node.log();
            async move { log.contains("cannot reach the regional database") }
        },
    )
    .await?;
    assert!(
        node.try_wait()?.is_none(),
        "the node exited instead of waiting:\n{}",
        node.log()
    );
    region.cluster.start_again()?;
    let client = connect(&node.conn_string().await?).await?;
    client
        .batch_execute("INSERT INTO t VALUES (1, 'written after the wait')")
        .await?;
    let logged = wait_logged(&region, "written after the wait").await?;
    assert_eq!(logged, 1, "{}", node.log());
    assert!(
        node.log().contains("reached the regional database"),
        "{}",
        node.log()
    );
    Ok(())
}

/// A node started before `pgmesh init` proxies at once, and captures (and serves its
/// log to peers) once init has run: it must not stay a proxy only until someone
/// restarts it.
#[tokio::test]
async fn run_started_before_init_captures_once_init_has_run() -> Result<()> {
    let region = Region::start("preinit").await?;
    region
        .admin
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await?;
    let url = region.url();
    let mut node = PgmeshProcess::spawn(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &url,
        "--region",
        "preinit",
        "--node",
        "preinit-1",
        "--peer-listen",
        "127.0.0.1:0",
    ])?;
    let client = connect(&node.conn_string().await?).await?;
    client
        .batch_execute("INSERT INTO t VALUES (1, 'proxied before init')")
        .await?;
    assert!(
        node.log().contains("mesh catalog not installed"),
        "{}",
        node.log()
    );
    region.init().await?.ok()?;
    client
        .batch_execute("INSERT INTO t VALUES (2, 'written after init')")
        .await?;
    let logged = wait_logged(&region, "written after init").await?;
    assert_eq!(logged, 1, "{}", node.log());
    let log = node.log();
    for line in [
        "the mesh catalog is installed now",
        "serving the change log to peers",
    ] {
        assert!(log.contains(line), "no {line:?} in\n{log}");
    }
    assert!(node.try_wait()?.is_none(), "{}", node.log());
    Ok(())
}

/// Waits until the change log holds an event whose changes mention `marker`; returns
/// how many do.
async fn wait_logged(region: &Region, marker: &str) -> Result<i64> {
    let direct = region.cluster.connect().await?;
    let pattern = format!("%{marker}%");
    wait_for(DEFAULT_TIMEOUT, "the write to be captured", || {
        let (direct, pattern) = (&direct, &pattern);
        async move {
            let n: i64 = direct
                .query_one(
                    "SELECT count(*) FROM mesh.changelog WHERE changes::text LIKE $1",
                    &[pattern],
                )
                .await?
                .get(0);
            Ok((n > 0).then_some(n))
        }
    })
    .await
}

/// A database that refuses the node's own session (here: a password the URL does
/// not carry) is not waited for: the node runs as a proxy only, and says why.
#[tokio::test]
async fn run_refused_by_its_database_runs_as_a_proxy_only() -> Result<()> {
    let opts = ClusterOptions::default().password_user("app", "s3cret", AuthMethod::ScramSha256);
    let region = Region::start_with("refused", opts).await?;
    region.init().await?.ok()?;
    // Clients bring their own password; the node's URL has none.
    let port = region.cluster.port();
    let url = format!("postgres://app@127.0.0.1:{port}/postgres");
    let mut node = spawn_run(&url, "refused")?;
    let addr = node.listen_addr().await?;
    let conn = format!(
        "host={} port={} user=app password=s3cret dbname=postgres",
        addr.ip(),
        addr.port()
    );
    let client = connect(&conn).await?;
    let who: String = client.query_one("SELECT current_user", &[]).await?.get(0);
    assert_eq!(who, "app");
    let log = node.log();
    assert!(log.contains("refused this node's session"), "{log}");
    assert!(!log.contains("cannot reach the regional database"), "{log}");
    Ok(())
}

/// `pgmesh run` for `region` (node `<region>-1`) on `url`, not waited for.
fn spawn_run(url: &str, region: &str) -> Result<PgmeshProcess> {
    let node = format!("{region}-1");
    PgmeshProcess::spawn(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        url,
        "--region",
        region,
        "--node",
        &node,
    ])
}
