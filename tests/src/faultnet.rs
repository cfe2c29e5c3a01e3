//! The network between two nodes, with faults on demand: a loopback TCP forwarder
//! whose connections a test can cut (reset, both sides at once) or stall (no byte
//! moves either way, the connections stay open, as in a partition without resets).
//!
//! It forwards every accepted connection to one target and never looks at the
//! bytes. Dropping it stops accepting and closes every connection.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Faults in force: `cuts` counts resets so far, `stalled` holds all traffic.
#[derive(Debug, Clone, Copy, Default)]
struct Faults {
    cuts: u64,
    stalled: bool,
}

/// A forwarder from its own loopback port to `target`.
#[derive(Debug)]
pub struct Forwarder {
    addr: SocketAddr,
    faults: Arc<watch::Sender<Faults>>,
    task: JoinHandle<()>,
}

impl Forwarder {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> Result<Forwarder> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let faults = Arc::new(watch::Sender::new(Faults::default()));
        let f = faults.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(forward(client, target, f.subscribe()));
            }
        });
        Ok(Forwarder { addr, faults, task })
    }

    /// Where to connect to reach the target through the forwarder.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Resets every open connection, both ways. New connections work.
    pub fn cut(&self) {
        self.faults.send_modify(|f| f.cuts += 1);
    }

    /// Stops (`true`) or resumes moving bytes on every connection, open or new.
    pub fn stall(&self, on: bool) {
        self.faults.send_modify(|f| f.stalled = on);
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
        // Every connection ends at the next fault check.
        self.faults.send_modify(|f| f.cuts += 1);
    }
}

async fn forward(client: TcpStream, target: SocketAddr, faults: watch::Receiver<Faults>) {
    let cuts = faults.borrow().cuts;
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, faults.clone(), cuts);
    let down = pump(sr, cw, faults, cuts);
    // Whichever way ends first (EOF, error or cut) ends the connection: the halves
    // are dropped together.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// Copies `from` to `to` while no cut past `cuts` happened, holding while stalled.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut faults: watch::Receiver<Faults>,
    cuts: u64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let now = *faults.borrow_and_update();
        if now.cuts != cuts {
            // Reset, not a graceful close: linger 0 on both sockets.
            let _ = to.as_ref().set_zero_linger();
            let _ = from.as_ref().set_zero_linger();
            return;
        }
        if now.stalled {
            if faults.changed().await.is_err() {
                return;
            }
            continue;
        }
        tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
            c = faults.changed() => if c.is_err() { return },
        }
    }
}
