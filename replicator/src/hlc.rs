//! Hybrid logical clock (DESIGN §2): the 64-bit timestamp every change event carries,
//! the `(hlc, origin)` total order that every tie-break in pgmesh uses, and the
//! thread-safe clock that stamps transactions on the proxy's commit path and merges the
//! timestamps it sees from peer regions.
//!
//! This module owns the bit layout of [`Hlc`], the ordering of [`EventId`], the
//! `now`/`observe` rules, the capture rule [`final_hlc`], and the persisted high-water
//! mark ([`HighWaterStore`]) that stops a clock from going backwards across restarts.
//!
//! It must never hand out a timestamp that is not strictly greater than every timestamp
//! the clock handed out before, in this process or (with a store) in an earlier one. It
//! must never drop or refuse a remote timestamp because the peer's clock is skewed:
//! skew is counted and logged, and the data still flows. It must never sleep while
//! waiting for the wall clock to catch up, and it reads the time only through the
//! [`Clock`] trait, so that tests stay deterministic.

mod store;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::warn;

pub use store::{FileStore, HighWaterStore, MemoryStore};

/// Number of low bits that hold the logical counter.
const LOGICAL_BITS: u32 = 16;

/// A hybrid logical clock timestamp: the high 48 bits are Unix milliseconds, the low 16
/// bits are a logical counter.
///
/// Because the physical part sits in the high bits, comparing the raw `u64` compares
/// (physical, logical) lexicographically, and `+1` on the raw value is "bump the logical
/// counter, carrying into the milliseconds when it overflows". The clock relies on both.
///
/// Text form: `<ms>.<logical>`, for example `1732270000123.5`. The part after the dot is
/// a counter, not a decimal fraction: `…123.5` and `…123.50` are different timestamps,
/// so the parser accepts only the canonical form, without leading zeros. Serde uses the
/// raw `u64`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Hlc(u64);

impl Hlc {
    /// The smallest timestamp. It sorts before anything a clock issues.
    pub const ZERO: Hlc = Hlc(0);
    /// The largest timestamp. A clock cannot issue anything after it.
    pub const MAX: Hlc = Hlc(u64::MAX);
    /// The largest physical part that fits in 48 bits (a date in the year 10889).
    pub const MAX_PHYSICAL_MS: u64 = (1 << (64 - LOGICAL_BITS)) - 1;

    /// Builds a timestamp from Unix milliseconds and a logical counter. Milliseconds
    /// beyond [`Hlc::MAX_PHYSICAL_MS`] are clamped to it rather than wrapping, which
    /// would send the timestamp back to 1970.
    pub const fn from_parts(physical_ms: u64, logical: u16) -> Hlc {
        let ms = if physical_ms > Self::MAX_PHYSICAL_MS {
            Self::MAX_PHYSICAL_MS
        } else {
            physical_ms
        };
        Hlc((ms << LOGICAL_BITS) | logical as u64)
    }

    /// Reinterprets a raw value, as stored in the change log or sent on the wire.
    pub const fn from_u64(raw: u64) -> Hlc {
        Hlc(raw)
    }

    /// The raw value. Ordering raw values orders the timestamps.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Unix milliseconds (the high 48 bits).
    pub const fn physical_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    /// The logical counter (the low 16 bits).
    pub const fn logical(self) -> u16 {
        (self.0 & 0xFFFF) as u16
    }

    /// The next timestamp (raw value + 1), or `None` at [`Hlc::MAX`].
    pub const fn checked_next(self) -> Option<Hlc> {
        match self.0.checked_add(1) {
            Some(raw) => Some(Hlc(raw)),
            None => None,
        }
    }

    /// The next timestamp, staying at [`Hlc::MAX`] once there.
    pub const fn saturating_next(self) -> Hlc {
        Hlc(self.0.saturating_add(1))
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.physical_ms(), self.logical())
    }
}

impl fmt::Debug for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hlc({self})")
    }
}

impl FromStr for Hlc {
    type Err = HlcError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parse_error = |reason| HlcError::Parse {
            input: s.to_owned(),
            reason,
        };
        let (ms, logical) = s
            .split_once('.')
            .ok_or_else(|| parse_error("expected <ms>.<logical>"))?;
        let ms = canonical_decimal(ms).ok_or_else(|| parse_error("bad milliseconds"))?;
        if ms > Self::MAX_PHYSICAL_MS {
            return Err(parse_error("milliseconds exceed 48 bits"));
        }
        let logical = canonical_decimal(logical)
            .and_then(|l| u16::try_from(l).ok())
            .ok_or_else(|| parse_error("bad logical counter"))?;
        Ok(Hlc::from_parts(ms, logical))
    }
}

/// Parses ASCII digits without sign, whitespace or leading zeros, so that every value
/// has exactly one text form.
fn canonical_decimal(s: &str) -> Option<u64> {
    let digits_only = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits_only || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.parse().ok()
}

/// The identity of one committed source transaction, and the total order that every
/// tie-break uses: first by `hlc`, then by `origin`.
///
/// The derived `Ord` compares fields in declaration order, so `hlc` must stay first.
/// Text form: `<hlc>@<origin>`, for example `1732270000123.5@3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EventId {
    /// Final HLC that capture assigned in the origin region.
    pub hlc: Hlc,
    /// Stable small integer of the region where the transaction committed.
    pub origin: u16,
}

impl EventId {
    /// Pairs a timestamp with the region it came from.
    pub const fn new(hlc: Hlc, origin: u16) -> EventId {
        EventId { hlc, origin }
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.hlc, self.origin)
    }
}

impl FromStr for EventId {
    type Err = HlcError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hlc, origin) = s.split_once('@').ok_or_else(|| HlcError::Parse {
            input: s.to_owned(),
            reason: "expected <hlc>@<origin>",
        })?;
        let origin = canonical_decimal(origin)
            .and_then(|o| u16::try_from(o).ok())
            .ok_or_else(|| HlcError::Parse {
                input: s.to_owned(),
                reason: "bad origin id",
            })?;
        Ok(EventId::new(hlc.parse()?, origin))
    }
}

/// Capture's rule for the final HLC of a local transaction, applied in commit order
/// (DESIGN §2): `max(stamp, commit_ts, previous_final + 1)`.
///
/// `stamp` is the proxy's HLC from the `pgmesh` logical message (absent for writes that
/// bypassed the proxy), `commit_ts_ms` is PostgreSQL's commit timestamp in Unix
/// milliseconds (taken as logical 0), and `previous_final` is the final HLC of the
/// previous transaction in commit order, local or applied remote. The `+ 1` is on the
/// raw value, so the result is strictly greater than `previous_final`, which makes HLC
/// order equal commit order within a region. The one exception is `previous_final ==
/// Hlc::MAX`, where the result saturates at `Hlc::MAX`.
pub fn final_hlc(stamp: Option<Hlc>, commit_ts_ms: u64, previous_final: Hlc) -> Hlc {
    let commit = Hlc::from_parts(commit_ts_ms, 0);
    let floor = commit.max(previous_final.saturating_next());
    stamp.map_or(floor, |stamp| stamp.max(floor))
}

/// The one error type of the HLC module.
#[derive(Debug, thiserror::Error)]
pub enum HlcError {
    /// Text that is not a canonical `<ms>.<logical>` (or `<hlc>@<origin>`) form.
    #[error("invalid HLC text {input:?}: {reason}")]
    Parse {
        /// The text that was rejected.
        input: String,
        /// What was wrong with it.
        reason: &'static str,
    },
    /// The clock is at the top of the 64-bit range and cannot issue anything larger.
    /// Only reachable through a peer that sent a timestamp near [`Hlc::MAX`].
    #[error("HLC exhausted: nothing can be issued after {last}")]
    Exhausted {
        /// The timestamp that has no successor.
        last: Hlc,
    },
    /// Reading or writing the high-water mark failed. No timestamp above the persisted
    /// ceiling was issued.
    #[error("HLC high-water store {}: {op} failed", path.display())]
    Io {
        /// Where the store lives (`<memory>` for the test store).
        path: PathBuf,
        /// The operation that failed, e.g. `rename`.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The high-water file exists but does not hold a valid high-water mark.
    #[error("HLC high-water file {} is corrupt: {reason}", path.display())]
    Corruption {
        /// The file.
        path: PathBuf,
        /// What check failed.
        reason: String,
    },
    /// The high-water file was written by a newer format this build cannot read.
    #[error("HLC high-water file {} has format {found}, this build reads {supported}", path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The format version in the file.
        found: u32,
        /// The format version this build writes and reads.
        supported: u32,
    },
}

impl HlcError {
    /// True when a persisted high-water mark exists but cannot be trusted. Starting a
    /// clock without it could reissue old timestamps, so an operator must decide.
    pub fn is_corruption(&self) -> bool {
        matches!(self, HlcError::Corruption { .. })
    }
}

/// Source of wall-clock time, in Unix milliseconds. Production uses [`SystemClock`],
/// tests use [`ManualClock`].
pub trait Clock: Send + Sync {
    /// Current wall-clock time in Unix milliseconds. It may jump backwards.
    fn wall_ms(&self) -> u64;
}

/// The operating system's real-time clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn wall_ms(&self) -> u64 {
        // A clock set before 1970 reads as 0; the HLC then runs on its logical part.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// A wall clock that only moves when told to. Clones share the same time, so a test
/// can keep one handle and give another to a [`HybridClock`].
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock that reads `ms`.
    pub fn new(ms: u64) -> ManualClock {
        ManualClock(Arc::new(AtomicU64::new(ms)))
    }

    /// Sets the time; it may go backwards, like a real clock stepped by NTP.
    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }

    /// Moves the time forward by `delta_ms`.
    pub fn advance(&self, delta_ms: u64) {
        self.0.fetch_add(delta_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn wall_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Settings of a [`HybridClock`]. Neither field can be reloaded: they are read when
/// the clock is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HlcConfig {
    /// How far, in milliseconds, a remote HLC's physical part may be ahead of the local
    /// wall clock before it is counted and logged as clock skew. It is still merged.
    /// Default: 500.
    pub max_clock_offset_ms: u64,
    /// How much physical time, in milliseconds, each persisted reservation covers.
    /// Larger means fewer fsyncs and a larger forward jump after a restart. Default:
    /// 1000. Ignored without a [`HighWaterStore`].
    pub reserve_window_ms: u64,
}

impl Default for HlcConfig {
    fn default() -> Self {
        HlcConfig {
            max_clock_offset_ms: 500,
            reserve_window_ms: 1000,
        }
    }
}

/// A thread-safe hybrid logical clock.
///
/// The fast path of [`now`](Self::now) is one wall-clock read and one compare-and-swap,
/// with no lock, because it sits on the proxy's commit path.
///
/// # Never backwards across restarts: reserve ahead
///
/// Writing every issued timestamp to disk would put an fsync on every commit. Instead,
/// a durable clock (see [`open`](Self::open)) persists a *ceiling*: a timestamp
/// `reserve_window_ms` of physical time above the one being issued. Timestamps up to
/// the ceiling are issued from memory. The first one that would pass it takes a
/// mutex, persists a new ceiling, and only then is handed out, so every timestamp ever
/// issued is at or below the persisted ceiling. On startup the clock sets `last` to the
/// loaded ceiling, so everything it issues is strictly greater than anything an earlier
/// run issued. The cost is one store write per window (one per second by default,
/// assuming the clock follows wall time), and a jump of at most one window after a
/// restart. If the store write fails, the call returns the error and nothing above the
/// old ceiling is issued.
pub struct HybridClock<C: Clock = SystemClock> {
    clock: C,
    config: HlcConfig,
    /// Raw value of the largest timestamp issued or observed.
    last: AtomicU64,
    /// Raw value of the persisted ceiling; `u64::MAX` for a volatile clock, so the
    /// reservation path is never taken.
    ceiling: AtomicU64,
    /// Serialises reservations. `None` for a volatile clock.
    store: Option<Mutex<Box<dyn HighWaterStore>>>,
    skew_events: AtomicU64,
}

impl<C: Clock> HybridClock<C> {
    /// A volatile clock with the default settings: nothing is persisted, so it is
    /// monotonic only within this process. Right for stateless proxies, whose stamps
    /// capture orders anyway through [`final_hlc`].
    pub fn new(clock: C) -> Self {
        Self::with_config(clock, HlcConfig::default())
    }

    /// A volatile clock with explicit settings.
    pub fn with_config(clock: C, config: HlcConfig) -> Self {
        HybridClock {
            clock,
            config,
            last: AtomicU64::new(0),
            ceiling: AtomicU64::new(u64::MAX),
            store: None,
            skew_events: AtomicU64::new(0),
        }
    }

    /// A durable clock. It loads the last ceiling from `store`, so it never issues a
    /// timestamp at or below anything an earlier run issued, and it persists the first
    /// reservation right away, so a store that cannot be written fails here rather than
    /// on the first commit.
    pub fn open(
        clock: C,
        config: HlcConfig,
        store: impl HighWaterStore + 'static,
    ) -> Result<Self, HlcError> {
        let start = store.load()?.map_or(0, Hlc::as_u64);
        let hybrid = HybridClock {
            last: AtomicU64::new(start),
            ceiling: AtomicU64::new(start),
            store: Some(Mutex::new(Box::new(store))),
            skew_events: AtomicU64::new(0),
            clock,
            config,
        };
        let wall = Hlc::from_parts(hybrid.clock.wall_ms(), 0).as_u64();
        hybrid.reserve(successor(start)?.max(wall))?;
        Ok(hybrid)
    }

    /// Issues a timestamp for a local event: `max(wall, last + 1)`. When the wall clock
    /// has not moved past `last` (same millisecond, or stepped backwards), the logical
    /// counter goes up, and a full counter carries into the milliseconds.
    pub fn now(&self) -> Result<Hlc, HlcError> {
        let wall = Hlc::from_parts(self.clock.wall_ms(), 0).as_u64();
        self.update(|last| Ok(wall.max(successor(last)?)))
    }

    /// Merges a timestamp received from another node, and returns a timestamp for the
    /// receive event: `max(wall, last + 1, remote + 1)`. That is the standard HLC
    /// receive rule; the result is strictly greater than both `last` and `remote`.
    ///
    /// A remote more than `max_clock_offset_ms` ahead of the local wall clock is merged
    /// anyway, because data is never dropped, but it is counted in
    /// [`clock_skew_events`](Self::clock_skew_events) and logged.
    pub fn observe(&self, remote: Hlc) -> Result<Hlc, HlcError> {
        let wall_ms = self.clock.wall_ms();
        self.check_skew(remote, wall_ms);
        let wall = Hlc::from_parts(wall_ms, 0).as_u64();
        let after_remote = successor(remote.as_u64())?;
        self.update(|last| Ok(wall.max(after_remote).max(successor(last)?)))
    }

    /// Raises `last` to `hlc` if it is lower, without issuing a new timestamp, and
    /// returns the new `last`. Capture calls it with each final HLC it assigns, so that
    /// the next [`now`](Self::now) is after it. It does not count skew: final HLCs
    /// derive from timestamps that were already checked when they entered the region.
    pub fn advance_to(&self, hlc: Hlc) -> Result<Hlc, HlcError> {
        self.update(|last| Ok(last.max(hlc.as_u64())))
    }

    /// The largest timestamp issued or observed so far, without issuing a new one.
    pub fn last(&self) -> Hlc {
        Hlc(self.last.load(Ordering::Acquire))
    }

    /// The persisted ceiling, or `None` for a volatile clock.
    pub fn ceiling(&self) -> Option<Hlc> {
        self.store
            .as_ref()
            .map(|_| Hlc(self.ceiling.load(Ordering::Acquire)))
    }

    /// How many observed remote timestamps were more than `max_clock_offset_ms` ahead
    /// of the local wall clock. Exported as a metric and alerted on.
    pub fn clock_skew_events(&self) -> u64 {
        self.skew_events.load(Ordering::Relaxed)
    }

    /// The settings this clock was created with.
    pub fn config(&self) -> &HlcConfig {
        &self.config
    }

    /// The wall clock this clock reads.
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// Moves `last` to `next(last)` with a compare-and-swap loop, reserving first when
    /// the result would pass the persisted ceiling.
    fn update(&self, next: impl Fn(u64) -> Result<u64, HlcError>) -> Result<Hlc, HlcError> {
        let mut last = self.last.load(Ordering::Acquire);
        loop {
            let candidate = next(last)?;
            // The ceiling only grows, so once a candidate fits it stays covered.
            if candidate > self.ceiling.load(Ordering::Acquire) {
                self.reserve(candidate)?;
            }
            match self.last.compare_exchange_weak(
                last,
                candidate,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(Hlc(candidate)),
                Err(current) => last = current,
            }
        }
    }

    /// Persists a ceiling that covers `candidate`, then publishes it. Threads that fit
    /// under the old ceiling keep going without waiting for the write.
    #[cold]
    fn reserve(&self, candidate: u64) -> Result<(), HlcError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let store = store.lock().unwrap_or_else(PoisonError::into_inner);
        if candidate <= self.ceiling.load(Ordering::Acquire) {
            return Ok(()); // another thread reserved while we waited for the lock
        }
        let window = self
            .config
            .reserve_window_ms
            .saturating_mul(1 << LOGICAL_BITS);
        let ceiling = candidate.saturating_add(window);
        store.store(Hlc(ceiling))?;
        self.ceiling.store(ceiling, Ordering::Release);
        Ok(())
    }

    fn check_skew(&self, remote: Hlc, wall_ms: u64) {
        let remote_ms = remote.physical_ms();
        let offset_ms = remote_ms.saturating_sub(wall_ms);
        let max_offset_ms = self.config.max_clock_offset_ms;
        if offset_ms > max_offset_ms {
            self.skew_events.fetch_add(1, Ordering::Relaxed);
            let local_ms = wall_ms;
            warn!(
                remote_ms,
                local_ms, offset_ms, max_offset_ms, "remote clock ahead"
            );
        }
    }
}

impl<C: Clock> fmt::Debug for HybridClock<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HybridClock")
            .field("last", &self.last())
            .field("ceiling", &self.ceiling())
            .field("config", &self.config)
            .field("clock_skew_events", &self.clock_skew_events())
            .finish_non_exhaustive()
    }
}

fn successor(raw: u64) -> Result<u64, HlcError> {
    raw.checked_add(1)
        .ok_or(HlcError::Exhausted { last: Hlc(raw) })
}
