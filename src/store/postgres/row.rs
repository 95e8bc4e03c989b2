//! Reading an event row on PostgreSQL.

use super::*;

/// Reads a row selected with `sql::COLUMNS`, with the first problem found:
/// the server has checked types, JSON and statuses, so what is left is a
/// number beyond what an event holds.
pub(super) fn decode(row: &Row) -> (Event, Option<String>) {
    let mut problem: Option<String> = None;
    // A column that does not read as the schema says (a table altered by
    // hand) is noted and given a fallback, never a panic.
    macro_rules! get {
        ($i:expr, $name:expr, $fallback:expr) => {
            match row.try_get($i) {
                Ok(v) => v,
                Err(_) => {
                    problem.get_or_insert_with(|| format!("column {} cannot be read", $name));
                    $fallback
                }
            }
        };
    }
    let payload_text: String = get!(3, "payload", String::new());
    let payload = match Payload::from_stored(payload_text.as_bytes()) {
        Some(p) => p,
        None => {
            problem.get_or_insert_with(|| "column payload is not valid JSON".into());
            Payload::from(serde_json::Value::String(payload_text))
        }
    };
    let status: String = get!(4, "status", String::new());
    let status = status.parse().unwrap_or_else(|_| {
        problem.get_or_insert_with(|| "column status is not a known status".into());
        Status::Pending
    });
    let mut count = |i, name: &str, fallback: u32| {
        let n: i64 = get!(i, name, i64::from(fallback));
        u32::try_from(n).unwrap_or_else(|_| {
            problem.get_or_insert_with(|| format!("column {name} is out of range"));
            fallback
        })
    };
    let (attempts, max_attempts) = (count(5, "attempts", 0), count(6, "max_attempts", 1));
    let mut time = |i, name: &str| get!(i, name, None::<i64>).map(clock::from_millis);
    let (locked_at, locked_until) = (time(8, "locked_at"), time(9, "locked_until"));
    let (completed_at, delivered_at) = (time(11, "completed_at"), time(12, "delivered_at"));
    let event = Event {
        seq: get!(0, "seq", 0),
        id: EventId::from(get!(1, "id", uuid::Uuid::nil())),
        event_type: get!(2, "event_type", String::new()),
        payload,
        status,
        attempts,
        max_attempts,
        next_attempt_at: clock::from_millis(get!(7, "next_attempt_at", 0)),
        locked_at,
        locked_until,
        lease_token: get!(10, "lease_token", None),
        completed_at,
        delivered_at,
        last_error: get!(13, "last_error", None),
        correlation_id: get!(14, "correlation_id", None),
        org_id: get!(15, "org_id", None),
        user_id: get!(16, "user_id", None),
        ordering_key: get!(17, "ordering_key", None),
        idempotency_key: get!(18, "idempotency_key", None),
        created_at: clock::from_millis(get!(19, "created_at", 0)),
        // A hint only: a malformed one reads as none, and is never sent on.
        traceparent: row
            .try_get::<_, Option<String>>(20)
            .ok()
            .flatten()
            .filter(|t| crate::trace::is_valid_traceparent(t)),
        // A hint too: out of range (checks off) reads as 0, the default.
        priority: row
            .try_get::<_, i16>(21)
            .ok()
            .and_then(|p| u8::try_from(p).ok())
            .unwrap_or(0),
    };
    (event, problem)
}
