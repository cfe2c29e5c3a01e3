//! Startup and authentication passthrough: every method, and protocol 3.2.
//!
//! This module owns what happens before the first ReadyForQuery. The proxy
//! holds no passwords: cleartext, MD5 and SCRAM-SHA-256 exchanges go to
//! PostgreSQL untouched, so the right password logs in and a wrong one gets
//! PostgreSQL's own 28P01, through tokio-postgres and libpq alike. A 3.2
//! StartupMessage must come back negotiated down, as PostgreSQL does it.

use anyhow::Result;
use pgmesh_tests::{connect, AuthMethod, ClusterOptions};

use crate::support::{cluster_and_proxy, env_refs, sqlstate};
use crate::wire::{self, RawClient};

const USERS: [(&str, &str, AuthMethod); 3] = [
    ("clear_user", "cl3ar pw", AuthMethod::Password),
    ("md5_user", "m d5'pw", AuthMethod::Md5),
    ("scram_user", "scr@m ✓", AuthMethod::ScramSha256),
];

fn options() -> ClusterOptions {
    USERS
        .iter()
        .fold(ClusterOptions::default(), |o, (name, pw, method)| {
            o.password_user(*name, *pw, *method)
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_methods_pass_through_tokio_postgres() -> Result<()> {
    let (cluster, proxy) = cluster_and_proxy(options()).await?;
    for (user, password, method) in USERS {
        let good = proxy.conn_string_for("postgres", user, Some(password));
        let client = connect(&good).await?;
        let who: String = client.query_one("SELECT current_user", &[]).await?.get(0);
        assert_eq!(who, user, "{method:?}");

        for (conn_str, what) in [
            (
                proxy.conn_string_for("postgres", user, Some("wrong")),
                "proxy",
            ),
            (
                cluster.conn_string_for("postgres", user, Some("wrong")),
                "direct",
            ),
        ] {
            let err = connect(&conn_str)
                .await
                .expect_err("wrong password accepted");
            assert_eq!(sqlstate(&err), Some("28P01"), "{method:?} {what}: {err}");
            let message = err.as_db_error().map(|e| e.message().to_string());
            assert_eq!(
                message.as_deref(),
                Some(format!("password authentication failed for user \"{user}\"").as_str()),
                "{method:?} {what}"
            );
        }
    }
    // The method the server asked for is the one it was configured with.
    let methods = cluster
        .psql_sql("SELECT rolname, left(rolpassword, 3) FROM pg_authid WHERE rolname LIKE '%_user' ORDER BY 1")
        .await?;
    assert_eq!(
        methods.trim(),
        "clear_user|SCR\nmd5_user|md5\nscram_user|SCR"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_methods_pass_through_psql() -> Result<()> {
    let (_cluster, proxy) = cluster_and_proxy(options()).await?;
    for (user, password, method) in USERS {
        for (pw, ok) in [(password, true), ("wrong", false)] {
            let mut env = proxy.libpq_env();
            env.retain(|(k, _)| *k != "PGUSER");
            env.push(("PGUSER", user.to_string()));
            env.push(("PGPASSWORD", pw.to_string()));
            let out = pgmesh_tests::psql(&["-Atc", "SELECT current_user"], &env_refs(&env)).await?;
            if ok {
                assert!(out.success(), "{method:?}: {}", out.stderr);
                assert_eq!(out.stdout.trim(), user);
            } else {
                assert!(!out.success(), "{method:?}: wrong password accepted");
                assert!(
                    out.stderr.contains(&format!(
                        "password authentication failed for user \"{user}\""
                    )),
                    "{method:?}: {}",
                    out.stderr
                );
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_3_2_is_negotiated_down() -> Result<()> {
    let (_cluster, proxy) = cluster_and_proxy(ClusterOptions::default()).await?;
    let mut client = RawClient::connect(proxy.addr()).await?;
    client
        .send(&wire::startup(
            wire::PROTOCOL_3_2,
            &[
                ("user", "postgres"),
                ("database", "postgres"),
                ("_pq_.pgmesh_unknown", "1"),
            ],
        ))
        .await?;
    let msgs = client.until_ready().await?;
    let tags: String = msgs.iter().map(|m| m.tag as char).collect();
    // NegotiateProtocolVersion first, then AuthenticationOk, then the rest.
    assert!(tags.starts_with("vR"), "{tags}");
    assert!(tags.ends_with('Z'), "{tags}");
    assert!(tags.contains('K'), "{tags}");
    let v = &msgs[0];
    // The newest version the server speaks, as a full protocol code: 3.0 before
    // PostgreSQL 18, 3.2 from 18 on (which then only rejects the option).
    let newest = v.int().expect("a protocol version") as u32;
    assert!(
        newest == wire::PROTOCOL_3_0 || newest == wire::PROTOCOL_3_2,
        "{v:?}"
    );
    let mut unknown = newest.to_be_bytes().to_vec();
    unknown.extend_from_slice(b"\0\0\0\x01_pq_.pgmesh_unknown\0");
    assert_eq!(v.body, unknown, "the unrecognised option is listed");
    assert_eq!(msgs[1].int(), Some(0), "AuthenticationOk");

    client.send(&wire::query("SELECT 40 + 2")).await?;
    let msgs = client.until_ready().await?;
    let row = msgs.iter().find(|m| m.tag == b'D').expect("a DataRow");
    assert!(row.body.ends_with(b"42"), "{row:?}");
    Ok(())
}
