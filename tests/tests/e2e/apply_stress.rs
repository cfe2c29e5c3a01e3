//! The capture race under load: local writers and a stream of remote changes hit
//! the same three rows at once (three new ones every 100 ms, for a few seconds), on one database with capture
//! and apply running as in a node. Afterwards every row must hold the image of the
//! newest change to it (by version, over the remote events sent and the local ones
//! capture logged), and its stored version must be that change's. A remote change
//! applied over a local write that capture had not yet logged, or a version stored
//! over a newer one, breaks this for some row.
//!
//! Now and then a local writer truncates the table, and a remote event truncates it
//! and inserts a row: a TRUNCATE is a change to every row older than it.
//!
//! `PGMESH_STRESS_SECS` sets how long it writes (default 4).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use pgmesh_proxy::node;
use pgmesh_replicator::apply::{Applier, ApplyError};
use pgmesh_replicator::capture::{CaptureConfig, Role};
use pgmesh_replicator::catalog::{self, origin_id_for, TableSelection};
use pgmesh_replicator::event::{Change, ChangeEvent, Op};
use pgmesh_replicator::hlc::Hlc;
use pgmesh_replicator::log::Logged;
use pgmesh_replicator::pgoutput::Lsn;
use pgmesh_tests::{wait_until, ClusterOptions, PgCluster};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

const KEYS: i32 = 3;

/// The writers move on to three new keys every this many milliseconds, so that each
/// round's rows end in the middle of a race, and each is checked.
const ROUND_MS: u128 = 100;

/// A key of the current round.
fn key(started: Instant, rng: &mut StdRng) -> i32 {
    (started.elapsed().as_millis() / ROUND_MS) as i32 * KEYS + rng.gen_range(0..KEYS)
}

/// A version, and the place of the change in its transaction: (hlc, origin id,
/// index in the event's changes). A TRUNCATE and an insert after it in one
/// transaction share the version; the insert comes later.
type At = (u64, i16, usize);

/// One version of a row and the value it left (None: deleted).
type Written = (At, Option<String>);

/// What happened to the table: each row's versions, and the TRUNCATEs.
#[derive(Default)]
struct History {
    rows: HashMap<i32, Vec<Written>>,
    truncates: Vec<At>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A remote change to `id` (a delete when `val` is None).
pub(crate) fn remote_change(id: i32, val: Option<&str>) -> Change {
    let pk = vec![("id".to_string(), Some(id.to_string()))];
    let (op, new, types) = match val {
        Some(v) => (
            Op::Insert,
            Some(vec![
                pk[0].clone(),
                ("val".to_string(), Some(v.to_string())),
            ]),
            vec![23, 25],
        ),
        None => (Op::Delete, None, vec![23]),
    };
    Change {
        table: "public.kv".into(),
        op,
        pk,
        old: None,
        new,
        unchanged: Vec::new(),
        types,
        prev: None,
    }
}

/// Local upserts, updates and deletes on the keys until `stop`.
async fn local_writer(
    url: String,
    w: u64,
    started: Instant,
    stop: watch::Receiver<bool>,
) -> Result<u64> {
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let mut rng = StdRng::seed_from_u64(w);
    let mut n = 0u64;
    while !*stop.borrow() {
        let key = key(started, &mut rng);
        let val = format!("L{w}-{n}");
        let r = match rng.gen_range(0..10) {
            0..=5 => {
                c.execute(
                    "INSERT INTO kv VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET val = excluded.val",
                    &[&key, &val],
                )
                .await
            }
            6..=7 => {
                c.execute("UPDATE kv SET val = $2 WHERE id = $1", &[&key, &val])
                    .await
            }
            _ if rng.gen_range(0..150) == 0 => c.execute("TRUNCATE kv", &[]).await,
            _ => c.execute("DELETE FROM kv WHERE id = $1", &[&key]).await,
        };
        // Deadlocks between local writers are theirs, not ours.
        if let Err(e) = r {
            ensure!(e.code().is_some(), "local writer {w}: {e}");
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..3))).await;
    }
    Ok(n)
}

/// Adds the local changes capture logged to `into`.
async fn local_versions(admin: &tokio_postgres::Client, into: &mut History) -> Result<()> {
    let near = origin_id_for("near");
    for r in admin
        .query(
            "SELECT hlc, changes::text FROM mesh.changelog WHERE origin = 'near'",
            &[],
        )
        .await?
    {
        let hlc: i64 = r.get(0);
        let changes: Vec<Change> = serde_json::from_str(r.get(1))?;
        for (i, c) in changes.iter().enumerate() {
            if c.table != "public.kv" {
                continue;
            }
            let at = (hlc as u64, near, i);
            if c.op == Op::Truncate {
                into.truncates.push(at);
                continue;
            }
            let id: i32 = c.pk[0].1.as_deref().unwrap_or_default().parse()?;
            let val = match c.op {
                Op::Delete => None,
                _ => c
                    .new
                    .as_ref()
                    .and_then(|n| n.iter().find(|(k, _)| k == "val"))
                    .and_then(|(_, v)| v.clone()),
            };
            into.rows.entry(id).or_default().push((at, val));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_end_as_their_newest_change_with_local_and_remote_writers_racing() -> Result<()> {
    pgmesh_tests::init_tracing();
    let secs: u64 = std::env::var("PGMESH_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let cluster = PgCluster::start_async(ClusterOptions::default()).await?;
    let url = cluster.url("postgres");
    let admin = cluster.connect().await?;
    admin
        .batch_execute("CREATE TABLE kv (id int PRIMARY KEY, val text NOT NULL)")
        .await?;
    catalog::init(&url, "near", &TableSelection::default()).await?;
    let capture = node::spawn(CaptureConfig::new(&url, "near", "n1"));
    wait_until(Duration::from_secs(30), "capture to lead", || async {
        capture.role() == Role::Leader
    })
    .await?;
    let regions = vec!["far".to_string()];
    let mut applier =
        Applier::connect(&url, "near", "far", &regions, Some(capture.progress())).await?;

    let (stop, rx) = watch::channel(false);
    let started = Instant::now();
    let writers: Vec<_> = (0..3)
        .map(|w| tokio::spawn(local_writer(url.clone(), w, started, rx.clone())))
        .collect();
    // Remote changes with versions around now (some older than the local writes
    // they meet, some newer), in batches of one to three events, in HLC order.
    let far = origin_id_for("far");
    let mut sent = History::default();
    let mut rng = StdRng::seed_from_u64(7);
    let mut last = 0u64;
    let mut seq = 0i64;
    let mut behind = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        let mut batch = Vec::new();
        for _ in 0..rng.gen_range(1..=3) {
            seq += 1;
            let ms = now_ms() + 30 - rng.gen_range(0..60);
            let hlc = Hlc::from_parts(ms, 0).as_u64().max(last + 1);
            last = hlc;
            let id = key(started, &mut rng);
            let val = (rng.gen_range(0..4) != 0).then(|| format!("R-{seq}"));
            let mut changes = vec![remote_change(id, val.as_deref())];
            if rng.gen_range(0..40) == 0 {
                // TRUNCATE kv, then the change.
                changes.insert(0, Change::truncate("public.kv".into()));
                sent.truncates.push((hlc, far, 0));
            }
            let at = (hlc, far, changes.len() - 1);
            sent.rows.entry(id).or_default().push((at, val));
            batch.push(Logged {
                seq,
                event: ChangeEvent {
                    origin: "far".into(),
                    hlc: Hlc::from_u64(hlc),
                    source_lsn: seq as u64,
                    xid: seq as u32,
                    commit_ts_us: (ms * 1000) as i64,
                    stamp: None,
                    local_only: false,
                    changes,
                },
            });
        }
        // As a link does, the batch is tried again, after a pause, when capture kept
        // falling behind the local writers: they churn these very rows without
        // pause, so a key absent at one lock can be back at the next. Once the
        // writing time is up the writers stop, and then the batch must go through.
        while let Err(e) = applier.apply_batch("far", &batch, seq, seq).await {
            behind += 1;
            // A TRUNCATE's table lock may also time out behind a local writer, or
            // deadlock with one more often than apply resolves again.
            let transient = matches!(e, ApplyError::CaptureBehind(_))
                || ["lock timeout", "deadlock detected"]
                    .iter()
                    .any(|m| e.to_string().contains(m));
            ensure!(
                transient && started.elapsed() < Duration::from_secs(secs + 60),
                "batch {seq}: {e}"
            );
            if started.elapsed() >= Duration::from_secs(secs) {
                stop.send_replace(true);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    stop.send_replace(true);
    let mut local_writes = 0;
    for w in writers {
        local_writes += w.await??;
    }
    // Everything local is logged once capture passes the WAL's end.
    let end: String = admin
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    let end: Lsn = end.parse()?;
    let mut progress = capture.progress();
    ensure!(
        progress.wait_for(end, Duration::from_secs(30)).await,
        "capture did not log everything"
    );
    let mut history = sent;
    local_versions(&admin, &mut history).await?;
    let truncated = history.truncates.iter().max().copied();
    // The watermark stored: (hlc, origin).
    let watermark: Option<(u64, i16)> = admin
        .query_opt(
            "SELECT hlc, origin FROM mesh.row_versions WHERE tbl = 'public.kv' AND pk = '\"*\"'",
            &[],
        )
        .await?
        .map(|r| (r.get::<_, i64>(0) as u64, r.get(1)));
    let conflicts: i64 = admin
        .query_one("SELECT count(*) FROM mesh.conflicts", &[])
        .await?
        .get(0);
    eprintln!(
        "{seq} remote events, {local_writes} local writes, {conflicts} conflicts, {} rows, \
         {} truncates, {behind} batches tried again",
        history.rows.len(),
        history.truncates.len()
    );
    let mut wrong = Vec::new();
    let mut keys: Vec<i32> = history.rows.keys().copied().collect();
    keys.sort_unstable();
    for id in keys {
        let Some(mut newest) = history.rows[&id].iter().max_by_key(|w| w.0).cloned() else {
            continue;
        };
        // A newer TRUNCATE (or the same transaction's, after the change) removed it.
        if let Some(t) = truncated.filter(|t| *t > newest.0) {
            newest = (t, None);
        }
        let row: Option<String> = admin
            .query_opt("SELECT val FROM kv WHERE id = $1", &[&id])
            .await?
            .map(|r| r.get(0));
        let stored = admin
            .query_opt(
                "SELECT hlc, origin, deleted FROM mesh.row_versions
                  WHERE tbl = 'public.kv' AND pk = jsonb_build_array(jsonb_build_array('id', $1::text))::text",
                &[&id.to_string()],
            )
            .await?
            .map(|r| ((r.get::<_, i64>(0) as u64, r.get::<_, i16>(1)), r.get::<_, bool>(2)));
        // The row's own version, or the watermark when that is newer.
        let stored = match (stored, watermark) {
            (Some((v, _)), Some(w)) if w > v => Some((w, true)),
            (None, Some(w)) => Some((w, true)),
            (s, _) => s,
        };
        let expected_version = ((newest.0 .0, newest.0 .1), newest.1.is_none());
        if row != newest.1 || stored != Some(expected_version) {
            let mut changes = history.rows[&id].clone();
            changes.sort();
            let conflicts: Vec<String> = admin
                .query(
                    "SELECT format('%s %s %s / %s %s %s -> %s', local_origin, local_hlc, local_op,
                                   remote_origin, remote_hlc, remote_op, winner)
                       FROM mesh.conflicts WHERE pk @> jsonb_build_array(jsonb_build_array('id', $1::text))
                      ORDER BY id",
                    &[&id.to_string()],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            wrong.push(format!(
                "key {id}: row {row:?}, version {stored:?}; newest change {newest:?}\n  \
                 history {changes:?}, truncates {:?}\n  conflicts {conflicts:#?}",
                history.truncates
            ));
        }
    }
    capture.stop().await;
    ensure!(
        wrong.is_empty(),
        "rows not at their newest change: {wrong:#?}"
    );
    Ok(())
}
