//! Unit tests of the module beside this file.

use std::sync::Arc;
use std::time::Duration;

use chrono::Duration as ChronoDuration;
use serde_json::json;

use super::sealed::TypeFilter;
use super::Store;
use crate::{Clock, ManualClock, MemoryStore, NewEvent, SqliteStore};

/// What the dispatcher's poller sleeps until, on both stores.
fn next_wakeup_is_the_earliest_future_time(
    store: &impl Store,
    clock: &ManualClock,
) -> crate::Result<()> {
    let all = TypeFilter::default();
    assert_eq!(store.next_wakeup(&all)?, None);
    let now = clock.now();
    let secs = Duration::from_secs;
    store.enqueue(NewEvent::new("a", json!({})).with_delay(secs(50)))?;
    store.enqueue(NewEvent::new("b", json!({})).with_delay(secs(20)))?;
    store.enqueue(NewEvent::new("c", json!({})))?;
    assert_eq!(
        store.next_wakeup(&all)?,
        Some(now + ChronoDuration::seconds(20))
    );
    let a = ["a".to_owned()];
    assert_eq!(
        store.next_wakeup(&TypeFilter::only(Some(&a)))?,
        Some(now + ChronoDuration::seconds(50))
    );
    let b = ["b".to_owned()];
    let skip_b = TypeFilter {
        only: None,
        skip: &b,
    };
    assert_eq!(
        store.next_wakeup(&skip_b)?,
        Some(now + ChronoDuration::seconds(50)),
        "skipped types are not waited for"
    );
    store.claim(10, secs(5), Some(&["c".into()]))?;
    assert_eq!(
        store.next_wakeup(&all)?,
        Some(now + ChronoDuration::seconds(5)),
        "a lease runs out"
    );
    Ok(())
}

/// The completer's write: outcomes first, then a claim that sees them
/// (the next event of an ordering key is free at once), on both stores.
fn settle_and_claim_writes_then_claims(store: &impl Store) -> crate::Result<()> {
    let lease = Duration::from_secs(30);
    let key = |n: i32| NewEvent::new("t", json!(n)).with_ordering_key("k");
    let (first, second) = (store.enqueue(key(1))?, store.enqueue(key(2))?);
    store.enqueue(NewEvent::new("other", json!(3)))?;
    let claimed = store.claim(10, lease, Some(&["t".into()]))?;
    assert_eq!(claimed.iter().map(|e| e.id).collect::<Vec<_>>(), [first.id]);
    let done = super::Ack::complete(claimed[0].lease().expect("claimed"));
    let only_t = ["t".to_owned()];
    let (results, next) = store.settle_and_claim(
        std::slice::from_ref(&done),
        10,
        lease,
        &TypeFilter::only(Some(&only_t)),
    )?;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(next.iter().map(|e| e.id).collect::<Vec<_>>(), [second.id]);
    assert_eq!(
        store.find(first.id)?.map(|e| e.status),
        Some(crate::Status::Done)
    );
    // Written once only: the same outcome again is refused, and a limit
    // of 0 claims nothing.
    let again_done = super::Ack::complete(next[0].lease().expect("claimed"));
    let (again, none) =
        store.settle_and_claim(&[done, again_done], 0, lease, &TypeFilter::default())?;
    assert!(again[0].is_err() && again[1].is_ok(), "{again:?}");
    assert!(none.is_empty());
    assert!(store.backlog(None)?.due, "the other type still waits");
    Ok(())
}

#[test]
fn settle_and_claim_on_both_stores() -> Result<(), Box<dyn std::error::Error>> {
    settle_and_claim_writes_then_claims(&MemoryStore::new())?;
    let dir = tempfile::tempdir()?;
    settle_and_claim_writes_then_claims(&SqliteStore::open(dir.path().join("o.db"))?)?;
    Ok(())
}

/// A claim of several types finds them behind a long front of other types
/// (more than a front read looks at), in order, on both stores.
fn several_types_behind_others(store: &impl Store) -> crate::Result<()> {
    let lease = Duration::from_secs(30);
    for i in 0..300 {
        store.enqueue(NewEvent::new("x", json!(i)))?;
    }
    let a1 = store.enqueue(NewEvent::new("a", json!("a1")).with_ordering_key("k"))?;
    let b1 = store.enqueue(NewEvent::new("b", json!("b1")))?;
    store.enqueue(NewEvent::new("a", json!("a2")).with_ordering_key("k"))?;
    let b2 = store.enqueue(NewEvent::new("b", json!("b2")))?;
    let ab = ["a".to_owned(), "b".to_owned()];
    let ids = |events: Vec<crate::Event>| events.into_iter().map(|e| e.id).collect::<Vec<_>>();
    assert_eq!(ids(store.claim(2, lease, Some(&ab))?), [a1.id, b1.id]);
    // `a2` waits for `a1`, its key's head.
    assert_eq!(ids(store.claim(10, lease, Some(&ab))?), [b2.id]);
    // And again, now that the front of `x` is known.
    store.enqueue(NewEvent::new("b", json!("b3")))?;
    assert_eq!(store.claim(10, lease, Some(&ab))?.len(), 1);
    Ok(())
}

#[test]
fn several_types_behind_others_on_both_stores() -> Result<(), Box<dyn std::error::Error>> {
    several_types_behind_others(&MemoryStore::new())?;
    let dir = tempfile::tempdir()?;
    several_types_behind_others(&SqliteStore::open(dir.path().join("o.db"))?)?;
    Ok(())
}

/// How the dispatcher notices other processes' commits.
#[test]
fn external_changes_are_noticed_once() -> Result<(), Box<dyn std::error::Error>> {
    use super::sealed::Sealed;
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("o.db"))?;
    assert!(store.has_external_changes()?, "the first look");
    assert!(!store.has_external_changes()?, "nothing since");
    let other = rusqlite::Connection::open(store.path())?;
    other.execute(
        "INSERT INTO outbox_events (event_type, payload) VALUES ('t', '{}')",
        [],
    )?;
    assert!(store.has_external_changes()?, "another connection wrote");
    assert!(!store.has_external_changes()?, "and nothing since");
    let memory = MemoryStore::new();
    assert!(!memory.has_external_changes()?);
    Ok(())
}

#[test]
fn next_wakeup_on_both_stores() -> Result<(), Box<dyn std::error::Error>> {
    let clock = ManualClock::new();
    let memory = MemoryStore::builder()
        .clock(Arc::new(clock.clone()))
        .build();
    next_wakeup_is_the_earliest_future_time(&memory, &clock)?;
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let sqlite = SqliteStore::builder(dir.path().join("o.db"))
        .clock(Arc::new(clock.clone()))
        .build()?;
    next_wakeup_is_the_earliest_future_time(&sqlite, &clock)?;
    Ok(())
}

/// Every live subscriber hears of each enqueue, requeue and skipped
/// backoff in this process; one that went away is dropped.
fn enqueues_wake_subscribers(store: &impl super::Operator) -> crate::Result<()> {
    let (a, b) = (store.subscribe(), store.subscribe());
    drop(b);
    assert_eq!(store.last_enqueues(), [None, None]);
    let started = std::time::Instant::now();
    for n in 0..2 {
        store.enqueue(NewEvent::new("t", serde_json::json!(n)))?;
        assert!(a.try_recv().is_ok(), "enqueue {n} was not heard");
        assert!(a.try_recv().is_err(), "one message per wake-up");
    }
    // Both enqueues are known, the latest first (the pacing's signal).
    let [Some(last), Some(before)] = store.last_enqueues() else {
        panic!("{:?}", store.last_enqueues());
    };
    assert!(started <= before && before <= last, "{before:?} {last:?}");
    let c = store.subscribe();
    let drain = || while a.try_recv().is_ok() || c.try_recv().is_ok() {};
    let claimed = store.claim(2, Duration::from_secs(30), None)?;
    let lease = |i: usize| claimed[i].lease().ok_or(crate::Error::invalid("lease"));
    store.retry(&lease(0)?, "x", None)?;
    drain();
    store.skip_backoff(None)?;
    assert!(a.try_recv().is_ok() && c.try_recv().is_ok(), "skip_backoff");
    store.fail(&lease(1)?, "x")?;
    drain();
    assert_eq!(store.requeue(super::Requeue::All)?, 1);
    assert!(a.try_recv().is_ok() && c.try_recv().is_ok(), "requeue");
    Ok(())
}

#[test]
fn subscribers_hear_of_enqueues_on_both_stores() -> Result<(), Box<dyn std::error::Error>> {
    let memory = MemoryStore::new();
    enqueues_wake_subscribers(&memory)?;
    assert!(
        format!("{memory:?}").starts_with("MemoryStore"),
        "{memory:?}"
    );
    let dir = tempfile::tempdir()?;
    enqueues_wake_subscribers(&SqliteStore::open(dir.path().join("o.db"))?)?;
    Ok(())
}

/// Limits kept in the store: a concurrency limit counted from the live
/// leases of its types, a rate limit's bucket taken from and refilled on
/// the store's clock; the two together allow the smaller.
fn shared_limits_hold(store: &impl Store, clock: &ManualClock) -> crate::Result<()> {
    use super::limits::SharedLimit;
    use super::{LimitKind, LimitScope};
    let lease = Duration::from_secs(30);
    for i in 0..20 {
        store.enqueue(NewEvent::new("t", json!(i)))?;
        store.enqueue(NewEvent::new("other", json!(i)))?;
    }
    let t = ["t".to_owned()];
    let filter = TypeFilter::only(Some(&t));
    let two_at_once = [SharedLimit {
        scope: LimitScope::Type,
        name: "t",
        kind: LimitKind::Concurrency(2),
    }];
    let got = store.claim_limited(10, lease, &filter, &two_at_once)?;
    assert_eq!((got.events.len(), got.allowed), (2, 2));
    assert!(got.events.iter().all(|e| e.event_type == "t"));
    // Other types' leases do not count; these two do, until one ends.
    store.claim(5, lease, Some(&["other".to_owned()]))?;
    let none = store.claim_limited(10, lease, &filter, &two_at_once)?;
    assert_eq!((none.events.len(), none.allowed), (0, 0));
    let first = got.events[0]
        .lease()
        .ok_or(crate::Error::invalid("no lease"))?;
    store.complete(&first)?;
    assert_eq!(
        store
            .claim_limited(10, lease, &filter, &two_at_once)?
            .events
            .len(),
        1
    );
    // A lease that ran out holds nothing.
    clock.advance(lease);
    let after = store.claim_limited(10, lease, &filter, &two_at_once)?;
    assert_eq!(after.events.len(), 2);

    // Three per second, on the store's clock.
    let rate = [SharedLimit {
        scope: LimitScope::Destination,
        name: "api",
        kind: LimitKind::Rate {
            max: 3,
            per: Duration::from_secs(1),
        },
    }];
    let burst = store.claim_limited(10, lease, &filter, &rate)?;
    assert_eq!(
        (burst.events.len(), burst.next_at),
        (3, Some(clock.now() + ChronoDuration::milliseconds(333)))
    );
    let dry = store.claim_limited(10, lease, &filter, &rate)?;
    assert_eq!(dry.events.len(), 0);
    clock.advance(Duration::from_millis(340));
    assert_eq!(
        store.claim_limited(10, lease, &filter, &rate)?.events.len(),
        1
    );
    clock.advance(Duration::from_secs(60));
    // Full again, but never more than the bucket holds.
    assert_eq!(
        store.claim_limited(10, lease, &filter, &rate)?.events.len(),
        3
    );
    // Both: the smaller allowance wins (every lease above ran out).
    clock.advance(Duration::from_secs(60));
    let both = [two_at_once[0], rate[0]];
    let got = store.claim_limited(10, lease, &filter, &both)?;
    assert_eq!((got.events.len(), got.allowed), (2, 2));
    let got = store.claim_limited(10, lease, &filter, &both)?;
    assert_eq!((got.events.len(), got.allowed), (0, 0));
    clock.advance(Duration::from_millis(400));
    // One token back, no slot free.
    assert_eq!(store.claim_limited(10, lease, &filter, &both)?.allowed, 0);
    Ok(())
}

#[test]
fn shared_limits_hold_on_every_store() -> Result<(), Box<dyn std::error::Error>> {
    let clock = ManualClock::new();
    let memory = MemoryStore::builder()
        .clock(Arc::new(clock.clone()))
        .build();
    shared_limits_hold(&memory, &clock)?;
    let clock = ManualClock::new();
    let dir = tempfile::tempdir()?;
    let sqlite = SqliteStore::builder(dir.path().join("o.db"))
        .clock(Arc::new(clock.clone()))
        .build()?;
    shared_limits_hold(&sqlite, &clock)?;
    #[cfg(feature = "postgres")]
    if let Ok(url) = std::env::var("OUTBOX_TEST_POSTGRES") {
        let clock = ManualClock::new();
        let schema = format!("t_limits_{}", std::process::id());
        let pg = crate::PostgresStore::builder(&url)
            .schema(&schema)
            .clock(Arc::new(clock.clone()))
            .build()?;
        let result = shared_limits_hold(&pg, &clock);
        let mut admin = postgres::Client::connect(&url, postgres::NoTls)?;
        admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))?;
        result?;
    } else if std::env::var_os("CI").is_some() {
        return Err("CI runs this against PostgreSQL: set OUTBOX_TEST_POSTGRES".into());
    }
    Ok(())
}
