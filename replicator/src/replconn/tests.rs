//! Protocol tests against an in-process fake PostgreSQL on `127.0.0.1:0`.
//!
//! This file owns the tests that need a socket but not a real server: each
//! authentication branch, simple-query error recovery, the streaming state
//! machine, and cancel safety of [`ReplStream::next`] with a frame split across
//! reads. It must never use fixed sleeps or fixed ports; behaviour against a real
//! PostgreSQL lives in `replicator/tests/replconn.rs`.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::backend::{Authentication, BackendMessage, CopyResponse, ErrorFields};
use super::frame::{Body, Frame};
use super::*;
use crate::pgoutput::{
    Begin, Lsn, PgOutputMessage, PgTimestamp, PrimaryKeepalive, ReplicationMessage,
    StandbyStatusUpdate, XLogData,
};

/// The server end of one fake session.
struct Fake {
    sock: TcpStream,
    buf: BytesMut,
}

impl Fake {
    async fn read_more(&mut self) {
        let n = self.sock.read_buf(&mut self.buf).await.unwrap();
        assert!(n > 0, "client closed the socket");
    }

    /// Reads the untagged startup packet and returns its parameters.
    async fn read_startup(&mut self) -> Vec<(String, String)> {
        while self.buf.len() < 4 || self.buf.len() < u32_at(&self.buf) {
            self.read_more().await;
        }
        let len = u32_at(&self.buf);
        let packet = self.buf.split_to(len).freeze();
        assert_eq!(&packet[4..8], &frontend::PROTOCOL_VERSION.to_be_bytes());
        let mut body = Body::new(Frame {
            tag: 0,
            body: packet.slice(8..),
        });
        let mut params = Vec::new();
        loop {
            let k = body.cstr().unwrap();
            if k.is_empty() {
                break;
            }
            params.push((k, body.cstr().unwrap()));
        }
        params
    }

    async fn read_frame(&mut self) -> Frame {
        loop {
            if let Some(f) = Frame::parse(&mut self.buf).unwrap() {
                return f;
            }
            self.read_more().await;
        }
    }

    async fn send(&mut self, msgs: &[BackendMessage]) {
        let mut out = BytesMut::new();
        for m in msgs {
            m.encode(&mut out).unwrap();
        }
        self.sock.write_all(&out).await.unwrap();
    }

    /// Startup, AuthenticationOk and the usual session messages.
    async fn trust_handshake(&mut self) -> Vec<(String, String)> {
        let params = self.read_startup().await;
        self.send(&[auth_ok()]).await;
        self.send_ready().await;
        params
    }

    async fn send_ready(&mut self) {
        self.send(&[
            BackendMessage::ParameterStatus {
                name: "server_version".into(),
                value: "15.18".into(),
            },
            BackendMessage::BackendKeyData {
                process_id: 77,
                secret_key: 99,
            },
            ready(),
        ])
        .await;
    }

    async fn expect_query(&mut self) -> String {
        let f = self.read_frame().await;
        assert_eq!(f.tag, b'Q');
        Body::new(f).cstr().unwrap()
    }
}

fn u32_at(b: &[u8]) -> usize {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
}

fn auth_ok() -> BackendMessage {
    BackendMessage::Authentication(Authentication::Ok)
}

fn ready() -> BackendMessage {
    BackendMessage::ReadyForQuery { status: b'I' }
}

fn error(code: &str, message: &str) -> BackendMessage {
    BackendMessage::ErrorResponse(ErrorFields(vec![
        (b'S', "ERROR".into()),
        (b'V', "ERROR".into()),
        (b'C', code.into()),
        (b'M', message.into()),
    ]))
}

fn copy_both() -> BackendMessage {
    BackendMessage::CopyBothResponse(CopyResponse {
        format: 0,
        column_formats: vec![],
    })
}

fn begin_xlog() -> ReplicationMessage {
    let begin = PgOutputMessage::Begin(Begin {
        final_lsn: Lsn(0x16B3748),
        commit_ts: PgTimestamp(757_382_400_000_000),
        xid: 731,
    });
    ReplicationMessage::XLogData(XLogData {
        wal_start: Lsn(0x16B3700),
        wal_end: Lsn(0x16B3748),
        server_clock: PgTimestamp(757_382_400_000_001),
        data: begin.to_bytes().unwrap(),
    })
}

/// A listener on a free port and parameters pointing at it.
async fn listen(password: Option<&str>) -> (TcpListener, ConnParams) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut params = ConnParams::new("127.0.0.1", port, "rep", "app");
    params.password = password.map(str::to_owned);
    (listener, params)
}

async fn accept(listener: &TcpListener) -> Fake {
    let (sock, _) = listener.accept().await.unwrap();
    Fake {
        sock,
        buf: BytesMut::new(),
    }
}

#[tokio::test]
async fn trust_login_sends_replication_startup_and_records_session() {
    let (listener, params) = listen(None).await;
    let server = tokio::spawn(async move { accept(&listener).await.trust_handshake().await });
    let conn = ReplConnection::connect(&params).await.unwrap();
    assert_eq!(conn.parameter("server_version"), Some("15.18"));
    assert_eq!(
        conn.backend_key(),
        Some(BackendKey {
            process_id: 77,
            secret_key: 99
        })
    );
    let startup = server.await.unwrap();
    let get = |k: &str| {
        startup
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("user"), Some("rep"));
    assert_eq!(get("database"), Some("app"));
    assert_eq!(get("replication"), Some("database"));
    assert_eq!(get("application_name"), Some(DEFAULT_APPLICATION_NAME));
    assert_eq!(get("client_encoding"), Some("UTF8"));
}

#[tokio::test]
async fn md5_and_cleartext_send_the_expected_password() {
    let (listener, params) = listen(Some("s3cret")).await;
    let server = tokio::spawn(async move {
        let mut got = Vec::new();
        for request in [
            Authentication::Md5Password { salt: [9, 8, 7, 6] },
            Authentication::CleartextPassword,
        ] {
            let mut fake = accept(&listener).await;
            fake.read_startup().await;
            fake.send(&[BackendMessage::Authentication(request)]).await;
            let f = fake.read_frame().await;
            assert_eq!(f.tag, b'p');
            got.push(Body::new(f).cstr().unwrap());
            fake.send(&[auth_ok()]).await;
            fake.send_ready().await;
        }
        got
    });
    for _ in 0..2 {
        ReplConnection::connect(&params).await.unwrap();
    }
    let got = server.await.unwrap();
    assert_eq!(got[0], md5_hash(b"rep", b"s3cret", [9, 8, 7, 6]));
    assert_eq!(got[1], "s3cret");
}

#[tokio::test]
async fn unusable_auth_requests_are_typed_errors() {
    let (listener, no_password) = listen(None).await;
    let with_password = no_password.clone().with_password("pw");
    let server = tokio::spawn(async move {
        for request in [
            Authentication::Unsupported {
                code: 7,
                data: Bytes::new(),
            },
            Authentication::Sasl {
                mechanisms: vec!["SCRAM-SHA-256-PLUS".into()],
            },
            Authentication::Md5Password { salt: [0; 4] },
        ] {
            let mut fake = accept(&listener).await;
            fake.read_startup().await;
            fake.send(&[BackendMessage::Authentication(request)]).await;
        }
    });
    let e = ReplConnection::connect(&with_password).await.unwrap_err();
    assert!(
        matches!(&e, ReplError::UnsupportedAuth { method } if method == "GSSAPI"),
        "{e}"
    );
    let e = ReplConnection::connect(&with_password).await.unwrap_err();
    assert!(
        matches!(&e, ReplError::UnsupportedAuth { method } if method.contains("PLUS")),
        "{e}"
    );
    let e = ReplConnection::connect(&no_password).await.unwrap_err();
    assert!(matches!(e, ReplError::PasswordMissing), "{e}");
    server.await.unwrap();
}

#[tokio::test]
async fn simple_query_collects_rows_and_recovers_after_an_error() {
    let (listener, params) = listen(None).await;
    let server = tokio::spawn(async move {
        let mut fake = accept(&listener).await;
        fake.trust_handshake().await;
        assert_eq!(fake.expect_query().await, "SELECT 1/0");
        // An error mid-result: rows already sent are discarded, the error wins.
        fake.send(&[
            BackendMessage::DataRow(vec![Some(Bytes::from_static(b"x"))]),
            error("22012", "division by zero"),
            ready(),
        ])
        .await;
        assert_eq!(fake.expect_query().await, "SELECT 'a', NULL; SELECT 2");
        fake.send(&[
            BackendMessage::RowDescription(vec![]),
            BackendMessage::DataRow(vec![Some(Bytes::from_static(b"a")), None]),
            BackendMessage::CommandComplete {
                tag: "SELECT 1".into(),
            },
            BackendMessage::NoticeResponse(ErrorFields(vec![(b'M', "hi".into())])),
            BackendMessage::DataRow(vec![Some(Bytes::from_static(b"2"))]),
            BackendMessage::CommandComplete {
                tag: "SELECT 1".into(),
            },
            ready(),
        ])
        .await;
    });
    let mut conn = ReplConnection::connect(&params).await.unwrap();
    let e = conn.simple_query("SELECT 1/0").await.unwrap_err();
    assert_eq!(e.sqlstate(), Some("22012"));
    let rows = conn
        .simple_query("SELECT 'a', NULL; SELECT 2")
        .await
        .unwrap();
    assert_eq!(
        rows,
        vec![vec![Some("a".to_owned()), None], vec![Some("2".to_owned())]]
    );
    server.await.unwrap();
}

#[tokio::test]
async fn streams_messages_status_updates_and_stops_cleanly() {
    let (listener, params) = listen(None).await;
    let keepalive = ReplicationMessage::PrimaryKeepalive(PrimaryKeepalive {
        wal_end: Lsn(0x16B3800),
        server_clock: PgTimestamp(1),
        reply_requested: true,
    });
    let expected = vec![begin_xlog(), keepalive.clone()];
    let server = tokio::spawn(async move {
        let mut fake = accept(&listener).await;
        fake.trust_handshake().await;
        assert_eq!(
            fake.expect_query().await,
            "START_REPLICATION SLOT \"s\" LOGICAL 0/016B3700 (\"proto_version\" '1')"
        );
        fake.send(&[
            copy_both(),
            BackendMessage::CopyData(begin_xlog().to_bytes()),
            BackendMessage::ParameterStatus {
                name: "in_hot_standby".into(),
                value: "off".into(),
            },
            BackendMessage::CopyData(keepalive.to_bytes()),
        ])
        .await;
        let f = fake.read_frame().await;
        assert_eq!(f.tag, b'd');
        let status = StandbyStatusUpdate::decode(f.body).unwrap();
        fake.send(&[BackendMessage::CopyDone]).await;
        assert_eq!(fake.read_frame().await.tag, b'c');
        fake.send(&[
            BackendMessage::CommandComplete {
                tag: "START_STREAMING".into(),
            },
            ready(),
        ])
        .await;
        assert_eq!(fake.expect_query().await, "SELECT 1");
        fake.send(&[
            BackendMessage::DataRow(vec![Some(Bytes::from_static(b"1"))]),
            ready(),
        ])
        .await;
        status
    });
    let conn = ReplConnection::connect(&params).await.unwrap();
    let mut stream = conn
        .start_logical("s", Lsn(0x16B3700), &[("proto_version", "1")])
        .await
        .unwrap();
    for want in expected {
        assert_eq!(stream.next().await.unwrap(), Some(want));
    }
    assert_eq!(stream.parameter("in_hot_standby"), Some("off"));
    let status = StandbyStatusUpdate::confirm(Lsn(0x16B3748), PgTimestamp(5));
    stream.send_status(status).await.unwrap();
    assert_eq!(stream.next().await.unwrap(), None);
    assert_eq!(stream.next().await.unwrap(), None, "stays ended");
    let mut conn = stream.stop().await.unwrap();
    // Back in command mode.
    let rows = conn.simple_query("SELECT 1").await.unwrap();
    assert_eq!(rows, vec![vec![Some("1".to_owned())]]);
    assert_eq!(server.await.unwrap(), status);
}

#[tokio::test]
async fn start_logical_surfaces_server_errors() {
    let (listener, params) = listen(None).await;
    let server = tokio::spawn(async move {
        let mut fake = accept(&listener).await;
        fake.trust_handshake().await;
        fake.expect_query().await;
        fake.send(&[
            error("42704", "replication slot \"nope\" does not exist"),
            ready(),
        ])
        .await;
    });
    let conn = ReplConnection::connect(&params).await.unwrap();
    let e = conn
        .start_logical("nope", Lsn::INVALID, &[])
        .await
        .unwrap_err();
    assert_eq!(e.sqlstate(), Some("42704"));
    server.await.unwrap();
}

#[tokio::test]
async fn next_is_cancel_safe_across_a_split_frame() {
    let (listener, params) = listen(None).await;
    let mut wire = BytesMut::new();
    BackendMessage::CopyData(begin_xlog().to_bytes())
        .encode(&mut wire)
        .unwrap();
    let half = wire.len() / 2;
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let mut fake = accept(&listener).await;
        fake.trust_handshake().await;
        fake.expect_query().await;
        fake.send(&[copy_both()]).await;
        fake.sock.write_all(&wire[..half]).await.unwrap();
        go_rx.await.unwrap();
        fake.sock.write_all(&wire[half..]).await.unwrap();
        // Keep the socket open until the client is done.
        let mut rest = Vec::new();
        let _ = fake.sock.read_to_end(&mut rest).await;
    });
    let conn = ReplConnection::connect(&params).await.unwrap();
    let mut stream = conn.start_logical("s", Lsn::INVALID, &[]).await.unwrap();
    // Cancel `next` (as a select! with a timer would) until the first half has
    // been read into the stream's buffer; polling on buffered bytes, not sleeping.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut cancelled = 0;
    while stream.buffered() < half {
        assert!(
            tokio::time::Instant::now() < deadline,
            "half frame never arrived"
        );
        tokio::select! {
            m = stream.next() => panic!("a half frame must not yield a message: {m:?}"),
            _ = tokio::time::sleep(Duration::from_millis(5)) => cancelled += 1,
        }
    }
    assert!(cancelled > 0);
    go_tx.send(()).unwrap();
    assert_eq!(stream.next().await.unwrap(), Some(begin_xlog()));
    drop(stream);
    server.await.unwrap();
}

#[tokio::test]
async fn a_dropped_socket_is_an_error_not_the_end_of_the_stream() {
    let (listener, params) = listen(None).await;
    let server = tokio::spawn(async move {
        let mut fake = accept(&listener).await;
        fake.trust_handshake().await;
        fake.expect_query().await;
        fake.send(&[copy_both()]).await;
        let mut partial = BytesMut::new();
        partial.put_slice(b"d\x00\x00\x01\x00abc");
        fake.sock.write_all(&partial).await.unwrap();
    });
    let conn = ReplConnection::connect(&params).await.unwrap();
    let mut stream = conn.start_logical("s", Lsn::INVALID, &[]).await.unwrap();
    server.await.unwrap();
    let e = stream.next().await.unwrap_err();
    assert!(matches!(e, ReplError::Closed { mid_frame: true }), "{e}");
    assert!(e.is_disconnect());
}
