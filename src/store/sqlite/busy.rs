//! Waiting for SQLite's write lock in short, even steps.
//!
//! SQLite's own busy handler (`busy_timeout`) sleeps longer the longer it
//! has waited: 1, 2, 5, 10 … up to 100 ms between tries. A writer in
//! another process that commits back to back frees the lock for a few
//! microseconds at a time, so a waiter that looks every 100 ms almost never
//! sees it free: the dispatcher stalled for a second at a time behind an
//! app's enqueue stream. This handler looks again every millisecond (every
//! 100 µs at first) until the same time limit.
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

/// The first tries after a lock is found held, at the short step.
const QUICK_TRIES: i32 = 10;
const QUICK_STEP: Duration = Duration::from_micros(100);
const STEP: Duration = Duration::from_millis(1);

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
    let step = if tries < QUICK_TRIES {
        QUICK_STEP
    } else {
        STEP
    };
    std::thread::sleep(step.min(left));
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gives_up_at_the_limit_and_not_before() {
        set_limit(Duration::from_millis(30));
        let t = Instant::now();
        let mut tries = 0;
        while wait(tries) {
            tries += 1;
        }
        let waited = t.elapsed();
        assert!(waited >= Duration::from_millis(30), "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
        // Short steps: far more tries than SQLite's own handler makes in
        // 30 ms (five).
        assert!(tries > 15, "{tries} tries");
        // A new lock starts a new wait.
        assert!(wait(0));
    }

    #[test]
    fn a_zero_limit_never_waits() {
        set_limit(Duration::ZERO);
        assert!(!wait(0));
    }
}
