//! Waiting for SQLite's write lock in short, even steps.
//!
//! SQLite's own busy handler (`busy_timeout`) sleeps longer the longer it
//! has waited: 1, 2, 5, 10 … up to 100 ms between tries. A writer in
//! another process that commits back to back frees the lock for a few
//! microseconds at a time, so a waiter that looks every 100 ms almost never
//! sees it free: the dispatcher stalled for a second at a time behind an
//! app's enqueue stream. This handler looks again every 2 ms until the same
//! time limit.
//!
//! Why not more often: each time the lock changes hands between
//! connections, the new holder finds the file changed and drops its page
//! cache. With four dispatcher processes competing for the lock (the T5
//! test), looking every millisecond, and every 100 µs at first, halved
//! their combined rate (2,050 → 980 events/s); every 1 ms gave about
//! 1,520, every 2 ms 1,460–2,020 over six runs, against 1,860–2,080 with
//! SQLite's own handler in the same hour.
//!
//! SQLite hands a busy handler only the number of tries so far, so the time
//! limit and the start of the wait are kept per thread: SQLite calls the
//! handler on the thread that runs the statement, and the store sets the
//! limit whenever it hands a connection to a thread.

use std::cell::Cell;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::DEFAULT_BUSY_TIMEOUT;

thread_local! {
    static LIMIT: Cell<Duration> = const { Cell::new(DEFAULT_BUSY_TIMEOUT) };
    static STARTED: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The time between looks.
const STEP: Duration = Duration::from_millis(2);

/// Makes `conn` wait up to `limit` for a lock, in short steps.
pub(super) fn install(conn: &Connection, limit: Duration) -> rusqlite::Result<()> {
    set_limit(limit);
    conn.busy_handler(Some(wait))
}

/// The time limit for waits on this thread's next statements.
pub(super) fn set_limit(limit: Duration) {
    LIMIT.with(|l| l.set(limit));
}

/// SQLite's busy callback: `tries` is 0 on the first call for a lock.
/// Returns whether to try again.
fn wait(tries: i32) -> bool {
    let now = Instant::now();
    let started = if tries == 0 {
        STARTED.with(|s| s.set(Some(now)));
        now
    } else {
        STARTED.with(Cell::get).unwrap_or(now)
    };
    let Some(left) = LIMIT
        .with(Cell::get)
        .checked_sub(now.duration_since(started))
    else {
        return false;
    };
    if left.is_zero() {
        return false;
    }
    std::thread::sleep(STEP.min(left));
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gives_up_at_the_limit_and_not_before() {
        set_limit(Duration::from_millis(500));
        let t = Instant::now();
        let mut tries = 0;
        while wait(tries) {
            tries += 1;
        }
        let waited = t.elapsed();
        assert!(waited >= Duration::from_millis(500), "{waited:?}");
        assert!(waited < Duration::from_secs(10), "{waited:?}");
        // Short steps: more tries than SQLite's own handler makes in 500 ms
        // (twelve), even if a busy machine stretches each 2 ms sleep to 40.
        assert!(tries > 12, "{tries} tries");
        // A new lock starts a new wait.
        assert!(wait(0));
    }

    #[test]
    fn a_zero_limit_never_waits() {
        set_limit(Duration::ZERO);
        assert!(!wait(0));
    }
}
