//! The retry policy: how long to wait after a failed attempt, and when to
//! give up.

use std::time::Duration;

/// How failed attempts are retried.
///
/// The default schedule: after the n-th failed
/// attempt wait 30 s, 2 min, 10 min, 30 min, 1 h, 2 h, 4 h, 8 h, 16 h, then
/// 24 h for every later attempt; give up after 10 attempts. No jitter.
///
/// A policy is a plain value: [`RetryPolicy::delay_for`] is a pure function
/// of the attempt number (and, with jitter, of a seed the caller passes), so
/// it never reads the clock.
///
/// ```
/// use sqlite_outbox::RetryPolicy;
/// use std::time::Duration;
///
/// let policy = RetryPolicy::default();
/// assert_eq!(policy.delay_for(1), Some(Duration::from_secs(30)));
/// assert_eq!(policy.delay_for(9), Some(Duration::from_secs(16 * 3600)));
/// assert_eq!(policy.delay_for(10), None); // the 10th failure is final
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    schedule: Vec<Duration>,
    max_attempts: u32,
    jitter: f64,
}

/// The default schedule, in seconds; the last entry repeats.
const DEFAULT_SCHEDULE_SECS: [u64; 10] = [
    30, 120, 600, 1_800, 3_600, 7_200, 14_400, 28_800, 57_600, 86_400,
];

/// Default number of attempts before an event fails.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;

/// The longest delay a handler or a destination may ask for
/// ([`crate::HandlerError::retry_after`], [`crate::HandlerError::busy`],
/// [`crate::Ack::defer`]): 24 hours, the longest step of the default
/// schedule. An endpoint cannot park an event for years.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            schedule: DEFAULT_SCHEDULE_SECS
                .iter()
                .map(|&s| Duration::from_secs(s))
                .collect(),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            jitter: 0.0,
        }
    }
}

impl RetryPolicy {
    /// A policy with a custom schedule: entry `n - 1` is the wait after the
    /// n-th failed attempt, and the last entry repeats. An empty schedule
    /// retries at once. `max_attempts` keeps its default (10).
    pub fn from_schedule(schedule: impl IntoIterator<Item = Duration>) -> Self {
        RetryPolicy {
            schedule: schedule.into_iter().collect(),
            ..RetryPolicy::default()
        }
    }

    /// A policy that waits the same `delay` after every failure.
    pub fn constant(delay: Duration) -> Self {
        RetryPolicy::from_schedule([delay])
    }

    /// Give up after this many attempts (at least 1). Default: 10. Events
    /// may override it with [`crate::NewEvent::with_max_attempts`].
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts.max(1);
        self
    }

    /// Spread each delay by up to `fraction` of itself, up or down (clamped
    /// to 0.0..=1.0). Default: 0.0 (no jitter). With jitter, the delay
    /// depends on the seed given to [`RetryPolicy::jittered_delay`].
    pub fn with_jitter(mut self, fraction: f64) -> Self {
        self.jitter = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// The default number of attempts.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The wait after the `attempt`-th failed attempt (1-based), whatever
    /// `max_attempts` says. Attempt 0 is treated as 1.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let index = attempt.saturating_sub(1) as usize;
        match self.schedule.get(index).or(self.schedule.last()) {
            Some(d) => *d,
            None => Duration::ZERO,
        }
    }

    /// The wait after the `attempt`-th failed attempt, or `None` if that
    /// failure was the last one allowed.
    pub fn delay_for(&self, attempt: u32) -> Option<Duration> {
        (attempt < self.max_attempts).then(|| self.backoff(attempt))
    }

    /// [`RetryPolicy::backoff`] spread by the policy's jitter, using `seed`
    /// (an event's sequence number, say) as the only source of randomness.
    pub fn jittered_delay(&self, attempt: u32, seed: u64) -> Duration {
        let base = self.backoff(attempt);
        if self.jitter == 0.0 {
            return base;
        }
        // splitmix64: a well-spread value from any seed, no RNG state.
        let mut z = seed
            .wrapping_add(u64::from(attempt))
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let unit = (z >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
        let factor = 1.0 + self.jitter * (2.0 * unit - 1.0);
        // `mul_f64` panics past Duration::MAX; a huge base saturates instead.
        Duration::try_from_secs_f64(base.as_secs_f64() * factor.max(0.0)).unwrap_or(Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn jitter_on_the_longest_delay_saturates_instead_of_panicking() {
        let p = RetryPolicy::constant(Duration::MAX).with_jitter(0.5);
        for seed in 0..64 {
            let d = p.jittered_delay(1, seed);
            assert!(d >= Duration::MAX / 2, "{d:?}");
        }
    }

    #[test]
    fn default_schedule_is_30s_to_24h() {
        let p = RetryPolicy::default();
        let expected = [
            30, 120, 600, 1800, 3600, 7200, 14400, 28800, 57600, 86400, 86400, 86400,
        ];
        for (i, secs) in expected.iter().enumerate() {
            assert_eq!(
                p.backoff(i as u32 + 1),
                Duration::from_secs(*secs),
                "attempt {}",
                i + 1
            );
        }
        assert_eq!(p.backoff(0), Duration::from_secs(30));
        assert_eq!(p.max_attempts(), 10);
        assert_eq!(p.delay_for(10), None);
        assert_eq!(p.delay_for(9), Some(Duration::from_secs(57600)));
    }

    #[test]
    fn empty_schedule_retries_at_once() {
        let p = RetryPolicy::from_schedule([]);
        assert_eq!(p.delay_for(3), Some(Duration::ZERO));
    }

    proptest! {
        #[test]
        fn delay_is_monotonic_and_bounded(attempt in 0u32..1000) {
            let p = RetryPolicy::default();
            prop_assert!(p.backoff(attempt) <= p.backoff(attempt + 1));
            prop_assert!(p.backoff(attempt) <= Duration::from_secs(86_400));
            prop_assert_eq!(p.delay_for(attempt).is_some(), attempt < 10);
        }

        #[test]
        fn jitter_stays_within_its_fraction(attempt in 1u32..20, seed: u64, fraction in 0.0f64..1.0) {
            let p = RetryPolicy::default().with_jitter(fraction);
            let base = p.backoff(attempt).as_secs_f64();
            let got = p.jittered_delay(attempt, seed).as_secs_f64();
            prop_assert!(got >= base * (1.0 - fraction) - 1e-6);
            prop_assert!(got <= base * (1.0 + fraction) + 1e-6);
            prop_assert_eq!(p.jittered_delay(attempt, seed), p.jittered_delay(attempt, seed));
        }
    }
}
