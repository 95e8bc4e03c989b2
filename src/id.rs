//! Event ids: the bottom layer, used by the errors and the event model.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

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
    type Err = ParseEventIdError;

    fn from_str(s: &str) -> Result<Self, ParseEventIdError> {
        Uuid::parse_str(s)
            .map(EventId)
            .map_err(|e| ParseEventIdError {
                text: s.chars().take(64).collect(),
                reason: e,
            })
    }
}

/// Text that is not an event id. Converts into [`crate::Error`] (kind
/// `InvalidInput`), so `?` works on it in functions returning the crate's
/// `Result`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseEventIdError {
    text: String,
    reason: uuid::Error,
}

impl fmt::Display for ParseEventIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} is not an event id: {}", self.text, self.reason)
    }
}

impl std::error::Error for ParseEventIdError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_time_ordered_and_parse_back() -> Result<(), ParseEventIdError> {
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
        assert!(
            err.to_string()
                .starts_with("\"not-a-uuid\" is not an event id: "),
            "{err}"
        );
        assert!(std::error::Error::source(&err).is_some());
        let err = crate::Error::from(err);
        assert!(err.is_invalid_input(), "{err}");
        assert!(err.to_string().contains("not-a-uuid"), "{err}");
        let long = "x".repeat(10_000).parse::<EventId>().unwrap_err();
        assert!(long.to_string().len() < 200, "the input is cut: {long}");
    }
}
