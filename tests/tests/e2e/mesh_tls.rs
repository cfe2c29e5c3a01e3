//! Peer links over mutual TLS, and the refusal of a peer whose certificate the
//! mesh CA did not sign.
//!
//! `tls_a` (the real `pgmesh run` binary, so its log can be read) and `tls_b`
//! (in-process) use certificates from `pgmesh_replicator::certs::generate` (tls_b's
//! names a node bound to the region) and replicate both ways. The intruder `tls_x`
//! trusts the mesh CA, so it would accept `tls_a`'s certificate, but presents one
//! from a CA of its own: `tls_a` must refuse it during the TLS handshake, `tls_x`'s
//! link must record a TLS error and never apply anything, and `tls_a` must log the
//! refusal. This module owns those checks.

use anyhow::Result;
use pgmesh_replicator::certs;
use pgmesh_tests::regions::{Mesh, NodeSpec, PeerTls, CONVERGE_TIMEOUT};
use pgmesh_tests::{wait_for, wait_until};

const SCHEMA: &str = "CREATE TABLE t (id int PRIMARY KEY, v text)";

/// Waits until row `id` of `t` exists in region `i`.
pub(crate) async fn wait_row(mesh: &Mesh, i: usize, id: i32) -> Result<()> {
    let admin = &mesh.region(i).admin;
    let what = format!("row {id} to reach {}", mesh.region(i).name);
    pgmesh_tests::wait_row(
        admin,
        CONVERGE_TIMEOUT,
        &what,
        "SELECT 1 FROM t WHERE id = $1",
        &[&id],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_links_replicate_and_a_foreign_certificate_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // tls_a's certificate is named after its region; tls_b's after a node bound to
    // its region, as `pgmesh certs --nodes node-b@tls_b` writes it.
    let good = certs::generate(&dir.path().join("mesh"), &["tls_a", "node-b@tls_b"])?;
    let evil = certs::generate(&dir.path().join("intruder"), &["tls_x"])?;
    let tls = |cert: &certs::NodeFiles| PeerTls {
        cert: cert.cert.clone(),
        key: cert.key.clone(),
        ca: good.ca_cert.clone(),
    };
    let mut mesh = Mesh::start(&["tls_a", "tls_b", "tls_x"]).await?;
    mesh.exec_all(SCHEMA).await?;
    mesh.init_all().await?;
    mesh.start_nodes(|i| match i {
        0 => NodeSpec {
            peers: Some(vec!["tls_b".into()]),
            tls: Some(tls(&good.nodes[0])),
            process: true,
            ..NodeSpec::default()
        },
        1 => NodeSpec {
            peers: Some(vec!["tls_a".into()]),
            tls: Some(tls(&good.nodes[1])),
            ..NodeSpec::default()
        },
        _ => NodeSpec {
            peers: Some(vec!["tls_a".into()]),
            tls: Some(tls(&evil.nodes[0])),
            ..NodeSpec::default()
        },
    })
    .await?;

    // The mesh members replicate both ways over mTLS.
    mesh.connect_proxy(0)
        .await?
        .execute("INSERT INTO t VALUES (1, 'from a')", &[])
        .await?;
    mesh.connect_proxy(1)
        .await?
        .execute("INSERT INTO t VALUES (2, 'from b')", &[])
        .await?;
    wait_row(&mesh, 1, 1).await?;
    wait_row(&mesh, 0, 2).await?;

    // The intruder's link fails on TLS and applies nothing.
    let error = wait_for(
        CONVERGE_TIMEOUT,
        "tls_x's link to record an error",
        || async { Ok(mesh.link(2, "tls_a").await?.and_then(|l| l.error)) },
    )
    .await?;
    eprintln!("the intruder's link error: {error}");
    let lower = error.to_lowercase();
    assert!(
        lower.contains("tls") || lower.contains("certificate"),
        "the intruder's link error does not name TLS: {error}"
    );
    let link = mesh.link(2, "tls_a").await?.expect("the link exists");
    assert_eq!(
        link.checkpoint, 0,
        "the intruder applied something: {link:?}"
    );
    let rows: i64 = mesh
        .region(2)
        .admin
        .query_one("SELECT count(*) FROM t", &[])
        .await?
        .get(0);
    assert_eq!(rows, 0, "data reached the intruder");

    // The serving node refused it, and said so.
    let a = mesh.region(0).process().expect("tls_a is a process");
    wait_until(CONVERGE_TIMEOUT, "tls_a to log the refusal", || async {
        a.log()
            .lines()
            .any(|l| l.contains("peer refused") && l.to_lowercase().contains("cert"))
    })
    .await
    .map_err(|e| e.context(format!("tls_a log:\n{}", a.log())))?;
    mesh.shutdown().await;
    Ok(())
}

/// `pgmesh certs --host NODE=HOST` names the host in that node's certificate (so a
/// peer can dial it by that name), and refuses a host that could pass for a region.
#[tokio::test]
async fn certs_name_the_hosts_peers_dial() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("mesh");
    let out_s = out.to_string_lossy().into_owned();
    let ok = pgmesh_tests::pgmesh_output(&[
        "certs",
        "--out",
        &out_s,
        "--nodes",
        "eu,us",
        "--host",
        "eu=db-eu.example.com",
        "--host",
        "us=10.0.0.7",
    ])
    .await?;
    assert!(ok.status.success(), "{}", ok.stderr);
    assert!(
        ok.stdout.contains("also names host db-eu.example.com"),
        "{}",
        ok.stdout
    );
    let der = pgmesh_replicator::link::tls::load_certs(&out.join("eu.pem"))?.remove(0);
    let cert = webpki::EndEntityCert::try_from(&der)?;
    let host = rustls::pki_types::ServerName::try_from("db-eu.example.com")?;
    assert!(cert.verify_is_valid_for_subject_name(&host).is_ok());

    let bad = pgmesh_tests::pgmesh_output(&[
        "certs", "--out", &out_s, "--nodes", "ap", "--host", "ap=us",
    ])
    .await?;
    assert!(!bad.status.success());
    assert!(bad.stderr.contains("invalid host \"us\""), "{}", bad.stderr);
    assert!(!out.join("ap.pem").exists());
    Ok(())
}
