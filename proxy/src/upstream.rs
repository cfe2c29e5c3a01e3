//! The upstream PostgreSQL: where it is and how to open a socket to it.
//!
//! Owns the parsing of the `postgres://` URL, TCP connect, and the SSLRequest/TLS
//! negotiation for each `sslmode`. It never reads or writes protocol messages beyond
//! the SSLRequest answer byte: startup and authentication are the client's own.

use std::net::SocketAddr;

use pgmesh_replicator::keepalive::{self, Settings};
use pgmesh_replicator::pgtls::{PgStream, PgTls, PgTlsError};
use thiserror::Error;

use crate::net::stream::Stream;

pub use pgmesh_replicator::pgtls::SslMode;

/// Errors from parsing the upstream URL or connecting to it. These are upstream-side
/// faults: the client is told with SQLSTATE 08001.
#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("invalid upstream URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("could not connect to upstream {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("upstream {0}")]
    Tls(#[from] PgTlsError),
}

/// Parsed upstream URL.
#[derive(Debug, Clone)]
pub struct UpstreamTarget {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
    pub database: Option<String>,
    /// `sslmode` and `sslrootcert` (see [`pgmesh_replicator::pgtls`]).
    pub tls: PgTls,
    /// libpq's `keepalives_idle`, `keepalives_interval`, `keepalives_retries`,
    /// `tcp_user_timeout` and `connect_timeout`, as given: pgmesh's own sessions
    /// get them in their URL (see [`pgmesh_replicator::keepalive`]).
    pub keepalive_params: Vec<(String, String)>,
    /// The same, parsed, for the proxied sessions' sockets.
    pub keepalive: Settings,
}

impl UpstreamTarget {
    /// Parses `postgres[ql]://[USER[:PASS]@]HOST[:PORT][/DB][?sslmode=..&sslrootcert=..]`.
    /// The default sslmode is `disable`: the upstream is normally a loopback or
    /// same-VPC server; set `prefer` or stronger for remote servers.
    pub fn parse(s: &str) -> Result<Self, UpstreamError> {
        let err = |reason: &str| UpstreamError::Url {
            url: s.to_string(),
            reason: reason.to_string(),
        };
        let (tls, rest) = PgTls::from_url(s).map_err(|e| match e {
            PgTlsError::Url(reason) => err(&reason),
            other => err(&other.to_string()),
        })?;
        let u = url::Url::parse(&rest).map_err(|e| err(&e.to_string()))?;
        if u.scheme() != "postgres" && u.scheme() != "postgresql" {
            return Err(err("scheme must be postgres:// or postgresql://"));
        }
        let host = u.host_str().ok_or_else(|| err("missing host"))?.to_string();
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let mut keepalive = Settings::default();
        let mut keepalive_params = Vec::new();
        for (k, v) in u.query_pairs() {
            if !keepalive.set(&k, &v).map_err(|e| err(&e))? {
                return Err(err(&format!("unknown parameter {k:?}")));
            }
            keepalive_params.push((k.into_owned(), v.into_owned()));
        }
        let nonempty = |x: &str| (!x.is_empty()).then(|| x.to_string());
        Ok(Self {
            host,
            port: u.port().unwrap_or(5432),
            user: nonempty(u.username()),
            password: u.password().map(str::to_string),
            database: nonempty(u.path().trim_start_matches('/')),
            tls,
            keepalive_params,
            keepalive,
        })
    }

    /// The `sslmode` in effect.
    pub fn sslmode(&self) -> SslMode {
        self.tls.mode()
    }

    /// `HOST:PORT` for messages.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Opens a TCP connection and negotiates TLS according to `sslmode`. The socket
    /// gets pgmesh's keepalives (client side only: the session is the client's), so
    /// a proxied session whose server vanished behind a partition ends.
    pub async fn connect(&self) -> Result<Stream, UpstreamError> {
        let tcp = keepalive::connect(&self.host, self.port, self.keepalive.connect_timeout)
            .await
            .map_err(|source| UpstreamError::Connect {
                addr: self.addr(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let _ = self.keepalive.apply(&tcp);
        Ok(match self.tls.negotiate(tcp, &self.host).await? {
            PgStream::Plain(tcp) => Stream::Plain(tcp),
            PgStream::Tls(tls) => Stream::ClientTls(tls),
        })
    }

    /// Resolved socket address, for logs.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        use std::net::ToSocketAddrs;
        (self.host.as_str(), self.port)
            .to_socket_addrs()
            .ok()?
            .next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let t = UpstreamTarget::parse("postgres://alice:pw@db.example:6000/app?sslmode=require")
            .unwrap();
        assert_eq!(t.host, "db.example");
        assert_eq!(t.port, 6000);
        assert_eq!(t.user.as_deref(), Some("alice"));
        assert_eq!(t.password.as_deref(), Some("pw"));
        assert_eq!(t.database.as_deref(), Some("app"));
        assert_eq!(t.sslmode(), SslMode::Require);
        let t = UpstreamTarget::parse("postgresql://127.0.0.1").unwrap();
        assert_eq!(
            (t.port, t.sslmode(), t.database),
            (5432, SslMode::Disable, None)
        );
        let t = UpstreamTarget::parse("postgres://[::1]:7/x").unwrap();
        assert_eq!(t.addr(), "[::1]:7");
        let t = UpstreamTarget::parse("postgres://h/x?keepalives_idle=4&sslmode=disable").unwrap();
        assert_eq!(
            t.keepalive_params,
            [("keepalives_idle".to_string(), "4".to_string())]
        );
        assert_eq!(t.keepalive.idle, std::time::Duration::from_secs(4));
    }

    #[test]
    fn rejects_bad_urls() {
        for bad in [
            "mysql://h/db",
            "postgres://h/db?sslmode=bogus",
            "postgres://h/db?sslmode=verify-full",
            "postgres://h/db?foo=1",
            "postgres://h/db?keepalives_idle=soon",
            "not a url",
        ] {
            assert!(UpstreamTarget::parse(bad).is_err(), "{bad}");
        }
    }
}
