//! What a dispatcher counts, and what its shutdown reports.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of a dispatcher since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Metrics {
    /// Events claimed.
    pub claimed: u64,
    /// Events recorded done.
    pub done: u64,
    /// Failed attempts recorded for a later retry.
    pub retried: u64,
    /// Events recorded failed (permanent errors and last attempts).
    pub failed: u64,
    /// Handler runs that panicked (also counted as retried or failed).
    pub panicked: u64,
    /// Outcomes or extensions refused because the lease had moved on.
    pub lease_lost: u64,
    /// Lease extensions written.
    pub extended: u64,
    /// Claimed events given back unstarted.
    pub released: u64,
    /// Events given back without spending their attempt because their
    /// destination could not be reached ([`crate::HandlerError::unavailable`])
    /// or was held back (paused, unreachable, or the dispatcher offline).
    pub held_back: u64,
    /// Transactions that wrote outcomes (each may carry many).
    pub settle_batches: u64,
    /// Claim transactions that returned at least one event.
    pub claim_batches: u64,
    /// Database errors met (and retried) by the dispatcher's loops.
    pub store_errors: u64,
    /// Panics outside a handler (in a `Display` of an error, a `tracing`
    /// subscriber, the dispatcher itself) caught by the thread's
    /// supervisor, which released what the thread held and restarted it.
    pub thread_panics: u64,
    /// Handlers that ran past the builder's `max_run_time`; their leases
    /// were left to run out.
    pub overran: u64,
    /// Outcomes given up on because the store refused them for good
    /// (read-only, corrupt, wrong schema) or a thread panicked while
    /// writing them; their events are redelivered after their leases run
    /// out.
    pub dropped_outcomes: u64,
    /// Writes (claims, outcomes) the dispatcher held back for up to a
    /// millisecond while the app enqueued fast in this process, to leave
    /// it SQLite's one writer; what arrived meanwhile went into the same
    /// write.
    pub paced: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) claimed: AtomicU64,
    pub(crate) done: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) panicked: AtomicU64,
    pub(crate) lease_lost: AtomicU64,
    pub(crate) extended: AtomicU64,
    pub(crate) released: AtomicU64,
    pub(crate) held_back: AtomicU64,
    pub(crate) settle_batches: AtomicU64,
    pub(crate) claim_batches: AtomicU64,
    pub(crate) store_errors: AtomicU64,
    pub(crate) thread_panics: AtomicU64,
    pub(crate) overran: AtomicU64,
    pub(crate) dropped_outcomes: AtomicU64,
    pub(crate) paced: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Metrics {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Metrics {
            claimed: get(&self.claimed),
            done: get(&self.done),
            retried: get(&self.retried),
            failed: get(&self.failed),
            panicked: get(&self.panicked),
            lease_lost: get(&self.lease_lost),
            extended: get(&self.extended),
            released: get(&self.released),
            held_back: get(&self.held_back),
            settle_batches: get(&self.settle_batches),
            claim_batches: get(&self.claim_batches),
            store_errors: get(&self.store_errors),
            thread_panics: get(&self.thread_panics),
            overran: get(&self.overran),
            dropped_outcomes: get(&self.dropped_outcomes),
            paced: get(&self.paced),
        }
    }
}

/// What [`crate::Dispatcher::shutdown`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Outcomes (done, retry, failed) written after shutdown began.
    pub completed: u64,
    /// Claimed events given back unstarted, their attempt not spent.
    pub released: u64,
    /// Handlers still running at the deadline.
    pub still_running: usize,
    /// Outcomes that could not be written (the store kept failing); their
    /// events are redelivered after their leases run out.
    pub unwritten: usize,
    /// The dispatcher's counters at the end.
    pub metrics: Metrics,
    /// With [`crate::Dispatcher::drain`]: the queue was idle when it stopped (not
    /// the timeout).
    pub idle: bool,
}

impl ShutdownReport {
    /// True if every handler finished, every outcome was written and no
    /// thread of the dispatcher panicked.
    pub fn is_clean(&self) -> bool {
        self.still_running == 0
            && self.unwritten == 0
            && self.metrics.thread_panics == 0
            && self.metrics.dropped_outcomes == 0
    }
}
