//! Prepared, pipelined execution of apply's row statements.
//!
//! Every row statement is prepared once per session and cached by its text, and
//! values travel as text-format parameters ([`TextParam`]), so PostgreSQL parses
//! each value with the column type's own input function, exactly as a quoted literal
//! would, but without re-parsing and re-planning a statement per row. A batch's
//! statements are sent pipelined, in order, on the apply transaction. Nothing here
//! decides what to write; `apply` does.

use std::collections::HashMap;
use std::error::Error;

use bytes::BytesMut;
use futures::TryStreamExt;
use tokio_postgres::types::{to_sql_checked, Format, IsNull, ToSql, Type};
use tokio_postgres::{Client, GenericClient, Statement};

use crate::event::Value;

/// A value in PostgreSQL text form (or NULL), accepted for a parameter of any type.
#[derive(Debug, Clone, Copy)]
pub struct TextParam<'a>(pub Option<&'a str>);

impl ToSql for TextParam<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        match self.0 {
            None => Ok(IsNull::Yes),
            Some(s) => {
                out.extend_from_slice(s.as_bytes());
                Ok(IsNull::No)
            }
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    to_sql_checked!();
}

/// Prepared statements of one session, by text.
#[derive(Debug, Default)]
pub struct StatementCache {
    map: HashMap<String, Statement>,
}

impl StatementCache {
    /// The prepared statement for `sql`, preparing it on first use. A statement
    /// belongs to the connection it was prepared on: use one cache per connection.
    pub async fn get<C: GenericClient>(
        &mut self,
        c: &C,
        sql: &str,
    ) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.map.get(sql) {
            return Ok(s.clone());
        }
        let s = c.prepare(sql).await?;
        self.map.insert(sql.to_string(), s.clone());
        Ok(s)
    }
}

/// One statement to run with its values.
#[derive(Debug)]
pub struct Op {
    pub sql: String,
    pub values: Vec<Value>,
}

/// The prepared statement of each of `ops` (a round trip only for new ones).
pub async fn prepare_all(
    tx: &Client,
    cache: &mut StatementCache,
    ops: &[Op],
) -> Result<Vec<Statement>, tokio_postgres::Error> {
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        out.push(cache.get(tx, &op.sql).await?);
    }
    Ok(out)
}

/// Runs `ops` in order, pipelined. Returns the affected row counts.
pub async fn execute_all(
    tx: &Client,
    cache: &mut StatementCache,
    ops: &[Op],
) -> Result<Vec<u64>, tokio_postgres::Error> {
    let stmts = prepare_all(tx, cache, ops).await?;
    run_all(tx, &stmts, ops).await
}

/// Runs `ops` with their statements from [`prepare_all`]. The requests are sent on
/// the first poll, in order, so this future can be joined with other statements of
/// the same transaction and they all travel in one round trip.
pub fn run_all<'a>(
    tx: &'a Client,
    stmts: &'a [Statement],
    ops: &'a [Op],
) -> impl std::future::Future<Output = Result<Vec<u64>, tokio_postgres::Error>> + 'a {
    let runs = ops
        .iter()
        .zip(stmts)
        .map(|(op, st)| tx.execute_raw(st, op.values.iter().map(|v| TextParam(v.as_deref()))));
    futures::future::try_join_all(runs)
}

/// Runs `ops` (queries) with statements from [`prepare_all`]; returns every row's
/// int8 columns of each. Like [`run_all`], the requests are sent on the first poll,
/// in order.
pub fn query_all_run<'a>(
    tx: &'a Client,
    stmts: &'a [Statement],
    ops: &'a [Op],
) -> impl std::future::Future<Output = Result<Vec<Vec<Vec<i64>>>, tokio_postgres::Error>> + 'a {
    let runs = ops.iter().zip(stmts).map(|(op, st)| async move {
        let rows: Vec<tokio_postgres::Row> = tx
            .query_raw(st, op.values.iter().map(|v| TextParam(v.as_deref())))
            .await?
            .try_collect()
            .await?;
        Ok::<_, tokio_postgres::Error>(
            rows.iter()
                .map(|r| (0..r.len()).map(|i| r.get::<_, i64>(i)).collect())
                .collect(),
        )
    });
    futures::future::try_join_all(runs)
}
