//! In-process tests of peer links: a server on `127.0.0.1:0` over an in-memory log,
//! real clients, no PostgreSQL. Time-dependent tests run on tokio's paused clock, so
//! heartbeats and "nothing arrives" checks take no wall-clock time.
//!
//! Test code only; it never touches the network beyond loopback.

mod large;
mod pg;
mod stream;
mod tls;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{ClientConfig, LinkEvent, LinkServer, LogReader, ServeConfig};
use crate::log::floors::{FloorMap, Floors};
use crate::log::{LogError, Logged, Scan, ShipFilter};

pub(super) const MESH: &str = "test-mesh";

/// A change log in memory that counts reads.
#[derive(Debug, Default)]
pub(super) struct MemLog {
    rows: Mutex<Vec<Logged>>,
    reads: AtomicUsize,
    /// Region floors to advertise with the head (none: the log keeps no floors).
    floors: Mutex<Option<FloorMap>>,
}

impl MemLog {
    /// Appends one event and returns its seq.
    pub(super) fn push(&self, origin: &str, local_only: bool) -> i64 {
        self.push_with(origin, local_only, |_| {})
    }

    /// Appends one event that `shape` changes first; returns its seq.
    pub(super) fn push_with(
        &self,
        origin: &str,
        local_only: bool,
        shape: impl FnOnce(&mut crate::event::ChangeEvent),
    ) -> i64 {
        let mut rows = self.rows.lock().unwrap();
        let seq = rows.len() as i64 + 1;
        let mut event = event(origin, seq as u64, local_only);
        shape(&mut event);
        rows.push(Logged { seq, event });
        seq
    }

    /// Keeps `floors` as the region floors every peer may adopt.
    pub(super) fn set_floors(&self, floors: FloorMap) {
        *self.floors.lock().unwrap() = Some(floors);
    }

    pub(super) fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }
}

impl LogReader for MemLog {
    fn read_for(
        &self,
        after: i64,
        limit: i64,
        filter: &ShipFilter,
    ) -> BoxFuture<'_, Result<Scan, LogError>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let rows = self.rows.lock().unwrap();
        let read: Vec<&Logged> = rows
            .iter()
            .filter(|l| l.seq > after)
            .take(limit as usize)
            .collect();
        let scan = Scan {
            drained: (read.len() as i64) < limit,
            upto: read.last().map(|l| l.seq),
            events: read
                .into_iter()
                .filter(|l| filter.ships(&l.event))
                .cloned()
                .collect(),
        };
        Box::pin(async move { Ok(scan) })
    }

    fn head(&self) -> BoxFuture<'_, Result<i64, LogError>> {
        let head = self.rows.lock().unwrap().last().map_or(0, |l| l.seq);
        Box::pin(async move { Ok(head) })
    }

    fn floors<'a>(
        &'a self,
        _filter: &'a ShipFilter,
    ) -> BoxFuture<'a, Result<Option<Floors>, LogError>> {
        let head = self.rows.lock().unwrap().last().map_or(0, |l| l.seq);
        let floors = self.floors.lock().unwrap().clone();
        Box::pin(std::future::ready(Ok(
            floors.map(|floors| Floors { head, floors })
        )))
    }
}

pub(super) use crate::scratch::event;

/// A running server over a [`MemLog`].
pub(super) struct Harness {
    pub addr: std::net::SocketAddr,
    pub log: Arc<MemLog>,
    wake: watch::Sender<u64>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Harness {
    /// Serves region "eu" (node "eu-1"); `tune` adjusts the config.
    pub(super) async fn start(
        tune: impl FnOnce(&mut ServeConfig),
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Harness {
        let mut cfg = ServeConfig::new("127.0.0.1:0".parse().unwrap(), MESH, "eu", "eu-1");
        tune(&mut cfg);
        let log = Arc::new(MemLog::default());
        let (wake, rx) = watch::channel(0);
        let shutdown = CancellationToken::new();
        let (addr, task) = LinkServer::start(cfg, log.clone(), rx, tls, shutdown.clone())
            .await
            .unwrap();
        Harness {
            addr,
            log,
            wake,
            shutdown,
            task,
        }
    }

    /// What the notifier does after an append.
    pub(super) fn notify(&self) {
        self.wake.send_modify(|n| *n += 1);
    }

    /// Shuts the server down and waits for every session to end.
    pub(super) async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server drains on shutdown")
            .unwrap();
    }

    pub(super) async fn raw(
        &self,
    ) -> tokio_util::codec::Framed<TcpStream, super::protocol::LinkCodec> {
        let sock = TcpStream::connect(self.addr).await.unwrap();
        tokio_util::codec::Framed::new(sock, super::protocol::LinkCodec::client())
    }
}

/// A client config for region `region` of the test mesh.
pub(super) fn client(region: &str) -> ClientConfig {
    ClientConfig::new(MESH, region, format!("{region}-1"))
}

/// Seqs of a batch's events, or panics on a heartbeat.
pub(super) fn seqs(ev: &LinkEvent) -> (Vec<i64>, i64) {
    match ev {
        LinkEvent::Batch { events, upto, .. } => (events.iter().map(|l| l.seq).collect(), *upto),
        LinkEvent::Heartbeat { head, .. } => {
            panic!("expected a batch, got a heartbeat at head {head}")
        }
    }
}

/// The next batch, skipping heartbeats.
pub(super) async fn next_batch(c: &mut super::LinkClient) -> LinkEvent {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), c.next())
            .await
            .expect("a batch in time")
            .unwrap();
        if matches!(ev, LinkEvent::Batch { .. }) {
            return ev;
        }
    }
}
