//! Destinations: where a dispatcher's events go, and whether each can be
//! reached now.
//!
//! A handler that answers [`crate::HandlerError::unavailable`] marks its
//! event's destination unreachable: the event goes back without spending
//! its attempt, and no event of that destination is claimed until a probe
//! (one event, on a backoff of 1 s doubling to 5 min) gets through. The app
//! can also pause and resume a destination, or take the whole dispatcher
//! offline, from what it knows about the network.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::clock;
use crate::event::Lease;
use crate::store::Store;
pub use crate::store::{DestinationState, Hold};

/// The first wait before probing a destination that became unreachable.
pub(crate) const FIRST_PROBE_AFTER: Duration = Duration::from_secs(1);

/// The longest wait between two probes of an unreachable destination.
pub(crate) const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(5 * 60);

struct Held {
    paused: bool,
    /// Held back because it said it is busy, not because it could not be
    /// reached.
    busy: bool,
    since: DateTime<Utc>,
    updated: DateTime<Utc>,
    last_error: Option<String>,
    backoff: Duration,
    next_probe: DateTime<Utc>,
    /// The lease of the event out as a probe, if one is.
    probe: Option<(i64, i64)>,
    /// Probes sent so far, to vary the jitter.
    probes: u64,
}

impl Held {
    fn new(now: DateTime<Utc>, paused: bool) -> Self {
        Held {
            paused,
            busy: false,
            since: now,
            updated: now,
            last_error: None,
            backoff: Duration::ZERO,
            next_probe: now,
            probe: None,
            probes: 0,
        }
    }
}

/// The destinations of one dispatcher: the builder's routes and what is
/// held back.
pub(crate) struct Destinations {
    /// Event type → destination, for types the builder routed.
    routes: HashMap<String, String>,
    /// The destination of every other type; without one, each other type
    /// is its own destination.
    default: Option<String>,
    /// Where the state is written down for `stats` (and its clock).
    store: Arc<dyn Store>,
    offline: AtomicBool,
    held: Mutex<HashMap<String, Held>>,
}

impl Destinations {
    pub(crate) fn new(
        routes: HashMap<String, String>,
        default: Option<String>,
        store: Arc<dyn Store>,
    ) -> Self {
        Destinations {
            routes,
            default,
            store,
            offline: AtomicBool::new(false),
            held: Mutex::new(HashMap::new()),
        }
    }

    fn held(&self) -> MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The destination of an event type.
    pub(crate) fn of<'a>(&'a self, event_type: &'a str) -> &'a str {
        match (self.routes.get(event_type), &self.default) {
            (Some(d), _) | (None, Some(d)) => d,
            (None, None) => event_type,
        }
    }

    fn is_default(&self, destination: &str) -> bool {
        self.default.as_deref() == Some(destination)
    }

    /// Whether `destination` is held back now.
    pub(crate) fn is_held(&self, destination: &str) -> bool {
        self.held().contains_key(destination)
    }

    /// Whether `name` is a destination of its own (routed to, or the
    /// default) rather than an event type that is its own destination.
    pub(crate) fn is_named(&self, name: &str) -> bool {
        self.is_default(name) || self.routes.values().any(|d| d == name)
    }

    pub(crate) fn is_offline(&self) -> bool {
        self.offline.load(Ordering::SeqCst)
    }

    /// Whether a claimed event may go to its handler now: its destination
    /// is not held back, or the event is that destination's probe.
    pub(crate) fn may_run(&self, event_type: &str, lease: &Lease) -> bool {
        if self.is_offline() {
            return false;
        }
        match self.held().get(self.of(event_type)) {
            None => true,
            Some(h) => h.probe == Some((lease.seq, lease.token)),
        }
    }

    /// A handler said the destination of `event_type` cannot be reached.
    pub(crate) fn unreachable(&self, event_type: &str, lease: &Lease, error: &str) {
        self.hold_back(event_type, lease, error, false, None);
    }

    /// A handler said the destination of `event_type` is busy (a 429 or
    /// 503): held back as when unreachable, its next probe no sooner than
    /// `after` when the destination said when (`Retry-After`).
    pub(crate) fn busy(
        &self,
        event_type: &str,
        lease: &Lease,
        error: &str,
        after: Option<Duration>,
    ) {
        self.hold_back(event_type, lease, error, true, after);
    }

    fn hold_back(
        &self,
        event_type: &str,
        lease: &Lease,
        error: &str,
        busy: bool,
        after: Option<Duration>,
    ) {
        let destination = self.of(event_type).to_owned();
        let now = self.store.clock().now();
        let mut held = self.held();
        let h = held
            .entry(destination.clone())
            .or_insert_with(|| Held::new(now, false));
        h.last_error = Some(error.to_owned());
        h.busy = busy;
        let first = h.backoff.is_zero();
        let was_probe = h.probe == Some((lease.seq, lease.token));
        if !first && !was_probe {
            // Another event that was already running: the state stands.
            return;
        }
        h.probe = None;
        h.updated = now;
        h.backoff = if first {
            FIRST_PROBE_AFTER
        } else {
            next_probe_interval(h.backoff)
        };
        let wait = jittered(h.backoff, &destination, h.probes);
        h.next_probe = clock::add(now, after.map_or(wait, |asked| asked.max(wait)));
        let wait = (h.next_probe - now).to_std().unwrap_or(Duration::ZERO);
        drop(held);
        self.persist(&destination);
        if first {
            tracing::warn!(
                destination = %destination,
                error = %error,
                next_probe_in = ?wait,
                "outbox destination unreachable; holding its events back"
            );
        } else {
            tracing::debug!(
                destination = %destination,
                error = %error,
                next_probe_in = ?wait,
                "outbox destination still unreachable"
            );
        }
    }

    /// A handler got an answer from the destination of `event_type` (or
    /// failed for a reason of its own): if it was held back as unreachable,
    /// it is available again. Returns the destination that came back.
    pub(crate) fn reached(&self, event_type: &str, lease: &Lease) -> Option<String> {
        let destination = self.of(event_type);
        let mut held = self.held();
        let h = held.get_mut(destination)?;
        if h.paused {
            if h.probe == Some((lease.seq, lease.token)) {
                h.probe = None;
            }
            return None;
        }
        let since = h.since;
        held.remove(destination);
        drop(held);
        self.persist(destination);
        tracing::info!(
            destination = %destination,
            unreachable_for = ?(self.store.clock().now() - since).to_std().unwrap_or(Duration::ZERO),
            "outbox destination reachable again"
        );
        Some(destination.to_owned())
    }

    /// The destinations whose next probe is due and not out yet.
    pub(crate) fn probes_due(&self) -> Vec<String> {
        if self.is_offline() {
            return Vec::new();
        }
        let now = self.store.clock().now();
        self.held()
            .iter()
            .filter(|(_, h)| !h.paused && h.probe.is_none() && h.next_probe <= now)
            .map(|(d, _)| d.clone())
            .collect()
    }

    /// A probe of `destination` was claimed under `lease`.
    pub(crate) fn probe_sent(&self, destination: &str, lease: &Lease) {
        if let Some(h) = self.held().get_mut(destination) {
            h.probe = Some((lease.seq, lease.token));
            h.probes += 1;
        }
    }

    /// A probe found nothing to deliver: nothing waits for the
    /// destination, so it is not held back any more (the next event finds
    /// out whether it can be reached).
    pub(crate) fn nothing_to_probe(&self, destination: &str) {
        let removed = {
            let mut held = self.held();
            held.get(destination).is_some_and(|h| !h.paused) && held.remove(destination).is_some()
        };
        if removed {
            self.persist(destination);
        }
    }

    /// The probe under `lease` was given back unrun (the dispatcher is
    /// stopping): the next one may go.
    pub(crate) fn probe_returned(&self, event_type: &str, lease: &Lease) {
        if let Some(h) = self.held().get_mut(self.of(event_type)) {
            if h.probe == Some((lease.seq, lease.token)) {
                h.probe = None;
            }
        }
    }

    /// When the next probe falls due, if any.
    pub(crate) fn next_probe_at(&self) -> Option<DateTime<Utc>> {
        if self.is_offline() {
            return None;
        }
        self.held()
            .values()
            .filter(|h| !h.paused && h.probe.is_none())
            .map(|h| h.next_probe)
            .min()
    }

    pub(crate) fn pause(&self, destination: &str) {
        let now = self.store.clock().now();
        let mut held = self.held();
        let h = held
            .entry(destination.to_owned())
            .or_insert_with(|| Held::new(now, true));
        h.paused = true;
        h.updated = now;
        drop(held);
        self.persist(destination);
        tracing::info!(destination = %destination, "outbox destination paused");
    }

    /// Returns whether `destination` was held back.
    pub(crate) fn resume(&self, destination: &str) -> bool {
        let was = self.held().remove(destination).is_some();
        if was {
            self.persist(destination);
            tracing::info!(destination = %destination, "outbox destination resumed");
        }
        was
    }

    /// Offline: nothing is claimed and nothing probed. Online: everything
    /// held back is released at once.
    pub(crate) fn set_online(&self, online: bool) {
        let was_offline = self.offline.swap(!online, Ordering::SeqCst);
        if online {
            // What was unreachable is tried again; what the app paused stays
            // paused until `resume`.
            let released: Vec<String> = {
                let mut held = self.held();
                let names: Vec<String> = held
                    .iter()
                    .filter(|(_, h)| !h.paused)
                    .map(|(name, _)| name.clone())
                    .collect();
                for name in &names {
                    held.remove(name);
                }
                names
            };
            for name in released {
                self.persist(&name);
            }
        }
        if was_offline == online {
            tracing::info!(online, "outbox dispatcher connectivity changed");
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<DestinationState> {
        let mut list: Vec<DestinationState> = self
            .held()
            .iter()
            .map(|(name, h)| state_of(name, h))
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Writes the state of `name` down (or that it is no longer held).
    /// Advisory: a failure is logged, and delivery goes on.
    fn persist(&self, name: &str) {
        let state = self.held().get(name).map(|h| {
            let mut state = state_of(name, h);
            // The table knows two holds: a busy destination is probed,
            // like an unreachable one.
            if state.hold == Hold::Busy {
                state.hold = Hold::Unreachable;
            }
            state
        });
        if let Err(e) = self.store.record_destination(name, state.as_ref()) {
            tracing::debug!(error = %e, destination = %name, "outbox could not write down a destination's state");
        }
    }

    /// Writes down that none of this dispatcher's destinations is held
    /// back any more (it is stopping).
    pub(crate) fn forget_all(&self) {
        let names: Vec<String> = self.held().keys().cloned().collect();
        for name in names {
            if let Err(e) = self.store.record_destination(&name, None) {
                tracing::debug!(error = %e, destination = %name, "outbox could not clear a destination's state");
            }
        }
    }
}

fn state_of(name: &str, h: &Held) -> DestinationState {
    DestinationState {
        name: name.to_owned(),
        hold: if h.paused {
            Hold::Paused
        } else if h.busy {
            Hold::Busy
        } else {
            Hold::Unreachable
        },
        since: h.since,
        next_probe_at: (!h.paused && h.probe.is_none()).then_some(h.next_probe),
        last_error: h.last_error.clone(),
        updated_at: h.updated,
    }
}

/// The wait after a probe that failed: twice the last, at most
/// [`MAX_PROBE_INTERVAL`].
fn next_probe_interval(last: Duration) -> Duration {
    (last * 2).min(MAX_PROBE_INTERVAL)
}

/// `d` spread by up to a tenth either way, the same for the same
/// destination and probe count, so that destinations that went down
/// together are not probed in lockstep.
fn jittered(d: Duration, destination: &str, probes: u64) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (destination, probes).hash(&mut hasher);
    // A fraction in [-0.1, 0.1].
    let unit = (hasher.finish() % 2001) as f64 / 1000.0 - 1.0;
    d.mul_f64(1.0 + unit / 10.0)
}

mod selection;

pub(crate) use selection::Selection;

#[cfg(test)]
mod tests;
