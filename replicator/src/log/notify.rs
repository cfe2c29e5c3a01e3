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
use tokio_postgres::AsyncMessage;
use tracing::{debug, info, info_span, warn, Instrument};

use super::table::{HEAD, NOTIFY_CHANNEL};
use super::tail::Tail;
use crate::catalog::redact;
use crate::link::backoff::Backoff;

/// Errors of one notifier connection (each is followed by a reconnect).
#[derive(Debug, Error)]
pub enum NotifyError {
    #[error("bad database URL: {0}")]
    Url(crate::pgtls::PgTlsError),
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

    /// [`LogNotifier::start`] with an origin filter and a given reconnect backoff.
    pub fn start_with(
        url: &str,
        origin: Option<String>,
        backoff: Backoff,
    ) -> (watch::Receiver<u64>, JoinHandle<()>) {
        let tail = Arc::new(Tail::new(0));
        let rx = tail.subscribe();
        let filter = Filter {
            only: origin,
            own: None,
        };
        (rx, Self::spawn(url, filter, tail, backoff))
    }

    /// Ticks the counter of `tail` (see [`Tail::subscribe`]) for appends in the log of
    /// region `region`: only of its own events unless `relay`. It stays quiet about
    /// appends that were published to `tail` (their readers were woken already), and
    /// while this node's capture publishes there it gives an append of the region's
    /// own events [`PUBLISH_WAIT`] to be published before it wakes anyone (the NOTIFY
    /// often arrives first). The task ends once every receiver of the counter is
    /// dropped.
    pub fn start_on(url: &str, region: &str, relay: bool, tail: Arc<Tail>) -> JoinHandle<()> {
        let filter = Filter {
            only: (!relay).then(|| region.to_string()),
            own: Some(region.to_string()),
        };
        Self::spawn(url, filter, tail, Backoff::default())
    }

    fn spawn(url: &str, filter: Filter, tail: Arc<Tail>, backoff: Backoff) -> JoinHandle<()> {
        let span = info_span!("log_notifier", db = %redact(url));
        tokio::spawn(run(url.to_string(), filter, tail, backoff).instrument(span))
    }
}

/// How long an append of the region's own events may take to reach the tail before
/// the notifier wakes readers for it anyway.
pub const PUBLISH_WAIT: Duration = Duration::from_millis(250);

/// Which notifications wake readers.
#[derive(Debug, Clone, Default)]
struct Filter {
    /// Only appends of this origin (none: any).
    only: Option<String>,
    /// This region: its appends are published to the tail while capture leads here.
    own: Option<String>,
}

async fn run(url: String, filter: Filter, tail: Arc<Tail>, mut backoff: Backoff) {
    loop {
        let err = tokio::select! {
            e = listen(&url, &filter, &tail, &mut backoff) => e,
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

/// The origin and highest sequence number of an append's notification payload
/// (`ORIGIN SEQ`, or just `ORIGIN` from an older node).
fn parse_payload(payload: &str) -> (&str, Option<i64>) {
    match payload.rsplit_once(' ') {
        Some((o, s)) => (o, s.parse().ok()),
        None => (payload, None),
    }
}

/// Whether a notification with `payload` should wake readers.
async fn wakes(payload: &str, filter: &Filter, tail: &Tail) -> bool {
    let (from, seq) = parse_payload(payload);
    if filter.only.as_deref().is_some_and(|o| from != o) {
        return false;
    }
    let Some(seq) = seq else {
        return true;
    };
    tail.note(seq);
    if filter.own.as_deref() == Some(from) && tail.publishing() {
        return !tail.wait_published(seq, PUBLISH_WAIT).await;
    }
    !tail.published(seq)
}

/// One connection's life: connect, LISTEN, bump per notification. Returns why it ended.
async fn listen(url: &str, filter: &Filter, tail: &Tail, backoff: &mut Backoff) -> NotifyError {
    let (mut config, tls) = match crate::pgtls::pg_config(url) {
        Ok(c) => c,
        Err(e) => return NotifyError::Url(e),
    };
    // Keepalives and the connect timeout are the shared ones (`pg_config`, from the
    // URL or pgmesh's defaults): a half-open connection would otherwise swallow
    // wake-ups forever.
    config.application_name("pgmesh-notify");
    let (client, mut conn) = match config.connect(tls).await {
        Ok(c) => c,
        Err(e) => return NotifyError::Connect(e),
    };
    let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
    let query = format!("LISTEN {NOTIFY_CHANNEL}");
    // Then the log's head: anything appended while we were away was not notified
    // to us, and readers must know that rows up to it may not be in the tail.
    let setup = async {
        client.batch_execute(&query).await?;
        client.query_one(HEAD, &[]).await
    };
    tokio::pin!(setup);
    // The connection only makes progress while its messages are polled.
    loop {
        tokio::select! {
            r = &mut setup => match r {
                Ok(row) => {
                    tail.note(row.get(0));
                    break;
                }
                Err(e) => return NotifyError::Listen(e),
            },
            m = messages.next() => match m {
                // Listening already: note it; everyone is woken below anyway.
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if let (_, Some(seq)) = parse_payload(n.payload()) {
                        tail.note(seq);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return NotifyError::Lost(e),
                None => return NotifyError::Closed,
            },
        }
    }
    info!(channel = NOTIFY_CHANNEL, "listening for change-log appends");
    backoff.reset();
    tail.wake();
    loop {
        match messages.next().await {
            Some(Ok(AsyncMessage::Notification(n))) => {
                if wakes(n.payload(), filter, tail).await {
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

    fn logged(seq: i64) -> crate::log::Logged {
        crate::log::Logged {
            seq,
            event: crate::scratch::event("r1", seq as u64, false),
        }
    }

    #[tokio::test]
    async fn notifications_wake_for_their_origin_unless_published() {
        let tail = Tail::new(0);
        let any = Filter::default();
        let r1 = Filter {
            only: Some("r1".into()),
            own: Some("r1".into()),
        };
        assert!(wakes("r1 5", &any, &tail).await);
        assert!(
            wakes("r1 5", &r1, &tail).await,
            "capture does not publish here"
        );
        assert!(!wakes("r2 5", &r1, &tail).await);
        assert!(wakes("r1", &r1, &tail).await, "an older node's payload");
        assert!(
            wakes("", &any, &tail).await,
            "an append that logged nothing"
        );
        tail.publish(vec![logged(5)]);
        assert!(
            !wakes("r1 5", &any, &tail).await,
            "published rows woke readers already"
        );
        assert!(wakes("r1 6", &any, &tail).await);
    }

    #[tokio::test(start_paused = true)]
    async fn own_appends_wait_for_the_publish_while_capture_leads_here() {
        let tail = Arc::new(Tail::new(0));
        tail.set_publishing(true);
        let hub = Filter {
            only: None,
            own: Some("r1".into()),
        };
        let t = tail.clone();
        let publisher = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            t.publish(vec![logged(7)]);
        });
        assert!(
            !wakes("r1 7", &hub, &tail).await,
            "published in time: woken by it"
        );
        publisher.await.unwrap();
        // Never published (another node appended): woken after the wait.
        let before = tokio::time::Instant::now();
        assert!(wakes("r1 8", &hub, &tail).await);
        assert!(before.elapsed() >= PUBLISH_WAIT);
        // Another origin's append (relayed by a hub) is never waited for.
        let before = tokio::time::Instant::now();
        assert!(wakes("r2 9", &hub, &tail).await);
        assert_eq!(before.elapsed(), Duration::ZERO);
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
        let Some(url) = crate::scratch::database("pgmesh_notify").await else {
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
        let (admin, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        admin
            .batch_execute(&format!("SELECT pg_notify('{NOTIFY_CHANNEL}', '1')"))
            .await
            .unwrap();
        let second = wait(&mut rx).await;
        assert!(second > first);
        rx.borrow_and_update();
        admin
            .batch_execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE application_name = 'pgmesh-notify' AND datname = current_database()",
            )
            .await
            .unwrap();
        // The reconnect bumps once by itself.
        let third = wait(&mut rx).await;
        assert!(third > second);
        drop(rx);
        task.abort();
        crate::scratch::drop_database(&url).await;
    }
}
