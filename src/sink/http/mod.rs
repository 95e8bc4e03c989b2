//! Posting events to an HTTP endpoint with `ureq` (blocking, no async
//! runtime): one event per request, or batches of them as one JSON array.
//!
//! Only a 2xx answer is a delivery. Redirects are not followed (a
//! redirected POST becomes a GET elsewhere, and would carry the headers to
//! another host).

use std::fmt;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

mod builder;

pub use builder::{is_valid_header, HttpSinkBuilder};

use crate::dispatch::{BatchResult, Handler, HandlerError};
use crate::error::Result;
use crate::event::Event;

/// How much of an error response is read for the event's last error.
const ERROR_BODY_LIMIT: u64 = 64 * 1024;

/// How much of a batch's 2xx answer is read for the events it rejects.
const ANSWER_LIMIT: u64 = 1024 * 1024;

/// A [`Handler`] that POSTs events to one endpoint.
///
/// One event per request by default: the body is the event in the sink's
/// [`super::Format`], with `Idempotency-Key` (the event id) and
/// `traceparent` headers, and `ce-` headers in CloudEvents binary mode.
///
/// With [`HttpSinkBuilder::batch`] above 1, the events waiting for the
/// dispatcher go out together: the body is a JSON array of the events
/// (`application/json` for envelopes, `application/cloudevents-batch+json`
/// for CloudEvents), up to the batch's count and byte limit per request.
/// The answer decides for every event in the request:
///
/// - a 2xx accepts all of them, except those its JSON body lists as
///   rejected: `{"rejected": [{"id": "<event id>", "reason": "…",
///   "permanent": false}]}`; a rejected event is retried (or fails at once
///   with `"permanent": true`), with the reason as its last error;
/// - 429 and 503 say the endpoint is busy: the destination is held back
///   (until `Retry-After` when given) without spending attempts;
/// - 408, 425 and other 5xx retry all of them (after `Retry-After` when
///   given);
/// - any other 4xx refuses the request as a whole: each event is sent
///   again alone (as a batch of one), so one bad event cannot fail the
///   others;
/// - an endpoint that cannot be reached holds the destination back
///   without spending attempts.
///
/// ```no_run
/// use sqlite_outbox::{sink::HttpSink, Dispatcher, SqliteStore};
///
/// let store = SqliteStore::open("app.db")?;
/// let sink = HttpSink::builder("https://api.example.com/events")?
///     .header("Authorization", std::env::var("API_TOKEN")?)?
///     .batch(100)
///     .build()?;
/// let dispatcher = Dispatcher::builder(store).fallback_with(sink).start()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct HttpSink {
    inner: Arc<Inner>,
}

struct Inner {
    agent: ureq::Agent,
    url: Url,
    headers: Vec<(String, String)>,
    format: super::Format,
    batch: usize,
    batch_bytes: usize,
}

impl fmt::Debug for HttpSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSink")
            .field("endpoint", &redact_url(&self.inner.url))
            .field(
                "headers",
                &self
                    .inner
                    .headers
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("format", &self.inner.format)
            .field("batch", &self.inner.batch)
            .finish_non_exhaustive()
    }
}

impl HttpSink {
    /// The endpoint as it may be shown: user, password and query hidden.
    pub fn endpoint(&self) -> String {
        redact_url(&self.inner.url)
    }

    /// Whether requests would carry credentials in the clear: plain `http`
    /// to a host other than this machine, with a user name, a password, a
    /// query or any extra header.
    pub fn sends_credentials_in_the_clear(&self) -> bool {
        let url = &self.inner.url;
        let loopback = match url.host() {
            Some(url::Host::Domain(d)) => d == "localhost",
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            None => false,
        };
        url.scheme() == "http"
            && !loopback
            && (!url.username().is_empty()
                || url.password().is_some()
                || url.query().is_some()
                || !self.inner.headers.is_empty())
    }
}

/// The rejections a batch's 2xx answer may list.
#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    rejected: Vec<Rejected>,
}

#[derive(Deserialize)]
struct Rejected {
    id: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    permanent: bool,
}

/// How one request ended, for every event it carried.
enum Sent {
    Accepted(Answer),
    Failed(HandlerError),
    /// A 4xx other than 408, 425 and 429: the request as a whole.
    Refused(HandlerError),
}

impl Inner {
    fn request(&self, content_type: &str) -> ureq::Request {
        let mut req = self
            .agent
            .request_url("POST", &self.url)
            .set("Content-Type", content_type);
        for (k, v) in &self.headers {
            req = req.set(k, v);
        }
        req
    }

    /// Sends `body`, and reads a 2xx answer's rejections when `batch`.
    fn send(&self, req: ureq::Request, body: &str, batch: bool) -> Sent {
        match req.send_string(body) {
            Ok(resp) if (200..300).contains(&resp.status()) => {
                if !batch {
                    return Sent::Accepted(Answer {
                        rejected: Vec::new(),
                    });
                }
                match self.answer(resp) {
                    Ok(answer) => Sent::Accepted(answer),
                    Err(e) => Sent::Failed(e),
                }
            }
            Ok(resp) => {
                // With redirects off, ureq hands back every status below
                // 400: none of them is an acceptance.
                let code = resp.status();
                let location = resp
                    .header("Location")
                    .and_then(|l| self.url.join(l).ok())
                    .map(|l| redact_url(&l))
                    .unwrap_or_else(|| "nowhere".to_owned());
                Sent::Failed(HandlerError::permanent(format!(
                    "HTTP {code}, redirecting to {}: not a delivery; redirects are not \
                     followed, give the final URL",
                    crate::text::excerpt(&location, 300)
                )))
            }
            Err(ureq::Error::Status(code, resp)) => {
                let after = retry_after(resp.header("Retry-After"));
                let body = body_excerpt(resp);
                let msg = self.redact(&if body.is_empty() {
                    format!("HTTP {code}")
                } else {
                    format!("HTTP {code}: {body}")
                });
                match code {
                    // "Busy, come back later": not the event's fault, so
                    // no attempt is spent; the destination waits.
                    429 | 503 => Sent::Failed(HandlerError::busy(msg, after)),
                    408 | 425 | 500..=599 => Sent::Failed(match after {
                        Some(d) => HandlerError::retry_after(msg, d),
                        None => HandlerError::retry(msg),
                    }),
                    _ => Sent::Refused(HandlerError::permanent(msg)),
                }
            }
            Err(ureq::Error::Transport(t)) => {
                let what = t.message().map(str::to_owned).unwrap_or_default();
                let msg = self.redact(&format!(
                    "transport error ({}) at {}: {what}",
                    t.kind(),
                    redact_url(&self.url)
                ));
                Sent::Failed(if unreachable(t.kind()) {
                    HandlerError::unavailable(msg)
                } else {
                    HandlerError::retry(msg)
                })
            }
        }
    }

    /// The rejections in a batch's 2xx answer: none unless it is JSON.
    fn answer(&self, resp: ureq::Response) -> std::result::Result<Answer, HandlerError> {
        let json = resp.content_type().ends_with("json");
        let mut bytes = Vec::new();
        let read = resp
            .into_reader()
            .take(ANSWER_LIMIT + 1)
            .read_to_end(&mut bytes);
        if !json {
            return Ok(Answer {
                rejected: Vec::new(),
            });
        }
        if read.is_err() || bytes.len() as u64 > ANSWER_LIMIT {
            // It may list rejections we cannot read: accept none of it.
            return Err(HandlerError::retry(format!(
                "the endpoint's 2xx answer could not be read whole (over {} KiB or cut \
                 short), so which events it rejected is unknown",
                ANSWER_LIMIT / 1024
            )));
        }
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Answer {
                rejected: Vec::new(),
            });
        }
        serde_json::from_slice::<Answer>(&bytes).map_err(|e| {
            HandlerError::retry(format!(
                "the endpoint's 2xx answer is JSON but not {{\"rejected\": [...]}}: {}",
                crate::text::excerpt(&e.to_string(), 200)
            ))
        })
    }

    fn redact(&self, text: &str) -> String {
        redact(text, &self.url, &self.headers)
    }

    fn post_one(&self, event: &Event) -> std::result::Result<(), HandlerError> {
        let message = self.format.message(event);
        let mut req = self
            .request(message.content_type)
            .set("Idempotency-Key", &event.id.to_string());
        // Trace context, checked again: the column may have been written
        // by any program, and a header value must not carry anything else.
        if let Some(tp) = event
            .traceparent
            .as_deref()
            .filter(|t| crate::trace::is_valid_traceparent(t))
        {
            req = req.set("traceparent", tp);
        }
        // Binary-mode CloudEvents attributes, as the HTTP binding names
        // them (their values have no control characters).
        for (k, v) in &message.attributes {
            req = req.set(&format!("ce-{k}"), v);
        }
        match self.send(req, &message.body, false) {
            Sent::Accepted(_) => Ok(()),
            Sent::Failed(e) | Sent::Refused(e) => Err(e),
        }
    }

    /// Posts `events` as one array; a result per event.
    fn post_batch(&self, events: &[Event], bodies: &[String]) -> Vec<Result<(), HandlerError>> {
        let content_type = self.format.batch_content_type();
        let body = format!("[{}]", bodies.join(","));
        match self.send(self.request(content_type), &body, true) {
            Sent::Accepted(answer) => events
                .iter()
                .map(|e| {
                    let id = e.id.to_string();
                    match answer.rejected.iter().find(|r| r.id == id) {
                        None => Ok(()),
                        Some(r) => {
                            let why = format!(
                                "rejected by the endpoint: {}",
                                self.redact(&crate::text::excerpt(
                                    r.reason.as_deref().unwrap_or("no reason given"),
                                    300
                                ))
                            );
                            Err(if r.permanent {
                                HandlerError::permanent(why)
                            } else {
                                HandlerError::retry(why)
                            })
                        }
                    }
                })
                .collect(),
            Sent::Failed(e) => events.iter().map(|_| Err(e.copied())).collect(),
            Sent::Refused(e) if events.len() == 1 => vec![Err(e)],
            Sent::Refused(_) => {
                // Refused as a whole: each alone finds the one at fault.
                let mut results = Vec::with_capacity(events.len());
                let mut unreachable = None;
                for (event, body) in events.iter().zip(bodies) {
                    if let Some(e) = &unreachable {
                        results.push(Err(HandlerError::copied(e)));
                        continue;
                    }
                    let mut one =
                        self.post_batch(std::slice::from_ref(event), std::slice::from_ref(body));
                    let result = one
                        .pop()
                        .unwrap_or_else(|| Err(HandlerError::retry("no result")));
                    if let Err(e) = &result {
                        if e.is_unavailable() || e.is_busy() {
                            unreachable = Some(e.copied());
                        }
                    }
                    results.push(result);
                }
                results
            }
        }
    }
}

impl Handler for HttpSink {
    fn handle(&self, event: &Event) -> std::result::Result<(), HandlerError> {
        if self.inner.batch > 1 {
            let body = self.inner.format.message(event).body;
            let mut results = self.inner.post_batch(std::slice::from_ref(event), &[body]);
            return results
                .pop()
                .unwrap_or_else(|| Err(HandlerError::retry("no result")));
        }
        self.inner.post_one(event)
    }

    fn batch_limit(&self) -> usize {
        self.inner.batch
    }

    fn handle_batch(&self, events: &[Event]) -> BatchResult {
        let inner = &self.inner;
        let bodies: Vec<String> = events
            .iter()
            .map(|e| inner.format.message(e).body)
            .collect();
        let mut results = Vec::with_capacity(events.len());
        let mut start = 0;
        while start < events.len() {
            // As many as fit in the byte limit (at least one).
            let mut end = start + 1;
            let mut size = bodies[start].len() + 2;
            while end < events.len() && size + bodies[end].len() < inner.batch_bytes {
                size += bodies[end].len() + 1;
                end += 1;
            }
            let part = inner.post_batch(&events[start..end], &bodies[start..end]);
            // Unreachable: the rest would be too; no request is made.
            let down = part
                .iter()
                .find_map(|r| {
                    r.as_ref()
                        .err()
                        .filter(|e| e.is_unavailable() || e.is_busy())
                })
                .map(HandlerError::copied);
            results.extend(part);
            start = end;
            if let Some(e) = down {
                results.extend(events[start..].iter().map(|_| Err(e.copied())));
                break;
            }
        }
        Ok(results)
    }
}

/// `Retry-After` as seconds or an HTTP date (the library caps the delay).
fn retry_after(value: Option<&str>) -> Option<Duration> {
    let v = value?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
        .to_std()
        .ok()
}

/// The start of an error response's body, as one line.
fn body_excerpt(resp: ureq::Response) -> String {
    let mut bytes = Vec::new();
    let _ = resp
        .into_reader()
        .take(ERROR_BODY_LIMIT)
        .read_to_end(&mut bytes);
    crate::text::excerpt(&String::from_utf8_lossy(&bytes), 200)
}

/// Errors that happen before the request could reach the endpoint: no
/// name, no route, nobody listening, no proxy. The endpoint is unreachable,
/// and the event is not at fault. Anything later (a reset or a timeout
/// while the request was sent or answered) may have reached it, and counts
/// as an attempt.
fn unreachable(kind: ureq::ErrorKind) -> bool {
    matches!(
        kind,
        ureq::ErrorKind::Dns | ureq::ErrorKind::ConnectionFailed | ureq::ErrorKind::ProxyConnect
    )
}

/// `url` as it may appear in errors and logs: the user name, password and
/// query string hidden, since they often carry credentials
/// (`https://user:pw@host/hook?token=…`).
pub fn redact_url(url: &Url) -> String {
    let mut shown = url.clone();
    if !shown.username().is_empty() || shown.password().is_some() {
        // Only a URL that cannot carry credentials refuses these.
        let _ = shown.set_username("***");
        let _ = shown.set_password(None);
    }
    if shown.query().is_some() {
        shown.set_query(Some("***"));
    }
    shown.set_fragment(None);
    shown.to_string()
}

/// `text` with every credential that `url` and the request's `headers`
/// carry replaced by `***`: the whole URL, its password, user name and
/// query, and each header value (whole, and each long word of it, so that
/// an endpoint echoing `Authorization: Bearer …` in its error shows
/// neither the value nor the token).
fn redact(text: &str, url: &Url, headers: &[(String, String)]) -> String {
    let mut out = text.replace(url.as_str(), &redact_url(url));
    let mut secrets = vec![
        url.password().unwrap_or(""),
        url.query().unwrap_or(""),
        url.username(),
    ];
    for (_, value) in headers {
        secrets.push(value.trim());
        secrets.extend(value.split_whitespace().filter(|w| w.len() >= 8));
    }
    // Longest first: a value is hidden whole before its words are.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for secret in secrets.into_iter().filter(|s| s.len() >= 3) {
        out = out.replace(secret, "***");
    }
    out
}

#[cfg(test)]
mod tests;
