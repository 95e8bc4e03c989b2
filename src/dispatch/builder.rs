//! [`DispatcherBuilder`]: the handlers, routes and limits a dispatcher
//! starts with.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::*;

/// Sets up a dispatcher: see [`Dispatcher::builder`].
#[must_use]
pub struct DispatcherBuilder {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) handlers: HashMap<String, Arc<dyn Handler>>,
    /// Event type → destination, for types sent to a shared destination.
    pub(crate) routes: HashMap<String, String>,
    pub(crate) default_destination: Option<String>,
    pub(crate) limits: Vec<super::Limit>,
    pub(crate) max_age: Option<Duration>,
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
        self.handle_with(event_type, handler)
    }

    /// Like [`DispatcherBuilder::handle`], for a value that implements
    /// [`Handler`] itself (a sink, say, or a [`BatchFn`]).
    pub fn handle_with(mut self, event_type: impl Into<String>, handler: impl Handler) -> Self {
        self.handlers.insert(event_type.into(), Arc::new(handler));
        self
    }

    /// [`DispatcherBuilder::handle_with`] under its old name, one letter
    /// from [`DispatcherBuilder::handle`].
    #[deprecated(since = "0.2.0", note = "use handle_with")]
    pub fn handler(self, event_type: impl Into<String>, handler: impl Handler) -> Self {
        self.handle_with(event_type, handler)
    }

    /// Runs one `handler` for the events of all of `event_types`: a
    /// handler of batches (a sink, say) then gets events of those types
    /// together in one batch. A later registration of one of the types
    /// replaces it for that type.
    pub fn handle_types_with<T: Into<String>>(
        mut self,
        event_types: impl IntoIterator<Item = T>,
        handler: impl Handler,
    ) -> Self {
        let shared: Arc<dyn Handler> = Arc::new(handler);
        for t in event_types {
            self.handlers.insert(t.into(), Arc::clone(&shared));
        }
        self
    }

    /// [`DispatcherBuilder::handle_types_with`] under its old name.
    #[deprecated(since = "0.2.0", note = "use handle_types_with")]
    pub fn handler_for<T: Into<String>>(
        self,
        event_types: impl IntoIterator<Item = T>,
        handler: impl Handler,
    ) -> Self {
        self.handle_types_with(event_types, handler)
    }

    /// Runs the closure `handler` for events of `event_type` in batches of
    /// up to `limit` (see [`Handler::handle_batch`]): one result per event,
    /// or one error for all of them.
    ///
    /// ```
    /// use sqlite_outbox::{Dispatcher, HandlerError, MemoryStore};
    ///
    /// let dispatcher = Dispatcher::builder(MemoryStore::new())
    ///     .handle_batch("note.created", 100, |events| {
    ///         // One request for the whole batch, say; here every event
    ///         // is accepted but those without a payload.
    ///         Ok(events
    ///             .iter()
    ///             .map(|e| match e.payload.value().is_null() {
    ///                 true => Err(HandlerError::permanent("empty note")),
    ///                 false => Ok(()),
    ///             })
    ///             .collect())
    ///     })
    ///     .start()?;
    /// # drop(dispatcher);
    /// # Ok::<(), sqlite_outbox::Error>(())
    /// ```
    pub fn handle_batch<F>(self, event_type: impl Into<String>, limit: usize, handler: F) -> Self
    where
        F: Fn(&[Event]) -> BatchResult + Send + Sync + 'static,
    {
        self.handle_with(event_type, BatchFn::new(limit, handler))
    }

    /// Like [`DispatcherBuilder::fallback`], for a type that implements
    /// [`Handler`] itself (a sink, say, or a [`BatchFn`]).
    pub fn fallback_with(mut self, handler: impl Handler) -> Self {
        self.fallback = Some(Arc::new(handler));
        self
    }

    /// [`DispatcherBuilder::fallback_with`] under its old name.
    #[deprecated(since = "0.2.0", note = "use fallback_with")]
    pub fn fallback_handler(self, handler: impl Handler) -> Self {
        self.fallback_with(handler)
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

    /// Sends events of these types to one destination named `name` (a
    /// host, say): when a handler answers [`HandlerError::unavailable`] for
    /// one of them, all of them are held back together and probed as one.
    /// Default: each event type is its own destination.
    pub fn destination<T: Into<String>>(
        mut self,
        name: impl Into<String>,
        event_types: impl IntoIterator<Item = T>,
    ) -> Self {
        let name = name.into();
        for t in event_types {
            self.routes.insert(t.into(), name.clone());
        }
        self
    }

    /// Sends events of every type not routed with
    /// [`DispatcherBuilder::destination`] to one destination named `name`:
    /// for a dispatcher that delivers everything to one place (a relay to
    /// one endpoint, say), so that one probe stands for all of it.
    pub fn default_destination(mut self, name: impl Into<String>) -> Self {
        self.default_destination = Some(name.into());
        self
    }

    /// Keeps `limit` on the events of a type or a destination: at most N
    /// at once ([`Limit::concurrency`]) or at most R per interval
    /// ([`Limit::rate`]), by this dispatcher or
    /// [`Limit::across_dispatchers`]. A type or destination may have one of
    /// each. An event that must wait for a limit stays pending: it spends
    /// no attempt and no worker waits on it. Default: no limits.
    ///
    /// [`Limit::concurrency`]: super::Limit::concurrency
    /// [`Limit::rate`]: super::Limit::rate
    /// [`Limit::across_dispatchers`]: super::Limit::across_dispatchers
    pub fn limit(mut self, limit: super::Limit) -> Self {
        self.limits.push(limit);
        self
    }

    /// Number of worker threads (at least 1). Default: 4.
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Most events claimed in one transaction (at least 1). Default: 64.
    ///
    /// The dispatcher holds up to two batches of claimed events beyond
    /// those its workers run, in memory and under lease (extended while
    /// they wait): the workers run one while the outcomes of the other are
    /// written and its room is claimed again in the same transaction.
    /// Larger batches deliver a backlog faster when handlers are
    /// quick: measured with a no-op handler on 2 cores, 128 gave +9 %
    /// (NORMAL) and +24 % (FULL) over 64, and 256 gave +17–25 % and
    /// +42–53 %. They also keep more events from other dispatchers, leave
    /// more events to wait out their lease after a crash, and hold more
    /// payloads in memory.
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

    /// Gives up on an event once it is older than `age` (from its
    /// enqueue): when it is next claimed it fails with a note saying so,
    /// and its handler is not run. For sync events that are worthless after
    /// a while offline. Default: none; an event waits as long as it takes,
    /// and an outbox that is offline for a month keeps everything it
    /// queued.
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age);
        self
    }

    /// How often commits by other processes are looked for (a cheap
    /// `PRAGMA data_version` read). In-process enqueues wake the dispatcher
    /// at once; once another process's commits bring events, the
    /// dispatcher looks every 5 ms until a second passes without one, so
    /// the interval sets the wait for the first event of a stream, not for
    /// every event. Default: 500 ms.
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
