//! Limits on how hard a dispatcher pushes an event type or a destination:
//! at most N events at once, or at most R deliveries per interval. The
//! events of a limited type or destination are claimed on their own, never
//! more than the limit allows, so an event that must wait for a limit stays
//! pending: no attempt spent, no worker asleep on it.
//!
//! A limit is kept by each dispatcher for itself, or
//! [`Limit::across_dispatchers`] by every dispatcher on the store together:
//! a concurrency limit is then counted from the live leases in the table and
//! a rate limit takes from a token bucket in `outbox_limits`, in the claim's
//! own transaction.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::destinations::{Destinations, Selection};
use crate::error::{Error, Result};
use crate::store::limits::{Bucket, SharedLimit};
use crate::store::{LimitKind, LimitScope, LimitState, Store};

/// A limit on the events of one type or one destination: see
/// [`crate::DispatcherBuilder::limit`].
///
/// ```
/// use std::time::Duration;
/// use sqlite_outbox::{Limit, LimitScope};
///
/// // At most 2 e-mails sent at once by this dispatcher.
/// let mail = Limit::concurrency(LimitScope::Type, "email.send", 2);
/// // At most 10 requests a second to the CRM, from every dispatcher.
/// let crm = Limit::rate(LimitScope::Destination, "crm", 10, Duration::from_secs(1))
///     .across_dispatchers();
/// assert!(crm.is_shared() && !mail.is_shared());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    scope: LimitScope,
    name: String,
    kind: LimitKind,
    shared: bool,
}

impl Limit {
    /// At most `max` events of the type or destination `name` handled at
    /// once.
    pub fn concurrency(scope: LimitScope, name: impl Into<String>, max: u32) -> Limit {
        Limit {
            scope,
            name: name.into(),
            kind: LimitKind::Concurrency(max),
            shared: false,
        }
    }

    /// At most `max` deliveries of the type or destination `name` started
    /// per `per`: a token bucket of `max` tokens that refills at that rate
    /// (a burst after a quiet spell takes at most `max`).
    pub fn rate(scope: LimitScope, name: impl Into<String>, max: u32, per: Duration) -> Limit {
        Limit {
            scope,
            name: name.into(),
            kind: LimitKind::Rate { max, per },
            shared: false,
        }
    }

    /// Kept by every dispatcher on the store together (in this and other
    /// processes, on other machines with PostgreSQL) rather than by each
    /// for itself. Costs a little more per claim of these events.
    pub fn across_dispatchers(mut self) -> Limit {
        self.shared = true;
        self
    }

    /// A type's limit or a destination's.
    pub fn scope(&self) -> LimitScope {
        self.scope
    }

    /// The type or destination.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How much it allows.
    pub fn kind(&self) -> LimitKind {
        self.kind
    }

    /// Whether every dispatcher on the store keeps it together.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    fn check(&self) -> Result<()> {
        if self.name.is_empty() || self.name.len() > 255 {
            return Err(Error::invalid(format!(
                "a limit names its {} in 1 to 255 bytes",
                self.scope.as_str()
            )));
        }
        if self.kind.max() == 0 || self.kind.max() > 1_000_000_000 {
            return Err(Error::invalid(format!(
                "the limit on {} {} must allow 1 to 1000000000",
                self.scope.as_str(),
                self.name
            )));
        }
        if self
            .kind
            .per()
            .is_some_and(|p| p < Duration::from_millis(1))
        {
            return Err(Error::invalid(format!(
                "the rate limit on {} {} needs an interval of at least 1 ms",
                self.scope.as_str(),
                self.name
            )));
        }
        Ok(())
    }
}

/// The events one or two limits (a concurrency limit, a rate limit) cover.
pub(crate) struct Group {
    scope: LimitScope,
    name: String,
    limits: Vec<Limit>,
    /// The types it covers, when known (written down for operators).
    event_types: Option<Vec<String>>,
    /// Its rate limit's bucket, when the dispatcher keeps it itself.
    bucket: Mutex<Option<Bucket>>,
    /// Since when events wait for it, as last written down.
    limited_since: Mutex<Option<DateTime<Utc>>>,
}

impl Group {
    fn local(&self) -> impl Iterator<Item = &Limit> {
        self.limits.iter().filter(|l| !l.shared)
    }

    /// The limits every dispatcher keeps together, for the store's claim.
    pub(crate) fn shared(&self) -> Vec<SharedLimit<'_>> {
        self.limits
            .iter()
            .filter(|l| l.shared)
            .map(|l| SharedLimit {
                scope: l.scope,
                name: &l.name,
                kind: l.kind,
            })
            .collect()
    }

    fn bucket(&self) -> MutexGuard<'_, Option<Bucket>> {
        self.bucket.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What this dispatcher's own limits allow now, with `in_flight` of
    /// the group's events in hand.
    pub(crate) fn allowance(&self, in_flight: usize, now: DateTime<Utc>) -> usize {
        let mut allowed = usize::MAX;
        for limit in self.local() {
            match limit.kind {
                LimitKind::Concurrency(max) => {
                    allowed = allowed.min((max as usize).saturating_sub(in_flight));
                }
                LimitKind::Rate { max, per } => {
                    let mut bucket = self.bucket();
                    let b = bucket
                        .unwrap_or_else(|| Bucket::full(max, now))
                        .at(max, per, now);
                    *bucket = Some(b);
                    allowed = allowed.min(b.whole());
                }
            }
        }
        allowed
    }

    /// Takes `n` claimed events from this dispatcher's own rate limit;
    /// returns when it next allows one more, if it allows none now.
    pub(crate) fn took(&self, n: usize) -> Option<DateTime<Utc>> {
        let rate = self.local().find_map(|l| match l.kind {
            LimitKind::Rate { max, per } => Some((max, per)),
            LimitKind::Concurrency(_) => None,
        });
        let mut bucket = self.bucket();
        let (b, (max, per)) = ((*bucket)?, rate?);
        let left = b.take(n);
        *bucket = Some(left);
        left.next_token_at(max, per)
    }

    /// Whether the group has limits every dispatcher keeps together.
    pub(crate) fn has_shared(&self) -> bool {
        self.limits.iter().any(|l| l.shared)
    }

    fn state(&self, limit: &Limit, since: Option<DateTime<Utc>>, now: DateTime<Utc>) -> LimitState {
        LimitState {
            scope: limit.scope,
            name: limit.name.clone(),
            kind: limit.kind,
            shared: limit.shared,
            event_types: self.event_types.clone(),
            limited_since: since,
            in_flight: None,
            updated_at: now,
        }
    }

    /// Writes the group's limits down, saying whether events wait for them
    /// (only when that changed, or `force`). A database error is logged:
    /// the next change writes again.
    pub(crate) fn record(&self, store: &dyn Store, waiting: bool, now: DateTime<Utc>, force: bool) {
        let mut since = self.limited_since.lock().unwrap_or_else(|p| p.into_inner());
        if since.is_some() == waiting && !force {
            return;
        }
        *since = match (*since, waiting) {
            (Some(t), true) => Some(t),
            (None, true) => Some(now),
            (_, false) => None,
        };
        for limit in &self.limits {
            if let Err(err) = store.record_limit(&self.state(limit, *since, now)) {
                tracing::warn!(error = %err, limit = %limit.name, "outbox could not write down a limit");
            }
        }
        if waiting {
            tracing::debug!(scope = self.scope.as_str(), name = %self.name, "outbox events wait for a limit");
        }
    }
}

/// The limits of one dispatcher, grouped by the events they cover.
#[derive(Default)]
pub(crate) struct Limits {
    groups: Vec<Group>,
    /// Event type → group, for limits on types.
    by_type: HashMap<String, usize>,
    /// Destination → group, for limits on destinations.
    by_destination: HashMap<String, usize>,
}

impl Limits {
    /// The builder's limits over `destinations`, for a dispatcher of the
    /// types `mine` (all when `None`).
    pub(crate) fn new(
        limits: Vec<Limit>,
        destinations: &Destinations,
        mine: Option<&[String]>,
    ) -> Result<Limits> {
        let mut out = Limits::default();
        for limit in limits {
            limit.check()?;
            // A "destination" that is no destination of this dispatcher is
            // an event type, which is its own destination.
            let scope = match limit.scope {
                LimitScope::Destination if !destinations.is_named(&limit.name) => LimitScope::Type,
                s => s,
            };
            if scope == LimitScope::Type && mine.is_some_and(|m| !m.contains(&limit.name)) {
                return Err(Error::invalid(format!(
                    "a limit on event type {}, which this dispatcher has no handler for",
                    limit.name
                )));
            }
            let index = match scope {
                LimitScope::Type => out.by_type.get(&limit.name),
                LimitScope::Destination => out.by_destination.get(&limit.name),
            }
            .copied();
            let index = match index {
                Some(i) => i,
                None => {
                    let event_types = match scope {
                        LimitScope::Type => None,
                        LimitScope::Destination => destinations.types_of(&limit.name, mine),
                    };
                    out.groups.push(Group {
                        scope,
                        name: limit.name.clone(),
                        limits: Vec::new(),
                        event_types,
                        bucket: Mutex::new(None),
                        limited_since: Mutex::new(None),
                    });
                    let i = out.groups.len() - 1;
                    match scope {
                        LimitScope::Type => out.by_type.insert(limit.name.clone(), i),
                        LimitScope::Destination => out.by_destination.insert(limit.name.clone(), i),
                    };
                    i
                }
            };
            let group = &mut out.groups[index];
            if group
                .limits
                .iter()
                .any(|l| l.kind.as_str() == limit.kind.as_str())
            {
                return Err(Error::invalid(format!(
                    "two {} limits on {} {}; keep one",
                    limit.kind.as_str(),
                    limit.scope.as_str(),
                    limit.name
                )));
            }
            group.limits.push(limit);
        }
        // A type's events go to one destination: two limits on both would
        // each claim them, and neither would hold.
        for t in out.by_type.keys() {
            let d = destinations.of(t);
            if d != t && out.by_destination.contains_key(d) {
                return Err(Error::invalid(format!(
                    "event type {t} is limited, and so is its destination {d}; keep one of them"
                )));
            }
        }
        Ok(out)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    pub(crate) fn groups(&self) -> impl Iterator<Item = (usize, &Group)> {
        self.groups.iter().enumerate()
    }

    /// The group whose limits cover events of `event_type`, if any.
    pub(crate) fn group_of(&self, destinations: &Destinations, event_type: &str) -> Option<usize> {
        if self.groups.is_empty() {
            return None;
        }
        self.by_type
            .get(event_type)
            .or_else(|| self.by_destination.get(destinations.of(event_type)))
            .copied()
    }

    /// What the usual claims take: what `destinations` allows, less every
    /// limited type and destination but the groups `roomy` (those whose
    /// limits allow a whole claim now); the others are claimed on their
    /// own.
    pub(crate) fn usual(
        &self,
        destinations: &Destinations,
        mine: Option<&[String]>,
        roomy: &[usize],
    ) -> Selection {
        if self.groups.is_empty() {
            return destinations.claimable(mine);
        }
        let out = |i: &usize| !roomy.contains(i);
        let limited: Vec<String> = self
            .by_destination
            .iter()
            .filter(|(_, i)| out(i))
            .map(|(d, _)| d.clone())
            .collect();
        let mut selection = destinations.claimable_without(mine, &limited);
        for (t, _) in self.by_type.iter().filter(|(_, i)| out(i)) {
            match &mut selection.only {
                Some(only) => only.retain(|x| x != t),
                None => selection.skip.push(t.clone()),
            }
        }
        selection
    }

    /// What a claim of group `index` may take now: `None` while its
    /// destination is held back (a probe brings it back).
    pub(crate) fn selection(
        &self,
        index: usize,
        destinations: &Destinations,
        mine: Option<&[String]>,
    ) -> Option<Selection> {
        let group = self.groups.get(index)?;
        match group.scope {
            LimitScope::Type => {
                let open = destinations.claimable(mine).filter().allows(&group.name);
                open.then(|| Selection {
                    only: Some(vec![group.name.clone()]),
                    skip: Vec::new(),
                })
            }
            LimitScope::Destination => (!destinations.is_held(&group.name))
                .then(|| destinations.probe_selection(&group.name, mine)),
        }
    }

    /// Writes down that no event waits for this dispatcher's limits any
    /// more (it stops).
    pub(crate) fn waiting_over(&self, store: &dyn Store, now: DateTime<Utc>) {
        for group in &self.groups {
            group.record(store, false, now, false);
        }
    }

    /// Writes every limit down as the dispatcher starts.
    pub(crate) fn record_all(&self, store: &dyn Store, now: DateTime<Utc>) {
        for group in &self.groups {
            group.record(store, false, now, true);
        }
    }
}

/// The limits, shared by a dispatcher's threads.
pub(crate) type SharedLimits = Arc<Limits>;
