//! `MemoryStore`: the reference model of the store's behaviour.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use crossbeam_channel::Receiver;

use super::sealed::TypeFilter;
use super::{
    new_token, Ack, AckKind, Backlog, DestinationState, Notifier, Store, LEASE_EXPIRED_ERROR,
};
use crate::clock::{self, Clock, SystemClock};
use crate::error::{Error, Result};
use crate::event::{Event, NewEvent, Status};
use crate::id::EventId;
use crate::retry::RetryPolicy;

mod operator;
mod sealed;

/// An outbox held in memory: the reference model of [`Store`], with exactly
/// the behaviour of [`crate::SqliteStore`] and none of its durability. Use it
/// in tests of handlers and dispatchers. Clones share the same events.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    destinations: Mutex<BTreeMap<String, DestinationState>>,
    limits: Mutex<Limits>,
    clock: Arc<dyn Clock>,
    policy: RetryPolicy,
    notifier: Notifier,
}

/// The limits dispatchers wrote down, and the shared rate limits'
/// buckets; held across a limited claim, so that such claims take turns.
#[derive(Default)]
struct Limits {
    states: BTreeMap<(&'static str, String, &'static str), crate::store::LimitState>,
    buckets: HashMap<(&'static str, String), crate::store::limits::Bucket>,
}

#[derive(Default)]
struct State {
    rows: BTreeMap<i64, Event>,
    by_id: HashMap<EventId, i64>,
    by_idempotency_key: HashMap<String, i64>,
    last_seq: i64,
}

/// Options for a [`MemoryStore`], from [`MemoryStore::builder`].
#[derive(Debug)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct MemoryStoreBuilder {
    clock: Arc<dyn Clock>,
    policy: RetryPolicy,
}

impl MemoryStoreBuilder {
    /// The clock for due times and leases. Default: the system clock.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The retry policy. Default: [`RetryPolicy::default`].
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The empty store.
    pub fn build(self) -> MemoryStore {
        MemoryStore {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                destinations: Mutex::default(),
                limits: Mutex::default(),
                clock: self.clock,
                policy: self.policy,
                notifier: Notifier::default(),
            }),
        }
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("clock", &self.inner.clock)
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    /// An empty store on the system clock with the default retry policy.
    pub fn new() -> Self {
        MemoryStore::builder().build()
    }

    /// A builder for an empty store, to set its clock (a
    /// [`crate::ManualClock`] in tests of backoff and leases) or its retry
    /// policy, as [`crate::SqliteStore::builder`] does for a file.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use sqlite_outbox::{ManualClock, MemoryStore, RetryPolicy};
    ///
    /// let clock = ManualClock::new();
    /// let store = MemoryStore::builder()
    ///     .clock(Arc::new(clock.clone()))
    ///     .retry_policy(RetryPolicy::constant(Duration::from_secs(5)))
    ///     .build();
    /// # let _ = store;
    /// ```
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            clock: Arc::new(SystemClock),
            policy: RetryPolicy::default(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave an event half-written
        // (every mutation is a field assignment), so a poisoned lock is safe
        // to keep using.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn now(&self) -> DateTime<Utc> {
        self.inner.clock.now()
    }

    fn insert(&self, state: &mut State, event: NewEvent, now: DateTime<Utc>) -> Result<Event> {
        if let Some(key) = &event.idempotency_key {
            if let Some(seq) = state.by_idempotency_key.get(key) {
                if let Some(existing) = state.rows.get(seq) {
                    return Ok(existing.clone());
                }
            }
        }
        if state.by_id.contains_key(&event.id) {
            return Err(Error::invalid(format!(
                "an event with id {} exists",
                event.id
            )));
        }
        state.last_seq += 1;
        let seq = state.last_seq;
        let stored = event.into_pending(seq, now, &self.inner.policy);
        state.by_id.insert(stored.id, seq);
        if let Some(key) = &stored.idempotency_key {
            state.by_idempotency_key.insert(key.clone(), seq);
        }
        state.rows.insert(seq, stored.clone());
        Ok(stored)
    }

    fn remove_where(&self, keep: impl Fn(&Event) -> bool) -> u64 {
        let mut state = self.state();
        let doomed: Vec<i64> = state
            .rows
            .values()
            .filter(|e| !keep(e))
            .map(|e| e.seq)
            .collect();
        for seq in &doomed {
            if let Some(e) = state.rows.remove(seq) {
                state.by_id.remove(&e.id);
                if let Some(key) = &e.idempotency_key {
                    state.by_idempotency_key.remove(key);
                }
            }
        }
        doomed.len() as u64
    }

    fn with_event<T>(
        &self,
        id: EventId,
        f: impl FnOnce(&mut Event, DateTime<Utc>) -> Result<T>,
    ) -> Result<T> {
        let now = truncate(self.now());
        let mut state = self.state();
        let seq = *state.by_id.get(&id).ok_or_else(|| Error::not_found(id))?;
        let event = state
            .rows
            .get_mut(&seq)
            .ok_or_else(|| Error::not_found(id))?;
        f(event, now)
    }
}

impl MemoryStore {
    /// Events of the types `filter` allows under a live lease at `now`.
    fn live_leases(&self, filter: &TypeFilter<'_>, now: DateTime<Utc>) -> usize {
        self.state()
            .rows
            .values()
            .filter(|e| {
                e.status == Status::Processing
                    && e.locked_until.is_some_and(|t| t > now)
                    && filter.allows(&e.event_type)
            })
            .count()
    }
}

/// Times are stored in whole milliseconds, as in SQLite.
fn truncate(at: DateTime<Utc>) -> DateTime<Utc> {
    clock::from_millis(clock::to_millis(at))
}

/// The claimability rule, written once for the model; the SQL in
/// `sqlite.rs` states the same rule.
fn claimable(keys: &KeyIndex<'_>, e: &Event, now: DateTime<Utc>) -> bool {
    let due = match e.status {
        Status::Pending => e.next_attempt_at <= now,
        Status::Processing => e.locked_until.is_none_or(|t| t <= now),
        Status::Done | Status::Failed => false,
    };
    if !due {
        return false;
    }
    let Some(key) = &e.ordering_key else {
        return true;
    };
    // Held back by an earlier unfinished event of its key, or by another
    // event of its key under a live lease (`e` itself is due, so its own
    // lease is not live).
    keys.get(key.as_str())
        .is_none_or(|k| k.first_unfinished >= e.seq && k.live == 0)
}

/// Per ordering key: the first unfinished event and how many hold a live
/// lease. Built once per claim, so that a claim is not quadratic.
type KeyIndex<'a> = HashMap<&'a str, KeyState>;

struct KeyState {
    first_unfinished: i64,
    live: usize,
}

fn key_index(state: &State, now: DateTime<Utc>) -> KeyIndex<'_> {
    let mut keys: KeyIndex<'_> = HashMap::new();
    for b in state.rows.values() {
        let Some(key) = &b.ordering_key else {
            continue;
        };
        if !matches!(b.status, Status::Pending | Status::Processing) {
            continue;
        }
        let k = keys.entry(key.as_str()).or_insert(KeyState {
            first_unfinished: b.seq,
            live: 0,
        });
        k.first_unfinished = k.first_unfinished.min(b.seq);
        if b.status == Status::Processing && b.locked_until.is_some_and(|t| t > now) {
            k.live += 1;
        }
    }
    keys
}

fn finish(e: &mut Event, status: Status, now: DateTime<Utc>) {
    e.status = status;
    e.locked_at = None;
    e.locked_until = None;
    e.lease_token = None;
    if matches!(status, Status::Done | Status::Failed) {
        e.completed_at = Some(now);
    }
}

fn apply_retry(
    e: &mut Event,
    policy: &RetryPolicy,
    error: &str,
    delay: Option<Duration>,
    now: DateTime<Utc>,
) {
    e.last_error = Some(error.to_owned());
    if e.attempts >= e.max_attempts {
        finish(e, Status::Failed, now);
    } else {
        let wait = delay.unwrap_or_else(|| policy.jittered_delay(e.attempts, e.seq as u64));
        finish(e, Status::Pending, now);
        e.next_attempt_at = truncate(clock::add(now, wait));
    }
}

impl Store for MemoryStore {
    fn enqueue_batch(&self, events: Vec<NewEvent>) -> Result<Vec<Event>> {
        for event in &events {
            event.checked_payload()?;
        }
        let now = self.now();
        let created = {
            let mut state = self.state();
            // All or nothing: insert into a copy of the indexes first.
            let mut scratch = State {
                rows: BTreeMap::new(),
                by_id: state.by_id.clone(),
                by_idempotency_key: state.by_idempotency_key.clone(),
                last_seq: state.last_seq,
            };
            let mut created = Vec::with_capacity(events.len());
            for event in events {
                let stored = match event
                    .idempotency_key
                    .as_ref()
                    .and_then(|k| state.by_idempotency_key.get(k))
                    .and_then(|seq| state.rows.get(seq))
                {
                    Some(existing) => existing.clone(),
                    None => self.insert(&mut scratch, event, now)?,
                };
                created.push(stored);
            }
            state.rows.append(&mut scratch.rows);
            state.by_id = scratch.by_id;
            state.by_idempotency_key = scratch.by_idempotency_key;
            state.last_seq = scratch.last_seq;
            created
        };
        self.inner.notifier.notify();
        Ok(created)
    }

    fn find(&self, id: EventId) -> Result<Option<Event>> {
        let state = self.state();
        Ok(state
            .by_id
            .get(&id)
            .and_then(|seq| state.rows.get(seq))
            .cloned())
    }

    fn settle(&self, acks: &[Ack]) -> Result<Vec<Result<()>>> {
        let now = truncate(self.now());
        let mut state = self.state();
        let mut results = Vec::with_capacity(acks.len());
        for ack in acks {
            let lease = &ack.lease;
            let Some(e) = state
                .rows
                .get_mut(&lease.seq)
                .filter(|e| e.status == Status::Processing && e.lease_token == Some(lease.token))
            else {
                results.push(Err(Error::lease_lost(lease.id, lease.attempt)));
                continue;
            };
            match &ack.kind {
                AckKind::Complete => finish(e, Status::Done, now),
                AckKind::Retry { error, delay } => {
                    apply_retry(e, &self.inner.policy, error, *delay, now)
                }
                AckKind::Fail { error } => {
                    e.last_error = Some(error.clone());
                    finish(e, Status::Failed, now);
                }
                AckKind::Extend { by } => e.locked_until = Some(truncate(clock::add(now, *by))),
                AckKind::Release => {
                    e.attempts = e.attempts.saturating_sub(1);
                    finish(e, Status::Pending, now);
                }
                AckKind::Defer { error, delay } => {
                    e.attempts = e.attempts.saturating_sub(1);
                    e.last_error = Some(error.clone());
                    e.next_attempt_at = e.next_attempt_at.max(truncate(clock::add(now, *delay)));
                    finish(e, Status::Pending, now);
                }
            }
            results.push(Ok(()));
        }
        Ok(results)
    }

    fn skip_backoff(&self, types: Option<&[String]>) -> Result<u64> {
        let now = truncate(self.now());
        let filter = TypeFilter::only(types);
        let mut n = 0;
        for e in self.state().rows.values_mut() {
            if e.status == Status::Pending
                && e.attempts > 0
                && e.next_attempt_at > now
                && filter.allows(&e.event_type)
            {
                e.next_attempt_at = now;
                n += 1;
            }
        }
        if n > 0 {
            self.inner.notifier.notify();
        }
        Ok(n)
    }

    fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    fn retry_policy(&self) -> &RetryPolicy {
        &self.inner.policy
    }
}
