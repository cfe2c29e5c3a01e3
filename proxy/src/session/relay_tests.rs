//! Unit tests of the relay state machine: byte fidelity, cancel keys, streaming,
//! stamping decisions and swallowing of injected answers.

use super::*;

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn info() -> ClientInfo {
    ClientInfo {
        peer: "127.0.0.1:1".parse().unwrap(),
        user: "u".into(),
        database: "d".into(),
        application_name: String::new(),
    }
}

fn relay() -> Relay {
    Relay::new(
        frame::PG_LARGE_MESSAGE_LIMIT,
        Arc::new(CancelRegistry::default()),
        info(),
        None,
    )
}

fn stamping() -> Relay {
    Relay::new(
        frame::PG_LARGE_MESSAGE_LIMIT,
        Arc::new(CancelRegistry::default()),
        info(),
        Some(Arc::new(Stamper::new("eu", "n1"))),
    )
}

fn tags(mut buf: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(h) = frame::peek_header(buf, 1 << 30).unwrap() {
        out.push(h.tag);
        buf = &buf[h.total..];
    }
    out
}

fn query_text(m: &[u8]) -> String {
    String::from_utf8_lossy(&m[5..m.len() - 1]).into_owned()
}

#[test]
fn client_bytes_pass_unchanged_in_any_split() {
    let mut stream = msg(b'Q', b"select 1\0");
    stream.extend(msg(b'P', b"\0select $1\0\0\0"));
    stream.extend(msg(b'd', b"copy data"));
    stream.extend(msg(b'S', b""));
    for split in 0..stream.len() {
        let mut r = relay();
        let mut out = BytesMut::new();
        // The session keeps unconsumed bytes and appends the next read to them.
        let mut input = BytesMut::from(&stream[..split]);
        r.on_client(&mut input, &mut out).unwrap();
        input.extend_from_slice(&stream[split..]);
        r.on_client(&mut input, &mut out).unwrap();
        assert_eq!(&out[..], &stream[..], "split at {split}");
        assert_eq!(r.expect.pending_ready(), 2);
    }
}

#[test]
fn unknown_tag_and_terminate() {
    let mut r = relay();
    let mut out = BytesMut::new();
    let mut bad = BytesMut::from(&msg(b'y', b"")[..]);
    assert!(matches!(
        r.on_client(&mut bad, &mut out),
        Err(RelayError::ClientFrame(FrameError::UnknownTag { tag: 'y' }))
    ));
    let mut malformed = BytesMut::from(&msg(b'B', b"no terminator")[..]);
    assert!(matches!(
        r.on_client(&mut malformed, &mut out),
        Err(RelayError::ClientMessage { tag: 'B' })
    ));
    let mut term = BytesMut::from(&msg(b'X', b"")[..]);
    assert_eq!(
        r.on_client(&mut term, &mut out).unwrap(),
        ClientAction::Terminate
    );
}

#[test]
fn server_key_is_rewritten_and_status_tracked() {
    let mut r = relay();
    let mut input = BytesMut::new();
    input.extend(msg(b'K', &[0, 0, 0, 7, 1, 2, 3, 4]));
    input.extend(msg(b'D', b"\0\x01\0\0\0\x01x"));
    input.extend(msg(b'Z', b"T"));
    let mut out = BytesMut::new();
    r.on_server(&mut input, &mut out).unwrap();
    let key = BackendKey::decode(&out[5..13]).unwrap();
    assert_ne!(key.pid, 7);
    assert_eq!(
        r.cancels.lookup(key.pid, &key.secret).map(|k| k.pid),
        Some(7)
    );
    assert_eq!(r.tx_status(), TxStatus::InTransaction);
    assert!(r.logged_in());
    assert_eq!(
        &out[13..],
        &[msg(b'D', b"\0\x01\0\0\0\x01x"), msg(b'Z', b"T")].concat()[..]
    );
}

#[test]
fn large_server_frames_stream() {
    let mut r = relay();
    let row = msg(b'D', &vec![b'x'; 100_000]);
    let mut out = BytesMut::new();
    let mut input = BytesMut::from(&row[..1000]);
    r.on_server(&mut input, &mut out).unwrap();
    assert_eq!(out.len(), 1000, "partial DataRow is forwarded at once");
    assert!(r.server_mid_frame());
    let mut input = BytesMut::from(&row[1000..]);
    r.on_server(&mut input, &mut out).unwrap();
    assert_eq!(&out[..], &row[..]);
    assert!(!r.server_mid_frame());
}

fn feed_client(r: &mut Relay, msgs: &[Vec<u8>]) -> BytesMut {
    let mut input = BytesMut::from(&msgs.concat()[..]);
    let mut out = BytesMut::new();
    r.on_client(&mut input, &mut out).unwrap();
    assert!(input.is_empty());
    out
}

fn feed_server(r: &mut Relay, msgs: &[Vec<u8>]) -> Vec<u8> {
    let mut input = BytesMut::from(&msgs.concat()[..]);
    let mut out = BytesMut::new();
    r.on_server(&mut input, &mut out).unwrap();
    tags(&out)
}

#[test]
fn autocommit_simple_write_is_spliced_and_answer_swallowed() {
    let mut r = stamping();
    let out = feed_client(&mut r, &[msg(b'Q', b"insert into t values (1)\0")]);
    let q = query_text(&out);
    assert!(
        q.starts_with("insert into t values (1);SELECT pg_logical_emit_message("),
        "{q}"
    );
    let alias = r.stamper.as_ref().unwrap().alias().to_string();
    let mut rowdesc = vec![0, 1];
    rowdesc.extend_from_slice(alias.as_bytes());
    rowdesc.extend_from_slice(&[0; 19]);
    let seen = feed_server(
        &mut r,
        &[
            msg(b'C', b"INSERT 0 1\0"),
            msg(b'T', &rowdesc),
            msg(b'D', b"\0\x01\xff\xff\xff\xff"),
            msg(b'C', b"SELECT 1\0"),
            msg(b'Z', b"I"),
        ],
    );
    assert_eq!(seen, b"CZ");
}

#[test]
fn reads_and_vacuum_are_not_touched() {
    let mut r = stamping();
    for q in [
        &b"select 1\0"[..],
        b"vacuum\0",
        b"begin\0",
        b"select * from t\0",
    ] {
        let m = msg(b'Q', q);
        let out = feed_client(&mut r, std::slice::from_ref(&m));
        assert_eq!(&out[..], &m[..]);
    }
}

#[test]
fn explicit_commit_gets_stamp_before_it() {
    let mut r = stamping();
    feed_client(&mut r, &[msg(b'Q', b"begin\0")]);
    feed_server(&mut r, &[msg(b'C', b"BEGIN\0"), msg(b'Z', b"T")]);
    feed_client(&mut r, &[msg(b'Q', b"update t set a = 2\0")]);
    feed_server(&mut r, &[msg(b'C', b"UPDATE 1\0"), msg(b'Z', b"T")]);
    let out = feed_client(&mut r, &[msg(b'Q', b"commit\0")]);
    let q = query_text(&out);
    assert!(
        q.starts_with("SELECT pg_logical_emit_message(") && q.ends_with(";commit"),
        "{q}"
    );
}

#[test]
fn failed_block_and_rollback_get_no_stamp() {
    let mut r = stamping();
    feed_client(&mut r, &[msg(b'Q', b"begin; insert into t values (1)\0")]);
    feed_server(&mut r, &[msg(b'E', b"SERROR\0\0"), msg(b'Z', b"E")]);
    let m = msg(b'Q', b"commit\0");
    assert_eq!(&feed_client(&mut r, std::slice::from_ref(&m))[..], &m[..]);
    feed_server(&mut r, &[msg(b'C', b"ROLLBACK\0"), msg(b'Z', b"I")]);
    let m = msg(b'Q', b"begin; delete from t; rollback\0");
    assert_eq!(&feed_client(&mut r, std::slice::from_ref(&m))[..], &m[..]);
}

#[test]
fn extended_autocommit_pipeline_is_stamped_before_sync() {
    let mut r = stamping();
    let out = feed_client(
        &mut r,
        &[
            msg(b'P', b"\0insert into t values ($1)\0\0\0"),
            msg(b'B', b"\0\0\0\0\0\0\0\0"),
            msg(b'E', b"\0\0\0\0\0"),
            msg(b'B', b"\0\0\0\0\0\0\0\0"),
            msg(b'E', b"\0\0\0\0\0"),
            msg(b'S', b""),
        ],
    );
    assert_eq!(tags(&out), b"PBEBEPBECS");
    let seen = feed_server(
        &mut r,
        &[
            msg(b'1', b""),
            msg(b'2', b""),
            msg(b'C', b"INSERT 0 1\0"),
            msg(b'2', b""),
            msg(b'C', b"INSERT 0 1\0"),
            msg(b'1', b""),
            msg(b'2', b""),
            msg(b'D', b"\0\x01\xff\xff\xff\xff"),
            msg(b'C', b"SELECT 1\0"),
            msg(b'3', b""),
            msg(b'Z', b"I"),
        ],
    );
    assert_eq!(seen, b"12C2CZ");
    assert!(r.is_idle());
}

#[test]
fn extended_commit_stamped_before_execute() {
    let mut r = stamping();
    feed_client(
        &mut r,
        &[
            msg(b'P', b"b\0BEGIN\0\0\0"),
            msg(b'P', b"w\0UPDATE t SET a = 1\0\0\0"),
            msg(b'P', b"c\0COMMIT\0\0\0"),
            msg(b'S', b""),
        ],
    );
    feed_server(
        &mut r,
        &[
            msg(b'1', b""),
            msg(b'1', b""),
            msg(b'1', b""),
            msg(b'Z', b"I"),
        ],
    );
    let exec = |stmt: &[u8]| {
        let mut b = vec![0u8];
        b.extend_from_slice(stmt);
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
        [msg(b'B', &b), msg(b'E', b"\0\0\0\0\0")]
    };
    let mut msgs = Vec::new();
    for s in [&b"b"[..], b"w", b"c"] {
        msgs.extend(exec(s));
    }
    msgs.push(msg(b'S', b""));
    let out = feed_client(&mut r, &msgs);
    assert_eq!(tags(&out), b"BEBEBPBECES");
}
