//! Wake-ups for change-log readers: one connection that LISTENs on the log's NOTIFY
//! channel and turns every notification into a tick of a [`watch`] counter.
//!
//! Readers (peer-link sessions) wait on the counter instead of polling the table. A
//! watch coalesces bursts, so a thousand appends wake a reader once. After every
//! (re)connect the counter is bumped once too, because notifications sent while the
//! connection was down are lost and readers must re-check.
//!
//! It never reads or writes the log itself and never gives up: a dropped connection is
//! retried with backoff until every receiver is gone.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, NoTls};
use tracing::{debug, info, info_span, warn, Instrument};

use super::table::NOTIFY_CHANNEL;
use super::tail::Tail;
use crate::catalog::redact;
use crate::link::backoff::Backoff;

/// Errors of one notifier connection (each is followed by a reconnect).
#[derive(Debug, Error)]
pub enum NotifyError {
    #[error("bad database URL: {0}")]
    Url(tokio_postgres::Error),
    #[error("cannot connect: {0}")]
    Connect(tokio_postgres::Error),
    #[error("LISTEN {NOTIFY_CHANNEL} failed (is the mesh catalog installed?): {0}")]
    Listen(tokio_postgres::Error),
    #[error("connection lost: {0}")]
    Lost(tokio_postgres::Error),
    #[error("connection closed by the server")]
    Closed,
}

/// Listens for change-log appends.
#[derive(Debug)]
pub struct LogNotifier;

impl LogNotifier {
    /// Starts listening on the database at `url`. The counter changes after every
    /// notification and after every (re)connect. The task ends once every receiver is
    /// dropped (or when aborted).
    pub fn start(url: &str) -> (watch::Receiver<u64>, JoinHandle<()>) {
        Self::start_with(url, None, Backoff::default())
    }

    /// [`LogNotifier::start`], but only appends of events from `origin` (the
    /// notification payload) tick the counter; reconnects still do. For a server that
    /// ships only its own region's events: applying a peer's batch then wakes no one.
    pub fn start_for_origin(url: &str, origin: &str) -> (watch::Receiver<u64>, JoinHandle<()>) {
        Self::start_with(url, Some(origin.to_string()), Backoff::default())
    }

    /// [`LogNotifier::start`] with an origin filter and a given reconnect backoff.
    pub fn start_with(
        url: &str,
        origin: Option<String>,
        backoff: Backoff,
    ) -> (watch::Receiver<u64>, JoinHandle<()>) {
        let tail = Arc::new(Tail::new(0));
        let rx = tail.subscribe();
        (rx, Self::spawn(url, origin, tail, backoff))
    }

    /// Ticks the counter of `tail` (see [`Tail::subscribe`]), with an optional origin
    /// filter as in [`LogNotifier::start_for_origin`], and stays quiet about appends
    /// that were published to `tail`: their readers were woken already. The task ends
    /// once every receiver of the counter is dropped.
    pub fn start_on(url: &str, origin: Option<String>, tail: Arc<Tail>) -> JoinHandle<()> {
        Self::spawn(url, origin, tail, Backoff::default())
    }

    fn spawn(
        url: &str,
        origin: Option<String>,
        tail: Arc<Tail>,
        backoff: Backoff,
    ) -> JoinHandle<()> {
        let span = info_span!("log_notifier", db = %redact(url));
        tokio::spawn(run(url.to_string(), origin, tail, backoff).instrument(span))
    }
}

async fn run(url: String, origin: Option<String>, tail: Arc<Tail>, mut backoff: Backoff) {
    loop {
        let err = tokio::select! {
            e = listen(&url, origin.as_deref(), &tail, &mut backoff) => e,
            _ = tail.closed() => return,
        };
        // Readers fall back to their heartbeat checks meanwhile, so data still flows.
        warn!(error = %err, attempt = backoff.attempts(), "change-log notifier disconnected");
        let delay = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = tail.closed() => return,
        }
    }
}

/// Whether a notification with `payload` (`ORIGIN SEQ`, or just `ORIGIN` from an
/// older node) should wake readers.
fn wakes(payload: &str, origin: Option<&str>, tail: &Tail) -> bool {
    let (from, seq) = match payload.rsplit_once(' ') {
        Some((o, s)) => (o, s.parse::<i64>().ok()),
        None => (payload, None),
    };
    origin.is_none_or(|o| from == o) && !seq.is_some_and(|s| tail.published(s))
}

/// One connection's life: connect, LISTEN, bump per notification. Returns why it ended.
async fn listen(
    url: &str,
    origin: Option<&str>,
    tail: &Tail,
    backoff: &mut Backoff,
) -> NotifyError {
    let mut config: tokio_postgres::Config = match url.parse() {
        Ok(c) => c,
        Err(e) => return NotifyError::Url(e),
    };
    // A half-open connection would otherwise swallow wake-ups forever.
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(10));
    let (client, mut conn) = match config.connect(NoTls).await {
        Ok(c) => c,
        Err(e) => return NotifyError::Connect(e),
    };
    let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
    let query = format!("LISTEN {NOTIFY_CHANNEL}");
    let listening = client.batch_execute(&query);
    tokio::pin!(listening);
    // The connection only makes progress while its messages are polled.
    loop {
        tokio::select! {
            r = &mut listening => match r {
                Ok(()) => break,
                Err(e) => return NotifyError::Listen(e),
            },
            m = messages.next() => match m {
                Some(Ok(_)) => {}
                Some(Err(e)) => return NotifyError::Lost(e),
                None => return NotifyError::Closed,
            },
        }
    }
    info!(channel = NOTIFY_CHANNEL, "listening for change-log appends");
    backoff.reset();
    // Anything appended while we were away was not notified to us.
    tail.wake();
    loop {
        match messages.next().await {
            Some(Ok(AsyncMessage::Notification(n))) => {
                if wakes(n.payload(), origin, tail) {
                    tail.wake()
                }
            }
            Some(Ok(m)) => debug!(message = ?m, "notifier connection message"),
            Some(Err(e)) => return NotifyError::Lost(e),
            None => return NotifyError::Closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn notifications_wake_for_their_origin_unless_published() {
        let tail = Tail::new(0);
        assert!(wakes("r1 5", None, &tail));
        assert!(wakes("r1 5", Some("r1"), &tail));
        assert!(!wakes("r2 5", Some("r1"), &tail));
        assert!(wakes("r1", Some("r1"), &tail), "an older node's payload");
        assert!(wakes("", None, &tail), "an append that logged nothing");
        tail.publish(vec![crate::log::Logged {
            seq: 5,
            event: crate::event::ChangeEvent {
                origin: "r1".into(),
                hlc: crate::hlc::Hlc::from_u64(1),
                source_lsn: 1,
                xid: 1,
                commit_ts_us: 0,
                stamp: None,
                local_only: false,
                changes: vec![],
            },
        }]);
        assert!(
            !wakes("r1 5", None, &tail),
            "published rows woke readers already"
        );
        assert!(wakes("r1 6", None, &tail));
    }

    #[tokio::test]
    async fn retries_while_the_database_is_down_and_stops_without_readers() {
        // A port nothing listens on: bind, note it, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("postgres://u@127.0.0.1:{port}/db");
        let backoff = Backoff::with_rng(
            Duration::from_millis(1),
            Duration::from_millis(5),
            rand::rngs::StdRng::seed_from_u64(1),
        );
        let (rx, task) = LogNotifier::start_with(&url, None, backoff);
        // It keeps trying (the task is alive) and never bumps without a connection.
        tokio::task::yield_now().await;
        assert!(!task.is_finished());
        assert_eq!(*rx.borrow(), 0);
        drop(rx);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the notifier stops once no one listens")
            .unwrap();
    }

    /// Against a real database when `PGMESH_TEST_DATABASE_URL` is set (skipped
    /// otherwise): a bump after connecting, one per NOTIFY, and a reconnect (with its
    /// bump) after the backend is killed.
    #[tokio::test]
    async fn notifies_and_reconnects_against_a_real_database() {
        let Ok(url) = std::env::var("PGMESH_TEST_DATABASE_URL") else {
            return;
        };
        let (mut rx, task) = LogNotifier::start(&url);
        let wait = |rx: &mut watch::Receiver<u64>| {
            let mut rx = rx.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(20), rx.changed())
                    .await
                    .expect("a wake-up in time")
                    .unwrap();
                *rx.borrow_and_update()
            }
        };
        let first = wait(&mut rx).await;
        rx.borrow_and_update();
        let (admin, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
        tokio::spawn(conn);
        admin
            .batch_execute(&format!("SELECT pg_notify('{NOTIFY_CHANNEL}', '1')"))
            .await
            .unwrap();
        let second = wait(&mut rx).await;
        assert!(second > first);
        rx.borrow_and_update();
        admin
            .batch_execute(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE query = 'LISTEN {NOTIFY_CHANNEL}' AND pid <> pg_backend_pid()"
            ))
            .await
            .unwrap();
        // The reconnect bumps once by itself.
        let third = wait(&mut rx).await;
        assert!(third > second);
        drop(rx);
        task.abort();
    }
}
