//! Concurrency and rate limits, observed from the handlers: never exceeded,
//! by one dispatcher or by several sharing a store, and no attempt spent
//! while an event waits for a limit.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{wait_until, TestResult};
use serde_json::json;
use sqlite_outbox::{
    Dispatcher, Event, Limit, LimitScope, NewEvent, Operator, SqliteStore, Status, Store, Why,
};

/// How many handlers run at once, and the most that ever did.
#[derive(Default)]
struct Gauge {
    now: AtomicUsize,
    most: AtomicUsize,
}

impl Gauge {
    fn enter(&self) {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(n, Ordering::SeqCst);
    }

    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }

    fn most(&self) -> usize {
        self.most.load(Ordering::SeqCst)
    }
}

/// A handler that counts itself in `gauge` while it sleeps `for_`.
fn slow(
    gauge: Arc<Gauge>,
    for_: Duration,
) -> impl Fn(&Event) -> Result<(), sqlite_outbox::HandlerError> {
    move |_| {
        gauge.enter();
        std::thread::sleep(for_);
        gauge.leave();
        Ok(())
    }
}

fn every_event_done_in_one_attempt(store: &dyn Operator, n: usize) -> TestResult {
    let events = store.list(&sqlite_outbox::ListFilter {
        limit: 10_000,
        ..Default::default()
    })?;
    assert_eq!(events.len(), n);
    for e in &events {
        assert_eq!((e.status, e.attempts), (Status::Done, 1), "{e:?}");
    }
    Ok(())
}

#[test]
fn a_concurrency_limit_is_never_exceeded_and_other_types_flow() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("o.db"))?;
    for i in 0..16 {
        store.enqueue(NewEvent::new("mail", json!(i)))?;
        store.enqueue(NewEvent::new("sync", json!(i)))?;
    }
    let (mail, sync) = (Arc::new(Gauge::default()), Arc::new(Gauge::default()));
    let dispatcher = Dispatcher::builder(store.clone())
        .workers(6)
        .handle("mail", slow(mail.clone(), Duration::from_millis(25)))
        .handle("sync", slow(sync.clone(), Duration::from_millis(5)))
        .limit(Limit::concurrency(LimitScope::Type, "mail", 2))
        .start()?;
    // While mail waits for its slots, the operator sees why.
    wait_until(30, "mail to wait for its limit", || {
        Ok(store.limits()?.iter().any(|l| l.limited_since.is_some()))
    })?;
    let waiting = store
        .list(&sqlite_outbox::ListFilter {
            status: Some(Status::Pending),
            event_type: Some("mail".into()),
            limit: 1,
            ..Default::default()
        })?
        .into_iter()
        .next();
    if let Some(e) = waiting {
        match store.why(&e)? {
            Why::Limited(l) => {
                assert_eq!((l.name.as_str(), l.kind.max()), ("mail", 2));
                let said = store.why(&e)?.to_string();
                assert!(said.contains("every slot is taken"), "{said}");
            }
            // Its turn came between the two reads.
            Why::Leased { .. } | Why::Done => {}
            other => return Err(format!("mail waits, but why says {other}").into()),
        }
    }
    assert!(dispatcher.wait_idle(Duration::from_secs(60)));
    let report = dispatcher.shutdown(Duration::from_secs(10));
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(mail.most(), 2, "the limit is the most, and it was used");
    every_event_done_in_one_attempt(&store, 32)?;
    // Nothing waits any more, and the operator sees that too.
    let limits = store.stats()?.limits;
    assert_eq!(limits.len(), 1, "{limits:?}");
    assert_eq!(
        (limits[0].limited_since, limits[0].in_flight),
        (None, Some(0))
    );
    Ok(())
}

/// A limit wider than a claim lets the usual claims take its events
/// while it has room for a whole claim; it still holds when it fills.
#[test]
fn a_limit_wider_than_a_claim_still_holds() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("o.db"))?;
    for i in 0..40 {
        store.enqueue(NewEvent::new("job", json!(i)))?;
        store.enqueue(NewEvent::new("call", json!(i)))?;
    }
    let gauge = Arc::new(Gauge::default());
    let starts: Starts = Arc::default();
    let per = Duration::from_millis(200);
    let dispatcher = Dispatcher::builder(store.clone())
        .workers(8)
        .batch_size(2)
        .handle("job", slow(gauge.clone(), Duration::from_millis(20)))
        .handle("call", recording(starts.clone()))
        .limit(Limit::concurrency(LimitScope::Type, "job", 5))
        .limit(Limit::rate(LimitScope::Type, "call", 6, per))
        .start()?;
    assert!(dispatcher.wait_idle(Duration::from_secs(60)));
    assert!(dispatcher.shutdown(Duration::from_secs(10)).is_clean());
    assert!(gauge.most() <= 5, "{} at once", gauge.most());
    assert!(gauge.most() >= 3, "{} at once", gauge.most());
    paced(&starts, 6, per)?;
    every_event_done_in_one_attempt(&store, 80)
}

#[test]
fn a_shared_concurrency_limit_holds_across_dispatchers() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("o.db");
    let stores = [SqliteStore::open(&path)?, SqliteStore::open(&path)?];
    shared_concurrency(&[stores[0].clone().into(), stores[1].clone().into()])?;
    every_event_done_in_one_attempt(&stores[0], 24)
}

/// Two dispatchers (each on its own store, the way two processes would
/// be) under one limit of 3 across dispatchers, 4 workers each.
fn shared_concurrency(stores: &[Arc<dyn Store>; 2]) -> TestResult {
    for i in 0..24 {
        stores[0].enqueue(NewEvent::new("report", json!(i)))?;
    }
    let gauge = Arc::new(Gauge::default());
    let dispatchers = stores
        .iter()
        .map(|s| {
            Dispatcher::builder(s.clone())
                .workers(4)
                .poll_interval(Duration::from_millis(20))
                .handle("report", slow(gauge.clone(), Duration::from_millis(30)))
                .limit(Limit::concurrency(LimitScope::Type, "report", 3).across_dispatchers())
                .start()
        })
        .collect::<Result<Vec<_>, _>>()?;
    for d in dispatchers {
        assert!(d.wait_idle(Duration::from_secs(60)));
        assert!(d.shutdown(Duration::from_secs(10)).is_clean());
    }
    assert!(gauge.most() <= 3, "{} at once", gauge.most());
    assert!(gauge.most() >= 2, "the two dispatchers shared the work");
    Ok(())
}

/// Claim times (the leases' `locked_at`), sorted.
type Starts = Arc<Mutex<Vec<DateTime<Utc>>>>;

fn recording(starts: Starts) -> impl Fn(&Event) -> Result<(), sqlite_outbox::HandlerError> {
    move |e| {
        if let (Some(at), Ok(mut v)) = (e.locked_at, starts.lock()) {
            v.push(at);
        }
        Ok(())
    }
}

/// No window of `per` holds more claims than the bucket allows: `max`,
/// plus what it refills over the window, plus one for the millisecond
/// the times are cut to.
fn paced(starts: &Starts, max: usize, per: Duration) -> TestResult {
    let mut v = starts.lock().map_err(|_| "poisoned")?.clone();
    v.sort();
    let per = chrono::Duration::from_std(per)?;
    for (i, t) in v.iter().enumerate() {
        let inside = v[i..].iter().take_while(|u| **u - *t < per).count();
        assert!(
            inside <= 2 * max + 1,
            "{inside} claims within {per} from {t}"
        );
    }
    // And it cannot be faster than the rate: after the first burst, one
    // per `per / max`; less one `per` for the first claim, whose time is
    // read a moment after its bucket was (longer on a busy machine).
    if let (Some(first), Some(last)) = (v.first(), v.last()) {
        let least = per * ((v.len() - max) as i32) / (max as i32);
        assert!(*last - *first >= least - per, "{v:?}");
    }
    Ok(())
}

#[test]
fn a_rate_limit_paces_claims_and_spends_no_attempts() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("o.db"))?;
    for i in 0..20 {
        store.enqueue(NewEvent::new("api.call", json!(i)))?;
    }
    let starts: Starts = Arc::default();
    let per = Duration::from_millis(200);
    let dispatcher = Dispatcher::builder(store.clone())
        .handle("api.call", recording(starts.clone()))
        .default_destination("api")
        .limit(Limit::rate(LimitScope::Destination, "api", 4, per))
        .start()?;
    assert!(dispatcher.wait_idle(Duration::from_secs(60)));
    assert!(dispatcher.shutdown(Duration::from_secs(10)).is_clean());
    paced(&starts, 4, per)?;
    every_event_done_in_one_attempt(&store, 20)
}

#[test]
fn a_shared_rate_limit_paces_two_dispatchers_together() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("o.db");
    let stores = [SqliteStore::open(&path)?, SqliteStore::open(&path)?];
    shared_rate(&[stores[0].clone().into(), stores[1].clone().into()])?;
    every_event_done_in_one_attempt(&stores[0], 20)
}

fn shared_rate(stores: &[Arc<dyn Store>; 2]) -> TestResult {
    for i in 0..20 {
        stores[0].enqueue(NewEvent::new("api.call", json!(i)))?;
    }
    let starts: Starts = Arc::default();
    let per = Duration::from_millis(200);
    let dispatchers = stores
        .iter()
        .map(|s| {
            Dispatcher::builder(s.clone())
                .poll_interval(Duration::from_millis(20))
                .handle("api.call", recording(starts.clone()))
                .limit(Limit::rate(LimitScope::Type, "api.call", 4, per).across_dispatchers())
                .start()
        })
        .collect::<Result<Vec<_>, _>>()?;
    for d in dispatchers {
        assert!(d.wait_idle(Duration::from_secs(60)));
        assert!(d.shutdown(Duration::from_secs(10)).is_clean());
    }
    paced(&starts, 4, per)
}

/// A dispatcher that stops leaves no event waiting for its limits: the
/// events it held back are due for the next one.
#[test]
fn a_stopped_dispatcher_leaves_nothing_waiting_for_its_limits() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("o.db"))?;
    for i in 0..3 {
        store.enqueue(NewEvent::new("t", json!(i)))?;
    }
    let dispatcher = Dispatcher::builder(store.clone())
        .handle("t", |_: &Event| Ok(()))
        .limit(Limit::rate(
            LimitScope::Type,
            "t",
            1,
            Duration::from_secs(600),
        ))
        .start()?;
    wait_until(30, "t to wait for its limit", || {
        Ok(store.limits()?.iter().any(|l| l.limited_since.is_some()))
    })?;
    assert!(dispatcher.shutdown(Duration::from_secs(10)).is_clean());
    let limits = store.limits()?;
    assert_eq!(limits.len(), 1);
    assert_eq!(limits[0].limited_since, None, "{limits:?}");
    let pending = store.list(&sqlite_outbox::ListFilter {
        status: Some(Status::Pending),
        ..Default::default()
    })?;
    assert_eq!(pending.len(), 2);
    assert_eq!(store.why(&pending[0])?, Why::Due);
    Ok(())
}

#[test]
fn limits_that_cannot_hold_are_refused_at_start() -> TestResult {
    let store = sqlite_outbox::MemoryStore::new();
    let ok = |_: &Event| Ok(());
    for (builder, says) in [
        (
            Dispatcher::builder(store.clone())
                .handle("a", ok)
                .limit(Limit::concurrency(LimitScope::Type, "b", 1)),
            "no handler",
        ),
        (
            Dispatcher::builder(store.clone())
                .handle("a", ok)
                .limit(Limit::concurrency(LimitScope::Type, "a", 0)),
            "1 to",
        ),
        (
            Dispatcher::builder(store.clone())
                .handle("a", ok)
                .limit(Limit::concurrency(LimitScope::Type, "a", 1))
                .limit(Limit::concurrency(LimitScope::Type, "a", 2)),
            "two concurrency limits",
        ),
        (
            Dispatcher::builder(store.clone())
                .handle("a", ok)
                .destination("crm", ["a"])
                .limit(Limit::concurrency(LimitScope::Type, "a", 1))
                .limit(Limit::rate(
                    LimitScope::Destination,
                    "crm",
                    1,
                    Duration::from_secs(1),
                )),
            "keep one",
        ),
        (
            Dispatcher::builder(store.clone())
                .handle("a", ok)
                .limit(Limit::rate(LimitScope::Type, "a", 1, Duration::ZERO)),
            "at least 1 ms",
        ),
    ] {
        let err = builder.start().err().ok_or("started")?;
        assert!(err.to_string().contains(says), "{err}");
    }
    Ok(())
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use common::pg::Schema;
    use sqlite_outbox::PostgresStore;

    fn two_stores(schema: &Schema) -> Result<[Arc<dyn Store>; 2], Box<dyn std::error::Error>> {
        let open = || {
            PostgresStore::builder(&schema.url)
                .schema(&schema.name)
                .build()
        };
        Ok([Arc::new(open()?), Arc::new(open()?)])
    }

    #[test]
    #[cfg_attr(
        outbox_no_test_server,
        ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
    )]
    fn limits_hold_across_dispatchers_on_postgres() -> TestResult {
        let Some(schema) = Schema::fresh() else {
            return Ok(());
        };
        shared_concurrency(&two_stores(&schema)?)?;
        let Some(rates) = Schema::fresh() else {
            return Ok(());
        };
        shared_rate(&two_stores(&rates)?)?;
        Ok(())
    }
}
