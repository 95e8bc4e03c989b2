//! The event model: what a caller enqueues ([`NewEvent`]) and what the
//! outbox stores ([`Event`], [`Status`], [`Lease`]).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::id::EventId;

/// The longest event type accepted, in bytes.
pub const MAX_EVENT_TYPE_LEN: usize = 200;

/// The largest payload accepted, in bytes of JSON text (1 MiB).
pub const MAX_PAYLOAD_BYTES: usize = 1 << 20;

/// The longest correlation id, ordering key or idempotency key accepted, in
/// bytes. The schema enforces the same limit on plain-SQL writers.
pub const MAX_KEY_LEN: usize = 255;

/// The longest error text kept as an event's `last_error` (and logged), in
/// bytes: a handler's error, an endpoint's response or a reason given by an
/// operator is cut there, on a character boundary, and ends with `…`.
pub const MAX_ERROR_LEN: usize = 4096;

/// `text` cut to [`MAX_ERROR_LEN`] bytes.
pub(crate) fn capped_error(text: &str) -> String {
    if text.len() <= MAX_ERROR_LEN {
        return text.to_owned();
    }
    let mut end = MAX_ERROR_LEN - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

pub use new::NewEvent;
pub use payload::Payload;

mod new;
mod payload;

/// Where an event is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Waiting to be claimed once it is due.
    Pending,
    /// Claimed by a worker under a lease.
    Processing,
    /// Handled successfully.
    Done,
    /// Given up on: a permanent error, or `max_attempts` reached.
    Failed,
}

impl Status {
    /// Every status, in lifecycle order.
    pub const ALL: [Status; 4] = [
        Status::Pending,
        Status::Processing,
        Status::Done,
        Status::Failed,
    ];

    /// The name stored in the database.
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Processing => "processing",
            Status::Done => "done",
            Status::Failed => "failed",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Status::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "unknown status {s:?} (expected pending, processing, done or failed)"
                ))
            })
    }
}

/// A stored event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Event {
    /// The event's identity.
    pub id: EventId,
    /// Its place in enqueue order: increasing, never reused, possibly with
    /// gaps.
    pub seq: i64,
    /// The event type, e.g. `"email.invite"` (`type` in JSON).
    #[serde(rename = "type")]
    pub event_type: String,
    /// The payload: its JSON text, read into a [`serde_json::Value`] on first use.
    pub payload: Payload,
    /// Where the event is in its life.
    pub status: Status,
    /// How many times it was claimed (or marked processing).
    pub attempts: u32,
    /// After this many attempts a failure is final.
    pub max_attempts: u32,
    /// When a pending event is due.
    pub next_attempt_at: DateTime<Utc>,
    /// When the current (or last) lease was taken.
    pub locked_at: Option<DateTime<Utc>>,
    /// When the current lease runs out.
    pub locked_until: Option<DateTime<Utc>>,
    /// The token of the current lease. Not in the JSON shape: it is the
    /// fencing secret of whoever holds the lease.
    #[serde(skip)]
    pub lease_token: Option<i64>,
    /// When the event became done or failed.
    pub completed_at: Option<DateTime<Utc>>,
    /// When delivery was confirmed by [`crate::legacy::UnfencedStore::mark_delivered`].
    pub delivered_at: Option<DateTime<Utc>>,
    /// The error of the last failed attempt.
    pub last_error: Option<String>,
    /// The caller's correlation id.
    pub correlation_id: Option<String>,
    /// The organisation the event belongs to.
    pub org_id: Option<Uuid>,
    /// The user the event belongs to.
    pub user_id: Option<Uuid>,
    /// The per-key ordering key.
    pub ordering_key: Option<String>,
    /// The idempotency key.
    pub idempotency_key: Option<String>,
    /// The W3C traceparent of the work that enqueued it, if any (see
    /// [`crate::NewEvent::with_traceparent`]). A malformed value another
    /// program wrote into the column reads as `None`.
    #[serde(default)]
    pub traceparent: Option<String>,
    /// Its priority: among due events, higher is claimed first (see
    /// [`crate::NewEvent::with_priority`]).
    #[serde(default)]
    pub priority: u8,
    /// When the event was enqueued.
    pub created_at: DateTime<Utc>,
}

impl Event {
    /// The payload as a `T`, read straight from its JSON text (no
    /// [`serde_json::Value`] is built on the way). A payload that does not fit is a permanent
    /// failure: retrying cannot change it, so `?` in a handler fails the
    /// event at once instead of retrying it for days.
    ///
    /// ```
    /// use serde::Deserialize;
    /// use sqlite_outbox::{Event, HandlerError};
    ///
    /// #[derive(Deserialize)]
    /// struct Invite { to: String }
    ///
    /// fn send(event: &Event) -> Result<(), HandlerError> {
    ///     let invite: Invite = event.payload_as()?;
    ///     assert!(invite.to.contains('@'));
    ///     Ok(())
    /// }
    /// ```
    ///
    /// # Errors
    ///
    /// A permanent [`crate::HandlerError`] naming the event and the
    /// mismatch.
    pub fn payload_as<T: serde::de::DeserializeOwned>(
        &self,
    ) -> std::result::Result<T, crate::HandlerError> {
        self.payload.to::<T>().map_err(|e| {
            crate::HandlerError::permanent(format!(
                "the payload of event {} ({}) is not a {}: {e}",
                self.id,
                self.event_type,
                std::any::type_name::<T>()
            ))
        })
    }

    /// The lease under which this event was claimed, if it is processing.
    /// Every acknowledgement names it.
    pub fn lease(&self) -> Option<Lease> {
        match (self.status, self.lease_token) {
            (Status::Processing, Some(token)) => Some(Lease {
                seq: self.seq,
                id: self.id,
                token,
                attempt: self.attempts,
            }),
            _ => None,
        }
    }
}

/// A claim on one event: the receipt that every later write about the event
/// must present. When the event was claimed again after this lease expired,
/// writes naming this lease are refused with
/// [`crate::ErrorKind::LeaseLost`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    pub(crate) seq: i64,
    pub(crate) id: EventId,
    pub(crate) token: i64,
    pub(crate) attempt: u32,
}

impl Lease {
    /// The event this lease is for.
    pub fn id(&self) -> EventId {
        self.id
    }

    /// The attempt this lease belongs to (1 for the first claim).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The token stored with the claim.
    pub fn token(&self) -> i64 {
        self.token
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn status_round_trips_through_text() -> Result<()> {
        for status in Status::ALL {
            assert_eq!(status.as_str().parse::<Status>()?, status);
            assert_eq!(status.to_string(), status.as_str());
            assert_eq!(
                serde_json::to_value(status).ok(),
                Some(json!(status.as_str()))
            );
        }
        assert!("Pending".parse::<Status>().is_err());
        Ok(())
    }

    #[test]
    fn error_texts_are_capped_on_a_character_boundary() {
        assert_eq!(capped_error("short"), "short");
        let long = "é".repeat(MAX_ERROR_LEN);
        let capped = capped_error(&long);
        assert!(capped.len() <= MAX_ERROR_LEN, "{}", capped.len());
        assert!(capped.len() > MAX_ERROR_LEN - 8);
        assert!(capped.ends_with("é…"));
    }
}
