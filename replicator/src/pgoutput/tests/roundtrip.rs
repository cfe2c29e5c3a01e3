//! One fixed encode → decode round trip per pgoutput message type, plus checks that
//! the encoding has the exact length the protocol documentation implies.

use bytes::Bytes;

use crate::pgoutput::*;

fn round_trip(msg: PgOutputMessage, expected_len: usize) {
    let bytes = msg.to_bytes().expect("encodable");
    assert_eq!(bytes[0], msg.tag());
    assert_eq!(bytes.len(), expected_len, "{msg:?}");
    assert_eq!(PgOutputMessage::decode(bytes.clone()), Ok(msg));
    // Through XLogData as well, the way capture receives it.
    let frame = ReplicationMessage::XLogData(XLogData {
        wal_start: Lsn(1),
        wal_end: Lsn(2),
        server_clock: PgTimestamp(3),
        data: bytes.clone(),
    });
    match ReplicationMessage::decode(frame.to_bytes()) {
        Ok(ReplicationMessage::XLogData(x)) => {
            assert_eq!(x.data, bytes);
            assert_eq!(x.message().map(|m| m.tag()), Ok(bytes[0]));
        }
        other => panic!("expected XLogData, got {other:?}"),
    }
}

fn text(s: &'static [u8]) -> TupleValue {
    TupleValue::Text(Bytes::from_static(s))
}

#[test]
fn begin() {
    round_trip(
        PgOutputMessage::Begin(Begin {
            final_lsn: Lsn(0x1_0000_0010),
            commit_ts: PgTimestamp(757_382_400_123_456),
            xid: u32::MAX,
        }),
        1 + 8 + 8 + 4,
    );
}

#[test]
fn commit() {
    round_trip(
        PgOutputMessage::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(10),
            end_lsn: Lsn(20),
            commit_ts: PgTimestamp(-5),
        }),
        1 + 1 + 8 + 8 + 8,
    );
}

#[test]
fn origin() {
    round_trip(
        PgOutputMessage::Origin(Origin {
            commit_lsn: Lsn(77),
            name: "pgmesh_eu_west".into(),
        }),
        1 + 8 + 15,
    );
}

#[test]
fn relation() {
    round_trip(
        PgOutputMessage::Relation(Relation {
            oid: 16385,
            namespace: "public".into(),
            name: "accounts".into(),
            replica_identity: ReplicaIdentity::Full,
            columns: vec![
                Column {
                    flags: 1,
                    name: "id".into(),
                    type_oid: 20,
                    type_modifier: -1,
                },
                Column {
                    flags: 0,
                    name: "größe".into(),
                    type_oid: 1700,
                    type_modifier: 0x000C_0006,
                },
            ],
        }),
        1 + 4 + 7 + 9 + 1 + 2 + (1 + 3 + 8) + (1 + 8 + 8),
    );
    for ident in [
        ReplicaIdentity::Default,
        ReplicaIdentity::Nothing,
        ReplicaIdentity::Full,
        ReplicaIdentity::Index,
    ] {
        assert_eq!(ReplicaIdentity::from_byte(ident.as_byte()), Some(ident));
    }
}

#[test]
fn type_message() {
    round_trip(
        PgOutputMessage::Type(TypeMessage {
            oid: 16390,
            namespace: "".into(),
            name: "mood".into(),
        }),
        1 + 4 + 1 + 5,
    );
}

#[test]
fn insert_with_every_value_kind() {
    let new = TupleData(vec![
        TupleValue::Null,
        TupleValue::UnchangedToast,
        text(b"3.14159265358979323846264338327950288"),
        text(b"caf\xe9"), // LATIN1 bytes: not UTF-8, must survive untouched
        TupleValue::Binary(Bytes::from_static(&[0, 0, 0, 42])),
        text(b""),
    ]);
    round_trip(
        PgOutputMessage::Insert(Insert {
            relation_oid: 16385,
            new,
        }),
        1 + 4 + 1 + 2 + 1 + 1 + (1 + 4 + 37) + (1 + 4 + 4) + (1 + 4 + 4) + (1 + 4),
    );
}

#[test]
fn update_without_with_key_and_with_full_old_row() {
    let new = TupleData(vec![text(b"1"), TupleValue::UnchangedToast]);
    let base = 1 + 4 + 1 + (2 + 1 + 4 + 1 + 1);
    round_trip(
        PgOutputMessage::Update(Update {
            relation_oid: 1,
            old: None,
            new: new.clone(),
        }),
        base,
    );
    let key = TupleData(vec![text(b"0"), TupleValue::Null]);
    round_trip(
        PgOutputMessage::Update(Update {
            relation_oid: 1,
            old: Some(OldTuple::Key(key)),
            new: new.clone(),
        }),
        base + 1 + (2 + 1 + 4 + 1 + 1),
    );
    let full = TupleData(vec![text(b"0"), text(b"x")]);
    round_trip(
        PgOutputMessage::Update(Update {
            relation_oid: 1,
            old: Some(OldTuple::Full(full)),
            new,
        }),
        base + 1 + (2 + 1 + 4 + 1 + 1 + 4 + 1),
    );
}

#[test]
fn delete_by_key_and_by_full_row() {
    for old in [
        OldTuple::Key(TupleData(vec![text(b"9"), TupleValue::Null])),
        OldTuple::Full(TupleData(vec![text(b"9"), TupleValue::Null])),
    ] {
        round_trip(
            PgOutputMessage::Delete(Delete {
                relation_oid: 2,
                old,
            }),
            1 + 4 + 1 + 2 + (1 + 4 + 1) + 1,
        );
    }
}

#[test]
fn truncate() {
    let options = TruncateOptions(TruncateOptions::CASCADE | TruncateOptions::RESTART_IDENTITY);
    assert!(options.cascade() && options.restart_identity());
    round_trip(
        PgOutputMessage::Truncate(Truncate {
            options,
            relation_oids: vec![16385, 16400, 16401],
        }),
        1 + 4 + 1 + 3 * 4,
    );
    round_trip(
        PgOutputMessage::Truncate(Truncate {
            options: TruncateOptions::default(),
            relation_oids: vec![],
        }),
        1 + 4 + 1,
    );
}

#[test]
fn logical_message_transactional_and_not() {
    for flags in [0, LogicalMessage::FLAG_TRANSACTIONAL] {
        let m = LogicalMessage {
            flags,
            lsn: Lsn(0x16B_3700),
            prefix: "pgmesh".into(),
            content: Bytes::from_static(b"\x00\xff binary payload"),
        };
        assert_eq!(m.is_transactional(), flags == 1);
        round_trip(PgOutputMessage::Message(m), 1 + 1 + 8 + 7 + 4 + 17);
    }
}
