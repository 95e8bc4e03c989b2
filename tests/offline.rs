//! Offline-first delivery: a destination that cannot be reached spends no
//! attempts and no CPU, is probed one event at a time, and flows again at
//! once when it is back; the app can pause, resume and go offline. On both
//! stores, on a manual clock: waits are on channels and counters, the clock
//! only moves when a test moves it.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{millis, secs, Fixture, TestResult};
use serde_json::json;
use sqlite_outbox::{Dispatcher, Event, HandlerError, Hold, ListFilter, NewEvent, Status};

const WAIT: Duration = Duration::from_secs(30);

fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> TestResult {
    let deadline = Instant::now() + WAIT;
    while !done() {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        std::thread::sleep(millis(2));
    }
    Ok(())
}

/// A remote end that can be taken down: counts the calls it gets and
/// records what it accepted.
#[derive(Clone, Default)]
struct Remote {
    down: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    accepted: Arc<Mutex<Vec<(String, i64)>>>,
}

impl Remote {
    fn handler(&self) -> impl Fn(&Event) -> Result<(), HandlerError> + Send + Sync + 'static {
        let me = self.clone();
        move |e: &Event| {
            me.calls.fetch_add(1, Ordering::SeqCst);
            if me.down.load(Ordering::SeqCst) {
                return Err(HandlerError::unavailable("connection refused"));
            }
            let n = e.payload["n"].as_i64().unwrap_or(-1);
            if let Ok(mut a) = me.accepted.lock() {
                a.push((e.ordering_key.clone().unwrap_or_default(), n));
            }
            Ok(())
        }
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    fn accepted(&self) -> usize {
        self.accepted.lock().map(|a| a.len()).unwrap_or(0)
    }
}

fn all(f: &Fixture, status: Status) -> sqlite_outbox::Result<Vec<Event>> {
    f.store.list(&ListFilter {
        status: Some(status),
        limit: usize::MAX,
        ..ListFilter::default()
    })
}

/// Waits for the dispatcher's probe of `name` to be planned, then moves the
/// clock past it and wakes the dispatcher.
fn next_probe(f: &Fixture, d: &Dispatcher, name: &str) -> TestResult {
    let mut at = None;
    wait_until("a planned probe", || {
        at = d
            .destinations()
            .into_iter()
            .find(|s| s.name == name)
            .and_then(|s| s.next_probe_at);
        at.is_some()
    })?;
    let at = at.ok_or("no probe")?;
    let now = f.store.clock().now();
    f.advance((at - now).to_std().unwrap_or(Duration::ZERO) + millis(1));
    d.wake();
    Ok(())
}

fn unreachable_spends_nothing_and_a_probe_brings_it_back(f: Fixture) -> TestResult {
    let api = Remote::default();
    let mail = Remote::default();
    api.down.store(true, Ordering::SeqCst);
    let events: Vec<NewEvent> = (0..40)
        .map(|n| {
            NewEvent::new("api.push", json!({"n": n})).with_ordering_key(format!("k{}", n % 4))
        })
        .chain((0..10).map(|n| NewEvent::new("mail.send", json!({"n": n}))))
        .collect();
    f.store.enqueue_batch(events)?;
    let dispatcher = Dispatcher::builder(f.core())
        .workers(4)
        .handle("api.push", api.handler())
        .handle("mail.send", mail.handler())
        .start()?;
    // The other destination flows.
    wait_until("mail delivered", || mail.accepted() == 10)?;
    wait_until("api held back", || {
        dispatcher.destinations().first().map(|s| s.hold) == Some(Hold::Unreachable)
    })?;
    let first_calls = api.calls();
    assert!(
        first_calls <= 4,
        "at most one call per worker: {first_calls}"
    );
    let state = &dispatcher.destinations()[0];
    assert_eq!(state.name, "api.push");
    assert_eq!(state.last_error.as_deref(), Some("connection refused"));
    // Written down for `stats`, here and in other processes (just after
    // the dispatcher's own state changes).
    wait_until("written down", || {
        f.store.stats().map(|s| s.destinations.len()).unwrap_or(0) == 1
    })?;
    let written = f.store.stats()?.destinations;
    assert_eq!(written.len(), 1, "{written:?}");
    assert_eq!(
        f.store.destinations()?,
        written,
        "the same list, read alone"
    );
    assert_eq!(
        (written[0].name.as_str(), written[0].hold, written[0].since),
        ("api.push", Hold::Unreachable, state.since)
    );
    // Nothing is spun while it is down, however long the app waits.
    std::thread::sleep(millis(300));
    assert_eq!(api.calls(), first_calls, "no calls before the probe is due");
    wait_until("events given back", || {
        all(&f, Status::Pending).map(|e| e.len()).unwrap_or(0) == 40
    })?;
    assert!(
        all(&f, Status::Pending)?.iter().all(|e| e.attempts == 0),
        "no attempt spent"
    );
    // A probe: one call, still down, so the next waits twice as long.
    let before = api.calls();
    next_probe(&f, &dispatcher, "api.push")?;
    wait_until("a probe", || api.calls() == before + 1)?;
    wait_until("the next probe planned", || {
        dispatcher.destinations()[0].next_probe_at.is_some()
    })?;
    std::thread::sleep(millis(100));
    assert_eq!(api.calls(), before + 1, "one probe at a time");
    // Back up: the next probe gets through and everything flows, in order.
    api.down.store(false, Ordering::SeqCst);
    next_probe(&f, &dispatcher, "api.push")?;
    wait_until("api delivered", || api.accepted() == 40)?;
    assert!(f.store.stats()?.destinations.is_empty(), "no longer held");
    let report = dispatcher.drain(WAIT);
    assert!(report.idle && report.is_clean(), "{report:?}");
    assert_eq!((report.metrics.failed, report.metrics.retried), (0, 0));
    // Per-key order let one event per key out at a time: four were given
    // back unrun or refused, plus the probe that failed.
    assert!(report.metrics.held_back >= 5, "{:?}", report.metrics);
    assert!(dispatcher_free(&f)?, "every event done");
    let accepted = api.accepted.lock().map_err(|_| "poisoned")?.clone();
    let mut by_key: HashMap<String, Vec<i64>> = HashMap::new();
    for (key, n) in accepted {
        by_key.entry(key).or_default().push(n);
    }
    for (key, ns) in by_key {
        let mut sorted = ns.clone();
        sorted.sort();
        assert_eq!(ns, sorted, "per-key order of {key}");
    }
    assert!(
        all(&f, Status::Done)?.iter().all(|e| e.attempts == 1),
        "each delivered on its one counted attempt"
    );
    Ok(())
}

fn dispatcher_free(f: &Fixture) -> sqlite_outbox::Result<bool> {
    let s = f.store.stats()?;
    Ok(s.pending == 0 && s.processing == 0 && s.failed == 0)
}

fn paused_and_offline_claim_nothing_until_told(f: Fixture) -> TestResult {
    let api = Remote::default();
    let dispatcher = Dispatcher::builder(f.core())
        .handle("api.push", api.handler())
        .start()?;
    dispatcher.pause("api.push");
    f.store
        .enqueue(NewEvent::new("api.push", json!({"n": 1})))?;
    f.advance(secs(24 * 3600));
    dispatcher.wake();
    std::thread::sleep(millis(300));
    assert_eq!(api.calls(), 0, "a paused destination is not probed");
    assert_eq!(dispatcher.destinations()[0].hold, Hold::Paused);
    assert_eq!(f.store.stats()?.destinations[0].hold, Hold::Paused);
    dispatcher.resume("api.push");
    wait_until("delivered after resume", || api.accepted() == 1)?;
    assert!(dispatcher.destinations().is_empty());

    // Offline: nothing at all is claimed.
    assert!(dispatcher.is_online(), "online until told otherwise");
    dispatcher.set_online(false);
    assert!(!dispatcher.is_online());
    f.store
        .enqueue(NewEvent::new("api.push", json!({"n": 2})))?;
    std::thread::sleep(millis(300));
    assert_eq!(api.calls(), 1);
    assert_eq!(f.store.stats()?.processing, 0);
    // An event that failed before: back online, it goes at once, not after
    // its backoff.
    let claimed = f.store.claim(1, secs(60), None)?;
    let lease = claimed[0].lease().ok_or("lease")?;
    f.store.retry(&lease, "timeout", None)?;
    let waiting = f.store.find(claimed[0].id)?.ok_or("gone")?;
    assert!(
        waiting.next_attempt_at > f.store.clock().now(),
        "in backoff"
    );
    dispatcher.set_online(true);
    assert!(dispatcher.is_online());
    wait_until("delivered when back online", || api.accepted() == 2)?;
    wait_until("its outcome written", || {
        f.store
            .find(claimed[0].id)
            .ok()
            .flatten()
            .is_some_and(|e| e.status == Status::Done)
    })?;
    assert_eq!(f.store.find(claimed[0].id)?.map(|e| e.attempts), Some(2));
    dispatcher.shutdown(secs(5));
    Ok(())
}

/// Types routed to one destination are held back and probed together.
fn a_shared_destination_holds_all_its_types(f: Fixture) -> TestResult {
    let api = Remote::default();
    api.down.store(true, Ordering::SeqCst);
    let dispatcher = Dispatcher::builder(f.core())
        .workers(1)
        .destination("api.example.com", ["note.created", "note.deleted"])
        .handle("note.created", api.handler())
        .handle("note.deleted", api.handler())
        .start()?;
    f.store
        .enqueue(NewEvent::new("note.created", json!({"n": 1})))?;
    wait_until("held back", || !dispatcher.destinations().is_empty())?;
    assert_eq!(dispatcher.destinations()[0].name, "api.example.com");
    f.store
        .enqueue(NewEvent::new("note.deleted", json!({"n": 2})))?;
    std::thread::sleep(millis(300));
    assert_eq!(api.calls(), 1, "the other type waits with it");
    api.down.store(false, Ordering::SeqCst);
    next_probe(&f, &dispatcher, "api.example.com")?;
    wait_until("both delivered", || api.accepted() == 2)?;
    dispatcher.shutdown(secs(5));
    Ok(())
}

/// A drain returns once what can be delivered is delivered; events of an
/// unreachable destination wait for a later run.
fn drain_does_not_wait_for_an_unreachable_destination(f: Fixture) -> TestResult {
    let api = Remote::default();
    api.down.store(true, Ordering::SeqCst);
    f.store
        .enqueue(NewEvent::new("api.push", json!({"n": 1})))?;
    let started = Instant::now();
    let report = Dispatcher::builder(f.core())
        .handle("api.push", api.handler())
        .start()?
        .drain(WAIT);
    assert!(report.idle, "{report:?}");
    assert!(
        f.store.stats()?.destinations.is_empty(),
        "a dispatcher that stopped holds nothing back"
    );
    assert!(started.elapsed() < secs(10), "{:?}", started.elapsed());
    let e = &all(&f, Status::Pending)?[0];
    assert_eq!(e.attempts, 0);
    Ok(())
}

/// Offline, a drain returns at once: nothing can be delivered, and every
/// event waits, unclaimed and unspent, for a run that is online.
fn drain_while_offline_returns_at_once(f: Fixture) -> TestResult {
    let api = Remote::default();
    let dispatcher = Dispatcher::builder(f.core())
        .handle("api.push", api.handler())
        .start()?;
    dispatcher.set_online(false);
    f.store
        .enqueue(NewEvent::new("api.push", json!({"n": 1})))?;
    let report = dispatcher.drain(WAIT);
    assert!(report.idle, "{report:?}");
    assert_eq!(api.calls(), 0);
    let e = &all(&f, Status::Pending)?[0];
    assert_eq!(e.attempts, 0);
    Ok(())
}

/// A week offline on the manual clock, hour by hour, with three
/// destinations: no attempt spent, nothing failed, one probe per destination
/// per step at most, then everything delivered in per-key order.
fn a_week_offline_loses_and_spends_nothing(f: Fixture) -> TestResult {
    let remotes: Vec<Remote> = (0..3).map(|_| Remote::default()).collect();
    for r in &remotes {
        r.down.store(true, Ordering::SeqCst);
    }
    let n = 3_000;
    f.store.enqueue_batch(
        (0..n)
            .map(|i| {
                NewEvent::new(format!("dest{}", i % 3), json!({"n": i}))
                    .with_ordering_key(format!("key{}", i % 30))
            })
            .collect(),
    )?;
    let mut builder = Dispatcher::builder(f.core()).workers(4);
    for (i, r) in remotes.iter().enumerate() {
        builder = builder.handle(format!("dest{i}"), r.handler());
    }
    let dispatcher = builder.start()?;
    wait_until("all three held back, their events given back", || {
        dispatcher.destinations().len() == 3 && f.store.stats().is_ok_and(|s| s.processing == 0)
    })?;
    let calls = |rs: &[Remote]| rs.iter().map(Remote::calls).sum::<u64>();
    let first = calls(&remotes);
    let hours = 7 * 24;
    for _ in 0..hours {
        let before = calls(&remotes);
        f.advance(secs(3600));
        dispatcher.wake();
        // Each of the three is probed once in this hour's step.
        wait_until("three probes", || calls(&remotes) == before + 3)?;
        // Given back and written before the clock moves on (a lease that
        // ran out while the clock jumped would count as a crash).
        wait_until("the probes given back", || {
            f.store.stats().is_ok_and(|s| s.processing == 0)
                && dispatcher
                    .destinations()
                    .iter()
                    .all(|s| s.next_probe_at.is_some())
        })?;
    }
    assert_eq!(calls(&remotes), first + 3 * hours);
    let stats = f.store.stats()?;
    assert_eq!((stats.pending, stats.failed), (n, 0));
    assert!(all(&f, Status::Pending)?.iter().all(|e| e.attempts == 0));
    for r in &remotes {
        r.down.store(false, Ordering::SeqCst);
    }
    dispatcher.set_online(true);
    wait_until("everything delivered", || {
        remotes.iter().map(Remote::accepted).sum::<usize>() == n as usize
    })?;
    let report = dispatcher.drain(WAIT);
    assert_eq!((report.metrics.failed, report.metrics.retried), (0, 0));
    let stats = f.store.stats()?;
    assert_eq!(stats.done, n);
    for r in &remotes {
        let accepted = r.accepted.lock().map_err(|_| "poisoned")?.clone();
        let mut last: HashMap<String, i64> = HashMap::new();
        for (key, i) in accepted {
            let prev = last.insert(key.clone(), i);
            assert!(
                prev.is_none_or(|p| p < i),
                "order of {key}: {prev:?} then {i}"
            );
        }
    }
    Ok(())
}

/// A month offline keeps everything; with `max_age`, events older than it
/// are given up unrun when the dispatcher next sees them. One exactly
/// `max_age` old is not older, and runs.
fn max_age_gives_up_on_old_events_unrun(f: Fixture) -> TestResult {
    let api = Remote::default();
    let old = f
        .store
        .enqueue(NewEvent::new("api.push", json!({"n": 1})))?;
    f.advance(secs(25 * 3600));
    let edge = f
        .store
        .enqueue(NewEvent::new("api.push", json!({"n": 3})))?;
    f.advance(secs(47 * 3600));
    let fresh = f
        .store
        .enqueue(NewEvent::new("api.push", json!({"n": 2})))?;
    f.advance(secs(3600));
    let report = Dispatcher::builder(f.core())
        .max_age(secs(2 * 24 * 3600))
        .handle("api.push", api.handler())
        .start()?
        .drain(WAIT);
    assert_eq!((report.metrics.failed, report.metrics.done), (1, 2));
    assert_eq!(api.calls(), 2, "the old one is not run");
    let gone = f.store.find(old.id)?.ok_or("gone")?;
    assert_eq!(gone.status, Status::Failed);
    let note = gone.last_error.unwrap_or_default();
    assert!(
        note.contains("3d 1h old") && note.contains("max_age of 2d 0h"),
        "{note}"
    );
    for kept in [fresh.id, edge.id] {
        assert_eq!(f.store.find(kept)?.map(|e| e.status), Some(Status::Done));
    }
    Ok(())
}

/// An hour of "503, come back in 2 minutes" on the manual clock, minute
/// by minute: no attempt spent, nothing failed, one request per probe,
/// never sooner than asked and no more often than the probe backoff
/// (which grows to 5 minutes), then everything delivered once it
/// recovers.
fn an_hour_of_busy_answers_spends_no_attempt(f: Fixture) -> TestResult {
    let busy = Arc::new(AtomicBool::new(true));
    let calls = Arc::new(AtomicU64::new(0));
    let delivered = Arc::new(AtomicU64::new(0));
    let (b, c, d) = (busy.clone(), calls.clone(), delivered.clone());
    f.store.enqueue_batch(
        (0..20)
            .map(|n| NewEvent::new("api.push", json!({ "n": n })))
            .collect(),
    )?;
    let dispatcher = Dispatcher::builder(f.core())
        .workers(2)
        .poll_interval(millis(20))
        .handle("api.push", move |_: &Event| {
            c.fetch_add(1, Ordering::SeqCst);
            if b.load(Ordering::SeqCst) {
                return Err(HandlerError::busy("HTTP 503: overloaded", Some(secs(120))));
            }
            d.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .start()?;
    wait_until("held back, its events given back", || {
        dispatcher.destinations().len() == 1 && f.store.stats().is_ok_and(|s| s.processing == 0)
    })?;
    let first = calls.load(Ordering::SeqCst);
    assert!(first <= 2, "one call per worker at most: {first}");
    let held = &dispatcher.destinations()[0];
    let asked = (held.next_probe_at.ok_or("no probe")? - f.store.clock().now()).num_seconds();
    assert!(
        (119..=121).contains(&asked),
        "the probe waits as asked: {asked} s"
    );
    for _ in 0..60 {
        f.advance(secs(60));
        dispatcher.wake();
        std::thread::sleep(millis(30));
        wait_until("the probe given back", || {
            f.store.stats().is_ok_and(|s| s.processing == 0)
                && dispatcher
                    .destinations()
                    .iter()
                    .all(|s| s.next_probe_at.is_some())
        })?;
    }
    let during = calls.load(Ordering::SeqCst);
    assert!(
        (10..=32).contains(&during),
        "an hour of busy answers took {during} requests"
    );
    let events = all(&f, Status::Pending)?;
    assert_eq!(events.len(), 20);
    assert!(events.iter().all(|e| e.attempts == 0), "no attempt spent");
    assert!(events.iter().all(|e| e
        .last_error
        .as_deref()
        .is_none_or(|m| m == "HTTP 503: overloaded")));
    // It recovers: the next probe gets through and everything flows.
    busy.store(false, Ordering::SeqCst);
    next_probe(&f, &dispatcher, "api.push")?;
    wait_until("everything delivered", || {
        delivered.load(Ordering::SeqCst) == 20
    })?;
    let report = dispatcher.drain(WAIT);
    assert_eq!((report.metrics.failed, report.metrics.retried), (0, 0));
    assert!(all(&f, Status::Done)?.iter().all(|e| e.attempts == 1));
    Ok(())
}

#[test]
fn probe_schedule_constants() {
    assert_eq!(Dispatcher::FIRST_PROBE_AFTER, secs(1));
    assert_eq!(Dispatcher::MAX_PROBE_INTERVAL, secs(300));
}

macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $( #[test] fn $name() -> super::TestResult { super::$name(super::Fixture::memory()) } )*
        }
        mod sqlite {
            $( #[test] fn $name() -> super::TestResult { super::$name(super::Fixture::sqlite()) } )*
        }
    };
}

both_stores!(
    unreachable_spends_nothing_and_a_probe_brings_it_back,
    paused_and_offline_claim_nothing_until_told,
    a_shared_destination_holds_all_its_types,
    drain_does_not_wait_for_an_unreachable_destination,
    drain_while_offline_returns_at_once,
    a_week_offline_loses_and_spends_nothing,
    max_age_gives_up_on_old_events_unrun,
    an_hour_of_busy_answers_spends_no_attempt,
);
