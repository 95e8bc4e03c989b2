//! The unfenced tier: id-based operations that do not check leases.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Operator, Subject};
use crate::error::Result;
use crate::event::{Event, NewEvent};
use crate::id::EventId;

/// Operations by event id that act on whatever lease is current (and
/// cancel it), with the names of a classic outbox repository: `create`,
/// `fetch_pending`, `mark_done`, `cleanup_old`, ...
///
/// They suit a single worker that fetches and marks in a loop, and code
/// written against such a repository. With more than one worker, use the
/// fenced calls of [`crate::Store`] instead ([`crate::Store::claim`], then
/// [`crate::Store::complete`] or [`crate::Store::retry`] with the lease):
/// a worker whose lease ran out cannot overwrite a newer outcome there,
/// while [`UnfencedStore::mark_done`] can.
///
/// Where an operation exists in the other tiers, the method here only calls
/// it: [`UnfencedStore::create`] is [`crate::Store::enqueue`],
/// [`UnfencedStore::cleanup_old`] is [`Operator::purge`], and so on.
pub trait UnfencedStore: Operator {
    /// [`crate::Store::enqueue`].
    ///
    /// # Errors
    ///
    /// As [`crate::Store::enqueue`].
    fn create(&self, event: NewEvent) -> Result<Event> {
        self.enqueue(event)
    }

    /// [`crate::Store::find`].
    ///
    /// # Errors
    ///
    /// Database errors only.
    fn find_by_id(&self, id: EventId) -> Result<Option<Event>> {
        self.find(id)
    }

    /// Claims up to `limit` due events of any type with a lease of
    /// `lock_timeout_secs` seconds: [`crate::Store::claim`] with integer
    /// arguments.
    ///
    /// # Errors
    ///
    /// As [`crate::Store::claim`].
    fn fetch_pending(&self, limit: u32, lock_timeout_secs: u64) -> Result<Vec<Event>> {
        self.claim(
            limit as usize,
            std::time::Duration::from_secs(lock_timeout_secs),
            None,
        )
    }

    /// Marks an event `processing` under a fresh [`crate::legacy::DEFAULT_LEASE`]
    /// and counts an attempt. An event that is already processing (fetched
    /// by [`UnfencedStore::fetch_pending`]) keeps its attempt count: the
    /// claim counted it already.
    ///
    /// # Errors
    ///
    /// `NotFound`; `InvalidInput` if the event is done or failed.
    fn mark_processing(&self, id: EventId) -> Result<()>;

    /// Marks an event `done`, whatever its lease.
    ///
    /// # Errors
    ///
    /// `NotFound`; database errors.
    fn mark_done(&self, id: EventId) -> Result<()>;

    /// Records that the event's effect was confirmed delivered
    /// (`delivered_at`), without changing its status.
    ///
    /// # Errors
    ///
    /// `NotFound`; database errors.
    fn mark_delivered(&self, id: EventId) -> Result<()>;

    /// Records a failed attempt, whatever its lease: pending again after the
    /// policy's delay, or `failed` once `max_attempts` is reached.
    ///
    /// # Errors
    ///
    /// `NotFound`; database errors.
    fn mark_retry(&self, id: EventId, error: &str) -> Result<()>;

    /// Marks an event `failed` with `error`, whatever its lease.
    ///
    /// # Errors
    ///
    /// `NotFound`; database errors.
    fn mark_failed(&self, id: EventId, error: &str) -> Result<()>;

    /// [`Operator::purge`].
    ///
    /// # Errors
    ///
    /// Database errors.
    fn cleanup_old(&self, older_than: DateTime<Utc>) -> Result<u64> {
        self.purge(older_than)
    }

    /// How many events are pending (due or not).
    ///
    /// # Errors
    ///
    /// Database errors.
    fn count_pending(&self) -> Result<u64>;

    /// How many events have failed.
    ///
    /// # Errors
    ///
    /// Database errors.
    fn count_failed(&self) -> Result<u64>;

    /// [`Operator::erase`] of an organisation.
    ///
    /// # Errors
    ///
    /// Database errors.
    fn delete_by_org(&self, org_id: Uuid) -> Result<u64> {
        self.erase(Subject::Org(org_id))
    }

    /// [`Operator::erase`] of a user.
    ///
    /// # Errors
    ///
    /// Database errors.
    fn delete_by_user(&self, user_id: Uuid) -> Result<u64> {
        self.erase(Subject::User(user_id))
    }
}
