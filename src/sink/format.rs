//! What a sink sends for an event: the outbox's own envelope, or a
//! [CloudEvent](https://github.com/cloudevents/spec) (version 1.0), in
//! structured mode (the whole event as JSON) or binary mode (the payload
//! as the body, the attributes beside it as headers or properties).

use std::fmt;
use std::str::FromStr;

use serde_json::{json, Map, Value};

use crate::error::Error;
use crate::event::Event;

/// The `source` of CloudEvents unless one is given: a URI reference that
/// names this library.
pub const DEFAULT_CLOUDEVENTS_SOURCE: &str = "/sqlite-outbox";

/// How events are written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Format {
    /// [`super::envelope`]: `{"id", "type", "payload", "attempt",
    /// "correlation_id", "created_at"}` as `application/json`.
    #[default]
    Envelope,
    /// A CloudEvent in structured mode: the event as
    /// `application/cloudevents+json`, its payload as `data`.
    CloudEvents {
        /// The events' `source` attribute.
        source: String,
    },
    /// A CloudEvent in binary mode: the payload as the body
    /// (`application/json`), the attributes as `ce-` headers (HTTP, NATS)
    /// or user properties (MQTT).
    CloudEventsBinary {
        /// The events' `source` attribute.
        source: String,
    },
}

impl FromStr for Format {
    type Err = Error;

    /// `envelope`, `cloudevents` or `cloudevents-binary` (with the default
    /// source).
    fn from_str(s: &str) -> Result<Format, Error> {
        let source = DEFAULT_CLOUDEVENTS_SOURCE.to_owned();
        match s {
            "envelope" => Ok(Format::Envelope),
            "cloudevents" => Ok(Format::CloudEvents { source }),
            "cloudevents-binary" => Ok(Format::CloudEventsBinary { source }),
            _ => Err(Error::invalid(
                "the format is one of envelope, cloudevents, cloudevents-binary",
            )),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Envelope => "envelope",
            Format::CloudEvents { .. } => "cloudevents",
            Format::CloudEventsBinary { .. } => "cloudevents-binary",
        })
    }
}

/// A message ready to send: its body, content type, and the attributes to
/// send beside it (binary mode's, unprefixed: `specversion`, `id`, …).
#[derive(Debug)]
pub struct Message {
    /// The body.
    pub body: String,
    /// Its media type.
    pub content_type: &'static str,
    /// Attributes that go beside the body (`ce-` headers over HTTP and
    /// NATS, user properties over MQTT); empty unless binary mode.
    pub attributes: Vec<(String, String)>,
}

impl Format {
    /// The media type of a JSON array of messages in this format:
    /// `application/cloudevents-batch+json` for CloudEvents (binary mode
    /// has no batches), `application/json` for envelopes.
    pub fn batch_content_type(&self) -> &'static str {
        match self {
            Format::CloudEvents { .. } | Format::CloudEventsBinary { .. } => {
                "application/cloudevents-batch+json"
            }
            Format::Envelope => "application/json",
        }
    }

    /// The message for `event` in this format.
    pub fn message(&self, event: &Event) -> Message {
        match self {
            Format::Envelope => Message {
                body: super::envelope(event).to_string(),
                content_type: "application/json",
                attributes: Vec::new(),
            },
            Format::CloudEvents { source } => {
                let mut ce = Map::new();
                for (k, v) in attributes(event, source) {
                    ce.insert(k, Value::String(v));
                }
                ce.insert("datacontenttype".into(), json!("application/json"));
                ce.insert("data".into(), event.payload.value().clone());
                Message {
                    body: Value::Object(ce).to_string(),
                    content_type: "application/cloudevents+json",
                    attributes: Vec::new(),
                }
            }
            Format::CloudEventsBinary { source } => Message {
                body: event.payload.get().to_owned(),
                content_type: "application/json",
                attributes: attributes(event, source),
            },
        }
    }
}

/// The CloudEvents attributes of `event`: the required ones, `time`, and
/// the extensions `traceparent` (Distributed Tracing), `partitionkey`
/// (Partitioning: the ordering key), `correlationid` and `outboxattempt`.
/// Values from the row go out without control characters.
fn attributes(event: &Event, source: &str) -> Vec<(String, String)> {
    let clean = |t: &str| -> String { t.chars().filter(|c| !c.is_control()).collect() };
    let mut out = vec![
        ("specversion".to_owned(), "1.0".to_owned()),
        ("id".to_owned(), event.id.to_string()),
        ("source".to_owned(), clean(source)),
        ("type".to_owned(), clean(&event.event_type)),
        (
            "time".to_owned(),
            event
                .created_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        ),
        ("outboxattempt".to_owned(), event.attempts.to_string()),
    ];
    if let Some(tp) = event
        .traceparent
        .as_deref()
        .filter(|t| crate::trace::is_valid_traceparent(t))
    {
        out.push(("traceparent".to_owned(), tp.to_owned()));
    }
    if let Some(k) = &event.ordering_key {
        out.push(("partitionkey".to_owned(), clean(k)));
    }
    if let Some(c) = &event.correlation_id {
        out.push(("correlationid".to_owned(), clean(c)));
    }
    out
}
