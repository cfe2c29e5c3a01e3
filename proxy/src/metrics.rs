//! Prometheus metrics of a node, and the tiny HTTP endpoint that serves them.
//!
//! Every metric is registered here, with its unit in its name. Counters live in
//! memory; replication lag and the change log's retention (its head, how far it was
//! pruned, what each peer has durably applied) are read from the database at scrape
//! time, so they are true even when a link is stuck. The endpoint answers
//! `GET /metrics` and nothing else; it never blocks the data path.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use pgmesh_replicator::log::tail::Tail;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, warn};

/// Counters of one link (source region → this region).
#[derive(Debug, Default, Clone, Copy)]
pub struct LinkCounters {
    pub applied_events: u64,
    pub duplicate_events: u64,
    pub conflicts: u64,
    pub dead_letters: u64,
    pub batches: u64,
}

/// What a scrape reads from the regional database.
#[derive(Debug, Default, Clone)]
pub struct DbStats {
    /// (source, seconds) per link.
    pub lag: Vec<(String, f64)>,
    /// The change log's highest seq, and how far it was pruned.
    pub log: Option<(i64, i64)>,
    /// (peer, seq) each region pulling from this one has durably applied.
    pub peer_durable: Vec<(String, i64)>,
    /// Tombstones pruned so far, and the last pass's frontier as Unix seconds (0:
    /// held back; None: no pass or no other region).
    pub tombstones: Option<(i64, Option<f64>)>,
}

/// A counter series: name, help text, and how to read it from a link.
type Series = (&'static str, &'static str, fn(&LinkCounters) -> u64);

/// All metrics of a node.
#[derive(Debug, Default)]
pub struct Metrics {
    region: String,
    sessions: Arc<AtomicI64>,
    links: Mutex<BTreeMap<String, LinkCounters>>,
    /// The in-memory tail of the change log peers are served from, when serving.
    tail: Mutex<Option<Arc<Tail>>>,
}

impl Metrics {
    pub fn new(region: &str) -> Arc<Self> {
        Arc::new(Self {
            region: region.to_string(),
            ..Self::default()
        })
    }

    /// Open proxy sessions changed by `delta`.
    pub fn sessions_add(&self, delta: i64) {
        self.sessions.fetch_add(delta, Ordering::Relaxed);
    }

    /// The open-sessions counter, for the proxy server to keep up to date.
    pub fn session_counter(&self) -> Arc<AtomicI64> {
        self.sessions.clone()
    }

    /// Reports peer reads of the change log from `tail`.
    pub fn watch_tail(&self, tail: Arc<Tail>) {
        *self.tail.lock().unwrap_or_else(|e| e.into_inner()) = Some(tail);
    }

    /// Adds to a link's counters.
    pub fn link(&self, source: &str, f: impl FnOnce(&mut LinkCounters)) {
        let mut m = self.links.lock().unwrap_or_else(|e| e.into_inner());
        f(m.entry(source.to_string()).or_default());
    }

    /// A snapshot of a link's counters.
    pub fn link_counters(&self, source: &str) -> LinkCounters {
        let m = self.links.lock().unwrap_or_else(|e| e.into_inner());
        m.get(source).copied().unwrap_or_default()
    }

    /// Prometheus text exposition, with what the scrape read from the database.
    pub fn render(&self, db: &DbStats) -> String {
        let target = &self.region;
        let mut out = String::new();
        let _ = writeln!(out, "# HELP pgmesh_replication_lag_seconds Age of the oldest change not yet applied from source (0 when caught up); while the link is down, at least the time since source was last heard from.");
        let _ = writeln!(out, "# TYPE pgmesh_replication_lag_seconds gauge");
        for (source, secs) in &db.lag {
            let _ = writeln!(
                out,
                "pgmesh_replication_lag_seconds{{source=\"{source}\",target=\"{target}\"}} {secs}"
            );
        }
        let links = self.links.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let series: [Series; 5] = [
            (
                "pgmesh_applied_events_total",
                "Remote events applied.",
                |c| c.applied_events,
            ),
            (
                "pgmesh_duplicate_events_total",
                "Remote events received again and skipped.",
                |c| c.duplicate_events,
            ),
            (
                "pgmesh_conflicts_total",
                "Conflicts resolved and recorded in mesh.conflicts.",
                |c| c.conflicts,
            ),
            (
                "pgmesh_dead_letters_total",
                "Events sent to mesh.dead_letters.",
                |c| c.dead_letters,
            ),
            (
                "pgmesh_apply_batches_total",
                "Apply transactions committed.",
                |c| c.batches,
            ),
        ];
        for (name, help, get) in series {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            for (source, c) in &links {
                let _ = writeln!(
                    out,
                    "{name}{{source=\"{source}\",target=\"{target}\"}} {}",
                    get(c)
                );
            }
        }
        let tail = self.tail.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(tail) = tail {
            let (memory, table) = tail.reads();
            let _ = writeln!(out, "# HELP pgmesh_log_reads_total Reads of the change log for peers, served from memory (what was just logged) or from the table.");
            let _ = writeln!(out, "# TYPE pgmesh_log_reads_total counter");
            for (source, n) in [("memory", memory), ("table", table)] {
                let _ = writeln!(
                    out,
                    "pgmesh_log_reads_total{{region=\"{target}\",source=\"{source}\"}} {n}"
                );
            }
        }
        if let Some((head, pruned)) = db.log {
            for (name, help, v) in [
                (
                    "pgmesh_changelog_head_seq",
                    "Highest sequence number in this region's change log.",
                    head,
                ),
                (
                    "pgmesh_changelog_pruned_seq",
                    "Sequence numbers up to this were pruned from this region's change log.",
                    pruned,
                ),
            ] {
                let _ = writeln!(out, "# HELP {name} {help}");
                let _ = writeln!(out, "# TYPE {name} gauge");
                let _ = writeln!(out, "{name}{{region=\"{target}\"}} {v}");
            }
            let _ = writeln!(out, "# HELP pgmesh_peer_durable_seq What a region pulling from this one has durably applied of its change log; pruning waits for the lowest.");
            let _ = writeln!(out, "# TYPE pgmesh_peer_durable_seq gauge");
            for (peer, seq) in &db.peer_durable {
                let _ = writeln!(
                    out,
                    "pgmesh_peer_durable_seq{{region=\"{target}\",peer=\"{peer}\"}} {seq}"
                );
            }
        }
        if let Some((pruned, frontier)) = db.tombstones {
            let _ = writeln!(out, "# HELP pgmesh_tombstones_pruned_total Tombstones (versions of deleted rows) pruned below the frontier.");
            let _ = writeln!(out, "# TYPE pgmesh_tombstones_pruned_total counter");
            let _ = writeln!(
                out,
                "pgmesh_tombstones_pruned_total{{region=\"{target}\"}} {pruned}"
            );
            if let Some(secs) = frontier {
                let _ = writeln!(out, "# HELP pgmesh_tombstone_frontier_seconds The tombstone frontier as Unix time: no change older can still arrive here; 0 while a region holds it back.");
                let _ = writeln!(out, "# TYPE pgmesh_tombstone_frontier_seconds gauge");
                let _ = writeln!(
                    out,
                    "pgmesh_tombstone_frontier_seconds{{region=\"{target}\"}} {secs}"
                );
            }
        }
        let _ = writeln!(out, "# HELP pgmesh_proxy_sessions Open client sessions.");
        let _ = writeln!(out, "# TYPE pgmesh_proxy_sessions gauge");
        let _ = writeln!(
            out,
            "pgmesh_proxy_sessions{{region=\"{target}\"}} {}",
            self.sessions.load(Ordering::Relaxed)
        );
        out
    }
}

/// Reads per-link lag from `mesh.links` and the change log's retention; what cannot
/// be read is left out.
async fn read_db(url: &str) -> DbStats {
    let mut out = DbStats::default();
    let Ok(c) = pgmesh_replicator::catalog::connect(url).await else {
        return out;
    };
    // A node waiting for `pgmesh init` reads nothing yet (and fills no server log
    // with errors about missing relations).
    let installed = c
        .query_one("SELECT to_regclass('mesh.log_prune') IS NOT NULL", &[])
        .await;
    if !installed.is_ok_and(|r| r.get::<_, bool>(0)) {
        return out;
    }
    if let Ok(rows) = c.query("SELECT name, lag_ms FROM mesh.links", &[]).await {
        out.lag = rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as f64 / 1000.0))
            .collect();
    }
    let log = "SELECT (SELECT coalesce(max(seq), 0) FROM mesh.changelog)::int8,
                      (SELECT pruned_upto FROM mesh.log_prune)::int8,
                      (SELECT tombstones_pruned FROM mesh.log_prune)::int8,
                      (SELECT (tombstone_frontier >> 16) / 1000.0 FROM mesh.log_prune)::float8";
    if let Ok(r) = c.query_one(log, &[]).await {
        out.log = Some((r.get(0), r.get::<_, Option<i64>>(1).unwrap_or(0)));
        out.tombstones = Some((r.get::<_, Option<i64>>(2).unwrap_or(0), r.get(3)));
    }
    let acks = "SELECT peer, durable_seq FROM mesh.peer_acks ORDER BY peer";
    if let Ok(rows) = c.query(acks, &[]).await {
        out.peer_durable = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    }
    out
}

/// Serves `GET /metrics` on `addr` until shutdown. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    db_url: Option<String>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (mut sock, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => { warn!(error = %e, "metrics accept failed"); continue; }
                },
                _ = shutdown.changed() => return,
            };
            let metrics = metrics.clone();
            let db_url = db_url.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                let n = match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    sock.read(&mut buf),
                )
                .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let req = String::from_utf8_lossy(&buf[..n]);
                let (status, body) =
                    if req.starts_with("GET /metrics ") || req.starts_with("GET /metrics?") {
                        let db = match &db_url {
                            Some(u) => read_db(u).await,
                            None => DbStats::default(),
                        };
                        ("200 OK", metrics.render(&db))
                    } else {
                        ("404 Not Found", "not found\n".to_string())
                    };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                if let Err(e) = sock.write_all(resp.as_bytes()).await {
                    debug!(peer = %peer, error = %e, "metrics client left");
                }
            });
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_units_and_labels() {
        let m = Metrics::new("eu");
        m.link("us", |c| {
            c.applied_events += 3;
            c.conflicts += 1;
        });
        m.sessions_add(2);
        let text = m.render(&DbStats {
            lag: vec![("us".into(), 0.25)],
            log: Some((120, 100)),
            peer_durable: vec![("us".into(), 110)],
            tombstones: Some((7, Some(1_795_000_000.5))),
        });
        assert!(text.contains("pgmesh_replication_lag_seconds{source=\"us\",target=\"eu\"} 0.25"));
        assert!(text.contains("pgmesh_applied_events_total{source=\"us\",target=\"eu\"} 3"));
        assert!(text.contains("pgmesh_conflicts_total{source=\"us\",target=\"eu\"} 1"));
        assert!(text.contains("pgmesh_dead_letters_total{source=\"us\",target=\"eu\"} 0"));
        assert!(text.contains("pgmesh_proxy_sessions{region=\"eu\"} 2"));
        assert!(text.contains("pgmesh_changelog_head_seq{region=\"eu\"} 120"));
        assert!(text.contains("pgmesh_changelog_pruned_seq{region=\"eu\"} 100"));
        assert!(text.contains("pgmesh_peer_durable_seq{region=\"eu\",peer=\"us\"} 110"));
        assert!(text.contains("pgmesh_tombstones_pruned_total{region=\"eu\"} 7"));
        assert!(text.contains("pgmesh_tombstone_frontier_seconds{region=\"eu\"} 1795000000.5"));
    }
}
