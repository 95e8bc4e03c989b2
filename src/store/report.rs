//! What the operator tier takes and returns: filters, requeue choices,
//! counts and the backlog.

use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::event::{Event, Status};
use crate::id::EventId;

/// Which failed events [`crate::Operator::requeue`] moves back to pending.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Requeue {
    /// One event, by id.
    One(EventId),
    /// Every failed event of one type.
    Type(String),
    /// Every failed event.
    All,
}

/// Counts for one event type.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct TypeStats {
    /// The event type (`type` in JSON).
    #[serde(rename = "type")]
    pub event_type: String,
    /// Pending events of this type.
    pub pending: u64,
    /// Pending events of this type that are due now.
    pub due: u64,
    /// Processing events of this type.
    pub processing: u64,
    /// Done events of this type.
    pub done: u64,
    /// Failed events of this type.
    pub failed: u64,
}

/// Pending events of one raised priority (see
/// [`crate::NewEvent::with_priority`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct PriorityStats {
    /// The priority, above 0.
    pub priority: u8,
    /// Pending events of this priority, due or not.
    pub pending: u64,
    /// Of them, those due now.
    pub due: u64,
}

/// What is left to deliver, from [`crate::Store::backlog`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Backlog {
    /// An event could be claimed now: pending, due, and not held back by an
    /// earlier event of its ordering key.
    pub due: bool,
    /// An event is being handled (or its lease ran out and it will be
    /// claimed again).
    pub processing: bool,
    /// When the next pending event that is not due yet (a scheduled retry, a
    /// delayed event) falls due.
    pub next_due_at: Option<DateTime<Utc>>,
}

/// What [`crate::Operator::stats`] reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Stats {
    /// Pending events, due or not.
    pub pending: u64,
    /// Pending events that are due now.
    pub due: u64,
    /// Of the due events, those that wait behind the unfinished head of
    /// their ordering key (a head retrying later, leased, or due itself):
    /// they cannot be claimed until it finishes ([`crate::Operator::why`]
    /// names the head).
    pub behind_key: u64,
    /// Processing events.
    pub processing: u64,
    /// Done events.
    pub done: u64,
    /// Failed events.
    pub failed: u64,
    /// Per event type, sorted by type.
    pub by_type: Vec<TypeStats>,
    /// The pending events of raised priority, highest first; the rest of
    /// [`Stats::pending`] has priority 0.
    pub by_priority: Vec<PriorityStats>,
    /// How long the oldest due event has been waiting since it became due
    /// (`oldest_due_age_ms` in JSON, in milliseconds).
    #[serde(serialize_with = "ser_opt_millis", rename = "oldest_due_age_ms")]
    pub oldest_due_age: Option<Duration>,
    /// The destinations that running dispatchers hold back (unreachable or
    /// paused), as they last wrote them down, by name. A dispatcher that
    /// was killed leaves its rows: `updated_at` tells how old they are.
    pub destinations: Vec<DestinationState>,
    /// The limits dispatchers keep on types and destinations, as they last
    /// wrote them down, with the live leases each concurrency limit counts.
    pub limits: Vec<crate::store::LimitState>,
}

fn ser_opt_millis<S: serde::Serializer>(
    v: &Option<Duration>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match v {
        Some(d) => s.serialize_some(&(d.as_millis() as u64)),
        None => s.serialize_none(),
    }
}

impl Stats {
    /// The total number of events.
    pub fn total(&self) -> u64 {
        self.pending + self.processing + self.done + self.failed
    }

    /// Counts `n` events of `event_type` in `status`, `due` of them due now.
    pub(crate) fn add(&mut self, event_type: &str, status: Status, n: u64, due: u64) {
        let slot = match self
            .by_type
            .binary_search_by(|t| t.event_type.as_str().cmp(event_type))
        {
            Ok(i) => i,
            Err(i) => {
                self.by_type.insert(
                    i,
                    TypeStats {
                        event_type: event_type.to_owned(),
                        ..TypeStats::default()
                    },
                );
                i
            }
        };
        let t = &mut self.by_type[slot];
        let (total, per_type) = match status {
            Status::Pending => (&mut self.pending, &mut t.pending),
            Status::Processing => (&mut self.processing, &mut t.processing),
            Status::Done => (&mut self.done, &mut t.done),
            Status::Failed => (&mut self.failed, &mut t.failed),
        };
        *total += n;
        *per_type += n;
        t.due += due;
        self.due += due;
    }
}

/// A filter for [`crate::Operator::list`]. Every set field must match. Build it from
/// `ListFilter { field: value, ..ListFilter::default() }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListFilter {
    /// Only events in this status.
    pub status: Option<Status>,
    /// Only events of this type.
    pub event_type: Option<String>,
    /// Only events of this organisation.
    pub org_id: Option<Uuid>,
    /// Only events of this user.
    pub user_id: Option<Uuid>,
    /// Only events with this correlation id.
    pub correlation_id: Option<String>,
    /// Only events with this ordering key.
    pub ordering_key: Option<String>,
    /// Only events whose last error contains this text (case-sensitive).
    pub error_contains: Option<String>,
    /// At most this many events. Default: 100.
    pub limit: usize,
    /// Newest first (by enqueue order) instead of oldest first. Default: false.
    pub newest_first: bool,
    /// A keyset cursor: only events past this `seq` in the list's order
    /// (below it when newest first). Pass the [`Page::next`] of the page
    /// before to get the next one; the cost of a page does not grow with
    /// how far into the outbox it is.
    pub after_seq: Option<i64>,
    /// Look at no more than this many sequence numbers past the cursor.
    /// A page with a rare filter then costs a bounded scan on an outbox of
    /// any size, and may hold fewer than `limit` events with a
    /// [`Page::next`] to search on from. Default: no bound.
    pub scan_limit: Option<u64>,
}

/// Events that finished in one span of time, from
/// [`crate::Operator::throughput`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Throughput {
    /// Where the span starts (a multiple of the bucket since the Unix
    /// epoch).
    pub start: DateTime<Utc>,
    /// Events that became done in it.
    pub done: u64,
    /// Events that became failed in it.
    pub failed: u64,
}

impl Throughput {
    pub(crate) fn at(start_ms: i64, done: u64, failed: u64) -> Throughput {
        Throughput {
            start: crate::clock::from_millis(start_ms),
            done,
            failed,
        }
    }
}

/// How long before the start of [`crate::Operator::throughput`]'s span an
/// event may have been enqueued and still be counted: the bound that lets
/// the count read the retention index instead of the whole outbox.
pub const THROUGHPUT_LOOKBACK: Duration = Duration::from_secs(24 * 3600);

/// One page of [`crate::Operator::list_page`].
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Page {
    /// The matching events, in the list's order.
    pub events: Vec<Event>,
    /// Where the next page starts (its [`ListFilter::after_seq`]), or
    /// `None` when nothing is left to look at.
    pub next: Option<i64>,
}

/// The sequence numbers a page looks at: `lo..=hi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    pub(crate) lo: i64,
    pub(crate) hi: i64,
}

impl Default for ListFilter {
    fn default() -> Self {
        ListFilter {
            status: None,
            event_type: None,
            org_id: None,
            user_id: None,
            correlation_id: None,
            ordering_key: None,
            error_contains: None,
            limit: 100,
            newest_first: false,
            after_seq: None,
            scan_limit: None,
        }
    }
}

impl ListFilter {
    pub(crate) fn matches(&self, e: &Event) -> bool {
        self.status.is_none_or(|s| e.status == s)
            && self.event_type.as_ref().is_none_or(|t| &e.event_type == t)
            && self.org_id.is_none_or(|o| e.org_id == Some(o))
            && self.user_id.is_none_or(|u| e.user_id == Some(u))
            && self
                .correlation_id
                .as_ref()
                .is_none_or(|c| e.correlation_id.as_ref() == Some(c))
            && self
                .ordering_key
                .as_ref()
                .is_none_or(|k| e.ordering_key.as_ref() == Some(k))
            && self.error_contains.as_ref().is_none_or(|t| {
                e.last_error
                    .as_ref()
                    .is_some_and(|err| err.contains(t.as_str()))
            })
    }

    /// The filter's tests beyond status and window, one per field set, in
    /// one order: each backend writes them as its SQL, with only the
    /// conditions asked for (so its planner sees what it can use).
    pub(crate) fn conditions(&self) -> Vec<Condition<'_>> {
        fn text<'a>(column: &'static str, value: &'a Option<String>) -> Option<Condition<'a>> {
            value
                .as_deref()
                .map(|v| Condition::Equals(column, ConditionValue::Text(v)))
        }
        let uuid = |column, value: Option<uuid::Uuid>| {
            value.map(|v| Condition::Equals(column, ConditionValue::Uuid(v)))
        };
        [
            text("event_type", &self.event_type),
            uuid("org_id", self.org_id),
            uuid("user_id", self.user_id),
            text("correlation_id", &self.correlation_id),
            text("ordering_key", &self.ordering_key),
            self.error_contains
                .as_deref()
                .map(|t| Condition::Contains("last_error", t)),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// The sequence numbers to look at, in an outbox whose events run from
    /// `min` to `max`; `None` when the cursor is already past the end.
    pub(crate) fn window(&self, min: i64, max: i64) -> Option<Window> {
        let span = |s: u64| i64::try_from(s.saturating_sub(1)).unwrap_or(i64::MAX);
        let w = if self.newest_first {
            let hi = self.after_seq.map_or(max, |a| a.saturating_sub(1).min(max));
            let lo = self
                .scan_limit
                .map_or(min, |s| hi.saturating_sub(span(s)).max(min));
            Window { lo, hi }
        } else {
            let lo = self.after_seq.map_or(min, |a| a.saturating_add(1).max(min));
            let hi = self
                .scan_limit
                .map_or(max, |s| lo.saturating_add(span(s)).min(max));
            Window { lo, hi }
        };
        (w.lo <= w.hi && self.scan_limit != Some(0)).then_some(w)
    }

    /// The page of `events` found in `window` of an outbox from `min` to
    /// `max`: it goes on from the last event when the page is full, from
    /// the window's edge when the scan stopped short of the end.
    pub(crate) fn page(&self, events: Vec<Event>, window: Window, min: i64, max: i64) -> Page {
        let next = match events.last() {
            Some(last) if events.len() >= self.limit => Some(last.seq),
            _ if self.newest_first => (window.lo > min).then_some(window.lo),
            _ => (window.hi < max).then_some(window.hi),
        };
        Page { events, next }
    }
}

/// One test of a [`ListFilter`], for a backend to write as SQL.
pub(crate) enum Condition<'a> {
    /// `column = value`.
    Equals(&'static str, ConditionValue<'a>),
    /// `column` holds `text`.
    Contains(&'static str, &'a str),
}

/// The value a [`Condition`] compares with.
pub(crate) enum ConditionValue<'a> {
    Text(&'a str),
    Uuid(uuid::Uuid),
}

/// Why a destination is held back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Hold {
    /// A handler said it cannot be reached; it is probed on a backoff.
    Unreachable,
    /// The app paused it ([`crate::Dispatcher::pause`]); it waits for
    /// [`crate::Dispatcher::resume`], without probes.
    Paused,
    /// A handler said it is busy ([`crate::HandlerError::busy`]: an HTTP
    /// 429 or 503); it is probed, no sooner than it asked. Written down for
    /// other processes as `unreachable`, the table's name for a held-back
    /// destination that is probed.
    Busy,
}

impl Hold {
    /// Its name, as stored in the database (where a busy destination is
    /// `unreachable`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Hold::Unreachable => "unreachable",
            Hold::Paused => "paused",
            Hold::Busy => "busy",
        }
    }
}

/// A destination that a dispatcher holds back, from
/// [`crate::Dispatcher::destinations`], or as a running dispatcher wrote it
/// down for other processes ([`Stats::destinations`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct DestinationState {
    /// The destination: an event type, or a name given with
    /// [`crate::DispatcherBuilder::destination`].
    pub name: String,
    /// Why it is held back.
    pub hold: Hold,
    /// Since when.
    pub since: DateTime<Utc>,
    /// When it is probed next (`None` while paused or while a probe runs).
    pub next_probe_at: Option<DateTime<Utc>>,
    /// What the last handler said about it.
    pub last_error: Option<String>,
    /// When the dispatcher last changed this state.
    pub updated_at: DateTime<Utc>,
}
