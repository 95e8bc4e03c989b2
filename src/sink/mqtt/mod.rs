//! Publishing to an MQTT broker (version 5) with `rumqttc`, at QoS 1: an
//! event is done when the broker's PUBACK for its publish says success.
//!
//! One thread (`outbox-mqtt`) drives the connection: it reconnects by
//! itself, and matches each PUBACK to the publish it answers. Publishes go
//! out in the order handlers ask, and the client's packet ids tie each
//! acknowledgement to its event.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crossbeam_channel::{bounded, Sender};
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Client, Connection, Event as MqttEvent, MqttOptions};
use rumqttc::Outgoing;

mod builder;

pub use builder::MqttSinkBuilder;

use crate::dispatch::{BatchResult, Handler, HandlerError};
use crate::error::{Error, Result};
use crate::event::Event;

/// A [`Handler`] that publishes each event to an MQTT broker at QoS 1
/// (MQTT 5): to the topic its template names (`outbox/{type}` by
/// default), the body as [`super::envelope`], with user properties
/// `outbox-event-id`, `outbox-event-type`, `outbox-attempt`, and when set
/// `outbox-correlation-id`, `outbox-ordering-key` and `traceparent`.
///
/// An event is done when the broker's PUBACK reports success. A PUBACK
/// with an error code, or none within the ack timeout, is a retry with the
/// reason in `last_error`; a broker that cannot be reached holds the
/// destination back without spending attempts.
///
/// With a client id of its own ([`MqttSinkBuilder::client_id`]) the sink
/// keeps a persistent session (clean start off, kept a day), so the
/// broker and the client resend what was in flight when a connection
/// dropped; without one, each start is a fresh session under a random id.
#[derive(Clone)]
pub struct MqttSink {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    topic: String,
    ack_timeout: Duration,
    batch: usize,
    shown: String,
    format: super::Format,
    shared: Arc<Shared>,
    /// Held while a publish is handed to the client, so that the order of
    /// `waiting` is the order of the client's packet ids.
    order: Mutex<()>,
}

/// What the connection thread and the handlers share.
#[derive(Default)]
struct Shared {
    connected: AtomicBool,
    stop: AtomicBool,
    waiters: Mutex<Waiters>,
    /// Why the connection last failed, while it is down.
    failure: Mutex<Option<String>>,
}

/// How a publish ended, other than with a PUBACK of success.
enum Verdict {
    /// The broker answered with an error code.
    Refused(String),
    /// The connection dropped before an answer: the broker may or may not
    /// have the message.
    Lost(String),
}

type Waiter = Sender<std::result::Result<(), Verdict>>;

#[derive(Default)]
struct Waiters {
    /// Publishes handed to the client whose packet id is not known yet.
    unsent: VecDeque<Waiter>,
    /// Sent publishes by packet id, waiting for their PUBACK.
    sent: HashMap<u16, Waiter>,
    /// Packet ids of publishes given up on when a connection dropped: the
    /// client sends them again after reconnecting, under the same ids, and
    /// neither that nor their PUBACK may be taken for another event's.
    orphans: HashSet<u16>,
}

impl Shared {
    fn waiters(&self) -> MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl fmt::Debug for MqttSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttSink")
            .field("broker", &self.inner.shown)
            .field("topic", &self.inner.topic)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.client.try_disconnect();
    }
}

/// Polls the connection for ever (reconnecting after errors, with a
/// pause), and settles the waiters as PUBACKs arrive.
fn drive(mut connection: Connection, shared: &Shared) {
    let mut was_down = false;
    while !shared.stop.load(Ordering::SeqCst) {
        match connection.recv_timeout(Duration::from_millis(200)) {
            Err(rumqttc::v5::RecvTimeoutError::Timeout) => {}
            Err(rumqttc::v5::RecvTimeoutError::Disconnected) => break,
            Ok(Ok(MqttEvent::Incoming(Packet::ConnAck(_)))) => {
                shared.connected.store(true, Ordering::SeqCst);
                *shared.failure.lock().unwrap_or_else(|p| p.into_inner()) = None;
                if was_down {
                    tracing::info!("MQTT broker reachable again");
                    was_down = false;
                }
            }
            Ok(Ok(MqttEvent::Outgoing(Outgoing::Publish(pkid)))) => {
                let mut w = shared.waiters();
                // A publish resent after a reconnect keeps its id (and its
                // waiter, or none); a new one takes the oldest unsent waiter.
                if !w.sent.contains_key(&pkid) && !w.orphans.contains(&pkid) {
                    if let Some(tx) = w.unsent.pop_front() {
                        w.sent.insert(pkid, tx);
                    }
                }
            }
            Ok(Ok(MqttEvent::Incoming(Packet::PubAck(ack)))) => {
                let tx = {
                    let mut w = shared.waiters();
                    if w.orphans.remove(&ack.pkid) {
                        None
                    } else {
                        w.sent.remove(&ack.pkid)
                    }
                };
                if let Some(tx) = tx {
                    let verdict = match ack.reason {
                        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Ok(()),
                        other => Err(Verdict::Refused(format!(
                            "the broker refused the publish: {other:?}"
                        ))),
                    };
                    let _ = tx.send(verdict);
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                shared.connected.store(false, Ordering::SeqCst);
                *shared.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                // What was sent and not acknowledged is given back at once,
                // its attempt not spent (the broker may have it: it may
                // arrive twice). What was not sent yet goes out after the
                // reconnect, in order, and keeps its waiter.
                let lost: Vec<Waiter> = {
                    let mut w = shared.waiters();
                    let sent: Vec<(u16, Waiter)> = w.sent.drain().collect();
                    w.orphans.extend(sent.iter().map(|(pkid, _)| *pkid));
                    sent.into_iter().map(|(_, tx)| tx).collect()
                };
                for tx in lost {
                    let _ = tx.send(Err(Verdict::Lost(format!(
                        "the connection to the MQTT broker dropped before its PUBACK: {e}"
                    ))));
                }
                if !was_down {
                    tracing::warn!(error = %e, "MQTT broker unreachable; retrying");
                    was_down = true;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    }
}

impl MqttSink {
    /// The topic an event goes to.
    pub fn topic_of(&self, event: &Event) -> String {
        super::render_name(&self.inner.topic, event)
    }

    fn properties(event: &Event, message: &super::Message) -> PublishProperties {
        let clean = |t: &str| -> String {
            t.chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect()
        };
        let mut user = vec![
            ("outbox-event-id".to_owned(), event.id.to_string()),
            ("outbox-event-type".to_owned(), clean(&event.event_type)),
            ("outbox-attempt".to_owned(), event.attempts.to_string()),
        ];
        if let Some(c) = &event.correlation_id {
            user.push(("outbox-correlation-id".to_owned(), clean(c)));
        }
        if let Some(k) = &event.ordering_key {
            user.push(("outbox-ordering-key".to_owned(), clean(k)));
        }
        if let Some(tp) = event
            .traceparent
            .as_deref()
            .filter(|t| crate::trace::is_valid_traceparent(t))
        {
            user.push(("traceparent".to_owned(), tp.to_owned()));
        }
        user.extend(
            message
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), clean(v))),
        );
        PublishProperties {
            user_properties: user,
            content_type: Some(message.content_type.to_owned()),
            payload_format_indicator: Some(1),
            ..PublishProperties::default()
        }
    }
}

impl Handler for MqttSink {
    fn handle(&self, event: &Event) -> std::result::Result<(), HandlerError> {
        self.publish(std::slice::from_ref(event))
            .pop()
            .unwrap_or_else(|| Err(HandlerError::retry("no result")))
    }

    fn batch_limit(&self) -> usize {
        self.inner.batch
    }

    fn handle_batch(&self, events: &[Event]) -> BatchResult {
        Ok(self.publish(events))
    }
}

impl MqttSink {
    /// Hands `events` to the connection in order, then waits for their
    /// PUBACKs: a result per event.
    fn publish(&self, events: &[Event]) -> Vec<std::result::Result<(), HandlerError>> {
        let inner = &self.inner;
        if !inner.shared.connected.load(Ordering::SeqCst) {
            let broker = format!("MQTT broker {}", inner.shown);
            return super::not_connected(&broker, &inner.shared.failure, events.len());
        }
        let mut waiting = Vec::with_capacity(events.len());
        for event in events {
            let topic = self.topic_of(event);
            let message = inner.format.message(event);
            let properties = Self::properties(event, &message);
            let (tx, rx) = bounded(1);
            let _order = inner.order.lock().unwrap_or_else(|p| p.into_inner());
            inner.shared.waiters().unsent.push_back(tx);
            let sent = inner.client.publish_with_properties(
                topic,
                QoS::AtLeastOnce,
                false,
                message.body,
                properties,
            );
            match sent {
                Ok(()) => waiting.push(Ok(rx)),
                Err(e) => {
                    // Never handed to the connection: take the waiter back.
                    inner.shared.waiters().unsent.pop_back();
                    waiting.push(Err(HandlerError::retry(format!(
                        "MQTT publish refused: {e}"
                    ))));
                }
            }
        }
        let deadline = std::time::Instant::now() + inner.ack_timeout;
        waiting
            .into_iter()
            .map(|w| match w.map(|rx| rx.recv_deadline(deadline)) {
                Err(e) => Err(e),
                Ok(Ok(Ok(()))) => Ok(()),
                Ok(Ok(Err(Verdict::Refused(reason)))) => Err(HandlerError::retry(reason)),
                Ok(Ok(Err(Verdict::Lost(reason)))) => Err(HandlerError::unavailable(reason)),
                Ok(Err(_)) if !inner.shared.connected.load(Ordering::SeqCst) => {
                    Err(HandlerError::unavailable(format!(
                        "MQTT broker {} went away before acknowledging",
                        inner.shown
                    )))
                }
                Ok(Err(_)) => Err(HandlerError::retry(format!(
                    "no PUBACK from {} within {:?}",
                    inner.shown, inner.ack_timeout
                ))),
            })
            .collect()
    }
}
