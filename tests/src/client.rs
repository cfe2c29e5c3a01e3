//! Clients that drive a server under test: tokio-postgres, `psql` and `pgbench`.
//!
//! This module owns connecting with tokio-postgres (the connection future is
//! spawned onto the current runtime) and running the command-line clients as
//! subprocesses, collecting their output into [`CmdOutput`]. The tools run
//! through `tokio::process` so that a test whose server (say, an in-process
//! pgmesh proxy) lives on the same runtime keeps being polled while the tool
//! talks to it. The tools run as the current user (root is fine for a client)
//! with the libpq environment scrubbed so the caller's `PG*` variables cannot
//! leak in. This module must never start or stop servers.

use std::ffi::OsStr;
use std::path::Path;
use std::process::ExitStatus;

use anyhow::{bail, Context, Result};
use tokio_postgres::{Client, NoTls};

use crate::cluster::PgBin;

/// libpq environment variables removed before running a client tool, so the
/// developer's own settings cannot redirect or alter a test.
const SCRUBBED_ENV: &[&str] = &[
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGOPTIONS",
    "PGSSLMODE",
    "PGAPPNAME",
    "PGCONNECT_TIMEOUT",
    "PGTARGETSESSIONATTRS",
];

/// Connect with tokio-postgres (no TLS) and spawn the connection future onto the
/// current tokio runtime. The error is tokio-postgres's own, so auth tests can
/// look at `code()`; it converts into `anyhow::Error` with `?`.
pub async fn connect(conn_str: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn_str, NoTls).await?;
    tokio::spawn(async move {
        // Tests kill servers on purpose, so a dropped connection is routine.
        if let Err(error) = connection.await {
            tracing::debug!(%error, "test connection ended");
        }
    });
    Ok(client)
}

/// What a finished subprocess printed and how it exited.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl CmdOutput {
    /// Whether the process exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// `Ok(self)` on success, else an error carrying the status and both streams.
    pub fn ok(self) -> Result<CmdOutput> {
        if self.success() {
            Ok(self)
        } else {
            bail!(
                "command failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
                self.status,
                self.stdout,
                self.stderr
            )
        }
    }
}

/// Run `pgbench` (the one beside `pg_ctl`, else `/usr/bin/pgbench`) with `args`
/// and extra environment `env` (e.g. `PGHOST`, `PGPORT`, `PGPASSWORD`). Fails
/// only when it cannot be run; check [`CmdOutput::success`] for its verdict.
pub async fn pgbench(args: &[&str], env: &[(&str, &str)]) -> Result<CmdOutput> {
    run_tool("pgbench", args, env).await
}

/// Run `psql` with `args` and extra environment `env`; `-X` (no `~/.psqlrc`) is
/// always passed first. Fails only when it cannot be run.
pub async fn psql(args: &[&str], env: &[(&str, &str)]) -> Result<CmdOutput> {
    let mut all = Vec::with_capacity(args.len() + 1);
    all.push("-X");
    all.extend_from_slice(args);
    run_tool("psql", &all, env).await
}

/// Run the client tool `name` from the PostgreSQL installation.
pub async fn run_tool<S: AsRef<OsStr>>(
    name: &str,
    args: &[S],
    env: &[(&str, &str)],
) -> Result<CmdOutput> {
    let exe = PgBin::get()
        .map(|b| b.client_path(name))
        .unwrap_or_else(|_| Path::new("/usr/bin").join(name));
    let mut cmd = tokio::process::Command::new(&exe);
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = cmd
        .output()
        .await
        .with_context(|| format!("running {}", exe.display()))?;
    Ok(CmdOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
