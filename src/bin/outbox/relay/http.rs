//! `outbox relay --http`: the library's [`HttpSink`], from the operator's
//! arguments.

use std::time::Duration;

use sqlite_outbox::sink::{Format, HttpSink};

use crate::describe;

/// The sink for `--http URL` with these headers: the URL checked before
/// anything is delivered, a warning when credentials would cross the
/// network in the clear.
pub(crate) fn sink(
    url: &str,
    headers: Vec<(String, String)>,
    timeout: Duration,
    format: Format,
    batch: (usize, usize),
) -> Result<HttpSink, String> {
    let shown = || crate::text::terminal_safe(url).into_owned();
    let fail = |e: sqlite_outbox::Error| format!("--http: {}", describe(&e));
    let mut builder = HttpSink::builder(url)
        .map_err(|e| match url::Url::parse(url) {
            // The parser's own words name the text, which is not shown.
            Err(_) => format!("--http {:?}: {}", shown(), describe(&e)),
            Ok(_) => fail(e),
        })?
        .timeout(timeout)
        .format(format)
        .batch(batch.0)
        .batch_bytes(batch.1);
    for (name, value) in headers {
        builder = builder.header(name, value).map_err(fail)?;
    }
    let sink = builder.build().map_err(fail)?;
    if sink.sends_credentials_in_the_clear() {
        tracing::warn!(
            "credentials (a user, a query or extra headers) will go over plain http to {}",
            sink.endpoint()
        );
    }
    Ok(sink)
}
