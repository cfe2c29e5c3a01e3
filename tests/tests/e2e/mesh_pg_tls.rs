//! A node's own sessions to its PostgreSQL over TLS, as its `--upstream` URL's
//! `sslmode` and `sslrootcert` say: capture's replication connection, the change
//! log, apply, LISTEN and the proxy's upstream sessions alike.
//!
//! The clusters accept role `mesh_tls` only over TLS (`hostnossl ... reject`, for
//! normal and replication connections) and with SCRAM, and their certificates come
//! from a test CA.
//! Two regions replicate both ways with `sslmode=verify-full`; the same URL with
//! another CA is refused by `pgmesh init` and by the replication connection, each
//! naming the certificate. This module owns those checks.

use anyhow::Result;
use pgmesh_replicator::catalog::{self, TableSelection};
use pgmesh_replicator::replconn::{ConnParams, ReplConnection};
use pgmesh_tests::regions::{Mesh, NodeSpec};
use pgmesh_tests::{pgmesh_output, ClusterOptions};

use crate::mesh_tls::wait_row;
use crate::support::{enable_server_tls, TestCerts};

const ROLE: &str = "mesh_tls";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reaches_a_tls_only_postgres_as_its_url_says() -> Result<()> {
    let certs = TestCerts::generate()?;
    let other = TestCerts::generate()?;
    let opts = ClusterOptions::default()
        .hba_line(format!("hostnossl all {ROLE} all reject"))
        .hba_line(format!("hostnossl replication {ROLE} all reject"))
        .hba_line(format!("hostssl all {ROLE} all scram-sha-256"))
        .hba_line(format!("hostssl replication {ROLE} all scram-sha-256"));
    let mut mesh = Mesh::start_with(&["pgtls_a", "pgtls_b"], opts).await?;
    mesh.exec_all(&format!(
        "SET password_encryption = 'scram-sha-256';
         CREATE ROLE {ROLE} LOGIN SUPERUSER PASSWORD 's3cret';
         CREATE TABLE t (id int PRIMARY KEY, v text)"
    ))
    .await?;
    let url = |i: usize, ca: &std::path::Path, mode: &str| {
        format!(
            "postgres://{ROLE}:s3cret@127.0.0.1:{}/postgres?sslmode={mode}&sslrootcert={}",
            mesh.region(i).cluster.port(),
            ca.display()
        )
    };
    let urls: Vec<String> = (0..2).map(|i| url(i, &certs.ca(), "verify-full")).collect();
    let wrong_ca = url(0, &other.ca(), "verify-ca");
    let plain = url(0, &certs.ca(), "disable");
    for r in &mesh.regions {
        enable_server_tls(&r.cluster, &certs).await?;
    }

    // Without TLS the role is refused: the rule holds.
    let err = catalog::connect(&plain).await.expect_err("plain connects");
    assert!(err.to_string().contains("no encryption"), "{err}");

    // A CA that did not sign the server's certificate: init and capture refuse it.
    let out = pgmesh_output(&["init", "--upstream", &wrong_ca, "--region", "pgtls_a"]).await?;
    assert!(!out.success(), "init with the wrong CA succeeded: {out:?}");
    assert!(out.stderr.contains("certificate"), "{}", out.stderr);
    let err = ReplConnection::connect(&ConnParams::from_url(&wrong_ca)?)
        .await
        .expect_err("the replication connection trusted the wrong CA");
    assert!(
        err.to_string().contains("invalid peer certificate"),
        "{err}"
    );

    // With the right CA, the mesh runs over TLS only.
    for (i, r) in mesh.regions.iter().enumerate() {
        catalog::init(&urls[i], &r.name, &TableSelection::default()).await?;
    }
    mesh.start_nodes(|i| NodeSpec {
        upstream: Some(urls[i].clone()),
        process: i == 0,
        ..NodeSpec::default()
    })
    .await?;
    mesh.connect_proxy(0)
        .await?
        .execute("INSERT INTO t VALUES (1, 'from a')", &[])
        .await?;
    let b = mesh.connect_proxy(1).await?;
    b.execute("INSERT INTO t VALUES (2, 'from b')", &[]).await?;
    wait_row(&mesh, 1, 1).await?;
    wait_row(&mesh, 0, 2).await?;

    // The proxy's upstream session is encrypted too.
    let ssl: bool = b
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?
        .get(0);
    assert!(ssl, "the proxy's upstream session is not TLS");
    // Every node session is the role's, so TLS; each part is among them.
    let sessions: Vec<String> = mesh
        .region(0)
        .admin
        .query(
            "SELECT a.application_name FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.usename = $1 AND s.ssl ORDER BY 1",
            &[&ROLE],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for part in [
        "pgmesh-capture-pgtls_a", // the walsender
        "pgmesh-capture-lock",
        "pgmesh-capture-log",
        "pgmesh-apply-pgtls_b",
        "pgmesh-serve",
        "pgmesh-notify",
        "pgmesh-links",
    ] {
        assert!(
            sessions.iter().any(|s| s == part),
            "no TLS session {part}: {sessions:?}"
        );
    }
    mesh.shutdown().await;
    Ok(())
}
