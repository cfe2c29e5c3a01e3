//! `sslmode` parsing and the SSLRequest negotiation against an in-process TLS server
//! with certificates from `pgmesh certs`.

use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::link::tls::load_key;

#[test]
fn from_url_takes_out_only_the_tls_parameters() {
    let (tls, rest) = PgTls::from_url(
        "postgres://u:p%40x@db:5433/app?application_name=a&sslmode=require&connect_timeout=3",
    )
    .unwrap();
    assert_eq!(tls.mode(), SslMode::Require);
    assert_eq!(
        rest,
        "postgres://u:p%40x@db:5433/app?application_name=a&connect_timeout=3"
    );
    let (tls, rest) = PgTls::from_url("postgresql://127.0.0.1/db?sslmode=prefer").unwrap();
    assert_eq!(
        (tls.mode(), rest.as_str()),
        (SslMode::Prefer, "postgresql://127.0.0.1/db")
    );
    let (tls, _) = PgTls::from_url("postgres://h/db").unwrap();
    assert_eq!(tls.mode(), SslMode::Disable, "the default is disable");
    let (tls, _) = PgTls::from_url("postgres://h/db?sslmode=allow").unwrap();
    assert_eq!(tls.mode(), SslMode::Prefer);
}

#[test]
fn the_rest_of_the_text_is_left_as_it_was() {
    // Other parameters keep their encoding; `+` is not a space; no URL is rebuilt.
    let err = PgTls::from_url(
        "postgres://u@h1:5432,h2:5433/db?options=-c%20x%3D0&sslrootcert=/etc/my+ca.pem&sslmode=require",
    )
    .unwrap_err()
    .to_string();
    // The root file does not exist: the error names the path as given.
    assert!(err.contains("/etc/my+ca.pem"), "{err}");
    let (tls, rest) =
        PgTls::from_url("postgres://u@h1:5432,h2:5433/db?options=-c%20x%3D0&sslmode=prefer")
            .unwrap();
    assert_eq!(tls.mode(), SslMode::Prefer);
    assert_eq!(rest, "postgres://u@h1:5432,h2:5433/db?options=-c%20x%3D0");
    // libpq key=value strings too.
    let (tls, rest) = PgTls::from_url("host=127.0.0.1 sslmode=require user=u dbname=d").unwrap();
    assert_eq!(
        (tls.mode(), rest.as_str()),
        (SslMode::Require, "host=127.0.0.1 user=u dbname=d")
    );
    // A Unix-socket URL still connects without TLS: its empty host name is no error
    // until TLS would use it.
    assert!(pg_config("postgres://u@%2Fvar%2Frun%2Fpostgresql/db").is_ok());
    let (_, mut make) = pg_config("postgres://u@%2Ftmp/db").unwrap();
    assert!(MakeTlsConnect::<Socket>::make_tls_connect(&mut make, "").is_ok());
}

#[test]
fn bad_tls_parameters_are_refused_with_the_reason() {
    let err = |url: &str| PgTls::from_url(url).unwrap_err().to_string();
    assert!(err("postgres://h/d?sslmode=bogus").contains("unknown sslmode \"bogus\""));
    assert!(err("postgres://h/d?sslmode=verify-full").contains("needs sslrootcert"));
    assert!(err("postgres://h/d?sslmode=verify-ca").contains("needs sslrootcert"));
    assert!(
        err("postgres://h/d?sslmode=require&sslrootcert=/no/such/ca.pem")
            .contains("/no/such/ca.pem")
    );
    assert!(pg_config("not a url").is_err());
}

#[test]
fn settings_go_back_into_a_url() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("a b&c.pem");
    crate::certs::generate(dir.path(), &["pg"]).unwrap();
    std::fs::rename(dir.path().join("ca.pem"), &ca).unwrap();
    let tls = PgTls::new(SslMode::VerifyFull, Some(ca.clone())).unwrap();
    let url = format!("postgres://u@h/db?{}", tls.url_query());
    let (again, rest) = PgTls::from_url(&url).unwrap();
    assert_eq!(rest, "postgres://u@h/db");
    assert_eq!(again.mode(), SslMode::VerifyFull);
    assert_eq!(again.root.as_deref(), Some(ca.as_path()));
}

/// A server that answers every SSLRequest with `answer`, then (for `S`) completes a
/// TLS handshake with `cert`/`key` and echoes one byte.
async fn server(answer: u8, cert: &Path, key: &Path) -> std::net::SocketAddr {
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(load_certs(cert).unwrap(), load_key(key).unwrap())
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut req = [0u8; 8];
                s.read_exact(&mut req).await?;
                assert_eq!(req, SSL_REQUEST);
                s.write_all(&[answer]).await?;
                if answer == b'S' {
                    let mut tls = acceptor.accept(s).await?;
                    let b = tls.read_u8().await?;
                    tls.write_all(&[b]).await?;
                    tls.flush().await?;
                }
                Ok::<_, io::Error>(())
            });
        }
    });
    addr
}

struct Certs {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    other_ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// A CA with a certificate for `pg` (also `localhost`, `127.0.0.1`), and a second,
/// unrelated CA.
fn certs() -> Certs {
    let dir = tempfile::tempdir().unwrap();
    let g = crate::certs::generate(&dir.path().join("a"), &["pg"]).unwrap();
    let other = crate::certs::generate(&dir.path().join("b"), &["x"]).unwrap();
    Certs {
        ca: g.ca_cert,
        other_ca: other.ca_cert,
        cert: g.nodes[0].cert.clone(),
        key: g.nodes[0].key.clone(),
        _dir: dir,
    }
}

async fn connect(
    addr: std::net::SocketAddr,
    mode: SslMode,
    root: Option<&Path>,
    host: &str,
) -> Result<PgStream, PgTlsError> {
    let tls = PgTls::new(mode, root.map(Path::to_path_buf))?;
    let mut s = tls
        .negotiate(TcpStream::connect(addr).await.unwrap(), host)
        .await?;
    if s.is_tls() {
        s.write_all(&[7]).await.unwrap();
        assert_eq!(s.read_u8().await.unwrap(), 7, "data flows over TLS");
    }
    Ok(s)
}

#[tokio::test]
async fn each_mode_checks_what_libpq_checks() {
    let c = certs();
    let addr = server(b'S', &c.cert, &c.key).await;
    let ok = |r: Result<PgStream, PgTlsError>| r.map(|s| s.is_tls()).map_err(|e| e.to_string());

    // The right CA and a name on the certificate.
    for host in ["pg", "127.0.0.1"] {
        assert_eq!(
            ok(connect(addr, SslMode::VerifyFull, Some(&c.ca), host).await),
            Ok(true)
        );
    }
    // A name not on the certificate: only verify-full cares.
    let wrong = ok(connect(addr, SslMode::VerifyFull, Some(&c.ca), "db.example").await);
    assert!(
        wrong.as_ref().is_err_and(|e| e.contains("TLS handshake")),
        "{wrong:?}"
    );
    for mode in [SslMode::VerifyCa, SslMode::Require, SslMode::Prefer] {
        assert_eq!(
            ok(connect(addr, mode, Some(&c.ca), "db.example").await),
            Ok(true)
        );
    }
    // A CA that did not sign it (one with the same name): refused whenever a root
    // certificate is given.
    for mode in [SslMode::VerifyFull, SslMode::VerifyCa, SslMode::Require] {
        let r = ok(connect(addr, mode, Some(&c.other_ca), "pg").await);
        assert!(
            r.as_ref()
                .is_err_and(|e| e.contains("invalid peer certificate")),
            "{mode:?}: {r:?}"
        );
    }
    // No root certificate: encrypted, not authenticated.
    assert_eq!(
        ok(connect(addr, SslMode::Require, None, "anything").await),
        Ok(true)
    );
    // Disable never asks.
    let plain = PgTls::disabled()
        .negotiate(TcpStream::connect(addr).await.unwrap(), "pg")
        .await
        .unwrap();
    assert!(!plain.is_tls());
}

#[tokio::test]
async fn a_server_without_tls_is_refused_unless_tls_is_only_preferred() {
    let c = certs();
    let addr = server(b'N', &c.cert, &c.key).await;
    let r = connect(addr, SslMode::Require, None, "pg").await;
    let msg = r.unwrap_err().to_string();
    assert!(
        msg.contains("does not accept TLS, but sslmode=require"),
        "{msg}"
    );
    let r = connect(addr, SslMode::VerifyFull, Some(&c.ca), "pg").await;
    assert!(matches!(
        r,
        Err(PgTlsError::Refused {
            mode: "verify-full",
            ..
        })
    ));
    assert!(!connect(addr, SslMode::Prefer, None, "pg")
        .await
        .unwrap()
        .is_tls());
}
