//! Seeded fault injection: whether and how the n-th Graph request misbehaves.
//!
//! The decision is a pure function of the seed, the request's index and whether it writes, so a
//! run with the same seed and the same request order meets the same faults.

use std::time::Duration;

/// What goes wrong with one request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    /// 429 with a (fractional) `Retry-After`; nothing is applied.
    ThrottledWithRetryAfter(f64),
    /// 429 without `Retry-After` (as Conditional Access and often Intune answer).
    ThrottledBare,
    /// 503; nothing is applied.
    Unavailable,
    /// Answered correctly, but only after this delay.
    Slow(Duration),
    /// A write is applied, then the connection is dropped before the response.
    DropAfterApply,
}

fn mix(seed: u64, salt: u64) -> u64 {
    let mut z = seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn unit(hash: u64) -> f64 {
    (hash >> 11) as f64 / (1u64 << 53) as f64
}

/// The fault for request `index`, if any, at the given rate (0.0 to 1.0).
pub fn fault_for(seed: u64, rate: f64, index: u64, writes: bool) -> Option<Fault> {
    if rate <= 0.0 || unit(mix(seed ^ 0xFA17, index)) >= rate {
        return None;
    }
    let kind = unit(mix(seed ^ 0x4B1D, index));
    let size = unit(mix(seed ^ 0x512E, index));
    Some(match kind {
        k if k < 0.30 => {
            Fault::ThrottledWithRetryAfter(0.05 + (size * 0.5 * 1000.0).round() / 1000.0)
        }
        k if k < 0.50 => Fault::ThrottledBare,
        k if k < 0.70 => Fault::Unavailable,
        k if k < 0.85 || !writes => Fault::Slow(Duration::from_millis(50 + (size * 250.0) as u64)),
        _ => Fault::DropAfterApply,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_respected_and_decisions_are_repeatable() {
        let faulty = (0..10_000)
            .filter(|&i| fault_for(7, 0.2, i, true).is_some())
            .count();
        assert!((1_800..2_200).contains(&faulty), "{faulty}");
        assert_eq!(fault_for(7, 0.2, 42, true), fault_for(7, 0.2, 42, true));
        assert!((0..1000).all(|i| fault_for(7, 0.0, i, true).is_none()));
    }

    #[test]
    fn reads_are_never_dropped_after_apply() {
        assert!((0..10_000).all(|i| fault_for(3, 1.0, i, false) != Some(Fault::DropAfterApply)));
        assert!((0..10_000).any(|i| fault_for(3, 1.0, i, true) == Some(Fault::DropAfterApply)));
    }
}
