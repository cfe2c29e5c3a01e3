//! What a test may ask of a cluster: extra settings, `pg_hba.conf` lines, users.
//!
//! This module owns [`ClusterOptions`] and the text it turns into: the
//! `pgmesh.conf` settings file and the `pg_hba.conf` file. The defaults are the
//! ones every pgmesh test relies on (`wal_level=logical`, no durability, trust
//! auth); a test's own settings come after them and win. It must never start
//! processes or touch the file system.

use std::fmt::Write as _;

/// How a password user authenticates (the `pg_hba.conf` method) and how their
/// password is stored (`password_encryption` at `CREATE ROLE` time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// Cleartext `password` auth; the password is stored as SCRAM.
    Password,
    /// `md5` auth; the password is stored as an MD5 hash, so the server really
    /// asks for MD5 (with a SCRAM-stored password it would switch to SCRAM).
    Md5,
    /// `scram-sha-256` auth with a SCRAM-stored password.
    ScramSha256,
}

impl AuthMethod {
    /// The method keyword in `pg_hba.conf`.
    pub fn hba_keyword(self) -> &'static str {
        match self {
            AuthMethod::Password => "password",
            AuthMethod::Md5 => "md5",
            AuthMethod::ScramSha256 => "scram-sha-256",
        }
    }

    /// The `password_encryption` value to store the password with.
    pub fn password_encryption(self) -> &'static str {
        match self {
            AuthMethod::Md5 => "md5",
            AuthMethod::Password | AuthMethod::ScramSha256 => "scram-sha-256",
        }
    }
}

/// A login role created with a password when the cluster starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordUser {
    /// Role name.
    pub name: String,
    /// Cleartext password.
    pub password: String,
    /// How the role must authenticate over TCP.
    pub method: AuthMethod,
}

/// Options for [`crate::PgCluster::start`]. `Default` gives a trust-auth cluster
/// with the settings in [`BASE_SETTINGS`].
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Extra `postgresql.conf` settings, applied after the defaults (so they win).
    pub settings: Vec<(String, String)>,
    /// Extra `pg_hba.conf` lines, placed before the default trust lines (the first
    /// matching line wins).
    pub hba_lines: Vec<String>,
    /// Password users to create at start; each also gets a `host` hba line.
    pub users: Vec<PasswordUser>,
}

/// Settings every cluster gets, before [`ClusterOptions::settings`]. `port` and
/// `unix_socket_directories` are added per cluster.
pub const BASE_SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", "127.0.0.1"),
    ("wal_level", "logical"),
    ("max_wal_senders", "20"),
    ("max_replication_slots", "20"),
    ("max_connections", "200"),
    // No fsync: an OS crash could lose data, a process crash cannot, and tests
    // only crash processes. synchronous_commit stays ON on purpose: with it off a
    // commit is acknowledged before its WAL is even write()n, so `kill9` loses
    // acknowledged writes and fault tests would report false data loss. With
    // fsync off, the commit-time WAL flush is only a write(), so it costs little.
    ("fsync", "off"),
    ("synchronous_commit", "on"),
    ("full_page_writes", "off"),
    ("track_commit_timestamp", "on"),
    ("logging_collector", "off"),
    // Many clusters share one small machine; a test never needs a big cache.
    ("shared_buffers", "32MB"),
    ("log_line_prefix", "%m [%p] %q%u@%d %a: "),
];

impl ClusterOptions {
    /// Add a `postgresql.conf` setting (overrides a default of the same name).
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Add a `pg_hba.conf` line, checked before the default trust lines.
    pub fn hba_line(mut self, line: impl Into<String>) -> Self {
        self.hba_lines.push(line.into());
        self
    }

    /// Create `name` with `password` at start and require `method` for it over
    /// TCP (`host all <name> 127.0.0.1/32 <method>`). Everyone else stays trust.
    pub fn password_user(
        mut self,
        name: impl Into<String>,
        password: impl Into<String>,
        method: AuthMethod,
    ) -> Self {
        self.users.push(PasswordUser {
            name: name.into(),
            password: password.into(),
            method,
        });
        self
    }

    /// The text of `pgmesh.conf` for a cluster on `port` with its sockets in
    /// `socket_dir`.
    pub(crate) fn settings_file(&self, port: u16, socket_dir: &str) -> String {
        let port = port.to_string();
        let fixed = [
            ("port", port.as_str()),
            ("unix_socket_directories", socket_dir),
        ];
        let mut out = String::from("# Written by pgmesh-tests for this cluster.\n");
        let defaults = BASE_SETTINGS.iter().chain(fixed.iter()).copied();
        let extra = self.settings.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        for (name, value) in defaults.chain(extra) {
            let _ = writeln!(out, "{name} = {}", quote_literal(value));
        }
        out
    }

    /// The full text of `pg_hba.conf`: the test's lines, then one line per
    /// password user, then trust for everyone over the socket and loopback.
    pub(crate) fn hba_file(&self) -> String {
        let mut out = String::from("# Written by pgmesh-tests for this cluster.\n");
        for line in &self.hba_lines {
            let _ = writeln!(out, "{line}");
        }
        for user in &self.users {
            let _ = writeln!(
                out,
                "host all {} 127.0.0.1/32 {}",
                quote_hba_name(&user.name),
                user.method.hba_keyword()
            );
        }
        out.push_str("local all all trust\n");
        out.push_str("host all all 127.0.0.1/32 trust\n");
        out.push_str("local replication all trust\n");
        out.push_str("host replication all 127.0.0.1/32 trust\n");
        out
    }
}

/// A single-quoted SQL / postgresql.conf literal.
pub(crate) fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// A double-quoted SQL identifier.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A `pg_hba.conf` user name, quoted only when it needs to be.
fn quote_hba_name(name: &str) -> String {
    if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_settings_come_after_defaults() {
        let opts = ClusterOptions::default().setting("wal_level", "replica");
        let text = opts.settings_file(5555, "/tmp/x");
        let logical = text.find("wal_level = 'logical'").unwrap();
        let replica = text.find("wal_level = 'replica'").unwrap();
        assert!(logical < replica);
        assert!(text.contains("port = '5555'"));
        assert!(text.contains("unix_socket_directories = '/tmp/x'"));
    }

    #[test]
    fn user_lines_precede_trust() {
        let opts = ClusterOptions::default()
            .hba_line("host all bob 127.0.0.1/32 reject")
            .password_user("alice", "pw", AuthMethod::Md5);
        let text = opts.hba_file();
        let bob = text.find("bob").unwrap();
        let alice = text.find("host all alice 127.0.0.1/32 md5").unwrap();
        let trust = text.find("host all all 127.0.0.1/32 trust").unwrap();
        assert!(bob < alice && alice < trust);
    }

    #[test]
    fn quotes() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_hba_name("we ird"), "\"we ird\"");
    }
}
