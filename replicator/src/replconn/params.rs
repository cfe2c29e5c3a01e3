//! Where and as whom a replication connection logs in.
//!
//! This file owns [`ConnParams`] and its parsing from a
//! `postgres://user[:password]@host[:port][/dbname][?application_name=..&sslmode=..&sslrootcert=..]`
//! URL.
//! It must never print the password: `Debug` redacts it, because connection
//! parameters end up in logs and panics.

use std::fmt;
use std::str::FromStr;

use percent_encoding::percent_decode_str;
use url::{Host, Url};

use super::ReplError;
use crate::pgtls::PgTls;

/// The `application_name` a capture session reports unless told otherwise; it is
/// what a DBA sees in `pg_stat_replication`.
pub const DEFAULT_APPLICATION_NAME: &str = "pgmesh-capture";
/// PostgreSQL's default port.
pub const DEFAULT_PORT: u16 = 5432;

/// Connection parameters for one replication connection.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnParams {
    /// Host name or IP address (plain TCP; no Unix sockets).
    pub host: String,
    /// TCP port. Default 5432.
    pub port: u16,
    /// Role to log in as. It needs the `REPLICATION` attribute (or superuser).
    pub user: String,
    /// Password for cleartext, MD5 or SCRAM-SHA-256 authentication. `None` works
    /// only with `trust` (the server then never asks).
    pub password: Option<String>,
    /// Database whose changes the logical slot decodes. Default: the user name.
    pub dbname: String,
    /// Reported to the server as `application_name`. Default `pgmesh-capture`.
    pub application_name: String,
    /// TLS (`sslmode`, `sslrootcert`). Default: plain TCP.
    pub tls: PgTls,
    /// Keepalives, user timeout and connect timeout of the socket.
    pub keepalive: crate::keepalive::Settings,
}

impl ConnParams {
    /// Parameters with no password and the default application name.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        user: impl Into<String>,
        dbname: impl Into<String>,
    ) -> Self {
        ConnParams {
            host: host.into(),
            port,
            user: user.into(),
            password: None,
            dbname: dbname.into(),
            application_name: DEFAULT_APPLICATION_NAME.to_owned(),
            tls: PgTls::disabled(),
            keepalive: crate::keepalive::Settings::default(),
        }
    }

    /// Sets the password.
    pub fn with_password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// Sets `application_name`.
    pub fn with_application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = name.into();
        self
    }

    /// Parses a `postgres://` (or `postgresql://`) URL.
    ///
    /// Query parameters: `application_name`, libpq's `sslmode` and `sslrootcert`
    /// (see [`crate::pgtls`]), and its `keepalives_idle`, `keepalives_interval`,
    /// `keepalives_retries`, `tcp_user_timeout` and `connect_timeout` (see
    /// [`crate::keepalive::Settings`]). Unknown parameters are an error rather than silently
    /// ignored.
    pub fn from_url(s: &str) -> Result<Self, ReplError> {
        // Never echo the input: it may hold a password.
        let (tls, rest) = PgTls::from_url(s).map_err(|e| ReplError::Config(e.to_string()))?;
        let url = Url::parse(&rest).map_err(|e| ReplError::Config(format!("invalid URL: {e}")))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(ReplError::Config(format!(
                "URL scheme must be postgres:// or postgresql://, not {}://",
                url.scheme()
            )));
        }
        let host = match url.host() {
            Some(Host::Domain(d)) if !d.is_empty() => decode(d, "host")?,
            Some(Host::Ipv4(ip)) => ip.to_string(),
            Some(Host::Ipv6(ip)) => ip.to_string(),
            _ => return Err(ReplError::Config("URL has no host".into())),
        };
        let user = decode(url.username(), "user name")?;
        if user.is_empty() {
            return Err(ReplError::Config("URL has no user name".into()));
        }
        let password = url.password().map(|p| decode(p, "password")).transpose()?;
        let path = url.path().trim_start_matches('/');
        let dbname = if path.is_empty() {
            user.clone()
        } else {
            decode(path, "database name")?
        };
        let mut params = ConnParams::new(host, url.port().unwrap_or(DEFAULT_PORT), user, dbname);
        params.password = password;
        params.tls = tls;
        for (key, value) in url.query_pairs() {
            match &*key {
                "application_name" => params.application_name = value.into_owned(),
                other => {
                    if !params
                        .keepalive
                        .set(other, &value)
                        .map_err(ReplError::Config)?
                    {
                        return Err(ReplError::Config(format!(
                            "unknown URL parameter {other:?}"
                        )));
                    }
                }
            }
        }
        Ok(params)
    }
}

fn decode(s: &str, what: &str) -> Result<String, ReplError> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| ReplError::Config(format!("{what} in URL is not valid UTF-8")))
}

impl FromStr for ConnParams {
    type Err = ReplError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_url(s)
    }
}

impl fmt::Debug for ConnParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnParams")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .field("application_name", &self.application_name)
            .field("tls", &self.tls)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_url() {
        let p: ConnParams =
            "postgres://rep:s%40cret@db.example.com:6432/app?application_name=cap-eu"
                .parse()
                .unwrap();
        assert_eq!(
            p,
            ConnParams::new("db.example.com", 6432, "rep", "app")
                .with_password("s@cret")
                .with_application_name("cap-eu")
        );
    }

    #[test]
    fn applies_libpq_defaults() {
        let p = ConnParams::from_url("postgresql://postgres@127.0.0.1").unwrap();
        assert_eq!(p.port, 5432);
        assert_eq!(p.dbname, "postgres");
        assert_eq!(p.password, None);
        assert_eq!(p.application_name, DEFAULT_APPLICATION_NAME);
    }

    #[test]
    fn handles_ipv6_and_encoded_names() {
        let p =
            ConnParams::from_url("postgres://us%20er:@[::1]:5433/my%2Fdb?sslmode=disable").unwrap();
        assert_eq!(p.host, "::1");
        assert_eq!(p.port, 5433);
        assert_eq!(p.user, "us er");
        assert_eq!(p.dbname, "my/db");
    }

    #[test]
    fn rejects_what_it_cannot_honour() {
        for bad in [
            "mysql://u@h/d",
            "postgres://h/d",
            "postgres:///d",
            "postgres://u@/d",
            "postgres://u@h/d?sslmode=verify-full",
            "postgres://u@h/d?sslmode=bogus",
            "postgres://u@h/d?target_session_attrs=any",
            "not a url",
        ] {
            assert!(
                matches!(ConnParams::from_url(bad), Err(ReplError::Config(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn debug_redacts_the_password() {
        let p = ConnParams::new("h", 1, "u", "d").with_password("hunter2");
        let shown = format!("{p:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }
}
