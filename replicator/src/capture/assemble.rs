//! Turns the pgoutput message stream into change events, one per committed
//! transaction, in commit order.
//!
//! It owns the relation cache, the transaction being assembled, and the final-HLC
//! rule `max(stamp, commit_ts, previous + 1)`. Transactions replayed by pgmesh's own
//! apply step carry a replication origin and are not emitted as local events (loop
//! prevention), but their HLC still advances `previous`. It never does I/O and never
//! reinterprets a value: text stays PostgreSQL's text.

use thiserror::Error;

use crate::event::{Change, ChangeEvent, Op, Stamp, Value, STAMP_PREFIX};
use crate::hlc::{final_hlc, Hlc};
use crate::pgoutput::{
    Begin, Lsn, OldTuple, PgOutputError, PgOutputMessage, Relation, RelationCache, TupleData,
    TupleValue,
};

/// Prefix of the logical message the apply step writes with the applied event's HLC.
pub const APPLIED_PREFIX: &str = "pgmesh_applied";

/// Errors assembling events: the stream broke the protocol's own rules.
#[derive(Debug, Error)]
pub enum AssembleError {
    #[error("{0}")]
    Decode(#[from] PgOutputError),
    #[error("{what} outside a transaction")]
    OutsideTransaction { what: &'static str },
    #[error("Begin inside an open transaction (xid {0})")]
    NestedBegin(u32),
    #[error("value of {table}.{column} is not valid UTF-8; pgmesh needs a UTF8 database")]
    NotUtf8 { table: String, column: String },
}

/// A finished transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assembled {
    /// The event, or `None` when the transaction is not a local change to ship (it
    /// came from apply, or changed no published table).
    pub event: Option<ChangeEvent>,
    pub commit_lsn: Lsn,
    /// Position to confirm to the slot once this transaction is durable.
    pub end_lsn: Lsn,
}

#[derive(Debug)]
struct Open {
    begin: Begin,
    origin: Option<String>,
    stamp: Option<Stamp>,
    applied_hlc: Option<Hlc>,
    changes: Vec<Change>,
}

/// Stateful assembler for one replication stream.
#[derive(Debug)]
pub struct Assembler {
    region: String,
    relations: RelationCache,
    open: Option<Open>,
    previous: Hlc,
}

impl Assembler {
    /// `previous` is the highest final HLC already logged for this region.
    pub fn new(region: &str, previous: Hlc) -> Self {
        Self {
            region: region.to_string(),
            relations: RelationCache::new(),
            open: None,
            previous,
        }
    }

    /// The last final HLC assigned (or observed from apply).
    pub fn previous(&self) -> Hlc {
        self.previous
    }

    /// Every transaction assembled from now on gets a final HLC of at least
    /// `floor` (see [`crate::log::floors`]): `previous` rises to just below it.
    pub fn raise_floor(&mut self, floor: Hlc) {
        if let Some(below) = floor.as_u64().checked_sub(1) {
            self.previous = self.previous.max(Hlc::from_u64(below));
        }
    }

    /// An HLC every later local event must exceed: `previous` rises to it. A remote
    /// HLC applied here before this assembler started (the logical messages that told
    /// the previous leader are not decoded again), or a local event's HLC raised when
    /// it was logged (see `versions::advance_local`).
    pub fn observe_applied(&mut self, hlc: Hlc) {
        self.previous = self.previous.max(hlc);
    }

    /// Whether a transaction is being assembled.
    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    fn open(&mut self, what: &'static str) -> Result<&mut Open, AssembleError> {
        self.open
            .as_mut()
            .ok_or(AssembleError::OutsideTransaction { what })
    }

    /// Whether the open transaction's row changes are wanted. A transaction replayed
    /// by apply carries an origin and is never shipped, so its rows are not decoded
    /// (receiving regions see every applied transaction in their own stream).
    fn collecting(&mut self, what: &'static str) -> Result<bool, AssembleError> {
        Ok(self.open(what)?.origin.is_none())
    }

    /// Feeds one message; returns a finished transaction at its Commit.
    pub fn push(&mut self, msg: PgOutputMessage) -> Result<Option<Assembled>, AssembleError> {
        match msg {
            PgOutputMessage::Begin(b) => {
                if let Some(o) = &self.open {
                    return Err(AssembleError::NestedBegin(o.begin.xid));
                }
                self.open = Some(Open {
                    begin: b,
                    origin: None,
                    stamp: None,
                    applied_hlc: None,
                    changes: Vec::new(),
                });
            }
            PgOutputMessage::Origin(o) => self.open("Origin")?.origin = Some(o.name),
            PgOutputMessage::Relation(r) => {
                self.relations.insert(r);
            }
            PgOutputMessage::Type(_) => {}
            PgOutputMessage::Message(m) => {
                if !m.is_transactional() {
                    return Ok(None);
                }
                let open = self.open("Message")?;
                if m.prefix == STAMP_PREFIX {
                    match Stamp::decode(&m.content) {
                        Ok(s) => open.stamp = Some(s),
                        Err(e) => tracing::warn!(error = %e, "ignoring malformed stamp"),
                    }
                } else if m.prefix == APPLIED_PREFIX {
                    let text = String::from_utf8_lossy(&m.content);
                    open.applied_hlc = text.trim().parse::<u64>().ok().map(Hlc::from_u64);
                }
            }
            PgOutputMessage::Insert(i) => {
                if self.collecting("Insert")? {
                    let rel = self.relations.require(i.relation_oid)?;
                    let change = row_change(rel, Op::Insert, None, Some(&i.new))?;
                    self.open("Insert")?.changes.push(change);
                }
            }
            PgOutputMessage::Update(u) => {
                if self.collecting("Update")? {
                    let rel = self.relations.require(u.relation_oid)?;
                    let change = row_change(rel, Op::Update, u.old.as_ref(), Some(&u.new))?;
                    self.open("Update")?.changes.push(change);
                }
            }
            PgOutputMessage::Delete(d) => {
                if self.collecting("Delete")? {
                    let rel = self.relations.require(d.relation_oid)?;
                    let change = row_change(rel, Op::Delete, Some(&d.old), None)?;
                    self.open("Delete")?.changes.push(change);
                }
            }
            PgOutputMessage::Truncate(t) => {
                if !self.collecting("Truncate")? {
                    return Ok(None);
                }
                let mut changes = Vec::new();
                for oid in &t.relation_oids {
                    let rel = self.relations.require(*oid)?;
                    changes.push(Change::truncate(qualified(rel)));
                }
                self.open("Truncate")?.changes.extend(changes);
            }
            PgOutputMessage::Commit(c) => {
                let open = self
                    .open
                    .take()
                    .ok_or(AssembleError::OutsideTransaction { what: "Commit" })?;
                let commit_ms = c.commit_ts.to_unix_millis().max(0) as u64;
                let event = if open.origin.is_some() {
                    // Applied from a peer: not a local change. Its HLC still counts, so
                    // a later local write that could see it wins against it.
                    if let Some(h) = open.applied_hlc {
                        self.previous = self.previous.max(h);
                    }
                    None
                } else if open.changes.is_empty() {
                    None
                } else {
                    let hlc =
                        final_hlc(open.stamp.as_ref().map(|s| s.hlc), commit_ms, self.previous);
                    self.previous = hlc;
                    Some(ChangeEvent {
                        origin: self.region.clone(),
                        hlc,
                        source_lsn: c.commit_lsn.0,
                        xid: open.begin.xid,
                        commit_ts_us: c.commit_ts.to_unix_micros(),
                        local_only: open.stamp.as_ref().is_some_and(|s| s.local),
                        stamp: open.stamp,
                        changes: open.changes,
                    })
                };
                return Ok(Some(Assembled {
                    event,
                    commit_lsn: c.commit_lsn,
                    end_lsn: c.end_lsn,
                }));
            }
        }
        Ok(None)
    }
}

fn qualified(rel: &Relation) -> String {
    let ns = if rel.namespace.is_empty() {
        "pg_catalog"
    } else {
        &rel.namespace
    };
    format!("{ns}.{}", rel.name)
}

fn text(rel: &Relation, col: usize, v: &TupleValue) -> Result<Value, AssembleError> {
    match v {
        TupleValue::Null | TupleValue::UnchangedToast => Ok(None),
        TupleValue::Text(b) | TupleValue::Binary(b) => String::from_utf8(b.to_vec())
            .map(Some)
            .map_err(|_| AssembleError::NotUtf8 {
                table: qualified(rel),
                column: rel.columns[col].name.clone(),
            }),
    }
}

/// Key (replica identity) values of a tuple.
fn key_of(rel: &Relation, t: &TupleData) -> Result<Vec<(String, Value)>, AssembleError> {
    let mut pk = Vec::new();
    for i in rel.key_column_indices() {
        if let Some(v) = t.get(i) {
            pk.push((rel.columns[i].name.clone(), text(rel, i, v)?));
        }
    }
    Ok(pk)
}

fn row_change(
    rel: &Relation,
    op: Op,
    old: Option<&OldTuple>,
    new: Option<&TupleData>,
) -> Result<Change, AssembleError> {
    rel.check_tuple(
        new.or(old.map(|o| o.tuple()))
            .expect("a row change has a tuple"),
    )?;
    let mut change = Change {
        op,
        ..Change::truncate(qualified(rel))
    };
    if let Some(o) = old {
        change.pk = key_of(rel, o.tuple())?;
        if let OldTuple::Full(t) = o {
            let mut image = Vec::with_capacity(t.len());
            for (i, v) in t.iter().enumerate() {
                image.push((rel.columns[i].name.clone(), text(rel, i, v)?));
            }
            change.old = Some(image);
        }
    }
    match new {
        Some(t) => {
            if old.is_none() {
                change.pk = key_of(rel, t)?;
            }
            let mut image = Vec::with_capacity(t.len());
            for (i, v) in t.iter().enumerate() {
                let col = &rel.columns[i];
                if matches!(v, TupleValue::UnchangedToast) {
                    change.unchanged.push(col.name.clone());
                } else {
                    image.push((col.name.clone(), text(rel, i, v)?));
                    change.types.push(col.type_oid);
                }
            }
            change.new = Some(image);
        }
        None => {
            change.types = rel
                .key_column_indices()
                .map(|i| rel.columns[i].type_oid)
                .collect();
        }
    }
    Ok(change)
}

#[cfg(test)]
#[path = "assemble_tests.rs"]
mod tests;
