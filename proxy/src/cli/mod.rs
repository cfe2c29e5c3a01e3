//! Command-line interface: clap definitions and the commands they run.
//!
//! Flags override values from `--config`. This module wires commands to the library;
//! it holds no protocol or replication logic of its own.

pub mod log;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tracing::info;

use crate::config::Config;

/// pgmesh: active-active PostgreSQL across regions, with nothing installed inside
/// PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "pgmesh", version, about, long_about = None)]
pub struct Cli {
    /// Log filter, e.g. `info` or `pgmesh_proxy=debug` [default: info; warn for
    /// `demo`, whose own output tells the story].
    #[arg(long, global = true, env = "PGMESH_LOG")]
    pub log: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node: the wire-protocol proxy in front of one regional PostgreSQL.
    Run(Box<RunArgs>),
    /// Validate a config file and print the effective settings.
    CheckConfig {
        /// Path to a pgmesh.toml.
        file: PathBuf,
    },
    /// Prepare a regional database: check prerequisites, install or upgrade the
    /// `mesh` catalog, create the publication and the replication slot. Idempotent.
    Init(InitArgs),
    /// Inspect the change log.
    #[command(subcommand)]
    Log(LogCommand),
    /// Run a local multi-region mesh on this machine: N PostgreSQL clusters and N
    /// nodes, a sample schema and a conflict; Ctrl-C removes everything.
    Demo {
        /// Number of regions (2-9).
        #[arg(long, default_value_t = 3)]
        regions: usize,
        /// First port: region i uses base+10i (PostgreSQL), +1 (proxy), +2 (peer), +3 (metrics).
        #[arg(long, default_value_t = 6540)]
        base_port: u16,
    },
    /// Generate a development CA and node certificates for peer mTLS.
    Certs {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Certificates, comma separated: a region's name (`eu`), or a node's
        /// `--node` name bound to its region (`eu-2@eu`). A peer must present a
        /// certificate that names the region it pulls for.
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// A host name peers dial a node by (`--peer NAME=HOST:PORT`), as NODE=HOST:
        /// a DNS name with a dot, or an IP address. Repeatable, or comma separated.
        /// Every certificate names `localhost` and `127.0.0.1` already.
        #[arg(long = "host", value_name = "NODE=HOST", value_delimiter = ',')]
        hosts: Vec<String>,
    },
}

/// Flags of `pgmesh init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Regional PostgreSQL URL; the role needs REPLICATION (or superuser).
    #[arg(long)]
    pub upstream: String,
    /// Region name (lowercase letters, digits, underscores; not `localhost`).
    #[arg(long)]
    pub region: String,
    /// Replicate every table of these schemas, including future ones [default: public].
    #[arg(long, value_delimiter = ',', conflicts_with = "tables")]
    pub schemas: Vec<String>,
    /// Replicate exactly these tables (`schema.table` or `table`).
    #[arg(long, value_delimiter = ',')]
    pub tables: Vec<String>,
}

/// `pgmesh log ...`
#[derive(Debug, Subcommand)]
pub enum LogCommand {
    /// Print change-log events as they arrive: hlc, origin, table, op, pk.
    Tail {
        /// Regional PostgreSQL URL.
        #[arg(long)]
        upstream: String,
        /// How many past events to print first.
        #[arg(long, default_value_t = 10)]
        last: i64,
        /// Print the past events and exit instead of following.
        #[arg(long)]
        no_follow: bool,
    },
}

/// Flags of `pgmesh run`. Each overrides the same setting of `--config`.
#[derive(Debug, Args, Default)]
pub struct RunArgs {
    /// Config file (TOML). Flags override its values.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to accept clients on, HOST:PORT.
    #[arg(long)]
    pub listen: Option<String>,
    /// Upstream PostgreSQL URL, postgres://USER@HOST:PORT/DB[?sslmode=..&sslrootcert=..].
    #[arg(long)]
    pub upstream: Option<String>,
    /// Region name of this node.
    #[arg(long)]
    pub region: Option<String>,
    /// Node name carried in write stamps [default: the host name].
    #[arg(long)]
    pub node: Option<String>,
    /// Do not stamp write transactions (they are still captured, as unstamped).
    #[arg(long)]
    pub no_stamping: bool,
    /// Run only the proxy, never capture (for sidecars).
    #[arg(long)]
    pub no_capture: bool,
    /// Serve this node's change log to peers on HOST:PORT.
    #[arg(long)]
    pub peer_listen: Option<String>,
    /// Pull from a peer region, NAME=HOST:PORT[,HOST:PORT...] (repeatable): the
    /// addresses of its nodes that serve its log, tried in turn.
    #[arg(long = "peer")]
    pub peers: Vec<String>,
    /// Relay events applied from other regions to peers (hub of hub-and-spoke).
    #[arg(long)]
    pub relay: bool,
    /// Peer-link TLS: this node's certificate (PEM); needs --peer-tls-key and --peer-ca.
    #[arg(long)]
    pub peer_tls_cert: Option<PathBuf>,
    /// Peer-link TLS: this node's private key (PEM).
    #[arg(long)]
    pub peer_tls_key: Option<PathBuf>,
    /// Peer-link TLS: the mesh CA; peers must present a certificate it signed.
    #[arg(long)]
    pub peer_ca: Option<PathBuf>,
    /// Mesh name; peers of another mesh are refused [default: pgmesh].
    #[arg(long)]
    pub mesh: Option<String>,
    /// Serve Prometheus metrics (GET /metrics) on HOST:PORT.
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// PEM certificate chain for client TLS (needs --tls-key).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for client TLS (needs --tls-cert).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Maximum concurrent client connections [default: 1000].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Seconds a client has to finish startup and authentication [default: 60].
    #[arg(long)]
    pub login_timeout_secs: Option<u64>,
    /// Seconds open sessions may keep running after SIGTERM [default: 30].
    #[arg(long)]
    pub shutdown_grace_secs: Option<u64>,
    /// Seconds between prunings of the change log below what every peer has durably
    /// applied; 0 never prunes [default: 60].
    #[arg(long)]
    pub prune_interval_secs: Option<u64>,
    /// Seconds a tombstone (the version of a deleted row) is kept at least; with the
    /// log, tombstones that no change still to arrive can be older than are pruned
    /// once older than this [default: 3600].
    #[arg(long)]
    pub tombstone_retention_secs: Option<u64>,
    /// Least milliseconds between two appends of capture to the change log; commits
    /// sooner after the last one wait and are appended together; 0 appends at once
    /// [default: 2].
    #[arg(long)]
    pub capture_linger_ms: Option<u64>,
    /// Least milliseconds between two apply transactions of a link; events that
    /// arrive sooner wait and are applied together; 0 applies at once [default: 2].
    #[arg(long)]
    pub apply_linger_ms: Option<u64>,
}

impl RunArgs {
    /// The config file (or defaults) with every given flag applied.
    pub fn to_config(&self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(p) => Config::from_file(p)?,
            None => Config::default(),
        };
        if let Some(v) = &self.listen {
            c.listen = Some(v.clone());
        }
        if let Some(v) = &self.upstream {
            c.upstream = Some(v.clone());
        }
        if let Some(v) = &self.region {
            c.region = v.clone();
        }
        if let Some(v) = &self.node {
            c.node = Some(v.clone());
        }
        if self.no_stamping {
            c.stamping = false;
        }
        if self.no_capture {
            c.capture = false;
        }
        if let Some(v) = &self.peer_listen {
            c.peer_listen = Some(v.clone());
        }
        if !self.peers.is_empty() {
            c.peers = self.peers.clone();
        }
        if self.relay {
            c.relay = true;
        }
        if let Some(v) = &self.peer_tls_cert {
            c.peer_tls.cert = Some(v.clone());
        }
        if let Some(v) = &self.peer_tls_key {
            c.peer_tls.key = Some(v.clone());
        }
        if let Some(v) = &self.peer_ca {
            c.peer_tls.ca = Some(v.clone());
        }
        if let Some(v) = &self.mesh {
            c.mesh = v.clone();
        }
        if let Some(v) = &self.metrics_listen {
            c.metrics_listen = Some(v.clone());
        }
        if let Some(v) = &self.tls_cert {
            c.tls.cert = Some(v.clone());
        }
        if let Some(v) = &self.tls_key {
            c.tls.key = Some(v.clone());
        }
        if let Some(v) = self.max_connections {
            c.max_connections = v;
        }
        if let Some(v) = self.login_timeout_secs {
            c.login_timeout_secs = v;
        }
        if let Some(v) = self.shutdown_grace_secs {
            c.shutdown_grace_secs = v;
        }
        if let Some(v) = self.prune_interval_secs {
            c.prune_interval_secs = v;
        }
        if let Some(v) = self.tombstone_retention_secs {
            c.tombstone_retention_secs = v;
        }
        if let Some(v) = self.capture_linger_ms {
            c.capture_linger_ms = v;
        }
        if let Some(v) = self.apply_linger_ms {
            c.apply_linger_ms = v;
        }
        Ok(c)
    }
}

/// Runs a node until SIGTERM or Ctrl-C, then drains.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let validated = args.to_config()?.validate()?;
    let grace = Duration::from_secs(validated.config.shutdown_grace_secs);
    // One listener for the whole run, so no signal falls between two of them.
    let mut signals = Signals::new()?;
    // Starting waits for an unreachable database; a signal meanwhile just exits.
    let node = tokio::select! {
        node = crate::node::start(validated) => node?,
        _ = signals.recv() => {
            info!("shutdown requested before the node started");
            return Ok(());
        }
    };
    signals.recv().await;
    info!(grace_secs = grace.as_secs(), "shutdown requested, draining");
    tokio::select! {
        _ = node.shutdown(grace) => {}
        _ = signals.recv() => info!("second signal, exiting now"),
    }
    Ok(())
}

/// SIGTERM and SIGINT (Ctrl-C), listened for from creation on.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    /// The next signal.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// `pgmesh init`.
pub async fn init(args: InitArgs) -> anyhow::Result<()> {
    use pgmesh_replicator::catalog::{self, TableSelection};
    let sel = if !args.tables.is_empty() {
        TableSelection::Tables(args.tables)
    } else if !args.schemas.is_empty() {
        TableSelection::Schemas(args.schemas)
    } else {
        TableSelection::default()
    };
    eprintln!(
        "pgmesh init: checking {} ...",
        catalog::redact(&args.upstream)
    );
    let r = catalog::init(&args.upstream, &args.region, &sel).await?;
    if r.migrations_applied.is_empty() {
        println!("catalog: up to date (version {})", r.catalog_version);
    } else {
        println!(
            "catalog: applied migrations {:?}, now version {}",
            r.migrations_applied, r.catalog_version
        );
    }
    println!(
        "publication: {} ({} tables)",
        catalog::PUBLICATION,
        r.publication_tables
    );
    println!(
        "slot: {} ({})",
        r.slot,
        if r.slot_created { "created" } else { "exists" }
    );
    println!(
        "region {} is ready; start it with: pgmesh run --region {} --upstream ...",
        args.region, args.region
    );
    Ok(())
}

/// `pgmesh certs`.
pub fn certs(out: &std::path::Path, nodes: &[String], hosts: &[String]) -> anyhow::Result<()> {
    let names: Vec<&str> = nodes.iter().map(String::as_str).collect();
    let mut opts = pgmesh_replicator::certs::GenerateOptions::default();
    for h in hosts {
        let (node, host) = h
            .split_once('=')
            .with_context(|| format!("--host {h:?}: expected NODE=HOST"))?;
        opts.hosts.push((node.to_string(), host.to_string()));
    }
    let g = pgmesh_replicator::certs::generate_with(out, &names, opts.clone())?;
    let ca = if g.ca_reused {
        "reused the CA"
    } else {
        "wrote a development CA"
    };
    println!("{ca} in {}", out.display());
    for f in &g.nodes {
        match &f.region {
            Some(r) => println!(
                "  {}: node {}, bound to region {r}",
                f.cert.display(),
                f.node
            ),
            None => println!("  {}: {}", f.cert.display(), f.node),
        }
        for (_, host) in opts.hosts.iter().filter(|(n, _)| *n == f.node) {
            println!("    also names host {host}");
        }
    }
    println!("private keys (*.key) are secrets: never commit them");
    Ok(())
}

/// Validates a config file; prints the effective settings.
pub fn check_config(file: &std::path::Path) -> anyhow::Result<()> {
    let v = Config::from_file(file)?.validate()?;
    println!("{}: ok", file.display());
    println!("  listen             = {}", v.listen);
    println!(
        "  upstream           = {} (sslmode {:?})",
        v.upstream.addr(),
        v.upstream.sslmode()
    );
    println!("  region             = {}", v.config.region);
    println!("  max_connections    = {}", v.config.max_connections);
    println!("  login_timeout_secs = {}", v.config.login_timeout_secs);
    println!("  shutdown_grace_secs= {}", v.config.shutdown_grace_secs);
    println!("  prune_interval_secs= {}", v.config.prune_interval_secs);
    println!(
        "  tombstone_retention_secs = {}",
        v.config.tombstone_retention_secs
    );
    println!("  capture_linger_ms  = {}", v.config.capture_linger_ms);
    println!("  apply_linger_ms    = {}", v.config.apply_linger_ms);
    println!(
        "  client tls         = {}",
        if v.config.tls.cert.is_some() {
            "on"
        } else {
            "off"
        }
    );
    Ok(())
}
