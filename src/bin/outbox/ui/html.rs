//! HTML for the dashboard, safe by construction: a page is an [`Html`],
//! and an `Html` is made only of literals written here and of values that
//! [`html!`] escapes on the way in. Text from the database, the URL or an
//! error has no way into a page but through that escaping; a format
//! string cannot name a variable of its own (`{name}`), so nothing slips
//! past the macro's arguments.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlite_outbox::text::format_duration;
use sqlite_outbox::Status;

/// Markup that is safe to send: literals of the program's own and escaped
/// text.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct Html(String);

impl Html {
    /// A literal of the program's own.
    pub(crate) fn lit(markup: &'static str) -> Html {
        Html(markup.to_owned())
    }

    /// `text`, escaped.
    pub(crate) fn text(text: &str) -> Html {
        let mut out = Html::default();
        out.push(text);
        out
    }

    /// Appends `part`: markup as it is, anything else escaped.
    pub(crate) fn push(&mut self, part: impl Markup) {
        use fmt::Write as _;
        let _ = write!(self.0, "{}", Esc(&part));
    }

    /// `parts` with `sep` between them.
    pub(crate) fn join(parts: impl IntoIterator<Item = Html>, sep: &'static str) -> Html {
        let mut out = Html::default();
        for (i, part) in parts.into_iter().enumerate() {
            if i > 0 {
                out.0.push_str(sep);
            }
            out.0.push_str(&part.0);
        }
        out
    }

    pub(crate) fn into_string(self) -> String {
        self.0
    }

    /// What [`html!`] formatted, its arguments already escaped. Only the
    /// macro calls this.
    #[doc(hidden)]
    pub(crate) fn from_formatted(markup: String) -> Html {
        Html(markup)
    }
}

impl fmt::Debug for Html {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl FromIterator<Html> for Html {
    fn from_iter<I: IntoIterator<Item = Html>>(iter: I) -> Html {
        Html::join(iter, "")
    }
}

/// What may go into a page: [`Html`] as it is, text escaped, numbers as
/// they are written.
pub(crate) trait Markup {
    fn fmt_markup(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result;
}

impl Markup for Html {
    fn fmt_markup(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a page never shows as it is: markup, and control characters
/// other than line breaks and tabs (a page saved or fetched into a
/// terminal must not drive it).
fn needs_escape(c: char) -> bool {
    matches!(c, '&' | '<' | '>' | '"' | '\'')
        || (c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
}

impl Markup for str {
    fn fmt_markup(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self;
        while let Some(i) = rest.find(needs_escape) {
            f.write_str(&rest[..i])?;
            let c = rest[i..].chars().next().unwrap_or('\u{FFFD}');
            f.write_str(match c {
                '&' => "&amp;",
                '<' => "&lt;",
                '>' => "&gt;",
                '"' => "&quot;",
                '\'' => "&#39;",
                _ => "\u{FFFD}",
            })?;
            rest = &rest[i + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

impl Markup for String {
    fn fmt_markup(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_str().fmt_markup(f)
    }
}

impl<T: Markup + ?Sized> Markup for &T {
    fn fmt_markup(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt_markup(f)
    }
}

/// Values whose text needs no escaping (digits, UUIDs, a status's name),
/// written as they display.
macro_rules! plain_markup {
    ($($t:ty),*) => {
        $(impl Markup for $t {
            fn fmt_markup(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        })*
    };
}
plain_markup!(u16, u32, u64, usize, i64, f64, sqlite_outbox::EventId);

/// An argument of [`html!`]: displays as its markup.
#[doc(hidden)]
pub(crate) struct Esc<'a, T: ?Sized>(pub(crate) &'a T);

impl<T: Markup + ?Sized> fmt::Display for Esc<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt_markup(f)
    }
}

/// Formats markup like `format!`, escaping every argument that is not
/// [`Html`] already: `html!("<td>{}</td>", e.event_type)`. Arguments are
/// all positional or all named; the format string cannot capture a
/// variable by name.
macro_rules! html {
    ($fmt:literal $(, $name:ident = $val:expr)+ $(,)?) => {
        $crate::ui::html::Html::from_formatted(format!(
            concat!($fmt) $(, $name = $crate::ui::html::Esc(&$val))+
        ))
    };
    ($fmt:literal $(, $val:expr)* $(,)?) => {
        $crate::ui::html::Html::from_formatted(format!(
            concat!($fmt) $(, $crate::ui::html::Esc(&$val))*
        ))
    };
}
pub(crate) use html;

/// `text` as one component of a URL's query or path.
pub(crate) fn enc(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// At most `max` characters of `text` on one line.
pub(crate) fn excerpt(text: &str, max: usize) -> Html {
    Html::text(&crate::text::excerpt(text, max))
}

/// A time as `2026-12-06 03:50:12 UTC`.
pub(crate) fn time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// A time and how far it is from `now`: `… (3m ago)` or `… (in 20s)`.
pub(crate) fn time_from(at: DateTime<Utc>, now: DateTime<Utc>) -> Html {
    let rel = match (now - at).to_std() {
        Ok(d) => format!("{} ago", format_duration(d)),
        Err(_) => format!(
            "in {}",
            format_duration((at - now).to_std().unwrap_or_default())
        ),
    };
    html!(
        "<time datetime=\"{}\" title=\"{}\">{}</time>",
        at.to_rfc3339(),
        time(at),
        rel
    )
}

/// A duration as `1h 2m`.
pub(crate) fn age(d: Duration) -> String {
    format_duration(d)
}

/// A status as a coloured badge.
pub(crate) fn badge(status: Status) -> Html {
    html!("<span class=\"badge {0}\">{0}</span>", status.as_str())
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
pub(crate) fn page(f: &Frame<'_>, notice: &Html, body: &Html) -> Html {
    let tab = |name: &str, href: &'static str, label: &'static str| {
        let current = if f.tab == name {
            Html::lit(" aria-current=\"page\"")
        } else {
            Html::default()
        };
        html!(
            "<a href=\"{}\"{}>{}</a>",
            Html::lit(href),
            current,
            Html::lit(label)
        )
    };
    html!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · outbox</title>\
         <link rel=\"stylesheet\" href=\"/assets/app.css\">\
         <script src=\"/assets/app.js\" defer></script></head>\
         <body data-refresh=\"{refresh}\"><header><strong class=\"brand\">outbox</strong>\
         <nav>{overview}{events}</nav><span class=\"db\" title=\"the outbox\">{db}</span>{mode}\
         <label class=\"live\"><input type=\"checkbox\" id=\"live\" checked> live</label>\
         <span id=\"updated\" class=\"muted\"></span></header><main>{notice}{body}</main></body></html>\n",
        title = f.title,
        refresh = f.refresh,
        overview = tab("overview", "/", "Overview"),
        events = tab("events", "/events", "Events"),
        db = f.db,
        mode = if f.read_only {
            Html::lit("<span class=\"badge readonly\">read-only</span>")
        } else {
            Html::default()
        },
        notice = notice,
        body = body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_is_escaped() {
        assert_eq!(
            Html::text("<script>alert('x')</script>&\"").into_string(),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
        let shown = "<i>x</i>";
        assert_eq!(
            html!("<b>{}</b>{}", shown, Html::lit("<br>")).into_string(),
            "<b>&lt;i&gt;x&lt;/i&gt;</b><br>"
        );
        assert_eq!(excerpt("<b>\n  bold</b>", 5).into_string(), "&lt;b&gt; b…");
        // Control characters do not reach a page, line breaks do.
        assert_eq!(
            Html::text("a\u{1b}[31mb\nc\u{7}").into_string(),
            "a\u{FFFD}[31mb\nc\u{FFFD}"
        );
        assert_eq!(enc("a b&c=d/é"), "a+b%26c%3Dd%2F%C3%A9");
    }
}
