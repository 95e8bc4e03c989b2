//! Persistence: the [`Store`] trait and what its operations take and give.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use uuid::Uuid;

use crate::clock::Clock;
use crate::error::Result;
use crate::event::{Event, Lease, NewEvent};
use crate::id::EventId;
use crate::retry::RetryPolicy;

pub use ack::Ack;
pub(crate) use ack::AckKind;
pub use limits::{LimitKind, LimitScope, LimitState};
pub use operator::{Operator, Subject};
pub use report::{
    Backlog, DestinationState, Hold, ListFilter, Page, PriorityStats, Requeue, Stats, Throughput,
    TypeStats, THROUGHPUT_LOOKBACK,
};
pub use why::Why;

/// The lower bounds and bucket of a throughput count, in milliseconds:
/// finished since, enqueued since, bucket.
pub(crate) fn throughput_bounds(
    since: chrono::DateTime<chrono::Utc>,
    bucket: std::time::Duration,
) -> (i64, i64, i64) {
    let since = crate::clock::to_millis(since);
    let lookback = i64::try_from(THROUGHPUT_LOOKBACK.as_millis()).unwrap_or(i64::MAX);
    let bucket = i64::try_from(bucket.as_millis()).unwrap_or(i64::MAX).max(1);
    (since, since.saturating_sub(lookback), bucket)
}

mod ack;
pub(crate) mod legacy;
pub(crate) mod limits;
pub(crate) mod memory;
mod operator;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
mod report;
mod row;
pub(crate) mod schema;
pub(crate) mod sqlite;
mod why;

pub(crate) mod sealed;

/// The `last_error` of an event that failed because its lease ran out on
/// its last allowed attempt.
pub const LEASE_EXPIRED_ERROR: &str =
    "lease expired on the last attempt (the worker crashed or stalled)";

/// The default lease for [`crate::legacy::UnfencedStore::mark_processing`],
/// which takes none: 60 s.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);

/// Where events live, and what a worker does with them: the core tier.
/// Implemented by [`crate::SqliteStore`] (durable, shared between
/// processes) and [`crate::MemoryStore`] (the reference model, for tests);
/// both behave identically and pass one test suite.
///
/// The API has three tiers, one trait each:
///
/// - [`Store`] (this trait): enqueue, find, claim and settle. All a worker,
///   a relay or the [`crate::Dispatcher`] needs.
/// - [`Operator`]: what a person or a maintenance job does with a
///   queue: stats, list, requeue, cancel, purge, erase.
/// - [`crate::legacy::UnfencedStore`]: id-based operations that do not
///   check leases, for single-worker loops and code written against a
///   classic repository interface.
///
/// `use sqlite_outbox::prelude::*;` brings the first two into scope. The
/// traits are sealed: they cannot be implemented outside this crate.
///
/// # Leases and fencing
///
/// [`Store::claim`] is one atomic write that moves due events to
/// `processing`, counts the attempt and stores a fresh lease token. Every
/// later write about a claimed event ([`Store::complete`], [`Store::retry`],
/// [`Store::fail`], [`Store::extend`], [`Store::release`]) names its
/// [`Lease`] and is refused with [`crate::ErrorKind::LeaseLost`], changing
/// nothing, when the event was claimed again after the lease expired, or is
/// gone. A worker that stalled past its lease therefore cannot overwrite the
/// outcome of the worker that took over.
pub trait Store: sealed::Sealed + Send + Sync + fmt::Debug + 'static {
    /// Adds one event in its own transaction and returns it as stored. With
    /// an idempotency key that is already stored, returns the stored event
    /// and adds nothing. To enqueue inside the app's own transaction, use
    /// [`crate::SqliteStore::enqueue_tx`].
    ///
    /// # Errors
    ///
    /// `InvalidInput` for an empty or over-long event type or an oversize
    /// payload (nothing is written); `Busy`, `DiskFull`, `ReadOnly`, `Io` from
    /// the database. An error from the commit means the outcome is unknown:
    /// use an idempotency key to retry safely.
    fn enqueue(&self, event: NewEvent) -> Result<Event> {
        let mut created = self.enqueue_batch(vec![event])?;
        created
            .pop()
            .ok_or_else(|| crate::Error::invalid("nothing was enqueued"))
    }

    /// Adds many events in one transaction: all of them or none.
    ///
    /// # Errors
    ///
    /// As [`Store::enqueue`]; one invalid event rejects the whole batch.
    fn enqueue_batch(&self, events: Vec<NewEvent>) -> Result<Vec<Event>>;

    /// The event with this id, if any.
    ///
    /// # Errors
    ///
    /// Database errors only.
    fn find(&self, id: EventId) -> Result<Option<Event>>;

    /// Claims up to `limit` events in one atomic write and returns them with
    /// their leases, in (due time, enqueue order).
    ///
    /// Claimable are pending events that are due and processing events whose
    /// lease ran out. With `types`, only events of those types are claimed.
    /// An event with an ordering key is skipped while an earlier event with
    /// the same key is pending or processing, or while another event with
    /// the key holds a live lease. Each claimed event becomes `processing`
    /// with `attempts + 1`, `locked_at = now`, `locked_until = now + lease`
    /// and a fresh lease token.
    ///
    /// A processing event whose lease ran out on its last allowed attempt
    /// (its worker crashed or stalled every time) is not handed out again:
    /// the claim marks it `failed` with [`LEASE_EXPIRED_ERROR`].
    ///
    /// # Errors
    ///
    /// Database errors; nothing is claimed then.
    fn claim(&self, limit: usize, lease: Duration, types: Option<&[String]>) -> Result<Vec<Event>> {
        self.claim_where(limit, lease, &sealed::TypeFilter::only(types))
    }

    /// Writes many acknowledgements in one transaction, each fenced by its
    /// lease. The outer error is a database failure (nothing was written);
    /// the inner results say, per acknowledgement, whether it was accepted
    /// (`Err` with `LeaseLost` when its lease had moved on).
    ///
    /// # Errors
    ///
    /// Database errors; no acknowledgement was written then.
    fn settle(&self, acks: &[Ack]) -> Result<Vec<Result<()>>>;

    /// Records that a claimed event was handled: it becomes `done`.
    ///
    /// # Errors
    ///
    /// `LeaseLost` if the lease moved on; database errors.
    fn complete(&self, lease: &Lease) -> Result<()> {
        settle_one(self, Ack::complete(*lease))
    }

    /// Records a failed attempt. The event becomes pending again after
    /// `delay`, or after the retry policy's delay for this attempt when
    /// `delay` is `None`; if this was its last allowed attempt it becomes
    /// `failed`. The error is kept in `last_error` either way.
    ///
    /// # Errors
    ///
    /// `LeaseLost` if the lease moved on; database errors.
    fn retry(&self, lease: &Lease, error: &str, delay: Option<Duration>) -> Result<()> {
        settle_one(self, Ack::retry(*lease, error, delay))
    }

    /// Gives up on a claimed event at once: it becomes `failed`.
    ///
    /// # Errors
    ///
    /// `LeaseLost` if the lease moved on; database errors.
    fn fail(&self, lease: &Lease, error: &str) -> Result<()> {
        settle_one(self, Ack::fail(*lease, error))
    }

    /// Pushes the lease out to `by` from now.
    ///
    /// # Errors
    ///
    /// `LeaseLost` if the lease moved on; database errors.
    fn extend(&self, lease: &Lease, by: Duration) -> Result<()> {
        settle_one(self, Ack::extend(*lease, by))
    }

    /// Gives a claimed event back without spending its attempt: it becomes
    /// pending and claimable at once.
    ///
    /// # Errors
    ///
    /// `LeaseLost` if the lease moved on; database errors.
    fn release(&self, lease: &Lease) -> Result<()> {
        settle_one(self, Ack::release(*lease))
    }

    /// What is left to deliver for these event types (all when `None`):
    /// whether an event can be claimed now, whether one is being handled,
    /// and when the next scheduled one falls due. Cheap enough to ask many
    /// times a second (the SQLite store answers from its indexes): a relay
    /// or a batch program asks it to see when it is done.
    ///
    /// # Errors
    ///
    /// Database errors.
    fn backlog(&self, types: Option<&[String]>) -> Result<Backlog> {
        self.backlog_where(&sealed::TypeFilter::only(types))
    }

    /// Makes pending events that are waiting out a retry's backoff due now,
    /// keeping their attempts: for the moment an app knows its network is
    /// back. Events that have not been tried yet keep their due time (a
    /// delay the app asked for). Of these event types (all when `None`);
    /// returns how many.
    ///
    /// # Errors
    ///
    /// Database errors.
    fn skip_backoff(&self, types: Option<&[String]>) -> Result<u64>;

    /// The store's clock.
    fn clock(&self) -> &Arc<dyn Clock>;

    /// The store's retry policy.
    fn retry_policy(&self) -> &RetryPolicy;
}

/// The app's calls of [`Store`] (`enqueue`, `enqueue_batch`, `find`) as
/// methods of each store, so an app needs no trait in scope for them; the
/// dispatcher's tier (`claim`, `complete`, ...) stays with the trait.
macro_rules! app_calls {
    ($store:ty) => {
        impl $store {
            /// Adds one event in a transaction of its own: see
            /// [`Store::enqueue`]. Inside the app's transaction, use
            /// `enqueue_tx`.
            ///
            /// # Errors
            ///
            /// As [`Store::enqueue`].
            pub fn enqueue(&self, event: NewEvent) -> Result<Event> {
                <Self as Store>::enqueue(self, event)
            }

            /// Adds many events in one transaction, all or none: see
            /// [`Store::enqueue_batch`].
            ///
            /// # Errors
            ///
            /// As [`Store::enqueue_batch`].
            pub fn enqueue_batch(&self, events: Vec<NewEvent>) -> Result<Vec<Event>> {
                <Self as Store>::enqueue_batch(self, events)
            }

            /// The event with this id, if any.
            ///
            /// # Errors
            ///
            /// Database errors only.
            pub fn find(&self, id: EventId) -> Result<Option<Event>> {
                <Self as Store>::find(self, id)
            }
        }
    };
}

app_calls!(memory::MemoryStore);
app_calls!(sqlite::SqliteStore);
#[cfg(feature = "postgres")]
app_calls!(postgres::PostgresStore);

impl From<memory::MemoryStore> for Arc<dyn Store> {
    fn from(store: memory::MemoryStore) -> Self {
        Arc::new(store)
    }
}

impl From<sqlite::SqliteStore> for Arc<dyn Store> {
    fn from(store: sqlite::SqliteStore) -> Self {
        Arc::new(store)
    }
}

/// A count read from the database; a negative one (which no query here
/// returns) reads as 0.
/// The order in which claims hand events out, on every store: highest
/// priority first, then due time (a run-out lease counts from when its
/// event was due), then enqueue order.
pub(crate) fn claim_order(
    e: &Event,
) -> (std::cmp::Reverse<u8>, chrono::DateTime<chrono::Utc>, i64) {
    (std::cmp::Reverse(e.priority), e.next_attempt_at, e.seq)
}

pub(crate) fn count_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Why a write about event `id` changed nothing: the event is gone
/// (`NotFound`), or it is in a state the write does not apply to
/// (`InvalidInput`, worded by `is` from its status).
pub(crate) fn unchanged<S: Store + ?Sized>(
    store: &S,
    id: EventId,
    is: impl Fn(crate::event::Status) -> String,
) -> crate::Error {
    match store.find(id) {
        Ok(None) => crate::Error::not_found(id),
        Ok(Some(e)) => crate::Error::invalid(format!("event {id} is {}", is(e.status))),
        Err(e) => e,
    }
}

fn settle_one<S: Store + ?Sized>(store: &S, ack: Ack) -> Result<()> {
    store
        .settle(std::slice::from_ref(&ack))?
        .pop()
        .unwrap_or(Ok(()))
}

/// Wakes the dispatchers of this process when events are enqueued.
#[derive(Debug, Default)]
pub(crate) struct Notifier {
    subscribers: std::sync::Mutex<Vec<Sender<()>>>,
    /// The times of the last two notices, latest first.
    last: std::sync::Mutex<[Option<std::time::Instant>; 2]>,
}

impl Notifier {
    pub(crate) fn subscribe(&self) -> Receiver<()> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if let Ok(mut subs) = self.subscribers.lock() {
            subs.push(tx);
        }
        rx
    }

    /// When subscribers were last told, latest first.
    pub(crate) fn last_two(&self) -> [Option<std::time::Instant>; 2] {
        *self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn notify(&self) {
        {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            *last = [Some(std::time::Instant::now()), last[0]];
        }
        self.wake();
    }

    /// Wakes the subscribers without counting an enqueue of this process
    /// (another process's commit, heard of).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn wake(&self) {
        if let Ok(mut subs) = self.subscribers.lock() {
            // A full channel already holds a wake-up; a disconnected one
            // belongs to a dispatcher that is gone.
            subs.retain(|tx| {
                !matches!(
                    tx.try_send(()),
                    Err(crossbeam_channel::TrySendError::Disconnected(_))
                )
            });
        }
    }
}

/// A fresh lease token: 64 random bits.
pub(crate) fn new_token() -> i64 {
    Uuid::new_v4().as_u64_pair().0 as i64
}

#[cfg(test)]
mod tests;
