//! Commands that change events: `enqueue`, `requeue`, `cancel`, `purge`,
//! `erase`.

use std::time::Duration;

use serde_json::json;
use sqlite_outbox::text::event_json;
use sqlite_outbox::{NewEvent, Requeue, Subject};
use uuid::Uuid;

use crate::db::Db;
use crate::output::{output, parse_id, read_payload};
use crate::{describe, EnqueueArgs, Failure};

pub(crate) fn enqueue(db: &Db, json_mode: bool, a: &EnqueueArgs) -> Result<(), Failure> {
    let fail = |e: sqlite_outbox::Error| db.fail(&e);
    let text = read_payload(&a.payload)?;
    let mut event = NewEvent::from_json(a.event_type.clone(), &text)
        .map_err(|e| Failure::usage(describe(&e)))?;
    if let Some(k) = &a.ordering_key {
        event = event.with_ordering_key(k);
    }
    if let Some(k) = &a.idempotency_key {
        event = event.with_idempotency_key(k);
    }
    if let Some(d) = a.delay {
        event = event.with_delay(d);
    }
    if let Some(o) = a.org {
        event = event.with_org_id(o);
    }
    if let Some(u) = a.user {
        event = event.with_user_id(u);
    }
    if let Some(t) = &a.traceparent {
        event = event.with_traceparent(t);
    }
    if let Some(c) = &a.correlation_id {
        event = event.with_correlation_id(c);
    }
    event = event.with_priority(a.priority);
    if let Some(n) = a.max_attempts {
        event = event.with_max_attempts(n);
    }
    let store = db.open_or_create()?;
    let stored = store.enqueue(event).map_err(&fail)?;
    output(json_mode, event_json(&stored), || stored.id.to_string())
}

pub(crate) fn requeue(
    db: &Db,
    json_mode: bool,
    id: Option<&str>,
    failed_ones: bool,
    event_type: Option<&str>,
) -> Result<(), Failure> {
    let fail = |e: sqlite_outbox::Error| db.fail(&e);
    let which = match (id, failed_ones) {
        (Some(id), false) => Requeue::One(parse_id(id)?),
        (None, true) => match event_type {
            Some(t) => Requeue::Type(t.to_owned()),
            None => Requeue::All,
        },
        _ => return Err(Failure::usage("give either an event ID or --failed")),
    };
    let n = db.open_write()?.requeue(which).map_err(&fail)?;
    output(json_mode, json!({"requeued": n}), || {
        format!("requeued {n} event(s)")
    })
}

pub(crate) fn cancel(db: &Db, json_mode: bool, id: &str, reason: &str) -> Result<(), Failure> {
    let id = parse_id(id)?;
    db.open_write()?
        .cancel(id, reason)
        .map_err(|e| Failure(format!("{}: {}", db, describe(&e)), 1))?;
    output(json_mode, json!({"cancelled": id}), || {
        format!("event {id} cancelled: it is failed now")
    })
}

pub(crate) fn purge(db: &Db, json_mode: bool, older_than: Duration) -> Result<(), Failure> {
    let fail = |e: sqlite_outbox::Error| db.fail(&e);
    let store = db.open_write()?;
    let cutoff = chrono::Duration::from_std(older_than)
        .ok()
        .and_then(|d| sqlite_outbox::Clock::now(&sqlite_outbox::SystemClock).checked_sub_signed(d))
        .ok_or_else(|| Failure::usage("--older-than is too large"))?;
    let n = store.purge(cutoff).map_err(&fail)?;
    output(json_mode, json!({"deleted": n}), || {
        format!(
            "deleted {n} done or failed event(s) created before {}",
            cutoff.format("%Y-%m-%d %H:%M:%S UTC")
        )
    })
}

pub(crate) fn erase(
    db: &Db,
    json_mode: bool,
    org: Option<Uuid>,
    user: Option<Uuid>,
) -> Result<(), Failure> {
    let fail = |e: sqlite_outbox::Error| db.fail(&e);
    let store = db.open_write()?;
    let (n, whose) = match (org, user) {
        (Some(o), _) => (
            store.erase(Subject::Org(o)).map_err(&fail)?,
            format!("organisation {o}"),
        ),
        (None, Some(u)) => (
            store.erase(Subject::User(u)).map_err(&fail)?,
            format!("user {u}"),
        ),
        (None, None) => return Err(Failure::usage("give --org or --user")),
    };
    output(json_mode, json!({"deleted": n}), || {
        format!("deleted {n} event(s) of {whose}")
    })
}
