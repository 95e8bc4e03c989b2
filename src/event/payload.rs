//! A stored event's payload: its JSON text, read into a [`Value`] only
//! when something asks for one.

use std::fmt;
use std::ops::Deref;
use std::sync::OnceLock;

use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// The payload of a stored [`crate::Event`]: the JSON text as stored,
/// checked to be one well-formed JSON value when it was read, and parsed
/// into a [`Value`] the first time one is asked for.
///
/// It dereferences to a [`Value`], so `event.payload["to"]` and
/// `event.payload.as_object()` read as before. A handler that wants its own
/// type reads it straight from the text with [`crate::Event::payload_as`]
/// (or [`Payload::to`]), with no `Value` built on the way; a handler that
/// forwards the payload takes the text as stored with [`Payload::get`].
///
/// A payload that is well-formed JSON but that a [`Value`] cannot hold (a
/// number beyond the range of `f64`, or arrays and objects nested more than
/// 128 deep) dereferences to a JSON string holding its text; [`Payload::get`]
/// still gives the text as stored.
///
/// ```
/// use serde_json::json;
/// use sqlite_outbox::Payload;
///
/// let payload = Payload::from(json!({"to": "ada@example.com"}));
/// assert_eq!(payload["to"], "ada@example.com");
/// assert_eq!(payload.get(), r#"{"to":"ada@example.com"}"#);
/// assert_eq!(payload, json!({"to": "ada@example.com"}));
/// ```
#[derive(Clone)]
pub struct Payload {
    text: Box<str>,
    value: OnceLock<Value>,
}

impl Payload {
    /// `text` if it holds exactly one well-formed JSON value.
    ///
    /// # Errors
    ///
    /// serde_json's error naming where the text stops being JSON.
    pub fn from_json(text: impl Into<String>) -> serde_json::Result<Self> {
        let text = text.into();
        serde_json::from_str::<IgnoredAny>(&text)?;
        Ok(Payload::checked(text.into_boxed_str()))
    }

    /// As [`Payload::from_json`], for bytes read from a row: `None` when
    /// they are not UTF-8 or not one JSON value.
    pub(crate) fn from_stored(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        serde_json::from_str::<IgnoredAny>(text).ok()?;
        Some(Payload::checked(text.into()))
    }

    /// `value` with `text`, its serialisation.
    pub(crate) fn from_parts(text: String, value: Value) -> Self {
        Payload {
            text: text.into_boxed_str(),
            value: OnceLock::from(value),
        }
    }

    /// Text already checked to be one JSON value, not yet parsed.
    fn checked(text: Box<str>) -> Self {
        Payload {
            text,
            value: OnceLock::new(),
        }
    }

    /// The JSON text, as stored.
    pub fn get(&self) -> &str {
        &self.text
    }

    /// The payload as a [`Value`], parsed on first use (what `*payload`
    /// gives).
    pub fn value(&self) -> &Value {
        self.value.get_or_init(|| parse(&self.text))
    }

    /// The payload as a [`Value`] of its own.
    pub fn into_value(self) -> Value {
        let Payload { text, value } = self;
        value.into_inner().unwrap_or_else(|| parse(&text))
    }

    /// The payload read as a `T`, straight from its text.
    ///
    /// # Errors
    ///
    /// serde_json's error when the payload does not fit a `T`.
    pub fn to<T: DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_str(&self.text)
    }
}

/// `text` as a [`Value`]; well-formed JSON that a `Value` cannot hold
/// becomes a JSON string of the text.
fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

impl From<Value> for Payload {
    fn from(value: Value) -> Self {
        Payload::from_parts(value.to_string(), value)
    }
}

impl Deref for Payload {
    type Target = Value;

    fn deref(&self) -> &Value {
        self.value()
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Payload) -> bool {
        self.text == other.text || self.value() == other.value()
    }
}

impl PartialEq<Value> for Payload {
    fn eq(&self, other: &Value) -> bool {
        self.value() == other
    }
}

impl PartialEq<Payload> for Value {
    fn eq(&self, other: &Payload) -> bool {
        self == other.value()
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Payload").field(&&*self.text).finish()
    }
}

/// The JSON text, as stored.
impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.value().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Value::deserialize(deserializer).map(Payload::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stored_bytes_are_taken_only_when_they_are_one_json_value() {
        let p = Payload::from_stored(br#"[1,  2]"#).map(|p| p.get().to_owned());
        assert_eq!(p.as_deref(), Some("[1,  2]"));
        assert!(Payload::from_stored(b"{bad").is_none());
        assert!(Payload::from_stored(b"1 2").is_none());
        assert!(Payload::from_stored(&[0x22, 0xff, 0x22]).is_none());
    }

    #[test]
    fn compares_with_values_both_ways_and_shows_its_text() -> serde_json::Result<()> {
        let p = Payload::from_json(r#"{"a": 1}"#)?;
        assert!(p == json!({"a": 1}));
        assert!(p != json!({"a": 2}));
        assert!(json!({"a": 1}) == p);
        assert!(json!({"a": 2}) != p);
        assert_eq!(format!("{p:?}"), r#"Payload("{\"a\": 1}")"#);
        Ok(())
    }

    #[test]
    fn reads_the_text_it_was_given() -> serde_json::Result<()> {
        let p = Payload::from_json(r#" {"b": [1, 2.5, "x"], "a": null} "#)?;
        assert_eq!(p.get(), r#" {"b": [1, 2.5, "x"], "a": null} "#);
        assert_eq!(p, json!({"a": null, "b": [1, 2.5, "x"]}));
        assert_eq!(p["b"][2], "x");
        assert_eq!(p.to_string(), p.get());
        let typed: std::collections::BTreeMap<String, Value> = p.to()?;
        assert_eq!(typed.len(), 2);
        assert_eq!(p.clone().into_value(), *p);
        Ok(())
    }

    #[test]
    fn refuses_what_is_not_one_json_value() {
        for bad in ["", "{", "{} {}", "nul", "[1,]", "'a'", "{\"a\":1}x"] {
            assert!(Payload::from_json(bad).is_err(), "{bad:?}");
            assert!(Payload::from_stored(bad.as_bytes()).is_none(), "{bad:?}");
        }
        assert!(Payload::from_stored(b"\"\xff\"").is_none());
    }

    #[test]
    fn json_a_value_cannot_hold_reads_as_its_text() -> serde_json::Result<()> {
        let huge = Payload::from_json("[1e400]")?;
        assert_eq!(huge.get(), "[1e400]");
        assert_eq!(*huge, json!("[1e400]"));
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let deep = Payload::from_json(deep.clone())?;
        assert_eq!(huge.clone().into_value(), json!("[1e400]"));
        assert!(deep.is_string());
        Ok(())
    }

    #[test]
    fn equal_by_value_and_round_trips_through_serde() -> serde_json::Result<()> {
        let spaced = Payload::from_json(r#"{ "a" : 1 }"#)?;
        let tight = Payload::from(json!({"a": 1}));
        assert_eq!(spaced, tight);
        assert_ne!(spaced, Payload::from(json!({"a": 2})));
        assert_eq!(serde_json::to_string(&spaced)?, r#"{"a":1}"#);
        let back: Payload = serde_json::from_str(r#"{"a":1}"#)?;
        assert_eq!(back, spaced);
        Ok(())
    }
}
