//! What the server says on its own: cancel, NOTIFY, NOTICE and ParameterStatus.
//!
//! This module owns the messages that do not answer a query one-for-one: a
//! CancelRequest on a fresh connection that must reach the right backend
//! through the proxy's key mapping, notifications that arrive while the client
//! is idle, notices raised mid-statement, and ParameterStatus after `SET`.

use std::time::Duration;

use anyhow::{bail, Result};
use pgmesh_tests::{connect, wait_until, ClusterOptions, DEFAULT_TIMEOUT};
use tokio_postgres::{AsyncMessage, NoTls};

use crate::support::{cluster_and_proxy, sqlstate, WatchedConn};
use crate::wire::{self, RawClient};

/// How long a cancel may take to end `pg_sleep(30)`: far below the 30 s that
/// would mean it never arrived, generous for a loaded machine.
const CANCEL_DEADLINE: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_right_backend() -> Result<()> {
    let (cluster, proxy) = cluster_and_proxy(ClusterOptions::default()).await?;
    let direct = cluster.connect().await?;
    let sleeper = connect(&proxy.conn_string()).await?;
    let bystander = connect(&proxy.conn_string()).await?;
    let sleeper_pid: i32 = sleeper
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0);
    let token = sleeper.cancel_token();
    let bystander_token = bystander.cancel_token();

    let sleeping = tokio::spawn(async move {
        let result = sleeper.simple_query("SELECT pg_sleep(30)").await;
        (sleeper, result)
    });
    let bystander_sleep = tokio::spawn(async move {
        let result = bystander
            .query("SELECT pg_sleep(0.5), 'bystander'", &[])
            .await;
        (bystander, result)
    });
    wait_until(DEFAULT_TIMEOUT, "pg_sleep(30) to be running", || async {
        direct
            .query_opt(
                "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active' \
                 AND query = 'SELECT pg_sleep(30)'",
                &[&sleeper_pid],
            )
            .await
            .ok()
            .flatten()
            .is_some()
    })
    .await?;
    token.cancel_query(NoTls).await?;

    // Well before pg_sleep(30) would end by itself.
    let (sleeper, result) = tokio::time::timeout(CANCEL_DEADLINE, sleeping).await??;
    let err = result.expect_err("the sleep must be cancelled");
    assert_eq!(sqlstate(&err), Some("57014"), "{err}");
    // The other session's query was not the one cancelled.
    let (bystander, result) = tokio::time::timeout(DEFAULT_TIMEOUT, bystander_sleep).await??;
    assert_eq!(result?[0].get::<_, &str>(1), "bystander");
    // Both sessions go on; a cancel with nothing running does no harm.
    bystander_token.cancel_query(NoTls).await?;
    let one: i32 = sleeper.query_one("SELECT 1", &[]).await?.get(0);
    assert_eq!(one, 1);
    // PostgreSQL delivers a cancel as a signal, asynchronously: one that lands late
    // cancels whatever runs then, as it would without the proxy. The session must
    // still work once that has happened.
    let two: i32 = match bystander.query_one("SELECT 2", &[]).await {
        Err(e) if sqlstate(&e) == Some("57014") => {
            bystander.query_one("SELECT 2", &[]).await?.get(0)
        }
        other => other?.get(0),
    };
    assert_eq!(two, 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_is_delivered_through_the_proxy() -> Result<()> {
    let (cluster, proxy) = cluster_and_proxy(ClusterOptions::default()).await?;
    let mut listener = WatchedConn::connect(&proxy.conn_string()).await?;
    listener.client.batch_execute("LISTEN pgmesh_e2e").await?;

    // From a direct session, while the listener sits idle.
    let direct = cluster.connect().await?;
    let direct_pid: i32 = direct
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0);
    direct
        .batch_execute("NOTIFY pgmesh_e2e, 'payload ✓ from direct'")
        .await?;
    // From another proxied session, inside a transaction: delivered at commit.
    let notifier = connect(&proxy.conn_string()).await?;
    notifier
        .batch_execute(
            "BEGIN; SELECT pg_notify('pgmesh_e2e', 'from proxy'); \
             SELECT pg_notify('other_channel', 'not for us'); COMMIT",
        )
        .await?;

    let mut got = Vec::new();
    while got.len() < 2 {
        match listener.next_message().await? {
            AsyncMessage::Notification(n) => got.push((
                n.channel().to_string(),
                n.payload().to_string(),
                n.process_id(),
            )),
            other => bail!("unexpected message {other:?}"),
        }
    }
    assert_eq!(
        got[0],
        (
            "pgmesh_e2e".to_string(),
            "payload ✓ from direct".to_string(),
            direct_pid
        )
    );
    assert_eq!(
        (got[1].0.as_str(), got[1].1.as_str()),
        ("pgmesh_e2e", "from proxy")
    );
    // The listener's session is still fine for queries.
    let one: i32 = listener.client.query_one("SELECT 1", &[]).await?.get(0);
    assert_eq!(one, 1);
    assert!(
        listener.messages.try_recv().is_err(),
        "no third notification"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_and_parameter_status_pass_through() -> Result<()> {
    let (_cluster, proxy) = cluster_and_proxy(ClusterOptions::default()).await?;
    let mut conn = WatchedConn::connect(&proxy.conn_string()).await?;
    conn.client
        .batch_execute(
            "DO $$ BEGIN RAISE NOTICE 'hello %', 'wörld' USING DETAIL = 'some detail'; \
             RAISE WARNING 'careful'; END $$",
        )
        .await?;
    for (severity, text) in [("NOTICE", "hello wörld"), ("WARNING", "careful")] {
        match conn.next_message().await? {
            AsyncMessage::Notice(n) => {
                assert_eq!((n.severity(), n.message()), (severity, text));
                if severity == "NOTICE" {
                    assert_eq!(n.detail(), Some("some detail"));
                }
            }
            other => bail!("expected a notice, got {other:?}"),
        }
    }

    assert_eq!(conn.parameter("application_name").as_deref(), Some(""));
    conn.client
        .batch_execute("SET application_name = 'pgmesh e2e'; SET DateStyle = 'German'")
        .await?;
    assert_eq!(
        conn.parameter("application_name").as_deref(),
        Some("pgmesh e2e")
    );
    assert_eq!(conn.parameter("DateStyle").as_deref(), Some("German, DMY"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_match_direct() -> Result<()> {
    let (cluster, proxy) = cluster_and_proxy(ClusterOptions::default()).await?;
    let direct_addr = format!("127.0.0.1:{}", cluster.port()).parse()?;
    let mut seen = Vec::new();
    for addr in [direct_addr, proxy.addr()] {
        let mut client = RawClient::connect(addr).await?;
        client
            .send(&wire::startup(
                wire::PROTOCOL_3_0,
                &[
                    ("user", "postgres"),
                    ("database", "postgres"),
                    ("application_name", "raw client"),
                ],
            ))
            .await?;
        let msgs = client.until_ready().await?;
        let tags: String = msgs.iter().map(|m| m.tag as char).collect();
        let mut params: Vec<Vec<u8>> = msgs
            .iter()
            .filter(|m| m.tag == b'S')
            .map(|m| m.body.clone())
            .collect();
        params.sort();
        // BackendKeyData: 4-byte pid + 4-byte secret in protocol 3.0.
        let key = msgs.iter().find(|m| m.tag == b'K').expect("BackendKeyData");
        assert_eq!(key.body.len(), 8);
        // The ParameterStatus set, not its order, is the contract.
        let mut sorted: Vec<char> = tags.chars().collect();
        sorted.sort_unstable();
        seen.push((sorted, params));
        client
            .send(&wire::query("SET application_name = 'changed'"))
            .await?;
        let msgs = client.until_ready().await?;
        let status = msgs
            .iter()
            .find(|m| m.tag == b'S')
            .expect("ParameterStatus");
        assert_eq!(status.body, b"application_name\0changed\0");
        client.send(&wire::frame(b'X', b"")).await?;
    }
    assert_eq!(
        seen[0], seen[1],
        "login messages differ between direct and proxy"
    );
    Ok(())
}
