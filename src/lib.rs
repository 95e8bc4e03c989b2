//! A transactional outbox in one SQLite file, with a worker pool that
//! delivers each event at least once.
//!
//! An app writes its own rows and an event in one SQLite transaction
//! ([`SqliteStore::enqueue_tx`] takes the app's `&rusqlite::Transaction`), so the
//! event exists if and only if the app's change committed. A [`Dispatcher`]
//! then claims due events under leases, runs the [`Handler`] registered for
//! each event type on a pool of threads, and records the outcome, retrying
//! failures with backoff ([`RetryPolicy`]). Events live in a [`SqliteStore`]
//! (durable, shared by processes) or, for tests, a [`MemoryStore`].
//!
//! # What an app calls
//!
//! - Open: [`SqliteStore::open`] (or [`SqliteStore::builder`]).
//! - Enqueue in the app's transaction: [`SqliteStore::transaction`] and
//!   [`SqliteStore::enqueue_tx`]; on its own: `store.enqueue(event)`.
//! - Deliver: [`Dispatcher::builder`], a handler per event type, `start`.
//! - Operate: [`Operator`] (`stats`, `list`, `requeue`, `cancel`, `purge`,
//!   `erase`), the calls behind the `outbox` tool's commands.
//!
//! [`prelude`] brings these into scope, and nothing more.
//!
//! # The tiers beneath
//!
//! - [`Store`], the dispatcher's tier: `claim` and the fenced
//!   acknowledgements (`complete`, `retry`, `fail`, `extend`, `release`).
//!   The [`Dispatcher`] needs nothing else; import it to claim and settle
//!   by hand.
//! - [`legacy::UnfencedStore`]: id-based writes that take no lease
//!   (`fetch_pending`, `mark_done`, ...), for a single worker loop or code
//!   written against a classic outbox repository.
//!
//! # Quick start
//!
//! ```
//! use sqlite_outbox::prelude::*;
//! use serde_json::json;
//! use std::time::Duration;
//!
//! let dir = tempfile::tempdir()?;
//! let store = SqliteStore::open(dir.path().join("app.db"))?;
//!
//! store.transaction(|tx| {
//!     tx.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, total INTEGER)", [])?;
//!     tx.execute("INSERT INTO orders (total) VALUES (42)", [])?;
//!     store.enqueue_tx(tx, NewEvent::new("order.placed", json!({"total": 42})))?;
//!     Ok(())
//! })?;
//!
//! let (seen_tx, seen) = crossbeam_channel::unbounded();
//! let dispatcher = Dispatcher::builder(store.clone())
//!     .handle("order.placed", move |event| {
//!         seen_tx.send(event.payload["total"].clone()).ok();
//!         Ok(())
//!     })
//!     .start()?;
//! assert_eq!(seen.recv_timeout(Duration::from_secs(10))?, json!(42));
//! let report = dispatcher.shutdown(Duration::from_secs(5));
//! assert!(report.is_clean());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Delivery guarantees
//!
//! - **At least once.** A committed event is handled until it is done or has
//!   failed permanently, across crashes and restarts. A handler may run more
//!   than once for one event (after a crash, or when a lease ran out), so
//!   handlers should be idempotent; the event id is a good idempotency key.
//! - **Durability.** With the default [`Durability::Full`] a committed event
//!   survives a power loss; [`Durability::Normal`] survives a process crash,
//!   not a power loss.
//! - **Fencing.** Every acknowledgement names the lease it was claimed
//!   under; once the lease ran out and another worker claimed the event,
//!   the late acknowledgement is refused ([`ErrorKind::LeaseLost`]) and
//!   cannot overwrite the newer outcome.
//! - **Order.** Events are claimed in (due time, enqueue order). Events that
//!   share an ordering key ([`NewEvent::with_ordering_key`]) are handled one
//!   at a time in enqueue order; a retrying event holds back those behind
//!   it, a failed one does not.
//! - **Errors from a commit.** If a commit fails, the outcome is unknown: the
//!   event may still be there after a restart. Retry with an idempotency key
//!   ([`NewEvent::with_idempotency_key`]) to be safe.
//!
//! Not covered: damage to the storage medium (a flipped byte in the WAL can
//! drop commits silently), and processes sharing a file whose clocks are far
//! apart (leases compare wall-clock times; fencing still keeps outcomes
//! correct, but events may be delivered twice).
//!
//! # Offline
//!
//! A handler that cannot reach its server answers
//! [`HandlerError::unavailable`]: the event goes back without spending an
//! attempt, and the dispatcher holds back every event of that destination,
//! probing it with one event at a time (1 s, doubling to 5 min) until one
//! gets through. [`Dispatcher::set_online`], [`Dispatcher::pause`] and
//! [`Dispatcher::resume`] let the app say what it knows; see
//! [`DispatcherBuilder::destination`] to group event types that share a
//! server.
//!
//! # Shutdown
//!
//! [`Dispatcher::shutdown`] stops claiming, lets running handlers finish
//! up to a deadline, gives back events that were claimed but not started
//! (without spending an attempt), writes the outstanding outcomes and joins
//! its threads. Dropping the handle does the same with the default deadline.
//!
//! # Crate features
//!
//! - `bundled` (default): compile SQLite from source through
//!   `rusqlite/bundled`, so no system library is needed.
//! - `cli`: the `outbox` command-line tool (operate a file, relay events
//!   over HTTP or to a command, serve a dashboard). Its dependencies stay
//!   out of the library.
//! - `postgres`: `PostgresStore`, the same outbox on a PostgreSQL server.
//! - `metrics`: the dispatcher's counters and handler run times through the
//!   [`metrics`](https://docs.rs/metrics) facade.
//! - `opentelemetry`: trace context across the queue (see [`trace`]).
//! - `nats`: [`sink::NatsJetStream`], a handler that publishes to NATS
//!   JetStream.
//! - `mqtt`: [`sink::MqttSink`], a handler that publishes to an MQTT 5
//!   broker at QoS 1.
//! - `torture`: the `outbox-torture` crash-test driver used by the
//!   reliability tests.

// Input from outside (rows, payloads, responses, arguments) must never
// be able to panic the library or the tool.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

// The crates whose types appear in this API, at the versions it was built
// with: use these paths (`sqlite_outbox::rusqlite::Connection`) and an app
// cannot end up with a second, incompatible copy.
pub use chrono;
#[cfg(feature = "postgres")]
pub use postgres;
pub use rusqlite;
pub use serde_json;
pub use uuid;

/// The helpers of [`text`] under their old name.
#[deprecated(since = "0.2.0", note = "renamed to `text`")]
pub mod admin {
    pub use crate::text::*;
}
pub mod catalog;
mod clock;
mod dispatch;
mod error;
mod event;
mod id;
mod retry;
pub mod sink;
mod store;
pub mod text;
pub mod trace;

pub use clock::{Clock, ManualClock, SystemClock};
pub use dispatch::{
    BatchFn, BatchResult, DestinationState, Dispatcher, DispatcherBuilder, Handler, HandlerError,
    Hold, Limit, Metrics, ShutdownReport, DEFAULT_BATCH_SIZE, DEFAULT_POLL_INTERVAL,
    DEFAULT_SHUTDOWN_TIMEOUT, DEFAULT_WORKERS, MAX_RETRY_AFTER,
};
pub use error::{Error, ErrorKind, Result};
pub use event::{
    Event, Lease, NewEvent, Payload, Status, MAX_ERROR_LEN, MAX_EVENT_TYPE_LEN, MAX_KEY_LEN,
    MAX_PAYLOAD_BYTES,
};
pub use id::{EventId, ParseEventIdError};
pub use retry::{RetryPolicy, DEFAULT_MAX_ATTEMPTS};
pub use store::memory::{MemoryStore, MemoryStoreBuilder};
#[cfg(feature = "postgres")]
pub use store::postgres::{
    PostgresStore, PostgresStoreBuilder, PostgresTarget, PreparedEnqueue, SslMode,
};
pub use store::schema::{SCHEMA_SQL, SCHEMA_VERSION};
pub use store::sqlite::{Durability, SqliteStore, SqliteStoreBuilder};
pub use store::{
    Ack, Backlog, LimitKind, LimitScope, LimitState, ListFilter, Operator, Page, PriorityStats,
    Requeue, Stats, Store, Subject, Throughput, TypeStats, Why, LEASE_EXPIRED_ERROR,
    THROUGHPUT_LOOKBACK,
};

/// The unfenced tier: operations by event id that take no lease, with the
/// names of a classic outbox repository. See [`legacy::UnfencedStore`].
pub mod legacy {
    pub use crate::store::legacy::UnfencedStore;
    pub use crate::store::DEFAULT_LEASE;
}

// The constants that moved to the type or module they belong to, under
// their old names for one release.
#[deprecated(since = "0.2.0", note = "use legacy::DEFAULT_LEASE")]
#[doc(hidden)]
pub const DEFAULT_LEASE: std::time::Duration = store::DEFAULT_LEASE;
#[deprecated(since = "0.2.0", note = "use SqliteStore::WAL_SIZE_LIMIT")]
#[doc(hidden)]
pub const WAL_SIZE_LIMIT: i64 = SqliteStore::WAL_SIZE_LIMIT;
#[deprecated(since = "0.2.0", note = "use SqliteStore::DEFAULT_POOL_SIZE")]
#[doc(hidden)]
pub const DEFAULT_POOL_SIZE: u32 = SqliteStore::DEFAULT_POOL_SIZE;
#[deprecated(since = "0.2.0", note = "use SqliteStore::DEFAULT_BUSY_TIMEOUT")]
#[doc(hidden)]
pub const DEFAULT_BUSY_TIMEOUT: std::time::Duration = SqliteStore::DEFAULT_BUSY_TIMEOUT;
#[deprecated(since = "0.2.0", note = "use Dispatcher::FIRST_PROBE_AFTER")]
#[doc(hidden)]
pub const FIRST_PROBE_AFTER: std::time::Duration = Dispatcher::FIRST_PROBE_AFTER;
#[deprecated(since = "0.2.0", note = "use Dispatcher::MAX_PROBE_INTERVAL")]
#[doc(hidden)]
pub const MAX_PROBE_INTERVAL: std::time::Duration = Dispatcher::MAX_PROBE_INTERVAL;
#[cfg(feature = "postgres")]
#[deprecated(since = "0.2.0", note = "use PostgresStore::DEFAULT_SCHEMA")]
#[doc(hidden)]
pub const DEFAULT_POSTGRES_SCHEMA: &str = PostgresStore::DEFAULT_SCHEMA;
#[cfg(feature = "postgres")]
#[deprecated(since = "0.2.0", note = "use PostgresStore::SCHEMA_SQL")]
#[doc(hidden)]
pub const POSTGRES_SCHEMA_SQL: &str = PostgresStore::SCHEMA_SQL;
#[cfg(feature = "postgres")]
#[deprecated(since = "0.2.0", note = "use PostgresStore::SCHEMA_VERSION")]
#[doc(hidden)]
pub const POSTGRES_SCHEMA_VERSION: i64 = PostgresStore::SCHEMA_VERSION;

/// What most programs import: `use sqlite_outbox::prelude::*;` brings the
/// app's types (stores, events, the dispatcher) and the operator tier
/// ([`Operator`]: `stats`, `list`, `requeue`, ...). The stores' own
/// methods (`enqueue`, `enqueue_tx`, `transaction`, `find`) need nothing
/// more. The dispatcher's tier ([`Store`]: `claim`, `complete`, `retry`,
/// ...) is for code that claims and settles by hand: import [`Store`] for
/// it.
///
/// ```
/// use sqlite_outbox::prelude::*;
/// use sqlite_outbox::Store; // the dispatcher's tier, by hand
///
/// let store = MemoryStore::new();
/// store.enqueue(NewEvent::new("note.created", serde_json::json!({})))?;
/// let claimed = store.claim(10, std::time::Duration::from_secs(30), None)?;
/// assert_eq!(claimed.len(), 1);
/// # Ok::<(), sqlite_outbox::Error>(())
/// ```
///
/// Without that import, `claim` is not on the store:
///
/// ```compile_fail
/// use sqlite_outbox::prelude::*;
///
/// let store = MemoryStore::new();
/// let _ = store.claim(10, std::time::Duration::from_secs(30), None);
/// ```
pub mod prelude {
    pub use crate::{
        Dispatcher, Event, EventId, HandlerError, ListFilter, MemoryStore, NewEvent, Operator,
        Requeue, RetryPolicy, SqliteStore, Status, Subject,
    };
}

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
