//! What a dispatcher runs for each event, and how a handler reports failure.

use std::fmt;
use std::time::Duration;

use crate::event::Event;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Handles the events of one type.
///
/// Implemented for every `Fn(&Event) -> Result<(), HandlerError>` closure
/// that is `Send + Sync + 'static`. A handler may run more than once for one
/// event (delivery is at least once), so it should be idempotent: the event
/// id makes a good idempotency key for downstream systems.
///
/// Returning `Err` records a failed attempt (see [`HandlerError`]); a panic
/// is caught and recorded as a failed attempt too, and the worker thread
/// carries on.
pub trait Handler: Send + Sync + 'static {
    /// Handles one event.
    ///
    /// # Errors
    ///
    /// A [`HandlerError`] saying whether and when to retry.
    fn handle(&self, event: &Event) -> Result<(), HandlerError>;

    /// The most events [`Handler::handle_batch`] takes in one call. Default
    /// 1: the dispatcher calls [`Handler::handle`] for each event.
    ///
    /// A batch holds events already claimed and waiting for a worker, of
    /// types that share this handler, so it is at most the dispatcher's
    /// claim size (which grows to this limit); it never waits for more
    /// events to arrive. A batch holds at most one event of each ordering
    /// key: the next event of a key is claimed once the one before it is
    /// done.
    fn batch_limit(&self) -> usize {
        1
    }

    /// Handles several events at once: one request or one round of
    /// pipelined publishes for all of them.
    ///
    /// `Ok` holds one result per event, in the order given; each is
    /// recorded as [`Handler::handle`]'s result would be (an event without
    /// a result, if the list is short, is retried). `Err` is the result of
    /// every event in the batch. A panic is a failed attempt for each.
    ///
    /// The default calls [`Handler::handle`] for each event in turn.
    ///
    /// # Errors
    ///
    /// A [`HandlerError`] for the whole batch.
    fn handle_batch(&self, events: &[Event]) -> BatchResult {
        Ok(events.iter().map(|e| self.handle(e)).collect())
    }
}

/// A shared handler: the same handler under several registrations.
impl<H: Handler + ?Sized> Handler for std::sync::Arc<H> {
    fn handle(&self, event: &Event) -> Result<(), HandlerError> {
        (**self).handle(event)
    }

    fn batch_limit(&self) -> usize {
        (**self).batch_limit()
    }

    fn handle_batch(&self, events: &[Event]) -> BatchResult {
        (**self).handle_batch(events)
    }
}

/// What [`Handler::handle_batch`] returns: a result per event, or one
/// error for the whole batch.
pub type BatchResult = Result<Vec<Result<(), HandlerError>>, HandlerError>;

/// A [`Handler`] made of a closure over batches, with its limit: see
/// [`crate::DispatcherBuilder::handle_batch`].
pub struct BatchFn<F> {
    limit: usize,
    f: F,
}

impl<F> BatchFn<F>
where
    F: Fn(&[Event]) -> BatchResult + Send + Sync + 'static,
{
    /// A handler that gives `f` up to `limit` events at a time (at least 1).
    pub fn new(limit: usize, f: F) -> Self {
        BatchFn {
            limit: limit.max(1),
            f,
        }
    }
}

impl<F> fmt::Debug for BatchFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchFn")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl<F> Handler for BatchFn<F>
where
    F: Fn(&[Event]) -> BatchResult + Send + Sync + 'static,
{
    fn handle(&self, event: &Event) -> Result<(), HandlerError> {
        let mut results = (self.f)(std::slice::from_ref(event))?;
        if results.is_empty() {
            return Err(HandlerError::retry("the batch handler returned no result"));
        }
        results.swap_remove(0)
    }

    fn batch_limit(&self) -> usize {
        self.limit
    }

    fn handle_batch(&self, events: &[Event]) -> BatchResult {
        (self.f)(events)
    }
}

impl<F> Handler for F
where
    F: Fn(&Event) -> Result<(), HandlerError> + Send + Sync + 'static,
{
    fn handle(&self, event: &Event) -> Result<(), HandlerError> {
        self(event)
    }
}

/// A handler's failure, and what to do about it.
///
/// Any `std::error::Error` converts into a retryable `HandlerError` with `?`.
///
/// ```
/// use sqlite_outbox::HandlerError;
/// use std::time::Duration;
///
/// let later = HandlerError::retry_after("server busy", Duration::from_secs(120));
/// assert_eq!(later.delay(), Some(Duration::from_secs(120)));
/// let never = HandlerError::permanent("recipient does not exist");
/// assert!(never.is_permanent());
/// ```
pub struct HandlerError {
    error: BoxError,
    action: Action,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Retry(Option<Duration>),
    Permanent,
    Unavailable,
    Busy(Option<Duration>),
}

impl HandlerError {
    /// Retry after the retry policy's delay for this attempt.
    pub fn retry(error: impl Into<BoxError>) -> Self {
        HandlerError {
            error: error.into(),
            action: Action::Retry(None),
        }
    }

    /// Retry after `delay` (a server's `Retry-After`, say) instead of the
    /// policy's delay, but never later than [`MAX_RETRY_AFTER`] (24 h): an
    /// endpoint cannot park an event for years. The attempt still counts
    /// towards `max_attempts`.
    pub fn retry_after(error: impl Into<BoxError>, delay: Duration) -> Self {
        HandlerError {
            error: error.into(),
            action: Action::Retry(Some(delay.min(MAX_RETRY_AFTER))),
        }
    }

    /// Do not retry: the event fails at once.
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        HandlerError {
            error: error.into(),
            action: Action::Permanent,
        }
    }

    /// The destination cannot be reached (no network, connection refused,
    /// a name that does not resolve, a timeout before anything was sent):
    /// the event is not at fault. It goes back as it was, its attempt not
    /// spent and its place in its ordering key kept, and the dispatcher
    /// holds back every event of its destination, probing it with one
    /// event at a time (after 1 s, doubling to 5 min) until one gets
    /// through. See [`crate::DispatcherBuilder::destination`].
    pub fn unavailable(error: impl Into<BoxError>) -> Self {
        HandlerError {
            error: error.into(),
            action: Action::Unavailable,
        }
    }

    /// The destination is overloaded (an HTTP 429 or 503, a broker that
    /// says "too many requests"): not the event's fault. As with
    /// [`HandlerError::unavailable`], the event goes back as it was, its
    /// attempt not spent, and the dispatcher holds back every event of its
    /// destination, probing with one event at a time; the first probe goes
    /// no sooner than `retry_after` when the destination said when (capped
    /// at [`MAX_RETRY_AFTER`]). A flood of "busy" answers never fails an
    /// event.
    ///
    /// Use [`HandlerError::retry_after`] instead when the delay is about
    /// this event alone (its attempt then counts).
    pub fn busy(error: impl Into<BoxError>, retry_after: Option<Duration>) -> Self {
        HandlerError {
            error: error.into(),
            action: Action::Busy(retry_after.map(|d| d.min(MAX_RETRY_AFTER))),
        }
    }

    /// True if the handler said the destination is busy.
    pub fn is_busy(&self) -> bool {
        matches!(self.action, Action::Busy(_))
    }

    /// True if the event should fail without another attempt.
    pub fn is_permanent(&self) -> bool {
        self.action == Action::Permanent
    }

    /// True if the handler said the destination cannot be reached.
    pub fn is_unavailable(&self) -> bool {
        self.action == Action::Unavailable
    }

    /// The delay the handler asked for, if any.
    pub fn delay(&self) -> Option<Duration> {
        match self.action {
            Action::Retry(delay) | Action::Busy(delay) => delay,
            Action::Permanent | Action::Unavailable => None,
        }
    }

    /// The same action, with the message of this error: one batch error
    /// recorded for each of its events.
    pub(crate) fn copied(&self) -> HandlerError {
        HandlerError {
            error: self.message().into(),
            action: self.action,
        }
    }

    /// The underlying error.
    pub fn error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.error
    }

    /// The error and its causes, joined with ": ", as stored in
    /// `last_error`, at most [`crate::MAX_ERROR_LEN`] bytes. A `Display`
    /// that panics gives a note instead of killing the worker.
    pub(crate) fn message(&self) -> String {
        let text = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut text = self.error.to_string();
            let mut cause = self.error.source();
            while let Some(c) = cause {
                text.push_str(": ");
                text.push_str(&c.to_string());
                cause = c.source();
            }
            text
        }))
        .unwrap_or_else(|_| "the handler's error panicked while being displayed".to_owned());
        crate::event::capped_error(&text)
    }
}

impl<E> From<E> for HandlerError
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn from(error: E) -> Self {
        HandlerError::retry(error)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("error", &self.error)
            .field("action", &self.action)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

pub use crate::retry::MAX_RETRY_AFTER;

#[cfg(test)]
mod tests {
    use super::*;

    struct PanicsOnDisplay;
    impl fmt::Debug for PanicsOnDisplay {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("PanicsOnDisplay")
        }
    }
    impl fmt::Display for PanicsOnDisplay {
        fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
            panic!("Display of a handler error")
        }
    }
    impl std::error::Error for PanicsOnDisplay {}

    #[test]
    fn a_display_that_panics_gives_a_note() {
        let err = HandlerError::retry(PanicsOnDisplay);
        assert_eq!(
            err.message(),
            "the handler's error panicked while being displayed"
        );
    }

    #[test]
    fn display_is_the_message_and_debug_shows_the_action() {
        let err = HandlerError::permanent("no such user");
        assert_eq!(err.to_string(), "no such user");
        let shown = format!("{err:?}");
        assert!(
            shown.starts_with("HandlerError") && shown.contains("Permanent"),
            "{shown}"
        );
        let shown = format!(
            "{:?}",
            HandlerError::retry_after("busy", Duration::from_secs(7))
        );
        assert!(shown.contains("7s"), "{shown}");
    }

    #[test]
    fn retry_after_is_clamped_and_messages_capped() {
        let err = HandlerError::retry_after("x".repeat(100_000), Duration::MAX);
        assert_eq!(err.delay(), Some(MAX_RETRY_AFTER));
        // As documented: a day, the longest step of the default schedule.
        assert_eq!(MAX_RETRY_AFTER, Duration::from_secs(86_400));
        assert_eq!(MAX_RETRY_AFTER, crate::RetryPolicy::default().backoff(100));
        assert_eq!(err.message().len(), crate::MAX_ERROR_LEN);
    }

    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("send failed")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn question_mark_makes_a_retryable_error_with_its_causes() {
        fn send() -> Result<(), HandlerError> {
            Err(Outer(std::io::Error::other("connection reset")))?;
            Ok(())
        }
        let err = send().unwrap_err();
        assert!(!err.is_permanent());
        assert_eq!(err.delay(), None);
        assert_eq!(err.message(), "send failed: connection reset");
    }
}
