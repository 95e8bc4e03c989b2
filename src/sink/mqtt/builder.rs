//! [`MqttSinkBuilder`]: the broker, topic, session and TLS of an
//! [`MqttSink`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::*;

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
            format: crate::sink::Format::Envelope,
            client_id: None,
            credentials: None,
            ack_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(30),
            batch: 256,
            tls,
            ca_file: None,
        })
    }
}

/// Builds an [`MqttSink`].
pub struct MqttSinkBuilder {
    host: String,
    port: u16,
    topic: String,
    format: crate::sink::Format,
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
    pub fn format(mut self, format: crate::sink::Format) -> Self {
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
