//! Smoke test of `pgmesh demo`: start it, write in region 1, read in region 3,
//! stop it with Ctrl-C, and check that nothing is left behind and that its output
//! is the demo's own (no node info logs, no link warnings while it stops).
//!
//! The demo binds fixed ports from `--base-port` (region i uses base+10i ..
//! base+10i+3), so the test probes for a base whose twelve ports are free, below
//! the ephemeral range other tests draw from. If the test fails half-way, the
//! guard interrupts the demo and, should it not clean up, stops its clusters
//! with `pg_ctl` and removes its directory itself. This module owns that.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pgmesh_tests::{connect, pgmesh_bin, wait_for, wait_until, wait_until_blocking, PgBin};
use rand::Rng;

const REGIONS: u16 = 3;

/// A base port whose demo ports (`base + 10i + 0..4`) are all free now.
fn free_base() -> Result<u16> {
    let mut rng = rand::thread_rng();
    for _ in 0..100 {
        let base: u16 = rng.gen_range(20_000..30_000);
        let all_free = (0..REGIONS)
            .flat_map(|i| (0..4).map(move |k| base + 10 * i + k))
            .all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok());
        if all_free {
            return Ok(base);
        }
    }
    bail!("no free base port for the demo")
}

/// A running `pgmesh demo`, its output, and the directory it works in.
struct Demo {
    child: Child,
    out: Arc<Mutex<Vec<String>>>,
    root: PathBuf,
}

impl Demo {
    fn spawn(base: u16) -> Result<Demo> {
        let mut child = Command::new(pgmesh_bin()?)
            .args([
                "demo",
                "--regions",
                &REGIONS.to_string(),
                "--base-port",
                &base.to_string(),
            ])
            .env("NO_COLOR", "1")
            .env_remove("PGMESH_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running pgmesh demo")?;
        let out = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().expect("piped")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("piped")),
        ] {
            let sink = out.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            });
        }
        // The demo names its directory after its pid.
        let root = std::env::temp_dir().join(format!("pgmesh-demo-{}", child.id()));
        Ok(Demo { child, out, root })
    }

    fn output(&self) -> String {
        self.out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    fn signal(&self, sig: &str) -> Result<()> {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()?
            .success();
        if !ok {
            bail!("kill -{sig} failed");
        }
        Ok(())
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.signal("INT");
            let exited = wait_until_blocking(Duration::from_secs(60), "the demo to exit", || {
                matches!(self.child.try_wait(), Ok(Some(_)))
            });
            if exited.is_err() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        if self.root.exists() {
            eprintln!("the demo left {} behind; cleaning up", self.root.display());
            stop_clusters_under(&self.root);
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// `pg_ctl stop -m immediate` for every `<region>/data` under `root`.
fn stop_clusters_under(root: &Path) {
    let (Ok(bin), Ok(entries)) = (PgBin::get(), std::fs::read_dir(root)) else {
        return;
    };
    for e in entries.flatten() {
        let data = e.path().join("data");
        if data.join("postmaster.pid").exists() {
            let _ = bin
                .server_command("pg_ctl", root)
                .arg("-D")
                .arg(&data)
                .args(["-m", "immediate", "-w", "stop"])
                .output();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_replicates_and_leaves_nothing_behind() -> Result<()> {
    pgmesh_tests::init_tracing();
    let base = free_base()?;
    let mut demo = Demo::spawn(base)?;
    let child = &mut demo.child;
    let out = demo.out.clone();
    wait_for(
        Duration::from_secs(180),
        "the demo to say it is running",
        || {
            let text = out.lock().unwrap_or_else(|e| e.into_inner()).join("\n");
            let state = match child.try_wait() {
                Ok(Some(status)) => Err(anyhow::anyhow!("the demo exited with {status}:\n{text}")),
                _ => Ok(text.contains("Press Ctrl-C").then_some(())),
            };
            async move { state }
        },
    )
    .await?;
    let printed = demo.output();
    for i in 0..REGIONS {
        let port = base + 10 * i + 1;
        assert!(
            printed.contains(&format!("psql \"host=127.0.0.1 port={port} ")),
            "no psql string for region {i}:\n{printed}"
        );
    }

    let conn = |port: u16| format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let first = connect(&conn(base + 1)).await?;
    first
        .execute(
            "INSERT INTO accounts (id, owner, balance) VALUES (4242, 'smoke test', 1)",
            &[],
        )
        .await?;
    let third = connect(&conn(base + 21)).await?;
    wait_until(
        Duration::from_secs(60),
        "the row to reach region 3",
        || async {
            third
                .query_opt(
                    "SELECT 1 FROM accounts WHERE id = 4242 AND owner = 'smoke test'",
                    &[],
                )
                .await
                .ok()
                .flatten()
                .is_some()
        },
    )
    .await?;
    drop((first, third));

    demo.signal("INT")?;
    let child = &mut demo.child;
    let status = wait_for(Duration::from_secs(90), "the demo to exit", || {
        let s = child.try_wait().map_err(anyhow::Error::from);
        async move { s }
    })
    .await?;
    let printed = demo.output();
    assert!(
        status.success(),
        "the demo exited with {status}:\n{printed}"
    );
    let removed = printed
        .lines()
        .find_map(|l| l.strip_prefix("removed "))
        .with_context(|| format!("no `removed <dir>` line:\n{printed}"))?;
    assert_eq!(Path::new(removed), demo.root);
    // The narrative stands alone: node logs default to `warn` for the demo, and
    // stopping the mesh makes no link warn that its peer went away.
    assert!(
        !printed.lines().any(|l| l.contains(" INFO ")),
        "node info logs in the demo's output:\n{printed}"
    );
    let (_, stopping) = printed
        .split_once("stopping nodes and clusters")
        .with_context(|| format!("no `stopping nodes and clusters` line:\n{printed}"))?;
    assert!(
        !stopping.contains("link session ended"),
        "a link warned while the demo stopped:\n{printed}"
    );
    assert!(!demo.root.exists(), "{removed} still exists");
    wait_until(
        Duration::from_secs(30),
        "the demo's postgres processes to exit",
        || async {
            let found = Command::new("pgrep").args(["-f", removed]).output();
            matches!(found, Ok(o) if o.status.code() == Some(1))
        },
    )
    .await?;
    Ok(())
}
