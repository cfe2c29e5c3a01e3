//! Prometheus `/metrics` of a replicating node, read with a plain HTTP/1.1
//! request over a TCP socket.
//!
//! Two regions replicate rows and then resolve one deterministic conflict: both
//! links are paused, each region updates the same row, and the links are
//! resumed. The receiving node's `/metrics` must then show replication lag per
//! `{source,target}`, applied events above zero, the conflict, and zero dead
//! letters, with the counters equal to what `mesh.conflicts` and the node
//! itself report. A link whose peer is down must show it, in `mesh.links` and in
//! the lag metric. This module owns those checks.

use anyhow::{Context, Result};
use pgmesh_tests::regions::{http_get, Mesh, NodeSpec, CONVERGE_TIMEOUT};
use pgmesh_tests::{wait_for, wait_row, wait_until};

const SCHEMA: &str = "CREATE TABLE kv (id int PRIMARY KEY, v text NOT NULL)";

/// The value of the sample `series` (name and labels, exactly as exposed).
pub(crate) fn sample(body: &str, series: &str) -> Result<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .with_context(|| format!("no sample {series} in:\n{body}"))?
        .trim()
        .parse()
        .with_context(|| format!("value of {series}"))
}

/// Two regions with table `kv` and nodes serving `/metrics`.
async fn start(names: &[&str]) -> Result<Mesh> {
    let mut mesh = Mesh::start(names).await?;
    mesh.exec_all(SCHEMA).await?;
    mesh.init_all().await?;
    mesh.start_nodes(|_| NodeSpec {
        metrics: true,
        ..NodeSpec::default()
    })
    .await?;
    Ok(mesh)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_lag_applied_events_conflicts_and_dead_letters() -> Result<()> {
    let mesh = start(&["m_a", "m_b"]).await?;
    let (a, b) = (mesh.connect_proxy(0).await?, mesh.connect_proxy(1).await?);
    a.batch_execute("INSERT INTO kv SELECT g, 'a' FROM generate_series(1, 5) g")
        .await?;
    mesh.wait_converged(CONVERGE_TIMEOUT).await?;

    // A conflict that does not depend on timing: both sides write row 1 while
    // neither can see the other.
    mesh.pause_link(0, "m_b").await?;
    mesh.pause_link(1, "m_a").await?;
    a.execute("UPDATE kv SET v = 'a wrote this' WHERE id = 1", &[])
        .await?;
    b.execute("UPDATE kv SET v = 'b wrote this' WHERE id = 1", &[])
        .await?;
    mesh.resume_link(0, "m_b").await?;
    mesh.resume_link(1, "m_a").await?;
    mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    let conflicts: i64 = mesh
        .region(1)
        .admin
        .query_one(
            "SELECT count(*) FROM mesh.conflicts WHERE tbl = 'public.kv'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(conflicts, 1, "m_b records the update/update conflict");

    let addr = mesh.metrics_addr(1).context("m_b serves metrics")?;
    let (status, body) = http_get(addr, "/metrics").await?;
    assert!(status.contains(" 200 "), "{status}");
    let labels = "{source=\"m_a\",target=\"m_b\"}";
    let lag = sample(&body, &format!("pgmesh_replication_lag_seconds{labels}"))?;
    assert!(lag >= 0.0, "lag {lag}");
    let node = mesh
        .region(1)
        .handle()
        .expect("in-process")
        .metrics
        .link_counters("m_a");
    let applied = sample(&body, &format!("pgmesh_applied_events_total{labels}"))?;
    assert!(applied > 0.0, "applied {applied}");
    assert_eq!(applied as u64, node.applied_events);
    let conflicts_total = sample(&body, &format!("pgmesh_conflicts_total{labels}"))?;
    assert_eq!(conflicts_total as i64, conflicts);
    assert_eq!(
        sample(&body, &format!("pgmesh_dead_letters_total{labels}"))?,
        0.0
    );
    for help in [
        "pgmesh_applied_events_total",
        "pgmesh_conflicts_total",
        "pgmesh_dead_letters_total",
    ] {
        assert!(
            body.contains(&format!("# TYPE {help} counter")),
            "{help} is not a counter"
        );
    }

    // `b` is still connected through m_b's proxy.
    let sessions = sample(&body, "pgmesh_proxy_sessions{region=\"m_b\"}")?;
    assert!(sessions >= 1.0, "open proxy sessions {sessions}");
    b.simple_query("SELECT 1").await?;

    // The change log's retention: its head, how far it was pruned, and (once m_a's
    // link reports it, every 2 s) what m_a has durably applied of m_b's log.
    let head = sample(&body, "pgmesh_changelog_head_seq{region=\"m_b\"}")?;
    assert!(head > 0.0, "head {head}");
    assert_eq!(
        sample(&body, "pgmesh_changelog_pruned_seq{region=\"m_b\"}")?,
        0.0
    );
    let durable = wait_for(
        CONVERGE_TIMEOUT,
        "m_a's durable position in metrics",
        || async {
            let (_, body) = http_get(addr, "/metrics").await?;
            Ok(sample(
                &body,
                "pgmesh_peer_durable_seq{region=\"m_b\",peer=\"m_a\"}",
            )
            .ok())
        },
    )
    .await?;
    assert!(
        durable > 0.0 && durable <= head,
        "durable {durable}, head {head}"
    );

    let (status, _) = http_get(addr, "/nope").await?;
    assert!(status.contains(" 404 "), "{status}");
    mesh.shutdown().await;
    Ok(())
}

/// What a node just logged is shipped to its peers from memory: after a run of
/// single-row commits, `pgmesh_log_reads_total` of the writing node shows reads
/// served from memory, and table reads only for the links' first catch-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_are_served_from_memory_not_the_table() -> Result<()> {
    let mesh = start(&["t_a", "t_b"]).await?;
    let a = mesh.connect_proxy(0).await?;
    // Each commit reaches t_b before the next is made, so capture logs each in an
    // append of its own however loaded the machine is (it folds commits that queue
    // up), and each is one read for the link.
    let b = &mesh.region(1).admin;
    for i in 1..=100 {
        a.execute("INSERT INTO kv VALUES ($1, 'a')", &[&i]).await?;
        let what = format!("row {i} to reach t_b");
        wait_row(
            b,
            CONVERGE_TIMEOUT,
            &what,
            "SELECT 1 FROM kv WHERE id = $1",
            &[&i],
        )
        .await?;
    }
    mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    let addr = mesh.metrics_addr(0).context("t_a serves metrics")?;
    let (_, body) = http_get(addr, "/metrics").await?;
    let memory = sample(
        &body,
        "pgmesh_log_reads_total{region=\"t_a\",source=\"memory\"}",
    )?;
    let table = sample(
        &body,
        "pgmesh_log_reads_total{region=\"t_a\",source=\"table\"}",
    )?;
    println!("peer reads of t_a: {memory} from memory, {table} from the table");
    // The reads must come from memory; the table serves only the links' first
    // catch-up. With the tail disabled: 0 and 61.
    assert!(memory >= 5.0, "100 commits, {memory} reads from memory");
    assert!(
        table <= 10.0 && 4.0 * table <= memory,
        "{table} table reads next to {memory} from memory"
    );
    mesh.shutdown().await;
    Ok(())
}

/// A link whose peer is down shows it. Before, `mesh.links` kept the peer's log head
/// as last seen and reported a lag of 0 for the whole outage, and so did the metric
/// that reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_whose_peer_is_down_shows_a_growing_lag() -> Result<()> {
    let mut mesh = start(&["d_a", "d_b"]).await?;
    let b = mesh.connect_proxy(1).await?;
    b.batch_execute("INSERT INTO kv VALUES (1, 'b')").await?;
    drop(b);
    mesh.wait_converged(CONVERGE_TIMEOUT).await?;
    let up = mesh.link(0, "d_b").await?.context("d_a links from d_b")?;
    assert_eq!((up.status.as_str(), up.lag_ms), ("active", 0), "{up:?}");

    // d_a's link fails to reconnect, marks itself degraded, and its lag is the
    // time since it last heard from d_b.
    mesh.stop_node(1).await?;
    wait_until(CONVERGE_TIMEOUT, "d_a to show d_b down for 2 s", || async {
        matches!(mesh.link(0, "d_b").await, Ok(Some(l))
            if l.status == "degraded" && l.lag_ms >= 2_000)
    })
    .await?;
    let addr = mesh.metrics_addr(0).context("d_a serves metrics")?;
    let series = "pgmesh_replication_lag_seconds{source=\"d_b\",target=\"d_a\"}";
    let (_, body) = http_get(addr, "/metrics").await?;
    let lag = sample(&body, series)?;
    assert!(lag >= 2.0, "lag metric {lag} s with d_b down");
    // And it grows while d_b stays down.
    wait_until(CONVERGE_TIMEOUT, "the lag metric to grow", || async {
        match http_get(addr, "/metrics").await {
            Ok((_, body)) => sample(&body, series).is_ok_and(|now| now >= lag + 1.0),
            Err(_) => false,
        }
    })
    .await?;

    mesh.restart_node(1).await?;
    wait_until(CONVERGE_TIMEOUT, "d_a to see d_b back", || async {
        matches!(mesh.link(0, "d_b").await, Ok(Some(l))
            if l.status == "active" && l.lag_ms == 0)
    })
    .await?;

    // With d_a's own node gone nobody updates its links: one that has not heard
    // from its peer for 30 s shows as degraded, lagging at least that much. A
    // minute of silence, without waiting for it:
    mesh.stop_node(0).await?;
    let admin = &mesh.region(0).admin;
    admin
        .execute(
            "UPDATE mesh.link_state SET contact_at = now() - interval '1 minute'",
            &[],
        )
        .await?;
    let stale = mesh.link(0, "d_b").await?.context("link")?;
    assert_eq!(stale.status, "degraded", "{stale:?}");
    assert!(stale.lag_ms >= 60_000, "{stale:?}");
    // A forgotten (decommissioned) region's link is neither.
    let forgot: bool = admin
        .query_one("SELECT mesh.forget_peer('d_b')", &[])
        .await?
        .get(0);
    assert!(forgot);
    let gone = mesh.link(0, "d_b").await?.context("link")?;
    assert_eq!(
        (gone.status.as_str(), gone.lag_ms),
        ("decommissioned", 0),
        "{gone:?}"
    );

    // It stays so while its peer stays away, however often the link retries, and
    // is active again once the link connects.
    mesh.stop_node(1).await?;
    mesh.restart_node(0).await?;
    let admin = &mesh.region(0).admin;
    let attempt = "SELECT (extract(epoch FROM updated_at) * 1e6)::int8 FROM mesh.link_state WHERE peer = 'd_b'";
    let before: i64 = admin.query_one(attempt, &[]).await?.get(0);
    wait_until(CONVERGE_TIMEOUT, "d_a's link to retry d_b", || async {
        let at = admin.query_one(attempt, &[]).await;
        at.is_ok_and(|r| r.get::<_, i64>(0) > before)
    })
    .await?;
    let away = mesh.link(0, "d_b").await?.context("link")?;
    assert_eq!(away.status, "decommissioned", "{away:?}");
    mesh.restart_node(1).await?;
    wait_until(
        CONVERGE_TIMEOUT,
        "d_a's link from d_b to be active again",
        || async { matches!(mesh.link(0, "d_b").await, Ok(Some(l)) if l.status == "active") },
    )
    .await?;
    mesh.shutdown().await;
    Ok(())
}
