//! Finding the PostgreSQL binaries and running them as the right OS user.
//!
//! This module owns the process-wide facts every cluster shares: where `initdb`,
//! `pg_ctl` and the client tools live, whether we run as root, and the uid/gid of
//! the `postgres` OS user. PostgreSQL refuses to run as root, so server-side
//! commands go through [`PgBin::server_command`], which wraps them in
//! `runuser -u postgres --` when the effective uid is 0. Client tools (`psql`,
//! `pgbench`) run as whoever we are. This module must never start or stop a
//! server itself, and never needs `unsafe`: identities come from `id(1)`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};

/// Environment variable that, when set, names the PostgreSQL `bin` directory to
/// use instead of searching `PATH` and `/usr/lib/postgresql/*/bin`.
pub const PG_BIN_ENV: &str = "PGMESH_PG_BIN";

/// Where the PostgreSQL binaries are, and who must run the server ones.
#[derive(Debug, Clone)]
pub struct PgBin {
    dir: PathBuf,
    version: String,
    /// `Some((uid, gid))` of the `postgres` OS user when we are root and server
    /// commands must drop privileges; `None` when we already are unprivileged.
    run_as: Option<(u32, u32)>,
}

impl PgBin {
    /// The process-wide binaries, discovered once and cached.
    pub fn get() -> Result<&'static PgBin> {
        static BIN: OnceLock<std::result::Result<PgBin, String>> = OnceLock::new();
        BIN.get_or_init(|| PgBin::discover().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow!("{e}"))
    }

    fn discover() -> Result<PgBin> {
        let dir = find_bin_dir()?;
        let out = Command::new(dir.join("pg_ctl"))
            .arg("--version")
            .output()
            .with_context(|| format!("running {}/pg_ctl --version", dir.display()))?;
        let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let run_as = if current_euid()? == 0 {
            Some((id_of("-u")?, id_of("-g")?))
        } else {
            None
        };
        Ok(PgBin {
            dir,
            version,
            run_as,
        })
    }

    /// The directory holding `pg_ctl`, `initdb` and `postgres`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `pg_ctl --version` output, e.g. `pg_ctl (PostgreSQL) 15.18 (Debian ...)`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Whether server commands run as the `postgres` OS user (we are root).
    pub fn drops_privileges(&self) -> bool {
        self.run_as.is_some()
    }

    /// A command for a server-side binary (`initdb`, `pg_ctl`), run as the
    /// `postgres` OS user when we are root. The working directory is set to `cwd`
    /// because the server user may not be able to read ours.
    pub fn server_command(&self, name: &str, cwd: &Path) -> Command {
        let exe = self.dir.join(name);
        let mut cmd = match self.run_as {
            Some(_) => {
                let mut c = Command::new("runuser");
                c.args([OsStr::new("-u"), OsStr::new("postgres"), OsStr::new("--")])
                    .arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.current_dir(cwd);
        cmd
    }

    /// The path of a client tool (`psql`, `pgbench`): the one beside `pg_ctl`
    /// when present (same version, no wrapper script), else `/usr/bin/<name>`.
    pub fn client_path(&self, name: &str) -> PathBuf {
        let beside = self.dir.join(name);
        if beside.is_file() {
            beside
        } else {
            Path::new("/usr/bin").join(name)
        }
    }

    /// Hand `path` to the server user when we are root, so the server can write
    /// there. A no-op when we are unprivileged (we already own it).
    pub fn give_to_server_user(&self, path: &Path) -> Result<()> {
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .with_context(|| format!("chown postgres {}", path.display()))?;
        }
        Ok(())
    }
}

/// `PGMESH_PG_BIN`, else the real directory of `pg_ctl` on `PATH`, else the
/// newest `/usr/lib/postgresql/<major>/bin`.
fn find_bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(PG_BIN_ENV) {
        let dir = PathBuf::from(dir);
        if dir.join("pg_ctl").is_file() {
            return Ok(dir);
        }
        bail!("{PG_BIN_ENV}={} has no pg_ctl", dir.display());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for entry in std::env::split_paths(&path) {
            let pg_ctl = entry.join("pg_ctl");
            let Ok(real) = pg_ctl.canonicalize() else {
                continue;
            };
            // Debian puts pg_ctl symlinks on PATH; the real directory also holds
            // `postgres`, which pg_ctl needs beside itself.
            if let Some(dir) = real.parent() {
                if dir.join("initdb").is_file() && dir.join("postgres").is_file() {
                    return Ok(dir.to_path_buf());
                }
            }
        }
    }
    let mut best: Option<(u32, PathBuf)> = None;
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(major) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let bin = entry.path().join("bin");
            if bin.join("pg_ctl").is_file() && !matches!(best, Some((m, _)) if m >= major) {
                best = Some((major, bin));
            }
        }
    }
    best.map(|(_, dir)| dir).ok_or_else(|| {
        anyhow!("no PostgreSQL found: put pg_ctl on PATH, install /usr/lib/postgresql/<v>/bin, or set {PG_BIN_ENV}")
    })
}

fn current_euid() -> Result<u32> {
    let out = Command::new("id")
        .arg("-u")
        .output()
        .context("running id -u")?;
    parse_id(&out.stdout)
}

/// `id <flag> postgres`: the uid or gid of the server OS user.
fn id_of(flag: &str) -> Result<u32> {
    let out = Command::new("id")
        .args([flag, "postgres"])
        .output()
        .context("running id for the postgres user")?;
    if !out.status.success() {
        bail!("running as root but there is no `postgres` OS user to run the server as");
    }
    parse_id(&out.stdout)
}

fn parse_id(stdout: &[u8]) -> Result<u32> {
    let s = String::from_utf8_lossy(stdout);
    s.trim()
        .parse()
        .with_context(|| format!("unexpected id output {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_id_output() {
        assert_eq!(parse_id(b"101\n").unwrap(), 101);
        assert!(parse_id(b"nope").is_err());
    }
}
