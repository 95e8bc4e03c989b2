//! Seals [`super::Store`] and carries what only the dispatcher needs from a store:
//! the trait cannot be named outside the crate, so none of this is public
//! API.

use std::time::Duration;

use chrono::{DateTime, Utc};
use crossbeam_channel::Receiver;

use super::Backlog;
use crate::error::Result;
use crate::event::Event;

/// Which event types a claim, a wake-up time or a backlog looks at: those
/// in `only` (all when `None`), minus those in `skip` (the types of
/// destinations the dispatcher holds back).
#[derive(Debug, Clone, Copy, Default)]
pub struct TypeFilter<'a> {
    pub only: Option<&'a [String]>,
    pub skip: &'a [String],
}

impl<'a> TypeFilter<'a> {
    /// Only these types (all when `None`), none skipped.
    pub fn only(only: Option<&'a [String]>) -> Self {
        TypeFilter { only, skip: &[] }
    }

    pub fn allows(&self, event_type: &str) -> bool {
        self.only.is_none_or(|t| t.iter().any(|x| x == event_type))
            && !self.skip.iter().any(|x| x == event_type)
    }
}

pub trait Sealed {
    /// [`super::Store::claim`] of the types `filter` allows.
    ///
    /// # Errors
    ///
    /// Database errors; nothing is claimed then.
    fn claim_where(
        &self,
        limit: usize,
        lease: Duration,
        filter: &TypeFilter<'_>,
    ) -> Result<Vec<Event>>;

    /// Writes `acks` (as [`super::Store::settle`]) and claims up to
    /// `limit` events of the types `filter` allows (as `claim_where`),
    /// in one transaction where the store has them: a dispatcher that
    /// keeps up with its backlog then writes once per batch, not twice.
    /// The results are `settle`'s and `claim_where`'s.
    ///
    /// # Errors
    ///
    /// Database errors; then nothing is written and nothing claimed.
    fn settle_and_claim(
        &self,
        acks: &[super::Ack],
        limit: usize,
        lease: Duration,
        filter: &TypeFilter<'_>,
    ) -> Result<(Vec<Result<()>>, Vec<Event>)>;

    /// [`super::Store::backlog`] of the types `filter` allows.
    ///
    /// # Errors
    ///
    /// Database errors.
    fn backlog_where(&self, filter: &TypeFilter<'_>) -> Result<Backlog>;

    /// The earliest time at which something of the types `filter`
    /// allows becomes claimable without any further write: the first
    /// future due time of a pending event, or the first lease to run
    /// out. `None` when nothing is waiting.
    ///
    /// # Errors
    ///
    /// Database errors.
    fn next_wakeup(&self, filter: &TypeFilter<'_>) -> Result<Option<DateTime<Utc>>>;

    /// True if another connection or process committed since the last call
    /// (cheap: `PRAGMA data_version` for SQLite, where the first call is
    /// true). Always false for `MemoryStore`, which only this
    /// process can write and whose writes notify subscribers directly.
    ///
    /// # Errors
    ///
    /// Database errors.
    fn has_external_changes(&self) -> Result<bool>;

    /// A receiver that gets a message when an event is enqueued through this
    /// store in this process (a dispatcher's wake-up call).
    fn subscribe(&self) -> Receiver<()>;

    /// When [`Sealed::subscribe`]'s receivers were last told of an
    /// enqueue, and the time before: how a dispatcher knows the app is
    /// enqueueing fast.
    fn last_enqueues(&self) -> [Option<std::time::Instant>; 2];

    /// Writes down that a dispatcher holds `name` back (`Some`), or no
    /// longer does (`None`), for [`crate::Operator::stats`] in this and
    /// other processes.
    ///
    /// # Errors
    ///
    /// Database errors.
    fn record_destination(
        &self,
        name: &str,
        state: Option<&crate::store::DestinationState>,
    ) -> Result<()>;

    /// Claims up to `limit` events of the types `filter` allows, as far
    /// as every limit of `shared` allows now, in one transaction with
    /// the counts (the live leases of those types) and the token
    /// buckets they take from: the limits hold across every dispatcher
    /// on the store.
    ///
    /// # Errors
    ///
    /// Database errors; nothing is claimed or taken then.
    fn claim_limited(
        &self,
        limit: usize,
        lease: Duration,
        filter: &TypeFilter<'_>,
        shared: &[crate::store::limits::SharedLimit<'_>],
    ) -> Result<crate::store::limits::Limited>;

    /// Writes down a limit a dispatcher keeps and whether events wait
    /// for it, for [`crate::Operator::stats`] and
    /// [`crate::Operator::why`] in this and other processes (a shared
    /// rate limit's bucket is left as it is).
    ///
    /// # Errors
    ///
    /// Database errors.
    fn record_limit(&self, state: &crate::store::limits::LimitState) -> Result<()>;
}
