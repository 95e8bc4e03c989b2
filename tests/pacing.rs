//! Sharing the writer with an app that enqueues fast. Alone in its own test
//! binary, so that no other test slows the app down.

use std::time::{Duration, Instant};

use serde_json::json;
use sqlite_outbox::{Dispatcher, Durability, Event, NewEvent, Operator, SqliteStore};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// An app that enqueues as fast as it can beside a 4-worker dispatcher:
/// every event is delivered once, whatever the pacing decided. How much
/// the pacing saves (writes per event, the app's rate) is measured by the
/// benchmark's contention group, never asserted here: a loaded machine
/// changes it, not the outcome. The pacing's rule has unit tests
/// (`dispatch::runtime::pace`).
#[test]
fn a_fast_enqueuer_beside_a_dispatcher_loses_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::builder(dir.path().join("outbox.db"))
        .durability(Durability::Normal)
        .build()?;
    let dispatcher = Dispatcher::builder(store.clone())
        .workers(4)
        .handle("t", |_: &Event| Ok(()))
        .start()?;
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_millis(500) {
        store.enqueue(NewEvent::new("t", json!(n)))?;
        n += 1;
    }
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let during = dispatcher.metrics();
    let report = dispatcher.drain(Duration::from_secs(60));
    assert!(report.idle, "{report:?}");
    assert_eq!(report.metrics.done, n);
    assert_eq!(store.stats()?.done, n);
    let writes = during.claim_batches + during.settle_batches;
    eprintln!(
        "{writes} writes ({} paced) for {n} events in {ms:.0} ms",
        during.writes_yielded_to_app
    );
    Ok(())
}
