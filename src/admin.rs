//! Helpers for operating an outbox, shared by the `outbox` command-line tool
//! and Rust callers: human durations and the stable JSON shapes.

use std::time::Duration;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::event::Event;
use crate::store::Stats;

/// Parses a duration such as `30d`, `12h`, `15m`, `90s`, `250ms`, or a
/// plain number of seconds.
///
/// ```
/// use sqlite_outbox::admin::parse_duration;
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

/// The stable JSON shape of an event, as the CLI prints it and the relay
/// posts it: every stored field, times in RFC 3339.
pub fn event_json(event: &Event) -> Value {
    json!({
        "id": event.id,
        "seq": event.seq,
        "type": event.event_type,
        "payload": event.payload,
        "status": event.status,
        "attempts": event.attempts,
        "max_attempts": event.max_attempts,
        "next_attempt_at": event.next_attempt_at,
        "locked_at": event.locked_at,
        "locked_until": event.locked_until,
        "completed_at": event.completed_at,
        "delivered_at": event.delivered_at,
        "last_error": event.last_error,
        "correlation_id": event.correlation_id,
        "org_id": event.org_id,
        "user_id": event.user_id,
        "ordering_key": event.ordering_key,
        "idempotency_key": event.idempotency_key,
        "created_at": event.created_at,
    })
}

/// The stable JSON shape of [`Stats`].
pub fn stats_json(stats: &Stats) -> Value {
    json!({
        "pending": stats.pending,
        "due": stats.due,
        "processing": stats.processing,
        "done": stats.done,
        "failed": stats.failed,
        "total": stats.total(),
        "oldest_due_age_ms": stats.oldest_due_age.map(|d| d.as_millis() as u64),
        "by_type": stats.by_type.iter().map(|t| json!({
            "type": t.event_type,
            "pending": t.pending,
            "due": t.due,
            "processing": t.processing,
            "done": t.done,
            "failed": t.failed,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn durations_format() {
        assert_eq!(format_duration(Duration::from_secs(90_000)), "1d 1h");
        assert_eq!(format_duration(Duration::from_secs(125)), "2m 5s");
        assert_eq!(format_duration(Duration::from_millis(15)), "15ms");
    }
}
