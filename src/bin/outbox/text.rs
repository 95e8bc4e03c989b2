//! Text that did not come from the operator, made safe to print and store:
//! control characters escaped, long bodies cut.

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
}
