//! Property tests: the decoders never panic on any input, every message round-trips
//! byte-exactly, and a cut-short message is always reported as truncated.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use crate::pgoutput::decode::decode_tuple;
use crate::pgoutput::encode::encode_tuple;
use crate::pgoutput::*;

fn arb_value() -> impl Strategy<Value = TupleValue> {
    prop_oneof![
        Just(TupleValue::Null),
        Just(TupleValue::UnchangedToast),
        // Arbitrary bytes: includes NUL, invalid UTF-8 and lone high bytes.
        prop::collection::vec(any::<u8>(), 0..48).prop_map(|v| TupleValue::Text(v.into())),
        prop::collection::vec(any::<u8>(), 0..48).prop_map(|v| TupleValue::Binary(v.into())),
    ]
}

fn arb_tuple() -> impl Strategy<Value = TupleData> {
    prop::collection::vec(arb_value(), 0..24).prop_map(TupleData)
}

fn arb_old() -> impl Strategy<Value = OldTuple> {
    prop_oneof![
        arb_tuple().prop_map(OldTuple::Key),
        arb_tuple().prop_map(OldTuple::Full),
    ]
}

/// Any string PostgreSQL could send NUL-terminated: any chars but NUL.
fn arb_name() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,12}"
}

fn arb_column() -> impl Strategy<Value = Column> {
    (any::<u8>(), arb_name(), any::<u32>(), any::<i32>()).prop_map(
        |(flags, name, type_oid, type_modifier)| Column {
            flags,
            name,
            type_oid,
            type_modifier,
        },
    )
}

fn arb_ident() -> impl Strategy<Value = ReplicaIdentity> {
    prop::sample::select(vec![
        ReplicaIdentity::Default,
        ReplicaIdentity::Nothing,
        ReplicaIdentity::Full,
        ReplicaIdentity::Index,
    ])
}

fn arb_message() -> impl Strategy<Value = PgOutputMessage> {
    let lsn = || any::<u64>().prop_map(Lsn);
    let ts = || any::<i64>().prop_map(PgTimestamp);
    prop_oneof![
        (lsn(), ts(), any::<u32>()).prop_map(|(final_lsn, commit_ts, xid)| {
            PgOutputMessage::Begin(Begin {
                final_lsn,
                commit_ts,
                xid,
            })
        }),
        (any::<u8>(), lsn(), lsn(), ts()).prop_map(|(flags, commit_lsn, end_lsn, commit_ts)| {
            PgOutputMessage::Commit(Commit {
                flags,
                commit_lsn,
                end_lsn,
                commit_ts,
            })
        }),
        (lsn(), arb_name())
            .prop_map(|(commit_lsn, name)| PgOutputMessage::Origin(Origin { commit_lsn, name })),
        (
            any::<u32>(),
            arb_name(),
            arb_name(),
            arb_ident(),
            prop::collection::vec(arb_column(), 0..8)
        )
            .prop_map(|(oid, namespace, name, replica_identity, columns)| {
                PgOutputMessage::Relation(Relation {
                    oid,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                })
            }),
        (any::<u32>(), arb_name(), arb_name()).prop_map(|(oid, namespace, name)| {
            PgOutputMessage::Type(TypeMessage {
                oid,
                namespace,
                name,
            })
        }),
        (any::<u32>(), arb_tuple())
            .prop_map(|(relation_oid, new)| PgOutputMessage::Insert(Insert { relation_oid, new })),
        (any::<u32>(), prop::option::of(arb_old()), arb_tuple()).prop_map(
            |(relation_oid, old, new)| PgOutputMessage::Update(Update {
                relation_oid,
                old,
                new
            })
        ),
        (any::<u32>(), arb_old())
            .prop_map(|(relation_oid, old)| PgOutputMessage::Delete(Delete { relation_oid, old })),
        (any::<u8>(), prop::collection::vec(any::<u32>(), 0..16)).prop_map(
            |(options, relation_oids)| PgOutputMessage::Truncate(Truncate {
                options: TruncateOptions(options),
                relation_oids,
            })
        ),
        (
            any::<u8>(),
            lsn(),
            arb_name(),
            prop::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(flags, lsn, prefix, content)| {
                PgOutputMessage::Message(LogicalMessage {
                    flags,
                    lsn,
                    prefix,
                    content: content.into(),
                })
            }),
    ]
}

/// Feeds `buf` to every decoder. Panicking is the only failure; errors are fine.
fn decode_everything(buf: &[u8]) {
    let buf = Bytes::copy_from_slice(buf);
    let _ = PgOutputMessage::decode(buf.clone());
    let _ = ReplicationMessage::decode(buf.clone());
    let _ = StandbyStatusUpdate::decode(buf.clone());
    let _ = decode_tuple(buf);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(buf in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_everything(&buf);
    }

    /// Random tails behind every real tag reach deep into each decoder.
    #[test]
    fn arbitrary_bodies_behind_real_tags_never_panic(
        tag in prop::sample::select(b"BCORYIUDTMwkr".to_vec()),
        body in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut buf = vec![tag];
        buf.extend_from_slice(&body);
        decode_everything(&buf);
    }

    /// Valid messages with one byte changed: the errors that are hardest to get right.
    #[test]
    fn mutated_messages_never_panic(msg in arb_message(), pos in any::<usize>(), byte in any::<u8>()) {
        let mut buf = msg.to_bytes().unwrap().to_vec();
        let i = pos % buf.len();
        buf[i] = byte;
        decode_everything(&buf);
    }

    #[test]
    fn every_message_round_trips(msg in arb_message()) {
        let bytes = msg.to_bytes().unwrap();
        let back = PgOutputMessage::decode(bytes.clone()).unwrap();
        prop_assert_eq!(&back, &msg);
        prop_assert_eq!(back.to_bytes().unwrap(), bytes);
    }

    #[test]
    fn every_strict_prefix_is_truncated(msg in arb_message()) {
        let bytes = msg.to_bytes().unwrap();
        for cut in 0..bytes.len() {
            let err = PgOutputMessage::decode(bytes.slice(..cut)).unwrap_err();
            prop_assert!(err.is_truncated(), "cut {} of {:?}: {}", cut, msg, err);
        }
    }

    #[test]
    fn arbitrary_tuples_round_trip(new in arb_tuple(), old in prop::option::of(arb_old())) {
        let mut buf = BytesMut::new();
        encode_tuple(&mut buf, &new).unwrap();
        prop_assert_eq!(decode_tuple(buf.freeze()).unwrap(), new.clone());

        let update = PgOutputMessage::Update(Update { relation_oid: 16385, old, new });
        let decoded = PgOutputMessage::decode(update.to_bytes().unwrap()).unwrap();
        prop_assert_eq!(decoded, update);
    }

    #[test]
    fn replication_frames_round_trip(
        wal_start in any::<u64>(),
        wal_end in any::<u64>(),
        clock in any::<i64>(),
        reply in any::<bool>(),
        data in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let frames = [
            ReplicationMessage::XLogData(XLogData {
                wal_start: Lsn(wal_start),
                wal_end: Lsn(wal_end),
                server_clock: PgTimestamp(clock),
                data: data.into(),
            }),
            ReplicationMessage::PrimaryKeepalive(PrimaryKeepalive {
                wal_end: Lsn(wal_end),
                server_clock: PgTimestamp(clock),
                reply_requested: reply,
            }),
        ];
        for frame in frames {
            prop_assert_eq!(ReplicationMessage::decode(frame.to_bytes()).unwrap(), frame);
        }
        let status = StandbyStatusUpdate {
            write_lsn: Lsn(wal_end),
            flush_lsn: Lsn(wal_start),
            apply_lsn: Lsn(wal_start),
            client_clock: PgTimestamp(clock),
            reply_requested: reply,
        };
        prop_assert_eq!(StandbyStatusUpdate::decode(status.to_bytes()).unwrap(), status);
    }

    #[test]
    fn lsn_text_round_trips(v in any::<u64>()) {
        prop_assert_eq!(Lsn(v).to_string().parse::<Lsn>().unwrap(), Lsn(v));
    }

    #[test]
    fn lsn_parse_never_panics(s in "\\PC{0,24}") {
        let _ = s.parse::<Lsn>();
    }

    #[test]
    fn timestamps_round_trip_through_unix_micros(v in any::<i64>()) {
        // Exact wherever the Unix value does not saturate.
        let ts = PgTimestamp(v);
        if v.checked_add(PG_EPOCH_UNIX_MICROS).is_some() {
            prop_assert_eq!(PgTimestamp::from_unix_micros(ts.to_unix_micros()), ts);
        }
        let ms = ts.to_unix_millis();
        prop_assert!(PgTimestamp::from_unix_millis(ms) <= ts);
    }
}
