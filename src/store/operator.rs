//! The operator tier: what a person, the `outbox` tool or a maintenance job
//! does with a queue.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use std::time::Duration;

use super::report::{ListFilter, Page, Requeue, Stats, Throughput};
use super::Store;
use crate::error::Result;
use crate::event::Event;
use crate::id::EventId;

/// Whose events [`Operator::erase`] deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Subject {
    /// Every event of an organisation (`org_id`).
    Org(Uuid),
    /// Every event of a user (`user_id`).
    User(Uuid),
}

/// Looking at a queue and changing it by hand: the operator tier. These
/// calls act by id or by filter and take no lease; a worker that holds a
/// lease on an event an operator changed finds it gone
/// ([`crate::ErrorKind::LeaseLost`]) and writes nothing.
///
/// The `outbox` command-line tool is a thin layer over this trait: its
/// `stats`, `list`, `requeue`, `cancel`, `purge` and `erase` commands call
/// the methods of the same names.
pub trait Operator: Store {
    /// Counts per status and per event type, and the age of the oldest due
    /// event.
    ///
    /// # Errors
    ///
    /// Database errors.
    fn stats(&self) -> Result<Stats>;

    /// The destinations that running dispatchers hold back, as they last
    /// wrote them down (the same list as [`Stats::destinations`], without
    /// counting the events).
    ///
    /// # Errors
    ///
    /// Database errors.
    fn destinations(&self) -> Result<Vec<super::report::DestinationState>> {
        Ok(self.stats()?.destinations)
    }

    /// The limits dispatchers keep on types and destinations, as they last
    /// wrote them down (the same list as [`Stats::limits`]).
    ///
    /// # Errors
    ///
    /// Database errors.
    fn limits(&self) -> Result<Vec<super::LimitState>> {
        Ok(self.stats()?.limits)
    }

    /// Why `event` (as read from this store) is where it is: due now,
    /// scheduled for later (and after what error), behind the head of its
    /// ordering key (which event, in what state, until when), held back
    /// with its destination, leased, done or failed.
    ///
    /// A destination is matched by name to the event's type, the
    /// dispatcher's default; one named otherwise (a relay's endpoint, a
    /// shared destination) shows in [`Operator::stats`].
    ///
    /// # Errors
    ///
    /// Database errors.
    fn why(&self, event: &Event) -> Result<super::why::Why> {
        super::why::why(self, event)
    }

    /// Events matching `filter`, at most `filter.limit`.
    ///
    /// # Errors
    ///
    /// Database errors.
    fn list(&self, filter: &ListFilter) -> Result<Vec<Event>> {
        Ok(self.list_page(filter)?.events)
    }

    /// A page of the events matching `filter`, with the cursor of the
    /// next page: keyset pagination on `seq`, each page one indexed range
    /// however far in it starts. With [`ListFilter::scan_limit`], a page
    /// also stops after that many sequence numbers, so a filter that
    /// matches few events on a large outbox still answers quickly.
    ///
    /// # Errors
    ///
    /// Database errors.
    fn list_page(&self, filter: &ListFilter) -> Result<Page>;

    /// Events that finished (done or failed) since `since`, counted per
    /// `bucket` of their `completed_at`, oldest first; spans with none are
    /// left out. Read through the retention index, so only events enqueued
    /// at most [`crate::THROUGHPUT_LOOKBACK`] before `since` are counted.
    ///
    /// # Errors
    ///
    /// Database errors.
    fn throughput(&self, since: DateTime<Utc>, bucket: Duration) -> Result<Vec<Throughput>>;

    /// Moves failed events back to pending, due now, with `attempts` reset
    /// to 0 (the last error is kept); returns how many.
    ///
    /// # Errors
    ///
    /// `NotFound` for [`Requeue::One`] of a missing event; `InvalidInput` if
    /// that event is not failed; database errors.
    fn requeue(&self, which: Requeue) -> Result<u64>;

    /// Gives up on an event that is not finished (pending or processing):
    /// it becomes `failed` with `reason` as its last error and is not
    /// delivered again unless requeued. One statement, so an event that
    /// was delivered a moment before stays `done`.
    ///
    /// # Errors
    ///
    /// `NotFound`; `InvalidInput` if the event is already done or failed;
    /// database errors.
    fn cancel(&self, id: EventId, reason: &str) -> Result<()>;

    /// Deletes done and failed events created before `older_than` (an event
    /// created exactly at `older_than` is kept); returns how many. Pending
    /// and processing events are never purged.
    ///
    /// # Errors
    ///
    /// Database errors.
    fn purge(&self, older_than: DateTime<Utc>) -> Result<u64>;

    /// Deletes every event of an organisation or a user, in any status;
    /// returns how many. For erasure requests: nothing of theirs is left in
    /// the outbox afterwards (run `VACUUM` to remove it from free pages).
    ///
    /// # Errors
    ///
    /// Database errors.
    fn erase(&self, subject: Subject) -> Result<u64>;
}
