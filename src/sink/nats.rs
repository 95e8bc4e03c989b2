//! Publishing to NATS JetStream, with the official `async-nats` client on
//! a small runtime of the sink's own (one thread): every event is one
//! publish whose ack must name the stream that stored it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::HeaderMap;

use crate::dispatch::{BatchResult, Handler, HandlerError};
use crate::error::{Error, Result};
use crate::event::Event;

/// A [`Handler`] that publishes each event to a JetStream stream: to the
/// subject its template names (`outbox.{type}` by default), the body as
/// [`super::envelope`], with headers `Nats-Msg-Id` (the event id, which
/// the stream's duplicate window uses to drop redeliveries),
/// `Outbox-Event-Id`, `Outbox-Event-Type`, `Outbox-Attempt`, and when set
/// `Outbox-Correlation-Id`, `Outbox-Ordering-Key` and `traceparent`.
///
/// An event is done when the server's ack names a stream. No stream for
/// the subject, no responders, an error from the stream, or no ack in time
/// is a retry with the reason in `last_error`; a server that cannot be
/// reached holds the destination back without spending attempts.
///
/// ```no_run
/// use sqlite_outbox::{sink::NatsJetStream, Dispatcher, SqliteStore};
///
/// let store = SqliteStore::open("app.db")?;
/// let nats = NatsJetStream::builder("nats://127.0.0.1:4222")
///     .subject("orders.{type}")
///     .connect()?;
/// let dispatcher = Dispatcher::builder(store).handle_with("order.placed", nats).start()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct NatsJetStream {
    inner: Arc<Inner>,
}

struct Inner {
    runtime: tokio::runtime::Runtime,
    client: async_nats::Client,
    jetstream: async_nats::jetstream::Context,
    subject: String,
    ack_timeout: Duration,
    shown: String,
    format: super::Format,
    batch: usize,
    last_failure: Arc<std::sync::Mutex<Option<String>>>,
}

impl fmt::Debug for NatsJetStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsJetStream")
            .field("server", &self.inner.shown)
            .field("subject", &self.inner.subject)
            .finish_non_exhaustive()
    }
}

/// Builds a [`NatsJetStream`].
pub struct NatsJetStreamBuilder {
    url: String,
    subject: String,
    format: super::Format,
    ack_timeout: Duration,
    connect_timeout: Duration,
    credentials: Option<std::path::PathBuf>,
    token: Option<String>,
    batch: usize,
    ca_file: Option<std::path::PathBuf>,
}

impl fmt::Debug for NatsJetStreamBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsJetStreamBuilder")
            .field("server", &shown(&self.url))
            .field("subject", &self.subject)
            .field("ack_timeout", &self.ack_timeout)
            .field("credentials", &self.credentials)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// The server's address without user information.
fn shown(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
            format!("{scheme}://{rest}")
        }
        None => url
            .rsplit_once('@')
            .map_or(url, |(_, host)| host)
            .to_owned(),
    }
}

impl NatsJetStreamBuilder {
    /// The subject template; `{type}` becomes the event type (characters a
    /// subject cannot hold become `_`). Default: `outbox.{type}`.
    pub fn subject(mut self, template: impl Into<String>) -> Self {
        self.subject = template.into();
        self
    }

    /// What each message holds: the envelope (default), or a CloudEvent in
    /// structured mode (`Content-Type: application/cloudevents+json`) or
    /// binary mode (the payload, with `ce-` headers).
    pub fn format(mut self, format: super::Format) -> Self {
        self.format = format;
        self
    }

    /// How long to wait for the stream's ack before the attempt is a
    /// retry. Default: 10 s.
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// Up to this many events published before their acks are awaited
    /// (pipelined: one round trip for all of them). Default: 256; 1
    /// publishes one event at a time.
    pub fn batch(mut self, events: usize) -> Self {
        self.batch = events.max(1);
        self
    }

    /// How long to wait for the first connection. Default: 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// CA certificates (a PEM file) the server's certificate must chain
    /// to, and TLS required (as a `tls://` address also requires it).
    /// Default: the system's roots, when the address or the server asks
    /// for TLS.
    pub fn ca_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// A NATS credentials file (a user JWT and its NKey seed).
    pub fn credentials_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.credentials = Some(path.into());
        self
    }

    /// An authentication token (from a file or the environment, never
    /// argv).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Connects. A server that is down at this point is waited for by the
    /// client in the background; publishes meanwhile hold the destination
    /// back.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a template without a subject, an address or a
    /// credentials file that cannot be used; `Io` when the runtime cannot
    /// start.
    pub fn connect(self) -> Result<NatsJetStream> {
        if self.subject.trim().is_empty() {
            return Err(Error::invalid("the NATS subject template is empty"));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("outbox-nats")
            .enable_all()
            .build()?;
        let mut options = async_nats::ConnectOptions::new()
            .connection_timeout(self.connect_timeout)
            // Keep trying for ever: the dispatcher holds the destination
            // back meanwhile, and no event waits on a reconnect.
            .retry_on_initial_connect()
            .max_reconnects(None)
            .name("sqlite-outbox");
        if let Some(path) = &self.ca_file {
            if let Err(e) = std::fs::File::open(path) {
                return Err(Error::invalid(format!(
                    "NATS CA file {}: {e}",
                    path.display()
                )));
            }
            options = options
                .add_root_certificates(path.clone())
                .require_tls(true);
        }
        if self.url.trim_start().starts_with("tls://") {
            options = options.require_tls(true);
        }
        // Why the last connection attempt failed, for the events held back
        // meanwhile.
        let last_failure: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        let failure = Arc::clone(&last_failure);
        options = options.event_callback(move |event| {
            let failure = Arc::clone(&failure);
            async move {
                let mut f = failure.lock().unwrap_or_else(|p| p.into_inner());
                match event {
                    async_nats::Event::Connected => *f = None,
                    async_nats::Event::ClientError(e) => *f = Some(e.to_string()),
                    _ => {}
                }
            }
        });
        if let Some(token) = self.token {
            options = options.token(token);
        }
        if let Some(path) = &self.credentials {
            options = runtime
                .block_on(options.credentials_file(path))
                .map_err(|e| {
                    Error::invalid(format!("NATS credentials file {}: {e}", path.display()))
                })?;
        }
        let url = self.url.clone();
        let client = runtime
            .block_on(options.connect(url.as_str()))
            .map_err(|e| Error::invalid(format!("NATS server {}: {e}", shown(&url))))?;
        // A server that is up is connected to before the first event; one
        // that is not is waited for no longer than the connect timeout.
        let wait = self.connect_timeout;
        let probe = client.clone();
        runtime.block_on(async move {
            let _ = tokio::time::timeout(wait, async {
                while probe.connection_state() != State::Connected {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await;
        });
        // The context spawns onto the runtime it is made in.
        let jetstream = {
            let _inside = runtime.enter();
            async_nats::jetstream::new(client.clone())
        };
        Ok(NatsJetStream {
            inner: Arc::new(Inner {
                runtime,
                client,
                jetstream,
                subject: self.subject,
                ack_timeout: self.ack_timeout,
                shown: shown(&self.url),
                format: self.format,
                batch: self.batch,
                last_failure,
            }),
        })
    }
}

impl NatsJetStream {
    /// A builder for a sink publishing through the server at `url`
    /// (`nats://host:4222`, `tls://…`, or several separated by commas).
    pub fn builder(url: impl Into<String>) -> NatsJetStreamBuilder {
        NatsJetStreamBuilder {
            url: url.into(),
            subject: "outbox.{type}".to_owned(),
            format: super::Format::Envelope,
            ack_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            credentials: None,
            token: None,
            batch: 256,
            ca_file: None,
        }
    }

    /// The subject an event goes to.
    pub fn subject_of(&self, event: &Event) -> String {
        super::render_name(&self.inner.subject, event)
    }

    fn headers(event: &Event, message: &super::Message) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("Content-Type", message.content_type);
        for (name, value) in &message.attributes {
            h.insert(format!("ce-{name}").as_str(), header_value(value).as_str());
        }
        let id = event.id.to_string();
        h.insert("Nats-Msg-Id", id.as_str());
        h.insert("Outbox-Event-Id", id.as_str());
        h.insert(
            "Outbox-Event-Type",
            header_value(&event.event_type).as_str(),
        );
        h.insert("Outbox-Attempt", event.attempts.to_string().as_str());
        if let Some(c) = &event.correlation_id {
            h.insert("Outbox-Correlation-Id", header_value(c).as_str());
        }
        if let Some(k) = &event.ordering_key {
            h.insert("Outbox-Ordering-Key", header_value(k).as_str());
        }
        if let Some(tp) = event
            .traceparent
            .as_deref()
            .filter(|t| crate::trace::is_valid_traceparent(t))
        {
            h.insert("traceparent", tp);
        }
        h
    }
}

/// A value safe in a NATS header: no line breaks or other control
/// characters (which would end the header block).
fn header_value(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

impl Handler for NatsJetStream {
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

impl NatsJetStream {
    /// Publishes `events` in order, then waits for their acks: a result
    /// per event.
    fn publish(&self, events: &[Event]) -> Vec<std::result::Result<(), HandlerError>> {
        let inner = &self.inner;
        if inner.client.connection_state() != State::Connected {
            let broker = format!("NATS server {}", inner.shown);
            return super::not_connected(&broker, &inner.last_failure, events.len());
        }
        let messages: Vec<(String, HeaderMap, String)> = events
            .iter()
            .map(|event| {
                let message = inner.format.message(event);
                let headers = Self::headers(event, &message);
                (self.subject_of(event), headers, message.body)
            })
            .collect();
        let js = inner.jetstream.clone();
        let wait = inner.ack_timeout;
        let acks = inner.runtime.block_on(async move {
            // Every publish goes out before any ack is awaited; a publish
            // that cannot go out fails the ones after it too, so none
            // overtakes another.
            let mut pending = Vec::with_capacity(messages.len());
            let mut broken = None;
            for (subject, headers, body) in messages {
                if broken.is_some() {
                    pending.push(Err(PublishErrorKind::BrokenPipe.into()));
                    continue;
                }
                match js.publish_with_headers(subject, headers, body.into()).await {
                    Ok(ack) => pending.push(Ok(ack)),
                    Err(e) => {
                        broken = Some(());
                        pending.push(Err(e));
                    }
                }
            }
            let deadline = tokio::time::Instant::now() + wait;
            let mut acks = Vec::with_capacity(pending.len());
            for p in pending {
                acks.push(match p {
                    Ok(ack) => match tokio::time::timeout_at(deadline, ack).await {
                        Ok(ack) => ack,
                        Err(_) => Err(PublishErrorKind::TimedOut.into()),
                    },
                    Err(e) => Err(e),
                });
            }
            acks
        });
        events
            .iter()
            .zip(acks)
            .map(|(event, ack)| self.verdict(event, ack))
            .collect()
    }

    fn verdict(
        &self,
        event: &Event,
        ack: std::result::Result<
            async_nats::jetstream::publish::PublishAck,
            async_nats::jetstream::context::PublishError,
        >,
    ) -> std::result::Result<(), HandlerError> {
        let inner = &self.inner;
        match ack {
            Ok(ack) if !ack.stream.is_empty() => Ok(()),
            Ok(_) => Err(HandlerError::retry(format!(
                "NATS acknowledged {} without naming a stream",
                self.subject_of(event)
            ))),
            Err(e) => {
                let reason = match e.kind() {
                    PublishErrorKind::StreamNotFound => format!(
                        "no JetStream stream takes subject {}",
                        self.subject_of(event)
                    ),
                    PublishErrorKind::TimedOut => {
                        format!("no ack from JetStream within {:?}", inner.ack_timeout)
                    }
                    _ => format!("JetStream publish failed: {e}"),
                };
                if inner.client.connection_state() != State::Connected {
                    Err(HandlerError::unavailable(reason))
                } else {
                    Err(HandlerError::retry(reason))
                }
            }
        }
    }
}
