//! Execution: a pool of worker threads that claims due events, runs their
//! handlers and records the outcomes.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::event::Event;
use crate::retry::RetryPolicy;
use crate::store::{Store, DEFAULT_LEASE};

mod handler;
mod runtime;

pub use handler::{Handler, HandlerError, MAX_RETRY_AFTER};

/// Default number of worker threads.
pub const DEFAULT_WORKERS: usize = 4;
/// Default number of events claimed in one transaction.
pub const DEFAULT_BATCH_SIZE: usize = 64;
/// Default interval at which commits by other processes are looked for.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Default time [`Dispatcher`]'s `Drop` gives running handlers.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Sets up a dispatcher: see [`Dispatcher::builder`].
#[must_use]
pub struct DispatcherBuilder {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) handlers: HashMap<String, Arc<dyn Handler>>,
    pub(crate) fallback: Option<Arc<dyn Handler>>,
    pub(crate) workers: usize,
    pub(crate) batch_size: usize,
    pub(crate) lease: Duration,
    pub(crate) max_run_time: Option<Duration>,
    pub(crate) poll_interval: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) name: String,
}

impl fmt::Debug for DispatcherBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut types: Vec<&String> = self.handlers.keys().collect();
        types.sort();
        f.debug_struct("DispatcherBuilder")
            .field("store", &self.store)
            .field("handlers", &types)
            .field("fallback", &self.fallback.is_some())
            .field("workers", &self.workers)
            .field("batch_size", &self.batch_size)
            .field("lease", &self.lease)
            .field("poll_interval", &self.poll_interval)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .finish()
    }
}

impl DispatcherBuilder {
    /// Runs the closure `handler` for events of `event_type` (a string, or
    /// a [`crate::catalog::OutboxEventType`]). A later call for the same
    /// type replaces the handler. The closure's argument needs no type:
    /// `.handle("note.created", |event| ...)`.
    pub fn handle<F>(self, event_type: impl Into<String>, handler: F) -> Self
    where
        F: Fn(&Event) -> std::result::Result<(), HandlerError> + Send + Sync + 'static,
    {
        self.handler(event_type, handler)
    }

    /// Like [`DispatcherBuilder::handle`], for a type that implements
    /// [`Handler`] itself.
    pub fn handler(mut self, event_type: impl Into<String>, handler: impl Handler) -> Self {
        self.handlers.insert(event_type.into(), Arc::new(handler));
        self
    }

    /// Runs `handler` for events of every type without its own handler.
    /// Default: none, and then only types with a handler are claimed, so
    /// several processes can split the work by type.
    pub fn fallback<F>(mut self, handler: F) -> Self
    where
        F: Fn(&Event) -> std::result::Result<(), HandlerError> + Send + Sync + 'static,
    {
        self.fallback = Some(Arc::new(handler));
        self
    }

    /// Number of worker threads (at least 1). Default: 4.
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Most events claimed in one transaction (at least 1). Default: 64.
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// How long a claim holds before another dispatcher may take the event
    /// over. Leases of running handlers are extended at half-life, so this
    /// bounds how soon a crashed process's events are redelivered, not how
    /// long a handler may run. Default: 60 s.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// The longest an event may stay in hand, from its claim, before its
    /// lease is left to run out: after this, the event is no longer extended, so another worker or
    /// process claims it once the lease ends, and the late handler's
    /// outcome is refused ([`crate::ErrorKind::LeaseLost`]). The thread
    /// itself cannot be stopped; it is reported when it finishes. Default:
    /// no limit.
    pub fn max_run_time(mut self, limit: Duration) -> Self {
        self.max_run_time = Some(limit);
        self
    }

    /// How often commits by other processes are looked for (a cheap
    /// `PRAGMA data_version` read). In-process enqueues wake the dispatcher
    /// at once. Default: 500 ms.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How long dropping the dispatcher waits for running handlers.
    /// Default: 30 s.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// A name for this dispatcher's threads (`NAME-poller`,
    /// `NAME-worker-N`, ...). Default: `outbox`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Starts the threads.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for zero workers, batch size, lease or poll interval,
    /// or when no handler is registered; an I/O error if a thread cannot be
    /// spawned.
    pub fn start(self) -> Result<Dispatcher> {
        if self.workers == 0 || self.batch_size == 0 {
            return Err(Error::invalid("workers and batch_size must be at least 1"));
        }
        if self.lease.is_zero() || self.poll_interval.is_zero() {
            return Err(Error::invalid("lease and poll_interval must be positive"));
        }
        if self.handlers.is_empty() && self.fallback.is_none() {
            return Err(Error::invalid("the dispatcher has no handler"));
        }
        runtime::start(self)
    }
}

/// A running pool of worker threads delivering events from a [`Store`].
///
/// Created by [`Dispatcher::builder`]. The dispatcher owns its threads: call
/// [`Dispatcher::shutdown`] to stop them with a deadline and get a report;
/// dropping it shuts down with the builder's `shutdown_timeout`.
#[must_use = "dropping a Dispatcher shuts it down"]
pub struct Dispatcher {
    pub(crate) runtime: Option<runtime::Runtime>,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) policy: RetryPolicy,
}

impl fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatcher")
            .field("running", &self.runtime.is_some())
            .field("metrics", &self.metrics())
            .finish()
    }
}

impl Dispatcher {
    /// A builder for a dispatcher over `store`, with defaults: 4 workers,
    /// batches of 64, 60 s leases, 500 ms polling and the store's retry
    /// policy.
    ///
    /// `store` is a [`crate::SqliteStore`], a [`crate::MemoryStore`] or an
    /// `Arc<dyn Store>`.
    pub fn builder(store: impl Into<Arc<dyn Store>>) -> DispatcherBuilder {
        DispatcherBuilder {
            store: store.into(),
            handlers: HashMap::new(),
            fallback: None,
            workers: DEFAULT_WORKERS,
            batch_size: DEFAULT_BATCH_SIZE,
            lease: DEFAULT_LEASE,
            max_run_time: None,
            poll_interval: DEFAULT_POLL_INTERVAL,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            name: "outbox".to_owned(),
        }
    }

    /// Counters since start.
    pub fn metrics(&self) -> Metrics {
        self.runtime
            .as_ref()
            .map(|r| r.counters.snapshot())
            .unwrap_or_default()
    }

    /// Makes the dispatcher look for due events now, e.g. after rows were
    /// inserted with plain SQL in this process (enqueues through this crate
    /// wake it by themselves).
    pub fn wake(&self) {
        if let Some(r) = &self.runtime {
            r.wake();
        }
    }

    /// The retry policy in force (the store's).
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// Runs until the queue is idle, then shuts down: returns once nothing
    /// of this dispatcher's types is due or being handled and every outcome
    /// is written, or once `timeout` has passed. Events scheduled for later
    /// (retries, delayed events) do not keep it waiting. For tests, batch
    /// programs and short-lived processes that deliver what is there and
    /// exit.
    ///
    /// ```
    /// use sqlite_outbox::prelude::*;
    /// use std::time::Duration;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let store = SqliteStore::open(dir.path().join("app.db"))?;
    /// store.enqueue(NewEvent::new("ping", serde_json::json!({})))?;
    /// let report = Dispatcher::builder(store.clone())
    ///     .handle("ping", |_event| Ok(()))
    ///     .start()?
    ///     .drain(Duration::from_secs(10));
    /// assert!(report.idle);
    /// assert_eq!(report.metrics.done, 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn drain(mut self, timeout: Duration) -> ShutdownReport {
        let Some(runtime) = self.runtime.take() else {
            return ShutdownReport::default();
        };
        let deadline = std::time::Instant::now() + timeout;
        let mut idle = false;
        while std::time::Instant::now() < deadline {
            match runtime.is_idle() {
                Ok(true) => {
                    idle = true;
                    break;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "outbox drain could not read the backlog"),
            }
            runtime.wake();
            std::thread::sleep(Duration::from_millis(5));
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut report = runtime.shutdown(left.max(Duration::from_secs(1)));
        report.idle = idle;
        report
    }

    /// Stops claiming, lets running handlers finish until `deadline`, gives
    /// back events that were claimed but not started (without spending
    /// their attempt), writes every outcome and joins the threads.
    ///
    /// Handlers still running at the deadline are reported and left to
    /// finish on their own threads; their events are redelivered once their
    /// leases run out.
    pub fn shutdown(mut self, deadline: Duration) -> ShutdownReport {
        match self.runtime.take() {
            Some(runtime) => runtime.shutdown(deadline),
            None => ShutdownReport::default(),
        }
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            let report = runtime.shutdown(self.shutdown_timeout);
            if report.still_running > 0 {
                tracing::warn!(
                    still_running = report.still_running,
                    "outbox dispatcher dropped with handlers still running"
                );
            }
        }
    }
}

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
    pub(crate) settle_batches: AtomicU64,
    pub(crate) claim_batches: AtomicU64,
    pub(crate) store_errors: AtomicU64,
    pub(crate) thread_panics: AtomicU64,
    pub(crate) overran: AtomicU64,
    pub(crate) dropped_outcomes: AtomicU64,
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
            settle_batches: get(&self.settle_batches),
            claim_batches: get(&self.claim_batches),
            store_errors: get(&self.store_errors),
            thread_panics: get(&self.thread_panics),
            overran: get(&self.overran),
            dropped_outcomes: get(&self.dropped_outcomes),
        }
    }
}

/// What [`Dispatcher::shutdown`] did.
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
    /// With [`Dispatcher::drain`]: the queue was idle when it stopped (not
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
