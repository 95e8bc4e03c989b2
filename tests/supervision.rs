//! The dispatcher survives its own threads dying: a panic outside a
//! handler (here: in a `tracing` subscriber, in a policy's arithmetic, in an
//! error's `Display`) gives the event back, restarts the thread, and is
//! reported; no lease is extended for a thread that is gone. Also: the
//! clock is read under the write lock, and a store write inside the store's
//! own transaction fails at once.
//!
//! Its own test binary: it installs a global `tracing` subscriber.

mod common;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{secs, TestResult};
use rusqlite::{Connection, TransactionBehavior};
use serde_json::json;
use sqlite_outbox::{
    Dispatcher, Event, HandlerError, NewEvent, Operator, RetryPolicy, SqliteStore, Status, Store,
};

/// Panics on every event whose message mentions `poison`, while armed.
struct PanickingSubscriber {
    armed: Arc<AtomicBool>,
}

struct Message(String);
impl tracing::field::Visit for Message {
    fn record_debug(&mut self, _: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.0.push_str(&format!("{value:?} "));
    }
}

impl tracing::Subscriber for PanickingSubscriber {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut m = Message(String::new());
        event.record(&mut m);
        if self.armed.load(Ordering::SeqCst) && m.0.contains("poison") {
            panic!("the subscriber panicked");
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

fn armed() -> Arc<AtomicBool> {
    static ARMED: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    ARMED
        .get_or_init(|| {
            let armed = Arc::new(AtomicBool::new(false));
            let _ = tracing::subscriber::set_global_default(PanickingSubscriber {
                armed: armed.clone(),
            });
            armed
        })
        .clone()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) -> TestResult {
    let deadline = Instant::now() + secs(20);
    while !done() {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Waits until `event`'s first attempt failed and it is pending again.
fn wait_for_first_failure(store: &SqliteStore, event: &Event) -> TestResult {
    wait_for("the outcome of the first attempt", || {
        store
            .find(event.id)
            .ok()
            .flatten()
            .is_some_and(|e| e.attempts == 1 && e.status == Status::Pending)
    })
}

#[test]
fn a_worker_that_dies_gives_its_event_back_and_is_replaced() -> TestResult {
    let armed = armed();
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("o.db"))?;
    let poison = store.enqueue(NewEvent::new("t", json!({"n": 0})))?;
    // One worker: the events after the poison one prove it was replaced.
    let dispatcher = Dispatcher::builder(store.clone())
        .workers(1)
        .lease(Duration::from_millis(600))
        .handle("t", |e: &Event| {
            if e.payload["n"] == json!(0) {
                // Logged by the dispatcher: the subscriber panics on it.
                return Err(HandlerError::retry("poison"));
            }
            Ok(())
        })
        .start()?;
    armed.store(true, Ordering::SeqCst);
    wait_for_first_failure(&store, &poison)?;
    armed.store(false, Ordering::SeqCst);
    let e = store.find(poison.id)?.ok_or("gone")?;
    assert!(
        e.last_error
            .unwrap_or_default()
            .contains("worker thread died"),
        "the event was given back as a failed attempt"
    );
    assert_eq!(e.locked_until, None, "no lease is kept for a dead thread");
    // The replaced worker delivers what comes next.
    for n in 1..=5 {
        store.enqueue(NewEvent::new("t", json!({"n": n})))?;
    }
    let next = store.clone();
    wait_for("the next five events", || {
        next.stats().map(|s| s.done == 5).unwrap_or(false)
    })?;
    let report = dispatcher.shutdown(secs(5));
    assert!(report.metrics.thread_panics >= 1, "{report:?}");
    assert!(!report.is_clean(), "a panicked thread is reported");
    // Its first attempt of ten: a retry, not a failure.
    assert_eq!(report.metrics.failed, 0, "{report:?}");
    assert!(report.metrics.retried >= 1, "{report:?}");
    assert_eq!(report.still_running, 0);
    Ok(())
}

#[derive(Debug)]
struct PanicsOnDisplay;
impl fmt::Display for PanicsOnDisplay {
    fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
        panic!("Display of a handler error")
    }
}
impl std::error::Error for PanicsOnDisplay {}

#[test]
fn an_error_whose_display_panics_is_an_ordinary_failed_attempt() -> TestResult {
    armed();
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("o.db"))?;
    let event = store.enqueue(NewEvent::new("t", json!({})))?;
    let dispatcher = Dispatcher::builder(store.clone())
        .workers(1)
        .handle("t", |_: &Event| Err(HandlerError::retry(PanicsOnDisplay)))
        .start()?;
    wait_for_first_failure(&store, &event)?;
    let report = dispatcher.shutdown(secs(5));
    let e = store.find(event.id)?.ok_or("gone")?;
    assert_eq!(
        e.last_error.as_deref(),
        Some("the handler's error panicked while being displayed")
    );
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.metrics.retried, 1);
    Ok(())
}

#[test]
fn the_longest_delay_with_jitter_is_written_not_panicked_on() -> TestResult {
    armed();
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::builder(dir.path().join("o.db"))
        .retry_policy(RetryPolicy::constant(Duration::MAX).with_jitter(0.5))
        .build()?;
    let event = store.enqueue(NewEvent::new("t", json!({})))?;
    let dispatcher = Dispatcher::builder(store.clone())
        .workers(1)
        .handle("t", |_: &Event| Err(HandlerError::retry("not now")))
        .start()?;
    wait_for_first_failure(&store, &event)?;
    let report = dispatcher.shutdown(secs(5));
    assert!(report.is_clean(), "{report:?}");
    let e = store.find(event.id)?.ok_or("gone")?;
    assert_eq!(
        e.next_attempt_at.to_rfc3339(),
        "9999-12-31T23:59:59.999+00:00"
    );
    Ok(())
}

#[test]
fn a_claim_that_waited_for_the_lock_is_not_born_expired() -> TestResult {
    armed();
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("o.db"))?;
    store.enqueue(NewEvent::new("t", json!({})))?;
    let mut blocker = Connection::open(store.path())?;
    let tx = blocker.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let claimer = {
        let store = store.clone();
        std::thread::spawn(move || {
            let claimed = store.claim(1, Duration::from_millis(1000), None);
            (claimed, chrono::Utc::now())
        })
    };
    // The claim waits behind this write lock for longer than its lease.
    std::thread::sleep(Duration::from_millis(1500));
    tx.commit()?;
    let (claimed, returned_at) = claimer.join().map_err(|_| "claimer panicked")?;
    let claimed = claimed?;
    assert_eq!(claimed.len(), 1);
    let until = claimed[0].locked_until.ok_or("no lease")?;
    assert!(
        until > returned_at,
        "the lease ran out ({until}) before the claim returned ({returned_at})"
    );
    Ok(())
}

#[test]
fn a_store_write_inside_the_stores_own_transaction_fails_at_once() -> TestResult {
    armed();
    let dir = tempfile::tempdir()?;
    // A wait would last the busy timeout: far longer than the bound.
    let store = SqliteStore::builder(dir.path().join("o.db"))
        .busy_timeout(secs(120))
        .build()?;
    let started = Instant::now();
    let result = store.transaction(|tx| {
        store.enqueue_tx(tx, NewEvent::new("t", json!(1)))?;
        store.enqueue(NewEvent::new("t", json!(2)))?;
        Ok(())
    });
    let err = result.expect_err("a second writer inside the transaction");
    assert!(err.is_invalid_input(), "{err}");
    assert!(
        err.to_string().contains("inside SqliteStore::transaction"),
        "{err}"
    );
    assert!(
        started.elapsed() < secs(30),
        "it waited {:?}",
        started.elapsed()
    );
    assert_eq!(store.stats()?.total(), 0, "the transaction rolled back");
    // Reads are fine inside, and writes after it.
    store.transaction(|tx| {
        store.enqueue_tx(tx, NewEvent::new("t", json!(3)))?;
        store.stats()?;
        Ok(())
    })?;
    store.enqueue(NewEvent::new("t", json!(4)))?;
    assert_eq!(store.stats()?.total(), 2);
    Ok(())
}

#[test]
fn another_stores_writes_are_fine_inside_a_transaction() -> TestResult {
    armed();
    let dir = tempfile::tempdir()?;
    let app = SqliteStore::open(dir.path().join("app.db"))?;
    let audit = SqliteStore::open(dir.path().join("audit.db"))?;
    app.transaction(|tx| {
        app.enqueue_tx(tx, NewEvent::new("t", json!(1)))?;
        // A different file: no lock of ours is held there.
        audit.enqueue(NewEvent::new("audit", json!(1)))?;
        Ok(())
    })?;
    assert_eq!((app.stats()?.total(), audit.stats()?.total()), (1, 1));
    Ok(())
}
