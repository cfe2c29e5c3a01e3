//! The once-per-process `initdb` template and the reaping of dead runs' leftovers.
//!
//! `initdb` costs most of a cluster's start time, so the first cluster of a test
//! process runs it once into a template directory and every cluster after that
//! copies the template (`cp -a`, which keeps the `postgres` ownership). The
//! template's `postgresql.conf` includes `pgmesh.conf`, which each cluster writes
//! for itself. Because statics are never dropped, the template outlives the
//! process; so do the directories (and postmasters) of a test process killed by a
//! timeout. Before making its template, each process therefore reaps the
//! `pgmesh-*` directories whose owning test process is gone. This module must
//! never touch a directory whose owner pid is still running.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};

use super::binaries::PgBin;
use super::process;

/// Name prefix of a cluster's temp directory: `pgmesh-pg-<owner pid>-<random>`.
pub const CLUSTER_PREFIX: &str = "pgmesh-pg-";
/// Name prefix of a process's template directory.
const TEMPLATE_PREFIX: &str = "pgmesh-tpl-";
/// The per-cluster settings file the template's `postgresql.conf` includes.
pub const SETTINGS_FILE: &str = "pgmesh.conf";

/// Where temp directories go. Under root the server user must be able to
/// traverse every parent, so use `/tmp` rather than a possibly private `$TMPDIR`.
pub fn temp_base(bin: &PgBin) -> PathBuf {
    if bin.drops_privileges() {
        PathBuf::from("/tmp")
    } else {
        std::env::temp_dir()
    }
}

/// The template data directory, made on first use.
pub fn template_data_dir() -> Result<&'static Path> {
    static TEMPLATE: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    TEMPLATE
        .get_or_init(|| make_template().map_err(|e| format!("{e:#}")))
        .as_deref()
        .map_err(|e| anyhow!("making the initdb template: {e}"))
}

fn make_template() -> Result<PathBuf> {
    let bin = PgBin::get()?;
    let base = temp_base(bin);
    reap_orphans(&base);
    let root = tempfile::Builder::new()
        .prefix(&format!("{TEMPLATE_PREFIX}{}-", std::process::id()))
        .tempdir_in(&base)
        .with_context(|| format!("creating a template dir in {}", base.display()))?
        .keep();
    bin.give_to_server_user(&root)?;
    let data = root.join("data");
    let out = bin
        .server_command("initdb", &root)
        .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
        .args(["--locale=C", "--no-instructions", "-D"])
        .arg(&data)
        .stdin(Stdio::null())
        .output()
        .context("running initdb")?;
    if !out.status.success() {
        bail!(
            "initdb failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let conf = data.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).context("reading postgresql.conf")?;
    text.push_str(&format!("\ninclude_if_exists = '{SETTINGS_FILE}'\n"));
    std::fs::write(&conf, text).context("writing postgresql.conf")?;
    Ok(data)
}

/// Remove `pgmesh-*` temp directories whose owning test process has exited,
/// killing any postmaster still running in them. Best effort: errors are ignored
/// because a leftover from a past run must not fail this one.
fn reap_orphans(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(owner) = owner_pid(name) else {
            continue;
        };
        if process::is_running(owner) {
            continue;
        }
        let data = entry.path().join("data");
        if let Some(pid) = process::postmaster_pid(&data) {
            if process::is_postgres(pid) {
                process::signal(pid, "KILL", true);
            }
        }
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

/// The owner pid in a `pgmesh-pg-<pid>-…` or `pgmesh-tpl-<pid>-…` name.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name
        .strip_prefix(CLUSTER_PREFIX)
        .or_else(|| name.strip_prefix(TEMPLATE_PREFIX))?;
    rest.split('-').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_owner_pid() {
        assert_eq!(owner_pid("pgmesh-pg-123-abcd"), Some(123));
        assert_eq!(owner_pid("pgmesh-tpl-9-x"), Some(9));
        assert_eq!(owner_pid("pgmesh-pg-x-1"), None);
        assert_eq!(owner_pid("other-123-x"), None);
    }
}
