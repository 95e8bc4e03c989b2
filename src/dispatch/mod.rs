//! Execution: a pool of worker threads that claims due events, runs their
//! handlers and records the outcomes.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::event::Event;
use crate::retry::RetryPolicy;
use crate::store::{Store, DEFAULT_LEASE};

mod builder;
mod destinations;
mod handler;
mod limits;
mod metrics;
mod runtime;

pub use builder::DispatcherBuilder;
pub use destinations::{DestinationState, Hold};
use destinations::{FIRST_PROBE_AFTER, MAX_PROBE_INTERVAL};
pub use handler::{BatchFn, BatchResult, Handler, HandlerError, MAX_RETRY_AFTER};
pub use limits::Limit;
pub(crate) use metrics::{Counter, Counters};
pub use metrics::{Metrics, ShutdownReport};

/// Default number of worker threads.
pub const DEFAULT_WORKERS: usize = 4;
/// Default number of events claimed in one transaction.
pub const DEFAULT_BATCH_SIZE: usize = 64;
/// Default interval at which commits by other processes are looked for.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Default time [`Dispatcher`]'s `Drop` gives running handlers.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// The first wait before a held-back destination is probed: 1 s.
    pub const FIRST_PROBE_AFTER: Duration = FIRST_PROBE_AFTER;
    /// The longest wait between probes of a destination: 5 min.
    pub const MAX_PROBE_INTERVAL: Duration = MAX_PROBE_INTERVAL;

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
            routes: HashMap::new(),
            default_destination: None,
            limits: Vec::new(),
            max_age: None,
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

    /// Why the dispatcher stopped claiming by itself, if it did: the store
    /// found the outbox's tables not as this build expects them (a column
    /// dropped or changed by hand, a newer schema), which no retry mends.
    /// Events already claimed still finish. `None` while it claims.
    pub fn halted(&self) -> Option<String> {
        self.runtime.as_ref().and_then(|r| r.halted())
    }

    /// Makes the dispatcher look for due events now, e.g. after rows were
    /// inserted with plain SQL in this process (enqueues through this crate
    /// wake it by themselves).
    pub fn wake(&self) {
        if let Some(r) = &self.runtime {
            r.wake();
        }
    }

    /// Holds back every event of `destination` (an event type, or a name
    /// given with [`DispatcherBuilder::destination`]) until
    /// [`Dispatcher::resume`]: nothing of it is claimed or probed, and no
    /// attempt is spent. For an app that knows a server is down, or wants
    /// to stop sending somewhere for a while. Events already running
    /// finish; those claimed but not started go back.
    pub fn pause(&self, destination: &str) {
        if let Some(r) = &self.runtime {
            r.destinations.pause(destination);
        }
    }

    /// Delivers the events of `destination` again, whether it was paused
    /// or found unreachable, at once: its events waiting out a retry's
    /// backoff are made due now (their attempts kept).
    pub fn resume(&self, destination: &str) {
        if let Some(r) = &self.runtime {
            r.destinations.resume(destination);
            let types = r.destinations.types_of(destination, r.types.as_deref());
            r.skip_backoff(types.as_deref());
        }
    }

    /// Tells the dispatcher whether the device is online, from the
    /// operating system's connectivity callbacks, say. Offline, nothing is
    /// claimed and nothing is probed: no CPU, no attempts. Back online,
    /// every destination found unreachable is released (one paused with
    /// [`Dispatcher::pause`] stays paused until [`Dispatcher::resume`]),
    /// events waiting out a retry's backoff are made due now (their
    /// attempts kept), and delivery starts at once.
    pub fn set_online(&self, online: bool) {
        if let Some(r) = &self.runtime {
            r.destinations.set_online(online);
            if online {
                let types = r.types.clone();
                r.skip_backoff(types.as_deref());
            }
        }
    }

    /// The destinations held back now (paused, or unreachable and being
    /// probed), by name.
    pub fn destinations(&self) -> Vec<DestinationState> {
        self.runtime
            .as_ref()
            .map(|r| r.destinations.snapshot())
            .unwrap_or_default()
    }

    /// False after [`Dispatcher::set_online`]`(false)`, until it is set
    /// back.
    pub fn is_online(&self) -> bool {
        self.runtime
            .as_ref()
            .is_some_and(|r| !r.destinations.is_offline())
    }

    /// The retry policy in force (the store's).
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// Waits, without stopping, until the queue is idle (as
    /// [`Dispatcher::drain`] means it: nothing of this dispatcher's types
    /// due or being handled, every outcome written) or `timeout` has
    /// passed; true if it became idle. The dispatcher goes on running:
    /// for an app that wants what it just wrote delivered before it goes
    /// on, or a test.
    ///
    /// ```
    /// use sqlite_outbox::prelude::*;
    /// use std::time::Duration;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let store = SqliteStore::open(dir.path().join("app.db"))?;
    /// let dispatcher = Dispatcher::builder(store.clone())
    ///     .handle("ping", |_event| Ok(()))
    ///     .start()?;
    /// store.enqueue(NewEvent::new("ping", serde_json::json!({})))?;
    /// assert!(dispatcher.wait_idle(Duration::from_secs(10)));
    /// assert_eq!(dispatcher.metrics().done, 1);
    /// // Still running: the next event is delivered too.
    /// store.enqueue(NewEvent::new("ping", serde_json::json!({})))?;
    /// assert!(dispatcher.wait_idle(Duration::from_secs(10)));
    /// assert_eq!(dispatcher.metrics().done, 2);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let Some(runtime) = self.runtime.as_ref() else {
            return true;
        };
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match runtime.is_idle() {
                Ok(true) => return true,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "outbox could not read the backlog"),
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            runtime.wake();
            std::thread::sleep(Duration::from_millis(5));
        }
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
