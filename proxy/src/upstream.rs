//! The upstream PostgreSQL: where it is and how to open a socket to it.
//!
//! Owns the parsing of the `postgres://` URL, TCP connect, and the SSLRequest/TLS
//! negotiation for each `sslmode`. It never reads or writes protocol messages beyond
//! the SSLRequest answer byte: startup and authentication are the client's own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::net::startup::encode_ssl_request;
use crate::net::stream::Stream;
use crate::tls;

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
    #[error("upstream {addr} does not accept TLS, but sslmode={mode} requires it")]
    TlsRefused { addr: String, mode: &'static str },
    #[error("TLS handshake with upstream {addr} failed: {source}")]
    Handshake {
        addr: String,
        source: std::io::Error,
    },
    #[error("upstream TLS setup: {0}")]
    Tls(#[from] tls::TlsError),
}

/// libpq-style `sslmode` for the proxy's own connections to upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyFull,
}

impl SslMode {
    fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Parsed upstream URL.
#[derive(Debug, Clone)]
pub struct UpstreamTarget {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
    pub database: Option<String>,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    tls: Option<Arc<rustls::ClientConfig>>,
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
        let u = url::Url::parse(s).map_err(|e| err(&e.to_string()))?;
        if u.scheme() != "postgres" && u.scheme() != "postgresql" {
            return Err(err("scheme must be postgres:// or postgresql://"));
        }
        let host = u.host_str().ok_or_else(|| err("missing host"))?.to_string();
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let mut sslmode = SslMode::Disable;
        let mut sslrootcert = None;
        for (k, v) in u.query_pairs() {
            match &*k {
                "sslmode" => {
                    sslmode = match &*v {
                        "disable" => SslMode::Disable,
                        "prefer" | "allow" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-full" | "verify-ca" => SslMode::VerifyFull,
                        other => return Err(err(&format!("unknown sslmode {other:?}"))),
                    }
                }
                "sslrootcert" => sslrootcert = Some(PathBuf::from(&*v)),
                other => return Err(err(&format!("unknown parameter {other:?}"))),
            }
        }
        let tls = match sslmode {
            SslMode::Disable => None,
            SslMode::Prefer | SslMode::Require => Some(tls::insecure_client_config()),
            SslMode::VerifyFull => {
                let root = sslrootcert
                    .as_ref()
                    .ok_or_else(|| err("sslmode=verify-full needs sslrootcert=PATH"))?;
                Some(tls::verifying_client_config(root)?)
            }
        };
        let nonempty = |x: &str| (!x.is_empty()).then(|| x.to_string());
        Ok(Self {
            host,
            port: u.port().unwrap_or(5432),
            user: nonempty(u.username()),
            password: u.password().map(str::to_string),
            database: nonempty(u.path().trim_start_matches('/')),
            sslmode,
            sslrootcert,
            tls,
        })
    }

    /// `HOST:PORT` for messages.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Opens a TCP connection and negotiates TLS according to `sslmode`.
    pub async fn connect(&self) -> Result<Stream, UpstreamError> {
        let addr = self.addr();
        let mut tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| UpstreamError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let Some(cfg) = &self.tls else {
            return Ok(Stream::Plain(tcp));
        };
        let io_err = |source| UpstreamError::Connect {
            addr: addr.clone(),
            source,
        };
        tcp.write_all(&encode_ssl_request()).await.map_err(io_err)?;
        let answer = tcp.read_u8().await.map_err(io_err)?;
        if answer != b'S' {
            if self.sslmode == SslMode::Prefer {
                return Ok(Stream::Plain(tcp));
            }
            return Err(UpstreamError::TlsRefused {
                addr,
                mode: self.sslmode.name(),
            });
        }
        let name = ServerName::try_from(self.host.clone()).map_err(|e| UpstreamError::Url {
            url: addr.clone(),
            reason: e.to_string(),
        })?;
        let tls = tokio_rustls::TlsConnector::from(cfg.clone())
            .connect(name, tcp)
            .await
            .map_err(|source| UpstreamError::Handshake { addr, source })?;
        Ok(Stream::ClientTls(Box::new(tls)))
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
        assert_eq!(t.sslmode, SslMode::Require);
        let t = UpstreamTarget::parse("postgresql://127.0.0.1").unwrap();
        assert_eq!(
            (t.port, t.sslmode, t.database),
            (5432, SslMode::Disable, None)
        );
        let t = UpstreamTarget::parse("postgres://[::1]:7/x").unwrap();
        assert_eq!(t.addr(), "[::1]:7");
    }

    #[test]
    fn rejects_bad_urls() {
        for bad in [
            "mysql://h/db",
            "postgres://h/db?sslmode=bogus",
            "postgres://h/db?sslmode=verify-full",
            "postgres://h/db?foo=1",
            "not a url",
        ] {
            assert!(UpstreamTarget::parse(bad).is_err(), "{bad}");
        }
    }
}
