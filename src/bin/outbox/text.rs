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

/// One line of at most `max` characters: the library's excerpt.
pub(crate) use sqlite_outbox::text::excerpt;

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
}
