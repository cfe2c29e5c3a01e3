//! Tests of `advance_local`: the versions local events overwrite and leave.

use super::*;
use crate::event::Change;

const T: &str = "public.t";

fn change(op: Op, id: &str) -> Change {
    let pk = if op == Op::Truncate {
        Vec::new()
    } else {
        vec![("id".to_string(), Some(id.to_string()))]
    };
    Change {
        table: T.into(),
        op,
        pk: pk.clone(),
        old: None,
        new: matches!(op, Op::Insert | Op::Update).then_some(pk),
        unchanged: vec![],
        types: vec![],
        prev: None,
    }
}

fn local(hlc: u64, changes: Vec<Change>) -> ChangeEvent {
    ChangeEvent {
        origin: "near".into(),
        hlc: Hlc::from_u64(hlc),
        source_lsn: hlc,
        xid: hlc as u32,
        commit_ts_us: 0,
        stamp: None,
        local_only: false,
        changes,
    }
}

fn key(id: &str) -> (String, String) {
    (T.to_string(), change(Op::Insert, id).key_json())
}

fn wm() -> (String, String) {
    (T.to_string(), WATERMARK.to_string())
}

fn stored(hlc: u64, origin: &str, deleted: bool) -> RowVersion {
    RowVersion {
        version: Version {
            hlc: Hlc::from_u64(hlc),
            origin: origin_id_for(origin),
        },
        deleted,
        xid: Some(7),
    }
}

#[test]
fn keys_include_each_tables_watermark() {
    let events = [local(
        10,
        vec![change(Op::Insert, "1"), change(Op::Delete, "2")],
    )];
    assert_eq!(keys_of(&events), vec![wm(), key("1"), key("2")]);
}

#[test]
fn a_newer_tombstone_raises_the_event_and_the_ones_after_it() {
    let mut events = [
        local(10, vec![change(Op::Insert, "1")]),
        local(11, vec![change(Op::Update, "2")]),
    ];
    let current = VersionMap::from([(key("1"), stored(50, "far", true))]);
    let touched = advance_local(&mut events, current);
    assert_eq!(events[0].hlc, Hlc::from_u64(51), "above the tombstone");
    assert_eq!(events[1].hlc, Hlc::from_u64(52), "and the next above it");
    assert_eq!(
        events[0].changes[0].prev,
        Some(stored(50, "far", true).version),
        "records what it overwrote"
    );
    assert_eq!(touched[&key("1")].version.hlc, Hlc::from_u64(51));
    assert!(!touched[&key("1")].deleted);
}

#[test]
fn a_newer_live_version_or_truncate_stays_and_the_event_keeps_its_hlc() {
    let truncate = stored(60, "far", true);
    let mut events = [local(
        10,
        vec![change(Op::Update, "1"), change(Op::Delete, "2")],
    )];
    let current = VersionMap::from([
        (key("1"), stored(50, "far", false)),
        (key("2"), truncate),
        (wm(), truncate),
    ]);
    let touched = advance_local(&mut events, current);
    assert_eq!(events[0].hlc, Hlc::from_u64(10));
    assert_eq!(
        events[0].changes[0].prev,
        Some(stored(50, "far", false).version)
    );
    assert_eq!(events[0].changes[1].prev, Some(truncate.version));
    assert!(touched.is_empty(), "newer versions are kept: {touched:?}");
}

#[test]
fn an_older_stored_version_is_overwritten_and_a_local_truncate_older_than_the_watermark_is_not() {
    let mut events = [local(
        100,
        vec![change(Op::Update, "1"), change(Op::Truncate, "")],
    )];
    let current = VersionMap::from([
        (key("1"), stored(50, "far", false)),
        (wm(), stored(200, "far", true)),
    ]);
    let touched = advance_local(&mut events, current);
    assert_eq!(events[0].hlc, Hlc::from_u64(100));
    assert_eq!(touched[&key("1")].version.hlc, Hlc::from_u64(100));
    assert!(touched[&key("1")].deleted, "the row went with the TRUNCATE");
    assert!(!touched.contains_key(&wm()), "the newer watermark stays");
}

#[test]
fn rows_written_before_a_truncate_in_the_same_transaction_are_tombstones() {
    let mut events = [local(
        100,
        vec![
            change(Op::Insert, "1"),
            change(Op::Truncate, ""),
            change(Op::Insert, "2"),
        ],
    )];
    let touched = advance_local(&mut events, VersionMap::new());
    assert!(touched[&key("1")].deleted, "inserted, then truncated");
    assert!(!touched[&key("2")].deleted, "inserted after the TRUNCATE");
    assert!(touched[&wm()].deleted);
    assert_eq!(touched[&wm()].version.hlc, Hlc::from_u64(100));
}
