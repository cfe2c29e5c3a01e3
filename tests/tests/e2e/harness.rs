//! Self-test of the harness: real clusters start, answer, fail over and vanish.
//!
//! This target owns the checks that `pgmesh-tests` itself keeps its promises:
//! parallel starts, `wal_level=logical`, the client tools, password auth,
//! crash-and-restart, and cleanup both after a normal drop and while a test
//! panics. It must never test pgmesh itself.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::Duration;

use pgmesh_tests::{connect, wait_until, AuthMethod, ClusterOptions, PgCluster, DEFAULT_TIMEOUT};

#[tokio::test]
async fn two_clusters_start_in_parallel_and_answer() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let (a, b) = tokio::try_join!(
        PgCluster::start_async(ClusterOptions::default()),
        PgCluster::start_async(ClusterOptions::default()),
    )?;
    eprintln!("two clusters started in {:?}", started.elapsed());
    assert_ne!(a.port(), b.port());
    assert_ne!(a.data_dir(), b.data_dir());
    for cluster in [&a, &b] {
        let client = connect(&cluster.conn_string()).await?;
        let one: i32 = client.query_one("SELECT 1", &[]).await?.get(0);
        assert_eq!(one, 1);
        let wal_level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
        assert_eq!(wal_level, "logical");
        let tct: String = client
            .query_one("SHOW track_commit_timestamp", &[])
            .await?
            .get(0);
        assert_eq!(tct, "on");
        assert!(cluster
            .log_contents()
            .contains("ready to accept connections"));
    }
    let via_url = connect(&a.url("postgres")).await?;
    via_url.simple_query("SELECT 1").await?;
    Ok(())
}

#[tokio::test]
async fn data_dir_is_removed_after_drop() -> anyhow::Result<()> {
    let cluster = PgCluster::start_async(ClusterOptions::default()).await?;
    let root = cluster.root_dir().to_path_buf();
    let pid = cluster.postmaster_pid().expect("running");
    assert!(cluster.data_dir().join("PG_VERSION").is_file());
    drop(cluster);
    assert!(!root.exists(), "{} still exists", root.display());
    assert!(!process_running(pid), "postmaster {pid} survived the drop");
    Ok(())
}

#[test]
fn panic_inside_a_test_still_cleans_up() {
    let mut seen: Option<(PathBuf, u32)> = None;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let cluster = PgCluster::start(ClusterOptions::default()).unwrap();
        seen = Some((
            cluster.root_dir().to_path_buf(),
            cluster.postmaster_pid().unwrap(),
        ));
        panic!("deliberate panic while owning a cluster");
    }));
    assert!(result.is_err());
    let (root, pid) = seen.expect("cluster started before the panic");
    assert!(!root.exists(), "{} still exists", root.display());
    assert!(!process_running(pid), "postmaster {pid} survived the panic");
}

#[tokio::test]
async fn kill9_then_start_again_keeps_committed_data() -> anyhow::Result<()> {
    let cluster = PgCluster::start_async(ClusterOptions::default()).await?;
    let client = cluster.connect().await?;
    client
        .batch_execute("CREATE TABLE t (id int primary key); INSERT INTO t VALUES (1)")
        .await?;
    let port = cluster.port();
    let (cluster, ()) = tokio::task::spawn_blocking(move || {
        cluster.kill9()?;
        assert!(!cluster.is_running());
        cluster.start_again()?;
        cluster.restart()?;
        anyhow::Ok((cluster, ()))
    })
    .await??;
    assert_eq!(cluster.port(), port);
    // The old connection died with the server.
    assert!(client.simple_query("SELECT 1").await.is_err());
    let client = cluster.connect().await?;
    let n: i64 = client
        .query_one("SELECT count(*) FROM t", &[])
        .await?
        .get(0);
    assert_eq!(n, 1);
    assert!(cluster
        .log_contents()
        .contains("database system was interrupted"));
    tokio::task::spawn_blocking(move || {
        cluster.stop()?;
        assert!(!cluster.is_running());
        cluster.start_again()?;
        assert!(cluster.is_running());
        anyhow::Ok(())
    })
    .await??;
    Ok(())
}

#[tokio::test]
async fn psql_pgbench_and_password_auth() -> anyhow::Result<()> {
    let opts = ClusterOptions::default()
        .setting("work_mem", "7MB")
        .password_user("scram_user", "s3cret", AuthMethod::ScramSha256)
        .password_user("md5_user", "m d5'pw", AuthMethod::Md5);
    let cluster = PgCluster::start_async(opts).await?;

    assert_eq!(cluster.psql_sql("SHOW work_mem").await?.trim(), "7MB");
    let out = cluster.psql(&["-c", "SELECT broken"]).await?;
    assert!(!out.success());
    assert!(out.stderr.contains("broken"), "{}", out.stderr);

    let db = "postgres";
    for (user, password, method) in [
        ("scram_user", "s3cret", "scram"),
        ("md5_user", "m d5'pw", "md5"),
    ] {
        let good = cluster.conn_string_for(db, user, Some(password));
        let client = connect(&good).await?;
        let who: String = client.query_one("SELECT current_user", &[]).await?.get(0);
        assert_eq!(who, user);
        let bad = cluster.conn_string_for(db, user, Some("wrong"));
        let err = connect(&bad).await.expect_err("wrong password accepted");
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
            "{method}: {err}"
        );
    }
    let stored = cluster
        .psql_sql("SELECT rolname, left(rolpassword, 3) FROM pg_authid WHERE rolname LIKE '%_user' ORDER BY 1")
        .await?;
    assert_eq!(stored.trim(), "md5_user|md5\nscram_user|SCR");

    let init = cluster.pgbench(&["-i", "-q", "-s", "1"]).await?.ok()?;
    assert!(init.stderr.contains("done"), "{}", init.stderr);
    let run = cluster
        .pgbench(&["-c", "2", "-t", "20", "-n"])
        .await?
        .ok()?;
    assert!(
        run.stdout
            .contains("number of transactions actually processed: 40"),
        "{}",
        run.stdout
    );
    Ok(())
}

#[tokio::test]
async fn wait_until_sees_a_change_made_elsewhere() -> anyhow::Result<()> {
    let cluster = PgCluster::start_async(ClusterOptions::default()).await?;
    let client = cluster.connect().await?;
    client.batch_execute("CREATE TABLE flag (v int)").await?;
    let writer = cluster.connect().await?;
    tokio::spawn(async move { writer.batch_execute("INSERT INTO flag VALUES (7)").await });
    wait_until(DEFAULT_TIMEOUT, "the flag row", || async {
        client
            .query_opt("SELECT 1 FROM flag WHERE v = 7", &[])
            .await
            .ok()
            .flatten()
            .is_some()
    })
    .await?;
    let err = wait_until(Duration::from_millis(50), "an impossible row", || async {
        false
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("an impossible row"));
    Ok(())
}

#[test]
fn start_many_gives_distinct_clusters() -> anyhow::Result<()> {
    let clusters = PgCluster::start_many(3, &ClusterOptions::default())?;
    let mut ports: Vec<u16> = clusters.iter().map(|c| c.port()).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 3);
    let roots: Vec<PathBuf> = clusters
        .iter()
        .map(|c| c.root_dir().to_path_buf())
        .collect();
    drop(clusters);
    assert!(roots.iter().all(|r| !r.exists()));
    Ok(())
}

/// Whether `pid` is a live (non-zombie) process.
fn process_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(')').next().map(|r| r.trim_start().to_string()))
        .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
}
