//! `pgmesh log tail`: prints change-log events as they arrive, one line per change.
//!
//! It reads `mesh.changelog` after a position and then waits on the log's NOTIFY
//! channel, so new events print at once. Events applied from peers are appended
//! without a NOTIFY unless the node relays (`--relay`), so while idle it also reads
//! again every second. It only reads.

use anyhow::Context;
use futures::StreamExt;
use pgmesh_replicator::event::ChangeEvent;
use pgmesh_replicator::log::{table::NOTIFY_CHANNEL, ChangeLog, TableLog};
use pgmesh_replicator::pgoutput::Lsn;
use tokio_postgres::AsyncMessage;

/// Formats one change of an event as a readable line.
pub fn format_change(seq: i64, e: &ChangeEvent, i: usize) -> String {
    let c = &e.changes[i];
    let pk =
        c.pk.iter()
            .map(|(k, v)| format!("{k}={}", v.as_deref().unwrap_or("NULL")))
            .collect::<Vec<_>>()
            .join(",");
    let op = serde_json::to_value(c.op)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let who = match &e.stamp {
        Some(s) => format!("{}@{}", s.user, s.node),
        None => "unstamped".into(),
    };
    format!(
        "seq={seq} hlc={} origin={} lsn={} xid={} {op} {} pk=({pk}) by={who}{}",
        e.hlc,
        e.origin,
        Lsn(e.source_lsn),
        e.xid,
        c.table,
        if e.local_only { " local-only" } else { "" }
    )
}

/// How often a following tail reads the log without a notification: applied
/// events of a node that does not relay come without one.
const UNNOTIFIED_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Prints the last `last` events, then follows the log until Ctrl-C (or forever).
pub async fn tail(url: &str, last: i64, follow: bool) -> anyhow::Result<()> {
    let what = || format!("connecting to {}", pgmesh_replicator::catalog::redact(url));
    let (config, tls) = pgmesh_replicator::pgtls::pg_config(url).with_context(what)?;
    let (client, mut conn) = config.connect(tls).await.with_context(what)?;
    let (wake_tx, mut wake_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if matches!(m, AsyncMessage::Notification(_)) && wake_tx.send(()).is_err() {
                break;
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
        .await
        .context("the mesh catalog is missing? run `pgmesh init` first")?;
    // Start after the last `last` events (sequence numbers have gaps).
    let mut after: i64 = client
        .query_one(
            "SELECT coalesce((SELECT min(seq) - 1 FROM (SELECT seq FROM mesh.changelog
                                                        ORDER BY seq DESC LIMIT $1) s),
                             (SELECT max(seq) FROM mesh.changelog), 0)::int8",
            &[&last.max(0)],
        )
        .await?
        .get(0);
    let mut log = TableLog::new(client).await?;
    loop {
        loop {
            let rows = log.read_after(after, 1000).await?;
            if rows.is_empty() {
                break;
            }
            for r in &rows {
                for i in 0..r.event.changes.len() {
                    println!("{}", format_change(r.seq, &r.event, i));
                }
                after = r.seq;
            }
        }
        if !follow {
            return Ok(());
        }
        tokio::select! {
            w = wake_rx.recv() => if w.is_none() { anyhow::bail!("connection to the database closed") },
            _ = tokio::time::sleep(UNNOTIFIED_EVERY) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        // Coalesce a burst of notifications into one read.
        while wake_rx.try_recv().is_ok() {}
    }
}
