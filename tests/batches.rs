//! Handlers of batches: one call for many events, a result for each, an
//! error for all, and per-key order inside and across batches.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{secs, TestResult};
use serde_json::json;
use sqlite_outbox::{
    BatchResult, Dispatcher, Event, EventId, HandlerError, ListFilter, NewEvent, Operator,
    SqliteStore, Status,
};

type Batches = Arc<Mutex<Vec<Vec<Event>>>>;

fn store() -> Result<(tempfile::TempDir, SqliteStore), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("outbox.db"))?;
    Ok((dir, store))
}

fn all(store: &SqliteStore) -> sqlite_outbox::Result<HashMap<EventId, Event>> {
    Ok(store
        .list(&ListFilter {
            limit: usize::MAX,
            ..ListFilter::default()
        })?
        .into_iter()
        .map(|e| (e.id, e))
        .collect())
}

fn number(e: &Event) -> i64 {
    e.payload.value()["i"].as_i64().unwrap_or(-1)
}

/// A handler of up to `limit` events that records each batch and answers
/// each event with `answer`.
fn recording(
    batches: &Batches,
    answer: impl Fn(&Event) -> Result<(), HandlerError> + Send + Sync + 'static,
) -> impl Fn(&[Event]) -> BatchResult + Send + Sync + 'static {
    let batches = Arc::clone(batches);
    move |events: &[Event]| {
        batches
            .lock()
            .map_err(|_| HandlerError::retry("poisoned"))?
            .push(events.to_vec());
        Ok(events.iter().map(&answer).collect())
    }
}

#[test]
fn a_backlog_goes_in_batches_and_each_event_gets_its_own_result() -> TestResult {
    let (_dir, store) = store()?;
    let n = 300;
    let events = (0..n)
        .map(|i| NewEvent::new("sync", json!({ "i": i })))
        .collect();
    store.enqueue_batch(events)?;
    let batches: Batches = Arc::default();
    let report = Dispatcher::builder(store.clone())
        .workers(1)
        .handle_batch(
            "sync",
            50,
            recording(&batches, |e| match number(e) {
                i if i % 7 == 0 => Err(HandlerError::permanent(format!("{i} is refused"))),
                i if i % 11 == 0 => Err(HandlerError::retry_after("later", secs(3600))),
                _ => Ok(()),
            }),
        )
        .start()?
        .drain(secs(60));
    assert!(report.idle, "{report:?}");
    let batches = batches.lock().map_err(|_| "poisoned")?.clone();
    let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
    assert!(sizes.iter().all(|&s| (1..=50).contains(&s)), "{sizes:?}");
    assert!(
        sizes.iter().any(|&s| s > 1),
        "a backlog went one by one: {sizes:?}"
    );
    assert!(
        batches.len() < n as usize / 2,
        "{} calls for {n} events",
        batches.len()
    );
    let mut seen: Vec<i64> = batches.iter().flatten().map(number).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..n).collect::<Vec<_>>(), "each event once");
    for e in all(&store)?.values() {
        let i = number(e);
        let expected = if i % 7 == 0 {
            (Status::Failed, Some(format!("{i} is refused")))
        } else if i % 11 == 0 {
            (Status::Pending, Some("later".to_owned()))
        } else {
            (Status::Done, None)
        };
        assert_eq!((e.status, e.last_error.clone()), expected, "event {i}");
        assert_eq!(e.attempts, 1, "event {i}");
    }
    let m = report.metrics;
    let (failed, retried) = ((0..n).filter(|i| i % 7 == 0).count(), 0..n);
    let retried = retried.filter(|i| i % 7 != 0 && i % 11 == 0).count() as u64;
    assert_eq!(
        (m.done, m.failed, m.retried),
        (n as u64 - failed as u64 - retried, failed as u64, retried)
    );
    Ok(())
}

#[test]
fn a_batch_error_is_the_result_of_every_event_in_it() -> TestResult {
    let (_dir, store) = store()?;
    let ids: Vec<EventId> = (0..20)
        .map(|i| store.enqueue(NewEvent::new("busy", json!({ "i": i }))))
        .map(|r| r.map(|e| e.id))
        .collect::<Result<_, _>>()?;
    let gone: Vec<EventId> = (0..5)
        .map(|i| store.enqueue(NewEvent::new("gone", json!({ "i": i }))))
        .map(|r| r.map(|e| e.id))
        .collect::<Result<_, _>>()?;
    let report = Dispatcher::builder(store.clone())
        .workers(1)
        .handle_batch("busy", 100, |_| {
            Err(HandlerError::retry_after("HTTP 503: busy", secs(600)))
        })
        .handle_batch("gone", 100, |_| Err(HandlerError::permanent("HTTP 410")))
        .start()?
        .drain(secs(60));
    assert!(report.idle, "{report:?}");
    let now = chrono::Utc::now();
    let stored = all(&store)?;
    for id in &ids {
        let e = stored.get(id).ok_or("missing")?;
        assert_eq!(
            (e.status, e.attempts, e.last_error.as_deref()),
            (Status::Pending, 1, Some("HTTP 503: busy"))
        );
        let wait = (e.next_attempt_at - now).num_seconds();
        assert!((500..=600).contains(&wait), "asked 600 s, got {wait}");
    }
    for id in &gone {
        let e = stored.get(id).ok_or("missing")?;
        assert_eq!(
            (e.status, e.last_error.as_deref()),
            (Status::Failed, Some("HTTP 410"))
        );
    }
    Ok(())
}

#[test]
fn an_unreachable_batch_spends_no_attempt_and_holds_its_destination() -> TestResult {
    let (_dir, store) = store()?;
    for i in 0..30 {
        store.enqueue(NewEvent::new("push", json!({ "i": i })))?;
    }
    let batches: Batches = Arc::default();
    let b = Arc::clone(&batches);
    let dispatcher = Dispatcher::builder(store.clone())
        .workers(1)
        .handle_batch("push", 100, move |events| {
            b.lock()
                .map_err(|_| HandlerError::retry("poisoned"))?
                .push(events.to_vec());
            Err(HandlerError::unavailable("connection refused"))
        })
        .start()?;
    common::wait_until(30, "the destination to be held back", || {
        Ok(!dispatcher.destinations().is_empty())
    })?;
    let held = dispatcher.destinations();
    let report = dispatcher.shutdown(secs(10));
    assert_eq!(held[0].last_error.as_deref(), Some("connection refused"));
    for e in all(&store)?.values() {
        assert_eq!(
            (e.status, e.attempts),
            (Status::Pending, 0),
            "an unreachable destination spent an attempt: {e:?}"
        );
    }
    let ran: usize = batches
        .lock()
        .map_err(|_| "poisoned")?
        .iter()
        .map(Vec::len)
        .sum();
    assert!(ran >= 1, "nothing ran");
    assert_eq!(report.metrics.done + report.metrics.retried, 0);
    Ok(())
}

#[test]
fn a_panic_or_a_short_answer_retries_the_events_without_a_result() -> TestResult {
    let (_dir, store) = store()?;
    for i in 0..10 {
        store.enqueue(NewEvent::new("short", json!({ "i": i })))?;
        store.enqueue(NewEvent::new("panics", json!({ "i": i })))?;
    }
    let report = Dispatcher::builder(store.clone())
        .workers(1)
        // Claimed together, the two types are never batched together:
        // each handler gets only its own events.
        .handle_batch("short", 100, |events| {
            assert!(events.iter().all(|e| e.event_type == "short"));
            Ok(events.iter().take(1).map(|_| Ok(())).collect())
        })
        .handle_batch("panics", 100, |events| {
            assert!(events.iter().all(|e| e.event_type == "panics"));
            panic!("batch of {} went wrong", events.len())
        })
        .start()?
        .drain(secs(60));
    assert!(report.idle, "{report:?}");
    let stored = all(&store)?;
    let short: Vec<&Event> = stored
        .values()
        .filter(|e| e.event_type == "short")
        .collect();
    let done = short.iter().filter(|e| e.status == Status::Done).count();
    let retried: Vec<&&Event> = short
        .iter()
        .filter(|e| e.status == Status::Pending)
        .collect();
    assert!(done >= 1 && done + retried.len() == 10, "{done} done");
    for e in retried {
        let note = e.last_error.as_deref().unwrap_or_default();
        assert!(
            note.starts_with("the batch handler returned 1 result(s) for "),
            "{note}"
        );
    }
    for e in stored.values().filter(|e| e.event_type == "panics") {
        assert_eq!(e.status, Status::Pending);
        let note = e.last_error.as_deref().unwrap_or_default();
        assert!(
            note.starts_with("handler panicked: batch of ") && note.ends_with(" went wrong"),
            "{note}"
        );
    }
    assert_eq!(report.metrics.panicked, 10, "{:?}", report.metrics);
    Ok(())
}

/// Per-key order inside and across batches, with four workers, retries
/// that hold a key's head, and events without a key between them.
#[test]
fn per_key_order_holds_inside_and_across_batches() -> TestResult {
    let (_dir, store) = store()?;
    let keys = ["k0", "k1", "k2", "k3", "k4", "k5"];
    let per_key = 40;
    let mut events = Vec::new();
    for i in 0..per_key {
        for k in keys {
            events.push(NewEvent::new("t", json!({ "k": k, "i": i })).with_ordering_key(k));
        }
        events.push(NewEvent::new("t", json!({ "k": null, "i": i })));
    }
    store.enqueue_batch(events)?;
    let batches: Batches = Arc::default();
    let b = Arc::clone(&batches);
    let report = Dispatcher::builder(store.clone())
        .workers(4)
        .handle_batch("t", 16, move |events| {
            b.lock()
                .map_err(|_| HandlerError::retry("poisoned"))?
                .push(events.to_vec());
            std::thread::sleep(Duration::from_millis(1));
            Ok(events
                .iter()
                // Every fifth event of a key fails its first attempt and
                // comes back at once: its key waits for it.
                .map(|e| match number(e) % 5 == 2 && e.attempts == 1 {
                    true => Err(HandlerError::retry_after("again", Duration::ZERO)),
                    false => Ok(()),
                })
                .collect())
        })
        .start()?
        .drain(secs(120));
    assert!(report.idle, "{report:?}");
    let batches = batches.lock().map_err(|_| "poisoned")?.clone();
    let mut arrivals: HashMap<String, Vec<i64>> = HashMap::new();
    for batch in &batches {
        let mut keys_in_batch: Vec<&str> = batch
            .iter()
            .filter_map(|e| e.ordering_key.as_deref())
            .collect();
        let n = keys_in_batch.len();
        keys_in_batch.sort_unstable();
        keys_in_batch.dedup();
        assert_eq!(n, keys_in_batch.len(), "two events of one key in a batch");
        for e in batch {
            if let Some(k) = &e.ordering_key {
                let seen = arrivals.entry(k.clone()).or_default();
                // First arrivals only: a retry comes again in its place.
                if seen.last() != Some(&number(e)) {
                    seen.push(number(e));
                }
            }
        }
    }
    for k in keys {
        assert_eq!(
            arrivals.get(k),
            Some(&(0..per_key).collect::<Vec<i64>>()),
            "key {k} out of order"
        );
    }
    assert!(
        batches.iter().any(|b| b.len() > 1),
        "no batch had two events"
    );
    assert!(
        all(&store)?.values().all(|e| e.status == Status::Done),
        "every event done"
    );
    Ok(())
}
