//! One behavioural suite, run against both stores: `MemoryStore` (the
//! reference model) and `SqliteStore` must agree on every case.

mod common;

use chrono::Duration as ChronoDuration;
use common::{millis, secs, Fixture, TestResult};
use serde_json::json;
use sqlite_outbox::{
    catalog::OutboxEventType, Ack, ErrorKind, Event, ListFilter, NewEvent, Requeue, RetryPolicy,
    Status, Subject, Why, LEASE_EXPIRED_ERROR,
};
use uuid::Uuid;

const LEASE: std::time::Duration = std::time::Duration::from_secs(30);

fn ev(kind: &str) -> NewEvent {
    NewEvent::new(kind, json!({"to": "test@example.com"}))
}

fn get(f: &Fixture, e: &Event) -> Result<Event, Box<dyn std::error::Error>> {
    Ok(f.store.find(e.id)?.ok_or("event vanished")?)
}

// ---- priorities --------------------------------------------------------

fn ids<'a>(events: impl IntoIterator<Item = &'a Event>) -> Vec<Uuid> {
    events.into_iter().map(|e| e.id.as_uuid()).collect()
}

/// Higher priority first; equal priorities in (due time, enqueue order);
/// an event that is not due waits whatever its priority.
fn higher_priority_is_claimed_first(f: &Fixture) -> TestResult {
    let a = f.store.enqueue(ev("t"))?;
    let h1 = f.store.enqueue(ev("t").with_priority(5))?;
    let m = f.store.enqueue(ev("t").with_priority(2))?;
    let later = f
        .store
        .enqueue(ev("t").with_priority(9).with_delay(secs(10)))?;
    let b = f.store.enqueue(ev("t"))?;
    let early_h2 = f.store.enqueue(
        ev("t")
            .with_priority(5)
            .with_run_at(f.clock.now_utc() - ChronoDuration::seconds(5)),
    )?;
    assert_eq!(f.store.find(h1.id)?.map(|e| e.priority), Some(5));
    let urgent: Vec<(u8, u64, u64)> = f
        .store
        .stats()?
        .by_priority
        .iter()
        .map(|p| (p.priority, p.pending, p.due))
        .collect();
    assert_eq!(urgent, [(9, 1, 0), (5, 2, 2), (2, 1, 1)]);
    let first = f.store.claim(1, LEASE, None)?;
    assert_eq!(ids(&first), ids([&early_h2]));
    let next = f.store.claim(2, LEASE, None)?;
    assert_eq!(ids(&next), ids([&h1, &m]), "{next:#?}");
    let rest = f.store.claim(10, LEASE, None)?;
    assert_eq!(ids(&rest), ids([&a, &b]), "not due yet: {rest:#?}");
    f.advance(secs(10));
    assert_eq!(ids(&f.store.claim(10, LEASE, None)?), ids([&later]));
    Ok(())
}

/// Priority orders what a claim of given types takes, too (one type, and
/// several, which read the front of the queue first).
fn priorities_hold_within_typed_claims(f: &Fixture) -> TestResult {
    for _ in 0..6 {
        f.store.enqueue(ev("a"))?;
        f.store.enqueue(ev("other"))?;
    }
    let urgent_other = f.store.enqueue(ev("other").with_priority(4))?;
    let urgent_b = f.store.enqueue(ev("b").with_priority(1))?;
    let urgent_a = f.store.enqueue(ev("a").with_priority(3))?;
    let only_a = ["a".to_owned()];
    let claimed = f.store.claim(2, LEASE, Some(&only_a))?;
    assert_eq!(claimed[0].id, urgent_a.id);
    assert_eq!(
        (claimed[1].event_type.as_str(), claimed[1].priority),
        ("a", 0)
    );
    let a_and_b = ["a".to_owned(), "b".to_owned()];
    let claimed = f.store.claim(2, LEASE, Some(&a_and_b))?;
    assert_eq!(claimed[0].id, urgent_b.id);
    assert_eq!(claimed[1].priority, 0);
    let rest = f.store.claim(20, LEASE, Some(&a_and_b))?;
    assert_eq!(rest.len(), 4);
    assert!(rest.iter().all(|e| e.event_type == "a"));
    let claimed = f.store.claim(1, LEASE, None)?;
    assert_eq!(claimed[0].id, urgent_other.id);
    Ok(())
}

/// An ordering key still wins: an urgent event never overtakes an earlier
/// one of its key, and frees nothing for the others.
fn a_priority_never_overtakes_its_ordering_key(f: &Fixture) -> TestResult {
    let head = f.store.enqueue(ev("t").with_ordering_key("k"))?;
    let urgent = f
        .store
        .enqueue(ev("t").with_ordering_key("k").with_priority(9))?;
    let other = f.store.enqueue(ev("t"))?;
    let claimed = f.store.claim(1, LEASE, None)?;
    assert_eq!(ids(&claimed), ids([&head]));
    assert_eq!(ids(&f.store.claim(10, LEASE, None)?), ids([&other]));
    let lease = claimed[0].lease().ok_or("no lease")?;
    f.store.complete(&lease)?;
    assert_eq!(ids(&f.store.claim(10, LEASE, None)?), ids([&urgent]));
    Ok(())
}

/// A retried urgent event waits out its backoff like any other, then goes
/// first again; an urgent event whose lease ran out is taken back before
/// due events of lower priority.
/// Leases that ran out are taken back by priority too.
fn expired_leases_are_reclaimed_by_priority(f: &Fixture) -> TestResult {
    let low = f.store.enqueue(ev("t"))?;
    let urgent = f.store.enqueue(ev("t").with_priority(1))?;
    assert_eq!(f.store.claim(2, secs(5), None)?.len(), 2);
    f.advance(secs(10));
    assert_eq!(ids(&f.store.claim(1, LEASE, None)?), ids([&urgent]));
    assert_eq!(ids(&f.store.claim(1, LEASE, None)?), ids([&low]));
    Ok(())
}

fn priorities_with_retries_and_expired_leases(f: &Fixture) -> TestResult {
    let low = f.store.enqueue(ev("t"))?;
    let urgent = f.store.enqueue(ev("t").with_priority(2))?;
    let claimed = f.store.claim(1, secs(5), None)?;
    assert_eq!(ids(&claimed), ids([&urgent]));
    f.advance(secs(5));
    let again = f.store.claim(1, LEASE, None)?;
    assert_eq!((again[0].id, again[0].attempts), (urgent.id, 2));
    let lease = again[0].lease().ok_or("no lease")?;
    f.store
        .settle(&[Ack::retry(lease, "busy", Some(secs(3)))])?
        .into_iter()
        .collect::<sqlite_outbox::Result<Vec<()>>>()?;
    assert_eq!(ids(&f.store.claim(1, secs(5), None)?), ids([&low]));
    f.advance(secs(3));
    let another = f.store.enqueue(ev("t"))?;
    // The low one's lease is still live; the urgent one is due again.
    // (Found by the differential test: an urgent event whose lease ran
    // out goes before one of priority 0 whose lease ran out earlier.)
    assert_eq!(
        ids(&f.store.claim(10, LEASE, None)?),
        ids([&urgent, &another])
    );
    Ok(())
}

// ---- the basic operations ----------------------------------------------

fn create_and_find_event(f: &Fixture) -> TestResult {
    let created = f.store.create(NewEvent::new(
        OutboxEventType::EmailVerification,
        json!({"to": "test@example.com"}),
    ))?;
    let found = f.store.find_by_id(created.id)?;
    assert_eq!(found.as_ref().map(|e| e.id), Some(created.id));
    let found = found.ok_or("missing")?;
    assert_eq!(found.event_type, "email.verification");
    assert_eq!(found.status, Status::Pending);
    assert_eq!(found.attempts, 0);
    assert_eq!(found.max_attempts, 10);
    assert_eq!(found.payload, json!({"to": "test@example.com"}));
    assert_eq!(found, created);
    assert!(f.store.find_by_id(sqlite_outbox::EventId::new())?.is_none());
    Ok(())
}

fn fetch_pending_events(f: &Fixture) -> TestResult {
    f.store.create(ev("email.invite"))?;
    let pending = f.store.fetch_pending(10, 300)?;
    assert_eq!(pending.len(), 1);
    Ok(())
}

fn fetch_pending_locks_events(f: &Fixture) -> TestResult {
    f.store.create(ev("email.invite"))?;
    assert_eq!(f.store.fetch_pending(10, 300)?.len(), 1);
    assert_eq!(f.store.fetch_pending(10, 300)?.len(), 0);
    Ok(())
}

fn fetch_pending_reclaims_stale_processing(f: &Fixture) -> TestResult {
    let e = f.store.create(ev("email.invite"))?;
    f.store.mark_processing(e.id)?;
    assert_eq!(f.store.fetch_pending(10, 60)?.len(), 0, "lease is live");
    f.advance(secs(120));
    let reclaimed = f.store.fetch_pending(10, 60)?;
    assert_eq!(reclaimed.len(), 1);
    assert_eq!(reclaimed[0].id, e.id);
    Ok(())
}

fn cleanup_removes_failed(f: &Fixture) -> TestResult {
    let now = f.clock.now_utc();
    f.clock.set(now - ChronoDuration::days(31));
    let e = f.store.create(ev("email.invite"))?;
    f.store.mark_failed(e.id, "boom")?;
    f.clock.set(now);
    let removed = f.store.cleanup_old(now - ChronoDuration::days(30))?;
    assert_eq!(removed, 1);
    assert!(f.store.find_by_id(e.id)?.is_none());
    Ok(())
}

fn mark_processing_and_done(f: &Fixture) -> TestResult {
    let e = f.store.create(NewEvent::new(
        OutboxEventType::EmailPasswordReset,
        json!({}),
    ))?;
    f.store.mark_processing(e.id)?;
    let found = get(f, &e)?;
    assert_eq!(found.status, Status::Processing);
    assert_eq!(found.attempts, 1);
    f.store.mark_done(e.id)?;
    let found = get(f, &e)?;
    assert_eq!(found.status, Status::Done);
    assert_eq!(found.completed_at, Some(f.clock.now_utc()));
    assert_eq!(found.locked_at, None);
    Ok(())
}

fn mark_retry_with_backoff(f: &Fixture) -> TestResult {
    let e = f.store.create(NewEvent::new(
        OutboxEventType::NotifyLoginThreshold,
        json!({}),
    ))?;
    f.store.mark_processing(e.id)?;
    f.store.mark_retry(e.id, "Connection timeout")?;
    let found = get(f, &e)?;
    assert_eq!(found.status, Status::Pending);
    assert_eq!(found.last_error.as_deref(), Some("Connection timeout"));
    assert!(found.next_attempt_at > f.clock.now_utc());
    Ok(())
}

fn mark_retry_first_failure_uses_30s_backoff(f: &Fixture) -> TestResult {
    let e = f
        .store
        .create(NewEvent::new(OutboxEventType::EmailVerification, json!({})))?;
    f.store.mark_processing(e.id)?;
    f.store.mark_retry(e.id, "fail")?;
    let updated = get(f, &e)?;
    assert_eq!(
        updated.next_attempt_at - f.clock.now_utc(),
        ChronoDuration::seconds(30)
    );
    Ok(())
}

// ---- the rest of the origin's operations --------------------------------

fn fetch_then_mark_processing_counts_one_attempt(f: &Fixture) -> TestResult {
    let e = f.store.create(ev("email.invite"))?;
    f.store.fetch_pending(10, 60)?;
    f.store.mark_processing(e.id)?;
    assert_eq!(get(f, &e)?.attempts, 1);
    Ok(())
}

fn mark_delivered_keeps_status(f: &Fixture) -> TestResult {
    let e = f.store.create(ev("email.invite"))?;
    f.store.mark_delivered(e.id)?;
    let found = get(f, &e)?;
    assert_eq!(found.delivered_at, Some(f.clock.now_utc()));
    assert_eq!(found.status, Status::Pending);
    Ok(())
}

fn mark_retry_at_max_attempts_fails(f: &Fixture) -> TestResult {
    let e = f.store.create(ev("email.invite").with_max_attempts(1))?;
    f.store.mark_processing(e.id)?;
    f.store.mark_retry(e.id, "last straw")?;
    let found = get(f, &e)?;
    assert_eq!(found.status, Status::Failed);
    assert_eq!(found.last_error.as_deref(), Some("last straw"));
    assert!(found.completed_at.is_some());
    Ok(())
}

fn counts(f: &Fixture) -> TestResult {
    let a = f.store.create(ev("a"))?;
    f.store.create(ev("b"))?;
    let c = f.store.create(ev("c"))?;
    f.store.mark_failed(a.id, "x")?;
    f.store.mark_done(c.id)?;
    assert_eq!(f.store.count_pending()?, 1);
    assert_eq!(f.store.count_failed()?, 1);
    Ok(())
}

fn unknown_ids_are_not_found(f: &Fixture) -> TestResult {
    let id = sqlite_outbox::EventId::new();
    for result in [
        f.store.mark_processing(id),
        f.store.mark_done(id),
        f.store.mark_delivered(id),
        f.store.mark_retry(id, "x"),
        f.store.mark_failed(id, "x"),
        f.store.requeue(Requeue::One(id)).map(|_| ()),
    ] {
        let err = result.expect_err("unknown id accepted");
        assert!(err.is_not_found(), "{err}");
    }
    Ok(())
}

// ---- claims and leases ----------------------------------------------------

fn claim_sets_lease_fields(f: &Fixture) -> TestResult {
    let e = f.store.enqueue(ev("t"))?;
    let now = f.clock.now_utc();
    let claimed = f.store.claim(10, LEASE, None)?;
    assert_eq!(claimed.len(), 1);
    let c = &claimed[0];
    assert_eq!(c.id, e.id);
    assert_eq!(c.status, Status::Processing);
    assert_eq!(c.attempts, 1);
    assert_eq!(c.locked_at, Some(now));
    assert_eq!(c.locked_until, Some(now + ChronoDuration::seconds(30)));
    assert!(c.lease_token.is_some());
    assert_eq!(&get(f, &e)?, c, "returned row equals stored row");
    let lease = c.lease().ok_or("no lease")?;
    assert_eq!(lease.attempt(), 1);
    assert_eq!(lease.id(), e.id);
    Ok(())
}

fn claim_is_exclusive_while_lease_lives(f: &Fixture) -> TestResult {
    for _ in 0..5 {
        f.store.enqueue(ev("t"))?;
    }
    let first = f.store.claim(3, LEASE, None)?;
    let second = f.store.claim(10, LEASE, None)?;
    assert_eq!(first.len(), 3);
    assert_eq!(second.len(), 2);
    for a in &first {
        assert!(second.iter().all(|b| b.id != a.id));
    }
    f.advance(LEASE - millis(1));
    assert!(f.store.claim(10, LEASE, None)?.is_empty());
    f.advance(millis(1));
    let third = f.store.claim(10, LEASE, None)?;
    assert_eq!(third.len(), 5, "all leases ran out together");
    assert!(third.iter().all(|e| e.attempts == 2));
    Ok(())
}

fn claim_orders_by_due_time_then_enqueue_order(f: &Fixture) -> TestResult {
    let late = f.store.enqueue(ev("t").with_delay(secs(10)))?;
    let a = f.store.enqueue(ev("t"))?;
    let b = f.store.enqueue(ev("t"))?;
    let early = f
        .store
        .enqueue(ev("t").with_run_at(f.clock.now_utc() - ChronoDuration::seconds(5)))?;
    let claimed = f.store.claim(10, LEASE, None)?;
    let ids: Vec<_> = claimed.iter().map(|e| e.id).collect();
    assert_eq!(
        ids,
        vec![early.id, a.id, b.id],
        "the delayed event is not due"
    );
    f.advance(secs(10));
    let claimed = f.store.claim(10, LEASE, None)?;
    assert_eq!(
        claimed.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![late.id]
    );
    Ok(())
}

/// Expired leases are reclaimed in the same (due time, enqueue order) as
/// due events, not in lease order (found by the differential test).
fn reclaim_follows_due_time_then_enqueue_order(f: &Fixture) -> TestResult {
    let e0 = f.store.enqueue(ev("t"))?;
    let _late = f.store.enqueue(ev("t").with_delay(secs(10)))?;
    let e2 = f.store.enqueue(ev("t"))?;
    f.advance(secs(10));
    assert_eq!(f.store.claim(3, secs(5), None)?.len(), 3);
    f.advance(secs(10));
    let again = f.store.claim(2, secs(5), None)?;
    assert_eq!(
        again.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![e0.id, e2.id]
    );
    Ok(())
}

/// A lease is over at the instant it runs out: the event, ordering key
/// and all, is claimable at exactly `locked_until`, not a moment later.
fn a_lease_is_over_at_exactly_its_end(f: &Fixture) -> TestResult {
    let keyed = f.store.enqueue(ev("t").with_ordering_key("k"))?;
    let claimed = f.store.claim(1, secs(5), None)?;
    assert_eq!(claimed[0].id, keyed.id);
    f.advance(secs(5) - millis(1));
    assert!(f.store.claim(1, secs(5), None)?.is_empty(), "still live");
    f.advance(millis(1));
    let again = f.store.claim(1, secs(5), None)?;
    assert_eq!(
        again.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![keyed.id]
    );
    assert_eq!(again[0].attempts, 2);
    Ok(())
}

fn claim_respects_limit_and_types(f: &Fixture) -> TestResult {
    f.store.enqueue(ev("a"))?;
    f.store.enqueue(ev("b"))?;
    f.store.enqueue(ev("a"))?;
    assert!(f.store.claim(0, LEASE, None)?.is_empty());
    let only_b = f.store.claim(10, LEASE, Some(&["b".to_owned()]))?;
    assert_eq!(only_b.len(), 1);
    assert_eq!(only_b[0].event_type, "b");
    let one_a = f
        .store
        .claim(1, LEASE, Some(&["a".to_owned(), "zzz".to_owned()]))?;
    assert_eq!(one_a.len(), 1);
    assert!(f.store.claim(10, LEASE, Some(&[]))?.is_empty());
    assert_eq!(f.store.claim(10, LEASE, None)?.len(), 1);
    // A long list of types (SQLite reads longer lists differently).
    f.store.enqueue(ev("t19"))?;
    f.store.enqueue(ev("t3"))?;
    let many: Vec<String> = (0..20).map(|i| format!("t{i}")).collect();
    for n in [16, 17, 20] {
        let some = f.store.claim(10, LEASE, Some(&many[..n]))?;
        let want: Vec<&str> = match n {
            16 => vec!["t3"],
            20 => vec!["t19"],
            _ => vec![],
        };
        let got: Vec<&str> = some.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(got, want, "{n} types");
    }
    Ok(())
}

fn ack_before_expiry_is_accepted(f: &Fixture) -> TestResult {
    let e = f.store.enqueue(ev("t"))?;
    let lease = f.store.claim(1, LEASE, None)?[0].lease().ok_or("lease")?;
    f.advance(LEASE - millis(1));
    f.store.complete(&lease)?;
    let done = get(f, &e)?;
    assert_eq!(done.status, Status::Done);
    assert_eq!(done.lease_token, None);
    f.advance(secs(3600));
    assert!(f.store.claim(10, LEASE, None)?.is_empty(), "done is final");
    // A second ack with the same lease is refused: the lease ended.
    assert!(f.store.complete(&lease).unwrap_err().is_lease_lost());
    Ok(())
}

/// W1 claims, its lease runs out, W2 claims; every kind of ack from W1 is
/// refused and leaves W2's claim intact; W2's ack then succeeds.
fn late_acks_are_fenced(f: &Fixture) -> TestResult {
    type MakeAck = fn(sqlite_outbox::Lease) -> Ack;
    let kinds: Vec<(&str, MakeAck)> = vec![
        ("complete", Ack::complete),
        ("retry", |l| Ack::retry(l, "late", None)),
        ("retry-after", |l| Ack::retry(l, "late", Some(secs(1)))),
        ("fail", |l| Ack::fail(l, "late")),
        ("extend", |l| Ack::extend(l, secs(600))),
        ("release", Ack::release),
    ];
    for (name, make) in kinds {
        let e = f.store.enqueue(ev(name))?;
        let types = [name.to_owned()];
        let w1 = f.store.claim(1, LEASE, Some(&types))?[0]
            .lease()
            .ok_or("lease")?;
        f.advance(LEASE + millis(1));
        let w2_event = f
            .store
            .claim(1, LEASE, Some(&types))?
            .pop()
            .ok_or("not reclaimed")?;
        let w2 = w2_event.lease().ok_or("lease")?;
        assert_eq!(w2.attempt(), 2);
        assert_ne!(w2.token(), w1.token());

        let results = f.store.settle(&[make(w1)])?;
        let err = results
            .into_iter()
            .next()
            .ok_or("no result")?
            .expect_err(name);
        match err.kind() {
            ErrorKind::LeaseLost { id, attempt } => {
                assert_eq!((*id, *attempt), (e.id, 1), "{name}");
            }
            other => panic!("{name}: expected LeaseLost, got {other:?}"),
        }
        assert_eq!(get(f, &e)?, w2_event, "{name}: W1's ack changed the row");
        f.store.complete(&w2)?;
        assert_eq!(get(f, &e)?.status, Status::Done, "{name}");
    }
    Ok(())
}

/// The stale lease of a purged event must not match a new event that reuses
/// its row id.
fn fencing_survives_purge_and_id_reuse(f: &Fixture) -> TestResult {
    let e1 = f.store.enqueue(ev("t"))?;
    let w1 = f.store.claim(1, LEASE, None)?[0].lease().ok_or("lease")?;
    f.advance(LEASE + millis(1));
    let w2 = f.store.claim(1, LEASE, None)?[0].lease().ok_or("lease")?;
    f.store.complete(&w2)?;
    assert_eq!(
        f.store
            .purge(f.clock.now_utc() + ChronoDuration::seconds(1))?,
        1
    );
    let e2 = f.store.enqueue(ev("t"))?;
    assert_ne!(e2.id, e1.id);
    let w3_event = f.store.claim(1, LEASE, None)?.pop().ok_or("claim e2")?;
    assert_eq!(w3_event.id, e2.id);
    for ack in [
        Ack::complete(w1),
        Ack::fail(w1, "stale"),
        Ack::extend(w1, secs(1)),
        Ack::release(w1),
    ] {
        assert!(f.store.settle(&[ack])?[0]
            .as_ref()
            .unwrap_err()
            .is_lease_lost());
    }
    assert_eq!(get(f, &e2)?, w3_event, "E2 is still W3's");
    Ok(())
}

fn settle_reports_each_ack(f: &Fixture) -> TestResult {
    let a = f.store.enqueue(ev("t"))?;
    let b = f.store.enqueue(ev("t"))?;
    let claimed = f.store.claim(2, LEASE, None)?;
    let (la, lb) = (
        claimed[0].lease().ok_or("a")?,
        claimed[1].lease().ok_or("b")?,
    );
    f.store.complete(&la)?;
    let results = f.store.settle(&[Ack::complete(la), Ack::fail(lb, "no")])?;
    assert!(results[0].as_ref().unwrap_err().is_lease_lost());
    assert!(results[1].is_ok());
    assert_eq!(get(f, &a)?.status, Status::Done);
    assert_eq!(get(f, &b)?.status, Status::Failed);
    assert_eq!(get(f, &b)?.last_error.as_deref(), Some("no"));
    Ok(())
}

/// Many completions in one settle, as a dispatcher writes them: each gets
/// the result it would get alone, in order; a lease named twice completes
/// once, and a stale one changes nothing.
fn a_batch_of_completions_reports_each_in_order(f: &Fixture) -> TestResult {
    for _ in 0..4 {
        f.store.enqueue(ev("t"))?;
    }
    let claimed = f.store.claim(4, LEASE, None)?;
    let l: Vec<_> = claimed.iter().filter_map(Event::lease).collect();
    assert_eq!(l.len(), 4);
    f.store.complete(&l[2])?;
    let results = f.store.settle(&[
        Ack::complete(l[0]),
        Ack::complete(l[1]),
        Ack::complete(l[1]),
        Ack::complete(l[2]),
        Ack::release(l[0]),
        Ack::complete(l[3]),
    ])?;
    let ok: Vec<bool> = results.iter().map(Result::is_ok).collect();
    assert_eq!(ok, [true, true, false, false, false, true]);
    assert!(results[2].as_ref().unwrap_err().is_lease_lost());
    for e in &claimed {
        assert_eq!(get(f, e)?.status, Status::Done);
    }
    Ok(())
}

/// A key's head whose lease ran out on its last attempt fails, and the
/// next event of its key is claimed by that same claim.
fn a_spent_head_frees_its_key_in_the_same_claim(f: &Fixture) -> TestResult {
    let head = f
        .store
        .enqueue(ev("t").with_ordering_key("k").with_max_attempts(1))?;
    let next = f.store.enqueue(ev("t").with_ordering_key("k"))?;
    assert_eq!(f.store.claim(10, LEASE, None)?.len(), 1);
    f.advance(LEASE + secs(1));
    let claimed = f.store.claim(10, LEASE, None)?;
    assert_eq!(claimed.iter().map(|e| e.id).collect::<Vec<_>>(), [next.id]);
    let head = get(f, &head)?;
    assert_eq!(head.status, Status::Failed);
    assert_eq!(head.last_error.as_deref(), Some(LEASE_EXPIRED_ERROR));
    Ok(())
}

fn extend_keeps_the_event(f: &Fixture) -> TestResult {
    let e = f.store.enqueue(ev("t"))?;
    let lease = f.store.claim(1, LEASE, None)?[0].lease().ok_or("lease")?;
    f.advance(secs(20));
    f.store.extend(&lease, secs(60))?;
    assert_eq!(
        get(f, &e)?.locked_until,
        Some(f.clock.now_utc() + ChronoDuration::seconds(60))
    );
    f.advance(secs(59));
    assert!(
        f.store.claim(1, LEASE, None)?.is_empty(),
        "extended lease still live"
    );
    f.store.complete(&lease)?;
    Ok(())
}

fn release_gives_back_the_attempt(f: &Fixture) -> TestResult {
    let e = f.store.enqueue(ev("t"))?;
    let lease = f.store.claim(1, LEASE, None)?[0].lease().ok_or("lease")?;
    f.store.release(&lease)?;
    let back = get(f, &e)?;
    assert_eq!(back.status, Status::Pending);
    assert_eq!(back.attempts, 0);
    assert_eq!(back.lease_token, None);
    let again = f.store.claim(1, LEASE, None)?;
    assert_eq!(again.len(), 1, "released events are due at once");
    assert_eq!(again[0].attempts, 1);
    Ok(())
}

/// An event whose worker dies on every attempt ends failed after
/// `max_attempts` claims, instead of being handed out for ever.
fn poison_event_fails_after_max_attempts(f: &Fixture) -> TestResult {
    let e = f.store.enqueue(ev("t").with_max_attempts(3))?;
    for attempt in 1..=3 {
        let claimed = f.store.claim(1, LEASE, None)?;
        assert_eq!(claimed.len(), 1, "attempt {attempt}");
        assert_eq!(claimed[0].attempts, attempt);
        f.advance(LEASE + millis(1)); // the worker died: no ack
    }
    assert!(f.store.claim(1, LEASE, None)?.is_empty());
    let dead = get(f, &e)?;
    assert_eq!(dead.status, Status::Failed);
    assert_eq!(dead.attempts, 3);
    assert_eq!(dead.last_error.as_deref(), Some(LEASE_EXPIRED_ERROR));
    Ok(())
}

// ---- retries ----------------------------------------------------------------

fn retry_follows_the_schedule_exactly(f: &Fixture) -> TestResult {
    let schedule: [u64; 9] = [30, 120, 600, 1800, 3600, 7200, 14400, 28800, 57600];
    let e = f.store.enqueue(ev("t"))?;
    for (i, wait) in schedule.iter().enumerate() {
        let claimed = f.store.claim(1, LEASE, None)?;
        assert_eq!(claimed.len(), 1, "attempt {}", i + 1);
        let lease = claimed[0].lease().ok_or("lease")?;
        assert_eq!(lease.attempt(), i as u32 + 1);
        f.store.retry(&lease, &format!("failure {}", i + 1), None)?;
        let waiting = get(f, &e)?;
        assert_eq!(waiting.status, Status::Pending);
        assert_eq!(
            waiting.next_attempt_at - f.clock.now_utc(),
            ChronoDuration::seconds(*wait as i64)
        );
        f.advance(secs(*wait) - millis(1));
        assert!(
            f.store.claim(1, LEASE, None)?.is_empty(),
            "not due before {wait}s"
        );
        f.advance(millis(1));
    }
    let last = f.store.claim(1, LEASE, None)?.pop().ok_or("10th attempt")?;
    assert_eq!(last.attempts, 10);
    f.store
        .retry(&last.lease().ok_or("lease")?, "failure 10", None)?;
    let failed = get(f, &e)?;
    assert_eq!(failed.status, Status::Failed);
    assert_eq!(failed.last_error.as_deref(), Some("failure 10"));
    assert_eq!(failed.attempts, 10);
    f.advance(secs(86_400 * 7));
    assert!(f.store.claim(1, LEASE, None)?.is_empty(), "failed is final");
    Ok(())
}

fn retry_honours_a_requested_delay(f: &Fixture) -> TestResult {
    let e = f.store.enqueue(ev("t"))?;
    let lease = f.store.claim(1, LEASE, None)?[0].lease().ok_or("lease")?;
    f.store.retry(&lease, "429", Some(secs(7)))?;
    assert_eq!(
        get(f, &e)?.next_attempt_at - f.clock.now_utc(),
        ChronoDuration::seconds(7)
    );
    Ok(())
}

fn per_event_max_attempts_overrides_policy(f: &Fixture) -> TestResult {
    let e = f.store.enqueue(ev("t").with_max_attempts(2))?;
    assert_eq!(e.max_attempts, 2);
    for _ in 0..2 {
        let l = f
            .store
            .claim(1, LEASE, None)?
            .pop()
            .ok_or("claim")?
            .lease()
            .ok_or("lease")?;
        f.store.retry(&l, "x", Some(millis(0)))?;
    }
    assert_eq!(get(f, &e)?.status, Status::Failed);
    Ok(())
}

fn fail_is_final_at_once(f: &Fixture) -> TestResult {
    let e = f.store.enqueue(ev("t"))?;
    let lease = f.store.claim(1, LEASE, None)?[0].lease().ok_or("lease")?;
    f.store.fail(&lease, "400 bad request")?;
    let failed = get(f, &e)?;
    assert_eq!(failed.status, Status::Failed);
    assert_eq!(failed.attempts, 1);
    assert_eq!(failed.completed_at, Some(f.clock.now_utc()));
    Ok(())
}

// ---- keys -------------------------------------------------------------------

fn idempotency_key_returns_the_first_event(f: &Fixture) -> TestResult {
    let first = f.store.enqueue(ev("t").with_idempotency_key("order-1"))?;
    let second = f
        .store
        .enqueue(NewEvent::new("other", json!(2)).with_idempotency_key("order-1"))?;
    assert_eq!(second, first);
    let batch = f.store.enqueue_batch(vec![
        ev("t").with_idempotency_key("order-2"),
        ev("t").with_idempotency_key("order-2"),
        ev("t").with_idempotency_key("order-1"),
    ])?;
    assert_eq!(batch[0].id, batch[1].id);
    assert_eq!(batch[2].id, first.id);
    assert_eq!(f.store.count_pending()?, 2);
    Ok(())
}

fn ordering_key_serialises_events(f: &Fixture) -> TestResult {
    let k1 = f.store.enqueue(ev("t").with_ordering_key("doc-1"))?;
    let k2 = f.store.enqueue(ev("t").with_ordering_key("doc-1"))?;
    let k3 = f.store.enqueue(ev("t").with_ordering_key("doc-1"))?;
    let free = f.store.enqueue(ev("t"))?;
    let other = f.store.enqueue(ev("t").with_ordering_key("doc-2"))?;
    let ids = |v: Vec<Event>| v.into_iter().map(|e| e.id).collect::<Vec<_>>();

    let first = f.store.claim(10, LEASE, None)?;
    let head = first[0].lease().ok_or("lease")?;
    for e in &first[1..] {
        f.store.complete(&e.lease().ok_or("lease")?)?;
    }
    assert_eq!(ids(first), vec![k1.id, free.id, other.id]);

    // A retrying head holds its key back.
    f.store.retry(&head, "offline", Some(secs(60)))?;
    assert!(f.store.claim(10, LEASE, None)?.is_empty());
    f.advance(secs(60));
    let again = f.store.claim(10, LEASE, None)?;
    assert_eq!(ids(again.clone()), vec![k1.id]);

    // A failed head does not.
    f.store.fail(&again[0].lease().ok_or("lease")?, "gone")?;
    let next = f.store.claim(10, LEASE, None)?;
    assert_eq!(ids(next.clone()), vec![k2.id]);
    f.store.complete(&next[0].lease().ok_or("lease")?)?;
    assert_eq!(ids(f.store.claim(10, LEASE, None)?), vec![k3.id]);
    Ok(())
}

fn ordering_key_holds_while_head_is_processing(f: &Fixture) -> TestResult {
    let a = f.store.enqueue(ev("t").with_ordering_key("k"))?;
    let b = f.store.enqueue(ev("t").with_ordering_key("k"))?;
    let claimed = f.store.claim(1, LEASE, None)?;
    assert_eq!(claimed[0].id, a.id);
    assert!(f.store.claim(10, LEASE, None)?.is_empty(), "b waits for a");
    // a's worker dies: a is reclaimed first, b still waits.
    f.advance(LEASE + millis(1));
    let reclaimed = f.store.claim(10, LEASE, None)?;
    assert_eq!(
        reclaimed.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![a.id]
    );
    f.store.complete(&reclaimed[0].lease().ok_or("lease")?)?;
    assert_eq!(f.store.claim(10, LEASE, None)?[0].id, b.id);
    Ok(())
}

/// A key's head retrying later: the events behind it are due but cannot
/// move, and each says why, naming the head, its state and its error.
fn a_stalled_head_is_named_by_the_events_behind_it(f: &Fixture) -> TestResult {
    let head = f.store.enqueue(ev("t").with_ordering_key("user-17"))?;
    let behind: Vec<Event> = (0..2)
        .map(|_| f.store.enqueue(ev("t").with_ordering_key("user-17")))
        .collect::<Result<_, _>>()?;
    let free = f.store.enqueue(ev("t"))?;
    let lease = f.store.claim(1, LEASE, None)?[0].lease().ok_or("lease")?;
    // While the head is leased, the others wait for it.
    let why = f.store.why(&get(f, &behind[0])?)?;
    assert!(
        matches!(&why, Why::BehindKey { head: h, head_status: Status::Processing, .. } if *h == head.id),
        "{why:?}"
    );
    assert!(matches!(
        f.store.why(&get(f, &head)?)?,
        Why::Leased { until: Some(_) }
    ));
    f.store.retry(&lease, "HTTP 500", Some(secs(3600)))?;
    let stats = f.store.stats()?;
    assert_eq!(
        (stats.pending, stats.due, stats.behind_key),
        (4, 3, 2),
        "{stats:?}"
    );
    for b in &behind {
        let why = f.store.why(&get(f, b)?)?;
        let Why::BehindKey {
            key,
            head: h,
            head_status,
            head_until,
            head_error,
        } = &why
        else {
            return Err(format!("{why:?}").into());
        };
        assert_eq!(
            (key.as_str(), *h, *head_status, head_error.as_deref()),
            ("user-17", head.id, Status::Pending, Some("HTTP 500"))
        );
        assert_eq!(
            head_until.map(|t| t - f.clock.now_utc()),
            Some(ChronoDuration::seconds(3600))
        );
        let said = why.to_string();
        assert!(
            said.contains("user-17")
                && said.contains(&head.id.to_string())
                && said.contains("HTTP 500"),
            "{said}"
        );
    }
    let why = f.store.why(&get(f, &head)?)?;
    assert!(
        matches!(&why, Why::Scheduled { last_error: Some(e), .. } if e == "HTTP 500"),
        "{why:?}"
    );
    assert_eq!(f.store.why(&get(f, &free)?)?, Why::Due);
    // The head done, the next one is free to go; the last waits for it.
    f.advance(secs(3600));
    let claimed = f.store.claim(10, LEASE, None)?;
    let ids: Vec<_> = claimed.iter().map(|e| e.id).collect();
    assert_eq!(
        ids,
        vec![free.id, head.id],
        "the head and the free event only"
    );
    f.store.complete(&claimed[1].lease().ok_or("lease")?)?;
    assert_eq!(f.store.why(&get(f, &head)?)?, Why::Done);
    assert_eq!(f.store.why(&get(f, &behind[0])?)?, Why::Due);
    let why = f.store.why(&get(f, &behind[1])?)?;
    assert!(
        matches!(&why, Why::BehindKey { head: h, .. } if *h == behind[0].id),
        "{why:?}"
    );
    assert_eq!(f.store.stats()?.behind_key, 1);
    Ok(())
}

fn requeued_head_waits_for_a_live_successor(f: &Fixture) -> TestResult {
    let a = f.store.enqueue(ev("t").with_ordering_key("k"))?;
    let b = f.store.enqueue(ev("t").with_ordering_key("k"))?;
    let la = f.store.claim(1, LEASE, None)?[0].lease().ok_or("lease")?;
    f.store.fail(&la, "x")?;
    let lb = f.store.claim(1, LEASE, None)?.pop().ok_or("b")?;
    assert_eq!(lb.id, b.id);
    f.store.requeue(Requeue::One(a.id))?;
    assert!(
        f.store.claim(10, LEASE, None)?.is_empty(),
        "b holds a live lease on k"
    );
    f.store.complete(&lb.lease().ok_or("lease")?)?;
    assert_eq!(f.store.claim(10, LEASE, None)?[0].id, a.id);
    Ok(())
}

// ---- retention, erasure, operators ----------------------------------------

fn retention_removes_only_old_finished_events(f: &Fixture) -> TestResult {
    let start = f.clock.now_utc();
    let old_done = f.store.enqueue(ev("t"))?;
    let old_failed = f.store.enqueue(ev("t"))?;
    let old_pending = f.store.enqueue(ev("t"))?;
    let old_processing = f.store.enqueue(ev("t").with_delay(secs(1)))?;
    f.store.mark_done(old_done.id)?;
    f.store.mark_failed(old_failed.id, "x")?;
    f.advance(secs(10));
    let fresh_done = f.store.enqueue(ev("t"))?;
    f.store.mark_done(fresh_done.id)?;
    f.store.mark_processing(old_processing.id)?;
    let removed = f.store.purge(start + ChronoDuration::seconds(5))?;
    assert_eq!(removed, 2);
    assert!(f.store.find(old_done.id)?.is_none());
    assert!(f.store.find(old_failed.id)?.is_none());
    for kept in [&old_pending, &old_processing, &fresh_done] {
        assert!(f.store.find(kept.id)?.is_some());
    }
    Ok(())
}

fn erase_by_org_and_user_removes_exactly_theirs(f: &Fixture) -> TestResult {
    let (org, other_org, user) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let o1 = f.store.enqueue(ev("t").with_org_id(org))?;
    let o2 = f
        .store
        .enqueue(ev("t").with_org_id(org).with_user_id(user))?;
    f.store.mark_done(o2.id)?;
    let keep = f.store.enqueue(ev("t").with_org_id(other_org))?;
    let u1 = f.store.enqueue(ev("t").with_user_id(user))?;
    let none = f.store.enqueue(ev("t"))?;
    assert_eq!(f.store.erase(Subject::Org(org))?, 2);
    assert!(f.store.find(o1.id)?.is_none());
    assert!(f.store.find(o2.id)?.is_none());
    assert_eq!(f.store.erase(Subject::User(user))?, 1);
    assert!(f.store.find(u1.id)?.is_none());
    assert!(f.store.find(keep.id)?.is_some());
    assert!(f.store.find(none.id)?.is_some());
    assert_eq!(f.store.delete_by_org(Uuid::new_v4())?, 0);
    Ok(())
}

fn requeue_failed_resets_attempts(f: &Fixture) -> TestResult {
    let a = f.store.enqueue(ev("a"))?;
    let b = f.store.enqueue(ev("b"))?;
    let c = f.store.enqueue(ev("a"))?;
    for e in f.store.claim(10, LEASE, None)? {
        f.store.fail(&e.lease().ok_or("lease")?, "down")?;
    }
    let pending = f.store.enqueue(ev("a"))?;
    assert!(f
        .store
        .requeue(Requeue::One(pending.id))
        .unwrap_err()
        .is_invalid_input());
    assert_eq!(f.store.requeue(Requeue::One(a.id))?, 1);
    let back = get(f, &a)?;
    assert_eq!((back.status, back.attempts), (Status::Pending, 0));
    assert_eq!(back.last_error.as_deref(), Some("down"), "history kept");
    assert_eq!(back.completed_at, None);
    assert_eq!(f.store.requeue(Requeue::Type("a".into()))?, 1);
    assert_eq!(get(f, &c)?.status, Status::Pending);
    assert_eq!(f.store.requeue(Requeue::All)?, 1);
    assert_eq!(get(f, &b)?.status, Status::Pending);
    assert_eq!(f.store.count_failed()?, 0);
    Ok(())
}

/// Waiting retries become due at once, attempts kept; delayed events that
/// were never tried keep their time.
fn skip_backoff_makes_waiting_retries_due(f: &Fixture) -> TestResult {
    let a = f.store.enqueue(ev("a"))?;
    let b = f.store.enqueue(ev("b"))?;
    let delayed = f.store.enqueue(ev("a").with_delay(secs(600)))?;
    for e in f.store.claim(10, LEASE, None)? {
        f.store.retry(&e.lease().ok_or("lease")?, "timeout", None)?;
    }
    let before = get(f, &a)?;
    assert!(before.next_attempt_at > f.clock.now_utc(), "in backoff");
    assert_eq!(f.store.skip_backoff(Some(&["a".to_owned()]))?, 1);
    let now = f.clock.now_utc();
    let after = get(f, &a)?;
    assert_eq!((after.next_attempt_at, after.attempts), (now, 1));
    assert_eq!(after.last_error.as_deref(), Some("timeout"));
    assert!(get(f, &b)?.next_attempt_at > now, "another type waits");
    assert_eq!(get(f, &delayed)?.next_attempt_at, delayed.next_attempt_at);
    assert_eq!(f.store.skip_backoff(None)?, 1, "b, not the delayed one");
    assert_eq!(f.store.skip_backoff(None)?, 0);
    let claimed = f.store.claim(10, LEASE, None)?;
    assert_eq!(claimed.len(), 2);
    Ok(())
}

fn cancel_gives_up_only_on_unfinished_events(f: &Fixture) -> TestResult {
    let pending = f.store.enqueue(ev("t"))?;
    f.store.cancel(pending.id, "operator gave up")?;
    let e = get(f, &pending)?;
    assert_eq!(
        (e.status, e.last_error.as_deref()),
        (Status::Failed, Some("operator gave up"))
    );
    assert!(e.completed_at.is_some());
    let err = f
        .store
        .cancel(pending.id, "again")
        .expect_err("already failed");
    assert!(
        err.is_invalid_input() && err.to_string().contains("already failed"),
        "{err}"
    );
    assert_eq!(
        get(f, &pending)?.last_error.as_deref(),
        Some("operator gave up")
    );
    let missing = sqlite_outbox::EventId::new();
    assert!(f.store.cancel(missing, "x").unwrap_err().is_not_found());
    // A processing event: its worker's outcome is refused afterwards.
    let running = f.store.enqueue(ev("t"))?;
    let claimed = f.store.claim(1, secs(30), None)?;
    f.store.cancel(running.id, "stuck")?;
    let late = f.store.complete(&claimed[0].lease().ok_or("lease")?);
    assert!(late.unwrap_err().is_lease_lost());
    assert_eq!(get(f, &running)?.status, Status::Failed);
    // A done event stays done.
    let done = f.store.enqueue(ev("t"))?;
    let claimed = f.store.claim(1, secs(30), None)?;
    f.store.complete(&claimed[0].lease().ok_or("lease")?)?;
    assert!(f
        .store
        .cancel(done.id, "late")
        .unwrap_err()
        .is_invalid_input());
    let e = get(f, &done)?;
    assert_eq!((e.status, e.last_error), (Status::Done, None));
    Ok(())
}

fn stats_count_per_status_and_type(f: &Fixture) -> TestResult {
    let start = f.clock.now_utc();
    let a = f.store.enqueue(ev("a"))?;
    f.store.enqueue(ev("a"))?;
    f.store.enqueue(ev("b").with_delay(secs(100)))?;
    let c = f.store.enqueue(ev("c"))?;
    f.store.mark_done(a.id)?;
    f.store.mark_failed(c.id, "x")?;
    f.store.enqueue(ev("d"))?;
    f.store.claim(1, LEASE, Some(&["d".to_owned()]))?;
    f.advance(secs(7));
    let s = f.store.stats()?;
    assert_eq!(
        (s.pending, s.due, s.processing, s.done, s.failed),
        (2, 1, 1, 1, 1)
    );
    assert_eq!(s.total(), 5);
    let types: Vec<(&str, u64, u64, u64, u64, u64)> = s
        .by_type
        .iter()
        .map(|t| {
            (
                t.event_type.as_str(),
                t.pending,
                t.due,
                t.processing,
                t.done,
                t.failed,
            )
        })
        .collect();
    assert_eq!(
        types,
        vec![
            ("a", 1, 1, 0, 1, 0),
            ("b", 1, 0, 0, 0, 0),
            ("c", 0, 0, 0, 0, 1),
            ("d", 0, 0, 1, 0, 0)
        ]
    );
    assert_eq!(s.oldest_due_age, Some(secs(7)));
    let _ = start;
    let empty = Fixture::memory().store.stats()?;
    assert_eq!(empty.oldest_due_age, None);
    Ok(())
}

fn list_filters_and_orders(f: &Fixture) -> TestResult {
    let org = Uuid::new_v4();
    let a = f
        .store
        .enqueue(ev("a").with_org_id(org).with_correlation_id("r1"))?;
    let b = f.store.enqueue(ev("b").with_org_id(org))?;
    let c = f.store.enqueue(ev("a"))?;
    f.store.mark_failed(c.id, "x")?;
    let ids = |v: Vec<Event>| v.into_iter().map(|e| e.id).collect::<Vec<_>>();
    let all = ListFilter::default();
    assert_eq!(ids(f.store.list(&all)?), vec![a.id, b.id, c.id]);
    let newest = ListFilter {
        newest_first: true,
        limit: 2,
        ..ListFilter::default()
    };
    assert_eq!(ids(f.store.list(&newest)?), vec![c.id, b.id]);
    let by_org = ListFilter {
        org_id: Some(org),
        event_type: Some("a".into()),
        ..ListFilter::default()
    };
    assert_eq!(ids(f.store.list(&by_org)?), vec![a.id]);
    let failed = ListFilter {
        status: Some(Status::Failed),
        ..ListFilter::default()
    };
    assert_eq!(ids(f.store.list(&failed)?), vec![c.id]);
    let corr = ListFilter {
        correlation_id: Some("r1".into()),
        ..ListFilter::default()
    };
    assert_eq!(ids(f.store.list(&corr)?), vec![a.id]);
    Ok(())
}

fn list_filters_by_key_and_error_text(f: &Fixture) -> TestResult {
    let a = f.store.enqueue(ev("t").with_ordering_key("k1"))?;
    let b = f.store.enqueue(ev("t").with_ordering_key("k2"))?;
    let c = f.store.enqueue(ev("t"))?;
    f.store.mark_failed(b.id, "HTTP 503 from <host>")?;
    f.store.mark_failed(c.id, "http 503")?;
    let ids = |v: Vec<Event>| v.into_iter().map(|e| e.id).collect::<Vec<_>>();
    let key = ListFilter {
        ordering_key: Some("k1".into()),
        ..ListFilter::default()
    };
    assert_eq!(ids(f.store.list(&key)?), vec![a.id]);
    let error = ListFilter {
        error_contains: Some("503 from <".into()),
        ..ListFilter::default()
    };
    assert_eq!(ids(f.store.list(&error)?), vec![b.id]);
    // Case-sensitive, and events without an error never match.
    let cased = ListFilter {
        error_contains: Some("HTTP".into()),
        ..ListFilter::default()
    };
    assert_eq!(ids(f.store.list(&cased)?), vec![b.id]);
    Ok(())
}

fn pages_follow_the_cursor_both_ways(f: &Fixture) -> TestResult {
    let all: Vec<Event> = (0..7)
        .map(|i| f.store.enqueue(ev(if i % 2 == 0 { "even" } else { "odd" })))
        .collect::<Result<_, _>>()?;
    let seqs = |p: &sqlite_outbox::Page| p.events.iter().map(|e| e.seq).collect::<Vec<_>>();
    let s: Vec<i64> = all.iter().map(|e| e.seq).collect();
    for newest_first in [false, true] {
        let mut filter = ListFilter {
            limit: 3,
            newest_first,
            ..ListFilter::default()
        };
        let mut seen = Vec::new();
        loop {
            let page = f.store.list_page(&filter)?;
            assert!(page.events.len() <= 3);
            seen.extend(seqs(&page));
            match page.next {
                Some(next) => filter.after_seq = Some(next),
                None => break,
            }
        }
        let mut want = s.clone();
        if newest_first {
            want.reverse();
        }
        assert_eq!(seen, want, "newest_first = {newest_first}");
    }
    // A bounded scan: the first 3 sequence numbers hold one "odd" event,
    // and the page says where to search on.
    let odd = ListFilter {
        event_type: Some("odd".into()),
        scan_limit: Some(3),
        ..ListFilter::default()
    };
    let first = f.store.list_page(&odd)?;
    assert_eq!(seqs(&first), vec![s[1]]);
    assert_eq!(first.next, Some(s[2]));
    let second = f.store.list_page(&ListFilter {
        after_seq: first.next,
        ..odd.clone()
    })?;
    assert_eq!(seqs(&second), vec![s[3], s[5]]);
    assert_eq!(second.next, Some(s[5]));
    let last = f.store.list_page(&ListFilter {
        after_seq: second.next,
        ..odd.clone()
    })?;
    assert_eq!((seqs(&last), last.next), (vec![], None));
    // Newest first, bounded: from the top down.
    let newest = f.store.list_page(&ListFilter {
        newest_first: true,
        ..odd.clone()
    })?;
    assert_eq!((seqs(&newest), newest.next), (vec![s[5]], Some(s[4])));
    // A bound that reaches the end, either way, leaves nothing to search.
    for newest_first in [false, true] {
        let whole = f.store.list_page(&ListFilter {
            newest_first,
            scan_limit: Some(7),
            ..odd.clone()
        })?;
        assert_eq!(
            (whole.events.len(), whole.next),
            (3, None),
            "newest_first = {newest_first}"
        );
    }
    // A full page goes on from its last event; past the end, nothing.
    let full = f.store.list_page(&ListFilter {
        limit: 2,
        ..ListFilter::default()
    })?;
    assert_eq!((seqs(&full), full.next), (vec![s[0], s[1]], Some(s[1])));
    let beyond = f.store.list_page(&ListFilter {
        after_seq: Some(s[6]),
        ..ListFilter::default()
    })?;
    assert_eq!((beyond.events.len(), beyond.next), (0, None));
    assert_eq!(
        Fixture::memory()
            .store
            .list_page(&ListFilter::default())?
            .next,
        None
    );
    Ok(())
}

fn throughput_counts_finished_events_per_span(f: &Fixture) -> TestResult {
    // Start a second into a minute, so the spans below are exact.
    let now_ms = f.clock.now_utc().timestamp_millis();
    f.advance(millis(u64::try_from(
        60_000 - now_ms.rem_euclid(60_000) + 1_000,
    )?));
    let start = f.clock.now_utc();
    let span = secs(60);
    // Events enqueued now, finished over the next three minutes.
    let evs: Vec<Event> = (0..5)
        .map(|_| f.store.enqueue(ev("t")))
        .collect::<Result<_, _>>()?;
    let pending = f.store.enqueue(ev("t"))?;
    f.store.mark_done(evs[0].id)?;
    f.advance(secs(61));
    f.store.mark_done(evs[1].id)?;
    f.store.mark_failed(evs[2].id, "no")?;
    f.store.mark_done(evs[3].id)?;
    f.advance(secs(120));
    f.store.mark_failed(evs[4].id, "no")?;
    let base = start.timestamp_millis() / 60_000 * 60_000;
    let got: Vec<(i64, u64, u64)> = f
        .store
        .throughput(start, span)?
        .iter()
        .map(|t| {
            (
                (t.start.timestamp_millis() - base) / 60_000,
                t.done,
                t.failed,
            )
        })
        .collect();
    assert_eq!(got, vec![(0, 1, 0), (1, 2, 1), (3, 0, 1)]);
    // Only what finished since the start of the span asked for.
    let later = f
        .store
        .throughput(start + chrono::Duration::seconds(170), span)?;
    assert_eq!(
        later.iter().map(|t| (t.done, t.failed)).collect::<Vec<_>>(),
        vec![(0, 1)]
    );
    // The lookback is a day: an event that waited 23 hours is counted.
    assert_eq!(sqlite_outbox::THROUGHPUT_LOOKBACK, secs(24 * 3600));
    let waited = f.store.enqueue(ev("t"))?;
    f.advance(secs(23 * 3600));
    f.store.mark_done(waited.id)?;
    let recent = f.clock.now_utc() - chrono::Duration::seconds(1);
    assert_eq!(f.store.throughput(recent, span)?.len(), 1);
    // An event enqueued exactly the lookback before the span is counted.
    let edge = f.store.enqueue(ev("t"))?;
    f.advance(sqlite_outbox::THROUGHPUT_LOOKBACK + secs(60));
    f.store.mark_done(edge.id)?;
    let since = edge.created_at + chrono::Duration::from_std(sqlite_outbox::THROUGHPUT_LOOKBACK)?;
    let at_edge = f.store.throughput(since, span)?;
    assert_eq!(at_edge.iter().map(|t| t.done).sum::<u64>(), 1);
    assert_eq!(
        f.store
            .throughput(since + chrono::Duration::milliseconds(1), span)?
            .len(),
        0
    );
    // Events enqueued more than the lookback before it are not counted.
    f.advance(sqlite_outbox::THROUGHPUT_LOOKBACK + secs(10));
    let late = f.clock.now_utc() - chrono::Duration::seconds(1);
    f.store.mark_done(pending.id)?;
    assert_eq!(f.store.throughput(late, span)?, vec![]);
    assert_eq!(f.store.throughput(start, span)?.len(), 6);
    Ok(())
}

fn traceparent_round_trips_and_a_malformed_one_is_refused(f: &Fixture) -> TestResult {
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let e = f.store.enqueue(ev("t").with_traceparent(tp))?;
    assert_eq!(e.traceparent.as_deref(), Some(tp));
    assert_eq!(get(f, &e)?.traceparent.as_deref(), Some(tp));
    let batch = f
        .store
        .enqueue_batch(vec![ev("t"), ev("t").with_traceparent(tp)])?;
    let stored: Vec<Option<String>> = batch
        .iter()
        .map(|e| get(f, e).map(|e| e.traceparent))
        .collect::<Result<_, _>>()?;
    assert_eq!(stored, vec![None, Some(tp.to_owned())]);
    let claimed = f.store.claim(10, secs(30), None)?;
    assert_eq!(
        claimed
            .iter()
            .filter(|e| e.traceparent.as_deref() == Some(tp))
            .count(),
        2
    );
    for bad in [
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\nX: y",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ] {
        let err = f
            .store
            .enqueue(ev("t").with_traceparent(bad))
            .err()
            .ok_or("accepted")?;
        assert!(err.is_invalid_input(), "{err}");
    }
    assert_eq!(f.store.stats()?.total(), 3);
    Ok(())
}

// ---- input ------------------------------------------------------------------

fn invalid_events_write_nothing(f: &Fixture) -> TestResult {
    let long = "x".repeat(sqlite_outbox::MAX_EVENT_TYPE_LEN + 1);
    let huge = json!("a".repeat(sqlite_outbox::MAX_PAYLOAD_BYTES));
    let bad = [
        NewEvent::new("", json!({})),
        NewEvent::new(long, json!({})),
        NewEvent::new("t", huge),
        NewEvent::new("t", json!({})).with_max_attempts(0),
    ];
    for event in bad {
        let err = f.store.enqueue(event).unwrap_err();
        assert!(err.is_invalid_input(), "{err}");
    }
    let err = f
        .store
        .enqueue_batch(vec![ev("ok"), NewEvent::new("", json!(1))])
        .unwrap_err();
    assert!(err.is_invalid_input());
    assert_eq!(f.store.stats()?.total(), 0, "nothing was written");
    Ok(())
}

fn duplicate_ids_are_rejected_whole(f: &Fixture) -> TestResult {
    let first = f.store.enqueue(ev("t"))?;
    let err = f
        .store
        .enqueue_batch(vec![ev("t"), ev("t").with_id(first.id)])
        .unwrap_err();
    assert!(err.is_invalid_input(), "{err}");
    assert_eq!(f.store.stats()?.total(), 1, "the batch was all or nothing");
    Ok(())
}

fn payloads_round_trip(f: &Fixture) -> TestResult {
    let payload = json!({"n": 1.5, "s": "héllo \u{1F600}", "a": [null, true, {"x": -7}], "big": 9007199254740993u64});
    let e = f.store.enqueue(NewEvent::new("t", payload.clone()))?;
    assert_eq!(get(f, &e)?.payload, payload);
    Ok(())
}

fn custom_policy_is_used(_: &Fixture) -> TestResult {
    for f in [
        Fixture::memory_with(RetryPolicy::constant(secs(5)).with_max_attempts(2)),
        Fixture::sqlite_with(RetryPolicy::constant(secs(5)).with_max_attempts(2)),
    ] {
        assert_eq!(
            f.store.retry_policy().max_attempts(),
            2,
            "the store reports it"
        );
        assert_eq!(f.store.retry_policy().backoff(1), secs(5));
        let e = f.store.enqueue(ev("t"))?;
        assert_eq!(e.max_attempts, 2);
        let l = f.store.claim(1, LEASE, None)?[0].lease().ok_or("lease")?;
        f.store.retry(&l, "x", None)?;
        assert_eq!(
            get(&f, &e)?.next_attempt_at - f.clock.now_utc(),
            ChronoDuration::seconds(5)
        );
    }
    Ok(())
}

fn mark_processing_uses_the_default_lease(f: &Fixture) -> TestResult {
    let e = f.store.enqueue(ev("t"))?;
    f.store.mark_processing(e.id)?;
    let p = get(f, &e)?;
    assert_eq!(
        p.locked_until,
        Some(f.clock.now_utc() + ChronoDuration::from_std(sqlite_outbox::legacy::DEFAULT_LEASE)?)
    );
    f.store.mark_done(e.id)?;
    assert!(f
        .store
        .mark_processing(e.id)
        .unwrap_err()
        .is_invalid_input());
    Ok(())
}

// ---- boundaries pinned (each once caught only by chance) ------------------

fn retention_keeps_an_event_created_exactly_at_the_cutoff(f: &Fixture) -> TestResult {
    let at = f.clock.now_utc();
    let edge = f.store.enqueue(ev("t"))?;
    f.store.mark_done(edge.id)?;
    f.advance(millis(1));
    let after = f.store.enqueue(ev("t"))?;
    f.store.mark_done(after.id)?;
    // Strictly older than the cut-off goes; created at it stays.
    assert_eq!(f.store.purge(at)?, 0);
    assert!(f.store.find(edge.id)?.is_some());
    assert_eq!(f.store.purge(at + ChronoDuration::milliseconds(1))?, 1);
    assert!(f.store.find(edge.id)?.is_none());
    assert!(f.store.find(after.id)?.is_some());
    Ok(())
}

fn stats_report_the_oldest_of_several_due_events(f: &Fixture) -> TestResult {
    f.store.enqueue(ev("a"))?;
    f.advance(secs(5));
    f.store.enqueue(ev("b"))?;
    f.advance(secs(3));
    let s = f.store.stats()?;
    assert_eq!(s.due, 2);
    assert_eq!(
        s.oldest_due_age,
        Some(secs(8)),
        "the oldest, not the newest"
    );
    Ok(())
}

fn a_requeued_event_is_claimable_at_once(f: &Fixture) -> TestResult {
    // Failed while its due time was still an hour away.
    let e = f.store.enqueue(ev("t").with_delay(secs(3600)))?;
    f.store.mark_failed(e.id, "given up by an operator")?;
    f.advance(secs(1));
    assert_eq!(f.store.requeue(Requeue::One(e.id))?, 1);
    let back = get(f, &e)?;
    assert_eq!(back.next_attempt_at, f.clock.now_utc(), "due now");
    assert_eq!(f.store.claim(1, LEASE, None)?.len(), 1);
    Ok(())
}

fn list_filters_by_user(f: &Fixture) -> TestResult {
    let (ada, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let a = f.store.enqueue(ev("t").with_user_id(ada))?;
    f.store.enqueue(ev("t").with_user_id(bob))?;
    f.store.enqueue(ev("t"))?;
    let mine = ListFilter {
        user_id: Some(ada),
        ..ListFilter::default()
    };
    let ids: Vec<_> = f.store.list(&mine)?.into_iter().map(|e| e.id).collect();
    assert_eq!(ids, vec![a.id]);
    Ok(())
}

fn backlog_says_what_is_left(f: &Fixture) -> TestResult {
    let empty = f.store.backlog(None)?;
    assert!(!empty.due && !empty.processing && empty.next_due_at.is_none());
    let now = f.clock.now_utc();
    f.store.enqueue(ev("a").with_ordering_key("k"))?;
    f.store.enqueue(ev("a").with_ordering_key("k"))?;
    f.store.enqueue(ev("b").with_delay(secs(60)))?;
    let b = f.store.backlog(None)?;
    assert!(b.due && !b.processing);
    assert_eq!(b.next_due_at, Some(now + ChronoDuration::seconds(60)));
    assert!(!f.store.backlog(Some(&["b".into()]))?.due);
    // The head of key k is claimed; the second waits behind it: not due.
    let head = f.store.claim(1, LEASE, Some(&["a".into()]))?;
    let a = f.store.backlog(Some(&["a".into()]))?;
    assert!(!a.due && a.processing, "{a:?}");
    f.store.complete(&head[0].lease().ok_or("lease")?)?;
    assert!(f.store.backlog(Some(&["a".into()]))?.due);
    Ok(())
}

trait NowUtc {
    fn now_utc(&self) -> chrono::DateTime<chrono::Utc>;
}

impl NowUtc for sqlite_outbox::ManualClock {
    fn now_utc(&self) -> chrono::DateTime<chrono::Utc> {
        sqlite_outbox::Clock::now(self)
    }
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $( #[test] fn $name() -> super::TestResult { super::$name(&super::Fixture::memory()) } )*
        }
        mod sqlite {
            $( #[test] fn $name() -> super::TestResult { super::$name(&super::Fixture::sqlite()) } )*
        }
        #[cfg(feature = "postgres")]
        mod postgres {
            $( #[test]
            #[cfg_attr(
                outbox_no_test_server,
                ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
            )]
            fn $name() -> super::TestResult {
                match super::Fixture::postgres() {
                    Some(f) => super::$name(&f),
                    None => Ok(()),
                }
            } )*
        }
    };
}

suite!(
    create_and_find_event,
    fetch_pending_events,
    fetch_pending_locks_events,
    fetch_pending_reclaims_stale_processing,
    cleanup_removes_failed,
    mark_processing_and_done,
    mark_retry_with_backoff,
    mark_retry_first_failure_uses_30s_backoff,
    fetch_then_mark_processing_counts_one_attempt,
    mark_delivered_keeps_status,
    mark_retry_at_max_attempts_fails,
    counts,
    unknown_ids_are_not_found,
    claim_sets_lease_fields,
    claim_is_exclusive_while_lease_lives,
    claim_orders_by_due_time_then_enqueue_order,
    claim_respects_limit_and_types,
    reclaim_follows_due_time_then_enqueue_order,
    a_lease_is_over_at_exactly_its_end,
    ack_before_expiry_is_accepted,
    late_acks_are_fenced,
    fencing_survives_purge_and_id_reuse,
    settle_reports_each_ack,
    a_batch_of_completions_reports_each_in_order,
    a_spent_head_frees_its_key_in_the_same_claim,
    extend_keeps_the_event,
    release_gives_back_the_attempt,
    poison_event_fails_after_max_attempts,
    retry_follows_the_schedule_exactly,
    retry_honours_a_requested_delay,
    per_event_max_attempts_overrides_policy,
    fail_is_final_at_once,
    idempotency_key_returns_the_first_event,
    ordering_key_serialises_events,
    ordering_key_holds_while_head_is_processing,
    requeued_head_waits_for_a_live_successor,
    a_stalled_head_is_named_by_the_events_behind_it,
    retention_removes_only_old_finished_events,
    erase_by_org_and_user_removes_exactly_theirs,
    requeue_failed_resets_attempts,
    cancel_gives_up_only_on_unfinished_events,
    skip_backoff_makes_waiting_retries_due,
    stats_count_per_status_and_type,
    list_filters_and_orders,
    list_filters_by_key_and_error_text,
    pages_follow_the_cursor_both_ways,
    throughput_counts_finished_events_per_span,
    traceparent_round_trips_and_a_malformed_one_is_refused,
    invalid_events_write_nothing,
    duplicate_ids_are_rejected_whole,
    payloads_round_trip,
    custom_policy_is_used,
    mark_processing_uses_the_default_lease,
    retention_keeps_an_event_created_exactly_at_the_cutoff,
    stats_report_the_oldest_of_several_due_events,
    a_requeued_event_is_claimable_at_once,
    list_filters_by_user,
    backlog_says_what_is_left,
    higher_priority_is_claimed_first,
    priorities_hold_within_typed_claims,
    a_priority_never_overtakes_its_ordering_key,
    priorities_with_retries_and_expired_leases,
    expired_leases_are_reclaimed_by_priority,
);
