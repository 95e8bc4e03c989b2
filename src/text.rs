//! Text for people and programs, shared by the `outbox` command-line tool
//! and Rust callers: durations as people write them, the stable JSON
//! shapes of events and stats, and safe excerpts of untrusted text.

use std::time::Duration;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::event::Event;
use crate::store::Stats;

/// Parses a duration such as `30d`, `12h`, `15m`, `90s`, `250ms`, or a
/// plain number of seconds.
///
/// ```
/// use sqlite_outbox::text::parse_duration;
/// use std::time::Duration;
///
/// assert_eq!(parse_duration("30d")?, Duration::from_secs(30 * 86_400));
/// assert_eq!(parse_duration("250ms")?, Duration::from_millis(250));
/// assert!(parse_duration("soon").is_err());
/// # Ok::<(), sqlite_outbox::Error>(())
/// ```
///
/// # Errors
///
/// [`crate::ErrorKind::InvalidInput`] for anything else, or a value too
/// large to represent.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let bad = || {
        Error::invalid(format!(
            "{text:?} is not a duration (use e.g. 30d, 12h, 15m, 90s, 250ms)"
        ))
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 7 * 86_400_000,
        _ => return Err(bad()),
    };
    n.checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(bad)
}

/// A duration for people: `2h 5m`, `3.2s`, `15ms`.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 86_400 {
        format!("{}d {}h", secs / 86_400, (secs % 86_400) / 3_600)
    } else if secs >= 3_600 {
        format!("{}h {}m", secs / 3_600, (secs % 3_600) / 60)
    } else if secs >= 60 {
        format!("{}m {}s", secs / 60, secs % 60)
    } else if secs >= 1 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The JSON shape of an event, as the CLI prints it: the serde form of
/// [`Event`] (every stored field but the lease token, `type` for the event
/// type, times in RFC 3339). The relay posts a documented subset of it.
pub fn event_json(event: &Event) -> Value {
    serde_json::to_value(event).unwrap_or(Value::Null)
}

/// At most `max` characters of `text` (a response body, an error from
/// elsewhere) on one line: whitespace runs become one space, control
/// characters are written as escapes such as `\u{1b}` (so the text cannot
/// drive a terminal that shows it), and a cut is marked with `…`.
pub fn excerpt(text: &str, max: usize) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out = String::with_capacity(one_line.len().min(max.saturating_mul(2)));
    for c in one_line.chars().take(max) {
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    if one_line.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

/// The JSON shape of [`Stats`]: its serde form, plus `total`.
pub fn stats_json(stats: &Stats) -> Value {
    let mut value = serde_json::to_value(stats).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut value {
        map.insert("total".into(), json!(stats.total()));
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `admin`, the old name, still reaches the same functions.
    #[test]
    #[allow(deprecated)]
    fn the_old_module_name_still_works() -> Result<()> {
        assert_eq!(crate::admin::parse_duration("90s")?, parse_duration("90s")?);
        Ok(())
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
    fn durations_parse_and_reject() -> Result<()> {
        assert_eq!(parse_duration("90")?, Duration::from_secs(90));
        assert_eq!(parse_duration("2w")?, Duration::from_secs(14 * 86_400));
        assert_eq!(parse_duration("15m")?, Duration::from_secs(900));
        for bad in ["", "-1s", "1.5h", "10 years", "99999999999999999999d", "h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        Ok(())
    }

    #[test]
    fn one_json_shape_per_thing() -> Result<()> {
        let e = crate::NewEvent::new("t", json!({"a": 1})).into_pending(
            7,
            crate::clock::from_millis(1_700_000_000_000),
            &crate::RetryPolicy::default(),
        );
        let v = event_json(&e);
        assert_eq!(v, serde_json::to_value(&e)?);
        assert_eq!(v["type"], json!("t"));
        assert!(v.get("event_type").is_none() && v.get("lease_token").is_none());
        assert_eq!(v["created_at"], json!("2023-11-14T22:13:20Z"));
        let s = stats_json(&Stats::default());
        assert!(s.get("oldest_due_age_ms").is_some() && s.get("oldest_due_age").is_none());
        assert_eq!(s["total"], json!(0));
        Ok(())
    }

    #[test]
    fn durations_format() {
        assert_eq!(format_duration(Duration::from_secs(90_000)), "1d 1h");
        assert_eq!(format_duration(Duration::from_secs(125)), "2m 5s");
        assert_eq!(format_duration(Duration::from_millis(15)), "15ms");
    }
}
