//! Why an event is where it is: the answer [`crate::Operator::why`] gives
//! for one event, from what every store keeps (the event, the events of
//! its ordering key, the destinations written down).

use chrono::{DateTime, Utc};

use super::report::{DestinationState, ListFilter};
use super::Operator;
use crate::error::Result;
use crate::event::{Event, Status};
use crate::id::EventId;

/// Why an event is not moving, or that it is.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Why {
    /// Pending and due now: the next claim takes it.
    Due,
    /// Pending until its due time: a retry's backoff, a delay it was
    /// enqueued with, or a time its destination asked for.
    Scheduled {
        /// When it falls due.
        at: DateTime<Utc>,
        /// The error of its last attempt, if it had one.
        last_error: Option<String>,
    },
    /// Behind the unfinished event at the head of its ordering key, which
    /// must finish first.
    BehindKey {
        /// The ordering key.
        key: String,
        /// The event in front.
        head: EventId,
        /// Its status (pending or processing).
        head_status: Status,
        /// When it is due (pending) or its lease ends (processing).
        head_until: Option<DateTime<Utc>>,
        /// Its last error.
        head_error: Option<String>,
    },
    /// Its destination is held back by a dispatcher (unreachable, busy or
    /// paused), as the dispatcher wrote it down.
    HeldBack(DestinationState),
    /// Due, and waiting for a limit a dispatcher keeps on its type or
    /// destination (a concurrency limit with every slot taken, or a rate
    /// limit spent for now), as the dispatcher wrote it down. It spends no
    /// attempt while it waits.
    Limited(crate::store::LimitState),
    /// Being handled under a lease.
    Leased {
        /// When the lease ends unless it is renewed.
        until: Option<DateTime<Utc>>,
    },
    /// Delivered.
    Done,
    /// Given up on, with the reason.
    Failed {
        /// The error it failed with.
        error: Option<String>,
    },
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = |t: &DateTime<Utc>| t.format("%Y-%m-%d %H:%M:%S UTC").to_string();
        match self {
            Why::Due => f.write_str("due now"),
            Why::Scheduled { at: t, last_error } => {
                write!(f, "waits until {}", at(t))?;
                match last_error {
                    Some(e) => write!(f, " (after: {e})"),
                    None => Ok(()),
                }
            }
            Why::BehindKey { key, .. } => {
                write!(
                    f,
                    "behind ordering key {key:?}: {}",
                    self.head_summary().unwrap_or_default()
                )
            }
            Why::HeldBack(d) => {
                write!(
                    f,
                    "destination {:?} is held back ({})",
                    d.name,
                    d.hold.as_str()
                )?;
                if let Some(t) = d.next_probe_at {
                    write!(f, ", next probe at {}", at(&t))?;
                }
                match &d.last_error {
                    Some(e) => write!(f, ": {e}"),
                    None => Ok(()),
                }
            }
            Why::Limited(l) => {
                let cause = match l.kind {
                    crate::store::LimitKind::Concurrency(_) => "every slot is taken",
                    crate::store::LimitKind::Rate { .. } => "waits for the rate limit",
                };
                write!(f, "limited: {cause} ({})", l.describe())?;
                if let Some(n) = l.in_flight {
                    write!(f, ", {n} in flight")?;
                }
                Ok(())
            }
            Why::Leased { until: Some(t) } => write!(f, "being handled, leased until {}", at(t)),
            Why::Leased { until: None } => f.write_str("being handled"),
            Why::Done => f.write_str("done"),
            Why::Failed { error: Some(e) } => write!(f, "failed: {e}"),
            Why::Failed { error: None } => f.write_str("failed"),
        }
    }
}

impl Why {
    /// Every [`Why::kind`], in the order of the lifecycle.
    pub const KINDS: [&'static str; 8] = [
        "due",
        "scheduled",
        "behind_key",
        "held_back",
        "limited",
        "leased",
        "done",
        "failed",
    ];

    /// The reason's name, as in its JSON `reason` field: `due`,
    /// `scheduled`, `behind_key`, `held_back`, `limited`, `leased`, `done`
    /// or `failed`.
    pub fn kind(&self) -> &'static str {
        match self {
            Why::Due => "due",
            Why::Scheduled { .. } => "scheduled",
            Why::BehindKey { .. } => "behind_key",
            Why::HeldBack(_) => "held_back",
            Why::Limited(_) => "limited",
            Why::Leased { .. } => "leased",
            Why::Done => "done",
            Why::Failed { .. } => "failed",
        }
    }

    /// For [`Why::BehindKey`], what its head is doing, in words: `its head
    /// ID is pending, retrying at TIME after: ERROR`.
    pub fn head_summary(&self) -> Option<String> {
        let Why::BehindKey {
            head,
            head_status,
            head_until,
            head_error,
            ..
        } = self
        else {
            return None;
        };
        let at = |t: &DateTime<Utc>| t.format("%Y-%m-%d %H:%M:%S UTC").to_string();
        let mut text = format!("its head {head} is {head_status}");
        match (head_status, head_until) {
            (Status::Processing, Some(t)) => text.push_str(&format!(", leased until {}", at(t))),
            (_, Some(t)) if *t > Utc::now() => text.push_str(&format!(", retrying at {}", at(t))),
            _ => {}
        }
        if let Some(e) = head_error {
            text.push_str(&format!(" after: {e}"));
        }
        Some(text)
    }
}

/// See [`crate::Operator::why`].
pub(crate) fn why<S: Operator + ?Sized>(store: &S, event: &Event) -> Result<Why> {
    let now = store.clock().now();
    match event.status {
        Status::Done => return Ok(Why::Done),
        Status::Failed => {
            return Ok(Why::Failed {
                error: event.last_error.clone(),
            })
        }
        Status::Processing if event.locked_until.is_some_and(|t| t > now) => {
            return Ok(Why::Leased {
                until: event.locked_until,
            })
        }
        // Pending, or a lease that ran out (claimable again, like due).
        _ => {}
    }
    if let Some(head) = head_of_key(store, event, now)? {
        return Ok(head);
    }
    if let Some(held) = store
        .destinations()?
        .into_iter()
        .find(|d| d.name == event.event_type)
    {
        return Ok(Why::HeldBack(held));
    }
    if event.status == Status::Pending && event.next_attempt_at > now {
        return Ok(Why::Scheduled {
            at: event.next_attempt_at,
            last_error: event.last_error.clone(),
        });
    }
    if let Some(limit) = store
        .limits()?
        .into_iter()
        .find(|l| l.limited_since.is_some() && l.covers(&event.event_type))
    {
        return Ok(Why::Limited(limit));
    }
    Ok(Why::Due)
}

/// The event of `event`'s ordering key that holds it back, by the claim's
/// rule: an earlier one that is unfinished, or any other under a live
/// lease.
fn head_of_key<S: Operator + ?Sized>(
    store: &S,
    event: &Event,
    now: DateTime<Utc>,
) -> Result<Option<Why>> {
    let Some(key) = &event.ordering_key else {
        return Ok(None);
    };
    let first = |status: Status| -> Result<Option<Event>> {
        Ok(store
            .list(&ListFilter {
                status: Some(status),
                ordering_key: Some(key.clone()),
                limit: 1,
                ..ListFilter::default()
            })?
            .into_iter()
            .next())
    };
    let leased = first(Status::Processing)?.filter(|b| {
        b.seq != event.seq && (b.seq < event.seq || b.locked_until.is_some_and(|t| t > now))
    });
    let pending = first(Status::Pending)?.filter(|b| b.seq < event.seq);
    let head = match (leased, pending) {
        (Some(a), Some(b)) => Some(if a.seq < b.seq { a } else { b }),
        (a, b) => a.or(b),
    };
    Ok(head.map(|b| Why::BehindKey {
        key: key.clone(),
        head: b.id,
        head_status: b.status,
        head_until: match b.status {
            Status::Processing => b.locked_until,
            _ => Some(b.next_attempt_at),
        },
        head_error: b.last_error,
    }))
}
