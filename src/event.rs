//! The event model: what a caller enqueues and what the outbox stores.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::retry::RetryPolicy;

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

/// The identity of an event: a time-ordered (v7) UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(Uuid);

impl EventId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        EventId(Uuid::now_v7())
    }

    /// The UUID inside.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl Default for EventId {
    fn default() -> Self {
        EventId::new()
    }
}

impl From<Uuid> for EventId {
    fn from(uuid: Uuid) -> Self {
        EventId(uuid)
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for EventId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Uuid::parse_str(s)
            .map(EventId)
            .map_err(|e| Error::invalid(format!("{s:?} is not an event id: {e}")))
    }
}

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

/// An event to enqueue.
///
/// Only the event type and the payload are required; the rest defaults to
/// "due now, no keys, the outbox's `max_attempts`".
///
/// ```
/// use sqlite_outbox::NewEvent;
/// use serde_json::json;
///
/// let event = NewEvent::new("email.invite", json!({"to": "ada@example.com"}))
///     .with_correlation_id("req-42")
///     .with_idempotency_key("invite:ada")
///     .with_max_attempts(5);
/// assert_eq!(event.event_type(), "email.invite");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub(crate) id: EventId,
    pub(crate) event_type: String,
    pub(crate) payload: Value,
    pub(crate) correlation_id: Option<String>,
    pub(crate) org_id: Option<Uuid>,
    pub(crate) user_id: Option<Uuid>,
    pub(crate) ordering_key: Option<String>,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) max_attempts: Option<u32>,
    pub(crate) run_at: Option<DateTime<Utc>>,
    pub(crate) delay: Option<Duration>,
}

impl NewEvent {
    /// An event of `event_type` (any string, e.g. `"email.invite"`, or a
    /// [`crate::catalog::OutboxEventType`]) carrying `payload`.
    pub fn new(event_type: impl Into<String>, payload: Value) -> Self {
        NewEvent {
            id: EventId::new(),
            event_type: event_type.into(),
            payload,
            correlation_id: None,
            org_id: None,
            user_id: None,
            ordering_key: None,
            idempotency_key: None,
            max_attempts: None,
            run_at: None,
            delay: None,
        }
    }

    /// An event whose payload is `payload` serialised: a struct of the
    /// app's own, say.
    ///
    /// ```
    /// use serde::Serialize;
    /// use sqlite_outbox::NewEvent;
    ///
    /// #[derive(Serialize)]
    /// struct Invite<'a> { to: &'a str }
    ///
    /// let event = NewEvent::json("email.invite", &Invite { to: "ada@example.com" })?;
    /// assert_eq!(event.payload()["to"], "ada@example.com");
    /// # Ok::<(), sqlite_outbox::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`crate::ErrorKind::InvalidInput`] if `payload` cannot be serialised
    /// (a map with non-string keys, say).
    pub fn json<T: Serialize + ?Sized>(event_type: impl Into<String>, payload: &T) -> Result<Self> {
        let value = serde_json::to_value(payload)
            .map_err(|e| Error::invalid(format!("payload cannot be serialised: {e}")))?;
        Ok(NewEvent::new(event_type, value))
    }

    /// An event whose payload is JSON text, checked here.
    ///
    /// # Errors
    ///
    /// [`crate::ErrorKind::InvalidInput`] if `payload` is not one valid JSON
    /// value or is larger than [`MAX_PAYLOAD_BYTES`].
    pub fn from_json(event_type: impl Into<String>, payload: &str) -> Result<Self> {
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(Error::invalid(format!(
                "payload is {} bytes, over the limit of {MAX_PAYLOAD_BYTES}",
                payload.len()
            )));
        }
        let value: Value = serde_json::from_str(payload)
            .map_err(|e| Error::invalid(format!("payload is not valid JSON: {e}")))?;
        Ok(NewEvent::new(event_type, value))
    }

    /// The id the event will have (unless an idempotency key matches an
    /// existing event, whose id is returned instead).
    pub fn id(&self) -> EventId {
        self.id
    }

    /// The event type.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The payload.
    pub fn payload(&self) -> &Value {
        &self.payload
    }

    /// Use this id instead of a fresh one.
    pub fn with_id(mut self, id: EventId) -> Self {
        self.id = id;
        self
    }

    /// Tag the event with a correlation id (a request id, say). Default: none.
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// The organisation the event belongs to, for erasure. Default: none.
    pub fn with_org_id(mut self, org_id: Uuid) -> Self {
        self.org_id = Some(org_id);
        self
    }

    /// The user the event belongs to, for erasure. Default: none.
    pub fn with_user_id(mut self, user_id: Uuid) -> Self {
        self.user_id = Some(user_id);
        self
    }

    /// Events with the same ordering key are handled one at a time, in
    /// enqueue order. A retrying event holds back the ones behind it; a
    /// failed one does not. Default: none (no ordering).
    pub fn with_ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    /// A second enqueue with the same key returns the first event and adds
    /// nothing, for as long as the first event is stored. Default: none.
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// How many claims the event gets before it fails. Default: the store's
    /// [`crate::RetryPolicy`] (10).
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = Some(max_attempts);
        self
    }

    /// Do not hand the event out before `at`. Default: due at once.
    pub fn with_run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = Some(at);
        self.delay = None;
        self
    }

    /// Do not hand the event out before `delay` from enqueue. Default: none.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self.run_at = None;
        self
    }

    /// Checks what the database would reject, before anything is written.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.event_type.is_empty() {
            return Err(Error::invalid("event type is empty"));
        }
        if self.event_type.len() > MAX_EVENT_TYPE_LEN {
            return Err(Error::invalid(format!(
                "event type is {} bytes, over the limit of {MAX_EVENT_TYPE_LEN}",
                self.event_type.len()
            )));
        }
        for (name, value) in [
            ("correlation id", &self.correlation_id),
            ("ordering key", &self.ordering_key),
            ("idempotency key", &self.idempotency_key),
        ] {
            if let Some(len) = value.as_ref().map(String::len).filter(|&n| n > MAX_KEY_LEN) {
                return Err(Error::invalid(format!(
                    "{name} is {len} bytes, over the limit of {MAX_KEY_LEN}"
                )));
            }
        }
        if self.max_attempts == Some(0) {
            return Err(Error::invalid("max_attempts must be at least 1"));
        }
        if self.max_attempts.is_some_and(|n| n > i32::MAX as u32) {
            return Err(Error::invalid("max_attempts is too large"));
        }
        Ok(())
    }

    /// Checks the event (see [`NewEvent::validate`]) and returns its payload
    /// as JSON text, checked against the size limit: what every store does
    /// before it writes anything.
    pub(crate) fn checked_payload(&self) -> Result<String> {
        self.validate()?;
        let text = serde_json::to_string(&self.payload)
            .map_err(|e| Error::invalid(format!("payload cannot be serialised: {e}")))?;
        if text.len() > MAX_PAYLOAD_BYTES {
            return Err(Error::invalid(format!(
                "payload is {} bytes, over the limit of {MAX_PAYLOAD_BYTES}",
                text.len()
            )));
        }
        Ok(text)
    }

    /// The stored row of this event as enqueued at `now` with number `seq`:
    /// pending, no attempts, times in whole milliseconds (as stored).
    pub(crate) fn into_pending(self, seq: i64, now: DateTime<Utc>, policy: &RetryPolicy) -> Event {
        let ms = |t| crate::clock::from_millis(crate::clock::to_millis(t));
        Event {
            id: self.id,
            seq,
            next_attempt_at: ms(self.due_at(now)),
            max_attempts: self.max_attempts.unwrap_or_else(|| policy.max_attempts()),
            event_type: self.event_type,
            payload: self.payload,
            status: Status::Pending,
            attempts: 0,
            locked_at: None,
            locked_until: None,
            lease_token: None,
            completed_at: None,
            delivered_at: None,
            last_error: None,
            correlation_id: self.correlation_id,
            org_id: self.org_id,
            user_id: self.user_id,
            ordering_key: self.ordering_key,
            idempotency_key: self.idempotency_key,
            created_at: ms(now),
        }
    }

    /// When the event first becomes due, given the time of enqueue.
    pub(crate) fn due_at(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        match (self.run_at, self.delay) {
            (Some(at), _) => at,
            (None, Some(delay)) => crate::clock::add(now, delay),
            (None, None) => now,
        }
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
    /// The payload.
    pub payload: Value,
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
    /// When the event was enqueued.
    pub created_at: DateTime<Utc>,
}

impl Event {
    /// The payload as a `T`. A payload that does not fit is a permanent
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
        T::deserialize(&self.payload).map_err(|e| {
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
    fn event_ids_are_time_ordered_and_parse_back() -> Result<()> {
        let a = EventId::new();
        let b = EventId::new();
        assert!(a < b);
        assert_eq!(a.to_string().parse::<EventId>()?, a);
        assert_eq!(a.as_uuid().get_version_num(), 7);
        Ok(())
    }

    #[test]
    fn bad_ids_are_invalid_input() {
        let err = "not-a-uuid".parse::<EventId>().unwrap_err();
        assert!(err.is_invalid_input());
    }

    #[test]
    fn validation_rejects_empty_and_long_types() {
        assert!(NewEvent::new("", json!({})).validate().is_err());
        let long = "x".repeat(MAX_EVENT_TYPE_LEN + 1);
        assert!(NewEvent::new(long, json!({})).validate().is_err());
        assert!(NewEvent::new("a", json!({}))
            .with_max_attempts(0)
            .validate()
            .is_err());
        assert!(NewEvent::new("a", json!({})).validate().is_ok());
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

    #[test]
    fn validation_limits_keys_to_255_bytes() {
        let at_limit = "k".repeat(MAX_KEY_LEN);
        let over = "é".repeat(MAX_KEY_LEN / 2 + 1);
        let event = |key: &str| {
            NewEvent::new("t", json!({}))
                .with_correlation_id(key)
                .with_ordering_key(key)
                .with_idempotency_key(key)
        };
        assert!(event(&at_limit).validate().is_ok());
        for broken in [
            NewEvent::new("t", json!({})).with_correlation_id(over.clone()),
            NewEvent::new("t", json!({})).with_ordering_key(over.clone()),
            NewEvent::new("t", json!({})).with_idempotency_key(over.clone()),
        ] {
            let err = broken.validate().unwrap_err();
            assert!(err.to_string().contains("256 bytes"), "{err}");
        }
    }

    #[test]
    fn from_json_rejects_bad_text() {
        for bad in ["", "{", "{} x", "NaN", "[1,]"] {
            let err = NewEvent::from_json("t", bad).unwrap_err();
            assert!(err.is_invalid_input(), "{bad:?}");
        }
        let big = format!("\"{}\"", "a".repeat(MAX_PAYLOAD_BYTES));
        assert!(NewEvent::from_json("t", &big).is_err());
    }

    #[test]
    fn run_at_and_delay_replace_each_other() {
        let now = crate::clock::from_millis(1_700_000_000_123);
        let e = NewEvent::new("t", json!(1))
            .with_run_at(now)
            .with_delay(Duration::from_secs(5));
        assert_eq!(e.due_at(now), now + chrono::Duration::seconds(5));
        let e = e.with_run_at(now);
        assert_eq!(e.due_at(now), now);
    }
}
