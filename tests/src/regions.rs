//! Multi-region meshes under test: N real clusters, the `mesh` catalog in each,
//! and one pgmesh node per region, in-process or as the real `pgmesh run` binary.
//!
//! This module owns what every replication test needs besides its workload:
//! starting the clusters in parallel, running DDL in every region (DDL does not
//! replicate), `pgmesh init`, nodes in any topology (full mesh, hub-and-spoke,
//! peer mTLS, metrics), the fault operations (SIGKILL a node process, stop and
//! restart a node, pause a link), and the observations convergence is judged
//! by: a checksum of every table per region, change-log heads and link
//! checkpoints, quiescence and convergence with a deadline, and the
//! last-writer-wins prediction computed from the regions' own change logs. Peer
//! ports are probed free once per region and kept across restarts, because the
//! other regions dial them. It never asserts (tests do) and never sleeps for a
//! fixed time: every wait has a condition and a deadline.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use pgmesh_proxy::config::{Config, PeerTlsConfig};
use pgmesh_proxy::node::{self, NodeHandle};
use pgmesh_replicator::capture::Role;
use pgmesh_replicator::catalog::{self, TableSelection};
use tokio_postgres::Client;

use crate::cluster::{ClusterOptions, PgCluster};
use crate::node::PgmeshProcess;
use crate::ports::free_port;
use crate::wait::wait_until;

mod check;
mod converge;
pub use check::{http_get, predict_lww, Expected, RowChange, LOGGED_TWICE};

/// How long a mesh may take to converge after a workload on a loaded 2-core box.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a node may take to become its region's capture leader.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Peer-link TLS files of one node (PEM).
#[derive(Debug, Clone)]
pub struct PeerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// How to run a region's node.
#[derive(Debug, Clone, Default)]
pub struct NodeSpec {
    /// Regions this node pulls from; `None` means every other region (full mesh).
    pub peers: Option<Vec<String>>,
    /// Serve events applied from other regions too (the hub).
    pub relay: bool,
    pub tls: Option<PeerTls>,
    /// Serve `/metrics`.
    pub metrics: bool,
    /// Run the real binary as a subprocess instead of in-process.
    pub process: bool,
    /// The node's `--upstream` URL; default: the region's cluster as `postgres`.
    pub upstream: Option<String>,
    /// Where to reach a peer instead of its own peer port (a
    /// [`crate::faultnet::Forwarder`]), by region.
    pub peer_addrs: BTreeMap<String, SocketAddr>,
    /// More nodes of a peer region to pull from, after its own node, by region
    /// (`--peer NAME=A,B`).
    pub more_peer_addrs: BTreeMap<String, Vec<SocketAddr>>,
    /// `--prune-interval-secs`. Default: no pruning, because most tests read whole
    /// change logs back (the mesh_prune and chaos tests turn it on). Where pruning
    /// runs, tombstones are pruned too as soon as the frontier allows
    /// (`--tombstone-retention-secs 0`).
    pub prune_secs: Option<u64>,
    /// `--capture-linger-ms` and `--apply-linger-ms`. Default: the node's defaults.
    pub linger_ms: Option<(u64, u64)>,
}

/// A running node.
#[derive(Debug)]
pub enum Node {
    InProcess(Box<NodeHandle>),
    Process(PgmeshProcess),
}

/// One region of a [`Mesh`].
#[derive(Debug)]
pub struct MeshRegion {
    /// Declared first so it is dropped (a process killed) before the cluster.
    node: Option<Node>,
    pub name: String,
    /// A direct (not proxied) superuser connection.
    pub admin: Client,
    pub cluster: PgCluster,
    /// Where this region's node serves its change log, kept across restarts.
    pub peer_port: u16,
    /// Proxy and metrics ports of a node process, kept across restarts.
    process_ports: (u16, u16),
    spec: Option<NodeSpec>,
    peers: Vec<String>,
    /// The `--peer` arguments the node got.
    peer_args: Vec<String>,
    proxy_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
}

impl MeshRegion {
    /// The superuser URL of the regional database.
    pub fn url(&self) -> String {
        self.cluster.url("postgres")
    }

    /// The in-process node, if this region runs one.
    pub fn handle(&self) -> Option<&NodeHandle> {
        match &self.node {
            Some(Node::InProcess(h)) => Some(h),
            _ => None,
        }
    }

    /// The node process, if this region runs one.
    pub fn process(&self) -> Option<&PgmeshProcess> {
        match &self.node {
            Some(Node::Process(p)) => Some(p),
            _ => None,
        }
    }

    /// Regions this region's node pulls from.
    pub fn peers(&self) -> &[String] {
        &self.peers
    }
}

/// `mesh.links` of one link as seen by the pulling region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkRow {
    pub status: String,
    pub checkpoint: i64,
    pub peer_head: i64,
    pub backlog: i64,
    pub lag_ms: i64,
    pub error: Option<String>,
}

/// N regions with their clusters and nodes.
#[derive(Debug)]
pub struct Mesh {
    pub regions: Vec<MeshRegion>,
}

impl Mesh {
    /// Start one default cluster per region name, all in parallel.
    pub async fn start(names: &[&str]) -> Result<Mesh> {
        Self::start_with(names, ClusterOptions::default()).await
    }

    /// [`Mesh::start`] with every cluster started with `opts`.
    pub async fn start_with(names: &[&str], opts: ClusterOptions) -> Result<Mesh> {
        crate::init_tracing();
        let starts: Vec<_> = names
            .iter()
            .map(|_| tokio::spawn(PgCluster::start_async(opts.clone())))
            .collect();
        let mut clusters = Vec::new();
        for s in starts {
            clusters.push(
                s.await
                    .map_err(|e| anyhow!("cluster start panicked: {e}"))?,
            );
        }
        let mut regions = Vec::new();
        for (name, cluster) in names.iter().zip(clusters) {
            let cluster = cluster?;
            regions.push(MeshRegion {
                node: None,
                name: name.to_string(),
                admin: cluster.connect().await?,
                cluster,
                peer_port: free_port()?,
                process_ports: (free_port()?, free_port()?),
                spec: None,
                peers: Vec::new(),
                peer_args: Vec::new(),
                proxy_addr: None,
                metrics_addr: None,
            });
        }
        Ok(Mesh { regions })
    }

    /// The index of region `name`.
    pub fn index(&self, name: &str) -> Result<usize> {
        self.regions
            .iter()
            .position(|r| r.name == name)
            .with_context(|| format!("no region {name}"))
    }

    /// Region `i`.
    pub fn region(&self, i: usize) -> &MeshRegion {
        &self.regions[i]
    }

    /// Run `sql` directly in every region (DDL and fixtures; nothing replicates
    /// before the nodes run, and DDL never does).
    pub async fn exec_all(&self, sql: &str) -> Result<()> {
        for r in &self.regions {
            r.admin
                .batch_execute(sql)
                .await
                .with_context(|| format!("in {}: {sql}", r.name))?;
        }
        Ok(())
    }

    /// `pgmesh init` (the library call) in every region: catalog, publication of
    /// schema `public`, slot. Create the user schema first.
    pub async fn init_all(&self) -> Result<()> {
        for r in &self.regions {
            catalog::init(&r.url(), &r.name, &TableSelection::default())
                .await
                .with_context(|| format!("init {}", r.name))?;
        }
        Ok(())
    }

    /// Start a node in every region with the spec `spec(i)`, then wait until each
    /// is its region's capture leader.
    pub async fn start_nodes(&mut self, spec: impl Fn(usize) -> NodeSpec) -> Result<()> {
        for i in 0..self.regions.len() {
            self.launch(i, spec(i)).await?;
        }
        for i in 0..self.regions.len() {
            self.wait_ready(i).await?;
        }
        Ok(())
    }

    /// Start (or restart) the node of region `i` and wait until it leads.
    pub async fn start_node(&mut self, i: usize, spec: NodeSpec) -> Result<()> {
        self.launch(i, spec).await?;
        self.wait_ready(i).await
    }

    /// Start region `i`'s node again with its last spec.
    pub async fn restart_node(&mut self, i: usize) -> Result<()> {
        let spec = self.regions[i].spec.clone().context("the node never ran")?;
        self.start_node(i, spec).await
    }

    async fn launch(&mut self, i: usize, spec: NodeSpec) -> Result<()> {
        let names: Vec<String> = self.regions.iter().map(|r| r.name.clone()).collect();
        let ports: HashMap<String, u16> = self
            .regions
            .iter()
            .map(|r| (r.name.clone(), r.peer_port))
            .collect();
        let r = &mut self.regions[i];
        if r.node.is_some() {
            bail!("region {} already runs a node", r.name);
        }
        let peers: Vec<String> = spec
            .peers
            .clone()
            .unwrap_or_else(|| names.iter().filter(|n| **n != r.name).cloned().collect());
        let peer_args: Vec<String> = peers
            .iter()
            .map(|p| {
                let mut arg = match spec.peer_addrs.get(p) {
                    Some(a) => format!("{p}={a}"),
                    None => format!("{p}=127.0.0.1:{}", ports[p]),
                };
                for a in spec.more_peer_addrs.get(p).into_iter().flatten() {
                    arg.push_str(&format!(",{a}"));
                }
                arg
            })
            .collect();
        let node_name = format!("{}-node", r.name);
        let upstream = spec.upstream.clone().unwrap_or_else(|| r.url());
        let peer_listen = format!("127.0.0.1:{}", r.peer_port);
        if spec.process {
            let (proxy, metrics) = r.process_ports;
            let mut args: Vec<String> = [
                "run",
                "--listen",
                &format!("127.0.0.1:{proxy}"),
                "--upstream",
                &upstream,
                "--region",
                &r.name,
                "--node",
                &node_name,
                "--peer-listen",
                &peer_listen,
                "--shutdown-grace-secs",
                "1",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            for p in &peer_args {
                args.extend(["--peer".to_string(), p.clone()]);
            }
            if spec.relay {
                args.push("--relay".into());
            }
            let prune = spec.prune_secs.unwrap_or(0).to_string();
            args.extend(["--prune-interval-secs".into(), prune]);
            args.extend(["--tombstone-retention-secs".into(), "0".into()]);
            if spec.metrics {
                args.extend(["--metrics-listen".into(), format!("127.0.0.1:{metrics}")]);
            }
            if let Some((capture, apply)) = spec.linger_ms {
                args.extend(["--capture-linger-ms".into(), capture.to_string()]);
                args.extend(["--apply-linger-ms".into(), apply.to_string()]);
            }
            if let Some(t) = &spec.tls {
                for (flag, path) in [
                    ("--peer-tls-cert", &t.cert),
                    ("--peer-tls-key", &t.key),
                    ("--peer-ca", &t.ca),
                ] {
                    args.extend([flag.to_string(), path.to_string_lossy().into_owned()]);
                }
            }
            let mut p = PgmeshProcess::spawn(&args)?;
            r.proxy_addr = Some(p.listen_addr().await?);
            r.metrics_addr = spec
                .metrics
                .then(|| SocketAddr::from(([127, 0, 0, 1], metrics)));
            r.node = Some(Node::Process(p));
        } else {
            let cfg = Config {
                upstream: Some(upstream),
                node: Some(node_name),
                peer_listen: Some(peer_listen),
                peers: peer_args.clone(),
                ..in_process_config(&r.name, &spec)
            };
            let h = node::start(cfg.validate()?)
                .await
                .with_context(|| format!("starting the node of {}", r.name))?;
            r.proxy_addr = Some(h.proxy.local_addr());
            r.metrics_addr = h.metrics_addr;
            r.node = Some(Node::InProcess(Box::new(h)));
        }
        r.peers = peers;
        r.spec = Some(spec);
        r.peer_args = peer_args;
        Ok(())
    }

    /// Another in-process node of region `i`, named `node`, pulling from the same
    /// peers as the region's own node, and serving the log on `peer_port`. While the
    /// region's node leads, it waits as standby. `edit` may change its configuration
    /// further.
    pub async fn start_second_node(
        &self,
        i: usize,
        node: &str,
        peer_port: u16,
        edit: impl FnOnce(&mut Config),
    ) -> Result<NodeHandle> {
        let r = &self.regions[i];
        let spec = r
            .spec
            .clone()
            .context("start the region's own node first")?;
        let mut cfg = Config {
            upstream: Some(spec.upstream.clone().unwrap_or_else(|| r.url())),
            node: Some(node.to_string()),
            peer_listen: Some(format!("127.0.0.1:{peer_port}")),
            peers: r.peer_args.clone(),
            ..in_process_config(&r.name, &spec)
        };
        edit(&mut cfg);
        node::start(cfg.validate()?)
            .await
            .with_context(|| format!("starting node {node} of {}", r.name))
    }

    /// Wait until region `i`'s node leads capture and its replication stream runs.
    async fn wait_ready(&self, i: usize) -> Result<()> {
        let r = &self.regions[i];
        let what = format!("the node of {} to lead capture", r.name);
        match &r.node {
            Some(Node::InProcess(h)) => {
                let mut role = h
                    .capture()
                    .context("the node runs no capture")?
                    .watch_role();
                tokio::time::timeout(READY_TIMEOUT, role.wait_for(|r| *r == Role::Leader))
                    .await
                    .with_context(|| format!("timed out waiting for {what}"))?
                    .context("capture ended")?;
            }
            Some(Node::Process(p)) => {
                let slot = catalog::slot_name(&r.name);
                wait_until(READY_TIMEOUT, &what, || async {
                    p.logged_capture_leader()
                        && r.admin
                            .query_opt(
                                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
                                &[&slot],
                            )
                            .await
                            .ok()
                            .flatten()
                            .is_some()
                })
                .await
                .with_context(|| format!("pgmesh log:\n{}", p.log()))?;
            }
            None => bail!("region {} runs no node", r.name),
        }
        Ok(())
    }

    /// SIGKILL region `i`'s node process and wait until it is gone.
    pub async fn kill_node(&mut self, i: usize) -> Result<()> {
        match self.regions[i].node.take() {
            Some(Node::Process(mut p)) => {
                p.signal("KILL")?;
                p.wait_exit(Duration::from_secs(30)).await?;
                Ok(())
            }
            other => {
                self.regions[i].node = other;
                bail!("kill_node needs a node process")
            }
        }
    }

    /// Stop region `i`'s node: in-process nodes drain, processes get SIGTERM.
    pub async fn stop_node(&mut self, i: usize) -> Result<()> {
        match self.regions[i].node.take() {
            Some(Node::InProcess(h)) => h.shutdown(Duration::from_secs(1)).await,
            Some(Node::Process(mut p)) => {
                p.signal("TERM")?;
                p.wait_exit(Duration::from_secs(30)).await?;
            }
            None => {}
        }
        Ok(())
    }

    /// Restart region `i`'s PostgreSQL (`pg_ctl restart -m fast`), which drops
    /// every connection to it, and reconnect the admin connection.
    pub async fn restart_database(&mut self, i: usize) -> Result<()> {
        let r = &mut self.regions[i];
        tokio::task::block_in_place(|| r.cluster.restart())?;
        r.admin = r.cluster.connect().await?;
        Ok(())
    }

    /// Crash region `i`'s PostgreSQL (SIGKILL of the postmaster), start it again
    /// (crash recovery), and reconnect the admin connection.
    pub async fn crash_database(&mut self, i: usize) -> Result<()> {
        let r = &mut self.regions[i];
        tokio::task::block_in_place(|| {
            r.cluster.kill9()?;
            r.cluster.start_again()
        })?;
        r.admin = r.cluster.connect().await?;
        Ok(())
    }

    /// Stop every node, then every cluster (in parallel).
    pub async fn shutdown(mut self) {
        for i in 0..self.regions.len() {
            if let Err(e) = self.stop_node(i).await {
                tracing::warn!(error = %format!("{e:#}"), "stopping a node failed");
            }
        }
        let drops: Vec<_> = self
            .regions
            .drain(..)
            .map(|r| tokio::task::spawn_blocking(move || drop(r)))
            .collect();
        for d in drops {
            let _ = d.await;
        }
    }

    /// A `key=value` connection string through region `i`'s proxy.
    pub fn proxy_conn_string(&self, i: usize) -> Result<String> {
        let a = self.regions[i]
            .proxy_addr
            .context("the region runs no node")?;
        Ok(format!(
            "host={} port={} user=postgres dbname=postgres",
            a.ip(),
            a.port()
        ))
    }

    /// Connect through region `i`'s proxy.
    pub async fn connect_proxy(&self, i: usize) -> Result<Client> {
        Ok(crate::connect(&self.proxy_conn_string(i)?).await?)
    }

    /// Where region `i`'s node serves `/metrics`.
    pub fn metrics_addr(&self, i: usize) -> Option<SocketAddr> {
        self.regions[i].metrics_addr
    }

    /// The highest `seq` of region `i`'s change log.
    pub async fn head(&self, i: usize) -> Result<i64> {
        Ok(self.regions[i]
            .admin
            .query_one("SELECT coalesce(max(seq), 0) FROM mesh.changelog", &[])
            .await?
            .get(0))
    }

    /// Region `i`'s view (`mesh.links`) of its link from `peer`.
    pub async fn link(&self, i: usize, peer: &str) -> Result<Option<LinkRow>> {
        let row = self.regions[i]
            .admin
            .query_opt(
                "SELECT status, checkpoint, peer_head, backlog_events, lag_ms, error
                 FROM mesh.links WHERE name = $1",
                &[&peer],
            )
            .await?;
        Ok(row.map(|r| LinkRow {
            status: r.get(0),
            checkpoint: r.get(1),
            peer_head: r.get(2),
            backlog: r.get(3),
            lag_ms: r.get(4),
            error: r.get(5),
        }))
    }

    /// Pause region `i`'s link from `peer` and wait until the link has dropped
    /// its connection (it then says so in `mesh.links.error`).
    pub async fn pause_link(&self, i: usize, peer: &str) -> Result<()> {
        let admin = &self.regions[i].admin;
        admin
            .execute(
                "UPDATE mesh.link_state SET error = NULL WHERE peer = $1",
                &[&peer],
            )
            .await?;
        admin
            .execute("SELECT mesh.pause_link($1)", &[&peer])
            .await?;
        let what = format!("the link {peer} -> {} to disconnect", self.regions[i].name);
        wait_until(READY_TIMEOUT, &what, || async {
            matches!(self.link(i, peer).await, Ok(Some(l))
                if l.status == "paused" && l.error.as_deref() == Some(pgmesh_replicator::pull::PAUSED))
        })
        .await
    }

    /// Resume region `i`'s link from `peer`.
    pub async fn resume_link(&self, i: usize, peer: &str) -> Result<()> {
        self.regions[i]
            .admin
            .execute("SELECT mesh.resume_link($1)", &[&peer])
            .await?;
        Ok(())
    }
}

/// The in-process configuration of a node of `region` run as `spec` says, but for
/// its upstream, name, peer listener and peers.
fn in_process_config(region: &str, spec: &NodeSpec) -> Config {
    let defaults = Config::default();
    let (capture_linger_ms, apply_linger_ms) = spec
        .linger_ms
        .unwrap_or((defaults.capture_linger_ms, defaults.apply_linger_ms));
    Config {
        capture_linger_ms,
        apply_linger_ms,
        listen: Some("127.0.0.1:0".into()),
        region: region.to_string(),
        relay: spec.relay,
        peer_tls: match &spec.tls {
            Some(t) => PeerTlsConfig {
                cert: Some(t.cert.clone()),
                key: Some(t.key.clone()),
                ca: Some(t.ca.clone()),
            },
            None => PeerTlsConfig::default(),
        },
        metrics_listen: spec.metrics.then(|| "127.0.0.1:0".to_string()),
        shutdown_grace_secs: 1,
        prune_interval_secs: spec.prune_secs.unwrap_or(0),
        tombstone_retention_secs: 0,
        ..defaults
    }
}
