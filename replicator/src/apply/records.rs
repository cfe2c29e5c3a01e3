//! Apply's records: which events are already applied (the change log doubles as that
//! record), the conflicts it resolved, and the events it could not apply.
//!
//! These run inside the batch transaction; they never decide a winner.

use std::collections::{HashMap, HashSet};

use tokio_postgres::{Client, Statement};
use tracing::warn;

use super::exec::TextParam;
use super::sql::quote;
use super::ApplyError;
use crate::event::{ChangeEvent, Op};
use crate::resolve::{Version, Winner};

/// A conflict to record.
#[derive(Debug, Clone)]
pub(super) struct ConflictRow {
    pub tbl: String,
    pub pk: String,
    pub local: Version,
    pub remote: Version,
    pub remote_origin: String,
    pub remote_op: Op,
    pub winner: Winner,
}

/// The 1-based positions in `$1` origins / `$2` hlcs of the events in the change log
/// already, one index probe per id (see `versions::LOAD` for why the LIMIT).
pub const LOGGED: &str = "SELECT k.i FROM unnest($1::text[], $2::int8[]) WITH ORDINALITY AS k(origin, hlc, i),
     LATERAL (SELECT 1 FROM mesh.changelog c WHERE c.origin = k.origin AND c.hlc = k.hlc LIMIT 1) c";

/// Records one conflict.
pub(super) const CONFLICT: &str = "INSERT INTO mesh.conflicts (tbl, pk, local_origin, local_hlc,
         remote_origin, remote_hlc, remote_op, winner, strategy)
     VALUES ($1, $2::text::jsonb, $3, $4, $5, $6, $7, $8, 'lww')";

/// The parameters of [`LOGGED`] for `events`: their origins and hlcs.
pub(super) fn logged_params(events: &[ChangeEvent]) -> (Vec<&str>, Vec<i64>) {
    events
        .iter()
        .map(|e| (e.origin.as_str(), e.hlc.as_u64() as i64))
        .unzip()
}

/// The events not in the change log yet (in batch order, without repeats), given
/// the positions [`LOGGED`] returned: the log doubles as the record of applied ids.
pub(super) fn not_logged(events: &[ChangeEvent], logged: &[i64]) -> Vec<ChangeEvent> {
    let id = |e: &ChangeEvent| (e.origin.clone(), e.hlc.as_u64() as i64);
    let mut seen: HashSet<(String, i64)> = logged
        .iter()
        .filter_map(|&i| events.get(usize::try_from(i - 1).ok()?))
        .map(id)
        .collect();
    events
        .iter()
        .filter(|e| seen.insert(id(e)))
        .cloned()
        .collect()
}

/// The values of [`CONFLICT`] for `c`, as text.
fn conflict_values(c: &ConflictRow, names: &HashMap<i16, String>) -> [String; 8] {
    let local_origin = names
        .get(&c.local.origin)
        .cloned()
        .unwrap_or_else(|| format!("origin#{}", c.local.origin));
    let op = serde_json::to_value(c.remote_op)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let winner = match c.winner {
        Winner::Local => "local",
        Winner::Remote => "remote",
    };
    [
        c.tbl.clone(),
        c.pk.clone(),
        local_origin,
        (c.local.hlc.as_u64() as i64).to_string(),
        c.remote_origin.clone(),
        (c.remote.hlc.as_u64() as i64).to_string(),
        op,
        winner.to_string(),
    ]
}

/// The values of [`CONFLICT`] for `c`, as literals (see `script`).
pub(super) fn conflict_literals(c: &ConflictRow, names: &HashMap<i16, String>) -> Vec<String> {
    conflict_values(c, names)
        .iter()
        .map(|v| quote(Some(v)))
        .collect()
}

/// Records `rows` with `st`, the prepared [`CONFLICT`], pipelined.
pub(super) async fn record_conflicts(
    tx: &Client,
    st: &Statement,
    rows: &[ConflictRow],
    names: &HashMap<i16, String>,
) -> Result<(), ApplyError> {
    let values: Vec<[String; 8]> = rows.iter().map(|c| conflict_values(c, names)).collect();
    let runs = values
        .iter()
        .map(|v| tx.execute_raw(st, v.iter().map(|s| TextParam(Some(s.as_str())))));
    futures::future::try_join_all(runs).await?;
    Ok(())
}

/// What a dead letter records of the error that stopped its event: the SQLSTATE
/// (database errors only) and the message.
pub(super) fn letter_error(err: &ApplyError) -> (Option<String>, String) {
    match err {
        ApplyError::Db(d) => (
            d.code().map(|c| c.code().to_string()),
            d.as_db_error().map_or_else(
                || d.to_string(),
                |db| {
                    let mut m = db.message().to_string();
                    for (label, part) in [("DETAIL", db.detail()), ("HINT", db.hint())] {
                        if let Some(p) = part {
                            m.push_str(&format!("; {label}: {p}"));
                        }
                    }
                    m
                },
            ),
        ),
        other => (None, other.to_string()),
    }
}

pub(super) async fn dead_letter(
    tx: &Client,
    peer: &str,
    e: &ChangeEvent,
    err: &ApplyError,
) -> Result<(), ApplyError> {
    let (sqlstate, msg) = letter_error(err);
    warn!(peer, origin = %e.origin, hlc = %e.hlc, error = %msg, "event sent to dead letters");
    tx.execute(
        "INSERT INTO mesh.dead_letters (peer, origin, hlc, event, error, sqlstate)
         VALUES ($1, $2, $3, $4::text::jsonb, $5, $6)
         ON CONFLICT (origin, hlc) DO UPDATE SET attempts = mesh.dead_letters.attempts + 1,
             error = excluded.error, sqlstate = excluded.sqlstate, updated_at = now()",
        &[
            &peer,
            &e.origin,
            &(e.hlc.as_u64() as i64),
            &serde_json::to_string(e).expect("events serialize"),
            &msg,
            &sqlstate,
        ],
    )
    .await?;
    Ok(())
}
