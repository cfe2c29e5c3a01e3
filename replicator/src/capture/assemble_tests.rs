//! Unit tests of the assembler: images, keys, TOAST, stamps, origins and final HLCs.

use bytes::Bytes;

use super::*;
use crate::event::STAMP_VERSION;
use crate::pgoutput::{
    Column, Commit, Delete, Insert, LogicalMessage, Origin, PgTimestamp, ReplicaIdentity, Update,
};

fn rel() -> PgOutputMessage {
    PgOutputMessage::Relation(Relation {
        oid: 16384,
        namespace: "public".into(),
        name: "t".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            Column {
                flags: 1,
                name: "id".into(),
                type_oid: 23,
                type_modifier: -1,
            },
            Column {
                flags: 0,
                name: "v".into(),
                type_oid: 1700,
                type_modifier: -1,
            },
            Column {
                flags: 0,
                name: "doc".into(),
                type_oid: 25,
                type_modifier: -1,
            },
        ],
    })
}

fn t(s: &str) -> TupleValue {
    TupleValue::Text(Bytes::copy_from_slice(s.as_bytes()))
}

fn begin(xid: u32) -> PgOutputMessage {
    PgOutputMessage::Begin(Begin {
        final_lsn: Lsn(100),
        commit_ts: PgTimestamp::from_unix_millis(1_000),
        xid,
    })
}

fn commit(lsn: u64, ms: i64) -> PgOutputMessage {
    PgOutputMessage::Commit(Commit {
        flags: 0,
        commit_lsn: Lsn(lsn),
        end_lsn: Lsn(lsn + 8),
        commit_ts: PgTimestamp::from_unix_millis(ms),
    })
}

fn stamp_msg(hlc: Hlc) -> PgOutputMessage {
    let s = Stamp {
        v: STAMP_VERSION,
        hlc,
        region: "eu".into(),
        node: "n".into(),
        user: "u".into(),
        app: "a".into(),
        addr: "x".into(),
        local: false,
    };
    PgOutputMessage::Message(LogicalMessage {
        flags: 1,
        lsn: Lsn(90),
        prefix: STAMP_PREFIX.into(),
        content: Bytes::from(s.encode()),
    })
}

fn run(a: &mut Assembler, msgs: Vec<PgOutputMessage>) -> Assembled {
    let mut out = None;
    for m in msgs {
        if let Some(x) = a.push(m).unwrap() {
            out = Some(x);
        }
    }
    out.expect("a commit")
}

#[test]
fn insert_update_delete_images() {
    let mut a = Assembler::new("eu", Hlc::ZERO);
    let ev = run(
        &mut a,
        vec![
            rel(),
            begin(7),
            PgOutputMessage::Insert(Insert {
                relation_oid: 16384,
                new: TupleData(vec![t("1"), t("3.14159265358979323846"), TupleValue::Null]),
            }),
            PgOutputMessage::Update(Update {
                relation_oid: 16384,
                old: None,
                new: TupleData(vec![t("1"), t("2"), TupleValue::UnchangedToast]),
            }),
            PgOutputMessage::Delete(Delete {
                relation_oid: 16384,
                old: OldTuple::Key(TupleData(vec![t("1"), TupleValue::Null, TupleValue::Null])),
            }),
            commit(200, 5_000),
        ],
    )
    .event
    .unwrap();
    assert_eq!(ev.origin, "eu");
    assert_eq!(ev.xid, 7);
    assert_eq!(ev.source_lsn, 200);
    assert!(ev.stamp.is_none());
    assert_eq!(ev.hlc, Hlc::from_parts(5_000, 0), "unstamped: commit time");
    let [ins, upd, del] = &ev.changes[..] else {
        panic!("{:?}", ev.changes)
    };
    assert_eq!(ins.table, "public.t");
    assert_eq!(ins.pk, vec![("id".to_string(), Some("1".to_string()))]);
    assert_eq!(
        ins.new.as_ref().unwrap()[1],
        ("v".to_string(), Some("3.14159265358979323846".to_string())),
        "numeric text survives exactly"
    );
    assert_eq!(ins.types, vec![23, 1700, 25]);
    assert_eq!(upd.unchanged, vec!["doc".to_string()]);
    assert_eq!(upd.new.as_ref().unwrap().len(), 2);
    assert_eq!(del.op, Op::Delete);
    assert_eq!(del.pk, vec![("id".to_string(), Some("1".to_string()))]);
    assert!(del.new.is_none());
}

#[test]
fn final_hlc_uses_stamp_and_stays_increasing() {
    let mut a = Assembler::new("eu", Hlc::ZERO);
    let ins = || {
        PgOutputMessage::Insert(Insert {
            relation_oid: 16384,
            new: TupleData(vec![t("1"), t("1"), t("x")]),
        })
    };
    a.push(rel()).unwrap();
    let stamped = Hlc::from_parts(9_000, 4);
    let e1 = run(
        &mut a,
        vec![begin(1), stamp_msg(stamped), ins(), commit(300, 5_000)],
    )
    .event
    .unwrap();
    assert_eq!(e1.hlc, stamped);
    assert_eq!(e1.stamp.as_ref().unwrap().region, "eu");
    // Commit time behind the previous final HLC: previous + 1 wins.
    let e2 = run(&mut a, vec![begin(2), ins(), commit(400, 6_000)])
        .event
        .unwrap();
    assert_eq!(e2.hlc, stamped.saturating_next());
    let e3 = run(&mut a, vec![begin(3), ins(), commit(500, 20_000)])
        .event
        .unwrap();
    assert_eq!(e3.hlc, Hlc::from_parts(20_000, 0));
}

#[test]
fn a_raised_floor_bounds_every_later_final_hlc() {
    let mut a = Assembler::new("eu", Hlc::from_parts(1_000, 0));
    a.push(rel()).unwrap();
    let ins = || {
        PgOutputMessage::Insert(Insert {
            relation_oid: 16384,
            new: TupleData(vec![t("1"), t("1"), t("x")]),
        })
    };
    // A transaction that took its commit time and stamp before the floor was
    // raised, and commits after it: it still gets the floor.
    let floor = Hlc::from_parts(7_000, 0);
    a.raise_floor(floor);
    let stamped = Hlc::from_parts(6_000, 3);
    let e = run(
        &mut a,
        vec![begin(1), stamp_msg(stamped), ins(), commit(300, 6_500)],
    )
    .event
    .unwrap();
    assert_eq!(e.hlc, floor);
    // A floor below the previous final HLC changes nothing; the zero floor neither.
    a.raise_floor(Hlc::from_parts(2_000, 0));
    a.raise_floor(Hlc::ZERO);
    assert_eq!(a.previous(), floor);
    let e = run(&mut a, vec![begin(2), ins(), commit(400, 6_900)])
        .event
        .unwrap();
    assert_eq!(e.hlc, floor.saturating_next());
}

#[test]
fn applied_transactions_are_not_shipped_but_advance_previous() {
    let mut a = Assembler::new("eu", Hlc::ZERO);
    a.push(rel()).unwrap();
    let remote = Hlc::from_parts(50_000, 2);
    let out = run(
        &mut a,
        vec![
            begin(1),
            PgOutputMessage::Origin(Origin {
                commit_lsn: Lsn(1),
                name: "pgmesh_us".into(),
            }),
            PgOutputMessage::Message(LogicalMessage {
                flags: 1,
                lsn: Lsn(2),
                prefix: APPLIED_PREFIX.into(),
                content: Bytes::from(remote.as_u64().to_string()),
            }),
            PgOutputMessage::Insert(Insert {
                relation_oid: 16384,
                new: TupleData(vec![t("2"), t("1"), t("x")]),
            }),
            // Rows of an applied transaction are not decoded at all: a tuple that
            // does not fit its relation (an error in a local transaction) and an
            // unknown relation pass unread.
            PgOutputMessage::Insert(Insert {
                relation_oid: 16384,
                new: TupleData(vec![t("2")]),
            }),
            PgOutputMessage::Insert(Insert {
                relation_oid: 99,
                new: TupleData(vec![t("2")]),
            }),
            commit(600, 1_000),
        ],
    );
    assert!(out.event.is_none());
    assert_eq!(out.end_lsn, Lsn(608));
    assert_eq!(a.previous(), remote);
    let e = run(
        &mut a,
        vec![
            begin(2),
            PgOutputMessage::Insert(Insert {
                relation_oid: 16384,
                new: TupleData(vec![t("3"), t("1"), t("x")]),
            }),
            commit(700, 1_001),
        ],
    )
    .event
    .unwrap();
    assert!(
        e.hlc > remote,
        "a local write after an applied one wins against it"
    );
    a.push(begin(3)).unwrap();
    let short = PgOutputMessage::Insert(Insert {
        relation_oid: 16384,
        new: TupleData(vec![t("2")]),
    });
    assert!(
        a.push(short).is_err(),
        "the tuple skipped above is an error in a local transaction"
    );
}

#[test]
fn message_only_and_protocol_errors() {
    let mut a = Assembler::new("eu", Hlc::ZERO);
    let out = run(
        &mut a,
        vec![begin(1), stamp_msg(Hlc::from_parts(1, 0)), commit(10, 1)],
    );
    assert!(
        out.event.is_none(),
        "a stamp without changes is not an event"
    );
    assert!(matches!(
        a.push(commit(20, 1)),
        Err(AssembleError::OutsideTransaction { .. })
    ));
    a.push(begin(2)).unwrap();
    assert!(matches!(
        a.push(begin(3)),
        Err(AssembleError::NestedBegin(2))
    ));
}
