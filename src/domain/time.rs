//! Instants and spans of rollout time.
//!
//! The core never reads a clock: every function that needs "now" takes a [`Timestamp`] argument.
//! Timestamps are milliseconds since the Unix epoch, which is precise enough for soak times measured
//! in hours and days, cheap to compare, and serializes as a plain integer in the store.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A point in rollout time (virtual for the simulator, wall-clock for real providers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const fn from_millis(millis: i64) -> Timestamp {
        Timestamp(millis)
    }

    pub const fn as_millis(self) -> i64 {
        self.0
    }

    pub fn from_system_time(time: SystemTime) -> Timestamp {
        match time.duration_since(UNIX_EPOCH) {
            Ok(since) => Timestamp(millis(since)),
            Err(before) => Timestamp(-millis(before.duration())),
        }
    }

    pub fn to_system_time(self) -> SystemTime {
        let span = Duration::from_millis(self.0.unsigned_abs());
        let time = if self.0 >= 0 {
            UNIX_EPOCH.checked_add(span)
        } else {
            UNIX_EPOCH.checked_sub(span)
        };
        time.unwrap_or(UNIX_EPOCH)
    }

    /// Parses RFC 3339 (`2026-01-08T08:35:03.7944197Z`, any number of fractional digits).
    pub fn parse_rfc3339(text: &str) -> Option<Timestamp> {
        humantime::parse_rfc3339_weak(text.trim_end_matches('Z'))
            .ok()
            .map(Timestamp::from_system_time)
    }

    /// Saturating: a span too long for the calendar ends at the last representable instant.
    pub fn plus(self, span: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(millis(span)))
    }

    pub fn minus(self, span: Duration) -> Timestamp {
        Timestamp(self.0.saturating_sub(millis(span)))
    }

    /// The time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0).max(0) as u64)
    }

    /// RFC 3339 in UTC with second precision, e.g. `2026-11-28T17:00:00Z`. Instants outside
    /// 1970–9999 (a clock set wrong, a saturated deadline) are written as the nearest end.
    pub fn rfc3339(self) -> String {
        let clamped = self.0.clamp(0, LAST_RFC3339_MILLIS);
        humantime::format_rfc3339_seconds(Timestamp(clamped).to_system_time()).to_string()
    }

    /// Floors to a whole hour; used to give simulated tenants a tidy epoch.
    pub fn floor_hour(self) -> Timestamp {
        const HOUR_MS: i64 = 3_600_000;
        Timestamp(self.0.div_euclid(HOUR_MS) * HOUR_MS)
    }
}

/// 9999-12-31T23:59:59Z, the last instant RFC 3339 can write.
const LAST_RFC3339_MILLIS: i64 = 253_402_300_799_000;

/// A span in whole milliseconds, saturating at `i64::MAX`.
fn millis(span: Duration) -> i64 {
    i64::try_from(span.as_millis()).unwrap_or(i64::MAX)
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.rfc3339())
    }
}

/// Formats a span compactly for people: `3d 4h`, `45m`, `0s`.
pub fn format_span(span: Duration) -> String {
    let total_minutes = span.as_secs() / 60;
    let (days, hours, minutes) = (
        total_minutes / (24 * 60),
        (total_minutes / 60) % 24,
        total_minutes % 60,
    );
    let mut parts = Vec::new();
    if days > 0 {
        parts.push(format!("{days}d"));
    }
    if hours > 0 {
        parts.push(format!("{hours}h"));
    }
    if minutes > 0 && days == 0 {
        parts.push(format!("{minutes}m"));
    }
    if parts.is_empty() {
        return format!("{}s", span.as_secs());
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_graph_dates_with_seven_fractional_digits_and_none() {
        let precise = Timestamp::parse_rfc3339("2026-01-08T08:35:03.7944197Z").unwrap();
        let plain = Timestamp::parse_rfc3339("2026-01-08T08:35:03Z").unwrap();
        assert_eq!(precise.as_millis() - plain.as_millis(), 794);
        assert_eq!(plain.rfc3339(), "2026-01-08T08:35:03Z");
    }

    #[test]
    fn spans_format_for_people() {
        assert_eq!(format_span(Duration::from_secs(0)), "0s");
        assert_eq!(format_span(Duration::from_secs(45 * 60)), "45m");
        assert_eq!(
            format_span(Duration::from_secs(3 * 86_400 + 4 * 3600)),
            "3d 4h"
        );
    }

    #[test]
    fn since_never_goes_negative() {
        let a = Timestamp::from_millis(1_000);
        let b = Timestamp::from_millis(5_000);
        assert_eq!(b.since(a), Duration::from_secs(4));
        assert_eq!(a.since(b), Duration::ZERO);
    }
}

#[cfg(test)]
mod bounds {
    use super::*;

    /// Time arithmetic saturates and formatting never panics, whatever a clock or a plan says.
    #[test]
    fn arithmetic_saturates_and_every_instant_can_be_written() {
        let now = Timestamp::from_millis(1_767_600_000_000);
        assert_eq!(now.plus(Duration::MAX), Timestamp::from_millis(i64::MAX));
        assert_eq!(
            now.minus(Duration::MAX).as_millis(),
            now.as_millis() - i64::MAX
        );
        assert_eq!(
            Timestamp::from_millis(i64::MAX).rfc3339(),
            "9999-12-31T23:59:59Z"
        );
        assert_eq!(
            Timestamp::from_millis(i64::MIN).rfc3339(),
            "1970-01-01T00:00:00Z"
        );
        let before_1970 = UNIX_EPOCH - Duration::from_secs(86_400);
        assert_eq!(
            Timestamp::from_system_time(before_1970).as_millis(),
            -86_400_000
        );
        let _ = Timestamp::from_millis(i64::MIN).to_system_time();
        assert!(Timestamp::from_millis(5).since(Timestamp::from_millis(i64::MIN)) > Duration::ZERO);
    }
}
