//! Holding local writes off the tables a batch writes, for the batches that cannot
//! wait for capture after their writes.
//!
//! A batch that inserts a key it found absent waits, after its writes, for capture
//! to log every local commit below them (see `batch`): a local insert and delete of
//! that key between the batch's locks and its insert left no row to lock. A batch
//! that truncates cannot wait there, since it holds row versions capture may need to
//! store, and a retried dead letter runs the same plan. Those batches instead lock
//! every table they write against local writes (`SHARE ROW EXCLUSIVE`: reads and
//! row locks go on) before they read anything, then wait for capture to log every
//! commit below the lock. From then to their commit no local write to those tables
//! can commit, so the versions they resolve against are complete, and a replicated
//! TRUNCATE sees every local row (one still uncommitted when it started is committed
//! and logged by then).

use std::collections::BTreeSet;
use std::time::Duration;

use tokio_postgres::{Client, SimpleQueryMessage};

use super::{flush_wal, sql, ApplyError};
use crate::capture::Progress;
use crate::event::{ChangeEvent, Op};
use crate::pgoutput::Lsn;

/// How long a batch waits for its table locks (SQLSTATE 55P03 after that).
const LOCK_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether a batch of `events` must hold local writes off ([`hold_local_writes`])
/// rather than wait for capture after its writes: it truncates a table.
pub(super) fn truncates(events: &[ChangeEvent]) -> bool {
    events
        .iter()
        .any(|e| e.changes.iter().any(|c| c.op == Op::Truncate))
}

/// The `LOCK TABLE` statement for the tables `events` write, in name order (so two
/// appliers lock alike), or `None` when they write none.
fn lock_statement(events: &[ChangeEvent]) -> Option<String> {
    let tables: BTreeSet<&str> = events
        .iter()
        .flat_map(|e| &e.changes)
        .map(|c| c.table.as_str())
        .collect();
    if tables.is_empty() {
        return None;
    }
    let list: Vec<String> = tables.iter().map(|t| sql::table(t)).collect();
    Some(format!(
        "LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE",
        list.join(", ")
    ))
}

/// In the transaction `tx` (begun first when `begin`): locks the tables `events`
/// write against local writes, then (when capture runs here) flushes the WAL through
/// `flusher` and waits up to `wait` for capture to log every commit below the lock.
pub(super) async fn hold_local_writes(
    tx: &Client,
    begin: bool,
    events: &[ChangeEvent],
    flusher: &mut Option<Client>,
    url: &str,
    progress: Option<&mut Progress>,
    wait: Duration,
) -> Result<(), ApplyError> {
    let begin = if begin { "BEGIN; " } else { "" };
    let Some(lock) = lock_statement(events) else {
        tx.batch_execute(begin).await?;
        return Ok(());
    };
    // Local writers queue behind a waiting LOCK: it waits a bounded time, and the
    // link tries again with backoff.
    let answers = tx
        .simple_query(&format!(
            "{begin}SET LOCAL lock_timeout = {}; {lock}; SET LOCAL lock_timeout TO DEFAULT;
             SELECT pg_current_wal_insert_lsn()::text",
            LOCK_TIMEOUT.as_millis()
        ))
        .await?;
    let Some(p) = progress else {
        return Ok(());
    };
    let lsn = answers
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).and_then(|t| t.parse().ok()),
            _ => None,
        })
        .unwrap_or(Lsn(u64::MAX));
    // Capture reads only flushed WAL, and a local commit made with
    // `synchronous_commit = off` may not be yet.
    flush_wal(flusher, url, wait).await?;
    if !p.wait_for(lsn, wait).await {
        return Err(ApplyError::CaptureBehind(lsn));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Change;

    fn event(ops: &[(&str, Op)]) -> ChangeEvent {
        ChangeEvent {
            origin: "r2".into(),
            hlc: crate::hlc::Hlc::ZERO,
            source_lsn: 0,
            xid: 0,
            commit_ts_us: 0,
            stamp: None,
            local_only: false,
            changes: ops
                .iter()
                .map(|(t, op)| Change {
                    op: *op,
                    ..Change::truncate(t.to_string())
                })
                .collect(),
        }
    }

    #[test]
    fn every_written_table_is_locked_once_in_name_order() {
        let events = [
            event(&[("public.b", Op::Insert), ("public.a", Op::Truncate)]),
            event(&[("public.b", Op::Delete)]),
        ];
        assert!(truncates(&events));
        assert_eq!(
            lock_statement(&events).unwrap(),
            format!(
                "LOCK TABLE {}, {} IN SHARE ROW EXCLUSIVE MODE",
                sql::table("public.a"),
                sql::table("public.b")
            )
        );
        assert!(!truncates(&events[1..]));
        assert_eq!(lock_statement(&[]), None);
    }
}
