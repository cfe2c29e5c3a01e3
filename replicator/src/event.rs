//! Change events and the stamp that the proxy attaches to a write transaction.
//!
//! The stamp travels inside the transaction as a transactional logical message with
//! prefix [`STAMP_PREFIX`]; capture reads it back with [`Stamp::decode`]. This module
//! owns the serialized shapes only; it never talks to PostgreSQL.

use serde::{Deserialize, Serialize};

use crate::hlc::Hlc;
use crate::resolve::Version;

/// Prefix of the logical message that carries a [`Stamp`].
pub const STAMP_PREFIX: &str = "pgmesh";

/// Current stamp format version.
pub const STAMP_VERSION: u32 = 1;

/// Origin tags of one write transaction, as stamped by the proxy that saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    /// Format version.
    pub v: u32,
    /// The proxy's HLC when the transaction committed.
    pub hlc: Hlc,
    /// Region of the proxy.
    pub region: String,
    /// Node name of the proxy.
    pub node: String,
    /// Session user.
    pub user: String,
    /// `application_name` of the session.
    pub app: String,
    /// Client address.
    pub addr: String,
    /// `SET pgmesh.replicate = off`: captured but never shipped to peers.
    pub local: bool,
}

impl Stamp {
    /// JSON text, with `$` escaped so it can sit inside a dollar-quoted literal.
    pub fn encode(&self) -> String {
        serde_json::to_string(self)
            .expect("a stamp always serializes")
            .replace('$', "\\u0024")
    }

    /// Parses a stamp from the logical message content.
    pub fn decode(content: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(content)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trip_escapes_dollars() {
        let s = Stamp {
            v: STAMP_VERSION,
            hlc: Hlc::from_parts(1_700_000_000_000, 3),
            region: "eu".into(),
            node: "n1".into(),
            user: "a$b'c\"".into(),
            app: "$pgmesh$".into(),
            addr: "127.0.0.1:5".into(),
            local: true,
        };
        let text = s.encode();
        assert!(!text.contains('$'));
        assert_eq!(Stamp::decode(text.as_bytes()).unwrap(), s);
    }

    #[test]
    fn value_bytes_count_keys_and_both_images() {
        let col = |k: &str, v: Option<&str>| (k.to_string(), v.map(str::to_string));
        let mut e = crate::scratch::event("eu", 1, false);
        assert_eq!(e.value_bytes(), 0);
        e.changes.push(Change {
            table: "public.t".into(),
            op: Op::Update,
            pk: vec![col("id", Some("12"))],
            old: Some(vec![col("id", Some("12")), col("v", None)]),
            new: Some(vec![col("id", Some("12")), col("v", Some("abcd"))]),
            unchanged: vec![],
            types: vec![],
            prev: None,
        });
        // "id12" three times, "v" twice, "abcd" once.
        assert_eq!(e.value_bytes(), 4 * 3 + 2 + 4);
    }
}

/// Operation of one change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
    Ddl,
}

/// One column value as it travels: PostgreSQL text format, or NULL. An unchanged
/// TOASTed value is left out of `new` and named in `unchanged`.
pub type Value = Option<String>;

/// One row change (or a TRUNCATE) inside an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// `schema.table`.
    pub table: String,
    pub op: Op,
    /// Replica-identity columns and their values (the primary key).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pk: Vec<(String, Value)>,
    /// Old row image, when the table has REPLICA IDENTITY FULL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<Vec<(String, Value)>>,
    /// New row image (insert/update), without unchanged TOASTed columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<Vec<(String, Value)>>,
    /// Columns whose TOASTed value did not change and is not in `new`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unchanged: Vec<String>,
    /// Type OIDs of the columns in `new` (or `pk` for deletes), in the same order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<u32>,
    /// The row's version in the origin before this change (what the writer saw).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<Version>,
}

impl Change {
    /// A TRUNCATE of `table` (`schema.table`); with another `op`, a change of that
    /// kind with nothing filled in yet.
    pub fn truncate(table: String) -> Self {
        Self {
            table,
            op: Op::Truncate,
            pk: Vec::new(),
            old: None,
            new: None,
            unchanged: Vec::new(),
            types: Vec::new(),
            prev: None,
        }
    }

    /// The row key as stored in `mesh.row_versions.pk`: a JSON array of
    /// `[column, text value]` pairs, printed exactly as PostgreSQL prints it as jsonb
    /// (`, ` between elements, the same string escapes), so keys stored before the
    /// column became text (`pk::text`) and keys built here compare equal.
    pub fn key_json(&self) -> String {
        fn json<T: Serialize + ?Sized>(v: &T) -> String {
            // serde_json escapes strings exactly as PostgreSQL's jsonb output does.
            serde_json::to_string(v).expect("keys serialize")
        }
        let mut s = String::from("[");
        for (i, (k, v)) in self.pk.iter().enumerate() {
            if i > 0 {
                s.push_str(", ");
            }
            s.push('[');
            s.push_str(&json(k));
            s.push_str(", ");
            s.push_str(&json(v));
            s.push(']');
        }
        s.push(']');
        s
    }
}

/// One committed source transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeEvent {
    /// Region where the transaction committed.
    pub origin: String,
    /// Final HLC: `max(stamp, commit_ts, previous + 1)`.
    pub hlc: Hlc,
    /// Commit LSN in the origin region.
    pub source_lsn: u64,
    pub xid: u32,
    /// Commit time in the origin, Unix microseconds.
    pub commit_ts_us: i64,
    /// The proxy's stamp, or `None` for writes that bypassed the proxy.
    pub stamp: Option<Stamp>,
    /// Never shipped to peers (`SET pgmesh.replicate = off`).
    pub local_only: bool,
    pub changes: Vec<Change>,
}

impl ChangeEvent {
    /// Bytes of the values it carries (keys, old and new images): about what applying
    /// it sends, to keep what one apply transaction takes in bounds.
    pub fn value_bytes(&self) -> usize {
        let sum = |cols: &[(String, Value)]| -> usize {
            cols.iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, String::len))
                .sum()
        };
        self.changes
            .iter()
            .map(|c| sum(&c.pk) + c.old.as_deref().map_or(0, sum) + c.new.as_deref().map_or(0, sum))
            .sum()
    }
}
