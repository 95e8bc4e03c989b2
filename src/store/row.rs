//! Reading a stored row into an [`Event`], whatever another program (or a
//! damaged disk) put into it. Nothing here fails on a value: a row that
//! cannot be read faithfully comes back with what could be read and a
//! description of the first column that could not, so that one bad row is
//! set aside instead of stopping every claim and every listing.

use rusqlite::types::ValueRef;
use rusqlite::Row;
use uuid::Uuid;

use crate::clock;
use crate::event::{Event, Payload, Status};
use crate::id::EventId;
use crate::store::schema::COLUMNS;

// Positions in `schema::COLUMNS`.
const SEQ: usize = 0;
const ID: usize = 1;
const EVENT_TYPE: usize = 2;
const PAYLOAD: usize = 3;
const STATUS: usize = 4;
const ATTEMPTS: usize = 5;
const MAX_ATTEMPTS: usize = 6;
const NEXT_ATTEMPT_AT: usize = 7;
const LOCKED_AT: usize = 8;
const LOCKED_UNTIL: usize = 9;
const LEASE_TOKEN: usize = 10;
const COMPLETED_AT: usize = 11;
const DELIVERED_AT: usize = 12;
const LAST_ERROR: usize = 13;
const CORRELATION_ID: usize = 14;
const ORG_ID: usize = 15;
const USER_ID: usize = 16;
const ORDERING_KEY: usize = 17;
const IDEMPOTENCY_KEY: usize = 18;
const CREATED_AT: usize = 19;
const TRACEPARENT: usize = 20;
const PRIORITY: usize = 21;

/// Reads columns, noting the first that was not what the schema promises.
struct Reader<'r, 's> {
    row: &'r Row<'s>,
    problem: Option<String>,
}

impl Reader<'_, '_> {
    fn note(&mut self, column: usize, what: &str) {
        if self.problem.is_none() {
            let name = COLUMNS.split(',').map(str::trim).nth(column).unwrap_or("?");
            self.problem = Some(format!("column {name} {what}"));
        }
    }

    fn text_opt(&mut self, column: usize) -> Option<String> {
        match self.row.get_ref(column) {
            Ok(ValueRef::Null) => None,
            Ok(ValueRef::Text(bytes)) => Some(match std::str::from_utf8(bytes) {
                Ok(text) => text.to_owned(),
                Err(_) => {
                    self.note(column, "is not valid UTF-8");
                    String::from_utf8_lossy(bytes).into_owned()
                }
            }),
            Ok(ValueRef::Integer(i)) => {
                self.note(column, "holds a number where text belongs");
                Some(i.to_string())
            }
            Ok(ValueRef::Real(f)) => {
                self.note(column, "holds a number where text belongs");
                Some(f.to_string())
            }
            Ok(ValueRef::Blob(bytes)) => {
                self.note(column, "holds a blob where text belongs");
                Some(String::from_utf8_lossy(bytes).into_owned())
            }
            Err(_) => {
                self.note(column, "cannot be read");
                None
            }
        }
    }

    /// A traceparent, if the column holds a well-formed one. Anything else
    /// reads as none: trace context is a hint, and a bad one must not hold
    /// up a delivery (nor travel on in a header).
    fn traceparent(&mut self, column: usize) -> Option<String> {
        match self.row.get_ref(column) {
            Ok(ValueRef::Text(bytes)) => std::str::from_utf8(bytes)
                .ok()
                .filter(|t| crate::trace::is_valid_traceparent(t))
                .map(str::to_owned),
            _ => None,
        }
    }

    /// A priority: another program's value out of range (possible only
    /// with the schema's checks off) reads as 0, the default; an ordering
    /// hint must not hold up a delivery.
    fn priority(&mut self, column: usize) -> u8 {
        match self.row.get_ref(column) {
            Ok(ValueRef::Integer(i)) => u8::try_from(i).unwrap_or(0),
            _ => 0,
        }
    }

    fn text(&mut self, column: usize) -> String {
        self.text_opt(column).unwrap_or_else(|| {
            self.note(column, "is empty (NULL)");
            String::new()
        })
    }

    fn int_opt(&mut self, column: usize) -> Option<i64> {
        match self.row.get_ref(column) {
            Ok(ValueRef::Null) => None,
            Ok(ValueRef::Integer(i)) => Some(i),
            _ => {
                self.note(column, "is not an integer");
                None
            }
        }
    }

    fn int(&mut self, column: usize) -> i64 {
        self.int_opt(column).unwrap_or_else(|| {
            self.note(column, "is not an integer");
            0
        })
    }

    fn count(&mut self, column: usize, fallback: u32) -> u32 {
        let n = self.int(column);
        u32::try_from(n).unwrap_or_else(|_| {
            self.note(column, "is out of range");
            fallback
        })
    }

    fn uuid_opt(&mut self, column: usize) -> Option<Uuid> {
        // The common case parsed in place, without a copy of the text.
        if let Ok(ValueRef::Text(bytes)) = self.row.get_ref(column) {
            if let Ok(u) = Uuid::try_parse_ascii(bytes) {
                return Some(u);
            }
        }
        let text = self.text_opt(column)?;
        match Uuid::parse_str(&text) {
            Ok(u) => Some(u),
            Err(_) => {
                self.note(column, "is not a UUID");
                None
            }
        }
    }
}

/// Maps a row selected with `COLUMNS`, returning with it the first problem
/// found, if any: text that is not UTF-8, a payload that is not JSON, an
/// unknown status, an id that is not a UUID, a number out of range.
pub(crate) fn decode_row(row: &Row<'_>) -> rusqlite::Result<(Event, Option<String>)> {
    let mut r = Reader { row, problem: None };
    let seq = row.get::<_, i64>(SEQ)?;
    let id = match r.uuid_opt(ID) {
        Some(u) => EventId::from(u),
        None => {
            r.note(ID, "is not a UUID");
            EventId::from(Uuid::nil())
        }
    };
    let event_type = r.text(EVENT_TYPE);
    // The common case read in place, without a copy of the text first;
    // checked to be JSON, and parsed only when a handler asks.
    let payload = match row.get_ref(PAYLOAD) {
        Ok(ValueRef::Text(bytes)) => Payload::from_stored(bytes),
        _ => None,
    };
    let payload = payload.unwrap_or_else(|| {
        let text = r.text(PAYLOAD);
        match Payload::from_json(text.clone()) {
            Ok(payload) => payload,
            Err(e) => {
                r.note(PAYLOAD, &format!("is not valid JSON ({e})"));
                Payload::from(serde_json::Value::String(text))
            }
        }
    });
    let status = match row.get_ref(STATUS) {
        Ok(ValueRef::Text(bytes)) => std::str::from_utf8(bytes).ok().and_then(|t| t.parse().ok()),
        _ => None,
    };
    let status = status.unwrap_or_else(|| {
        r.text(STATUS);
        r.note(STATUS, "is not a known status");
        Status::Pending
    });
    let time = |r: &mut Reader<'_, '_>, c| r.int_opt(c).map(clock::from_millis);
    let event = Event {
        seq,
        id,
        event_type,
        payload,
        status,
        attempts: r.count(ATTEMPTS, 0),
        max_attempts: r.count(MAX_ATTEMPTS, 1),
        next_attempt_at: clock::from_millis(r.int(NEXT_ATTEMPT_AT)),
        locked_at: time(&mut r, LOCKED_AT),
        locked_until: time(&mut r, LOCKED_UNTIL),
        lease_token: r.int_opt(LEASE_TOKEN),
        completed_at: time(&mut r, COMPLETED_AT),
        delivered_at: time(&mut r, DELIVERED_AT),
        last_error: r.text_opt(LAST_ERROR),
        correlation_id: r.text_opt(CORRELATION_ID),
        org_id: r.uuid_opt(ORG_ID),
        user_id: r.uuid_opt(USER_ID),
        ordering_key: r.text_opt(ORDERING_KEY),
        idempotency_key: r.text_opt(IDEMPOTENCY_KEY),
        created_at: clock::from_millis(r.int(CREATED_AT)),
        traceparent: r.traceparent(TRACEPARENT),
        priority: r.priority(PRIORITY),
    };
    Ok((event, r.problem))
}

/// As [`decode_row`], keeping what could be read: for listings and
/// lookups, which must show a bad row rather than fail on it.
pub(crate) fn row_to_event(row: &Row<'_>) -> rusqlite::Result<Event> {
    decode_row(row).map(|(event, _)| event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_follow_the_column_list() {
        let listed: Vec<&str> = COLUMNS.split(',').map(str::trim).collect();
        assert_eq!(listed.len(), 22);
        for (position, name) in [
            (SEQ, "seq"),
            (ID, "id"),
            (EVENT_TYPE, "event_type"),
            (PAYLOAD, "payload"),
            (STATUS, "status"),
            (ATTEMPTS, "attempts"),
            (MAX_ATTEMPTS, "max_attempts"),
            (NEXT_ATTEMPT_AT, "next_attempt_at"),
            (LOCKED_AT, "locked_at"),
            (LOCKED_UNTIL, "locked_until"),
            (LEASE_TOKEN, "lease_token"),
            (COMPLETED_AT, "completed_at"),
            (DELIVERED_AT, "delivered_at"),
            (LAST_ERROR, "last_error"),
            (CORRELATION_ID, "correlation_id"),
            (ORG_ID, "org_id"),
            (USER_ID, "user_id"),
            (ORDERING_KEY, "ordering_key"),
            (IDEMPOTENCY_KEY, "idempotency_key"),
            (CREATED_AT, "created_at"),
            (TRACEPARENT, "traceparent"),
            (PRIORITY, "priority"),
        ] {
            assert_eq!(listed[position], name);
        }
    }
}
