//! pgmesh nodes under test: the proxy in-process, or the real `pgmesh` binary.
//!
//! This module owns starting a pgmesh proxy in front of a [`PgCluster`] the two
//! ways tests need. [`ProxyNode`] runs the library's server on the test's own
//! tokio runtime, on `127.0.0.1:0`, so a test can tweak any config field and look
//! at [`ProxyNode::live_sessions`]. [`PgmeshProcess`] runs the built `pgmesh`
//! binary as a subprocess, for what only a process can show (signals, exit codes,
//! the CLI); it learns the port from the binary's own "proxy listening" log line,
//! so no port is ever fixed. Both stop what they started when dropped. This module
//! must never build the binary (build it first: `cargo build -p pgmesh-proxy`) and
//! never touch the cluster beyond reading its address.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use pgmesh_proxy::config::Config;
use pgmesh_proxy::server::{self, ProxyHandle};

use crate::cluster::PgCluster;
use crate::wait::wait_for;

/// Environment variable naming the `pgmesh` binary to run, overriding the search
/// of the cargo target directory.
pub const PGMESH_BIN_ENV: &str = "PGMESH_BIN";

/// An in-process pgmesh proxy on `127.0.0.1:<free port>`, relaying to a cluster.
///
/// Dropping it closes the listener (the server sees its shutdown channel close);
/// sessions still open end with the test's runtime. Call [`ProxyNode::shutdown`]
/// to drain deliberately.
#[derive(Debug)]
pub struct ProxyNode {
    handle: ProxyHandle,
    addr: SocketAddr,
}

impl ProxyNode {
    /// Start a proxy with the default config in front of `cluster`.
    pub async fn start(cluster: &PgCluster) -> Result<ProxyNode> {
        Self::start_with(cluster, |_| {}).await
    }

    /// Start a proxy in front of `cluster` after `tweak` has adjusted the config
    /// (listen and upstream are preset; `tweak` may override them too).
    pub async fn start_with(
        cluster: &PgCluster,
        tweak: impl FnOnce(&mut Config),
    ) -> Result<ProxyNode> {
        Self::start_upstream(&cluster.url("postgres"), tweak).await
    }

    /// Start a proxy relaying to the upstream URL `upstream`, which need not be
    /// a running cluster (fault tests point it at a closed port).
    pub async fn start_upstream(
        upstream: &str,
        tweak: impl FnOnce(&mut Config),
    ) -> Result<ProxyNode> {
        let mut config = Config {
            listen: Some("127.0.0.1:0".into()),
            upstream: Some(upstream.into()),
            ..Config::default()
        };
        tweak(&mut config);
        let validated = config.validate().context("validating the proxy config")?;
        let handle = server::start(validated)
            .await
            .context("starting the proxy")?;
        let addr = handle.local_addr();
        Ok(ProxyNode { handle, addr })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// A `key=value` connection string (tokio-postgres and libpq) for superuser
    /// `postgres` and database `postgres` through the proxy.
    pub fn conn_string(&self) -> String {
        self.conn_string_for("postgres", "postgres", None)
    }

    /// A `key=value` connection string for `user` (with `password`, if any) and
    /// database `db` through the proxy.
    pub fn conn_string_for(&self, db: &str, user: &str, password: Option<&str>) -> String {
        conn_string(self.addr, db, user, password)
    }

    /// libpq environment pointing at the proxy as `postgres`/`postgres`.
    pub fn libpq_env(&self) -> Vec<(&'static str, String)> {
        libpq_env(self.addr)
    }

    /// Sessions that finished startup and are still open.
    pub fn live_sessions(&self) -> usize {
        self.handle.live_sessions()
    }

    /// Stop accepting, let open sessions finish their transactions within
    /// `grace`, then close the rest and wait for every session task.
    pub async fn shutdown(self, grace: Duration) {
        self.handle.shutdown(grace).await;
    }
}

/// A running `pgmesh` binary. Its stderr (the log) is collected line by line;
/// dropping it SIGKILLs the process if it is still running.
#[derive(Debug)]
pub struct PgmeshProcess {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl PgmeshProcess {
    /// Run `pgmesh <args>` with its log on a pipe. It is not waited for.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Result<PgmeshProcess> {
        Self::spawn_wrapped(&[], args)
    }

    /// [`PgmeshProcess::spawn`] through a command prefix such as `ip netns exec NS`,
    /// which must exec pgmesh in its place (so [`PgmeshProcess::signal`] reaches it).
    pub fn spawn_wrapped<S: AsRef<std::ffi::OsStr>>(
        wrapper: &[String],
        args: &[S],
    ) -> Result<PgmeshProcess> {
        let exe = pgmesh_bin()?;
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let mut child = cmd
            .args(args)
            // Plain log lines: no colour codes between a field's name and value.
            .env("NO_COLOR", "1")
            .env_remove("PGMESH_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", exe.display()))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        Ok(PgmeshProcess { child, log })
    }

    /// Run `pgmesh run --listen 127.0.0.1:0 --upstream <cluster> <extra>` and
    /// wait until it listens.
    pub async fn run(cluster: &PgCluster, extra: &[&str]) -> Result<PgmeshProcess> {
        let upstream = cluster.url("postgres");
        let mut args = vec!["run", "--listen", "127.0.0.1:0", "--upstream", &upstream];
        args.extend_from_slice(extra);
        let mut process = Self::spawn(&args)?;
        process.listen_addr().await?;
        Ok(process)
    }

    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process has logged so far.
    pub fn log(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    /// Whether the log says this node became its region's capture leader (the
    /// standby's "waiting for the capture leader lock" does not count).
    pub fn logged_capture_leader(&self) -> bool {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|l| l.contains("capture leader") && !l.contains("standby"))
    }

    /// The address from the "proxy listening" log line, waiting for it; fails
    /// early if the process exits first.
    pub async fn listen_addr(&mut self) -> Result<SocketAddr> {
        let log = self.log.clone();
        let mut exited = None;
        let found = wait_for(
            crate::wait::DEFAULT_TIMEOUT,
            "pgmesh to log its listen address",
            || {
                let addr = parse_listen_addr(&log.lock().unwrap_or_else(|e| e.into_inner()));
                if addr.is_none() && exited.is_none() {
                    exited = self.child.try_wait().ok().flatten();
                }
                let result = match (addr, exited) {
                    (Some(a), _) => Ok(Some(a)),
                    (None, Some(status)) => Err(anyhow!("pgmesh exited with {status}")),
                    (None, None) => Ok(None),
                };
                async move { result }
            },
        )
        .await;
        found.map_err(|e| e.context(format!("pgmesh log:\n{}", self.log())))
    }

    /// A `key=value` connection string through this process's listener.
    pub async fn conn_string(&mut self) -> Result<String> {
        Ok(conn_string(
            self.listen_addr().await?,
            "postgres",
            "postgres",
            None,
        ))
    }

    /// Send `signal` (`"TERM"`, `"INT"`, `"KILL"`) with `kill(1)`; this crate
    /// stays free of `unsafe`.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -{signal} {} failed: {status}", self.pid());
        }
        Ok(())
    }

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Wait up to `timeout` for the process to exit, polling without blocking
    /// the runtime.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let child = &mut self.child;
        wait_for(timeout, "pgmesh to exit", || {
            let status = child.try_wait().map_err(anyhow::Error::from);
            async move { status }
        })
        .await
    }
}

impl Drop for PgmeshProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Run `pgmesh <args>` to completion (for short commands such as `--help` and
/// `check-config`), returning what it printed.
pub async fn pgmesh_output(args: &[&str]) -> Result<crate::client::CmdOutput> {
    let exe = pgmesh_bin()?;
    let out = tokio::process::Command::new(&exe)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {}", exe.display()))?;
    Ok(crate::client::CmdOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// The `pgmesh` binary: `$PGMESH_BIN`, else the one in the cargo profile
/// directory this test binary was built into (`target/<profile>/pgmesh`, two
/// levels above `target/<profile>/deps/<test>`), else the newest of
/// `target/{debug,release}/pgmesh` beside the workspace.
pub fn pgmesh_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(PGMESH_BIN_ENV) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!("{PGMESH_BIN_ENV}={} is not a file", path.display());
    }
    let beside_tests = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("pgmesh")));
    if let Some(path) = beside_tests.filter(|p| p.is_file()) {
        return Ok(path);
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    let newest = ["debug", "release"]
        .iter()
        .map(|profile| target.join(profile).join("pgmesh"))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .max();
    match newest {
        Some((_, path)) => Ok(path),
        None => bail!(
            "the pgmesh binary was not found; build it first with \
             `cargo build -p pgmesh-proxy` (or set {PGMESH_BIN_ENV})"
        ),
    }
}

/// The listen address in a `proxy listening listen=HOST:PORT ...` log line.
fn parse_listen_addr(lines: &[String]) -> Option<SocketAddr> {
    lines
        .iter()
        .filter(|l| l.contains("proxy listening"))
        .find_map(|l| {
            let value = l.split("listen=").nth(1)?.split_whitespace().next()?;
            value.parse().ok()
        })
}

fn conn_string(addr: SocketAddr, db: &str, user: &str, password: Option<&str>) -> String {
    let mut s = format!(
        "host={} port={} user={} dbname={}",
        addr.ip(),
        addr.port(),
        conn_value(user),
        conn_value(db)
    );
    if let Some(password) = password {
        s.push_str(&format!(" password={}", conn_value(password)));
    }
    s
}

/// A value in a libpq `key=value` string, quoted when it has to be.
fn conn_value(v: &str) -> String {
    if !v.is_empty() && !v.contains([' ', '\'', '\\', '=']) {
        v.to_string()
    } else {
        format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

fn libpq_env(addr: SocketAddr) -> Vec<(&'static str, String)> {
    vec![
        ("PGHOST", addr.ip().to_string()),
        ("PGPORT", addr.port().to_string()),
        ("PGUSER", "postgres".to_string()),
        ("PGDATABASE", "postgres".to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_line_is_parsed() {
        let lines = vec![
            "2026-01-01T00:00:00Z  INFO something else".to_string(),
            "2026-01-01T00:00:00Z  INFO proxy listening listen=127.0.0.1:40123 upstream=127.0.0.1:5432".to_string(),
        ];
        assert_eq!(
            parse_listen_addr(&lines),
            Some("127.0.0.1:40123".parse().unwrap())
        );
        assert_eq!(parse_listen_addr(&lines[..1]), None);
    }

    #[test]
    fn conn_strings() {
        let addr: SocketAddr = "127.0.0.1:7".parse().unwrap();
        assert_eq!(
            conn_string(addr, "db", "u", Some("pw")),
            "host=127.0.0.1 port=7 user=u dbname=db password=pw"
        );
    }
}
