//! One real PostgreSQL cluster per [`PgCluster`], from start to guaranteed cleanup.
//!
//! This module owns a cluster's life: copying the `initdb` template into a fresh
//! temp directory, writing its settings and `pg_hba.conf`, starting it on a free
//! loopback port (retrying when another process grabs the port first), the fault
//! operations tests need (stop, restart, SIGKILL, start again), and tearing it
//! down in `Drop`, which also runs while a failing test unwinds. Lifecycle calls
//! block (each is `pg_ctl ... -w`, well under a second normally); use
//! [`PgCluster::start_async`] to start clusters from async tests without stalling
//! the runtime. This module must never leave a postmaster running or a directory
//! behind once its `PgCluster` is dropped, and never uses a fixed port.

mod binaries;
mod options;
mod process;
mod template;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tempfile::TempDir;
use tokio_postgres::Client;

pub use binaries::{PgBin, PG_BIN_ENV};
pub use options::{AuthMethod, ClusterOptions, PasswordUser, BASE_SETTINGS};

use crate::client::{self, CmdOutput};
use crate::ports::free_port;
use crate::wait::wait_until_blocking;

/// Seconds `pg_ctl -w` may wait for a start, stop or restart.
const PG_CTL_TIMEOUT_SECS: &str = "30";
/// How many fresh ports to try when the chosen one is taken before we bind it.
const PORT_ATTEMPTS: usize = 5;
/// How long to wait for a killed server's processes to disappear.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines of server log printed when a cluster is dropped during a panic.
const LOG_TAIL_ON_PANIC: usize = 40;

/// A running (or deliberately stopped) PostgreSQL cluster in a temp directory.
///
/// Dropping it stops the server (`pg_ctl stop -m immediate`, then SIGKILL of the
/// whole process group if needed) and deletes the directory.
#[derive(Debug)]
pub struct PgCluster {
    bin: &'static PgBin,
    port: u16,
    /// `None` only inside `Drop`, after the directory has been removed.
    root: Option<TempDir>,
    root_path: PathBuf,
    data_dir: PathBuf,
    log_file: PathBuf,
}

impl PgCluster {
    /// Start a cluster, blocking until it accepts connections and its password
    /// users exist. The first call in a process also runs `initdb` (about a
    /// second); later ones copy the template.
    pub fn start(opts: ClusterOptions) -> Result<PgCluster> {
        let bin = PgBin::get()?;
        let template = template::template_data_dir()?;
        let base = template::temp_base(bin);
        let root = tempfile::Builder::new()
            .prefix(&format!(
                "{}{}-",
                template::CLUSTER_PREFIX,
                std::process::id()
            ))
            .tempdir_in(&base)
            .with_context(|| format!("creating a cluster dir in {}", base.display()))?;
        let root_path = root.path().to_path_buf();
        bin.give_to_server_user(&root_path)?;
        let data_dir = root_path.join("data");
        let cp = Command::new("cp")
            .arg("-a")
            .arg(template)
            .arg(&data_dir)
            .output()
            .context("running cp -a")?;
        check(cp, "copying the initdb template")?;
        let mut cluster = PgCluster {
            bin,
            port: 0,
            log_file: root_path.join("postgres.log"),
            root: Some(root),
            root_path,
            data_dir,
        };
        cluster.write_file(&cluster.data_dir.join("pg_hba.conf"), &opts.hba_file())?;
        cluster.start_on_free_port(&opts)?;
        for user in &opts.users {
            cluster.create_user(&user.name, &user.password, user.method)?;
        }
        Ok(cluster)
    }

    /// [`PgCluster::start`] on tokio's blocking pool, so async tests can start
    /// several clusters concurrently (`tokio::try_join!`).
    pub async fn start_async(opts: ClusterOptions) -> Result<PgCluster> {
        tokio::task::spawn_blocking(move || PgCluster::start(opts))
            .await
            .context("cluster start task panicked")?
    }

    /// Start `n` clusters with the same options in parallel threads.
    pub fn start_many(n: usize, opts: &ClusterOptions) -> Result<Vec<PgCluster>> {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|_| s.spawn(|| PgCluster::start(opts.clone())))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow!("cluster start thread panicked"))?
                })
                .collect()
        })
    }

    fn start_on_free_port(&mut self, opts: &ClusterOptions) -> Result<()> {
        let socket_dir = self.root_path.to_string_lossy().into_owned();
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            self.port = free_port()?;
            let settings = opts.settings_file(self.port, &socket_dir);
            let path = self.data_dir.join(template::SETTINGS_FILE);
            self.write_file(&path, &settings)?;
            let log_before = self.log_contents().len();
            match self.pg_ctl_start() {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let log = self.log_contents();
                    let new_log = log.get(log_before..).unwrap_or(&log);
                    if !new_log.contains("could not bind") && !new_log.contains("already in use") {
                        return Err(e);
                    }
                    tracing::debug!(port = self.port, "port taken before postgres bound it");
                    last_err = Some(e);
                }
            }
        }
        Err(last_err
            .unwrap_or_else(|| anyhow!("no start attempted"))
            .context(format!("no free port after {PORT_ATTEMPTS} attempts")))
    }

    /// Write `text` to `path` and hand it to the server user.
    fn write_file(&self, path: &Path, text: &str) -> Result<()> {
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        self.bin.give_to_server_user(path)
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<()> {
        let out = self
            .bin
            .server_command("pg_ctl", &self.root_path)
            .args(args)
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS])
            .stdin(Stdio::null())
            .output()
            .context("running pg_ctl")?;
        check(out, &format!("pg_ctl {}", args.join(" "))).map_err(|e| {
            e.context(format!(
                "cluster on port {}; server log:\n{}",
                self.port,
                self.log_tail(LOG_TAIL_ON_PANIC)
            ))
        })
    }

    fn pg_ctl_start(&self) -> Result<()> {
        let log = self.log_file.to_string_lossy().into_owned();
        self.pg_ctl(&["start", "-l", &log])
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The host to connect to: `"127.0.0.1"`.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// `postgres://postgres@127.0.0.1:<port>/<db>`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@{}:{}/{db}", self.host(), self.port)
    }

    /// A tokio-postgres `key=value` connection string for superuser `postgres`
    /// and database `postgres`.
    pub fn conn_string(&self) -> String {
        self.conn_string_for("postgres", "postgres", None)
    }

    /// A `key=value` connection string for `user` (with `password`, if any) and
    /// database `db`.
    pub fn conn_string_for(&self, db: &str, user: &str, password: Option<&str>) -> String {
        let mut s = format!(
            "host={} port={} user={} dbname={}",
            self.host(),
            self.port,
            conn_value(user),
            conn_value(db)
        );
        if let Some(password) = password {
            s.push_str(&format!(" password={}", conn_value(password)));
        }
        s
    }

    /// The data directory (`PGDATA`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The Unix socket directory (the cluster's temp directory).
    pub fn socket_dir(&self) -> &Path {
        &self.root_path
    }

    /// The cluster's temp directory, holding `data/` and `postgres.log`. It is
    /// gone once the cluster is dropped.
    pub fn root_dir(&self) -> &Path {
        &self.root_path
    }

    /// The whole server log so far (empty if it cannot be read).
    pub fn log_contents(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log_contents();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Connect as `postgres` to database `postgres` with tokio-postgres.
    pub async fn connect(&self) -> Result<Client> {
        Ok(client::connect(&self.conn_string()).await?)
    }

    /// Connect as `postgres` to database `db`.
    pub async fn connect_db(&self, db: &str) -> Result<Client> {
        Ok(client::connect(&self.conn_string_for(db, "postgres", None)).await?)
    }

    /// libpq environment pointing at this cluster as `postgres`/`postgres`.
    pub fn libpq_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("PGHOST", self.host().to_string()),
            ("PGPORT", self.port.to_string()),
            ("PGUSER", "postgres".to_string()),
            ("PGDATABASE", "postgres".to_string()),
        ]
    }

    /// Run `psql -X <args>` against this cluster (connection via `PG*`
    /// environment, so `args` may still name another database or user).
    pub async fn psql(&self, args: &[&str]) -> Result<CmdOutput> {
        let env = self.libpq_env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        client::psql(args, &env).await
    }

    /// Run `sql` with `psql -XAtq -v ON_ERROR_STOP=1 -c` and return its
    /// unaligned, tuples-only output; fails if psql does.
    pub async fn psql_sql(&self, sql: &str) -> Result<String> {
        let out = self
            .psql(&["-Atq", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .await?
            .ok()
            .with_context(|| format!("psql -c {sql:?}"))?;
        Ok(out.stdout)
    }

    /// Run `pgbench <args>` against this cluster (via `PG*` environment).
    pub async fn pgbench(&self, args: &[&str]) -> Result<CmdOutput> {
        let env = self.libpq_env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        client::pgbench(args, &env).await
    }

    /// Create (or re-password) login role `name`, storing `password` the way
    /// `method` needs. Blocking: it runs psql synchronously. Over TCP the role
    /// only authenticates with `method` if an hba line says so; see
    /// [`ClusterOptions::password_user`], which adds one.
    pub fn create_user(&self, name: &str, password: &str, method: AuthMethod) -> Result<()> {
        let ident = options::quote_ident(name);
        let pw = options::quote_literal(password);
        let sql = format!(
            "SET password_encryption = {enc};\n\
             DO $$ BEGIN CREATE ROLE {ident} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;\n\
             ALTER ROLE {ident} LOGIN PASSWORD {pw};",
            enc = options::quote_literal(method.password_encryption()),
        );
        let out = Command::new(self.bin.client_path("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", self.host()])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .arg("-c")
            .arg(&sql)
            .stdin(Stdio::null())
            .output()
            .context("running psql")?;
        check(out, &format!("creating user {name}"))
    }

    /// The postmaster pid, if `postmaster.pid` names a running process.
    pub fn postmaster_pid(&self) -> Option<u32> {
        process::postmaster_pid(&self.data_dir).filter(|&pid| process::is_running(pid))
    }

    /// Whether the postmaster is running.
    pub fn is_running(&self) -> bool {
        self.postmaster_pid().is_some()
    }

    /// Stop cleanly (`pg_ctl stop -m fast`), waiting until it is down.
    pub fn stop(&self) -> Result<()> {
        self.pg_ctl(&["stop", "-m", "fast"])
    }

    /// Restart (`pg_ctl restart -m fast`) on the same port, waiting until it
    /// accepts connections again.
    pub fn restart(&self) -> Result<()> {
        let log = self.log_file.to_string_lossy().into_owned();
        self.pg_ctl(&["restart", "-m", "fast", "-l", &log])
    }

    /// Crash the server: SIGKILL the postmaster only (as a real crash would), then
    /// wait until its backends, orphaned, have noticed and exited. The next
    /// [`PgCluster::start_again`] runs crash recovery.
    pub fn kill9(&self) -> Result<()> {
        let pid = self
            .postmaster_pid()
            .ok_or_else(|| anyhow!("kill9: the server on port {} is not running", self.port))?;
        if !process::signal(pid, "KILL", false) {
            bail!("kill9: could not SIGKILL postmaster {pid}");
        }
        wait_until_blocking(
            EXIT_TIMEOUT,
            "the killed server's processes to exit",
            || !process::group_alive(pid),
        )
    }

    /// Start a stopped or killed server again on the same port and data.
    pub fn start_again(&self) -> Result<()> {
        self.remove_stale_pid_file()?;
        // A killed server's orphaned backends can still hold its shared memory a
        // moment after their process group is gone, and PostgreSQL refuses to start
        // while they do ("pre-existing shared memory block ... is still in use").
        let deadline = std::time::Instant::now() + EXIT_TIMEOUT;
        loop {
            match self.pg_ctl_start() {
                Err(e)
                    if std::time::Instant::now() < deadline
                        && format!("{e:#}").contains("pre-existing shared memory block") =>
                {
                    // Polling for the old memory to be released, with a deadline.
                    std::thread::sleep(Duration::from_millis(100));
                }
                r => return r,
            }
        }
    }

    /// After a SIGKILL in a container whose init never reaps, the postmaster
    /// stays a zombie and postgres would take its lock files (`postmaster.pid`
    /// and the socket's `.lock`) for a live server's. Remove them once the pid is
    /// dead or a zombie and no backend of it is left.
    fn remove_stale_pid_file(&self) -> Result<()> {
        let Some(pid) = process::postmaster_pid(&self.data_dir) else {
            return Ok(());
        };
        if process::is_running(pid) {
            bail!("start_again: postmaster {pid} is still running");
        }
        wait_until_blocking(EXIT_TIMEOUT, "the old server's processes to exit", || {
            !process::group_alive(pid)
        })?;
        // The socket's lock file names the dead pid too.
        let socket_lock = self.root_path.join(format!(".s.PGSQL.{}.lock", self.port));
        for path in [self.data_dir.join("postmaster.pid"), socket_lock] {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing {}", path.display()));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Best-effort teardown for `Drop`: immediate stop, else SIGKILL the group.
    fn shut_down(&self) {
        let Some(pid) = self.postmaster_pid() else {
            return;
        };
        if let Err(e) = self.pg_ctl(&["stop", "-m", "immediate"]) {
            tracing::warn!(port = self.port, error = %format!("{e:#}"), "pg_ctl stop failed; killing");
        }
        if process::group_alive(pid) {
            process::signal(pid, "KILL", true);
        }
        if let Err(e) =
            wait_until_blocking(EXIT_TIMEOUT, "server exit", || !process::group_alive(pid))
        {
            eprintln!("pgmesh-tests: cluster on port {}: {e:#}", self.port);
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "pgmesh-tests: cluster on port {} dropped during a panic; server log tail:\n{}",
                self.port,
                self.log_tail(LOG_TAIL_ON_PANIC)
            );
        }
        self.shut_down();
        if let Some(root) = self.root.take() {
            if let Err(e) = root.close() {
                eprintln!(
                    "pgmesh-tests: could not remove {}: {e}",
                    self.root_path.display()
                );
            }
        }
    }
}

/// `Ok` if the command succeeded, else an error with its output.
fn check(out: Output, what: &str) -> Result<()> {
    if out.status.success() {
        return Ok(());
    }
    bail!(
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A value in a libpq `key=value` string, quoted when it has to be.
fn conn_value(v: &str) -> String {
    if !v.is_empty() && !v.contains([' ', '\'', '\\', '=']) {
        v.to_string()
    } else {
        format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_values_are_quoted_when_needed() {
        assert_eq!(conn_value("alice"), "alice");
        assert_eq!(conn_value("a b"), "'a b'");
        assert_eq!(conn_value("it's"), "'it\\'s'");
        assert_eq!(conn_value(""), "''");
    }
}
