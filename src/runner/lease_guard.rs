//! The lease an owner acts on the tenant under, as one rollout's actor holds it.
//!
//! A replica commits only under its lease (the commit is conditional on it), and a backend in the
//! store is written the same way; a real tenant cannot refuse a write for a lost lease. So an
//! owner confirms its lease in the database right before each effect, and, before each Graph write
//! of it, asks again whether that confirmation still vouches for the lease: a confirmation renews
//! the lease for its full length from (at the earliest) the moment it was asked, and no replica can
//! take the lease before it expires, so a write sent less than half a lease after it still has
//! half a lease to land before another owner could read the tenant. Past that the process may have
//! been stalled (paused, swapped out, starved) since: the lease is confirmed again before the
//! write is sent, and a lost lease stops it. What remains is a stall after the last check and
//! before the request leaves the process, which no check on this side can close.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::provider::{ProviderError, WriteGuard};
use crate::store::{Store, StoreError};

/// One rollout's lease, as its actor confirms it.
pub(super) struct LeaseGuard {
    store: Arc<Store>,
    rollout: String,
    lease: Duration,
    /// When the last confirmation that found the lease held was asked.
    confirmed: Mutex<Option<Instant>>,
}

/// Whether a confirmation asked at `confirmed` still vouches, at `now`, for a lease of `lease`:
/// less than half of it has passed since.
pub(super) fn vouches(confirmed: Option<Instant>, now: Instant, lease: Duration) -> bool {
    confirmed.is_some_and(|at| now.saturating_duration_since(at) < lease / 2)
}

impl LeaseGuard {
    pub(super) fn new(store: Arc<Store>, rollout: &str, lease: Duration) -> LeaseGuard {
        LeaseGuard {
            store,
            rollout: rollout.to_string(),
            lease,
            confirmed: Mutex::new(None),
        }
    }

    /// Renews the lease in the database if this replica still holds it at its epoch; `false`:
    /// lost (and forgotten).
    pub(super) fn confirm(&self) -> Result<bool, StoreError> {
        let asked = Instant::now();
        let held = self.store.confirm_lease(&self.rollout, self.lease)?;
        *self
            .confirmed
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = held.then_some(asked);
        Ok(held)
    }

    fn vouched(&self) -> bool {
        let confirmed = *self
            .confirmed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        vouches(confirmed, Instant::now(), self.lease)
    }
}

impl WriteGuard for LeaseGuard {
    fn before_write(&self) -> Result<(), ProviderError> {
        if self.vouched() {
            return Ok(());
        }
        match self.confirm() {
            Ok(true) => Ok(()),
            Ok(false) => {
                crate::metrics::global().fenced(true);
                tracing::warn!(rollout = %self.rollout, "the rollout's lease was lost before a write to the tenant: not sent");
                Err(ProviderError::transient(format!(
                    "rollout {}: the lease was lost before the write was sent (another replica drives it now)",
                    self.rollout
                )))
            }
            Err(e) => Err(ProviderError::transient(format!(
                "rollout {}: the lease could not be confirmed before the write, so it was not sent: {e}",
                self.rollout
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(2);

    #[test]
    fn a_fresh_confirmation_vouches_for_half_a_lease() {
        let at = Instant::now();
        assert!(vouches(Some(at), at, LEASE));
        assert!(vouches(Some(at), at + Duration::from_millis(999), LEASE));
        assert!(!vouches(Some(at), at + Duration::from_secs(1), LEASE));
    }

    #[test]
    fn a_stall_since_the_confirmation_or_none_at_all_asks_again() {
        let at = Instant::now();
        assert!(!vouches(None, at, LEASE));
        // SIGSTOP: the monotonic clock moves on while the process does not.
        assert!(!vouches(Some(at), at + Duration::from_secs(5), LEASE));
        // A confirmation read as later than now (never on a monotonic clock) vouches, bounded.
        assert!(vouches(Some(at + Duration::from_millis(10)), at, LEASE));
    }
}
