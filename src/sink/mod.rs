//! Sinks: ready-made handlers that publish events where the rest of a
//! system listens, for an app's own [`Dispatcher`](crate::Dispatcher) and
//! for `outbox relay`, which is a thin command line over the same code.
//!
//! Every sink keeps the same rules:
//! - an event is done only when the destination acknowledged it as durably
//!   as the destination promises (a JetStream publish ack naming its
//!   stream, an HTTP 2xx, an MQTT PUBACK);
//! - the event id goes out as the destination's deduplication key where it
//!   has one (`Nats-Msg-Id`, `Idempotency-Key`), so that at-least-once
//!   delivery becomes effectively once where the broker can;
//! - a destination that cannot be reached is
//!   [`HandlerError::unavailable`](crate::HandlerError::unavailable): held
//!   back without spending attempts;
//! - per-key order holds, since a sink acknowledges before the dispatcher
//!   hands out the next event of a key;
//! - credentials come from files or the environment, never argv.
//!
//! Each sink is one file behind a cargo feature, so the default build has
//! no async runtime; a sink whose client is async drives a small runtime of
//! its own. A new destination (Kafka, say) is one more file here.

mod format;
#[cfg(feature = "http")]
mod http;
#[cfg(feature = "mqtt")]
mod mqtt;
#[cfg(feature = "nats")]
mod nats;

pub use format::{Format, Message, DEFAULT_CLOUDEVENTS_SOURCE};
#[cfg(feature = "http")]
pub use http::{is_valid_header, redact_url, HttpSink, HttpSinkBuilder};
#[cfg(feature = "mqtt")]
pub use mqtt::{MqttSink, MqttSinkBuilder};
#[cfg(feature = "nats")]
pub use nats::{NatsJetStream, NatsJetStreamBuilder};

use serde_json::{json, Value};

use crate::event::Event;

/// The JSON body every sink sends for an event: its id, type, payload,
/// attempt, correlation id and creation time.
pub fn envelope(event: &Event) -> Value {
    json!({
        "id": event.id,
        "type": event.event_type,
        "payload": event.payload,
        "attempt": event.attempts,
        "correlation_id": event.correlation_id,
        "created_at": event.created_at,
    })
}

/// A result for each of `n` events when the broker `broker` is not
/// connected: all held back, with why the last connection attempt failed
/// when that is known.
#[cfg(any(feature = "nats", feature = "mqtt"))]
pub(crate) fn not_connected(
    broker: &str,
    failure: &std::sync::Mutex<Option<String>>,
    n: usize,
) -> Vec<Result<(), crate::HandlerError>> {
    let why = match failure.lock().unwrap_or_else(|p| p.into_inner()).as_deref() {
        Some(e) => format!("{broker} is not connected ({e})"),
        None => format!("{broker} is not connected"),
    };
    (0..n)
        .map(|_| Err(crate::HandlerError::unavailable(why.clone())))
        .collect()
}

#[cfg(any(feature = "nats", feature = "mqtt"))]
/// A subject or topic from `template`: `{type}` becomes the event's type,
/// with anything a broker would read as structure or a wildcard (white
/// space, `*`, `>`, `#`, `+`, control characters) replaced by `_`.
pub(crate) fn render_name(template: &str, event: &Event) -> String {
    let ty: String = event
        .event_type
        .chars()
        .map(|c| {
            if c.is_whitespace() || c.is_control() || matches!(c, '*' | '>' | '#' | '+') {
                '_'
            } else {
                c
            }
        })
        .collect();
    template.replace("{type}", &ty)
}

#[cfg(all(test, feature = "nats"))]
mod tests {
    use super::*;
    use crate::{MemoryStore, NewEvent};

    #[test]
    fn a_type_never_becomes_a_wildcard_or_a_second_token_list() -> crate::Result<()> {
        let store = MemoryStore::new();
        let name = |ty: &str| -> crate::Result<String> {
            let stored = store.enqueue(NewEvent::new(ty, json!({})))?;
            Ok(render_name("outbox.{type}", &stored))
        };
        assert_eq!(name("order.placed")?, "outbox.order.placed");
        assert_eq!(name("a b*c>d#e+f")?, "outbox.a_b_c_d_e_f");
        assert_eq!(name("x\r\ny")?, "outbox.x__y");
        Ok(())
    }
}
