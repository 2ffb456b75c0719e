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
            Ok(since) => Timestamp(since.as_millis() as i64),
            Err(before) => Timestamp(-(before.duration().as_millis() as i64)),
        }
    }

    pub fn to_system_time(self) -> SystemTime {
        if self.0 >= 0 {
            UNIX_EPOCH + Duration::from_millis(self.0 as u64)
        } else {
            UNIX_EPOCH - Duration::from_millis(self.0.unsigned_abs())
        }
    }

    /// Parses RFC 3339 (`2026-01-08T08:35:03.7944197Z`, any number of fractional digits).
    pub fn parse_rfc3339(text: &str) -> Option<Timestamp> {
        humantime::parse_rfc3339_weak(text.trim_end_matches('Z'))
            .ok()
            .map(Timestamp::from_system_time)
    }

    pub fn plus(self, span: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(span.as_millis() as i64))
    }

    pub fn minus(self, span: Duration) -> Timestamp {
        Timestamp(self.0.saturating_sub(span.as_millis() as i64))
    }

    /// The time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0).max(0) as u64)
    }

    /// RFC 3339 in UTC with second precision, e.g. `2026-11-28T17:00:00Z`.
    pub fn rfc3339(self) -> String {
        humantime::format_rfc3339_seconds(self.to_system_time()).to_string()
    }

    /// Floors to a whole hour; used to give simulated tenants a tidy epoch.
    pub fn floor_hour(self) -> Timestamp {
        const HOUR_MS: i64 = 3_600_000;
        Timestamp(self.0.div_euclid(HOUR_MS) * HOUR_MS)
    }
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
