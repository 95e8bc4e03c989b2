//! Sharing the writer with an app that enqueues fast in this process.
//!
//! SQLite has one writer, and each write transaction costs about the same
//! however few rows it touches (it appends whole pages to the WAL). Left
//! alone, a dispatcher behind an app that commits one event at a time
//! claims and settles one event at a time too: about two of its
//! transactions for every one of the app's, which halved the app's enqueue
//! rate. So while the app enqueues fast (its last two enqueues less than
//! [`FAST`] apart, the last within [`RECENT`]), the dispatcher starts at
//! most one write transaction per [`MIN_GAP`], and what arrives meanwhile
//! (new events, outcomes) goes into its next one. Otherwise (an app that
//! enqueues now and then, or not at all) it writes at once, and the latency
//! from enqueue to handler stays a fraction of a millisecond.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::dispatch::{Counter, Counters};

/// The shortest time between the starts of two of the dispatcher's write
/// transactions while the app enqueues fast.
pub(super) const MIN_GAP: Duration = Duration::from_millis(1);

/// Enqueues closer together than this are fast (2,000 a second).
pub(super) const FAST: Duration = Duration::from_micros(500);

/// How long after its last enqueue the app still counts as enqueueing.
pub(super) const RECENT: Duration = Duration::from_millis(2);

#[derive(Default)]
pub(super) struct Pacer {
    /// The earliest start of the dispatcher's next write.
    next_write: Mutex<Option<Instant>>,
}

impl Pacer {
    /// How long the dispatcher's next write waits, given the app's last
    /// two enqueues in this process (latest first), and books its start.
    pub(super) fn book(&self, app_enqueues: [Option<Instant>; 2]) -> Duration {
        let mut next_write = self.next_write.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let app_fast = match app_enqueues {
            [Some(last), Some(before)] => {
                now.saturating_duration_since(last) < RECENT
                    && last.saturating_duration_since(before) < FAST
            }
            _ => false,
        };
        let start = match *next_write {
            Some(next) if app_fast => next.max(now),
            _ => now,
        };
        *next_write = Some(start + MIN_GAP);
        start - now
    }

    /// Waits for the dispatcher's turn to write; counts a wait in
    /// `paced`.
    pub(super) fn turn(&self, app_enqueues: [Option<Instant>; 2], paced: &Counter) {
        let wait = self.book(app_enqueues);
        if !wait.is_zero() {
            Counters::add(paced, 1);
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ago(d: Duration) -> Option<Instant> {
        Instant::now().checked_sub(d)
    }

    #[test]
    fn writes_at_once_unless_the_app_enqueues_fast() {
        let pacer = Pacer::default();
        let ms = Duration::from_millis;
        for app in [
            [None, None],
            [ago(ms(0)), None],
            // 1,000 a second: not fast.
            [ago(ms(0)), ago(ms(1))],
            // Fast, but a while ago.
            [ago(RECENT * 2), ago(RECENT * 2 + FAST / 2)],
        ] {
            assert_eq!(pacer.book(app), Duration::ZERO, "{app:?}");
            assert_eq!(pacer.book(app), Duration::ZERO, "{app:?}");
        }
    }

    #[test]
    fn spaces_writes_while_the_app_enqueues_fast() {
        let pacer = Pacer::default();
        let app = [ago(Duration::ZERO), ago(FAST / 2)];
        assert_eq!(pacer.book(app), Duration::ZERO);
        // Booked back to back: each waits one gap more than the last.
        let (second, third) = (pacer.book(app), pacer.book(app));
        assert!(second > MIN_GAP / 2 && second <= MIN_GAP, "{second:?}");
        assert!(third > second + MIN_GAP / 2, "{second:?} then {third:?}");
    }
}
