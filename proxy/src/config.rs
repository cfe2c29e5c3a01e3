//! Node configuration: a documented serde struct read from `pgmesh.toml`, with CLI
//! flags layered on top.
//!
//! Every field states its default and unit. Unknown fields are rejected so a typo in
//! a config file is an error, not a silently ignored setting. This module validates;
//! it never opens sockets or files other than the config and TLS files it checks.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::upstream::{UpstreamError, UpstreamTarget};

/// Default of `capture_linger_ms` and `apply_linger_ms`. On a busy mesh it halves the
/// number of appends and apply transactions (and what each costs the databases);
/// see the README's "Batching" section for the measurements.
pub const DEFAULT_LINGER_MS: u64 = 2;

/// Largest `capture_linger_ms` and `apply_linger_ms`.
pub const MAX_LINGER_MS: u64 = 10_000;

/// Errors in a configuration.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("missing required setting `{0}` (set it in the config file or with --{0})")]
    Missing(&'static str),
    #[error("invalid listen address {addr:?}: {source}")]
    Listen {
        addr: String,
        source: std::net::AddrParseError,
    },
    #[error("invalid upstream: {0}")]
    Upstream(#[from] UpstreamError),
    #[error("tls: `cert` and `key` must be set together")]
    TlsHalf,
    #[error("tls file {path} is not readable: {source}")]
    TlsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{0}` must be greater than zero")]
    Zero(&'static str),
    #[error("`{0}` must be at most {1}")]
    TooLarge(&'static str, u64),
    #[error("invalid peer {0:?}: expected NAME=HOST:PORT[,HOST:PORT...] with NAME a region name, each region once")]
    Peer(String),
    #[error("peer_tls: `cert`, `key` and `ca` must be set together")]
    PeerTlsHalf,
    #[error("node name {0:?} is also the name of a peer region: a certificate that names this node would also name that region, so give the node another name (`--node`)")]
    NodeIsPeerRegion(String),
}

/// `pgmesh.toml`. All fields are optional in the file; `listen` and `upstream` must be
/// set by the file or by flags. None of the fields can be reloaded without a restart.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the proxy listens on for clients, `HOST:PORT`. Default: none (required).
    pub listen: Option<String>,
    /// Upstream PostgreSQL, `postgres://USER@HOST:PORT/DB?sslmode=..&sslrootcert=..`.
    /// Clients choose their own user and database; the relay uses host, port and TLS
    /// settings from here. Default: none (required).
    pub upstream: Option<String>,
    /// Region name of this node. Default: `local`.
    pub region: String,
    /// Node name, carried in write stamps. Default: the host name.
    pub node: Option<String>,
    /// Stamp write transactions with the node's HLC and origin tags. Default: true.
    pub stamping: bool,
    /// Run capture for the region when the `mesh` catalog is installed (only one
    /// node per region captures at a time; others stand by). Default: true.
    pub capture: bool,
    /// Maximum concurrent client connections; more are refused with SQLSTATE 53300.
    /// Default: 1000.
    pub max_connections: usize,
    /// Time a client has to finish startup and authentication, in seconds. Default: 60.
    pub login_timeout_secs: u64,
    /// After SIGTERM, how long open sessions may keep running, in seconds. Default: 30.
    pub shutdown_grace_secs: u64,
    /// Largest client message body accepted for messages that carry data (queries,
    /// Bind parameters, COPY data), in bytes. Default: 1073741823 (PostgreSQL's own).
    pub max_message_bytes: usize,
    /// TLS termination for clients. Default: off (SSLRequest is answered `N`).
    pub tls: TlsConfig,
    /// Name of the mesh; peers with another name are refused. Default: `pgmesh`.
    pub mesh: String,
    /// Address this node serves its change log to peers on, `HOST:PORT`. Default: none
    /// (peers cannot pull from this node).
    pub peer_listen: Option<String>,
    /// Peers to pull from, each `NAME=HOST:PORT[,HOST:PORT...]` where NAME is the
    /// peer's region and the addresses are nodes of it that serve its log (the link
    /// moves on to the next when it loses one). Default: none.
    pub peers: Vec<String>,
    /// Also serve events this node applied from other regions (origin preserved):
    /// the hub of a hub-and-spoke topology. Default: false.
    pub relay: bool,
    /// TLS for peer links. Default: off (plain TCP, for loopback demos only).
    pub peer_tls: PeerTlsConfig,
    /// Address of the Prometheus endpoint (`GET /metrics`), `HOST:PORT`. Default: none.
    pub metrics_listen: Option<String>,
    /// How often the region's leader prunes its change log below what every peer has
    /// durably applied, in seconds; 0 never prunes. Default: 60.
    pub prune_interval_secs: u64,
    /// Tombstones (versions of deleted rows) are pruned with the log once below the
    /// frontier and older than this many seconds. Default: 3600.
    pub tombstone_retention_secs: u64,
    /// Least time between two appends of capture to the change log, in milliseconds:
    /// a transaction that commits sooner after the last append waits for the rest of
    /// it, and the ones that commit meanwhile join its append. The first one after a
    /// quiet spell is appended at once. 0 appends as soon as capture has caught up.
    /// At most 10000. Default: 2.
    pub capture_linger_ms: u64,
    /// Least time between two apply transactions of a link, in milliseconds, the same
    /// way: events that arrive sooner after the last apply wait for the rest of it and
    /// are applied together. 0 applies what has arrived as soon as the last apply
    /// ends. At most 10000. Default: 2.
    pub apply_linger_ms: u64,
}

/// TLS of peer links: this node's certificate, and the mesh CA that every peer
/// certificate must be signed by (mutual TLS). All files PEM.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PeerTlsConfig {
    /// This node's certificate chain. Default: none.
    pub cert: Option<PathBuf>,
    /// Its private key. Default: none.
    pub key: Option<PathBuf>,
    /// The mesh CA. Default: none.
    pub ca: Option<PathBuf>,
}

/// One peer to pull from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The peer's region.
    pub name: String,
    /// `HOST:PORT` of each node's peer listener, in the order they are tried.
    pub addrs: Vec<String>,
}

/// Client-facing TLS. Both files are PEM.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Certificate chain presented to clients. Default: none.
    pub cert: Option<PathBuf>,
    /// Private key of `cert`. Default: none.
    pub key: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: None,
            upstream: None,
            region: "local".into(),
            node: None,
            stamping: true,
            capture: true,
            max_connections: 1000,
            login_timeout_secs: 60,
            shutdown_grace_secs: 30,
            prune_interval_secs: 60,
            tombstone_retention_secs: 3600,
            capture_linger_ms: DEFAULT_LINGER_MS,
            apply_linger_ms: DEFAULT_LINGER_MS,
            max_message_bytes: crate::net::frame::PG_LARGE_MESSAGE_LIMIT,
            tls: TlsConfig::default(),
            mesh: "pgmesh".into(),
            peer_listen: None,
            peers: Vec::new(),
            relay: false,
            peer_tls: PeerTlsConfig::default(),
            metrics_listen: None,
        }
    }
}

/// A configuration that passed validation, with parsed addresses.
#[derive(Debug, Clone)]
pub struct Validated {
    pub listen: SocketAddr,
    pub upstream: UpstreamTarget,
    pub peers: Vec<Peer>,
    pub config: Config,
}

impl Config {
    /// The node name: `node`, else the host name (the kernel's, which containers set,
    /// else `/etc/hostname`), else `pgmesh`.
    pub fn node_name(&self) -> String {
        self.node.clone().unwrap_or_else(|| {
            ["/proc/sys/kernel/hostname", "/etc/hostname"]
                .iter()
                .filter_map(|p| std::fs::read_to_string(p).ok())
                .map(|h| h.trim().to_string())
                .find(|h| !h.is_empty())
                .unwrap_or_else(|| "pgmesh".into())
        })
    }

    /// Reads and parses a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.into(),
                source,
            },
            other => other,
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            source: Box::new(e),
        })
    }

    /// Checks every field and parses addresses; reads TLS files to prove they exist.
    pub fn validate(self) -> Result<Validated, ConfigError> {
        let listen_s = self.listen.clone().ok_or(ConfigError::Missing("listen"))?;
        let listen = listen_s.parse().map_err(|source| ConfigError::Listen {
            addr: listen_s.clone(),
            source,
        })?;
        let upstream = UpstreamTarget::parse(
            self.upstream
                .as_deref()
                .ok_or(ConfigError::Missing("upstream"))?,
        )?;
        if self.max_connections == 0 {
            return Err(ConfigError::Zero("max_connections"));
        }
        if self.login_timeout_secs == 0 {
            return Err(ConfigError::Zero("login_timeout_secs"));
        }
        if self.max_message_bytes == 0 {
            return Err(ConfigError::Zero("max_message_bytes"));
        }
        for (name, v) in [
            ("capture_linger_ms", self.capture_linger_ms),
            ("apply_linger_ms", self.apply_linger_ms),
        ] {
            if v > MAX_LINGER_MS {
                return Err(ConfigError::TooLarge(name, MAX_LINGER_MS));
            }
        }
        match (&self.tls.cert, &self.tls.key) {
            (Some(c), Some(k)) => {
                for p in [c, k] {
                    std::fs::metadata(p).map_err(|source| ConfigError::TlsFile {
                        path: p.clone(),
                        source,
                    })?;
                }
            }
            (None, None) => {}
            _ => return Err(ConfigError::TlsHalf),
        }
        let mut peers = Vec::new();
        for p in &self.peers {
            let (name, addrs) = p
                .split_once('=')
                .ok_or_else(|| ConfigError::Peer(p.clone()))?;
            let addrs: Vec<String> = addrs.split(',').map(|a| a.trim().to_string()).collect();
            if pgmesh_replicator::catalog::validate_region(name).is_err()
                || addrs.iter().any(|a| !a.contains(':'))
                || peers.iter().any(|q: &Peer| q.name == name)
            {
                return Err(ConfigError::Peer(p.clone()));
            }
            peers.push(Peer {
                name: name.to_string(),
                addrs,
            });
        }
        // Peer links accept a certificate for each region it names: a node's name
        // must not be another region's.
        let node = self.node_name();
        if node != self.region && peers.iter().any(|p| p.name == node) {
            return Err(ConfigError::NodeIsPeerRegion(node));
        }
        let t = &self.peer_tls;
        if !(t.cert.is_some() == t.key.is_some() && t.key.is_some() == t.ca.is_some()) {
            return Err(ConfigError::PeerTlsHalf);
        }
        for addr in [&self.peer_listen, &self.metrics_listen]
            .into_iter()
            .flatten()
        {
            addr.parse::<SocketAddr>()
                .map_err(|source| ConfigError::Listen {
                    addr: addr.clone(),
                    source,
                })?;
        }
        Ok(Validated {
            listen,
            upstream,
            peers,
            config: self,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c = Config::from_toml(
            "listen = \"127.0.0.1:6432\"\nupstream = \"postgres://u@localhost:5432/db\"\nmax_connections = 5\n",
        )
        .unwrap();
        assert_eq!(c.max_connections, 5);
        assert_eq!(c.login_timeout_secs, 60);
        let v = c.validate().unwrap();
        assert_eq!(v.listen.port(), 6432);
        assert_eq!(v.upstream.port, 5432);
    }

    #[test]
    fn unknown_fields_rejected() {
        let e = Config::from_toml("listn = \"x\"").unwrap_err();
        assert!(e.to_string().contains("listn"), "{e}");
    }

    #[test]
    fn missing_and_bad_values() {
        assert!(matches!(
            Config::default().validate(),
            Err(ConfigError::Missing("listen"))
        ));
        let c = Config {
            listen: Some("nope".into()),
            upstream: Some("postgres://h/db".into()),
            ..Config::default()
        };
        assert!(matches!(c.validate(), Err(ConfigError::Listen { .. })));
        let c = Config {
            listen: Some("127.0.0.1:1".into()),
            upstream: Some("postgres://h/db".into()),
            tls: TlsConfig {
                cert: Some("/nonexistent".into()),
                key: None,
            },
            ..Config::default()
        };
        assert!(matches!(c.validate(), Err(ConfigError::TlsHalf)));
    }

    #[test]
    fn lingers_default_to_2_ms_and_stop_at_10_s() {
        let base = Config {
            listen: Some("127.0.0.1:1".into()),
            upstream: Some("postgres://h/db".into()),
            ..Config::default()
        };
        let v = base.clone().validate().unwrap();
        assert_eq!(
            (v.config.capture_linger_ms, v.config.apply_linger_ms),
            (2, 2)
        );
        let c = Config::from_toml("capture_linger_ms = 0\napply_linger_ms = 10000\n").unwrap();
        assert_eq!((c.capture_linger_ms, c.apply_linger_ms), (0, 10_000));
        let c = Config {
            apply_linger_ms: 10_001,
            ..base
        };
        let e = c.validate().unwrap_err();
        assert!(
            matches!(e, ConfigError::TooLarge("apply_linger_ms", 10_000)),
            "{e}"
        );
        assert_eq!(e.to_string(), "`apply_linger_ms` must be at most 10000");
    }

    #[test]
    fn peers_with_one_or_more_nodes() {
        let with = |peers: &[&str]| Config {
            listen: Some("127.0.0.1:1".into()),
            upstream: Some("postgres://h/db".into()),
            peers: peers.iter().map(|p| p.to_string()).collect(),
            ..Config::default()
        };
        let v = with(&["us=a:7432", "ap=b:7432, c:7433"])
            .validate()
            .unwrap();
        assert_eq!(
            v.peers,
            [
                Peer {
                    name: "us".into(),
                    addrs: vec!["a:7432".into()]
                },
                Peer {
                    name: "ap".into(),
                    addrs: vec!["b:7432".into(), "c:7433".into()]
                }
            ]
        );
        for bad in [
            &["us"][..],
            &["us=a"],
            &["us=a:1,"],
            &["no way=a:1"],
            &["us=a:1", "us=b:1"],
        ] {
            assert!(
                matches!(with(bad).validate(), Err(ConfigError::Peer(_))),
                "{bad:?}"
            );
        }
        // A node named after a peer region is refused; one named after its own region
        // is the usual case.
        let named = |node: &str| Config {
            region: "eu".into(),
            node: Some(node.into()),
            ..with(&["us=a:7432"])
        };
        assert!(matches!(
            named("us").validate(),
            Err(ConfigError::NodeIsPeerRegion(n)) if n == "us"
        ));
        for ok in ["eu", "eu-1"] {
            named(ok).validate().unwrap();
        }
    }
}
