//! The peer side of a node: TLS for the peer server and the pull links, and the
//! links' supervisor, which runs them (and pruning) while this node leads its region.

use std::sync::Arc;
use std::time::Duration;

use pgmesh_replicator::capture::{Progress, Role};
use pgmesh_replicator::log::prune;
use pgmesh_replicator::pull::{self, LinkTarget, OnBatch, PullConfig, TargetTls};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Validated;
use crate::metrics::Metrics;

pub(super) fn peer_server_tls(v: &Validated) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    let t = &v.config.peer_tls;
    match (&t.cert, &t.key, &t.ca) {
        (Some(c), Some(k), Some(ca)) => Ok(Some(pgmesh_replicator::link::tls::server_config(
            c,
            k,
            Some(ca),
        )?)),
        _ => Ok(None),
    }
}

fn peer_client_tls(v: &Validated, peer_host: &str) -> anyhow::Result<Option<TargetTls>> {
    let t = &v.config.peer_tls;
    match (&t.cert, &t.key, &t.ca) {
        (Some(c), Some(k), Some(ca)) => Ok(Some((
            pgmesh_replicator::link::tls::client_config(ca, Some((c, k)))?,
            rustls::pki_types::ServerName::try_from(peer_host.to_string())?,
        ))),
        _ => Ok(None),
    }
}

/// Runs the pull links while this node is the region's leader.
pub(super) async fn supervise_links(
    v: Validated,
    url: String,
    mut role: watch::Receiver<Role>,
    progress: Progress,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let regions: Vec<String> = v.peers.iter().map(|p| p.name.clone()).collect();
    let on_batch: OnBatch = {
        let metrics = metrics.clone();
        Arc::new(
            move |peer: &str, out: &pgmesh_replicator::apply::BatchOutcome| {
                metrics.link(peer, |c| {
                    c.applied_events += out.applied as u64;
                    c.duplicate_events += out.duplicates as u64;
                    c.conflicts += out.conflicts as u64;
                    c.dead_letters += out.dead_letters as u64;
                    c.batches += 1;
                });
            },
        )
    };
    loop {
        while *role.borrow_and_update() != Role::Leader {
            tokio::select! {
                r = role.changed() => if r.is_err() { return },
                _ = stop.changed() => return,
            }
        }
        let (links_stop, links_rx) = watch::channel(false);
        let mut links = Vec::new();
        let signals = pull::LinkSignals::start(&url);
        for p in &v.peers {
            let targets = p
                .addrs
                .iter()
                .map(|addr| {
                    let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
                    // An IPv6 literal goes in brackets before the port, not in the name.
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    let tls = peer_client_tls(&v, host)?;
                    anyhow::Ok(LinkTarget {
                        addr: addr.clone(),
                        tls,
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>();
            let targets = match targets {
                Ok(t) => t,
                Err(e) => {
                    warn!(peer = %p.name, error = %e, "peer TLS setup failed; link not started");
                    continue;
                }
            };
            let cfg = PullConfig {
                url: url.clone(),
                mesh: v.config.mesh.clone(),
                region: v.config.region.clone(),
                node: v.config.node_name(),
                peer: p.name.clone(),
                targets,
                regions: regions.clone(),
                max_batch: 500,
                linger: Duration::from_millis(v.config.apply_linger_ms),
                relay: v.config.relay,
            };
            links.push(tokio::spawn(pull::run(
                cfg,
                Some(progress.clone()),
                on_batch.clone(),
                signals.subscribe(),
                links_rx.clone(),
            )));
        }
        if v.config.prune_interval_secs > 0 {
            links.push(tokio::spawn(prune::run(
                url.clone(),
                v.config.region.clone(),
                regions.clone(),
                Duration::from_secs(v.config.prune_interval_secs),
                Duration::from_secs(v.config.tombstone_retention_secs),
                links_rx.clone(),
            )));
        }
        info!(links = v.peers.len(), "leader: pull links started");
        let stopping = loop {
            tokio::select! {
                r = role.changed() => {
                    if r.is_err() || *role.borrow() != Role::Leader { break false; }
                }
                _ = stop.changed() => break true,
            }
        };
        let _ = links_stop.send(true);
        for l in links {
            let _ = l.await;
        }
        if stopping {
            return;
        }
    }
}
