//! `outbox relay --http`: POST each event as JSON. Only a 2xx answer is a
//! delivery; redirects are not followed (a redirected POST becomes a GET
//! elsewhere, and would carry the headers to another host).

use std::io::Read;
use std::time::Duration;

use sqlite_outbox::{Event, HandlerError};
use url::Url;

use crate::text::{excerpt, redact, redact_url};

/// How much of an error response is read for the event's last error.
const BODY_LIMIT: u64 = 64 * 1024;

/// Checks `--http` before anything is delivered: an absolute `http` or
/// `https` URL with a host.
pub(crate) fn parse_endpoint(text: &str) -> Result<Url, String> {
    let url = Url::parse(text)
        .map_err(|e| format!("--http {:?}: {e}", crate::text::terminal_safe(text)))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "--http {}: the scheme must be http or https",
            redact_url(&url)
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("--http {}: no host", redact_url(&url)));
    }
    Ok(url)
}

/// Whether requests to `url` with `headers` would send credentials in the
/// clear: plain `http` to a host other than this machine, with a user
/// name, a password, a query or any extra header.
pub(crate) fn sends_credentials_in_the_clear(url: &Url, headers: &[(String, String)]) -> bool {
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
            || !headers.is_empty())
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

/// The start of a response body, as one safe line.
fn body_excerpt(resp: ureq::Response) -> String {
    let mut bytes = Vec::new();
    let _ = resp.into_reader().take(BODY_LIMIT).read_to_end(&mut bytes);
    excerpt(&String::from_utf8_lossy(&bytes), 200)
}

pub(crate) fn handler(
    url: Url,
    headers: Vec<(String, String)>,
    timeout: Duration,
    format: sqlite_outbox::sink::Format,
) -> impl Fn(&Event) -> Result<(), HandlerError> {
    let agent = ureq::AgentBuilder::new()
        .timeout(timeout)
        .redirects(0)
        .build();
    move |event: &Event| {
        let message = format.message(event);
        let mut req = agent
            .request_url("POST", &url)
            .set("Content-Type", message.content_type)
            .set("Idempotency-Key", &event.id.to_string());
        // Trace context, checked again: the column may have been written
        // by any program, and a header value must not carry anything else.
        if let Some(tp) = event
            .traceparent
            .as_deref()
            .filter(|t| sqlite_outbox::trace::is_valid_traceparent(t))
        {
            req = req.set("traceparent", tp);
        }
        // Binary-mode CloudEvents attributes, as the HTTP binding names
        // them (their values have no control characters).
        for (k, v) in &message.attributes {
            req = req.set(&format!("ce-{k}"), v);
        }
        for (k, v) in &headers {
            req = req.set(k, v);
        }
        match req.send_string(&message.body) {
            Ok(resp) if (200..300).contains(&resp.status()) => Ok(()),
            Ok(resp) => {
                // With redirects off, ureq hands back every status below
                // 400: none of them is an acceptance.
                let code = resp.status();
                let location = resp
                    .header("Location")
                    .and_then(|l| url.join(l).ok())
                    .map(|l| redact_url(&l))
                    .unwrap_or_else(|| "nowhere".to_owned());
                Err(HandlerError::permanent(format!(
                    "HTTP {code}, redirecting to {}: not a delivery; the relay does not \
                     follow redirects, point --http at the final URL",
                    excerpt(&location, 300)
                )))
            }
            Err(ureq::Error::Status(code, resp)) => {
                let after = retry_after(resp.header("Retry-After"));
                let msg = redact(
                    &format!("HTTP {code}: {}", body_excerpt(resp)),
                    &url,
                    &headers,
                );
                match code {
                    408 | 425 | 429 | 500..=599 => Err(match after {
                        Some(d) => HandlerError::retry_after(msg, d),
                        None => HandlerError::retry(msg),
                    }),
                    _ => Err(HandlerError::permanent(msg)),
                }
            }
            Err(ureq::Error::Transport(t)) => {
                let what = t.message().map(str::to_owned).unwrap_or_default();
                let msg = redact(
                    &format!(
                        "transport error ({}) at {}: {what}",
                        t.kind(),
                        redact_url(&url)
                    ),
                    &url,
                    &headers,
                );
                Err(if unreachable(t.kind()) {
                    HandlerError::unavailable(msg)
                } else {
                    HandlerError::retry(msg)
                })
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked_before_delivery() {
        for bad in [
            "",
            "not a url",
            "ftp://example.com/x",
            "http://",
            "/relative",
            "mailto:a@b",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad:?}");
        }
        assert!(parse_endpoint("https://api.example.com/events").is_ok());
    }

    #[test]
    fn plain_http_with_credentials_is_noticed() -> Result<(), url::ParseError> {
        let h = vec![("Authorization".to_owned(), "Bearer x".to_owned())];
        let remote = Url::parse("http://api.example.com/x")?;
        assert!(sends_credentials_in_the_clear(&remote, &h));
        assert!(!sends_credentials_in_the_clear(&remote, &[]));
        assert!(sends_credentials_in_the_clear(
            &Url::parse("http://u:p@api.example.com/")?,
            &[]
        ));
        assert!(!sends_credentials_in_the_clear(
            &Url::parse("https://api.example.com/")?,
            &h
        ));
        assert!(!sends_credentials_in_the_clear(
            &Url::parse("http://127.0.0.1:8080/")?,
            &h
        ));
        assert!(!sends_credentials_in_the_clear(
            &Url::parse("http://localhost/")?,
            &h
        ));
        Ok(())
    }

    #[test]
    fn retry_after_takes_seconds_and_dates_and_never_panics() {
        assert_eq!(retry_after(Some("120")), Some(Duration::from_secs(120)));
        assert_eq!(
            retry_after(Some("18446744073709551615")),
            Some(Duration::from_secs(u64::MAX))
        );
        assert_eq!(retry_after(Some("soon")), None);
        assert_eq!(retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT")), None);
        assert_eq!(retry_after(None), None);
    }
}
