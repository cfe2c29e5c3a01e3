//! Lingering: the least time between two batches of one stream of work (capture's
//! appends, one link's applies).
//!
//! Each batch costs its database a transaction, whatever it holds: on a busy mesh
//! most of apply's and capture's cost per event is that fixed part when batches hold
//! one or two events. A stream that lingers starts its next batch no sooner than the
//! linger after its last one ended, and what arrives meanwhile joins that batch.
//! Work that arrives after a quiet spell (the linger has passed) goes at once, so a
//! quiet mesh pays no latency for it; a busy one pays at most the linger.

use std::time::Duration;

use tokio::time::Instant;

/// The linger of one stream and when its last batch ended.
#[derive(Debug, Clone, Copy)]
pub struct Linger {
    gap: Duration,
    last_end: Instant,
}

impl Linger {
    /// A stream that waits `gap` after each batch; zero never waits.
    pub fn new(gap: Duration) -> Self {
        Self {
            gap,
            last_end: Instant::now(),
        }
    }

    /// When the next batch may start, if that is later than now.
    pub fn wait_until(&self) -> Option<Instant> {
        let at = self.last_end + self.gap;
        (!self.gap.is_zero() && Instant::now() < at).then_some(at)
    }

    /// The end of the deadline for the next batch: [`Self::wait_until`], else now.
    pub fn deadline(&self) -> Instant {
        self.wait_until().unwrap_or_else(Instant::now)
    }

    /// Records that a batch ended now.
    pub fn ended(&mut self) {
        self.last_end = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_batch_waits_for_the_rest_of_the_linger_after_the_last_one() {
        let mut l = Linger::new(Duration::from_millis(5));
        l.ended();
        let at = l
            .wait_until()
            .expect("right after a batch, the next one waits");
        assert_eq!(at - Instant::now(), Duration::from_millis(5));
        tokio::time::advance(Duration::from_millis(3)).await;
        assert_eq!(l.wait_until(), Some(at), "the deadline does not move");
        assert_eq!(l.deadline(), at);
        tokio::time::advance(Duration::from_millis(2)).await;
        assert_eq!(l.wait_until(), None, "once the linger has passed, at once");
        assert_eq!(l.deadline(), Instant::now());
    }

    #[tokio::test(start_paused = true)]
    async fn work_after_a_quiet_spell_goes_at_once_and_zero_never_waits() {
        let mut l = Linger::new(Duration::from_millis(5));
        l.ended();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(l.wait_until(), None);
        let mut z = Linger::new(Duration::ZERO);
        z.ended();
        assert_eq!(z.wait_until(), None);
        assert_eq!(z.deadline(), Instant::now());
    }
}
