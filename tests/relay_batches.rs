//! `outbox relay --http --batch N`: events posted as one JSON array, what
//! each answer decides for every event in it (README, "Batches"), and
//! per-key order across batches.
#![cfg(feature = "cli")]

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sqlite_outbox::{Event, ListFilter, NewEvent, Operator, SqliteStore, Status};

mod common;

use common::cli::{outbox, stderr};
use common::endpoint::{Answer, Seen, Server};
use common::TestResult;

fn relay(db: &Path, args: &[&str]) -> std::io::Result<Output> {
    outbox(db, &[&["relay"], args].concat())
}

fn all(store: &SqliteStore) -> sqlite_outbox::Result<Vec<Event>> {
    store.list(&ListFilter {
        limit: usize::MAX,
        ..ListFilter::default()
    })
}

/// The events of a request's body: a JSON array of envelopes.
fn events_of(seen: &Seen) -> Result<Vec<Value>, Box<dyn std::error::Error>> {
    match serde_json::from_str::<Value>(&seen.body)? {
        Value::Array(items) => Ok(items),
        other => Err(format!("not an array: {other}").into()),
    }
}

fn id_of(envelope: &Value) -> String {
    envelope["id"].as_str().unwrap_or_default().to_owned()
}

fn ok(body: Value) -> Answer {
    (
        200,
        vec![("Content-Type", "application/json".to_owned())],
        body.to_string().into_bytes(),
    )
}

#[test]
fn every_answer_decides_for_the_whole_batch_and_order_holds_across_keys() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    let store = SqliteStore::open(&db)?;
    let keys = ["a", "b", "c", "d", "e", "f"];
    let mut events = Vec::new();
    for i in 0..10 {
        for k in keys {
            events.push(NewEvent::new("t", json!({ "k": k, "i": i })).with_ordering_key(k));
        }
        for j in 0..4 {
            events.push(NewEvent::new("t", json!({ "k": null, "i": i * 4 + j })));
        }
    }
    let enqueued = store.enqueue_batch(events)?;
    // One event refused for good, one refused once, by id.
    let doomed = enqueued[7].id.to_string();
    let again = enqueued[13].id.to_string();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let (doomed_id, again_id) = (doomed.clone(), again.clone());
    let answered_again = Arc::new(AtomicUsize::new(0));
    let a = Arc::clone(&answered_again);
    let endpoint = Server::answering("127.0.0.1:0", move |seen| {
        match c.fetch_add(1, Ordering::SeqCst) {
            0 => (503, vec![("Retry-After", "0".into())], b"busy".to_vec()),
            1 => (
                429,
                vec![("Retry-After", "0".into())],
                b"slow down".to_vec(),
            ),
            2 => {
                // Longer than the relay's --timeout: the batch may have
                // arrived, so it is an attempt, retried.
                std::thread::sleep(Duration::from_millis(8000));
                ok(json!({}))
            }
            _ => {
                let ids: Vec<String> = events_of(seen)
                    .map(|e| e.iter().map(id_of).collect())
                    .unwrap_or_default();
                let mut rejected = Vec::new();
                if ids.contains(&doomed_id) {
                    rejected.push(
                        json!({"id": doomed_id, "reason": "no such customer", "permanent": true}),
                    );
                }
                if ids.contains(&again_id) && a.fetch_add(1, Ordering::SeqCst) == 0 {
                    rejected.push(json!({"id": again_id, "reason": "locked, try later"}));
                }
                ok(json!({ "rejected": rejected }))
            }
        }
    })?;
    let out = relay(
        &db,
        &[
            "--http",
            &endpoint.url,
            "--batch",
            "25",
            // One request at a time: none waits behind the slow answer
            // and times out unseen.
            "--workers",
            "1",
            "--timeout",
            "4s",
            "--backoff",
            "10ms",
            "--drain",
            // The 503 and 429 hold the endpoint back for a second or so.
            "--wait-retries",
            "30s",
        ],
    )?;
    // One event failed during the run: exit 3, as for single events.
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let seen = endpoint.seen();
    let mut accepted: HashSet<String> = HashSet::new();
    let mut first_arrival: HashMap<String, Vec<i64>> = HashMap::new();
    let mut arrived: HashSet<String> = HashSet::new();
    let mut again_refused = false;
    for (n, request) in seen.iter().enumerate() {
        let items = events_of(request)?;
        assert!(
            (1..=25).contains(&items.len()),
            "request {n} holds {}",
            items.len()
        );
        let content_type = request
            .headers
            .iter()
            .find(|(k, _)| k == "content-type")
            .map(|(_, v)| v.as_str());
        assert_eq!(content_type, Some("application/json"));
        let mut keys_here = HashSet::new();
        for e in &items {
            let key = e["payload"]["k"].as_str().map(str::to_owned);
            if let Some(k) = &key {
                assert!(keys_here.insert(k.clone()), "request {n}: key {k} twice");
                if arrived.insert(id_of(e)) {
                    first_arrival
                        .entry(k.clone())
                        .or_default()
                        .push(e["payload"]["i"].as_i64().unwrap_or(-1));
                }
            }
            // Requests 0 to 2 were refused or timed out; later ones are
            // 2xx answers, which accept all but what they reject.
            let mut rejected = e["id"] == json!(doomed);
            if n >= 3 && e["id"] == json!(again) && !again_refused {
                again_refused = true;
                rejected = true;
            }
            if n >= 3 && !rejected {
                accepted.insert(id_of(e));
            }
        }
    }
    for k in keys {
        assert_eq!(
            first_arrival.get(k),
            Some(&(0..10).collect::<Vec<i64>>()),
            "key {k} out of order"
        );
    }
    for e in all(&store)? {
        let id = e.id.to_string();
        if id == doomed {
            assert_eq!(e.status, Status::Failed);
            assert_eq!(
                e.last_error.as_deref(),
                Some("rejected by the endpoint: no such customer")
            );
            continue;
        }
        assert_eq!(e.status, Status::Done, "{id}: {:?}", e.last_error);
        if !accepted.contains(&id) {
            let at: Vec<usize> = seen
                .iter()
                .enumerate()
                .filter(|(_, s)| s.body.contains(&id))
                .map(|(n, _)| n)
                .collect();
            return Err(format!(
                "{id} done without a 2xx accepting it; in requests {at:?} of {}; attempts {}",
                seen.len(),
                e.attempts
            )
            .into());
        }
        if id == again {
            assert_eq!(
                e.last_error.as_deref(),
                Some("rejected by the endpoint: locked, try later")
            );
        }
    }
    // The 503 and the 429 said "busy": no attempt spent, the endpoint
    // waited for. The timeout may have reached it: an attempt each.
    let attempts: HashMap<String, u32> = all(&store)?
        .iter()
        .map(|e| (e.id.to_string(), e.attempts))
        .collect();
    let in_request = |n: usize| -> Result<Vec<String>, Box<dyn std::error::Error>> {
        Ok(events_of(&seen[n])?.iter().map(id_of).collect())
    };
    for id in in_request(2)? {
        assert!(attempts[&id] >= 2, "{id} timed out and was not charged");
    }
    let later: HashSet<String> = (2..seen.len())
        .map(in_request)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .filter(|id| *id != again)
        .collect();
    let busy_only: Vec<String> = in_request(0)?
        .into_iter()
        .chain(in_request(1)?)
        .filter(|id| !in_request(2).map(|t| t.contains(id)).unwrap_or(true))
        .filter(|id| *id != again && *id != doomed && later.contains(id))
        .collect();
    assert!(!busy_only.is_empty());
    for id in busy_only {
        let at: Vec<(usize, usize)> = seen
            .iter()
            .enumerate()
            .filter(|(_, s)| s.body.contains(&id))
            .map(|(n, s)| (n, events_of(s).map(|e| e.len()).unwrap_or(0)))
            .collect();
        assert_eq!(
            attempts[&id], 1,
            "{id}: a busy answer spent an attempt; in requests (n, size) {at:?}"
        );
    }
    assert!(
        seen.len() < 40,
        "{} requests for 100 events in batches of 25",
        seen.len()
    );
    Ok(())
}

#[test]
fn a_batch_refused_whole_is_sent_again_one_by_one() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    let store = SqliteStore::open(&db)?;
    for i in 0..12 {
        let payload = if i == 5 {
            json!({ "poison": true })
        } else {
            json!({ "i": i })
        };
        store.enqueue(NewEvent::new("t", payload))?;
    }
    let endpoint = Server::answering("127.0.0.1:0", |seen| {
        let items = events_of(seen).unwrap_or_default();
        let poisoned = items.iter().any(|e| e["payload"]["poison"] == json!(true));
        if poisoned {
            (400, vec![], b"malformed event in batch".to_vec())
        } else {
            (204, vec![], vec![])
        }
    })?;
    let out = relay(&db, &["--http", &endpoint.url, "--batch", "50", "--drain"])?;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let events = all(&store)?;
    for e in &events {
        if e.payload.value()["poison"] == json!(true) {
            assert_eq!(e.status, Status::Failed);
            assert_eq!(
                e.last_error.as_deref(),
                Some("HTTP 400: malformed event in batch")
            );
        } else {
            assert_eq!(e.status, Status::Done, "{:?}", e.last_error);
            assert_eq!(e.attempts, 1);
        }
    }
    // After the refusal, every event of that batch went alone.
    let seen = endpoint.seen();
    let singles = seen
        .iter()
        .filter(|s| events_of(s).map(|e| e.len()).unwrap_or(0) == 1)
        .count();
    assert!(singles >= 2, "{singles} requests of one event");
    Ok(())
}

#[test]
fn a_byte_limit_splits_a_batch_in_order() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    let store = SqliteStore::open(&db)?;
    let filler = "x".repeat(700);
    for i in 0..20 {
        store.enqueue(NewEvent::new("t", json!({ "i": i, "filler": filler })))?;
    }
    let endpoint = Server::start(|| (200, vec![], vec![]))?;
    let out = relay(
        &db,
        &[
            "--http",
            &endpoint.url,
            "--batch",
            "100",
            "--batch-bytes",
            "2KiB",
            "--workers",
            "1",
            "--drain",
        ],
    )?;
    assert!(out.status.success(), "{}", stderr(&out));
    let seen = endpoint.seen();
    for s in &seen {
        let n = events_of(s)?.len();
        assert!(
            s.body.len() <= 2048 && (1..=2).contains(&n),
            "{n} events in {} bytes",
            s.body.len()
        );
    }
    let count: usize = seen
        .iter()
        .map(|s| events_of(s).map_or(0, |e| e.len()))
        .sum();
    assert_eq!(count, 20);
    assert!(all(&store)?.iter().all(|e| e.status == Status::Done));
    Ok(())
}

#[test]
fn an_unreachable_endpoint_holds_a_batch_without_spending_attempts() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    let store = SqliteStore::open(&db)?;
    for i in 0..30 {
        store.enqueue(NewEvent::new("t", json!({ "i": i })))?;
    }
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("http://127.0.0.1:{port}/events");
    let out = relay(&db, &["--http", &url, "--batch", "10", "--drain"])?;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("unreachable"), "{}", stderr(&out));
    for e in all(&store)? {
        assert_eq!((e.status, e.attempts), (Status::Pending, 0));
    }
    Ok(())
}

#[test]
fn cloudevents_batches_read_back_with_the_reference_sdk() -> TestResult {
    use cloudevents::AttributesReader;
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("o.db");
    let store = SqliteStore::open(&db)?;
    let mut ids = HashSet::new();
    for i in 0..5 {
        ids.insert(
            store
                .enqueue(NewEvent::new("order.placed", json!({ "i": i })))?
                .id
                .to_string(),
        );
    }
    let endpoint = Server::start(|| (200, vec![], vec![]))?;
    let out = relay(
        &db,
        &[
            "--http",
            &endpoint.url,
            "--batch",
            "10",
            "--format",
            "cloudevents",
            "--workers",
            "1",
            "--drain",
        ],
    )?;
    assert!(out.status.success(), "{}", stderr(&out));
    let mut read = HashSet::new();
    for s in endpoint.seen() {
        let content_type = s
            .headers
            .iter()
            .find(|(k, _)| k == "content-type")
            .map(|(_, v)| v.clone());
        assert_eq!(
            content_type.as_deref(),
            Some("application/cloudevents-batch+json")
        );
        let batch: Vec<cloudevents::Event> = serde_json::from_str(&s.body)?;
        for ce in batch {
            assert_eq!(ce.ty(), "order.placed");
            assert_eq!(ce.specversion().as_str(), "1.0");
            read.insert(ce.id().to_owned());
        }
    }
    assert_eq!(read, ids);
    // Binary mode has no batch form: refused before anything is sent.
    let out = relay(
        &db,
        &[
            "--http",
            &endpoint.url,
            "--batch",
            "10",
            "--format",
            "cloudevents-binary",
        ],
    )?;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("binary mode has no batches"),
        "{}",
        stderr(&out)
    );
    Ok(())
}
