//! Time as the outbox sees it, injectable so tests need no sleeps.

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

/// A source of the current time.
///
/// The stores read every timestamp they write (due times, leases, completion
/// times) from their clock, so a [`ManualClock`] makes backoff, lease expiry
/// and retention testable without waiting.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;
}

/// The operating system's wall clock.
///
/// Leases compare times written by different processes, so processes that
/// share a file must have roughly synchronised clocks: a clock that runs
/// ahead sees leases expire early (fencing keeps outcomes correct, but an
/// event may be delivered twice), one that runs behind reclaims late.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that only moves when told to. Clones share the same time.
///
/// ```
/// use sqlite_outbox::{Clock, ManualClock};
/// use std::time::Duration;
///
/// let clock = ManualClock::new();
/// let t0 = clock.now();
/// clock.advance(Duration::from_secs(30));
/// assert_eq!((clock.now() - t0).num_seconds(), 30);
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock {
    millis: Arc<AtomicI64>,
}

impl ManualClock {
    /// A manual clock set to the current wall-clock time (whole milliseconds).
    pub fn new() -> Self {
        ManualClock::at(Utc::now())
    }

    /// A manual clock set to `at` (truncated to milliseconds).
    pub fn at(at: DateTime<Utc>) -> Self {
        ManualClock {
            millis: Arc::new(AtomicI64::new(at.timestamp_millis())),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.millis.fetch_add(duration_millis(by), Ordering::SeqCst);
    }

    /// Sets the clock to `at`, forwards or backwards.
    pub fn set(&self, at: DateTime<Utc>) {
        self.millis.store(at.timestamp_millis(), Ordering::SeqCst);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        from_millis(self.millis.load(Ordering::SeqCst))
    }
}

/// The earliest time the schema stores: 1973-03-03T09:46:40Z, the first
/// millisecond count with 12 digits. Smaller numbers in a time column are
/// refused by the schema: they are almost surely seconds.
pub(crate) const MIN_STORED_MILLIS: i64 = 100_000_000_000;

/// The latest time the schema stores: the last millisecond of 9999.
pub(crate) const MAX_STORED_MILLIS: i64 = 253_402_300_799_999;

/// Milliseconds since the Unix epoch: the stored form of every time,
/// clamped to the range the schema accepts (a delay of `Duration::MAX`
/// means "the end of 9999", not an error).
pub(crate) fn to_millis(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
        .clamp(MIN_STORED_MILLIS, MAX_STORED_MILLIS)
}

/// The inverse of [`to_millis`], saturating at chrono's range.
pub(crate) fn from_millis(millis: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(millis)
        .single()
        .unwrap_or(if millis < 0 {
            DateTime::<Utc>::MIN_UTC
        } else {
            DateTime::<Utc>::MAX_UTC
        })
}

/// A duration in whole milliseconds, saturating.
pub(crate) fn duration_millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `at + d` in whole milliseconds, saturating at the range the schema
/// stores instead of overflowing.
pub(crate) fn add(at: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    let millis = to_millis(at).saturating_add(duration_millis(d));
    from_millis(millis.min(MAX_STORED_MILLIS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_clones_share_time() {
        let a = ManualClock::new();
        let b = a.clone();
        a.advance(Duration::from_millis(1500));
        assert_eq!(a.now(), b.now());
        let t = from_millis(0);
        b.set(t);
        assert_eq!(a.now(), t);
    }

    #[test]
    fn arithmetic_saturates() {
        let far = add(Utc::now(), Duration::MAX);
        assert_eq!(far, from_millis(MAX_STORED_MILLIS));
        assert_eq!(far.to_rfc3339(), "9999-12-31T23:59:59.999+00:00");
        assert_eq!(to_millis(from_millis(0)), MIN_STORED_MILLIS);
        assert_eq!(from_millis(i64::MIN), DateTime::<Utc>::MIN_UTC);
    }
}
