//! With the `metrics` feature, a dispatcher's counters and handler run
//! times reach the app's own recorder through the `metrics` facade, under
//! the names the Prometheus exporters expect. Its own test binary: it
//! installs a global recorder.
#![cfg(feature = "metrics")]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::MetricKind;
use serde_json::json;
use sqlite_outbox::{Dispatcher, HandlerError, NewEvent, Operator, RetryPolicy, SqliteStore};

#[test]
fn counters_and_run_times_reach_the_apps_recorder() -> Result<(), Box<dyn std::error::Error>> {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install()?;

    let dir = tempfile::tempdir()?;
    let store = SqliteStore::builder(dir.path().join("o.db"))
        .retry_policy(RetryPolicy::constant(Duration::from_millis(1)))
        .build()?;
    for kind in ["ok", "ok", "ok", "flaky", "broken"] {
        store.enqueue(NewEvent::new(kind, json!({})).with_max_attempts(2))?;
    }
    let dispatcher = Dispatcher::builder(store.clone())
        .handle("ok", |_| Ok(()))
        .handle("flaky", |e| {
            if e.attempts < 2 {
                Err(HandlerError::retry("not yet"))
            } else {
                Ok(())
            }
        })
        .handle("broken", |_| Err(HandlerError::permanent("never")))
        .poll_interval(Duration::from_millis(10))
        .start()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.stats()?.done + store.stats()?.failed < 5 {
        assert!(Instant::now() < deadline, "{:?}", store.stats()?);
        std::thread::sleep(Duration::from_millis(10));
    }
    let report = dispatcher.shutdown(Duration::from_secs(5));
    assert!(report.is_clean());

    let mut counters = HashMap::new();
    let mut runs: HashMap<String, usize> = HashMap::new();
    let mut described = Vec::new();
    for (key, unit, help, value) in snapshotter.snapshot().into_vec() {
        let name = key.key().name().to_owned();
        if help.is_some() {
            described.push((name.clone(), unit));
        }
        match (key.kind(), value) {
            (MetricKind::Counter, DebugValue::Counter(n)) => {
                counters.insert(name, n);
            }
            (MetricKind::Histogram, DebugValue::Histogram(samples)) => {
                assert_eq!(name, "outbox_handler_duration_seconds");
                let ty = key
                    .key()
                    .labels()
                    .find(|l| l.key() == "type")
                    .map(|l| l.value().to_owned())
                    .ok_or("no type label")?;
                assert!(samples.iter().all(|s| s.into_inner() >= 0.0));
                *runs.entry(ty).or_default() += samples.len();
            }
            _ => {}
        }
    }
    // The facade saw what the dispatcher's own counters saw.
    let m = report.metrics;
    assert_eq!(counters.get("outbox_deliveries_total"), Some(&m.done));
    assert_eq!(m.done, 4);
    assert_eq!(counters.get("outbox_retries_total"), Some(&m.retried));
    assert_eq!(m.retried, 1);
    assert_eq!(counters.get("outbox_failures_total"), Some(&m.failed));
    assert_eq!(m.failed, 1);
    assert_eq!(
        counters.get("outbox_events_claimed_total"),
        Some(&m.claimed)
    );
    // One run-time sample per handler run, labelled with its type.
    assert_eq!(runs.get("ok"), Some(&3));
    assert_eq!(runs.get("flaky"), Some(&2));
    assert_eq!(runs.get("broken"), Some(&1));
    // Every name comes with a description and a unit.
    assert!(
        described
            .iter()
            .any(|(n, u)| n == "outbox_handler_duration_seconds"
                && *u == Some(metrics::Unit::Seconds))
    );
    assert!(described
        .iter()
        .any(|(n, _)| n == "outbox_deliveries_total"));
    Ok(())
}
