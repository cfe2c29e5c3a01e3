//! libpq tools through the proxy: psql scripts, pgbench, and the fastpath
//! FunctionCall protocol.
//!
//! This module owns running PostgreSQL's own command-line clients against the
//! proxy and against the server directly, and asserting the same output, exit
//! codes and row counts. psql's `\lo_import`/`\lo_export` drive FunctionCall
//! (`F`/`V`) through libpq's `PQfn`; a raw client checks one call byte by byte.

use std::path::Path;

use anyhow::{Context, Result};
use pgmesh_tests::{pgbench, psql, ClusterOptions, CmdOutput, PgCluster, ProxyNode};
use rand::RngCore;

use crate::support::{cluster_and_proxy, env_refs};
use crate::wire::{self, RawClient};

const SCRIPT: &str = r#"\echo start
CREATE TEMP TABLE s (id int PRIMARY KEY, name text, amount numeric(10,2));
INSERT INTO s SELECT g, 'name ' || g || ' ✓', g * 1.25 FROM generate_series(1, 50) g;
SELECT count(*), sum(amount) FROM s;
BEGIN;
UPDATE s SET amount = amount * 2 WHERE id % 3 = 0;
SAVEPOINT x;
DELETE FROM s;
ROLLBACK TO SAVEPOINT x;
COMMIT;
SELECT id, name, amount FROM s WHERE id <= 10 ORDER BY id;
DO $$ BEGIN RAISE NOTICE 'notice from the script'; END $$;
SELECT 6 * 7 AS answer \gset
\echo answer is :answer
PREPARE twice(int) AS SELECT $1 * 2 AS doubled;
EXECUTE twice(21);
SELECT string_agg(id::text, ',' ORDER BY id) FROM s WHERE id > 45;
\x on
SELECT 1 AS a, 'two' AS b, NULL AS c;
\x off
COPY (SELECT id, name FROM s ORDER BY id LIMIT 3) TO STDOUT WITH (FORMAT csv, HEADER);
SELECT 1 AS one \; SELECT 2 AS two \; SELECT 3 AS three;
\echo end
"#;

/// Run `psql -X <args>` directly and through the proxy.
async fn psql_both(
    cluster: &PgCluster,
    proxy: &ProxyNode,
    args: &[&str],
) -> Result<(CmdOutput, CmdOutput)> {
    let direct = cluster.psql(args).await?;
    let env = proxy.libpq_env();
    let proxied = psql(args, &env_refs(&env)).await?;
    Ok((direct, proxied))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_script_output_matches_direct() -> Result<()> {
    let (cluster, proxy) = cluster_and_proxy(ClusterOptions::default()).await?;
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("script.sql");
    std::fs::write(&script, SCRIPT)?;
    let script = script.to_string_lossy().into_owned();
    let args = ["-v", "ON_ERROR_STOP=1", "-f", &script];
    let (direct, proxied) = psql_both(&cluster, &proxy, &args).await?;
    let proxied = proxied.ok()?;
    for line in [
        "start",
        "answer is 42",
        "      42",
        "46,47,48,49,50",
        "b | two",
        "id,name",
        " three ",
        "1,name 1 ✓",
        "end",
    ] {
        assert!(
            proxied.stdout.contains(line),
            "{line:?} in\n{}",
            proxied.stdout
        );
    }
    assert!(proxied.stderr.contains("NOTICE:  notice from the script"));
    assert_eq!(direct.stdout, proxied.stdout);
    assert_eq!(direct.stderr, proxied.stderr);

    // A failing statement stops the script the same way (exit 3).
    let failing = dir.path().join("failing.sql");
    std::fs::write(
        &failing,
        "SELECT 1 AS before;\nSELECT nope;\nSELECT 2 AS after;\n",
    )?;
    let failing = failing.to_string_lossy().into_owned();
    let args = ["-v", "ON_ERROR_STOP=1", "-f", &failing];
    let (direct, proxied) = psql_both(&cluster, &proxy, &args).await?;
    assert_eq!(proxied.status.code(), Some(3), "{proxied:?}");
    assert_eq!(direct.status.code(), proxied.status.code());
    assert!(proxied.stderr.contains("column \"nope\" does not exist"));
    assert!(!proxied.stdout.contains("after"));
    assert_eq!(direct.stdout, proxied.stdout);
    assert_eq!(direct.stderr, proxied.stderr);
    Ok(())
}

/// The number after `label` in pgbench's report, e.g. `"failed transactions: "`.
fn pgbench_number(out: &CmdOutput, label: &str) -> Result<u64> {
    let rest = out
        .stdout
        .split(label)
        .nth(1)
        .with_context(|| format!("{label:?} not in pgbench output:\n{}", out.stdout))?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .with_context(|| format!("no number after {label:?}"))
}

/// Row counts of the pgbench tables and whether the TPC-B balances add up.
async fn bench_state(cluster: &PgCluster, db: &str) -> Result<(Vec<i64>, bool)> {
    let client = cluster.connect_db(db).await?;
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM pgbench_accounts), \
                    (SELECT count(*) FROM pgbench_branches), \
                    (SELECT count(*) FROM pgbench_tellers), \
                    (SELECT count(*) FROM pgbench_history), \
                    (SELECT coalesce(sum(delta), 0) FROM pgbench_history) \
                      = ALL (ARRAY[(SELECT sum(abalance) FROM pgbench_accounts), \
                                   (SELECT sum(bbalance) FROM pgbench_branches), \
                                   (SELECT sum(tbalance) FROM pgbench_tellers)])",
            &[],
        )
        .await?;
    Ok(((0..4).map(|i| row.get(i)).collect(), row.get(4)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_modes_match_direct() -> Result<()> {
    let (cluster, proxy) = cluster_and_proxy(ClusterOptions::default()).await?;
    cluster.psql_sql("CREATE DATABASE bench_direct").await?;
    cluster.psql_sql("CREATE DATABASE bench_proxy").await?;
    let proxy_env = proxy.libpq_env();
    let proxy_env = env_refs(&proxy_env);
    cluster
        .pgbench(&["-i", "-q", "-s", "1", "bench_direct"])
        .await?
        .ok()?;
    let init = pgbench(&["-i", "-q", "-s", "1", "bench_proxy"], &proxy_env)
        .await?
        .ok()?;
    assert!(init.stderr.contains("done"), "{}", init.stderr);
    assert_eq!(
        bench_state(&cluster, "bench_direct").await?,
        bench_state(&cluster, "bench_proxy").await?
    );

    let mut total = 0;
    for mode in ["simple", "extended", "prepared"] {
        let args = ["-n", "-M", mode, "-c", "4", "-j", "2", "-t", "200"];
        let direct = cluster
            .pgbench(&[&args[..], &["bench_direct"]].concat())
            .await?
            .ok()?;
        let proxied = pgbench(&[&args[..], &["bench_proxy"]].concat(), &proxy_env)
            .await?
            .ok()?;
        total += 800;
        for (what, out) in [("direct", &direct), ("proxy", &proxied)] {
            let processed = pgbench_number(out, "number of transactions actually processed: ")?;
            assert_eq!(processed, 800, "{mode} {what}:\n{}", out.stdout);
            let failed = pgbench_number(out, "number of failed transactions: ")?;
            assert_eq!(failed, 0, "{mode} {what}:\n{}", out.stdout);
        }
        let (counts, balanced) = bench_state(&cluster, "bench_proxy").await?;
        assert_eq!(counts, vec![100_000, 1, 10, total], "{mode}");
        assert!(balanced, "{mode}: TPC-B balances do not add up");
        assert_eq!(
            bench_state(&cluster, "bench_direct").await?,
            (counts, balanced),
            "{mode}: direct and proxy row counts differ"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_objects_through_psql_use_function_call() -> Result<()> {
    let (cluster, proxy) = cluster_and_proxy(ClusterOptions::default()).await?;
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("in.bin");
    let output = dir.path().join("out.bin");
    // Several of libpq's 8 KiB lo_write calls, each one FunctionCall message.
    let mut content = vec![0u8; 300_000];
    rand::thread_rng().fill_bytes(&mut content);
    std::fs::write(&input, &content)?;
    let script = dir.path().join("lo.sql");
    std::fs::write(
        &script,
        format!(
            "\\lo_import '{}'\n\\lo_export :LASTOID '{}'\nSELECT :LASTOID AS oid \\gset\n\\echo oid=:oid\n",
            path_str(&input),
            path_str(&output)
        ),
    )?;
    let env = proxy.libpq_env();
    let out = psql(
        &["-v", "ON_ERROR_STOP=1", "-f", &path_str(&script)],
        &env_refs(&env),
    )
    .await?
    .ok()?;
    assert!(out.stdout.contains("lo_import "), "{}", out.stdout);
    let oid: u32 = out
        .stdout
        .split("oid=")
        .nth(1)
        .and_then(|s| s.trim().parse().ok())
        .with_context(|| format!("no oid in {}", out.stdout))?;
    assert!(
        std::fs::read(&output)? == content,
        "lo_export gave other bytes"
    );
    let direct = cluster.connect().await?;
    let stored: Vec<u8> = direct.query_one("SELECT lo_get($1)", &[&oid]).await?.get(0);
    assert!(stored == content, "the stored large object differs");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_function_call_round_trip() -> Result<()> {
    let (cluster, proxy) = cluster_and_proxy(ClusterOptions::default()).await?;
    let direct = cluster.connect().await?;
    let oid: u32 = direct
        .query_one("SELECT 'int4pl'::regproc::oid", &[])
        .await?
        .get(0);
    let mut client = RawClient::login(proxy.addr()).await?;
    // FunctionCall: oid, 1 format code (binary), 2 args, result binary.
    let mut body = oid.to_be_bytes().to_vec();
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&2i16.to_be_bytes());
    for arg in [40i32, 2] {
        body.extend_from_slice(&4i32.to_be_bytes());
        body.extend_from_slice(&arg.to_be_bytes());
    }
    body.extend_from_slice(&1i16.to_be_bytes());
    client.send(&wire::frame(b'F', &body)).await?;
    let msgs = client.until_ready().await?;
    let tags: String = msgs.iter().map(|m| m.tag as char).collect();
    assert_eq!(tags, "VZ");
    assert_eq!(msgs[0].body, [0, 0, 0, 4, 0, 0, 0, 42]);
    // An error inside a FunctionCall is an ordinary ErrorResponse.
    let mut overflow = body.clone();
    let first_arg = 4 + 2 + 2 + 2 + 4;
    overflow[first_arg..first_arg + 4].copy_from_slice(&i32::MAX.to_be_bytes());
    client.send(&wire::frame(b'F', &overflow)).await?;
    let msgs = client.until_ready().await?;
    assert_eq!(msgs[0].sqlstate().as_deref(), Some("22003"), "{msgs:?}");
    Ok(())
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
