//! HTML for the dashboard: escaping, the page frame and small pieces.
//! Everything that came from the database goes through [`esc`].

use std::fmt::Write as _;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlite_outbox::text::format_duration;
use sqlite_outbox::Status;

/// `text` safe to put between tags and inside double-quoted attributes.
pub(crate) fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `text` as one component of a URL's query or path.
pub(crate) fn enc(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// At most `max` characters of `text` on one line, escaped.
pub(crate) fn excerpt(text: &str, max: usize) -> String {
    esc(&crate::text::excerpt(text, max))
}

/// A time as `2026-12-06 03:50:12 UTC`.
pub(crate) fn time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// A time and how far it is from `now`: `… (3m ago)` or `… (in 20s)`.
pub(crate) fn time_from(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let rel = match (now - at).to_std() {
        Ok(d) => format!("{} ago", format_duration(d)),
        Err(_) => format!(
            "in {}",
            format_duration((at - now).to_std().unwrap_or_default())
        ),
    };
    format!(
        "<time datetime=\"{}\" title=\"{}\">{}</time>",
        at.to_rfc3339(),
        time(at),
        esc(&rel)
    )
}

/// A duration as `1h 2m`.
pub(crate) fn age(d: Duration) -> String {
    esc(&format_duration(d))
}

/// A status as a coloured badge.
pub(crate) fn badge(status: Status) -> String {
    format!("<span class=\"badge {s}\">{s}</span>", s = status.as_str())
}

/// What the page frame needs to know.
pub(crate) struct Frame<'a> {
    pub(crate) title: &'a str,
    /// Which tab is current: "overview" or "events".
    pub(crate) tab: &'a str,
    pub(crate) db: &'a str,
    pub(crate) read_only: bool,
    /// Seconds between live refreshes; 0 for none.
    pub(crate) refresh: u64,
}

/// A whole page around `body`. The part inside `data-live` is what the
/// page's script replaces on each refresh.
pub(crate) fn page(f: &Frame<'_>, notice: &str, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 2048);
    let tab = |name: &str, href: &str, label: &str| {
        let current = if f.tab == name {
            " aria-current=\"page\""
        } else {
            ""
        };
        format!("<a href=\"{href}\"{current}>{label}</a>")
    };
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · outbox</title>\
         <link rel=\"stylesheet\" href=\"/assets/app.css\">\
         <script src=\"/assets/app.js\" defer></script></head>\
         <body data-refresh=\"{refresh}\"><header><strong class=\"brand\">outbox</strong>\
         <nav>{overview}{events}</nav><span class=\"db\" title=\"the outbox\">{db}</span>{mode}\
         <label class=\"live\"><input type=\"checkbox\" id=\"live\" checked> live</label>\
         <span id=\"updated\" class=\"muted\"></span></header><main>{notice}{body}</main></body></html>\n",
        title = esc(f.title),
        refresh = f.refresh,
        overview = tab("overview", "/", "Overview"),
        events = tab("events", "/events", "Events"),
        db = esc(f.db),
        mode = if f.read_only {
            "<span class=\"badge readonly\">read-only</span>"
        } else {
            ""
        },
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_is_escaped() {
        assert_eq!(
            esc("<script>alert('x')</script>&\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
        assert_eq!(excerpt("<b>\n  bold</b>", 5), "&lt;b&gt; b…");
        assert_eq!(enc("a b&c=d/é"), "a+b%26c%3Dd%2F%C3%A9");
    }
}
