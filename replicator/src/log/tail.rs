//! The newest rows of the change log, in memory, and the wake-up counter of its readers.
//!
//! A node appends to its change log and then serves the same rows to its peers. Rather
//! than have every peer session read back what this process just wrote (a NOTIFY, a
//! query and a decode per batch and peer), the appender publishes the committed rows
//! here with the sequence numbers the log gave them, and sessions read them from
//! memory.
//!
//! The rule that keeps this exact: a read is served from memory only when the rows
//! from `after + 1` on form a gap-free run of sequence numbers here. Every sequence
//! number in such a run is known, so no committed row inside it can be missing. Any
//! doubt (the first row was not published, a sequence value was skipped, the reader
//! fell behind the capacity) sends the read to the table instead, which is always
//! correct. Only committed rows are published, so nothing is shipped that a crash
//! could take back.
//!
//! The tail also owns the wake-up counter that sessions wait on: publishing bumps it,
//! and so does the table's NOTIFY listener for appends that were not published here
//! (another node's, or rows this tail already dropped).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

use super::{Logged, Scan, ShipFilter};

/// Rows kept by default: a few seconds of a busy node's appends.
pub const DEFAULT_CAPACITY: usize = 4096;

/// Recently appended log rows and the readers' wake-up counter.
#[derive(Debug)]
pub struct Tail {
    rows: Mutex<BTreeMap<i64, Logged>>,
    capacity: usize,
    /// Highest sequence number ever published (0 before any).
    high: AtomicI64,
    /// Highest sequence number the log's notifications (or a look at the table)
    /// told of; rows up to it may exist that were not published here.
    noted: AtomicI64,
    /// Whether this node's capture leads its region, so publishes its appends here.
    publishing: AtomicBool,
    /// Peer reads served from here, and those that had to read the table.
    memory_reads: AtomicU64,
    table_reads: AtomicU64,
    wake: watch::Sender<u64>,
}

impl Tail {
    /// A tail holding up to `capacity` rows; 0 keeps none and only counts wake-ups.
    pub fn new(capacity: usize) -> Self {
        Self {
            rows: Mutex::new(BTreeMap::new()),
            capacity,
            high: AtomicI64::new(0),
            noted: AtomicI64::new(0),
            publishing: AtomicBool::new(false),
            memory_reads: AtomicU64::new(0),
            table_reads: AtomicU64::new(0),
            wake: watch::channel(0).0,
        }
    }

    /// Capture says whether it leads its region (and so publishes every append of
    /// the region's own events here) or not any more.
    pub fn set_publishing(&self, on: bool) {
        self.publishing.store(on, Ordering::Release);
    }

    /// Counts a peer read served from here (`memory`) or from the table.
    pub fn count_read(&self, memory: bool) {
        let c = if memory {
            &self.memory_reads
        } else {
            &self.table_reads
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Peer reads so far: (served from here, read from the table).
    pub fn reads(&self) -> (u64, u64) {
        (
            self.memory_reads.load(Ordering::Relaxed),
            self.table_reads.load(Ordering::Relaxed),
        )
    }

    /// Whether this node's capture publishes the region's appends here.
    pub fn publishing(&self) -> bool {
        self.publishing.load(Ordering::Acquire)
    }

    /// Waits until the row with sequence number `seq` is published, at most
    /// `timeout`; returns whether it was.
    pub async fn wait_published(&self, seq: i64, timeout: Duration) -> bool {
        let mut rx = self.wake.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.published(seq) {
                return true;
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return self.published(seq) },
                _ = tokio::time::sleep_until(deadline) => return self.published(seq),
            }
        }
    }

    /// A receiver of the wake-up counter: it changes whenever the log may have grown.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.wake.subscribe()
    }

    /// Bumps the wake-up counter.
    pub fn wake(&self) {
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Resolves once no receiver of the wake-up counter is left.
    pub async fn closed(&self) {
        self.wake.closed().await
    }

    /// Records that the log holds rows up to `seq` (from a notification, or the
    /// table's highest sequence number after reconnecting). Call it before waking
    /// readers for them.
    pub fn note(&self, seq: i64) {
        self.noted.fetch_max(seq, Ordering::SeqCst);
    }

    /// The highest sequence number noted (0 before any).
    pub fn noted(&self) -> i64 {
        self.noted.load(Ordering::SeqCst)
    }

    /// Whether the row with sequence number `seq` was published here (it may have
    /// been dropped since; readers then read it from the table).
    pub fn published(&self, seq: i64) -> bool {
        seq <= self.high.load(Ordering::Acquire)
    }

    /// Adds committed rows and wakes the readers. Rows may come in any order.
    pub fn publish(&self, rows: Vec<Logged>) {
        if rows.is_empty() {
            return;
        }
        let top = rows.iter().map(|l| l.seq).max().unwrap_or(0);
        if self.capacity > 0 {
            let mut held = self.rows.lock().expect("tail lock poisoned");
            for l in rows {
                held.insert(l.seq, l);
            }
            while held.len() > self.capacity {
                held.pop_first();
            }
        }
        self.high.fetch_max(top, Ordering::AcqRel);
        self.wake();
    }

    /// Up to `limit` rows after `after`, of which the events `filter` lets through,
    /// if this tail holds them as a gap-free run starting at `after + 1`; `None`
    /// means the caller must read the table.
    pub fn read(&self, after: i64, limit: i64, filter: &ShipFilter) -> Option<Scan> {
        let held = self.rows.lock().expect("tail lock poisoned");
        let mut next = after.checked_add(1)?;
        let mut events = Vec::new();
        for (&seq, l) in held.range(next..) {
            if seq != next || next - after > limit {
                break;
            }
            if filter.ships(&l.event) {
                events.push(l.clone());
            }
            next += 1;
        }
        let upto = next - 1;
        // Drained when nothing is held past the run and no append past it was
        // noted; an append noted after this check wakes the reader anyway.
        let drained =
            held.range(next..).next().is_none() && self.noted.load(Ordering::SeqCst) <= upto;
        (next > after + 1).then_some(Scan {
            events,
            upto: Some(upto),
            drained,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64, origin: &str) -> Logged {
        Logged {
            seq,
            event: crate::scratch::event(origin, seq as u64, false),
        }
    }

    fn filter() -> ShipFilter {
        ShipFilter {
            server_region: "a".into(),
            peer_region: "b".into(),
            relay: false,
        }
    }

    fn seqs(s: &Scan) -> Vec<i64> {
        s.events.iter().map(|l| l.seq).collect()
    }

    #[test]
    fn serves_only_a_gap_free_run_from_the_cursor() {
        let t = Tail::new(100);
        t.publish(vec![row(3, "a"), row(4, "a"), row(6, "a")]);
        assert_eq!(t.read(1, 10, &filter()), None, "row 2 was never published");
        let s = t.read(2, 10, &filter()).expect("3 and 4 are held");
        assert_eq!(
            (seqs(&s), s.upto),
            (vec![3, 4], Some(4)),
            "stops at the gap"
        );
        assert_eq!(t.read(4, 10, &filter()), None, "5 is unknown");
        assert_eq!(t.read(6, 10, &filter()), None, "nothing after the end");
        t.publish(vec![row(5, "a")]);
        let s = t.read(2, 10, &filter()).unwrap();
        assert_eq!((seqs(&s), s.upto), (vec![3, 4, 5, 6], Some(6)));
    }

    #[test]
    fn honours_the_limit_and_the_filter() {
        let t = Tail::new(100);
        t.publish(
            (1..=6)
                .map(|i| row(i, if i % 2 == 0 { "b" } else { "a" }))
                .collect(),
        );
        let s = t.read(0, 4, &filter()).unwrap();
        assert_eq!(s.upto, Some(4), "at most 4 rows");
        assert_eq!(seqs(&s), vec![1, 3], "the peer's own events stay home");
        let s = t.read(4, 1, &filter()).unwrap();
        assert_eq!((seqs(&s), s.upto), (vec![5], Some(5)));
    }

    #[test]
    fn a_run_is_drained_only_up_to_what_was_noted() {
        let t = Tail::new(100);
        t.publish(vec![row(1, "a"), row(2, "a"), row(4, "a")]);
        assert!(
            !t.read(0, 10, &filter()).unwrap().drained,
            "4 is held past the gap"
        );
        assert!(t.read(2, 10, &filter()).is_none(), "3 is unknown");
        t.publish(vec![row(3, "a")]);
        assert!(t.read(0, 10, &filter()).unwrap().drained);
        assert!(
            !t.read(0, 2, &filter()).unwrap().drained,
            "cut by the limit"
        );
        t.note(5);
        assert!(
            !t.read(0, 10, &filter()).unwrap().drained,
            "5 was appended elsewhere"
        );
    }

    #[test]
    fn drops_the_oldest_beyond_capacity() {
        let t = Tail::new(3);
        t.publish((1..=5).map(|i| row(i, "a")).collect());
        assert_eq!(t.read(0, 10, &filter()), None, "1 was dropped");
        assert_eq!(t.read(1, 10, &filter()), None, "2 was dropped");
        assert_eq!(t.read(2, 10, &filter()).unwrap().upto, Some(5));
        assert!(t.published(5) && !t.published(6));
    }

    #[tokio::test]
    async fn waits_for_a_publish_until_the_timeout() {
        let t = std::sync::Arc::new(Tail::new(10));
        assert!(!t.wait_published(1, Duration::from_millis(20)).await);
        let t2 = t.clone();
        let publisher = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            t2.publish(vec![row(1, "a")]);
        });
        assert!(t.wait_published(1, Duration::from_secs(10)).await);
        publisher.await.unwrap();
    }

    #[test]
    fn a_tail_without_capacity_only_wakes() {
        let t = Tail::new(0);
        let mut rx = t.subscribe();
        t.publish(vec![row(1, "a")]);
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        assert_eq!(t.read(0, 10, &filter()), None);
        assert!(t.published(1));
    }
}
