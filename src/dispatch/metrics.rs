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
    pub past_max_run_time: u64,
    /// Outcomes given up on because the store refused them for good
    /// (read-only, corrupt, wrong schema) or a thread panicked while
    /// writing them; their events are redelivered after their leases run
    /// out.
    pub dropped_outcomes: u64,
    /// Writes (claims, outcomes) the dispatcher held back for up to a
    /// millisecond while the app enqueued fast in this process, to leave
    /// it SQLite's one writer; what arrived meanwhile went into the same
    /// write.
    pub writes_yielded_to_app: u64,
    /// [`Metrics::past_max_run_time`] under its old name.
    #[deprecated(since = "0.2.0", note = "use past_max_run_time")]
    #[serde(skip)]
    pub overran: u64,
    /// [`Metrics::writes_yielded_to_app`] under its old name.
    #[deprecated(since = "0.2.0", note = "use writes_yielded_to_app")]
    #[serde(skip)]
    pub paced: u64,
}

/// One counter of a dispatcher; with the `metrics` feature, every
/// increment also goes to the `metrics` facade under `name`.
#[derive(Debug)]
pub(crate) struct Counter {
    n: AtomicU64,
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    name: &'static str,
}

impl Counter {
    const fn named(name: &'static str) -> Counter {
        Counter {
            n: AtomicU64::new(0),
            name,
        }
    }

    fn get(&self) -> u64 {
        self.n.load(Ordering::Relaxed)
    }
}

/// Every counter: field, facade name, description.
macro_rules! counters {
    ($($field:ident, $name:literal, $help:literal;)*) => {
        #[derive(Debug)]
        pub(crate) struct Counters {
            $(pub(crate) $field: Counter,)*
        }

        impl Default for Counters {
            fn default() -> Self {
                Counters { $($field: Counter::named($name),)* }
            }
        }

        impl Counters {
            #[allow(deprecated)]
            pub(crate) fn snapshot(&self) -> Metrics {
                Metrics {
                    $($field: self.$field.get(),)*
                    overran: self.past_max_run_time.get(),
                    paced: self.writes_yielded_to_app.get(),
                }
            }

            /// Gives each counter's name its description and unit, for
            /// the app's recorder.
            #[cfg(feature = "metrics")]
            pub(crate) fn describe() {
                $(::metrics::describe_counter!($name, ::metrics::Unit::Count, $help);)*
                ::metrics::describe_histogram!(
                    HANDLER_DURATION,
                    ::metrics::Unit::Seconds,
                    "How long handlers ran, by event type."
                );
            }
        }
    };
}

counters! {
    claimed, "outbox_events_claimed_total", "Events claimed.";
    done, "outbox_deliveries_total", "Events recorded done.";
    retried, "outbox_retries_total", "Failed attempts recorded for a later retry.";
    failed, "outbox_failures_total", "Events recorded failed (permanent errors and last attempts).";
    panicked, "outbox_handler_panics_total", "Handler runs that panicked.";
    lease_lost, "outbox_leases_lost_total", "Outcomes or extensions refused because the lease had moved on.";
    extended, "outbox_lease_extensions_total", "Lease extensions written.";
    released, "outbox_events_released_total", "Claimed events given back unstarted.";
    held_back, "outbox_events_held_back_total", "Events given back because their destination was held back.";
    settle_batches, "outbox_outcome_writes_total", "Transactions that wrote outcomes.";
    claim_batches, "outbox_claim_batches_total", "Claim transactions that returned at least one event.";
    store_errors, "outbox_store_errors_total", "Database errors met (and retried) by the dispatcher.";
    thread_panics, "outbox_thread_panics_total", "Panics outside a handler caught by a thread's supervisor.";
    past_max_run_time, "outbox_handlers_overran_total", "Handlers that ran past max_run_time.";
    dropped_outcomes, "outbox_outcomes_dropped_total", "Outcomes given up on; their events are redelivered.";
    writes_yielded_to_app, "outbox_writes_paced_total", "Writes held back briefly to leave the app SQLite's one writer.";
}

/// The histogram of handler run times (`metrics` feature), labelled with
/// the event type as `type`.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) const HANDLER_DURATION: &str = "outbox_handler_duration_seconds";

impl Counters {
    pub(crate) fn add(counter: &Counter, n: u64) {
        counter.n.fetch_add(n, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        ::metrics::counter!(counter.name).increment(n);
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
