//! The one retry policy for every backend phasegate calls: Microsoft Graph, its sign-in
//! endpoint, and webhook receivers. One place, because two copies of "how patient are we"
//! drift apart, and a reviewer should be able to read the whole policy on one screen.
//!
//! The policy is a pure function: the caller says what went wrong ([`Failure`]), how many
//! attempts have failed, and what the backend asked for (`Retry-After`); [`Backoff::wait`]
//! answers whether to try again and after how long. The caller sleeps (or does not).
//!
//! Rules:
//! - `Retry-After` is honoured exactly, up to [`Backoff::longest_wait`]. A backend that asks for
//!   longer is not waited on in-line: the call fails, its error carrying the asked delay, and
//!   the rollout records the provider failure (failed, resumable by a person) instead of
//!   sleeping, so the actor stays responsive to commands.
//! - `longest_wait` also bounds all the waits of one operation together ([`Patience`]): a
//!   backend that asks for the longest wait again and again is waited on once, not once per
//!   attempt, and the call fails with its last asked delay like one that asked for longer.
//! - Otherwise capped exponential backoff with deterministic jitter (50–100 % of the step), so
//!   a fleet of callers does not retry in lockstep and tests see the same delays every run.
//! - A refused connection is an answer — nothing listens there. One quick retry covers a
//!   restarting service; more would only delay a clear error by the whole backoff budget.
//! - Whether a failed *write* may be retried at all is the caller's business (the change may
//!   have been made); this module only paces the attempts it is asked about.

use std::time::Duration;

/// What happened to one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The connection was refused: nothing is listening at that address.
    Refused,
    /// No answer: a timeout, a reset, a DNS failure, a body that never arrived.
    Transport,
    /// 429 (or 408): the backend is rate limiting.
    Throttled,
    /// 5xx: the backend is failing.
    Unavailable,
}

/// How patient to be with one kind of backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// The first backoff step.
    pub base: Duration,
    /// The largest backoff step.
    pub cap: Duration,
    /// The longest `Retry-After` waited on in-line.
    pub longest_wait: Duration,
}

/// A refused connection gets this many attempts at most.
const REFUSED_ATTEMPTS: u32 = 2;

impl Backoff {
    /// Microsoft Graph and its sign-in endpoint: throttling is routine (Intune and Conditional
    /// Access rate-limit per tenant), so be patient, but never for minutes in-line.
    pub const GRAPH: Backoff = Backoff {
        attempts: 8,
        base: Duration::from_millis(200),
        cap: Duration::from_secs(30),
        longest_wait: Duration::from_secs(120),
    };

    /// phasegate's own API, from the CLI: a 503 says nothing was done for a passing reason (a
    /// rollout's driver changing hands, a database session made again), gone within seconds.
    pub const API: Backoff = Backoff {
        attempts: 5,
        base: Duration::from_millis(250),
        cap: Duration::from_secs(2),
        longest_wait: Duration::from_secs(10),
    };

    /// Webhook receivers: a few attempts now; an undelivered notification stays in the outbox
    /// and is tried again on the next pass, so nothing is lost by giving up early.
    pub const WEBHOOK: Backoff = Backoff {
        attempts: 3,
        base: Duration::from_millis(500),
        cap: Duration::from_secs(10),
        longest_wait: Duration::from_secs(30),
    };

    /// The wait before the next attempt after `failed` attempts failed (1 after the first), or
    /// `None` when this failure should be given up on now. `seed` varies the jitter.
    pub fn wait(
        &self,
        failed: u32,
        failure: Failure,
        retry_after: Option<Duration>,
        seed: u64,
    ) -> Option<Duration> {
        let budget = match failure {
            Failure::Refused => self.attempts.min(REFUSED_ATTEMPTS),
            _ => self.attempts,
        };
        if failed == 0 || failed >= budget {
            return None;
        }
        match retry_after {
            Some(asked) if asked > self.longest_wait => None,
            Some(asked) => Some(asked),
            None => Some(self.step(failed, seed)),
        }
    }

    /// What one operation may wait in-line, all its retries together: `longest_wait`.
    pub fn patience(&self) -> Patience {
        Patience {
            left: self.longest_wait,
        }
    }

    /// The backoff step after `failed` failures, jittered to 50–100 %.
    pub fn step(&self, failed: u32, seed: u64) -> Duration {
        let exponential = self
            .base
            .saturating_mul(1u32 << failed.saturating_sub(1).min(16))
            .min(self.cap);
        exponential.mul_f64(0.5 + jitter(seed) / 2.0)
    }
}

/// The in-line waiting one operation has left ([`Backoff::patience`]). Every wait [`Backoff::wait`]
/// grants is taken from it; one that no longer fits means giving up now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Patience {
    left: Duration,
}

impl Patience {
    /// Takes `wait` from what is left, or nothing and `false` when it does not fit.
    pub fn spend(&mut self, wait: Duration) -> bool {
        match self.left.checked_sub(wait) {
            Some(left) => {
                self.left = left;
                true
            }
            None => false,
        }
    }

    /// The waiting left.
    pub fn left(&self) -> Duration {
        self.left
    }
}

/// A deterministic fraction in [0, 1) from a seed (Fibonacci hashing).
fn jitter(seed: u64) -> f64 {
    ((seed.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33) % 1000) as f64 / 1000.0
}

/// Classifies a failed HTTP send: refused, or another transport failure.
pub fn transport_failure(e: &reqwest::Error) -> Failure {
    let refused = e.is_connect()
        && causes(e).any(|cause| {
            cause
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        });
    if refused {
        Failure::Refused
    } else {
        Failure::Transport
    }
}

/// A failed send in words, with the underlying cause ("connection refused", "timed out"), which
/// reqwest's own message leaves out.
pub fn describe_transport(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".to_string();
    }
    let innermost = causes(e)
        .last()
        .map(ToString::to_string)
        .unwrap_or_default();
    let what = if e.is_connect() {
        "cannot connect"
    } else {
        "connection failed"
    };
    let innermost = innermost.to_lowercase();
    if innermost.is_empty() {
        what.to_string()
    } else if innermost.contains("refused") {
        format!("{what}: connection refused")
    } else {
        format!("{what}: {innermost}")
    }
}

fn causes<'e>(
    e: &'e (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'e (dyn std::error::Error + 'static)> {
    std::iter::successors(e.source(), |cause| cause.source())
}

/// Parses `Retry-After` (RFC 9110 §10.2.3): seconds (Graph sends fractional ones) or an HTTP
/// date. Anything else, negative, or beyond what a `Duration` holds is ignored.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds).ok();
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The status class of an HTTP answer worth retrying, if it is one.
pub fn status_failure(status: u16) -> Option<Failure> {
    match status {
        408 | 429 => Some(Failure::Throttled),
        500..=599 => Some(Failure::Unavailable),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Backoff = Backoff {
        attempts: 5,
        base: Duration::from_millis(100),
        cap: Duration::from_secs(1),
        longest_wait: Duration::from_secs(10),
    };

    #[test]
    fn steps_grow_exponentially_are_capped_and_jittered_into_the_upper_half() {
        for failed in 1..40 {
            for seed in 0..50 {
                let step = POLICY.step(failed, seed);
                let full = Duration::from_millis(100)
                    .saturating_mul(1 << (failed - 1).min(16))
                    .min(Duration::from_secs(1));
                assert!(
                    step >= full / 2 && step <= full,
                    "{failed} {seed}: {step:?}"
                );
            }
        }
        assert_eq!(POLICY.step(3, 7), POLICY.step(3, 7), "deterministic");
        let seeds: std::collections::BTreeSet<_> = (0..50).map(|s| POLICY.step(1, s)).collect();
        assert!(seeds.len() > 10, "the jitter spreads callers out");
    }

    #[test]
    fn the_budget_counts_the_first_attempt() {
        let waits: Vec<_> = (1..=6)
            .map(|failed| POLICY.wait(failed, Failure::Unavailable, None, 0))
            .collect();
        assert!(waits[..4].iter().all(Option::is_some));
        assert_eq!(&waits[4..], &[None, None]);
        assert_eq!(
            POLICY.wait(0, Failure::Transport, None, 0),
            None,
            "nothing failed yet"
        );
    }

    #[test]
    fn retry_after_is_honoured_exactly_up_to_the_longest_wait() {
        let asked = Duration::from_millis(2128);
        assert_eq!(
            POLICY.wait(1, Failure::Throttled, Some(asked), 0),
            Some(asked)
        );
        assert_eq!(
            POLICY.wait(1, Failure::Throttled, Some(Duration::from_secs(10)), 0),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            POLICY.wait(1, Failure::Throttled, Some(Duration::from_secs(11)), 0),
            None,
            "longer waits go to the engine's schedule"
        );
        assert_eq!(
            POLICY.wait(1, Failure::Throttled, Some(Duration::ZERO), 0),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn one_operation_waits_at_most_the_longest_wait_in_all() {
        // A backend that asks for the longest wait on every answer is waited on once.
        let mut patience = POLICY.patience();
        let asked = Some(POLICY.longest_wait);
        let mut waited = Duration::ZERO;
        let mut failed = 1;
        while let Some(wait) = POLICY
            .wait(failed, Failure::Throttled, asked, 0)
            .filter(|&wait| patience.spend(wait))
        {
            waited += wait;
            failed += 1;
        }
        assert_eq!(waited, POLICY.longest_wait);
        assert_eq!(failed, 2, "gave up at the second answer");
        assert_eq!(patience.left(), Duration::ZERO);

        // Shorter waits are granted until they no longer fit, and a refused one takes nothing.
        let mut patience = POLICY.patience();
        assert!(patience.spend(Duration::from_secs(4)));
        assert!(patience.spend(Duration::from_secs(4)));
        assert!(!patience.spend(Duration::from_secs(4)));
        assert_eq!(patience.left(), Duration::from_secs(2));
        assert!(patience.spend(Duration::from_secs(2)));
    }

    #[test]
    fn a_refused_connection_gets_one_quick_retry() {
        assert!(POLICY.wait(1, Failure::Refused, None, 0).is_some());
        assert_eq!(POLICY.wait(2, Failure::Refused, None, 0), None);
        let single = Backoff {
            attempts: 1,
            ..POLICY
        };
        assert_eq!(single.wait(1, Failure::Refused, None, 0), None);
    }

    #[test]
    fn the_shipped_policies_give_up_within_bounded_time() {
        for policy in [Backoff::GRAPH, Backoff::WEBHOOK] {
            let mut total = Duration::ZERO;
            let mut failed = 1;
            while let Some(wait) = policy.wait(failed, Failure::Unavailable, None, failed.into()) {
                total += wait;
                failed += 1;
            }
            assert_eq!(failed, policy.attempts);
            assert!(total < Duration::from_secs(120), "{policy:?}: {total:?}");
        }
    }

    #[test]
    fn retry_after_values_out_of_range_are_ignored_not_fatal() {
        let now = std::time::SystemTime::now();
        for nonsense in [
            "-1",
            "1e30",
            "NaN",
            "inf",
            "",
            "soon",
            "18446744073709551616",
        ] {
            assert_eq!(parse_retry_after(nonsense, now), None, "{nonsense}");
        }
        assert_eq!(
            parse_retry_after(" 0.5 ", now),
            Some(Duration::from_millis(500))
        );
    }

    #[test]
    fn statuses_worth_retrying() {
        assert_eq!(status_failure(429), Some(Failure::Throttled));
        assert_eq!(status_failure(408), Some(Failure::Throttled));
        assert_eq!(status_failure(503), Some(Failure::Unavailable));
        assert_eq!(status_failure(404), None);
        assert_eq!(status_failure(200), None);
    }

    #[tokio::test]
    async fn a_refused_connection_is_named_as_such() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = reqwest::get(format!("http://127.0.0.1:{port}/"))
            .await
            .unwrap_err();
        assert_eq!(transport_failure(&e), Failure::Refused);
        assert_eq!(describe_transport(&e), "cannot connect: connection refused");
    }
}
