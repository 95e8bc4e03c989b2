//! Commands that look: `stats`, `list`, `show`.

use std::fmt::Write as _;

use serde_json::Value;
use sqlite_outbox::text::{event_json, format_duration, stats_json};
use sqlite_outbox::{Event, ListFilter, Why};

use crate::db::Db;
use crate::output::{output, parse_id, table};
use crate::{text, Failure, ListArgs};

pub(crate) fn stats(db: &Db, json_mode: bool, prometheus: bool) -> Result<(), Failure> {
    let fail = |e: sqlite_outbox::Error| db.fail(&e);
    let stats = db.open_read()?.stats().map_err(&fail)?;
    if prometheus {
        print!("{}", crate::prometheus::render(&stats));
        return Ok(());
    }
    output(json_mode, stats_json(&stats), || {
        let mut t = String::new();
        let behind = if stats.behind_key > 0 {
            format!(", {} of them behind their ordering key", stats.behind_key)
        } else {
            String::new()
        };
        let _ = writeln!(
            t,
            "pending {}  (due {}{behind})  processing {}  done {}  failed {}",
            stats.pending, stats.due, stats.processing, stats.done, stats.failed
        );
        if !stats.by_priority.is_empty() {
            let urgent: Vec<String> = stats
                .by_priority
                .iter()
                .map(|p| format!("{} at priority {} ({} due)", p.pending, p.priority, p.due))
                .collect();
            let _ = writeln!(t, "raised priority: {}", urgent.join(", "));
        }
        let _ = writeln!(
            t,
            "oldest due event waiting: {}",
            stats
                .oldest_due_age
                .map(format_duration)
                .unwrap_or_else(|| "-".into())
        );
        if !stats.by_type.is_empty() {
            let rows = stats
                .by_type
                .iter()
                .map(|s| {
                    vec![
                        text::terminal_safe(&s.event_type).into_owned(),
                        s.pending.to_string(),
                        s.processing.to_string(),
                        s.done.to_string(),
                        s.failed.to_string(),
                    ]
                })
                .collect();
            t.push_str(&table(
                &["TYPE", "PENDING", "PROCESSING", "DONE", "FAILED"],
                rows,
            ));
        }
        if !stats.destinations.is_empty() {
            let now = chrono::Utc::now();
            let ago = |at: chrono::DateTime<chrono::Utc>| {
                format_duration((now - at).to_std().unwrap_or_default())
            };
            let rows = stats
                .destinations
                .iter()
                .map(|d| {
                    vec![
                        text::terminal_safe(&d.name).into_owned(),
                        d.hold.as_str().to_owned(),
                        format!("{} ago", ago(d.since)),
                        d.next_probe_at
                            .map(|p| match (p - now).to_std() {
                                Ok(wait) => format!("in {}", format_duration(wait)),
                                Err(_) => format!("{} overdue", ago(p)),
                            })
                            .unwrap_or_else(|| "-".into()),
                        text::terminal_safe(&text::excerpt(
                            d.last_error.as_deref().unwrap_or("-"),
                            60,
                        ))
                        .into_owned(),
                    ]
                })
                .collect();
            t.push_str("\nheld back by a dispatcher:\n");
            t.push_str(&table(
                &["DESTINATION", "HOLD", "SINCE", "NEXT PROBE", "LAST ERROR"],
                rows,
            ));
        }
        if !stats.limits.is_empty() {
            t.push_str("\nlimits dispatchers keep:\n");
            t.push_str(&limits_table(&stats.limits));
        }
        t.trim_end().to_owned()
    })
}

/// The limits of `stats`, one row each: what they allow, the events in
/// flight against a concurrency limit, and since when events wait.
fn limits_table(limits: &[sqlite_outbox::LimitState]) -> String {
    let now = chrono::Utc::now();
    let rows = limits
        .iter()
        .map(|l| {
            let allows = match l.kind {
                sqlite_outbox::LimitKind::Concurrency(max) => format!("{max} at once"),
                sqlite_outbox::LimitKind::Rate { max, per } => {
                    format!("{max} per {}", format_duration(per))
                }
            };
            vec![
                l.scope.as_str().to_owned(),
                text::terminal_safe(&l.name).into_owned(),
                allows,
                l.in_flight
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "-".into()),
                if l.shared { "all" } else { "each" }.to_owned(),
                l.limited_since
                    .map(|t| {
                        format!(
                            "waiting for {}",
                            format_duration((now - t).to_std().unwrap_or_default())
                        )
                    })
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &[
            "SCOPE",
            "NAME",
            "ALLOWS",
            "IN FLIGHT",
            "DISPATCHERS",
            "EVENTS",
        ],
        rows,
    )
}

pub(crate) fn list(db: &Db, json_mode: bool, a: &ListArgs) -> Result<(), Failure> {
    let fail = |e: sqlite_outbox::Error| db.fail(&e);
    let filter = ListFilter {
        status: a.status,
        org_id: a.org,
        user_id: a.user,
        correlation_id: a.correlation_id.clone(),
        ordering_key: a.ordering_key.clone(),
        error_contains: a.error.clone(),
        limit: a.limit,
        newest_first: a.newest,
        after_seq: a.after,
        ..ListFilter::default()
    };
    let store = db.open_read()?;
    // Several types: one list each, merged in the list's order.
    let mut events = Vec::new();
    if a.event_type.is_empty() {
        events = store.list(&filter).map_err(&fail)?;
    } else {
        for t in &a.event_type {
            let one = ListFilter {
                event_type: Some(t.clone()),
                ..filter.clone()
            };
            events.extend(store.list(&one).map_err(&fail)?);
        }
        events.sort_by_key(|e| e.seq);
        if a.newest {
            events.reverse();
        }
        events.truncate(a.limit);
    }
    let mut whys = Vec::with_capacity(events.len());
    if a.why || a.reason.is_some() {
        for e in &events {
            whys.push(Some(store.why(e).map_err(&fail)?));
        }
    } else {
        whys.resize(events.len(), None);
    }
    let (events, whys): (Vec<Event>, Vec<Option<Why>>) = events
        .into_iter()
        .zip(whys)
        .filter(|(_, w)| {
            a.reason
                .as_deref()
                .is_none_or(|r| w.as_ref().is_some_and(|w| w.kind() == r))
        })
        .unzip();
    let json = events
        .iter()
        .zip(&whys)
        .map(|(e, w)| {
            let mut v = event_json(e);
            if let (Value::Object(map), Some(w)) = (&mut v, w) {
                map.insert("why".into(), why_json(w));
            }
            v
        })
        .collect::<Vec<_>>();
    output(json_mode, Value::from(json), || {
        let rows = events
            .iter()
            .zip(&whys)
            .map(|(e, w)| {
                let mut row = vec![
                    e.id.to_string(),
                    text::terminal_safe(&e.event_type).into_owned(),
                    e.status.to_string(),
                    format!("{}/{}", e.attempts, e.max_attempts),
                    e.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                    text::excerpt(e.last_error.as_deref().unwrap_or_default(), 60),
                ];
                if let Some(w) = w {
                    row.push(text::excerpt(&w.to_string(), 120));
                }
                row
            })
            .collect();
        let mut head = vec![
            "ID",
            "TYPE",
            "STATUS",
            "ATTEMPTS",
            "CREATED (UTC)",
            "LAST ERROR",
        ];
        if a.why || a.reason.is_some() {
            head.push("WHY");
        }
        let mut t = table(&head, rows).trim_end().to_owned();
        if a.why {
            let mut counts: Vec<(&str, usize)> = Vec::new();
            for w in whys.iter().flatten() {
                match counts.iter_mut().find(|(k, _)| *k == w.kind()) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((w.kind(), 1)),
                }
            }
            let summary: Vec<String> = counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
            if !summary.is_empty() {
                t.push_str(&format!("\n\nby reason: {}", summary.join(", ")));
            }
        }
        t
    })
}

/// A reason as JSON: its fields, `reason` (its kind) and `text`.
fn why_json(why: &Why) -> Value {
    let mut v = serde_json::to_value(why).unwrap_or(Value::Null);
    if let Value::Object(r) = &mut v {
        r.insert("text".into(), Value::String(why.to_string()));
    }
    v
}

pub(crate) fn show(db: &Db, json_mode: bool, id: &str) -> Result<(), Failure> {
    let fail = |e: sqlite_outbox::Error| db.fail(&e);
    let id = parse_id(id)?;
    let store = db.open_read()?;
    let event = store
        .find(id)
        .map_err(&fail)?
        .ok_or_else(|| Failure(format!("{}: no event with id {id}", db), 1))?;
    let why = store.why(&event).map_err(&fail)?;
    let mut value = event_json(&event);
    if let Value::Object(map) = &mut value {
        map.insert("why".into(), why_json(&why));
    }
    output(json_mode, value.clone(), || {
        let mut t = String::new();
        if let Value::Object(map) = &value {
            for (k, v) in map {
                let shown = match v {
                    _ if k == "why" => text::terminal_safe(&why.to_string()).into_owned(),
                    Value::Null => "-".to_owned(),
                    Value::String(s) => text::terminal_safe(s).into_owned(),
                    other => text::terminal_safe(&other.to_string()).into_owned(),
                };
                let _ = writeln!(t, "{k:>16}  {shown}");
            }
        }
        t.trim_end().to_owned()
    })
}
