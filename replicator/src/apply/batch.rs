//! The body of one batch's transaction, in two forms.
//!
//! The usual one ([`Applier::scripted_body`]) takes two round trips (three when it
//! inserts a key it found absent, and waits for capture before the check; one more
//! first when it truncates, see `quiesce`, and a few per TRUNCATE), each one simple
//! query (see `script`): BEGIN, the origin setup, the applied-events check, the row
//! locks and the versions; then, once the changes are resolved, the writes, the
//! conflict records, the check of the versions resolved against (under the append
//! lock), the change log, versions and checkpoint, and COMMIT. The isolating one
//! ([`Applier::isolated_body`]), used after a batch failed on data, runs each event
//! as a batch of its own and sends the ones that fail to dead letters.

use tokio_postgres::types::ToSql;
use tracing::debug;

use super::locks::ScriptedLocks;
use super::plan::{plan_locked, ExpectedParams, Plan, Xids, VERSIONS_UNCHANGED};
use super::records::{conflict_literals, dead_letter, logged_params, not_logged};
use super::sql::{quote, quote_array};
use super::{quiesce, Applier, ApplyError, BatchOutcome, ORIGIN_SETUP};
use crate::capture::APPLIED_PREFIX;
use crate::event::ChangeEvent;
use crate::hlc::Hlc;
use crate::log::table::append_params;
use crate::log::versions;
use crate::log::Logged;
use crate::pgoutput::Lsn;
use crate::script::{self, Script};

/// What the end of a batch records besides its rows: the link checkpoint, and what
/// capture is told.
struct Bookkeeping {
    max_commit_ts_us: Option<i64>,
    /// Highest HLC of the batch (its own region's events included).
    max_hlc: i64,
    /// Highest HLC applied, as the text of the logical message to capture.
    max_applied: String,
}

impl Bookkeeping {
    fn new(events: &[Logged], fresh: &[ChangeEvent]) -> Self {
        let max = fresh.iter().map(|e| e.hlc).max().unwrap_or(Hlc::ZERO);
        Self {
            max_commit_ts_us: events.iter().map(|l| l.event.commit_ts_us).max(),
            max_hlc: events
                .iter()
                .map(|l| l.event.hlc.as_u64() as i64)
                .max()
                .unwrap_or(0),
            max_applied: max.as_u64().to_string(),
        }
    }
}

impl Applier {
    /// The events of `events` from other regions.
    fn remote(&self, events: &[Logged]) -> Vec<ChangeEvent> {
        events
            .iter()
            .filter(|l| l.event.origin != self.region)
            .map(|l| l.event.clone())
            .collect()
    }

    /// One batch in two or three round trips of one simple query each (see the
    /// module doc).
    /// On an error the transaction may be open: the caller rolls it back.
    pub(super) async fn scripted_body(
        &mut self,
        peer: &str,
        events: &[Logged],
        upto: i64,
        head: i64,
    ) -> Result<BatchOutcome, ApplyError> {
        let remote = self.remote(events);
        let mut first = Script::default();
        // A batch that truncates holds row versions capture may need to store, so it
        // cannot wait for capture after its writes: it holds local writes off instead.
        let holds = quiesce::truncates(&remote);
        if holds {
            let mut progress = self.progress.clone();
            quiesce::hold_local_writes(
                &self.client,
                true,
                &remote,
                &mut self.flusher,
                &self.url,
                progress.as_mut(),
                self.capture_wait,
            )
            .await?;
        } else {
            first.raw("BEGIN");
        }
        let tx = &self.client;
        let mut setup = None;
        let mut locks = None;
        if let Some(last) = remote.last() {
            // Commit timestamps and origin LSN of this transaction are the source's.
            let (origins, hlcs) = logged_params(&remote);
            let name = self.named.get(tx, &ORIGIN_SETUP).await?;
            setup = Some(first.execute(
                &name,
                &[
                    quote(Some(&Lsn(last.source_lsn).to_string())),
                    quote(Some(&last.commit_ts_us.to_string())),
                    quote_array(&origins),
                    quote_array(&hlcs),
                ],
            ));
            // Every event's rows are locked, duplicates included: locking a row more
            // does no harm.
            locks = Some(ScriptedLocks::push(tx, &mut self.named, &mut first, &remote).await?);
        }
        let answers = first.run(tx).await?;
        let (xids, logged) = match setup.and_then(|i| answers.get(i)?.first()) {
            Some(r) => (
                Xids {
                    own: script::int(r, 1),
                    since_init: script::opt_int(r, 2),
                },
                script::int_array(r, 3),
            ),
            None => (Xids::default(), Vec::new()),
        };
        let fresh = not_logged(&remote, &logged);
        let mut out = BatchOutcome {
            duplicates: events.len() - fresh.len(),
            ..BatchOutcome::default()
        };
        let mut planned = Plan::default();
        let mut progress = self.progress.clone();
        if let (false, Some(locks)) = (fresh.is_empty(), locks) {
            planned = plan_locked(
                tx,
                &mut self.cache,
                locks.finish(&answers)?,
                xids,
                &fresh,
                progress.as_mut(),
                self.capture_wait,
            )
            .await?;
            out.conflicts = planned.conflicts.len();
            out.applied = fresh.len();
        }
        let book = Bookkeeping::new(events, &fresh);
        out.max_commit_ts_us = book.max_commit_ts_us;
        let mut second = Script::default();
        for w in &planned.writes {
            let name = self.named.get(tx, &w.sql).await?;
            second.execute_text(&name, w.values.iter().map(|v| v.as_deref()));
        }
        if !planned.conflicts.is_empty() {
            let name = self.named.get(tx, super::records::CONFLICT).await?;
            for c in &planned.conflicts {
                second.execute(&name, &conflict_literals(c, &self.names));
            }
        }
        let checkpoint = [
            quote(Some(peer)),
            quote(Some(&upto.to_string())),
            quote(Some(&head.to_string())),
            quote(Some(&book.max_hlc.to_string())),
            quote(book.max_commit_ts_us.map(|t| t.to_string()).as_deref()),
        ];
        if let (true, false, Some(p)) = (planned.inserts_absent, holds, progress.as_mut()) {
            // A local insert and delete of a key the batch inserts, both committed
            // between the locks and the insert, left no row to see. Once capture has
            // logged every commit below the insert (it reads only flushed WAL, and
            // this transaction's own writes are not, so a second session flushes
            // them), the check below finds their versions.
            let at = second.raw("SELECT pg_current_wal_insert_lsn()::text");
            let answers = std::mem::take(&mut second).run(tx).await?;
            let lsn = answers
                .get(at)
                .and_then(|rows| rows.first())
                .and_then(|r| r.get(0))
                .and_then(|t| t.parse().ok())
                .unwrap_or(Lsn(u64::MAX));
            super::flush_wal(&mut self.flusher, &self.url, self.capture_wait).await?;
            if !p.wait_for(lsn, self.capture_wait).await {
                return Err(ApplyError::CaptureBehind(lsn));
            }
        }
        // After the writes, which may wait on a local transaction: the check takes the
        // append lock, which capture needs, and holds it to the commit.
        let expected = ExpectedParams::new(&planned);
        if !expected.is_empty() {
            let name = self.named.get(tx, VERSIONS_UNCHANGED).await?;
            second.execute(&name, &expected.literals());
        }
        if fresh.is_empty() {
            let name = self.named.get(tx, super::CHECKPOINT).await?;
            second.execute(&name, &checkpoint);
        } else {
            // The applied events are logged last, under the append lock (taken by the
            // append itself), so sequence numbers become visible in order, and capture
            // never waits on a batch that waits on it (`plan_locked` waited before).
            let name = self.named.get(tx, &super::TAIL).await?;
            let store = versions::StoreParams::new(&planned.touched);
            let mut values = append_params(&fresh).literals_locked();
            values.extend(store.literals());
            values.extend(checkpoint);
            values.push(quote(Some(APPLIED_PREFIX)));
            values.push(quote(Some(&book.max_applied)));
            values.push(quote(Some(if self.notify_appends { "t" } else { "f" })));
            second.execute(&name, &values);
        }
        second.raw("COMMIT");
        second.run(tx).await?;
        Ok(out)
    }

    /// One batch, each event in a transaction of its own (with the checkpoint up to
    /// it): an event that fails on data goes to dead letters, in a transaction that
    /// logs it and moves the checkpoint past it, and the rest apply. Each event goes
    /// through [`Self::scripted_body`], so it is resolved and checked as in a batch.
    pub(super) async fn isolated_body(
        &mut self,
        peer: &str,
        events: &[Logged],
        upto: i64,
        head: i64,
    ) -> Result<BatchOutcome, ApplyError> {
        let mut out = BatchOutcome::default();
        for l in events {
            let one = std::slice::from_ref(l);
            let upto_here = l.seq.min(upto);
            match self.retrying(peer, one, upto_here, head).await {
                Ok(o) => {
                    out.applied += o.applied;
                    out.duplicates += o.duplicates;
                    out.conflicts += o.conflicts;
                    out.max_commit_ts_us = out.max_commit_ts_us.max(o.max_commit_ts_us);
                }
                Err(err) if err.is_data_error() => {
                    self.dead_letter_body(peer, l, upto_here, head, &err)
                        .await?;
                    out.dead_letters += 1;
                }
                Err(err) => return Err(err),
            }
        }
        if events.last().is_none_or(|l| l.seq < upto) {
            let o = self.retrying(peer, &[], upto, head).await?;
            out.max_commit_ts_us = out.max_commit_ts_us.max(o.max_commit_ts_us);
        }
        Ok(out)
    }

    /// [`Self::scripted_body`], run again (up to three times) after an error that a
    /// concurrent local write explains: a unique violation (its insert committed
    /// while ours waited on it) or a changed row version ([`VERSIONS_UNCHANGED`]).
    pub(super) async fn retrying(
        &mut self,
        peer: &str,
        events: &[Logged],
        upto: i64,
        head: i64,
    ) -> Result<BatchOutcome, ApplyError> {
        let mut tries = 0;
        loop {
            let r = self.scripted_body(peer, events, upto, head).await;
            if let Err(e) = &r {
                // The transaction may still be open (and aborted): end it. If it ended
                // already, this only draws a warning.
                let _ = self.client.batch_execute("ROLLBACK").await;
                if e.raced_a_local_write() && tries < 3 {
                    debug!(error = %e, "batch raced a local write; resolving it again");
                    tries += 1;
                    continue;
                }
            }
            return r;
        }
    }

    /// Sends `l` to dead letters for `err`, and logs it (so a replay finds it applied)
    /// and moves the checkpoint to `upto`, in one transaction.
    async fn dead_letter_body(
        &mut self,
        peer: &str,
        l: &Logged,
        upto: i64,
        head: i64,
        err: &ApplyError,
    ) -> Result<(), ApplyError> {
        let one = std::slice::from_ref(l);
        let fresh = self.remote(one);
        let book = Bookkeeping::new(one, &fresh);
        let st = &self.st;
        let tx = &self.client;
        let r = async {
            tx.batch_execute("BEGIN").await?;
            dead_letter(tx, peer, &l.event, err).await?;
            let params = append_params(&fresh);
            let none = versions::VersionMap::new();
            let store = versions::StoreParams::new(&none);
            let notify = self.notify_appends;
            let cp: [&(dyn ToSql + Sync); 8] = [
                &peer,
                &upto,
                &head,
                &book.max_hlc,
                &book.max_commit_ts_us,
                &APPLIED_PREFIX,
                &book.max_applied,
                &notify,
            ];
            let tail: Vec<&(dyn ToSql + Sync)> = params
                .refs_locked()
                .into_iter()
                .chain(store.refs())
                .chain(cp)
                .collect();
            tx.execute(&st.tail, &tail).await?;
            tx.batch_execute("COMMIT").await?;
            Ok(())
        }
        .await;
        if r.is_err() {
            let _ = tx.batch_execute("ROLLBACK").await;
        }
        r
    }
}
