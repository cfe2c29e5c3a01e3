//! Bad input and broken peers: the proxy answers with a SQLSTATE and closes.
//!
//! This module owns the fault paths of one session, driven by raw TCP clients
//! and by killing backends: malformed, oversized and unknown frames, garbage
//! and odd startup packets, clients that vanish mid-message, an upstream that
//! is down or dies mid-query. Each must end in an ErrorResponse with the right
//! SQLSTATE (where the protocol allows one) and a clean close, and the proxy
//! must go on serving everyone else without leaking a session.

use std::time::Duration;

use anyhow::Result;
use pgmesh_tests::{connect, wait_until, ClusterOptions, ProxyNode, DEFAULT_TIMEOUT};

use crate::support::{cluster_and_proxy, sqlstate};
use crate::wire::{self, RawClient};

/// Wait until the proxy has no live session and the server no client backend
/// other than the asking one: nothing leaked on either side.
async fn assert_no_sessions_left(
    cluster: &pgmesh_tests::PgCluster,
    proxy: &ProxyNode,
) -> Result<()> {
    wait_until(DEFAULT_TIMEOUT, "the proxy's sessions to close", || async {
        proxy.live_sessions() == 0
    })
    .await?;
    let direct = cluster.connect().await?;
    wait_until(DEFAULT_TIMEOUT, "the proxied backends to exit", || async {
        direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) == 0)
            .unwrap_or(false)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frame_length_is_08p01() -> Result<()> {
    let (cluster, proxy) = cluster_and_proxy(ClusterOptions::default()).await?;
    // After login: a Query whose length (3) is below the 4 it must cover.
    let mut client = RawClient::login(proxy.addr()).await?;
    client.send(&[b'Q', 0, 0, 0, 3]).await?;
    let err = client.expect_fatal_close().await?;
    assert_eq!(err.sqlstate().as_deref(), Some("08P01"), "{err:?}");

    // Negative length.
    let mut client = RawClient::login(proxy.addr()).await?;
    client.send(&[b'Q', 0xff, 0xff, 0xff, 0xf0]).await?;
    let err = client.expect_fatal_close().await?;
    assert_eq!(err.sqlstate().as_deref(), Some("08P01"), "{err:?}");

    // During startup: a packet length below the 8 bytes of any startup packet.
    let mut client = RawClient::connect(proxy.addr()).await?;
    client.send(&[0, 0, 0, 3, 0, 3, 0, 0]).await?;
    let err = client.expect_fatal_close().await?;
    assert_eq!(err.sqlstate().as_deref(), Some("08P01"), "{err:?}");
    assert_no_sessions_left(&cluster, &proxy).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_is_54000() -> Result<()> {
    pgmesh_tests::init_tracing();
    let cluster = pgmesh_tests::PgCluster::start_async(ClusterOptions::default()).await?;
    let proxy = ProxyNode::start_with(&cluster, |c| c.max_message_bytes = 1024).await?;
    // A query just under the limit works.
    let mut client = RawClient::login(proxy.addr()).await?;
    let fits = format!("SELECT '{}'", "x".repeat(1000));
    client.send(&wire::query(&fits)).await?;
    let msgs = client.until_ready().await?;
    assert!(msgs.iter().all(|m| m.tag != b'E'), "{msgs:?}");
    // One over it is refused from its header alone; the body is never sent.
    let big = wire::query(&format!("SELECT '{}'", "x".repeat(2000)));
    client.send(&big[..5]).await?;
    let err = client.expect_fatal_close().await?;
    assert_eq!(err.sqlstate().as_deref(), Some("54000"), "{err:?}");
    // Others are unaffected.
    let other = connect(&proxy.conn_string()).await?;
    other.simple_query("SELECT 1").await?;
    drop(other);
    assert_no_sessions_left(&cluster, &proxy).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_message_tag_is_08p01() -> Result<()> {
    let (cluster, proxy) = cluster_and_proxy(ClusterOptions::default()).await?;
    let mut client = RawClient::login(proxy.addr()).await?;
    client.send(&wire::frame(b'y', b"junk")).await?;
    let err = client.expect_fatal_close().await?;
    assert_eq!(err.sqlstate().as_deref(), Some("08P01"), "{err:?}");
    assert!(
        err.field(b'M').unwrap_or_default().contains("'y'"),
        "{err:?}"
    );
    assert_no_sessions_left(&cluster, &proxy).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_unsupported_startup_packets() -> Result<()> {
    let (cluster, proxy) = cluster_and_proxy(ClusterOptions::default()).await?;
    // An HTTP request: its first four bytes read as a huge packet length. The
    // SQLSTATE itself is checked in `oversized_startup_packet_is_08p01`.
    let mut client = RawClient::connect(proxy.addr()).await?;
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    let err = client.expect_fatal_close().await?;
    assert!(err.sqlstate().is_some(), "{err:?}");

    // A well-framed packet with a protocol version nobody speaks.
    let mut client = RawClient::connect(proxy.addr()).await?;
    client
        .send(&wire::startup(2 << 16, &[("user", "postgres")]))
        .await?;
    let err = client.expect_fatal_close().await?;
    assert_eq!(err.sqlstate().as_deref(), Some("0A000"), "{err:?}");

    // Parameters that are not NUL-terminated.
    let mut client = RawClient::connect(proxy.addr()).await?;
    let mut packet = wire::startup(wire::PROTOCOL_3_0, &[("user", "postgres")]);
    packet.truncate(packet.len() - 2);
    let len = packet.len() as u32;
    packet[..4].copy_from_slice(&len.to_be_bytes());
    client.send(&packet).await?;
    let err = client.expect_fatal_close().await?;
    assert_eq!(err.sqlstate().as_deref(), Some("08P01"), "{err:?}");
    assert_no_sessions_left(&cluster, &proxy).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_startup_packet_is_08p01() -> Result<()> {
    let (_cluster, proxy) = cluster_and_proxy(ClusterOptions::default()).await?;
    for packet in [&b"GET / HTTP/1.1\r\n\r\n"[..], &[0, 0, 0x30, 0, 0, 3, 0, 0]] {
        let mut client = RawClient::connect(proxy.addr()).await?;
        client.send(packet).await?;
        let err = client.expect_fatal_close().await?;
        assert_eq!(err.sqlstate().as_deref(), Some("08P01"), "{err:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_and_gssenc_requests_are_answered_n_without_tls() -> Result<()> {
    let (_cluster, proxy) = cluster_and_proxy(ClusterOptions::default()).await?;
    for (what, request) in [
        ("GSSENCRequest", wire::gssenc_request()),
        ("SSLRequest", wire::ssl_request()),
    ] {
        let mut client = RawClient::connect(proxy.addr()).await?;
        client.send(&request).await?;
        assert_eq!(client.recv_byte().await?, b'N', "{what}");
        // The same connection goes on in plain text.
        client
            .send(&wire::startup(
                wire::PROTOCOL_3_0,
                &[("user", "postgres"), ("database", "postgres")],
            ))
            .await?;
        let msgs = client.until_ready().await?;
        assert!(msgs.iter().all(|m| m.tag != b'E'), "{what}: {msgs:?}");
    }
    // libpq asks for GSS encryption first, then SSL, and still gets in.
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres gssencmode=prefer sslmode=prefer",
        proxy.port()
    );
    let out = pgmesh_tests::psql(&["-Atc", "SELECT 1", "-d", &conninfo], &[])
        .await?
        .ok()?;
    assert_eq!(out.stdout.trim(), "1");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_hanging_up_mid_message_leaks_nothing() -> Result<()> {
    let (cluster, proxy) = cluster_and_proxy(ClusterOptions::default()).await?;
    let other = connect(&proxy.conn_string()).await?;
    for partial in [
        // Mid-header and mid-body.
        &wire::query("SELECT 1")[..3],
        &wire::query("SELECT 'a long query text'")[..12],
    ] {
        let mut client = RawClient::login(proxy.addr()).await?;
        client.send(partial).await?;
        drop(client);
    }
    // Mid-startup.
    let mut client = RawClient::connect(proxy.addr()).await?;
    client
        .send(&wire::startup(wire::PROTOCOL_3_0, &[("user", "postgres")])[..10])
        .await?;
    drop(client);
    // A mid-COPY hang-up.
    let mut client = RawClient::login(proxy.addr()).await?;
    client
        .send(&wire::query(
            "CREATE TEMP TABLE c (v int); COPY c FROM STDIN",
        ))
        .await?;
    loop {
        let m = client.recv().await?.expect("CopyInResponse before close");
        if m.tag == b'G' {
            break;
        }
    }
    client.send(&wire::frame(b'd', b"1\n2\n")).await?;
    drop(client);

    // The proxy keeps serving: the surviving session and a new one work.
    other.simple_query("SELECT 1").await?;
    let fresh = connect(&proxy.conn_string()).await?;
    fresh.simple_query("SELECT 1").await?;
    wait_until(
        DEFAULT_TIMEOUT,
        "only the two real sessions to remain",
        || async { proxy.live_sessions() == 2 },
    )
    .await?;
    drop((other, fresh));
    assert_no_sessions_left(&cluster, &proxy).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_08001() -> Result<()> {
    pgmesh_tests::init_tracing();
    // A port that was just free: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let upstream = format!("postgres://postgres@127.0.0.1:{closed}/postgres");
    let proxy = ProxyNode::start_upstream(&upstream, |_| {}).await?;
    let err = connect(&proxy.conn_string())
        .await
        .expect_err("no upstream to connect to");
    assert_eq!(sqlstate(&err), Some("08001"), "{err}");
    let db = err.as_db_error().expect("a FATAL from the proxy");
    assert_eq!(db.severity(), "FATAL");
    assert!(
        db.message().contains("could not connect to upstream"),
        "{db:?}"
    );
    // psql shows the reason too.
    let out = pgmesh_tests::psql(&["-c", "SELECT 1", "-d", &proxy.conn_string()], &[]).await?;
    assert!(!out.success());
    assert!(
        out.stderr.contains("could not connect to upstream"),
        "{}",
        out.stderr
    );
    assert_eq!(proxy.live_sessions(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_terminated_mid_query_is_57p01() -> Result<()> {
    let (cluster, proxy) = cluster_and_proxy(ClusterOptions::default()).await?;
    let direct = cluster.connect().await?;
    let victim = connect(&proxy.conn_string()).await?;
    let pid: i32 = victim
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0);
    let running = tokio::spawn(async move {
        let result = victim.simple_query("SELECT pg_sleep(30)").await;
        (victim, result)
    });
    wait_until(DEFAULT_TIMEOUT, "the sleep to run", || async {
        direct
            .query_opt(
                "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active'",
                &[&pid],
            )
            .await
            .ok()
            .flatten()
            .is_some()
    })
    .await?;
    direct
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await?;
    let (victim, result) = tokio::time::timeout(DEFAULT_TIMEOUT, running).await??;
    let err = result.expect_err("the query's backend was terminated");
    assert_eq!(sqlstate(&err), Some("57P01"), "{err}");
    wait_until(DEFAULT_TIMEOUT, "the session to close", || async {
        victim.is_closed()
    })
    .await?;
    let fresh = connect(&proxy.conn_string()).await?;
    fresh.simple_query("SELECT 1").await?;
    drop(fresh);
    drop(direct);
    assert_no_sessions_left(&cluster, &proxy).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_crash_mid_query_is_reported_and_survived() -> Result<()> {
    let (cluster, proxy) = cluster_and_proxy(ClusterOptions::default()).await?;
    let victim = connect(&proxy.conn_string()).await?;
    victim.simple_query("SELECT 1").await?;
    let running = tokio::spawn(async move {
        let result = victim.simple_query("SELECT pg_sleep(30)").await;
        (victim, result)
    });
    let direct = cluster.connect().await?;
    wait_until(DEFAULT_TIMEOUT, "the sleep to run", || async {
        direct
            .query_opt(
                "SELECT 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'",
                &[],
            )
            .await
            .ok()
            .flatten()
            .is_some()
    })
    .await?;
    drop(direct);
    let cluster = tokio::task::spawn_blocking(move || cluster.kill9().map(|()| cluster)).await??;
    let (victim, result) = tokio::time::timeout(DEFAULT_TIMEOUT, running).await??;
    let err = result.expect_err("the server died under the query");
    // The backend dies without a word when its postmaster is gone, so the
    // proxy reports the lost connection itself.
    let code = sqlstate(&err);
    assert!(matches!(code, Some("08006") | Some("57P01")), "{err}");
    wait_until(DEFAULT_TIMEOUT, "the session to close", || async {
        victim.is_closed()
    })
    .await?;
    wait_until(DEFAULT_TIMEOUT, "the proxy's sessions to close", || async {
        proxy.live_sessions() == 0
    })
    .await?;
    // While the server is down, new clients get 08001; once it is back, they
    // get in again through the same proxy.
    let err = connect(&proxy.conn_string())
        .await
        .expect_err("server is down");
    assert_eq!(sqlstate(&err), Some("08001"), "{err}");
    let cluster =
        tokio::task::spawn_blocking(move || cluster.start_again().map(|()| cluster)).await??;
    let fresh = connect(&proxy.conn_string()).await?;
    let one: i32 = fresh.query_one("SELECT 1", &[]).await?.get(0);
    assert_eq!(one, 1);
    drop(fresh);
    assert_no_sessions_left(&cluster, &proxy).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_timeout_closes_silent_and_stalled_clients() -> Result<()> {
    pgmesh_tests::init_tracing();
    let opts =
        ClusterOptions::default().password_user("md5_user", "pw", pgmesh_tests::AuthMethod::Md5);
    let cluster = pgmesh_tests::PgCluster::start_async(opts).await?;
    let proxy = ProxyNode::start_with(&cluster, |c| c.login_timeout_secs = 1).await?;
    let deadline = Duration::from_secs(15);

    // Connects and says nothing: closed; anything said first is an error.
    let mut silent = RawClient::connect(proxy.addr()).await?;
    let msgs = silent.until_closed(deadline).await?;
    assert!(msgs.iter().all(|m| m.tag == b'E'), "{msgs:?}");

    // Starts up, is asked for a password, never answers: a FATAL error.
    let mut stalled = RawClient::connect(proxy.addr()).await?;
    stalled
        .send(&wire::startup(
            wire::PROTOCOL_3_0,
            &[("user", "md5_user"), ("database", "postgres")],
        ))
        .await?;
    let ask = stalled.recv().await?.expect("an authentication request");
    assert_eq!(
        (ask.tag, ask.int()),
        (b'R', Some(5)),
        "AuthenticationMD5Password"
    );
    let msgs = stalled.until_closed(deadline).await?;
    let err = msgs
        .iter()
        .find(|m| m.tag == b'E')
        .expect("an ErrorResponse");
    assert_eq!(err.field(b'V').as_deref(), Some("FATAL"));
    assert!(
        err.sqlstate().unwrap_or_default().starts_with("08"),
        "{err:?}"
    );

    // A client that logs in in time is not affected by the timeout later.
    let client = connect(&proxy.conn_string()).await?;
    let slept = client.simple_query("SELECT pg_sleep(1.5)").await;
    assert!(slept.is_ok(), "{slept:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_refuses_with_53300() -> Result<()> {
    pgmesh_tests::init_tracing();
    let cluster = pgmesh_tests::PgCluster::start_async(ClusterOptions::default()).await?;
    let proxy = ProxyNode::start_with(&cluster, |c| c.max_connections = 2).await?;
    let first = connect(&proxy.conn_string()).await?;
    let second = connect(&proxy.conn_string()).await?;
    let err = connect(&proxy.conn_string())
        .await
        .expect_err("a third connection is over the cap");
    assert_eq!(sqlstate(&err), Some("53300"), "{err}");
    first.simple_query("SELECT 1").await?;
    second.simple_query("SELECT 1").await?;
    // A freed slot is usable again.
    drop(first);
    let third = pgmesh_tests::wait_for(DEFAULT_TIMEOUT, "a freed slot", || async {
        Ok(connect(&proxy.conn_string()).await.ok())
    })
    .await?;
    third.simple_query("SELECT 1").await?;
    Ok(())
}
