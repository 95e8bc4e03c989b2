//! Text that did not come from the operator, made safe to print and store:
//! control characters escaped, long bodies cut, credentials hidden.

use std::borrow::Cow;

/// `text` with every control character (C0, DEL and C1) written as an
/// escape such as `\u{1b}`, so that a payload, an event type, an error or an
/// endpoint's response cannot move the cursor, recolour, retitle or
/// otherwise drive the operator's terminal. Tabs and newlines are escaped
/// too: one value stays on one line of a table.
pub(crate) fn terminal_safe(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut safe = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            safe.extend(c.escape_unicode());
        } else {
            safe.push(c);
        }
    }
    Cow::Owned(safe)
}

/// One line of at most `max` characters of `body`: whitespace runs become
/// one space and control characters are escaped.
pub(crate) fn excerpt(body: &str, max: usize) -> String {
    let one_line = body.split_whitespace().collect::<Vec<_>>().join(" ");
    let cut: String = one_line.chars().take(max).collect();
    let mut shown = terminal_safe(&cut).into_owned();
    if one_line.chars().count() > max {
        shown.push('…');
    }
    shown
}

/// `url` as it may appear in errors and logs: the user name, password and
/// query string hidden, since they often carry credentials
/// (`https://user:pw@host/hook?token=…`).
pub(crate) fn redact_url(url: &url::Url) -> String {
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
pub(crate) fn redact(text: &str, url: &url::Url, headers: &[(String, String)]) -> String {
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
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(terminal_safe("plain"), "plain");
        assert_eq!(
            terminal_safe("a\u{1b}]0;pwned\u{7}b\u{9b}31m\r\n"),
            "a\\u{1b}]0;pwned\\u{7}b\\u{9b}31m\\u{d}\\u{a}"
        );
    }

    #[test]
    fn excerpts_are_one_short_safe_line() {
        assert_eq!(excerpt("a\n\n  b\tc", 10), "a b c");
        assert_eq!(excerpt("abcdef", 3), "abc…");
        // Exactly the limit is whole.
        assert_eq!(excerpt("abc", 3), "abc");
        assert_eq!(excerpt("\u{1b}[2J", 10), "\\u{1b}[2J");
    }

    #[test]
    fn credentials_in_urls_are_hidden() -> Result<(), url::ParseError> {
        let url = url::Url::parse("https://ada:s3cret@api.example.com/hook?token=abc123#x")?;
        assert_eq!(redact_url(&url), "https://***@api.example.com/hook?***");
        // A user name alone (a token in the user part) is hidden too.
        let user_only = url::Url::parse("https://tok3n@api.example.com/hook")?;
        assert_eq!(redact_url(&user_only), "https://***@api.example.com/hook");
        let message = format!("connection refused: {url} (token=abc123, pw s3cret)");
        let shown = redact(&message, &url, &[]);
        for secret in ["s3cret", "abc123", "ada"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        // Header values, echoed whole or in part.
        let headers = [
            (
                "Authorization".to_owned(),
                "Bearer tok-0123456789".to_owned(),
            ),
            ("X-Api-Key".to_owned(), "k3y-value".to_owned()),
        ];
        let echoed = "HTTP 401: got authorization=Bearer tok-0123456789, token tok-0123456789, key k3y-value";
        let shown = redact(echoed, &url, &headers);
        for secret in ["tok-0123456789", "k3y-value"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        Ok(())
    }
}
