//! The replication side of a node: starts capture next to the proxy and stops it.
//!
//! Capture runs only when the regional database has the `mesh` catalog (after
//! `pgmesh init`); a node in front of an uninitialised database is a plain proxy,
//! and says so once. This module owns task lifecycles, not replication logic.

use pgmesh_replicator::capture::{self, CaptureConfig, Progress, Role};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::Validated;

/// A running capture task.
#[derive(Debug)]
pub struct CaptureHandle {
    stop: watch::Sender<bool>,
    role: watch::Receiver<Role>,
    progress: Progress,
    task: JoinHandle<()>,
}

impl CaptureHandle {
    /// This node's current capture role.
    pub fn role(&self) -> Role {
        *self.role.borrow()
    }

    /// A receiver that follows role changes.
    pub fn watch_role(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }

    /// What capture has durably logged (for apply's capture-race protocol).
    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }

    /// Stops capture and waits for it.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// The URL capture uses: the upstream URL, with user `postgres` when none is given.
pub fn capture_url(v: &Validated) -> String {
    let u = &v.upstream;
    let user = u.user.clone().unwrap_or_else(|| "postgres".into());
    let auth = match &u.password {
        Some(p) => format!("{user}:{p}"),
        None => user,
    };
    let db = u.database.clone().unwrap_or_else(|| "postgres".into());
    format!("postgres://{auth}@{}/{db}", u.addr())
}

/// Starts capture if enabled and the catalog is installed.
pub async fn start_capture(v: &Validated) -> anyhow::Result<Option<CaptureHandle>> {
    if !v.config.capture {
        return Ok(None);
    }
    let url = capture_url(v);
    let client = match pgmesh_replicator::catalog::connect(&url).await {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot reach the regional database; running as a proxy only");
            return Ok(None);
        }
    };
    let installed: bool = client
        .query_one("SELECT to_regclass('mesh.changelog') IS NOT NULL", &[])
        .await?
        .get(0);
    if !installed {
        info!("mesh catalog not installed; running as a proxy only (run `pgmesh init` to enable capture)");
        return Ok(None);
    }
    pgmesh_replicator::catalog::validate_region(&v.config.region)?;
    let cfg = CaptureConfig::new(&url, &v.config.region, &v.config.node_name());
    Ok(Some(spawn(cfg)))
}

/// Spawns the capture loop.
pub fn spawn(cfg: CaptureConfig) -> CaptureHandle {
    let (stop, stop_rx) = watch::channel(false);
    let (role_tx, role) = watch::channel(Role::Starting);
    let (progress_tx, progress) = capture::progress_channel();
    let task = tokio::spawn(capture::run(cfg, role_tx, progress_tx, stop_rx));
    CaptureHandle {
        stop,
        role,
        progress,
        task,
    }
}
