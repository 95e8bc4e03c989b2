//! Limits on how hard dispatchers push a type or a destination, as the
//! stores keep them: a concurrency limit counted from the live leases in
//! the table, a rate limit's token bucket in `outbox_limits`, both taken
//! in the claim's own transaction so that they hold across processes; and
//! what dispatchers write down about them for operators.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::clock;
use crate::event::Event;

/// What a limit covers: the events of one type, or of one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitScope {
    /// The events of one event type.
    Type,
    /// The events of one destination (see
    /// [`crate::DispatcherBuilder::destination`]).
    Destination,
}

impl LimitScope {
    /// The name stored in `outbox_limits.scope`.
    pub fn as_str(&self) -> &'static str {
        match self {
            LimitScope::Type => "type",
            LimitScope::Destination => "destination",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<LimitScope> {
        match text {
            "type" => Some(LimitScope::Type),
            "destination" => Some(LimitScope::Destination),
            _ => None,
        }
    }
}

/// How much a limit allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// At most this many events handled at once.
    Concurrency(u32),
    /// At most `max` deliveries started per `per`, as a token bucket that
    /// holds up to `max` tokens and gains `max` every `per`.
    Rate {
        /// Deliveries per interval (and the most a burst may take).
        max: u32,
        /// The interval.
        per: Duration,
    },
}

impl LimitKind {
    /// `concurrency` or `rate`, as stored.
    pub fn as_str(&self) -> &'static str {
        match self {
            LimitKind::Concurrency(_) => "concurrency",
            LimitKind::Rate { .. } => "rate",
        }
    }

    /// The limit's `max`.
    pub fn max(&self) -> u32 {
        match *self {
            LimitKind::Concurrency(max) | LimitKind::Rate { max, .. } => max,
        }
    }

    /// The rate's interval.
    pub fn per(&self) -> Option<Duration> {
        match *self {
            LimitKind::Concurrency(_) => None,
            LimitKind::Rate { per, .. } => Some(per),
        }
    }

    pub(crate) fn from_parts(kind: &str, max: i64, per_ms: Option<i64>) -> Option<LimitKind> {
        let max = u32::try_from(max).ok().filter(|m| *m > 0)?;
        match (kind, per_ms) {
            ("concurrency", _) => Some(LimitKind::Concurrency(max)),
            ("rate", Some(ms)) if ms > 0 => Some(LimitKind::Rate {
                max,
                per: Duration::from_millis(ms.unsigned_abs()),
            }),
            _ => None,
        }
    }
}

/// A limit a claim keeps with every dispatcher on the store.
#[derive(Debug, Clone, Copy)]
pub struct SharedLimit<'a> {
    pub scope: LimitScope,
    pub name: &'a str,
    pub kind: LimitKind,
}

/// What a limited claim got.
#[derive(Debug, Default)]
pub struct Limited {
    /// The events claimed.
    pub events: Vec<Event>,
    /// How many the limit allowed (before the claim's own `limit`).
    pub allowed: usize,
    /// For a rate limit that allows nothing more now: when it next will.
    pub next_at: Option<DateTime<Utc>>,
}

/// The stores' part of a limited claim of at most `limit` events, on
/// `conn` in the claim's transaction: what `shared` allows at `now`
/// (`live` counts the live leases of the claim's types, once, if a
/// concurrency limit needs it; `stored` reads a rate limit's bucket,
/// `None` being full), `claim` of at most that many, and each rate limit's
/// bucket taken from and written back with `write`. The result says when
/// every rate limit allows another event, if one allows none now.
pub(crate) fn claim_within<C>(
    conn: &mut C,
    (shared, now, limit): (&[SharedLimit<'_>], DateTime<Utc>, usize),
    mut live: impl FnMut(&mut C) -> crate::Result<usize>,
    mut stored: impl FnMut(&mut C, &SharedLimit<'_>) -> crate::Result<Option<Bucket>>,
    claim: impl FnOnce(&mut C, usize) -> crate::Result<Vec<Event>>,
    mut write: impl FnMut(&mut C, &SharedLimit<'_>, Bucket) -> crate::Result<()>,
) -> crate::Result<Limited> {
    let mut allowed = usize::MAX;
    let mut counted = None;
    let mut buckets = Vec::new();
    for l in shared {
        match l.kind {
            LimitKind::Concurrency(max) => {
                let n = match counted {
                    Some(n) => n,
                    None => *counted.insert(live(conn)?),
                };
                allowed = allowed.min((max as usize).saturating_sub(n));
            }
            LimitKind::Rate { max, per } => {
                let bucket = stored(conn, l)?
                    .unwrap_or_else(|| Bucket::full(max, now))
                    .at(max, per, now);
                allowed = allowed.min(bucket.whole());
                buckets.push((l, bucket, max, per));
            }
        }
    }
    let want = limit.min(allowed);
    let events = if want > 0 {
        claim(conn, want)?
    } else {
        Vec::new()
    };
    let mut next_at: Option<DateTime<Utc>> = None;
    for (l, bucket, max, per) in buckets {
        let left = bucket.take(events.len());
        if let Some(at) = left.next_token_at(max, per) {
            next_at = Some(next_at.map_or(at, |n| n.max(at)));
        }
        write(conn, l, left)?;
    }
    Ok(Limited {
        events,
        allowed,
        next_at,
    })
}

/// A token bucket: `tokens` at `at`, refilled at `max` per `per`, up to
/// `max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Bucket {
    pub(crate) tokens: f64,
    pub(crate) at: DateTime<Utc>,
}

impl Bucket {
    /// A full bucket at `now`.
    pub(crate) fn full(max: u32, now: DateTime<Utc>) -> Bucket {
        Bucket {
            tokens: f64::from(max),
            at: now,
        }
    }

    /// The bucket refilled up to `now`, and stamped `now`. A time after
    /// `now` (a clock that went back, another machine's clock ahead, a row
    /// another program wrote) adds nothing and is not kept, so it cannot
    /// hold the bucket empty until then.
    pub(crate) fn at(self, max: u32, per: Duration, now: DateTime<Utc>) -> Bucket {
        let elapsed = (now - self.at).to_std().unwrap_or(Duration::ZERO);
        let gained = f64::from(max) * elapsed.as_secs_f64() / per.as_secs_f64().max(1e-3);
        let tokens = if self.tokens.is_finite() {
            (self.tokens + gained).clamp(0.0, f64::from(max))
        } else {
            f64::from(max)
        };
        Bucket { tokens, at: now }
    }

    /// Whole deliveries it allows now.
    pub(crate) fn whole(&self) -> usize {
        self.tokens.floor().max(0.0) as usize
    }

    /// When it next holds a whole token, if it holds none now.
    pub(crate) fn next_token_at(&self, max: u32, per: Duration) -> Option<DateTime<Utc>> {
        if self.tokens >= 1.0 {
            return None;
        }
        let missing = 1.0 - self.tokens.max(0.0);
        let secs = missing * per.as_secs_f64() / f64::from(max.max(1));
        Some(clock::add(self.at, Duration::from_secs_f64(secs)))
    }

    /// Takes `n` tokens.
    pub(crate) fn take(self, n: usize) -> Bucket {
        Bucket {
            tokens: (self.tokens - n as f64).max(0.0),
            at: self.at,
        }
    }
}

/// A limit as a dispatcher last wrote it down, for
/// [`crate::Operator::stats`] and [`crate::Operator::why`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct LimitState {
    /// What it covers.
    pub scope: LimitScope,
    /// The type or destination.
    pub name: String,
    /// How much it allows (`kind`, `max` and `per_ms` in JSON).
    #[serde(flatten)]
    pub kind: LimitKind,
    /// Kept across every dispatcher on the store (`true`), or by each
    /// dispatcher for itself.
    pub shared: bool,
    /// The event types it covers, when the dispatcher knew them (a
    /// destination's); `None`: the type named, or every type of the
    /// destination.
    pub event_types: Option<Vec<String>>,
    /// Since when events wait for this limit; `None` while none does.
    pub limited_since: Option<DateTime<Utc>>,
    /// For a concurrency limit: the events of its types under a live lease
    /// now, in every process.
    pub in_flight: Option<u64>,
    /// When a dispatcher last wrote it.
    pub updated_at: DateTime<Utc>,
}

impl serde::Serialize for LimitKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("kind", self.as_str())?;
        map.serialize_entry("max", &self.max())?;
        if let Some(per) = self.per() {
            map.serialize_entry("per_ms", &(per.as_millis() as u64))?;
        }
        map.end()
    }
}

impl LimitState {
    /// Whether it covers events of `event_type`. A destination's limit
    /// without a list of types is a dispatcher's default destination,
    /// which takes every type (a relay's endpoint, say).
    pub fn covers(&self, event_type: &str) -> bool {
        match (&self.event_types, self.scope) {
            (Some(types), _) => types.iter().any(|t| t == event_type),
            (None, LimitScope::Type) => self.name == event_type,
            (None, LimitScope::Destination) => true,
        }
    }

    /// One line for people: "at most 2 at once" or "at most 10 per 1s".
    pub fn describe(&self) -> String {
        let what = match self.kind {
            LimitKind::Concurrency(max) => format!("at most {max} at once"),
            LimitKind::Rate { max, per } => {
                format!("at most {max} per {}", crate::text::format_duration(per))
            }
        };
        let whose = if self.shared {
            "across dispatchers"
        } else {
            "per dispatcher"
        };
        format!("{} {}: {what}, {whose}", self.scope.as_str(), self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refills_at_its_rate_and_never_past_full() {
        let t0 = clock::from_millis(1_700_000_000_000);
        let per = Duration::from_secs(1);
        let b = Bucket::full(10, t0).take(10);
        assert_eq!(b.whole(), 0);
        assert_eq!(
            b.next_token_at(10, per),
            Some(clock::add(t0, Duration::from_millis(100)))
        );
        let later = b.at(10, per, clock::add(t0, Duration::from_millis(350)));
        assert_eq!(later.whole(), 3);
        assert_eq!(later.next_token_at(10, per), None);
        let much_later = later.at(10, per, clock::add(t0, Duration::from_secs(60)));
        assert_eq!(much_later.whole(), 10);
        // A clock that went back adds nothing and takes nothing.
        let back = much_later.take(4).at(10, per, t0);
        assert_eq!(back.whole(), 6);
        let broken = Bucket {
            tokens: f64::NAN,
            at: t0,
        };
        assert_eq!(broken.at(10, per, t0).whole(), 10);
        // A time far ahead is not kept: the bucket refills from now on.
        let ahead = Bucket {
            tokens: 0.0,
            at: clock::from_millis(253_402_300_799_999),
        }
        .at(10, per, t0);
        assert_eq!((ahead.whole(), ahead.at), (0, t0));
        assert_eq!(
            ahead.at(10, per, clock::add(t0, per)).whole(),
            10,
            "refilled a whole interval later"
        );
    }
}
