//! Sharing the writer with an app that enqueues fast. Alone in its own test
//! binary, so that no other test slows the app down.

use std::time::{Duration, Instant};

use serde_json::json;
use sqlite_outbox::{Dispatcher, Durability, Event, NewEvent, SqliteStore, Store};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// An app that enqueues fast in this process gets most of the writer: the
/// dispatcher then starts at most one write a millisecond (claims and
/// outcomes together) and takes what arrived meanwhile in one go, instead
/// of writing once or twice for every event (measured without the pacing,
/// on an idle machine: 1,390–1,630 writes in 500 ms; with it, 350–610).
/// On a loaded machine the dispatcher writes less anyway, and this test
/// may not tell; `last_enqueues`, the pacing's signal, has a unit test.
#[test]
fn a_fast_enqueuer_gets_the_dispatcher_writing_in_groups() -> TestResult {
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
    let report = dispatcher.drain(Duration::from_secs(30));
    assert_eq!(report.metrics.done, n);
    assert!(during.done > 0, "delivery went on meanwhile: {during:?}");
    // A write counts once for its outcomes and once for its claim at most.
    let writes = during.claim_batches + during.settle_batches;
    // On a busy machine the app and the dispatcher rarely want the writer
    // at the same moment, and a few dozen writes need no pacing; when the
    // dispatcher wrote often (more than one write every 4 ms), it must
    // have made way.
    if writes as f64 > ms / 4.0 {
        assert!(during.paced > 0, "the dispatcher made way: {during:?}");
    }
    eprintln!("{writes} writes for {n} events in {ms:.0} ms");
    assert!(
        writes as f64 <= 2.0 * ms + 10.0,
        "{writes} writes for {n} events in {ms:.0} ms: {during:?}"
    );
    Ok(())
}
