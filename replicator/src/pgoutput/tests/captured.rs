//! A walsender byte stream assembled by hand from PostgreSQL's "Streaming Replication
//! Protocol" and "Logical Replication Message Formats" docs, in the exact shape a
//! `START_REPLICATION SLOT s LOGICAL 0/0 (proto_version '1', publication_names 'p',
//! messages 'true')` session sends for:
//!
//! ```sql
//! CREATE TABLE public.accounts (id int8 PRIMARY KEY, name text, balance numeric(12,2));
//! BEGIN;
//! SELECT pg_logical_emit_message(true, 'pgmesh', 'hlc=42;r=eu');
//! INSERT INTO accounts VALUES (7, 'héllo', 1234567890.10);
//! UPDATE accounts SET id = 8, balance = 0.10 WHERE id = 7;  -- name is left alone
//! DELETE FROM accounts WHERE id = 8;
//! COMMIT;
//! ```
//!
//! The bytes are written out, not produced by our encoder, so the decoder is checked
//! against the documented layout rather than against itself.

use bytes::Bytes;

use crate::pgoutput::*;

/// Parses hex with whitespace, ignoring `--` comments to the end of each line.
fn hex(s: &str) -> Bytes {
    let digits: String = s
        .lines()
        .map(|l| l.split("--").next().unwrap_or(""))
        .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
        .collect();
    assert_eq!(digits.len() % 2, 0, "odd hex digit count");
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).expect("hex"))
        .collect::<Vec<u8>>()
        .into()
}

const XLOG_HEADER: &str = "
    77                  -- 'w' XLogData
    00000000 016B3600   -- WAL start 0/016B3600
    00000000 016B3778   -- WAL end 0/016B3778
    0002B0D5 D4EB281C   -- server clock
";

const COMMIT_TS: i64 = 757_382_400_123_456; // 2024-01-01 00:00:00.123456 UTC

fn stream() -> Vec<Bytes> {
    let payloads = [
        "42                   -- 'B' Begin
         00000000 016B3748    -- final LSN 0/016B3748
         0002B0D5 D4EB2240    -- commit timestamp
         000002E6             -- xid 742",
        "4D                   -- 'M' logical decoding message
         01                   -- flags: transactional
         00000000 016B3700    -- LSN of the message
         70676D657368 00      -- prefix 'pgmesh'
         0000000B             -- content length 11
         686C633D34323B723D6575 -- 'hlc=42;r=eu'",
        "52                   -- 'R' Relation
         00004001             -- oid 16385
         7075626C6963 00      -- namespace 'public'
         6163636F756E7473 00  -- name 'accounts'
         64                   -- replica identity 'd' (default)
         0003                 -- 3 columns
         01 6964 00 00000014 FFFFFFFF           -- key 'id' int8 typmod -1
         00 6E616D65 00 00000019 FFFFFFFF       -- 'name' text
         00 62616C616E6365 00 000006A4 000C0006 -- 'balance' numeric(12,2)",
        "49                   -- 'I' Insert
         00004001 4E          -- oid 16385, 'N' new tuple
         0003                 -- 3 columns
         74 00000001 37                           -- text '7'
         74 00000006 68C3A96C6C6F                 -- text 'héllo' (UTF-8 database)
         74 0000000D 313233343536373839302E3130   -- text '1234567890.10'",
        "55                   -- 'U' Update
         00004001 4B          -- oid 16385, 'K' old key (the key changed)
         0003 74 00000001 37 6E 6E                -- '7', NULL, NULL
         4E                   -- 'N' new tuple
         0003 74 00000001 38 75 74 00000004 302E3130 -- '8', unchanged TOAST, '0.10'",
        "44                   -- 'D' Delete
         00004001 4B          -- oid 16385, 'K' old key
         0003 74 00000001 38 6E 6E                -- '8', NULL, NULL",
        "43                   -- 'C' Commit
         00                   -- flags
         00000000 016B3748    -- commit LSN
         00000000 016B3778    -- end LSN
         0002B0D5 D4EB2240    -- commit timestamp",
    ];
    let mut frames: Vec<Bytes> = payloads
        .iter()
        .map(|p| hex(&format!("{XLOG_HEADER}{p}")))
        .collect();
    frames.push(hex("
        6B                  -- 'k' primary keepalive
        00000000 016B3778   -- WAL end
        0002B0D5 D4EB2C04   -- server clock
        01                  -- reply requested
    "));
    frames
}

fn text(s: &'static [u8]) -> TupleValue {
    TupleValue::Text(Bytes::from_static(s))
}

#[test]
fn decodes_a_hand_assembled_transaction() {
    let mut cache = RelationCache::new();
    let mut messages = Vec::new();
    let mut keepalives = Vec::new();
    for frame in stream() {
        match ReplicationMessage::decode(frame.clone()).expect("frame") {
            ReplicationMessage::XLogData(x) => {
                assert_eq!(x.wal_start.to_string(), "0/016B3600");
                assert_eq!(x.wal_end, "0/16B3778".parse().unwrap());
                let msg = x.message().expect("pgoutput message");
                cache.observe(&msg);
                // Re-encoding gives back the documented bytes exactly.
                assert_eq!(msg.to_bytes().unwrap(), x.data);
                messages.push(msg);
            }
            ReplicationMessage::PrimaryKeepalive(k) => keepalives.push(k),
        }
        // The frame itself round-trips too.
        let again = ReplicationMessage::decode(frame.clone())
            .unwrap()
            .to_bytes();
        assert_eq!(again, frame);
    }

    assert_eq!(
        keepalives,
        vec![PrimaryKeepalive {
            wal_end: Lsn(0x16B_3778),
            server_clock: PgTimestamp(COMMIT_TS + 2500),
            reply_requested: true,
        }]
    );

    let [begin, message, relation, insert, update, delete, commit] =
        messages.try_into().expect("seven pgoutput messages");

    let PgOutputMessage::Begin(begin) = begin else {
        panic!("{begin:?}")
    };
    assert_eq!(begin.final_lsn.to_string(), "0/016B3748");
    assert_eq!(begin.xid, 742);
    assert_eq!(begin.commit_ts.to_unix_millis(), 1_704_067_200_123);

    assert_eq!(
        message,
        PgOutputMessage::Message(LogicalMessage {
            flags: LogicalMessage::FLAG_TRANSACTIONAL,
            lsn: Lsn(0x16B_3700),
            prefix: "pgmesh".into(),
            content: Bytes::from_static(b"hlc=42;r=eu"),
        })
    );

    let PgOutputMessage::Relation(relation) = relation else {
        panic!("{relation:?}")
    };
    assert_eq!(
        (relation.namespace.as_str(), relation.name.as_str()),
        ("public", "accounts")
    );
    assert_eq!(relation.replica_identity, ReplicaIdentity::Default);
    assert_eq!(relation.columns[2].type_oid, 1700);
    assert_eq!(relation.columns[2].type_modifier, (12 << 16 | 2) + 4);
    assert_eq!(relation.key_column_indices().collect::<Vec<_>>(), vec![0]);

    let PgOutputMessage::Insert(insert) = insert else {
        panic!("{insert:?}")
    };
    assert_eq!(
        insert.new,
        TupleData(vec![
            text(b"7"),
            text("héllo".as_bytes()),
            // Exactly PostgreSQL's numeric text: no float ever touched it.
            text(b"1234567890.10"),
        ])
    );

    let PgOutputMessage::Update(update) = update else {
        panic!("{update:?}")
    };
    let old = update.old.as_ref().expect("old key");
    assert!(matches!(old, OldTuple::Key(_)));
    let old_key = cache.key_values(update.relation_oid, old.tuple()).unwrap();
    assert_eq!(old_key[0].0.name, "id");
    assert_eq!(old_key[0].1, &text(b"7"));
    let new_key = cache.key_values(update.relation_oid, &update.new).unwrap();
    assert_eq!(new_key[0].1, &text(b"8"));
    assert_eq!(update.new.get(1), Some(&TupleValue::UnchangedToast));
    assert_eq!(update.new.get(2), Some(&text(b"0.10")));

    let PgOutputMessage::Delete(delete) = delete else {
        panic!("{delete:?}")
    };
    assert_eq!(
        delete.old,
        OldTuple::Key(TupleData(vec![
            text(b"8"),
            TupleValue::Null,
            TupleValue::Null
        ]))
    );

    assert_eq!(
        commit,
        PgOutputMessage::Commit(Commit {
            flags: 0,
            commit_lsn: begin.final_lsn,
            end_lsn: Lsn(0x16B_3778),
            commit_ts: PgTimestamp(COMMIT_TS),
        })
    );

    // What capture sends back once the transaction is durable downstream.
    let ack = StandbyStatusUpdate::confirm(Lsn(0x16B_3778), PgTimestamp(COMMIT_TS + 3000));
    assert_eq!(
        ack.to_bytes(),
        hex("
            72                                  -- 'r' standby status update
            00000000 016B3778                   -- written
            00000000 016B3778                   -- flushed
            00000000 016B3778                   -- applied
            0002B0D5 D4EB2DF8                   -- client clock
            00                                  -- no reply requested
        ")
    );
}

#[test]
fn every_strict_prefix_of_the_stream_frames_is_truncated() {
    for frame in stream() {
        let Ok(ReplicationMessage::XLogData(x)) = ReplicationMessage::decode(frame) else {
            continue;
        };
        for cut in 0..x.data.len() {
            let err = PgOutputMessage::decode(x.data.slice(..cut)).unwrap_err();
            assert!(err.is_truncated(), "cut {cut}: {err}");
        }
    }
}
