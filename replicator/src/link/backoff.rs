//! Reconnect delays: exponential backoff with full jitter.
//!
//! Attempt `n` (from 0) waits a uniformly random time in `[0, min(cap, base · 2ⁿ)]`
//! ("full jitter"), so a fleet of nodes that lost a peer at the same moment do not
//! reconnect in lockstep. [`Backoff::reset`] after a success starts over from `base`.
//!
//! It only computes delays; it never sleeps itself, and it is only for reconnecting,
//! never for waiting on data (data wake-ups come from notifications).

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Default first delay ceiling: 100 ms.
pub const DEFAULT_BASE: Duration = Duration::from_millis(100);
/// Default largest delay: 10 s.
pub const DEFAULT_CAP: Duration = Duration::from_secs(10);

/// Exponential backoff with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff<R = StdRng> {
    base: Duration,
    cap: Duration,
    attempt: u32,
    rng: R,
}

impl Default for Backoff {
    /// 100 ms base, 10 s cap, seeded from the OS.
    fn default() -> Self {
        Self::new(DEFAULT_BASE, DEFAULT_CAP)
    }
}

impl Backoff {
    /// A backoff seeded from the OS.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self::with_rng(base, cap, StdRng::from_entropy())
    }
}

impl<R: Rng> Backoff<R> {
    /// A backoff drawing from `rng` (seed it for deterministic tests).
    pub fn with_rng(base: Duration, cap: Duration, rng: R) -> Self {
        Self {
            base,
            cap: cap.max(base),
            attempt: 0,
            rng,
        }
    }

    /// The ceiling of the next delay: `min(cap, base · 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The delay before the next attempt; each call doubles the ceiling up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng.gen_range(0..=nanos))
    }

    /// Failed attempts since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Call after a success: the next delay starts from `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(seed: u64) -> Backoff {
        Backoff::with_rng(DEFAULT_BASE, DEFAULT_CAP, StdRng::seed_from_u64(seed))
    }

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let mut b = seeded(1);
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(b.ceiling().as_millis());
            b.next_delay();
        }
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
        // Far past the point where 2^n overflows, it stays at the cap.
        for _ in 0..100 {
            assert!(b.next_delay() <= DEFAULT_CAP);
        }
        assert_eq!(b.ceiling(), DEFAULT_CAP);
    }

    #[test]
    fn delays_are_jittered_within_the_ceiling_and_deterministic() {
        let mut a = seeded(7);
        let mut b = seeded(7);
        let da: Vec<_> = (0..20).map(|_| a.next_delay()).collect();
        let db: Vec<_> = (0..20).map(|_| b.next_delay()).collect();
        assert_eq!(da, db, "same seed, same delays");
        let mut c = seeded(7);
        for d in &da {
            assert!(*d <= c.ceiling());
            c.next_delay();
        }
        // Full jitter: the delays are spread, not all at the ceiling.
        let capped = da[10..].iter().filter(|d| **d == DEFAULT_CAP).count();
        assert!(capped < 5);
        assert!(da[10..].iter().any(|d| *d < DEFAULT_CAP / 2));
        let mut e = seeded(8);
        assert_ne!(da, (0..20).map(|_| e.next_delay()).collect::<Vec<_>>());
    }

    #[test]
    fn reset_starts_over() {
        let mut b = seeded(3);
        for _ in 0..6 {
            b.next_delay();
        }
        assert_eq!(b.attempts(), 6);
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert_eq!(b.ceiling(), DEFAULT_BASE);
        assert!(b.next_delay() <= DEFAULT_BASE);
    }
}
