//! WAL positions ([`Lsn`]) and PostgreSQL timestamps ([`PgTimestamp`]).
//!
//! This file owns the two scalar types every replication message carries and their
//! conversions: LSN text in PostgreSQL's `X/X` form, and microseconds since the
//! PostgreSQL epoch (2000-01-01 UTC) to and from Unix time. It must never round
//! through floating point, and it must never panic: arithmetic saturates, so
//! PostgreSQL's `infinity` timestamps (`i64::MAX`, `i64::MIN`) stay infinite.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::PgOutputError;

/// A WAL position (PostgreSQL `XLogRecPtr` / `pg_lsn`).
///
/// Displays as `X/XXXXXXXX` (high 32 bits, `/`, low 32 bits zero-padded to eight
/// uppercase hex digits, the form PostgreSQL 18 prints). Parses any `pg_lsn` input:
/// one to eight hex digits on each side, either case, padded or not.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `InvalidXLogRecPtr`: PostgreSQL's "no position".
    pub const INVALID: Lsn = Lsn(0);

    /// False for [`Lsn::INVALID`].
    pub fn is_valid(self) -> bool {
        self != Self::INVALID
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Self {
        Lsn(v)
    }
}

impl From<Lsn> for u64 {
    fn from(v: Lsn) -> Self {
        v.0
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:08X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = PgOutputError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Mirrors pg_lsn_in: exactly 1..=8 hex digits, '/', 1..=8 hex digits, nothing
        // else. u32::from_str_radix alone would also accept a leading '+'.
        let invalid = || PgOutputError::InvalidLsn(s.chars().take(40).collect());
        let (hi, lo) = s.split_once('/').ok_or_else(invalid)?;
        let half = |part: &str| -> Result<u64, PgOutputError> {
            if part.is_empty() || part.len() > 8 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid());
            }
            u32::from_str_radix(part, 16)
                .map(u64::from)
                .map_err(|_| invalid())
        };
        Ok(Lsn((half(hi)? << 32) | half(lo)?))
    }
}

/// Microseconds from the Unix epoch to the PostgreSQL epoch, 2000-01-01 00:00:00 UTC.
pub const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// A PostgreSQL `TimestampTz` on the wire: microseconds since 2000-01-01 UTC.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    /// From microseconds since the Unix epoch.
    pub fn from_unix_micros(unix_micros: i64) -> Self {
        PgTimestamp(unix_micros.saturating_sub(PG_EPOCH_UNIX_MICROS))
    }

    /// From milliseconds since the Unix epoch.
    pub fn from_unix_millis(unix_millis: i64) -> Self {
        Self::from_unix_micros(unix_millis.saturating_mul(1000))
    }

    /// Microseconds since the Unix epoch.
    pub fn to_unix_micros(self) -> i64 {
        self.0.saturating_add(PG_EPOCH_UNIX_MICROS)
    }

    /// Milliseconds since the Unix epoch, rounded toward minus infinity, so that a
    /// commit at x.999 ms never sorts after one at x+1 ms (the HLC uses this).
    pub fn to_unix_millis(self) -> i64 {
        self.to_unix_micros().div_euclid(1000)
    }

    /// From a [`SystemTime`], saturating far outside the representable range.
    pub fn from_system_time(t: SystemTime) -> Self {
        let unix_micros = match t.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
            Err(e) => i64::try_from(e.duration().as_micros())
                .map(|m| -m)
                .unwrap_or(i64::MIN),
        };
        Self::from_unix_micros(unix_micros)
    }

    /// The current wall-clock time, for the clock field of a standby status update.
    /// Anything that orders events takes its time from the HLC instead.
    pub fn now() -> Self {
        Self::from_system_time(SystemTime::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_display_matches_postgres() {
        assert_eq!(Lsn(0).to_string(), "0/00000000");
        assert_eq!(Lsn(0x16B3748).to_string(), "0/016B3748");
        assert_eq!(Lsn(0x1_0000_00FF).to_string(), "1/000000FF");
        assert_eq!(Lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
    }

    #[test]
    fn lsn_parses_every_pg_form() {
        assert_eq!("0/16B3748".parse::<Lsn>(), Ok(Lsn(0x16B3748)));
        assert_eq!("0/016b3748".parse::<Lsn>(), Ok(Lsn(0x16B3748)));
        assert_eq!("A/0".parse::<Lsn>(), Ok(Lsn(0xA_0000_0000)));
        assert_eq!("FFFFFFFF/FFFFFFFF".parse::<Lsn>(), Ok(Lsn(u64::MAX)));
        for bad in [
            "",
            "/",
            "0/",
            "/0",
            "0",
            "0/1/2",
            "+0/1",
            "0/+1",
            " 0/1",
            "0/1 ",
            "G/0",
            "123456789/0",
            "0/123456789",
            "-1/0",
        ] {
            let err = bad.parse::<Lsn>().unwrap_err();
            assert!(matches!(err, PgOutputError::InvalidLsn(_)), "{bad:?}");
        }
    }

    #[test]
    fn lsn_text_round_trips() {
        for v in [
            0,
            1,
            0xFFFF_FFFF,
            0x1_0000_0000,
            0xDEAD_BEEF_0BAD_F00D,
            u64::MAX,
        ] {
            assert_eq!(Lsn(v).to_string().parse::<Lsn>(), Ok(Lsn(v)));
        }
    }

    #[test]
    fn timestamps_convert_between_epochs() {
        assert_eq!(PgTimestamp(0).to_unix_micros(), PG_EPOCH_UNIX_MICROS);
        assert_eq!(PgTimestamp(0).to_unix_millis(), 946_684_800_000);
        // 2024-01-01T00:00:00.123456Z
        let ts = PgTimestamp(757_382_400_123_456);
        assert_eq!(ts.to_unix_micros(), 1_704_067_200_123_456);
        assert_eq!(ts.to_unix_millis(), 1_704_067_200_123);
        assert_eq!(PgTimestamp::from_unix_micros(1_704_067_200_123_456), ts);
        assert_eq!(
            PgTimestamp::from_unix_millis(1_704_067_200_123),
            PgTimestamp(757_382_400_123_000)
        );
        // Before the Unix epoch, millis floor rather than truncate toward zero.
        assert_eq!(PgTimestamp::from_unix_micros(-1).to_unix_millis(), -1);
    }

    #[test]
    fn timestamps_saturate_and_keep_infinity() {
        assert_eq!(PgTimestamp(i64::MAX).to_unix_micros(), i64::MAX);
        assert_eq!(
            PgTimestamp::from_unix_micros(i64::MIN),
            PgTimestamp(i64::MIN)
        );
        assert_eq!(
            PgTimestamp::from_unix_millis(i64::MAX).to_unix_micros(),
            i64::MAX
        );
        let before = SystemTime::UNIX_EPOCH - std::time::Duration::from_micros(5);
        assert_eq!(PgTimestamp::from_system_time(before).to_unix_micros(), -5);
        assert!(PgTimestamp::now().0 > 0);
    }
}
