//! Three-region convergence under random concurrent writes, and pgbench on two
//! regions at once.
//!
//! Both tests write through every region's proxy at the same time, wait until
//! the mesh is quiet (every write captured, every link caught up with its peer's
//! log, no log growing), and then demand an identical checksum of every table in
//! every region. The random test also checks *who* won: the final state of each
//! key must be the change with the highest `(hlc, origin_id)` among all changes
//! the regions originated, as last-writer-wins predicts. This module owns the
//! workloads; the mesh fixture is `pgmesh_tests::regions`.

use std::time::Instant;

use anyhow::{Context, Result};
use pgmesh_tests::regions::{Mesh, NodeSpec, CONVERGE_TIMEOUT};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SCHEMA: &str = "
CREATE TABLE kv (id int PRIMARY KEY, val text NOT NULL, n int NOT NULL DEFAULT 0);
CREATE TABLE pairs (a int, b text, v text, PRIMARY KEY (a, b));";

/// The key space: small, so regions fight over the same rows.
const KEYS: i32 = 20;
const CLIENTS_PER_REGION: u64 = 3;
const OPS_PER_CLIENT: usize = 100;

/// Random inserts, updates, deletes and small multi-statement transactions on
/// the shared key space. Returns how many statements or transactions committed.
async fn random_writes(conn: String, tag: String, seed: u64) -> Result<usize> {
    let mut c = pgmesh_tests::connect(&conn).await?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut committed = 0;
    for i in 0..OPS_PER_CLIENT {
        let key: i32 = rng.gen_range(0..KEYS);
        // A second key, never the first: a transaction that writes one row twice
        // is covered by its own test below.
        let other: i32 = (key + rng.gen_range(1..KEYS)) % KEYS;
        let val = format!("{tag}-{i}");
        let b = ["x", "y"][rng.gen_range(0..2)];
        let r = match rng.gen_range(0..100) {
            0..=34 => c
                .execute(
                    "INSERT INTO kv (id, val) VALUES ($1, $2)
                     ON CONFLICT (id) DO UPDATE SET val = excluded.val, n = kv.n + 1",
                    &[&key, &val],
                )
                .await
                .map(drop),
            35..=59 => c
                .execute("UPDATE kv SET val = $2, n = n + 1 WHERE id = $1", &[&key, &val])
                .await
                .map(drop),
            60..=74 => c.execute("DELETE FROM kv WHERE id = $1", &[&key]).await.map(drop),
            75..=84 => c
                .execute(
                    "INSERT INTO pairs VALUES ($1, $2, $3) ON CONFLICT (a, b) DO UPDATE SET v = excluded.v",
                    &[&(key % 5), &b, &val],
                )
                .await
                .map(drop),
            85..=89 => c
                .execute("DELETE FROM pairs WHERE a = $1 AND b = $2", &[&(key % 5), &b])
                .await
                .map(drop),
            _ => {
                // One event with several changes to different rows.
                let tx = c.transaction().await?;
                let r = async {
                    tx.execute("UPDATE kv SET val = $2, n = n + 10 WHERE id = $1", &[&key, &val])
                        .await?;
                    tx.execute(
                        "INSERT INTO kv (id, val) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET val = excluded.val",
                        &[&other, &val],
                    )
                    .await?;
                    tx.execute("DELETE FROM pairs WHERE a = $1", &[&(other % 5)]).await?;
                    Ok::<_, tokio_postgres::Error>(())
                }
                .await;
                match r {
                    Ok(()) => tx.commit().await,
                    Err(e) => Err(e),
                }
            }
        };
        match r {
            Ok(()) => committed += 1,
            // Two local writers can deadlock on the same keys; that is not ours.
            Err(e) if e.code().is_some() => {}
            Err(e) => return Err(e).with_context(|| format!("{tag} op {i}")),
        }
    }
    Ok(committed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_regions_converge_to_the_lww_winners() -> Result<()> {
    let started = Instant::now();
    let mut mesh = Mesh::start(&["east", "west", "south"]).await?;
    mesh.exec_all(SCHEMA).await?;
    mesh.init_all().await?;
    mesh.start_nodes(|_| NodeSpec::default()).await?;
    let seed: u64 = rand::random();
    eprintln!("mesh up in {:?}; workload seed {seed}", started.elapsed());

    let mut writers = Vec::new();
    for region in 0..3 {
        for client in 0..CLIENTS_PER_REGION {
            let tag = format!("{}{client}", mesh.region(region).name);
            let seed = seed ^ (region as u64 * 100 + client);
            writers.push(tokio::spawn(random_writes(
                mesh.proxy_conn_string(region)?,
                tag,
                seed,
            )));
        }
    }
    let mut committed = 0;
    for w in writers {
        committed += w.await??;
    }
    let wrote = started.elapsed();
    let converged = mesh.wait_converged(CONVERGE_TIMEOUT).await;
    let sums = converged.as_ref().cloned().unwrap_or_default();
    eprintln!(
        "{committed} writes committed by {wrote:?}; converged at {:?}: {sums:?}",
        started.elapsed()
    );
    assert!(committed > 600, "only {committed} writes committed");

    for i in 0..3 {
        let name = &mesh.region(i).name;
        assert!(
            !mesh.own_changes(i).await?.is_empty(),
            "{name} originated nothing"
        );
    }
    let (expected, wrong) = mesh.lww_check().await?;
    assert!(expected.keys().any(|(t, _)| t == "public.kv"));
    assert!(expected.keys().any(|(t, _)| t == "public.pairs"));
    assert!(
        wrong.is_empty(),
        "regions do not hold the LWW winners:\n{}",
        wrong.join("\n")
    );
    converged?;
    let mut conflicts = 0i64;
    for r in &mesh.regions {
        conflicts += r
            .admin
            .query_one("SELECT count(*) FROM mesh.conflicts", &[])
            .await?
            .get::<_, i64>(0);
    }
    eprintln!(
        "{} keys, {conflicts} conflicts recorded; done in {:?}",
        expected.len(),
        started.elapsed()
    );
    mesh.shutdown().await;
    Ok(())
}

/// The count after `label` in pgbench's report ("... processed: 1234").
fn pgbench_count(stdout: &str, label: &str) -> Result<i64> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.split('/').next()?.parse().ok())
        .with_context(|| format!("no {label:?} in pgbench output:\n{stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_on_two_regions_at_once_converges() -> Result<()> {
    let started = Instant::now();
    let mut mesh = Mesh::start(&["bench_a", "bench_b"]).await?;
    // DDL does not replicate: both regions get the same (deterministic) pgbench
    // data before init, straight from pgbench.
    let (a, b) = tokio::join!(
        mesh.region(0).cluster.pgbench(&["-i", "-s", "1", "-q"]),
        mesh.region(1).cluster.pgbench(&["-i", "-s", "1", "-q"]),
    );
    a?.ok()?;
    b?.ok()?;
    assert_eq!(mesh.checksums(0).await?, mesh.checksums(1).await?);
    mesh.init_all().await?;
    mesh.start_nodes(|_| NodeSpec::default()).await?;

    let env = |i: usize| -> Result<Vec<(&'static str, String)>> {
        let conn = mesh.proxy_conn_string(i)?;
        let port = conn
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("port="))
            .context("port")?
            .to_string();
        Ok(vec![
            ("PGHOST", "127.0.0.1".into()),
            ("PGPORT", port),
            ("PGUSER", "postgres".into()),
            ("PGDATABASE", "postgres".into()),
        ])
    };
    let (env_a, env_b) = (env(0)?, env(1)?);
    let run = |e: Vec<(&'static str, String)>| async move {
        let e: Vec<(&str, &str)> = e.iter().map(|(k, v)| (*k, v.as_str())).collect();
        // Apply and the local clients lock the same hot rows (one branch): a
        // deadlock between them is retried by pgbench, as an application would.
        // `-n`: no pre-run vacuum, whose TRUNCATE of pgbench_history in one region
        // would race the other region's inserts (see mesh_races).
        pgmesh_tests::pgbench(
            &["-n", "-c", "4", "-j", "2", "-T", "10", "--max-tries=50"],
            &e,
        )
        .await
    };
    let (a, b) = tokio::join!(run(env_a), run(env_b));
    let (a, b) = (a?.ok()?, b?.ok()?);
    let processed = pgbench_count(&a.stdout, "number of transactions actually processed: ")?
        + pgbench_count(&b.stdout, "number of transactions actually processed: ")?;
    let bench_done = started.elapsed();

    let converged = mesh.wait_converged(CONVERGE_TIMEOUT).await;
    if converged.is_err() {
        // Which history inserts each region logged (per origin) and holds.
        for r in &mesh.regions {
            let logged = r
                .admin
                .query(
                    "SELECT c.origin, count(*) FROM mesh.changelog c, jsonb_array_elements(c.changes::jsonb) x
                     WHERE x->>'table' = 'public.pgbench_history' GROUP BY 1 ORDER BY 1",
                    &[],
                )
                .await?;
            let logged: Vec<(String, i64)> = logged.iter().map(|r| (r.get(0), r.get(1))).collect();
            let rows: i64 = r
                .admin
                .query_one("SELECT count(*) FROM pgbench_history", &[])
                .await?
                .get(0);
            eprintln!(
                "{}: {rows} history rows; logged inserts by origin {logged:?}",
                r.name
            );
        }
    }
    let sums = converged?;
    eprintln!(
        "pgbench: {processed} transactions in both regions by {bench_done:?}; converged at {:?}: {sums:?}",
        started.elapsed()
    );
    for t in [
        "public.pgbench_accounts",
        "public.pgbench_branches",
        "public.pgbench_tellers",
        "public.pgbench_history",
    ] {
        assert!(sums.contains_key(t), "{t} missing from {sums:?}");
    }
    // Every transaction pgbench saw commit, in either region, left exactly one
    // history row in every region.
    for r in &mesh.regions {
        let history: i64 = r
            .admin
            .query_one("SELECT count(*) FROM pgbench_history", &[])
            .await?
            .get(0);
        assert_eq!(history, processed, "pgbench_history rows in {}", r.name);
    }
    mesh.shutdown().await;
    Ok(())
}
