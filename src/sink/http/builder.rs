//! [`HttpSinkBuilder`]: where an [`HttpSink`] posts, with what headers,
//! in which format and batches.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use url::Url;

use super::{redact_url, HttpSink, Inner};
use crate::error::{Error, Result};

impl HttpSink {
    /// A builder for a sink posting to `url`, an absolute `http` or
    /// `https` URL with a host.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for anything else (the message shows the URL without
    /// its credentials).
    pub fn builder(url: &str) -> Result<HttpSinkBuilder> {
        let url = Url::parse(url).map_err(|e| Error::invalid(format!("not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::invalid(format!(
                "{}: the scheme must be http or https",
                redact_url(&url)
            )));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(Error::invalid(format!("{}: no host", redact_url(&url))));
        }
        Ok(HttpSinkBuilder {
            url,
            headers: Vec::new(),
            timeout: Duration::from_secs(30),
            format: crate::sink::Format::Envelope,
            batch: 1,
            batch_bytes: 1024 * 1024,
        })
    }
}

/// Builds an [`HttpSink`].
pub struct HttpSinkBuilder {
    url: Url,
    headers: Vec<(String, String)>,
    timeout: Duration,
    format: crate::sink::Format,
    batch: usize,
    batch_bytes: usize,
}

impl fmt::Debug for HttpSinkBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSinkBuilder")
            .field("endpoint", &redact_url(&self.url))
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

impl HttpSinkBuilder {
    /// An extra request header (an `Authorization`, say: from a file or
    /// the environment, never argv). Its value never appears in errors.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a name that is not an HTTP token or a value with
    /// control characters (the value is not shown).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Result<Self> {
        let (name, value) = (name.into(), value.into());
        if !is_valid_header(&name, &value) {
            return Err(Error::invalid(
                "a header needs a token for a name and a value without control characters",
            ));
        }
        self.headers.push((name, value.trim().to_owned()));
        Ok(self)
    }

    /// How long one request may take, answer included. Default: 30 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// What each event is sent as. Default: the envelope.
    pub fn format(mut self, format: crate::sink::Format) -> Self {
        self.format = format;
        self
    }

    /// Up to `events` events per request, as one JSON array (1: one event
    /// per request, the default).
    pub fn batch(mut self, events: usize) -> Self {
        self.batch = events.max(1);
        self
    }

    /// At most this many bytes of events per request (default 1 MiB); an
    /// event larger than this goes alone.
    pub fn batch_bytes(mut self, bytes: usize) -> Self {
        self.batch_bytes = bytes.max(1);
        self
    }

    /// The sink.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for batches in CloudEvents binary mode, which has no
    /// batch form.
    pub fn build(self) -> Result<HttpSink> {
        if self.batch > 1 && matches!(self.format, crate::sink::Format::CloudEventsBinary { .. }) {
            return Err(Error::invalid(
                "CloudEvents binary mode has no batches: use the structured mode (cloudevents)",
            ));
        }
        let agent = ureq::AgentBuilder::new()
            .timeout(self.timeout)
            .redirects(0)
            .build();
        Ok(HttpSink {
            inner: Arc::new(Inner {
                agent,
                url: self.url,
                headers: self.headers,
                format: self.format,
                batch: self.batch,
                batch_bytes: self.batch_bytes,
            }),
        })
    }
}

/// Whether `name: value` can go out as a request header: the name an
/// HTTP token, the value without control characters (but tabs).
pub fn is_valid_header(name: &str, value: &str) -> bool {
    let name_ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    name_ok && !value.chars().any(|c| c.is_control() && c != '\t')
}
