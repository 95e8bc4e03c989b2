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

/// Builds an [`MqttSink`].
pub struct MqttSinkBuilder {
    host: String,
    port: u16,
    topic: String,
    format: super::Format,
    client_id: Option<String>,
    credentials: Option<(String, String)>,
    ack_timeout: Duration,
    keep_alive: Duration,
    batch: usize,
    tls: bool,
    ca_file: Option<std::path::PathBuf>,
}

impl fmt::Debug for MqttSinkBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttSinkBuilder")
            .field("broker", &format!("{}:{}", self.host, self.port))
            .field("topic", &self.topic)
            .field("client_id", &self.client_id)
            .field("user", &self.credentials.as_ref().map(|(u, _)| u))
            .finish_non_exhaustive()
    }
}

impl MqttSinkBuilder {
    /// The topic template; `{type}` becomes the event type (`+` and `#`
    /// become `_`). Default: `outbox/{type}`.
    pub fn topic(mut self, template: impl Into<String>) -> Self {
        self.topic = template.into();
        self
    }

    /// A client id of the sink's own, which also keeps a persistent
    /// session. Default: a random id and a clean session.
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }

    /// A user name and password (from a file or the environment, never
    /// argv).
    pub fn credentials(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.credentials = Some((user.into(), password.into()));
        self
    }

    /// What each message holds: the envelope (default), or a CloudEvent in
    /// structured mode (content type `application/cloudevents+json`) or
    /// binary mode (the payload, with the attributes as user properties).
    pub fn format(mut self, format: super::Format) -> Self {
        self.format = format;
        self
    }

    /// CA certificates (a PEM file) the broker's certificate must chain
    /// to, and TLS required. Default, for an `mqtts://` address: Mozilla's
    /// roots (`webpki-roots`).
    pub fn ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self.tls = true;
        self
    }

    /// Up to this many events published before their PUBACKs are awaited
    /// (pipelined). Default: 256; 1 publishes one event at a time.
    pub fn batch(mut self, events: usize) -> Self {
        self.batch = events.max(1);
        self
    }

    /// How long to wait for a PUBACK. Default: 10 s.
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// Starts the connection thread. A broker that is down is waited for;
    /// events meanwhile hold the destination back.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for an empty topic template; `Io` if the thread
    /// cannot start.
    pub fn connect(self) -> Result<MqttSink> {
        if self.topic.trim().is_empty() {
            return Err(Error::invalid("the MQTT topic template is empty"));
        }
        let persistent = self.client_id.is_some();
        let id = self
            .client_id
            .unwrap_or_else(|| format!("sqlite-outbox-{}", uuid::Uuid::new_v4().simple()));
        let mut options = MqttOptions::new(id, self.host.clone(), self.port);
        options.set_keep_alive(self.keep_alive);
        // Without it, a lone publish waits for the broker's delayed ACK of
        // the one before (Nagle): about 40 ms per event.
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        options.set_network_options(network);
        options.set_clean_start(!persistent);
        if persistent {
            options.set_connect_properties(rumqttc::v5::mqttbytes::v5::ConnectProperties {
                session_expiry_interval: Some(24 * 3600),
                ..rumqttc::v5::mqttbytes::v5::ConnectProperties::new()
            });
        }
        if self.tls {
            let config = tls_config(self.ca_file.as_deref())?;
            options.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
                Arc::new(config),
            )));
        }
        if let Some((user, password)) = self.credentials {
            options.set_credentials(user, password);
        }
        let (client, connection) = Client::new(options, 64);
        let shared = Arc::new(Shared::default());
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("outbox-mqtt".into())
            .spawn(move || drive(connection, &thread_shared))?;
        // A broker that is up is connected to before the first event.
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while !shared.connected.load(Ordering::SeqCst) && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(MqttSink {
            inner: Arc::new(Inner {
                client,
                topic: self.topic,
                ack_timeout: self.ack_timeout,
                batch: self.batch,
                shown: format!("{}:{}", self.host, self.port),
                format: self.format,
                shared,
                order: Mutex::new(()),
            }),
        })
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
    /// A builder for a sink publishing to the broker at `url`
    /// (`mqtt://host:1883`),
    ///
    /// # Errors
    ///
    /// `InvalidInput` for an address that is not `mqtt://host[:port]`
    /// or over TLS (`mqtts://host:8883`), the broker's certificate checked
    /// against [`MqttSinkBuilder::ca_file`] or Mozilla's roots, and its
    /// name against the host.
    pub fn builder(url: &str) -> Result<MqttSinkBuilder> {
        let (tls, rest) = match (url.strip_prefix("mqtt://"), url.strip_prefix("mqtts://")) {
            (Some(rest), _) => (false, rest),
            (None, Some(rest)) => (true, rest),
            (None, None) => {
                return Err(Error::invalid(
                    "an MQTT broker is given as mqtt://host[:port] or mqtts://host[:port]",
                ))
            }
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('@') || rest.contains('/') || rest.is_empty() {
            return Err(Error::invalid(
                "an MQTT broker is given as mqtt[s]://host[:port], credentials apart",
            ));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h.trim_start_matches('[').trim_end_matches(']').to_owned(),
                p.parse::<u16>()
                    .map_err(|_| Error::invalid("the MQTT port is not a number"))?,
            ),
            _ => (rest.to_owned(), if tls { 8883 } else { 1883 }),
        };
        Ok(MqttSinkBuilder {
            host,
            port,
            topic: "outbox/{type}".to_owned(),
            format: super::Format::Envelope,
            client_id: None,
            credentials: None,
            ack_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(30),
            batch: 256,
            tls,
            ca_file: None,
        })
    }

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

/// A TLS client configuration that checks the broker's certificate against
/// the CA file, or Mozilla's roots.
fn tls_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let unreadable = |e: &dyn fmt::Display| {
                Error::invalid(format!("MQTT CA file {}: {e}", path.display()))
            };
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| unreadable(&e))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(unreadable(&"no certificate in it"));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::invalid(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
