//! One pulling peer, served: handshake, then batches under a credit window.
//!
//! The session validates the [`Hello`] (under mutual TLS, the peer's certificate must
//! name the region it claims: named after the region, or a node's bound to it with
//! `pgmesh certs --nodes NODE@REGION`), answers [`Welcome`] with the log head, then
//! reads the log after the peer's checkpoint and sends what the peer may see (see
//! [`ShipFilter`]). At most `window` batches are unacknowledged; with no credit left it
//! waits for an ack. Once caught up it waits for the wake watch (the change log's
//! NOTIFY) or the heartbeat timer, whichever comes first; each heartbeat also checks the
//! log head, which catches a notification lost while the notifier reconnected.
//!
//! It never busy-loops or polls the log on a timer of its own, never sends an event the
//! peer originated or one marked local-only, and never sends past the peer's credit.

use std::collections::VecDeque;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::codec::Framed;
use tracing::{debug, info, warn};

use super::protocol::{self, ClientMsg, Hello, ServerMsg, Welcome, PROTO_VERSION};
use super::server::{LinkServer, ServeError};
use crate::log::floors::Floors;
use crate::log::{Logged, ShipFilter};

pub(super) struct Session<'a, S> {
    server: &'a LinkServer,
    framed: Framed<S, protocol::LinkCodec>,
    wake: watch::Receiver<u64>,
    /// The certificate the peer presented (mutual TLS), already verified against
    /// the mesh CA: it must name the region or the node the peer claims.
    identity: Option<CertificateDer<'static>>,
}

/// Where the stream stands.
struct Flow {
    /// What this peer may receive.
    filter: ShipFilter,
    max_batch: i64,
    window: usize,
    /// Highest seq sent (the `upto` of the last batch).
    cursor: i64,
    /// A durable position the peer just reported, to record.
    durable: Option<i64>,
    head: i64,
    /// `upto` of each unacknowledged batch, oldest first.
    in_flight: VecDeque<i64>,
    /// Since when the peer owes an answer: its last frame, or the batch that made
    /// `in_flight` non-empty, whichever is later.
    heard: Instant,
    /// The last read found nothing after `cursor`.
    caught_up: bool,
    /// The wake watch still has a sender.
    wake_open: bool,
    next_beat: Instant,
    /// When to read the floors to advertise next.
    floors_due: Instant,
    /// Floors read and not yet sent: they go out once `cursor` reaches their head.
    floors: Option<Floors>,
}

impl<'a, S: AsyncRead + AsyncWrite + Unpin> Session<'a, S> {
    pub(super) fn new(
        server: &'a LinkServer,
        io: S,
        identity: Option<CertificateDer<'static>>,
    ) -> Self {
        Self {
            server,
            framed: Framed::new(io, protocol::LinkCodec::server()),
            wake: server.wake.clone(),
            identity,
        }
    }

    /// Serves the peer until it disconnects or something fails. `deadline` bounds the
    /// handshake.
    pub(super) async fn run(mut self, deadline: Instant) -> Result<(), ServeError> {
        let first = tokio::time::timeout_at(deadline, self.framed.next())
            .await
            .map_err(|_| ServeError::HandshakeTimeout)?;
        let frame = match first {
            None => return Ok(()),
            Some(r) => r?,
        };
        let hello = match protocol::parse_hello(&frame).and_then(|h| self.check(h)) {
            Ok(h) => h,
            Err(reason) => return self.refuse(reason).await,
        };
        let span = tracing::Span::current();
        span.record("region", hello.region.as_str());
        span.record("node", hello.node.as_str());

        let cfg = &self.server.cfg;
        let conflict = self
            .server
            .log
            .relay_conflict(&cfg.region, &cfg.node, cfg.relay);
        if let Some(reason) = conflict.await? {
            warn!(%reason, "refusing a peer: the region's nodes disagree on --relay");
            return self.refuse(reason).await;
        }
        let head = self.server.log.head().await?;
        if hello.after > head {
            let reason = format!(
                "checkpoint {} is ahead of this log's head {head}; was the change log reset?",
                hello.after
            );
            return self.refuse(reason).await;
        }
        let pruned = self.server.log.open_for(&hello.region, hello.after).await?;
        if hello.after < pruned {
            let reason = format!(
                "this log was pruned up to seq {pruned}, past checkpoint {}: the events \
                 between are gone (this region is new, was forgotten with \
                 mesh.forget_peer, or was restored from a backup); it cannot catch up \
                 from this log",
                hello.after
            );
            return self.refuse(reason).await;
        }
        let cfg = &self.server.cfg;
        self.send(&ServerMsg::Welcome(Welcome {
            proto: PROTO_VERSION,
            region: cfg.region.clone(),
            node: cfg.node.clone(),
            head,
            regions: cfg.regions(),
        }))
        .await?;
        info!(after = hello.after, head, "peer link open");

        let mut flow = Flow {
            max_batch: i64::from(hello.max_batch.min(cfg.max_batch_cap.max(1))),
            window: hello.window.min(cfg.max_window_cap.max(1)) as usize,
            filter: ShipFilter {
                server_region: cfg.region.clone(),
                relay: cfg.relay,
                peer_region: hello.region,
            },
            cursor: hello.after,
            durable: None,
            head,
            in_flight: VecDeque::new(),
            heard: Instant::now(),
            caught_up: false,
            wake_open: true,
            next_beat: Instant::now() + cfg.heartbeat(),
            floors_due: Instant::now(),
            floors: None,
        };
        self.stream(&mut flow).await
    }

    /// Validates a hello; `Err` is the reason sent back.
    fn check(&self, h: Hello) -> Result<Hello, String> {
        let cfg = &self.server.cfg;
        if h.mesh != cfg.mesh {
            return Err(format!(
                "mesh {:?} does not match this server's mesh {:?}",
                h.mesh, cfg.mesh
            ));
        }
        if h.region.is_empty() || h.node.is_empty() {
            return Err("hello must name the pulling region and node".into());
        }
        // Only a real region name: certificates also name hosts (`localhost`, IP
        // addresses, DNS names with dots), which no region can be called.
        if crate::catalog::validate_region(&h.region).is_err() {
            return Err(format!("{:?} is not a region name", h.region));
        }
        if h.region == cfg.region {
            return Err(format!(
                "peer claims this server's own region {:?}",
                cfg.region
            ));
        }
        if h.max_batch == 0 || h.window == 0 {
            return Err("max_batch and window must be at least 1".into());
        }
        if let Some(cert) = &self.identity {
            if !names(cert, &h.region) {
                return Err(format!(
                    "the peer's certificate does not name its region {:?} (node {:?}): issue it \
                     for the region, or bind the node to it with `pgmesh certs --nodes {}@{}`",
                    h.region, h.node, h.node, h.region
                ));
            }
        }
        Ok(h)
    }

    async fn refuse(&mut self, reason: String) -> Result<(), ServeError> {
        // Best effort: the peer may already be gone, and the refusal is what matters.
        let _ = self
            .send(&ServerMsg::Refused {
                reason: reason.clone(),
            })
            .await;
        Err(ServeError::Refused(reason))
    }

    async fn send(&mut self, msg: &ServerMsg) -> Result<(), ServeError> {
        let bytes = protocol::encode_server(msg).map_err(ServeError::Encode)?;
        self.send_bytes(bytes).await
    }

    /// Writes one frame; a write blocked for the peer timeout ends the session.
    /// Queues a frame and writes it out. The peer has the peer timeout to take each
    /// part of it, not the whole: a frame may be up to 1 GiB.
    async fn send_bytes(&mut self, bytes: Bytes) -> Result<(), ServeError> {
        let limit = self.server.cfg.peer_timeout();
        match tokio::time::timeout(limit, self.framed.feed(bytes)).await {
            Ok(r) => r?,
            Err(_) => return Err(ServeError::Stalled(limit)),
        }
        let mut left = self.framed.write_buffer().len();
        loop {
            match tokio::time::timeout(limit, self.framed.flush()).await {
                Ok(r) => return Ok(r?),
                // Flushing is cancel-safe: what is not written stays in the buffer.
                Err(_) if self.framed.write_buffer().len() < left => {
                    left = self.framed.write_buffer().len();
                }
                Err(_) => return Err(ServeError::Stalled(limit)),
            }
        }
    }

    async fn stream(&mut self, f: &mut Flow) -> Result<(), ServeError> {
        let heartbeat = self.server.cfg.heartbeat();
        let limit = self.server.cfg.peer_timeout();
        loop {
            // Floors are read now and then, busy or not, and go out once everything
            // below them has been sent.
            if f.floors.is_none() && Instant::now() >= f.floors_due {
                f.floors_due = Instant::now() + heartbeat;
                if let Some(p) = self.server.log.floors(&f.filter).await? {
                    f.head = f.head.max(p.head);
                    if p.head > f.cursor {
                        f.caught_up = false;
                    }
                    f.floors = (!p.floors.is_empty()).then_some(p);
                }
            }
            if let Some(p) = f.floors.take_if(|p| p.head <= f.cursor) {
                let head = f.head.max(p.head);
                let beat = ServerMsg::Heartbeat {
                    head,
                    now_ms: now_ms(),
                    floors: Some(p.floors),
                };
                self.send(&beat).await?;
                f.next_beat = Instant::now() + heartbeat;
            }
            if !f.caught_up && f.in_flight.len() < f.window {
                self.send_next_batch(f).await?;
                continue;
            }
            let can_wake = f.caught_up && f.wake_open && f.in_flight.len() < f.window;
            tokio::select! {
                frame = self.framed.next() => match frame {
                    None => return Ok(()),
                    Some(r) => {
                        f.heard = Instant::now();
                        self.on_frame(f, &r?)?;
                        if let Some(seq) = f.durable.take() {
                            let peer = &f.filter.peer_region;
                            self.server.log.record_durable(peer, seq).await?;
                        }
                    }
                },
                changed = self.wake.changed(), if can_wake => match changed {
                    Ok(()) => f.caught_up = false,
                    Err(_) => {
                        // The notifier is gone; heartbeats still check the head.
                        debug!("log wake-up channel closed");
                        f.wake_open = false;
                    }
                },
                // Batches unacknowledged and not a word from the peer: it is gone
                // without a reset, or stopped reading; free its slot.
                _ = tokio::time::sleep_until(f.heard + limit), if !f.in_flight.is_empty() => {
                    return Err(ServeError::Stalled(limit));
                }
                _ = tokio::time::sleep_until(f.next_beat) => {
                    f.head = f.head.max(self.server.log.head().await?);
                    if f.head > f.cursor {
                        f.caught_up = false;
                    }
                    self.send(&ServerMsg::Heartbeat { head: f.head, now_ms: now_ms(), floors: None }).await?;
                    f.next_beat = Instant::now() + heartbeat;
                }
                // Time to read the floors (at the top of the loop).
                _ = tokio::time::sleep_until(f.floors_due), if f.floors.is_none() => {}
            }
        }
    }

    fn on_frame(&mut self, f: &mut Flow, frame: &[u8]) -> Result<(), ServeError> {
        match protocol::decode_client(frame).map_err(ServeError::PeerMessage)? {
            ClientMsg::Ack { upto, durable } => {
                if upto > f.cursor || durable.is_some_and(|d| d > upto) {
                    return Err(ServeError::PeerViolation(format!(
                        "ack {upto} (durable {durable:?}) is beyond the last batch sent ({})",
                        f.cursor
                    )));
                }
                f.durable = durable;
                while f.in_flight.front().is_some_and(|u| *u <= upto) {
                    f.in_flight.pop_front();
                }
                Ok(())
            }
            ClientMsg::Hello(_) => Err(ServeError::PeerViolation("a second hello".into())),
        }
    }

    async fn send_next_batch(&mut self, f: &mut Flow) -> Result<(), ServeError> {
        // Mark the wake-up seen before reading: an append after this read wakes us.
        self.wake.borrow_and_update();
        let scan = self
            .server
            .log
            .read_for(f.cursor, f.max_batch, &f.filter)
            .await?;
        let Some(read_upto) = scan.upto else {
            f.caught_up = true;
            return Ok(());
        };
        if read_upto <= f.cursor {
            return Err(ServeError::Log(crate::log::LogError::Corruption {
                seq: read_upto,
                reason: format!("read after {} returned an earlier seq", f.cursor),
            }));
        }
        f.head = if read_upto - f.cursor >= f.max_batch {
            // More may follow; learn how far behind the peer is.
            self.server.log.head().await?.max(read_upto)
        } else {
            f.head.max(read_upto)
        };
        let (bytes, upto) = encode_batch(&scan.events, read_upto, f.head)?;
        // A batch cut short to fit a frame left rows behind.
        f.caught_up = scan.drained && upto == read_upto;
        self.send_bytes(bytes).await?;
        if f.in_flight.is_empty() {
            f.heard = Instant::now();
        }
        f.in_flight.push_back(upto);
        f.cursor = upto;
        f.next_beat = Instant::now() + self.server.cfg.heartbeat();
        Ok(())
    }
}

/// Encodes a batch, each event once, cut short (with `upto` lowered to its last event)
/// where the next event would take it over [`protocol::MAX_FRAME`]. The first event
/// always goes, alone if need be, up to [`protocol::MAX_EVENT_FRAME`]. The events left
/// out are read again for the next batch.
fn encode_batch(events: &[Logged], read_upto: i64, head: i64) -> Result<(Bytes, i64), ServeError> {
    let mut w = protocol::BatchWriter::new();
    let mut upto = read_upto;
    for (i, l) in events.iter().enumerate() {
        let before = w.bytes();
        w.push(l).map_err(ServeError::Encode)?;
        let size = w.bytes() + protocol::BATCH_TAIL;
        if i == 0 && size > protocol::MAX_EVENT_FRAME {
            return Err(ServeError::EventTooLarge {
                seq: l.seq,
                bytes: size,
            });
        }
        if i > 0 && size > protocol::MAX_FRAME {
            w.truncate(before);
            upto = events[i - 1].seq;
            break;
        }
    }
    Ok((w.finish(upto, head), upto))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whether `cert` is valid for `region` as a subject name (a DNS or IP subject
/// alternative name), the way a server certificate is checked against the host a
/// client dialled. A name that cannot be a subject name matches nothing. A
/// certificate that names only its node binds it to no region, so it is not enough:
/// one node's certificate must not pull a log as another region.
fn names(cert: &CertificateDer<'_>, region: &str) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    ServerName::try_from(region).is_ok_and(|n| cert.verify_is_valid_for_subject_name(&n).is_ok())
}
