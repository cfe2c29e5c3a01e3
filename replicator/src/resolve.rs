//! Conflict resolution: last-writer-wins by `(hlc, origin)`.
//!
//! Pure functions only. Given the local version of a row (or none) and an incoming
//! change, `decide` says who wins and whether it is a real conflict, and `plan` says
//! what to do to the local row. The apply step executes the plan; the determinism
//! property test below executes it against a model. Nothing here touches PostgreSQL,
//! and nothing may depend on arrival order: that is what makes every region converge.

use serde::{Deserialize, Serialize};

use crate::event::Op;
use crate::hlc::Hlc;

/// The version of a row: the (hlc, origin) of the last change that won on it. The
/// derived order (hlc first, then origin id) is the mesh-wide total order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    pub hlc: Hlc,
    pub origin: i16,
}

/// What the local database knows about a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalRow {
    /// Version of the row, or of its tombstone; `None` for rows that predate pgmesh.
    pub version: Option<Version>,
    /// The row exists in the table now.
    pub exists: bool,
}

/// Who won.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Winner {
    Local,
    Remote,
}

/// The outcome for one incoming change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub winner: Winner,
    /// The same change was applied before (duplicate delivery): do nothing, record
    /// nothing.
    pub duplicate: bool,
    /// Two regions wrote the row concurrently (the incoming change did not see the
    /// local version), so this is recorded in `mesh.conflicts`.
    pub conflict: bool,
}

/// Last-writer-wins. `seen` is the version the change overwrote in its origin, when
/// known: if the local version is exactly that, the writer saw it and there is no
/// conflict.
pub fn decide(local: Option<Version>, remote: Version, seen: Option<Version>) -> Decision {
    match local {
        None => Decision {
            winner: Winner::Remote,
            duplicate: false,
            conflict: false,
        },
        Some(l) if l == remote => Decision {
            winner: Winner::Local,
            duplicate: true,
            conflict: false,
        },
        Some(l) => Decision {
            winner: if remote > l {
                Winner::Remote
            } else {
                Winner::Local
            },
            duplicate: false,
            conflict: l.origin != remote.origin && seen != Some(l),
        },
    }
}

/// What to do to the local row when the remote change wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing (the change lost, or a delete of a row that is already gone).
    Skip,
    Insert,
    Update,
    Delete,
}

/// The action for a winning change given whether the row exists. An update of a row
/// that is missing here (deleted by a change that lost, or not yet arrived) becomes
/// an insert of its image; an insert over an existing row becomes an update. Either
/// way the row ends as the winner's image, whatever the order of arrival.
pub fn plan(op: Op, d: Decision, exists: bool) -> Action {
    if d.winner == Winner::Local || d.duplicate {
        return Action::Skip;
    }
    match (op, exists) {
        (Op::Insert | Op::Update, true) => Action::Update,
        (Op::Insert | Op::Update, false) => Action::Insert,
        (Op::Delete, true) => Action::Delete,
        (Op::Delete, false) | (Op::Truncate | Op::Ddl, _) => Action::Skip,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    fn v(ms: u64, origin: i16) -> Version {
        Version {
            hlc: Hlc::from_parts(ms, 0),
            origin,
        }
    }

    #[test]
    fn lww_cases() {
        // insert/insert, update/update: higher HLC wins; tie broken by origin id.
        assert_eq!(
            decide(Some(v(10, 1)), v(11, 2), None).winner,
            Winner::Remote
        );
        assert_eq!(decide(Some(v(11, 1)), v(10, 2), None).winner, Winner::Local);
        assert_eq!(
            decide(Some(v(10, 1)), v(10, 2), None).winner,
            Winner::Remote
        );
        assert_eq!(decide(Some(v(10, 2)), v(10, 1), None).winner, Winner::Local);
        // Duplicate delivery.
        let d = decide(Some(v(10, 1)), v(10, 1), None);
        assert!(d.duplicate && !d.conflict);
        // A writer that saw the local version is not in conflict with it.
        assert!(!decide(Some(v(10, 1)), v(12, 2), Some(v(10, 1))).conflict);
        assert!(decide(Some(v(10, 1)), v(12, 2), Some(v(5, 1))).conflict);
        assert!(decide(Some(v(10, 1)), v(12, 2), None).conflict);
        // Successive writes from one origin never conflict.
        assert!(!decide(Some(v(10, 1)), v(12, 1), None).conflict);
    }

    #[test]
    fn plans() {
        let win = decide(None, v(1, 1), None);
        let lose = decide(Some(v(9, 1)), v(1, 2), None);
        assert_eq!(
            plan(Op::Update, win, false),
            Action::Insert,
            "update/delete: update wins"
        );
        assert_eq!(plan(Op::Insert, win, true), Action::Update);
        assert_eq!(plan(Op::Delete, win, true), Action::Delete);
        assert_eq!(plan(Op::Delete, win, false), Action::Skip, "delete/delete");
        assert_eq!(plan(Op::Update, lose, true), Action::Skip);
    }

    /// One change in the model: origin, hlc, key, op and the full new image.
    #[derive(Debug, Clone)]
    struct Ev {
        version: Version,
        key: u8,
        op: Op,
        value: u32,
    }

    /// A region's state: rows and row versions (tombstones included).
    #[derive(Debug, Default, PartialEq)]
    struct Region {
        rows: HashMap<u8, u32>,
        versions: HashMap<u8, Version>,
    }

    impl Region {
        fn apply(&mut self, e: &Ev) {
            let d = decide(self.versions.get(&e.key).copied(), e.version, None);
            let exists = self.rows.contains_key(&e.key);
            match plan(e.op, d, exists) {
                Action::Skip => {}
                Action::Insert | Action::Update => {
                    self.rows.insert(e.key, e.value);
                }
                Action::Delete => {
                    self.rows.remove(&e.key);
                }
            }
            if d.winner == Winner::Remote && !d.duplicate {
                self.versions.insert(e.key, e.version);
            }
        }
    }

    fn events() -> impl Strategy<Value = Vec<Ev>> {
        proptest::collection::vec((1u64..40, 0i16..3, 0u8..4, 0u8..3, any::<u32>()), 1..40)
            .prop_map(|raw| {
                let mut seen = std::collections::HashSet::new();
                raw.into_iter()
                    // Event ids (hlc, origin) are unique mesh-wide.
                    .filter(|(ms, o, ..)| seen.insert((*ms, *o)))
                    .map(|(ms, origin, key, op, value)| Ev {
                        version: v(ms, origin),
                        key,
                        op: [Op::Insert, Op::Update, Op::Delete][op as usize],
                        value,
                    })
                    .collect()
            })
    }

    proptest! {
        /// Determinism: any order of delivery, with any duplicates, gives the same rows.
        #[test]
        fn any_order_and_duplicates_converge(
            evs in events(),
            seed in any::<u64>(),
            dups in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            let mut reference = Region::default();
            let mut sorted = evs.clone();
            sorted.sort_by_key(|e| e.version);
            for e in &sorted { reference.apply(e); }

            let mut shuffled = evs.clone();
            for i in dups { shuffled.push(evs[i.index(evs.len())].clone()); }
            let mut rng = seed;
            for i in (1..shuffled.len()).rev() {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (rng >> 33) as usize % (i + 1));
            }
            let mut other = Region::default();
            for e in &shuffled { other.apply(e); }
            prop_assert_eq!(&other.rows, &reference.rows);
            prop_assert_eq!(&other.versions, &reference.versions);
            // And the winner per key is the highest version, as LWW predicts.
            for (k, ver) in &reference.versions {
                let max = evs.iter().filter(|e| e.key == *k).map(|e| e.version).max();
                prop_assert_eq!(Some(*ver), max);
            }
        }
    }
}
