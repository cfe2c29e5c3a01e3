//! Local PostgreSQL clusters for `pgmesh demo`: initdb, start, stop, remove.
//!
//! PostgreSQL refuses to run as root, so when the effective user is root every
//! server command runs as the `postgres` OS user (`runuser`), and the data
//! directories are handed to that user. It never touches a cluster it did not create.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// Directory holding `initdb` and `pg_ctl`: `PATH` first, then the newest
/// `/usr/lib/postgresql/*/bin`.
pub fn pg_bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                return Ok(dir);
            }
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    found.retain(|d| d.join("initdb").is_file());
    found.sort();
    found
        .pop()
        .context("PostgreSQL server binaries not found: install postgresql (initdb, pg_ctl)")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a server command, as `postgres` when we are root.
fn run(bin: &Path, args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    let out = cmd
        .args(args)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} failed: {}{}",
            bin.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// One running demo cluster.
#[derive(Debug)]
pub struct Cluster {
    pub port: u16,
    pub dir: PathBuf,
    bin: PathBuf,
}

impl Cluster {
    /// Creates and starts a cluster in `dir` listening on 127.0.0.1:`port`.
    pub fn start(dir: &Path, port: u16) -> anyhow::Result<Self> {
        let bin = pg_bin_dir()?;
        std::fs::create_dir_all(dir)?;
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir)
                .status()?;
            if !ok.success() {
                bail!("cannot give {} to the postgres user", dir.display());
            }
        }
        let data = dir.join("data");
        let data_s = data.to_string_lossy().to_string();
        run(
            &bin.join("initdb"),
            &[
                "-D",
                &data_s,
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )?;
        let opts = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c wal_level=logical \
             -c max_wal_senders=20 -c max_replication_slots=20 -c max_connections=100 -c shared_buffers=64MB",
            dir.display()
        );
        let log = dir.join("postgres.log").to_string_lossy().to_string();
        run(
            &bin.join("pg_ctl"),
            &[
                "-D", &data_s, "-o", &opts, "-l", &log, "-w", "-t", "60", "start",
            ],
        )?;
        Ok(Self {
            port,
            dir: dir.to_path_buf(),
            bin,
        })
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server (fast) and removes its directory.
    pub fn remove(self) -> anyhow::Result<()> {
        let data = self.dir.join("data").to_string_lossy().to_string();
        let _ = run(
            &self.bin.join("pg_ctl"),
            &["-D", &data, "-m", "fast", "-w", "-t", "60", "stop"],
        );
        std::fs::remove_dir_all(&self.dir)
            .with_context(|| format!("removing {}", self.dir.display()))
    }
}
