//! The SQLite store (and the PostgreSQL store) against the reference
//! model: random sequences of operations, applied to both on one manual
//! clock, must give the same results and leave the same events behind
//! (lease tokens aside, which are random by design).

#[cfg(feature = "postgres")]
mod common;

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::json;
use sqlite_outbox::{
    Ack, Event, ListFilter, ManualClock, MemoryStore, NewEvent, Operator, Requeue, RetryPolicy,
    SqliteStore, Store,
};

#[derive(Debug, Clone)]
enum Op {
    Create {
        kind: &'static str,
        ordering_key: Option<&'static str>,
        idempotency_key: Option<&'static str>,
        delay_s: u64,
        max_attempts: u32,
        /// Mostly 0 (the default), sometimes raised.
        priority: u8,
    },
    Claim {
        limit: usize,
        lease_s: u64,
        /// Which types: all, `a`, `a` and `b`, or `b` and `c` (no event
        /// is of type `c`: several types with others in front).
        types: u8,
    },
    Ack {
        pick: usize,
        kind: u8,
    },
    Advance {
        secs: u64,
    },
    RequeueAll,
    Cleanup,
    SkipBackoff {
        only_a: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (
            prop::sample::select(vec!["a", "b"]),
            prop::option::of(prop::sample::select(vec!["k1", "k2"])),
            prop::option::weighted(0.2, prop::sample::select(vec!["i1", "i2"])),
            prop::sample::select(vec![0u64, 0, 10]),
            1u32..4,
            prop::sample::select(vec![0u8, 0, 0, 1, 5]),
        )
            .prop_map(|(kind, ordering_key, idempotency_key, delay_s, max_attempts, priority)| {
                Op::Create {
                    kind,
                    ordering_key,
                    idempotency_key,
                    delay_s,
                    max_attempts,
                    priority,
                }
            }),
        3 => (1usize..4, prop::sample::select(vec![5u64, 30]), 0u8..4)
            .prop_map(|(limit, lease_s, types)| Op::Claim { limit, lease_s, types }),
        3 => (any::<usize>(), 0u8..6).prop_map(|(pick, kind)| Op::Ack { pick, kind }),
        2 => prop::sample::select(vec![1u64, 10, 40]).prop_map(|secs| Op::Advance { secs }),
        1 => Just(Op::RequeueAll),
        1 => Just(Op::Cleanup),
        1 => any::<bool>().prop_map(|only_a| Op::SkipBackoff { only_a }),
    ]
}

/// An event with its random lease token replaced by whether it has one, and
/// its sequence number left out: numbers only promise order (SQLite's
/// AUTOINCREMENT may skip some), and order is compared through the order of
/// the lists themselves.
fn normal(mut e: Event) -> Event {
    e.lease_token = e.lease_token.map(|_| 0);
    e.seq = 0;
    e
}

fn outcome<T>(r: &sqlite_outbox::Result<T>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => format!("{:?}", e.kind()),
    }
}

/// A store under test, and what must live as long as it (a directory, a
/// schema).
type Opened = (Box<dyn Operator>, Box<dyn std::any::Any>);

fn fail(e: &dyn std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

fn sqlite(clock: &ManualClock, policy: RetryPolicy) -> Result<Opened, TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| fail(&e))?;
    let store = SqliteStore::builder(dir.path().join("d.db"))
        .clock(Arc::new(clock.clone()))
        .retry_policy(policy)
        .build()
        .map_err(|e| fail(&e))?;
    Ok((Box::new(store), Box::new(dir)))
}

/// `run`'s ops against `open`'s store and the model.
fn run(
    ops: &[Op],
    open: fn(&ManualClock, RetryPolicy) -> Result<Opened, TestCaseError>,
) -> Result<(), TestCaseError> {
    let clock = ManualClock::new();
    let policy = RetryPolicy::from_schedule([Duration::from_secs(3), Duration::from_secs(20)]);
    let model = MemoryStore::builder()
        .clock(Arc::new(clock.clone()))
        .retry_policy(policy.clone())
        .build();
    let (sqlite, _keep) = open(&clock, policy)?;
    // The leases each store handed out, in claim order.
    let (mut model_leases, mut sqlite_leases) = (Vec::new(), Vec::new());
    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Create {
                kind,
                ordering_key,
                idempotency_key,
                delay_s,
                max_attempts,
                priority,
            } => {
                let mut e = NewEvent::new(*kind, json!({"step": step}))
                    .with_delay(Duration::from_secs(*delay_s))
                    .with_max_attempts(*max_attempts)
                    .with_priority(*priority);
                if let Some(k) = ordering_key {
                    e = e.with_ordering_key(*k);
                }
                if let Some(k) = idempotency_key {
                    e = e.with_idempotency_key(*k);
                }
                let (a, b) = (model.enqueue(e.clone()), sqlite.enqueue(e));
                prop_assert_eq!(outcome(&a), outcome(&b), "step {} {:?}", step, op);
                if let (Ok(a), Ok(b)) = (a, b) {
                    prop_assert_eq!(normal(a), normal(b), "step {} {:?}", step, op);
                }
            }
            Op::Claim {
                limit,
                lease_s,
                types,
            } => {
                let types = match types {
                    0 => None,
                    1 => Some(vec!["a".to_owned()]),
                    2 => Some(vec!["a".to_owned(), "b".to_owned()]),
                    _ => Some(vec!["b".to_owned(), "c".to_owned()]),
                };
                let lease = Duration::from_secs(*lease_s);
                let a = model
                    .claim(*limit, lease, types.as_deref())
                    .map_err(|e| fail(&e))?;
                let b = sqlite
                    .claim(*limit, lease, types.as_deref())
                    .map_err(|e| fail(&e))?;
                model_leases.extend(a.iter().filter_map(Event::lease));
                sqlite_leases.extend(b.iter().filter_map(Event::lease));
                let a: Vec<Event> = a.into_iter().map(normal).collect();
                let b: Vec<Event> = b.into_iter().map(normal).collect();
                prop_assert_eq!(a, b, "step {} {:?}", step, op);
            }
            Op::Ack { pick, kind } => {
                if model_leases.is_empty() {
                    continue;
                }
                let i = pick % model_leases.len();
                let make = |l| match kind {
                    0 => Ack::complete(l),
                    1 => Ack::retry(l, "boom", None),
                    2 => Ack::retry(l, "later", Some(Duration::from_secs(7))),
                    3 => Ack::fail(l, "never"),
                    4 => Ack::extend(l, Duration::from_secs(50)),
                    _ => Ack::release(l),
                };
                let a = model
                    .settle(&[make(model_leases[i])])
                    .map_err(|e| fail(&e))?;
                let b = sqlite
                    .settle(&[make(sqlite_leases[i])])
                    .map_err(|e| fail(&e))?;
                prop_assert_eq!(outcome(&a[0]), outcome(&b[0]), "step {} {:?}", step, op);
            }
            Op::Advance { secs } => clock.advance(Duration::from_secs(*secs)),
            Op::RequeueAll => {
                let (a, b) = (model.requeue(Requeue::All), sqlite.requeue(Requeue::All));
                prop_assert_eq!(a.ok(), b.ok(), "step {} {:?}", step, op);
            }
            Op::Cleanup => {
                let cutoff = sqlite_outbox::Clock::now(&clock) - chrono::Duration::seconds(30);
                let (a, b) = (model.purge(cutoff), sqlite.purge(cutoff));
                prop_assert_eq!(a.ok(), b.ok(), "step {} {:?}", step, op);
            }
            Op::SkipBackoff { only_a } => {
                let a_only = ["a".to_owned()];
                let types = only_a.then_some(&a_only[..]);
                let (a, b) = (model.skip_backoff(types), sqlite.skip_backoff(types));
                prop_assert_eq!(a.ok(), b.ok(), "step {} {:?}", step, op);
            }
        }
    }
    let all = ListFilter {
        limit: usize::MAX,
        ..ListFilter::default()
    };
    let a: Vec<Event> = model
        .list(&all)
        .map_err(|e| fail(&e))?
        .into_iter()
        .map(normal)
        .collect();
    let b: Vec<Event> = sqlite
        .list(&all)
        .map_err(|e| fail(&e))?
        .into_iter()
        .map(normal)
        .collect();
    prop_assert_eq!(a, b, "final state");
    prop_assert_eq!(model.stats().ok(), sqlite.stats().ok(), "final stats");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn sqlite_behaves_like_the_model(ops in prop::collection::vec(op(), 1..40)) {
        run(&ops, sqlite)?;
    }
}

#[cfg(feature = "postgres")]
fn postgres(clock: &ManualClock, policy: RetryPolicy) -> Result<Opened, TestCaseError> {
    let schema = common::pg::Schema::fresh().ok_or_else(|| fail(&"no server"))?;
    let store = sqlite_outbox::PostgresStore::builder(&schema.url)
        .schema(&schema.name)
        .clock(Arc::new(clock.clone()))
        .retry_policy(policy)
        .build()
        .map_err(|e| fail(&e))?;
    Ok((Box::new(store), Box::new(schema)))
}

#[cfg(feature = "postgres")]
proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    #[cfg_attr(
        outbox_no_test_server,
        ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
    )]
    fn postgres_behaves_like_the_model(ops in prop::collection::vec(op(), 1..40)) {
        if common::pg::url().is_some() {
            run(&ops, postgres)?;
        }
    }
}
