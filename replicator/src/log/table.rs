//! `mesh.changelog` in the regional database as the change log.
//!
//! One append is one autocommit statement (an INSERT from arrays, plus a NOTIFY on
//! channel [`NOTIFY_CHANNEL`] in the same transaction), run with
//! `synchronous_commit = on` so it is durable when it returns. Values are stored as
//! JSON strings, never numbers. It never updates or deletes rows.

use std::collections::HashMap;
use std::sync::LazyLock;

use tokio_postgres::{Client, Row};

use super::fence::Fence;
use super::{versions, ChangeLog, LogError, Logged, ResumePoint, Scan, ShipFilter};
use crate::apply::exec::StatementCache;
use crate::apply::sql::{quote, quote_array, shift_params};
use crate::event::{Change, ChangeEvent, Stamp};
use crate::hlc::Hlc;
use crate::pgoutput::Lsn;
use crate::script::Named;

/// Transaction-level advisory lock every appender takes before inserting into
/// `mesh.changelog`, so sequence numbers become visible in order: a reader that has
/// seen `seq` N can never later find a committed row below N.
pub const APPEND_LOCK: i64 = 0x7067_6d65_7368_0002;

/// How far [`TableLog::skip_ahead`] moves the sequence: more than any appender draws
/// between two flushes of the WAL (a batch is at most a few thousand events).
pub const SKIP_AHEAD: i64 = 100_000;

/// Channel notified after every append, so readers wake without polling.
pub const NOTIFY_CHANNEL: &str = "pgmesh_changelog";

/// The append's INSERT (with `$lock` between its source rows and ON CONFLICT),
/// returning each inserted row's seq, origin and hlc.
macro_rules! append_insert {
    ($lock:literal) => {
        concat!(
            "INSERT INTO mesh.changelog
    (origin, hlc, source_lsn, xid, commit_ts, stamped, local_only, tags, changes)
  SELECT o, h, l::pg_lsn, x, timestamptz 'epoch' + t * interval '1 microsecond', s, lo, tg::json, ch::json
  FROM unnest($1::text[], $2::int8[], $3::text[], $4::int8[], $5::int8[], $6::bool[], $7::bool[],
              $8::text[], $9::text[]) AS u(o, h, l, x, t, s, lo, tg, ch)
  ",
            $lock,
            "
  ON CONFLICT DO NOTHING
  RETURNING seq, origin, hlc"
        )
    };
}

/// The rows an append logged, from its INSERT as CTE `ins` (see [`logged_rows`]).
macro_rules! append_rows {
    () => {
        "coalesce(array_agg(seq), '{}'), coalesce(array_agg(origin), '{}'), coalesce(array_agg(hlc), '{}')"
    };
}

/// The append's notification of readers, over its INSERT as CTE `ins`.
macro_rules! append_notify {
    () => {
        "pg_notify('pgmesh_changelog', coalesce(min(origin), '') || ' ' || coalesce(max(seq), 0))"
    };
}

/// What an append returns, from its INSERT as CTE `ins`, notifying readers.
macro_rules! append_result {
    () => {
        concat!("SELECT ", append_rows!(), ",\n       ", append_notify!())
    };
}

/// The columns an append returns (see [`APPEND`]), for a statement that appends with
/// [`APPEND_LOCKED_INSERT`] as CTE `ins`; it may add columns before ` FROM ins`.
pub const APPEND_RESULT: &str = append_result!();

/// The columns of [`APPEND_RESULT`] before its notification, for an appender that
/// decides itself whether to notify ([`APPEND_NOTIFY`]).
pub const APPEND_ROWS: &str = append_rows!();

/// The notification of [`APPEND_RESULT`]: the payload is `ORIGIN SEQ` (see
/// [`APPEND`]).
pub const APPEND_NOTIFY: &str = append_notify!();

/// Inserts events (from [`append_params`]), notifies readers, and returns the
/// inserted rows' sequence numbers with their event ids (see [`logged_rows`]). The
/// payload is `ORIGIN SEQ`: an origin of the appended events (all of them share it,
/// except in a hub's relayed batches), so a reader that serves only one origin can
/// ignore the rest, and the highest sequence number appended. The caller holds
/// [`APPEND_LOCK`] already.
pub const APPEND: &str = concat!(
    "WITH ins AS (",
    append_insert!(""),
    ")\n",
    append_result!(),
    "\nFROM ins"
);

/// The append's INSERT that first takes [`APPEND_LOCK`] (`$10`, see
/// [`AppendParams::refs_locked`]) itself: the lock is a one-time filter (an InitPlan)
/// over the source rows, so it is held before any sequence number is drawn. For
/// appenders that need not hold the lock earlier in their transaction: apply runs it
/// as CTE `ins` of the statement that ends a batch, selecting [`APPEND_RESULT`]. The
/// statement's snapshot predates the lock, which an INSERT ... ON CONFLICT DO NOTHING
/// does not read by.
pub const APPEND_LOCKED_INSERT: &str =
    append_insert!("WHERE (SELECT pg_advisory_xact_lock($10)) IS NOT NULL");

/// [`APPEND`] and [`versions::STORE`] (its parameters after the append's nine) in one
/// statement, for capture: the rows it logs and the versions they leave.
pub(super) static APPEND_STORE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH ins AS ({}), ver AS ({})\n{APPEND_RESULT}\nFROM ins",
        append_insert!(""),
        shift_params(versions::STORE, 9)
    )
});

/// The highest sequence number in the log (0 when it is empty).
pub const HEAD: &str = "SELECT coalesce(max(seq), 0)::int8 FROM mesh.changelog";

/// Takes [`APPEND_LOCK`].
pub const LOCK: &str = "SELECT pg_advisory_xact_lock($1)";

/// A read of log rows after `$1`, at most `$2`, with `ship` (whether the reader may
/// receive the row) given as SQL. Columns in the order [`logged_from_row`] reads
/// them; `tags` and `changes` are NULL for a row the reader may not receive.
macro_rules! read_sql {
    ($ship:literal) => {
        concat!(
            "SELECT seq, origin, hlc, source_lsn::text, xid,
                    (extract(epoch FROM commit_ts) * 1000000)::int8, stamped, local_only,
                    CASE WHEN ship THEN tags::text END, CASE WHEN ship THEN changes::text END, ship
             FROM (SELECT *, ",
            $ship,
            " AS ship FROM mesh.changelog WHERE seq > $1 ORDER BY seq LIMIT $2) s"
        )
    };
}

/// Every row after `$1` (at most `$2`).
const READ_AFTER: &str = read_sql!("true");

/// Rows after `$1` (at most `$2`), decoded only for what a peer in region `$3` may
/// receive from region `$4` relaying (`$5`) or not: the rule of [`ShipFilter::ships`].
const READ_FOR: &str = read_sql!("(NOT local_only AND origin <> $3 AND (origin = $4 OR $5))");

/// The change log as a table in PostgreSQL.
#[derive(Debug)]
pub struct TableLog {
    pub(super) client: Client,
    cache: StatementCache,
    /// The same at the SQL level, for capture's append (see `super::append`).
    pub(super) named: Named,
    /// The capture leader epoch appends of captured events check (none: no check).
    pub(super) fence: Option<Fence>,
}

impl TableLog {
    /// Wraps a connection to the regional database (with the catalog installed).
    pub async fn new(client: Client) -> Result<Self, LogError> {
        // Appends rely on read committed: a statement after the append lock sees
        // what the lock's previous holder committed (the fence, the versions).
        client
            .batch_execute(
                "SET synchronous_commit = on; SET standard_conforming_strings = on;
                 SET default_transaction_isolation = 'read committed'",
            )
            .await?;
        Ok(Self {
            client,
            cache: StatementCache::default(),
            named: Named::default(),
            fence: None,
        })
    }

    /// Appends of captured events ([`TableLog::append_local`]) land only while
    /// `fence` is its region's current capture epoch.
    pub fn set_fence(&mut self, fence: Fence) {
        self.fence = Some(fence);
    }

    /// The underlying connection.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

fn lsn_text(lsn: u64) -> String {
    Lsn(lsn).to_string()
}

impl TableLog {
    /// Moves the log's sequence [`SKIP_AHEAD`] numbers past anything it may have
    /// handed out, under the append lock. A server crash can rewind a sequence to
    /// its last flushed state, and numbers drawn after that may already have reached
    /// a peer: apply commits asynchronously, and a relaying hub serves the rows it
    /// appended as soon as they are visible, before they are flushed. Reusing such a
    /// number for another event would make that peer skip the event. Capture and
    /// every apply session run this when they (re)connect, before they append.
    pub async fn skip_ahead(client: &Client) -> Result<(), LogError> {
        // The transaction commits durably whatever the session's setting: a bump lost
        // in a second crash would let the next one land on the same numbers again.
        client
            .batch_execute(&format!(
                "BEGIN;
                 SET LOCAL synchronous_commit = on;
                 SELECT pg_advisory_xact_lock({APPEND_LOCK});
                 SELECT setval(pg_get_serial_sequence('mesh.changelog', 'seq'),
                               greatest((SELECT last_value FROM mesh.changelog_seq_seq),
                                        (SELECT coalesce(max(seq), 0) FROM mesh.changelog))
                               + {SKIP_AHEAD});
                 COMMIT;"
            ))
            .await?;
        Ok(())
    }

    /// Up to `limit` log rows after `after`, of which only the events `filter` lets
    /// through are decoded and returned; `upto` says how far the read went, so a
    /// reader skips what it may not ship without transferring it.
    pub async fn read_for(
        &mut self,
        after: i64,
        limit: i64,
        filter: &ShipFilter,
    ) -> Result<Scan, LogError> {
        let st = self.cache.get(&self.client, READ_FOR).await?;
        let rows = self
            .client
            .query(
                &st,
                &[
                    &after,
                    &limit,
                    &filter.peer_region,
                    &filter.server_region,
                    &filter.relay,
                ],
            )
            .await?;
        let upto = rows.last().map(|r| r.get::<_, i64>(0));
        let events = rows
            .iter()
            .filter(|r| r.get::<_, bool>(10))
            .map(logged_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Scan {
            events,
            upto,
            drained: (rows.len() as i64) < limit,
        })
    }
}

/// Decodes a row of [`read_sql!`] whose `ship` is true.
fn logged_from_row(r: &Row) -> Result<Logged, LogError> {
    let seq: i64 = r.get(0);
    let bad = |reason: String| LogError::Corruption { seq, reason };
    let lsn: String = r.get(3);
    let stamped: bool = r.get(6);
    let tags: String = r.get(8);
    let changes: String = r.get(9);
    let stamp = if stamped {
        Some(serde_json::from_str::<Stamp>(&tags).map_err(|e| bad(e.to_string()))?)
    } else {
        None
    };
    Ok(Logged {
        seq,
        event: ChangeEvent {
            origin: r.get(1),
            hlc: Hlc::from_u64(r.get::<_, i64>(2) as u64),
            source_lsn: lsn.parse::<Lsn>().map_err(|e| bad(e.to_string()))?.0,
            xid: r.get::<_, i64>(4) as u32,
            commit_ts_us: r.get(5),
            stamp,
            local_only: r.get(7),
            changes: serde_json::from_str::<Vec<Change>>(&changes)
                .map_err(|e| bad(e.to_string()))?,
        },
    })
}

/// Pairs appended `events` with the sequence numbers [`APPEND`] returned in `row`.
/// Events the log already held (skipped by the append) are left out.
pub fn logged_rows(events: Vec<ChangeEvent>, row: &Row) -> Vec<Logged> {
    logged_as(events, row.get(0), row.get(1), row.get(2))
}

/// [`logged_rows`] from the row's three arrays: sequence numbers, origins, HLCs.
pub fn logged_as(
    events: Vec<ChangeEvent>,
    seqs: Vec<i64>,
    origins: Vec<String>,
    hlcs: Vec<i64>,
) -> Vec<Logged> {
    let mut seq_of: HashMap<(String, i64), i64> = origins.into_iter().zip(hlcs).zip(seqs).collect();
    events
        .into_iter()
        .filter_map(|event| {
            let seq = seq_of.remove(&(event.origin.clone(), event.hlc.as_u64() as i64))?;
            Some(Logged { seq, event })
        })
        .collect()
}

/// The array parameters of [`APPEND`].
#[derive(Debug)]
pub struct AppendParams {
    origin: Vec<String>,
    hlc: Vec<i64>,
    lsn: Vec<String>,
    xid: Vec<i64>,
    ts: Vec<i64>,
    stamped: Vec<bool>,
    local: Vec<bool>,
    tags: Vec<String>,
    changes: Vec<String>,
}

impl AppendParams {
    /// References in statement order.
    pub fn refs(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 9] {
        [
            &self.origin,
            &self.hlc,
            &self.lsn,
            &self.xid,
            &self.ts,
            &self.stamped,
            &self.local,
            &self.tags,
            &self.changes,
        ]
    }

    /// The parameters of [`APPEND_LOCKED_INSERT`]: [`Self::refs`] and [`APPEND_LOCK`].
    pub fn refs_locked(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 10] {
        let [a, b, c, d, e, f, g, h, i] = self.refs();
        [a, b, c, d, e, f, g, h, i, &APPEND_LOCK]
    }

    /// [`Self::refs_locked`] as SQL literals, for an `EXECUTE` (see `crate::script`).
    pub fn literals_locked(&self) -> Vec<String> {
        let mut v = self.literals();
        v.push(quote(Some(&APPEND_LOCK.to_string())));
        v
    }

    /// [`Self::refs`] as SQL literals.
    pub fn literals(&self) -> Vec<String> {
        vec![
            quote_array(&self.origin),
            quote_array(&self.hlc),
            quote_array(&self.lsn),
            quote_array(&self.xid),
            quote_array(&self.ts),
            quote_array(&self.stamped),
            quote_array(&self.local),
            quote_array(&self.tags),
            quote_array(&self.changes),
        ]
    }
}

/// Builds the parameters that insert `events` into `mesh.changelog`.
pub fn append_params(events: &[ChangeEvent]) -> AppendParams {
    let n = events.len();
    let mut p = AppendParams {
        origin: Vec::with_capacity(n),
        hlc: Vec::with_capacity(n),
        lsn: Vec::with_capacity(n),
        xid: Vec::with_capacity(n),
        ts: Vec::with_capacity(n),
        stamped: Vec::with_capacity(n),
        local: Vec::with_capacity(n),
        tags: Vec::with_capacity(n),
        changes: Vec::with_capacity(n),
    };
    for e in events {
        p.origin.push(e.origin.clone());
        p.hlc.push(e.hlc.as_u64() as i64);
        p.lsn.push(lsn_text(e.source_lsn));
        p.xid.push(e.xid as i64);
        p.ts.push(e.commit_ts_us);
        p.stamped.push(e.stamp.is_some());
        p.local.push(e.local_only);
        p.tags.push(match &e.stamp {
            Some(s) => serde_json::to_string(s).expect("stamp serializes"),
            None => "{}".to_string(),
        });
        p.changes
            .push(serde_json::to_string(&e.changes).expect("changes serialize"));
    }
    p
}

impl ChangeLog for TableLog {
    async fn append(&mut self, events: &[ChangeEvent]) -> Result<(), LogError> {
        if events.is_empty() {
            return Ok(());
        }
        self.client
            .execute(APPEND, &append_params(events).refs())
            .await?;
        Ok(())
    }

    async fn resume_point(&mut self, origin: &str) -> Result<Option<ResumePoint>, LogError> {
        let row = self
            .client
            .query_one(
                "SELECT max(source_lsn)::text, max(hlc) FROM mesh.changelog WHERE origin = $1",
                &[&origin],
            )
            .await?;
        let lsn: Option<String> = row.get(0);
        let hlc: Option<i64> = row.get(1);
        Ok(match (lsn, hlc) {
            (Some(l), Some(h)) => Some(ResumePoint {
                lsn: l.parse().map_err(|e| LogError::Corruption {
                    seq: -1,
                    reason: format!("bad source_lsn {l:?}: {e}"),
                })?,
                hlc: Hlc::from_u64(h as u64),
            }),
            _ => None,
        })
    }

    async fn read_after(&mut self, after: i64, limit: i64) -> Result<Vec<Logged>, LogError> {
        let st = self.cache.get(&self.client, READ_AFTER).await?;
        let rows = self.client.query(&st, &[&after, &limit]).await?;
        rows.iter().map(logged_from_row).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog;
    use crate::scratch;

    /// [`APPEND_LOCKED_INSERT`] takes the append lock before it draws a sequence
    /// number: while another appender holds the lock it waits, and its rows come after
    /// that appender's, although its statement started first.
    #[tokio::test]
    async fn append_locked_waits_for_the_lock_and_draws_later_numbers() {
        let Some(url) = scratch::database("pgmesh_append_locked").await else {
            return;
        };
        let holder = catalog::connect(&url).await.unwrap();
        let waiter = catalog::connect(&url).await.unwrap();
        let watcher = catalog::connect(&url).await.unwrap();
        holder.batch_execute("BEGIN").await.unwrap();
        holder.execute(LOCK, &[&APPEND_LOCK]).await.unwrap();
        let pid: i32 = waiter
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        let late = vec![scratch::event("r2", 1, false)];
        let params = append_params(&late);
        let waiting = async {
            let row = waiter
                .query_one(
                    &format!("WITH ins AS ({APPEND_LOCKED_INSERT})\n{APPEND_RESULT}\nFROM ins"),
                    &params.refs_locked(),
                )
                .await
                .unwrap();
            logged_rows(late.clone(), &row)
        };
        let first = async {
            scratch::until_waiting_on_lock(&watcher, pid).await;
            let early = vec![scratch::event("r1", 1, false)];
            let row = holder
                .query_one(APPEND, &append_params(&early).refs())
                .await
                .unwrap();
            holder.batch_execute("COMMIT").await.unwrap();
            logged_rows(early, &row)
        };
        let (late, early) = tokio::join!(waiting, first);
        assert_eq!((early.len(), late.len()), (1, 1));
        assert!(
            late[0].seq > early[0].seq,
            "the waiting append drew {} before the holder's {}",
            late[0].seq,
            early[0].seq
        );
        drop((holder, waiter, watcher));
        scratch::drop_database(&url).await;
    }

    /// After `skip_ahead`, the next number is past everything handed out by at least
    /// SKIP_AHEAD.
    #[tokio::test]
    async fn skip_ahead_moves_past_every_number_handed_out() {
        let Some(url) = scratch::database("pgmesh_skip_ahead").await else {
            return;
        };
        let c = catalog::connect(&url).await.unwrap();
        // Numbers drawn but never committed count as handed out too.
        c.batch_execute("BEGIN; SELECT nextval('mesh.changelog_seq_seq'); ROLLBACK")
            .await
            .unwrap();
        let drawn: i64 = c
            .query_one("SELECT last_value FROM mesh.changelog_seq_seq", &[])
            .await
            .unwrap()
            .get(0);
        TableLog::skip_ahead(&c).await.unwrap();
        let mut log = TableLog::new(catalog::connect(&url).await.unwrap())
            .await
            .unwrap();
        let mut events = vec![
            scratch::event("r1", 1, false),
            scratch::event("r1", 2, false),
        ];
        let logged = log.append_local(&mut events).await.unwrap();
        assert_eq!(logged.len(), 2);
        assert!(
            logged[0].seq > drawn + SKIP_AHEAD,
            "seq {} after {drawn} drawn",
            logged[0].seq
        );
        drop((c, log));
        scratch::drop_database(&url).await;
    }
}
