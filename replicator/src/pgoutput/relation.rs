//! The relation cache: OID → latest [`Relation`] description, and key helpers.
//!
//! Change messages (`I U D`) carry only a relation OID and positional values, so
//! capture must remember the last Relation message for each OID to name tables and
//! columns. This file owns that map and the replica-identity ("key") lookups over it.
//! It must never guess a relation it has not been told about, and never pair a tuple
//! with a relation whose column count differs: both are errors, because a wrong
//! column mapping would silently corrupt every region.

use std::collections::HashMap;

use super::types::{Column, Oid, PgOutputMessage, Relation, TupleData, TupleValue};
use super::PgOutputError;

impl Relation {
    /// Positions of the replica identity columns, in attribute order.
    pub fn key_column_indices(&self) -> impl Iterator<Item = usize> + '_ {
        self.columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_key())
            .map(|(i, _)| i)
    }

    /// The replica identity columns, in attribute order.
    pub fn key_columns(&self) -> impl Iterator<Item = &Column> + '_ {
        self.columns.iter().filter(|c| c.is_key())
    }

    /// True when at least one column is flagged as key, i.e. updates and deletes
    /// can be matched to a row.
    pub fn has_key(&self) -> bool {
        self.columns.iter().any(Column::is_key)
    }

    /// Position of the column called `name`.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    /// Fails unless `tuple` has exactly one value per column.
    pub fn check_tuple(&self, tuple: &TupleData) -> Result<(), PgOutputError> {
        if tuple.len() != self.columns.len() {
            return Err(PgOutputError::ColumnCountMismatch {
                relation: self.oid,
                expected: self.columns.len(),
                found: tuple.len(),
            });
        }
        Ok(())
    }

    /// Pairs each key column with its value in `tuple`. Works for new tuples and for
    /// `K` old tuples alike: pgoutput sends those with every column, non-key ones NULL.
    pub fn key_values<'r, 't>(
        &'r self,
        tuple: &'t TupleData,
    ) -> Result<Vec<(&'r Column, &'t TupleValue)>, PgOutputError> {
        self.check_tuple(tuple)?;
        Ok(self
            .columns
            .iter()
            .zip(tuple.iter())
            .filter(|(c, _)| c.is_key())
            .collect())
    }
}

/// Relations described so far on one replication connection.
///
/// PostgreSQL resends a Relation message after any definition change and on every
/// new connection, so the cache lives exactly as long as the connection.
#[derive(Debug, Clone, Default)]
pub struct RelationCache {
    relations: HashMap<Oid, Relation>,
}

impl RelationCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `relation`, returning the description it replaces.
    pub fn insert(&mut self, relation: Relation) -> Option<Relation> {
        self.relations.insert(relation.oid, relation)
    }

    /// Caches `msg` if it is a Relation message. Returns whether it was.
    pub fn observe(&mut self, msg: &PgOutputMessage) -> bool {
        match msg {
            PgOutputMessage::Relation(r) => {
                self.insert(r.clone());
                true
            }
            _ => false,
        }
    }

    pub fn get(&self, oid: Oid) -> Option<&Relation> {
        self.relations.get(&oid)
    }

    /// Like [`RelationCache::get`], but an unknown OID is an error.
    pub fn require(&self, oid: Oid) -> Result<&Relation, PgOutputError> {
        self.get(oid).ok_or(PgOutputError::UnknownRelation(oid))
    }

    pub fn remove(&mut self, oid: Oid) -> Option<Relation> {
        self.relations.remove(&oid)
    }

    pub fn len(&self) -> usize {
        self.relations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.relations.is_empty()
    }

    pub fn clear(&mut self) {
        self.relations.clear();
    }

    pub fn iter(&self) -> impl Iterator<Item = &Relation> + '_ {
        self.relations.values()
    }

    /// The key columns of relation `oid`.
    pub fn key_columns(&self, oid: Oid) -> Result<Vec<&Column>, PgOutputError> {
        Ok(self.require(oid)?.key_columns().collect())
    }

    /// The key columns of relation `oid`, each paired with its value in `tuple`.
    pub fn key_values<'c, 't>(
        &'c self,
        oid: Oid,
        tuple: &'t TupleData,
    ) -> Result<Vec<(&'c Column, &'t TupleValue)>, PgOutputError> {
        self.require(oid)?.key_values(tuple)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::pgoutput::ReplicaIdentity;

    fn col(flags: u8, name: &str) -> Column {
        Column {
            flags,
            name: name.into(),
            type_oid: 25,
            type_modifier: -1,
        }
    }

    fn rel(oid: Oid, columns: Vec<Column>) -> Relation {
        Relation {
            oid,
            namespace: "public".into(),
            name: format!("t{oid}"),
            replica_identity: ReplicaIdentity::Default,
            columns,
        }
    }

    fn text(s: &'static str) -> TupleValue {
        TupleValue::Text(Bytes::from_static(s.as_bytes()))
    }

    #[test]
    fn observe_caches_relations_and_replaces_on_redefinition() {
        let mut cache = RelationCache::new();
        assert!(cache.is_empty());
        assert!(cache.observe(&PgOutputMessage::Relation(rel(1, vec![col(1, "id")]))));
        assert!(
            !cache.observe(&PgOutputMessage::Truncate(crate::pgoutput::Truncate {
                options: Default::default(),
                relation_oids: vec![1],
            }))
        );
        let old = cache.insert(rel(1, vec![col(1, "id"), col(0, "v")]));
        assert_eq!(old.map(|r| r.columns.len()), Some(1));
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get(1).map(|r| r.columns.len()), Some(2));
        assert_eq!(cache.iter().count(), 1);
        assert!(cache.remove(1).is_some());
        cache.clear();
        assert!(cache.is_empty());
    }

    #[test]
    fn unknown_relation_is_an_error() {
        let cache = RelationCache::new();
        assert_eq!(cache.require(7), Err(PgOutputError::UnknownRelation(7)));
        assert_eq!(cache.key_columns(7), Err(PgOutputError::UnknownRelation(7)));
    }

    #[test]
    fn key_helpers_follow_the_key_flag() {
        let mut cache = RelationCache::new();
        cache.insert(rel(
            5,
            vec![col(0, "note"), col(1, "tenant"), col(0, "v"), col(1, "id")],
        ));
        let r = cache.require(5).unwrap();
        assert!(r.has_key());
        assert_eq!(r.key_column_indices().collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(r.column_index("v"), Some(2));
        assert_eq!(r.column_index("nope"), None);
        let names: Vec<_> = cache
            .key_columns(5)
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, ["tenant", "id"]);

        // A 'K' old tuple: every column present, non-key ones NULL.
        let key_tuple = TupleData(vec![
            TupleValue::Null,
            text("acme"),
            TupleValue::Null,
            text("42"),
        ]);
        let kv = cache.key_values(5, &key_tuple).unwrap();
        assert_eq!(kv.len(), 2);
        assert_eq!((kv[0].0.name.as_str(), kv[0].1), ("tenant", &text("acme")));
        assert_eq!((kv[1].0.name.as_str(), kv[1].1), ("id", &text("42")));
    }

    #[test]
    fn column_count_mismatch_is_an_error() {
        let mut cache = RelationCache::new();
        cache.insert(rel(9, vec![col(1, "id"), col(0, "v")]));
        assert_eq!(
            cache.key_values(9, &TupleData(vec![text("1")])),
            Err(PgOutputError::ColumnCountMismatch {
                relation: 9,
                expected: 2,
                found: 1
            })
        );
        assert!(!rel(3, vec![col(0, "a")]).has_key());
    }
}
