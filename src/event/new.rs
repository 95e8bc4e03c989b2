//! What a caller enqueues: [`NewEvent`] and its validation.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use super::{Event, Status, MAX_EVENT_TYPE_LEN, MAX_KEY_LEN, MAX_PAYLOAD_BYTES};
use crate::error::{Error, Result};
use crate::id::EventId;
use crate::retry::RetryPolicy;

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
    pub(crate) traceparent: Option<String>,
    pub(crate) max_attempts: Option<u32>,
    pub(crate) priority: u8,
    pub(crate) run_at: Option<DateTime<Utc>>,
    pub(crate) delay: Option<Duration>,
}

impl NewEvent {
    /// An event of `event_type` (any string, e.g. `"email.invite"`, or a
    /// [`crate::catalog::OutboxEventType`]) carrying `payload`.
    ///
    /// With the `opentelemetry` feature, it carries the W3C traceparent of
    /// the current span (see [`NewEvent::with_traceparent`]).
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
            traceparent: crate::trace::current(),
            max_attempts: None,
            priority: 0,
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
    /// let event = NewEvent::serialized("email.invite", &Invite { to: "ada@example.com" })?;
    /// assert_eq!(event.payload()["to"], "ada@example.com");
    /// # Ok::<(), sqlite_outbox::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`crate::ErrorKind::InvalidInput`] if `payload` cannot be serialised
    /// (a map with non-string keys, say).
    pub fn serialized<T: Serialize + ?Sized>(
        event_type: impl Into<String>,
        payload: &T,
    ) -> Result<Self> {
        let value = serde_json::to_value(payload)
            .map_err(|e| Error::invalid(format!("payload cannot be serialised: {e}")))?;
        Ok(NewEvent::new(event_type, value))
    }

    /// [`NewEvent::serialized`] under its old name, which read too much
    /// like [`NewEvent::from_json`] (JSON text).
    ///
    /// # Errors
    ///
    /// As [`NewEvent::serialized`].
    #[deprecated(since = "0.2.0", note = "use NewEvent::serialized")]
    pub fn json<T: Serialize + ?Sized>(event_type: impl Into<String>, payload: &T) -> Result<Self> {
        NewEvent::serialized(event_type, payload)
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

    /// The W3C `traceparent` of the work that enqueued the event
    /// (`00-<trace id>-<span id>-<flags>`): the delivery span records it
    /// (and links to it, with the `opentelemetry` feature) and the relay
    /// sends it as a `traceparent` header. Default: none, or with the
    /// `opentelemetry` feature the current span's. A malformed value is
    /// refused at enqueue (see [`crate::trace::is_valid_traceparent`]).
    pub fn with_traceparent(mut self, traceparent: impl Into<String>) -> Self {
        self.traceparent = Some(traceparent.into());
        self
    }

    /// How many claims the event gets before it fails. Default: the store's
    /// [`crate::RetryPolicy`] (10).
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = Some(max_attempts);
        self
    }

    /// Among due events, those of higher priority are claimed first; equal
    /// priorities keep due-time order. An ordering key still wins: an
    /// event never overtakes an earlier one of its key. Default: 0, the
    /// lowest, which most events keep: raise the few that must not wait.
    ///
    /// ```
    /// use sqlite_outbox::NewEvent;
    /// use serde_json::json;
    ///
    /// let reset = NewEvent::new("email.password_reset", json!({"to": "ada@example.com"}))
    ///     .with_priority(10);
    /// assert_eq!(reset.priority(), 10);
    /// ```
    pub fn with_priority(mut self, priority: u8) -> Self {
        self.priority = priority;
        self
    }

    /// The priority (see [`NewEvent::with_priority`]).
    pub fn priority(&self) -> u8 {
        self.priority
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
        if let Some(tp) = self
            .traceparent
            .as_deref()
            .filter(|t| !crate::trace::is_valid_traceparent(t))
        {
            return Err(Error::invalid(format!(
                "traceparent {:?} is not a W3C traceparent (version-traceid-parentid-flags, lowercase hex)",
                tp.chars().take(80).collect::<String>()
            )));
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
        let text = self.payload.to_string();
        self.into_stored(seq, now, policy, text)
    }

    /// [`NewEvent::into_pending`], with the payload's text as
    /// [`NewEvent::checked_payload`] gave it (not serialised again).
    pub(crate) fn into_stored(
        self,
        seq: i64,
        now: DateTime<Utc>,
        policy: &RetryPolicy,
        text: String,
    ) -> Event {
        let ms = |t| crate::clock::from_millis(crate::clock::to_millis(t));
        Event {
            id: self.id,
            seq,
            next_attempt_at: ms(self.due_at(now)),
            max_attempts: self.max_attempts.unwrap_or_else(|| policy.max_attempts()),
            event_type: self.event_type,
            payload: crate::Payload::from_parts(text, self.payload),
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
            traceparent: self.traceparent,
            priority: self.priority,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
