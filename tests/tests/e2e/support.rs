//! Small helpers shared by the end-to-end modules.
//!
//! This module owns the common setup (a trust-auth cluster with a proxy in front
//! of it), SQLSTATE extraction from client errors, a tokio-postgres connection
//! whose asynchronous messages (NOTICE, NOTIFY) reach the test through a channel
//! and whose ParameterStatus values can be read,
//! and self-signed certificates made with rcgen. It must never hide an assertion.

use std::path::PathBuf;

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use futures::StreamExt;
use pgmesh_tests::{
    psql, wait_for, ClusterOptions, CmdOutput, PgBin, PgCluster, ProxyNode, DEFAULT_TIMEOUT,
};
use tokio::sync::mpsc;
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{AsyncMessage, Client, Connection, NoTls, Socket};

/// A fresh cluster with `opts` and an in-process proxy in front of it.
pub async fn cluster_and_proxy(opts: ClusterOptions) -> Result<(PgCluster, ProxyNode)> {
    pgmesh_tests::init_tracing();
    let cluster = PgCluster::start_async(opts).await?;
    let proxy = ProxyNode::start(&cluster).await?;
    Ok((cluster, proxy))
}

/// Run `psql -X -Atq -c <sql>` with a full libpq connection string.
pub async fn psql_conn(conninfo: &str, sql: &str) -> Result<CmdOutput> {
    psql(&["-Atq", "-d", conninfo, "-c", sql], &[]).await
}

/// Turn on TLS in a running cluster with `certs`, waiting until a TLS
/// connection to it works. The files go into the cluster's own directory,
/// owned by the server user, the key with mode 0600 as PostgreSQL demands.
pub async fn enable_server_tls(cluster: &PgCluster, certs: &TestCerts) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let bin = PgBin::get()?;
    let cert = cluster.root_dir().join("server.crt");
    let key = cluster.root_dir().join("server.key");
    std::fs::copy(certs.cert(), &cert)?;
    std::fs::copy(certs.key(), &key)?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    bin.give_to_server_user(&cert)?;
    bin.give_to_server_user(&key)?;
    let client = cluster.connect().await?;
    // One statement per call: ALTER SYSTEM refuses an implicit transaction.
    for sql in [
        format!("ALTER SYSTEM SET ssl_cert_file = '{}'", cert.display()),
        format!("ALTER SYSTEM SET ssl_key_file = '{}'", key.display()),
        "ALTER SYSTEM SET ssl = on".to_string(),
        "SELECT pg_reload_conf()".to_string(),
    ] {
        client.batch_execute(&sql).await?;
    }
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require",
        cluster.port()
    );
    wait_for(DEFAULT_TIMEOUT, "the server to accept TLS", || async {
        let out = psql_conn(
            &conninfo,
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        )
        .await?;
        Ok((out.success() && out.stdout.trim() == "t").then_some(()))
    })
    .await
}

/// The SQLSTATE a tokio-postgres error carries, if any.
pub fn sqlstate(err: &tokio_postgres::Error) -> Option<&str> {
    err.code().map(|c| c.code())
}

/// A tokio-postgres connection whose asynchronous messages (notices and
/// notifications) arrive on [`WatchedConn::messages`], in order, and whose
/// server parameters (from ParameterStatus) can be read at any time.
pub struct WatchedConn {
    pub client: Client,
    pub messages: mpsc::UnboundedReceiver<AsyncMessage>,
    connection: Arc<Mutex<Connection<Socket, NoTlsStream>>>,
}

impl std::fmt::Debug for WatchedConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchedConn")
            .field("closed", &self.client.is_closed())
            .finish_non_exhaustive()
    }
}

impl WatchedConn {
    /// Connect and start driving the connection on the current runtime.
    pub async fn connect(conn_str: &str) -> Result<WatchedConn> {
        let (client, connection) = tokio_postgres::connect(conn_str, NoTls).await?;
        let connection = Arc::new(Mutex::new(connection));
        let (tx, messages) = mpsc::unbounded_channel();
        let polled = connection.clone();
        let mut stream = futures::stream::poll_fn(move |cx| {
            polled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .poll_message(cx)
        });
        tokio::spawn(async move {
            while let Some(message) = stream.next().await {
                match message {
                    Ok(m) => {
                        let _ = tx.send(m);
                    }
                    Err(error) => {
                        tracing::debug!(%error, "test connection ended");
                        break;
                    }
                }
            }
        });
        Ok(WatchedConn {
            client,
            messages,
            connection,
        })
    }

    /// The latest value the server reported for parameter `name`.
    pub fn parameter(&self, name: &str) -> Option<String> {
        let connection = self.connection.lock().unwrap_or_else(|e| e.into_inner());
        connection.parameter(name).map(str::to_string)
    }

    /// The next asynchronous message, waiting at most [`DEFAULT_TIMEOUT`].
    pub async fn next_message(&mut self) -> Result<AsyncMessage> {
        tokio::time::timeout(DEFAULT_TIMEOUT, self.messages.recv())
            .await
            .context("no asynchronous message within the deadline")?
            .context("the connection ended")
    }
}

/// A CA and a server certificate it signed, valid for `localhost` and
/// `127.0.0.1`, written as PEM into a temp directory.
#[derive(Debug)]
pub struct TestCerts {
    dir: tempfile::TempDir,
}

impl TestCerts {
    /// Generate the CA and the server certificate.
    pub fn generate() -> Result<TestCerts> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let dir = tempfile::tempdir().context("creating a cert dir")?;
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "pgmesh test CA");
        let ca = ca_params.self_signed(&ca_key)?;
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        std::fs::write(dir.path().join("ca.crt"), ca.pem())?;
        std::fs::write(dir.path().join("server.crt"), cert.pem())?;
        std::fs::write(dir.path().join("server.key"), key.serialize_pem())?;
        Ok(TestCerts { dir })
    }

    /// The CA certificate (`sslrootcert`).
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The server certificate.
    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("server.crt")
    }

    /// The server's private key.
    pub fn key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }
}

/// Borrow a `Vec<(&str, String)>` environment as the `&[(&str, &str)]` the
/// client helpers take.
pub fn env_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'a str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}
