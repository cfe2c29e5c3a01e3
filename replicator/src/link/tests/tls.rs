//! TLS and mutual TLS with certificates from [`crate::certs`]: the happy path, the
//! refusal of peers without a certificate from the mesh CA, and of peers whose
//! certificate does not name the region they claim.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::ServerName;

use super::{client, next_batch, seqs, Harness};
use crate::certs;
use crate::link::tls::{client_config, server_config};
use crate::link::{ClientConfig, LinkClient, LinkError};

/// A mesh CA with nodes eu-1 (bound to region eu), us-1 (bound to us) and ap-1 (bound
/// to no region), and a rogue CA with node us-1 in `rogue/`.
fn material(dir: &Path) {
    certs::generate(dir, &["eu-1@eu", "us-1@us", "ap-1"]).unwrap();
    certs::generate(&dir.join("rogue"), &["us-1"]).unwrap();
}

fn server_tls(dir: &Path, mtls: bool) -> Arc<rustls::ServerConfig> {
    let ca = dir.join("ca.pem");
    server_config(
        &dir.join("eu-1.pem"),
        &dir.join("eu-1.key"),
        mtls.then_some(ca.as_path()),
    )
    .unwrap()
}

/// A client trusting `trust` (a CA file), presenting `identity` (cert, key) if any.
fn tls_client(trust: &Path, identity: Option<(&Path, &Path)>, name: &str) -> ClientConfig {
    let mut cfg = client("us");
    cfg.tls = Some((
        client_config(trust, identity).unwrap(),
        ServerName::try_from(name.to_string()).unwrap(),
    ));
    cfg
}

/// A server with the mesh certificate for eu-1 ([`material`] in a fresh directory,
/// which lives as long as the returned guard), requiring mesh client certificates
/// when `mtls`.
async fn mesh_server(mtls: bool) -> (tempfile::TempDir, Harness) {
    let dir = tempfile::tempdir().unwrap();
    material(dir.path());
    let h = Harness::start(|_| {}, Some(server_tls(dir.path(), mtls))).await;
    (dir, h)
}

fn mesh_identity(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    (dir.join("us-1.pem"), dir.join("us-1.key"))
}

#[tokio::test]
async fn mutual_tls_happy_path_by_node_name_localhost_and_ip() {
    let (dir, h) = mesh_server(true).await;
    h.log.push("eu", false);
    let (cert, key) = mesh_identity(dir.path());
    for name in ["eu-1", "localhost", "127.0.0.1"] {
        let cfg = tls_client(&dir.path().join("ca.pem"), Some((&cert, &key)), name);
        let (mut c, w) = LinkClient::connect(h.addr, cfg).await.unwrap();
        assert_eq!(w.region, "eu");
        assert_eq!(seqs(&next_batch(&mut c).await), (vec![1], 1));
    }
    h.stop().await;
}

#[tokio::test]
async fn tls_without_client_auth_accepts_a_client_without_a_certificate() {
    let (dir, h) = mesh_server(false).await;
    let cfg = tls_client(&dir.path().join("ca.pem"), None, "eu-1");
    LinkClient::connect(h.addr, cfg).await.unwrap();
    h.stop().await;
}

fn assert_tls_refusal(e: &LinkError) {
    // TLS 1.3 clients finish their side first, so the server's verdict arrives as an
    // alert on the first read rather than during connect.
    assert!(
        matches!(e, LinkError::Tls(_)),
        "expected a TLS refusal, got {e:?}"
    );
}

#[tokio::test]
async fn mutual_tls_refuses_peers_without_a_mesh_certificate() {
    let (dir, h) = mesh_server(true).await;
    h.log.push("eu", false);
    let ca = dir.path().join("ca.pem");

    // A certificate from another CA.
    let rogue = dir.path().join("rogue");
    let cfg = tls_client(
        &ca,
        Some((&rogue.join("us-1.pem"), &rogue.join("us-1.key"))),
        "eu-1",
    );
    let e = LinkClient::connect(h.addr, cfg).await.unwrap_err();
    assert_tls_refusal(&e);

    // No certificate at all.
    let e = LinkClient::connect(h.addr, tls_client(&ca, None, "eu-1"))
        .await
        .unwrap_err();
    assert_tls_refusal(&e);

    // Plaintext against a TLS server.
    assert!(LinkClient::connect(h.addr, client("us")).await.is_err());

    // The server is unharmed: a mesh peer still gets through.
    let (cert, key) = mesh_identity(dir.path());
    let (mut c, _) = LinkClient::connect(h.addr, tls_client(&ca, Some((&cert, &key)), "eu-1"))
        .await
        .unwrap();
    assert_eq!(seqs(&next_batch(&mut c).await), (vec![1], 1));
    h.stop().await;
}

#[tokio::test]
async fn mutual_tls_refuses_a_peer_whose_certificate_does_not_name_its_region() {
    let (dir, h) = mesh_server(true).await;
    h.log.push("eu", false);
    let ca = dir.path().join("ca.pem");
    let (cert, key) = mesh_identity(dir.path());
    let claim = |region: &str, node: &str| {
        let mut cfg = tls_client(&ca, Some((&cert, &key)), "eu-1");
        cfg.region = region.into();
        cfg.node = node.into();
        cfg
    };

    let refused = |e: LinkError, region: &str| match e {
        LinkError::Refused { reason } => assert!(
            reason.contains("does not name its region")
                && reason.contains(&format!("\"{region}\""))
                && reason.contains("--nodes"),
            "{reason}"
        ),
        other => panic!("expected a refusal, got {other:?}"),
    };

    // us-1's certificate (bound to us), claiming region ap: under its own node name
    // or another's.
    for node in ["us-1", "ap-1"] {
        let e = LinkClient::connect(h.addr, claim("ap", node))
            .await
            .unwrap_err();
        refused(e, "ap");
    }

    // A certificate that names only its node binds it to no region: refused even for
    // the region the node may belong to.
    let ap = tls_client(
        &ca,
        Some((&dir.path().join("ap-1.pem"), &dir.path().join("ap-1.key"))),
        "eu-1",
    );
    let mut cfg = ap;
    cfg.region = "ap".into();
    cfg.node = "ap-1".into();
    refused(LinkClient::connect(h.addr, cfg).await.unwrap_err(), "ap");

    // The certificate names the region it claims (bound with `@`): accepted, whatever
    // node it says it is. A node name is no region name, though its certificate names
    // it: "us-1" is refused as a region.
    let e = LinkClient::connect(h.addr, claim("us-1", "other"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not a region name"), "{e}");
    for (region, node) in [("us", "us-1"), ("us", "us-2"), ("us", "other")] {
        let (mut c, _) = LinkClient::connect(h.addr, claim(region, node))
            .await
            .unwrap();
        assert_eq!(seqs(&next_batch(&mut c).await), (vec![1], 1));
    }
    h.stop().await;
}

#[tokio::test]
async fn clients_refuse_servers_outside_the_mesh_or_under_another_name() {
    let (dir, h) = mesh_server(true).await;
    let (cert, key) = mesh_identity(dir.path());

    // Trusting only the rogue CA: the mesh server's certificate is not accepted.
    let cfg = tls_client(
        &dir.path().join("rogue").join("ca.pem"),
        Some((&cert, &key)),
        "eu-1",
    );
    assert_tls_refusal(&LinkClient::connect(h.addr, cfg).await.unwrap_err());

    // Right CA, wrong name.
    let cfg = tls_client(&dir.path().join("ca.pem"), Some((&cert, &key)), "ap-1");
    assert_tls_refusal(&LinkClient::connect(h.addr, cfg).await.unwrap_err());
    h.stop().await;
}
