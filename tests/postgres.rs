//! `PostgresStore` on a real server (named by `OUTBOX_TEST_POSTGRES`):
//! what only a server shows. Enqueue inside the app's own transaction,
//! wake-ups from plain-SQL inserts, claimers that share one table through
//! `SKIP LOCKED` (no double claims, per-key order), race-free idempotency
//! keys, the schema as a guest. The behavioural suite and the differential
//! test run on it too; `postgres_faults.rs` restarts the server.
#![cfg(feature = "postgres")]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use common::pg::Schema;
use common::TestResult;
use crossbeam_channel::unbounded;
use serde_json::json;
use sqlite_outbox::{Dispatcher, ErrorKind, Event, NewEvent, Operator, PostgresStore, Store};

const WAIT: Duration = Duration::from_secs(30);

fn open(schema: &Schema) -> sqlite_outbox::Result<PostgresStore> {
    PostgresStore::builder(&schema.url)
        .schema(&schema.name)
        .build()
}

#[test]
#[cfg_attr(
    outbox_no_test_server,
    ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
)]
fn enqueue_commits_and_rolls_back_with_the_apps_transaction() -> TestResult {
    let Some(schema) = Schema::fresh() else {
        return Ok(());
    };
    let store = open(&schema)?;
    let mut app = schema.client();
    app.batch_execute("CREATE TEMP TABLE users (email text NOT NULL)")?;

    let mut tx = app.transaction()?;
    tx.execute("INSERT INTO users VALUES ('ada@example.com')", &[])?;
    store.enqueue_tx(&mut tx, NewEvent::new("user.created", json!({"n": 1})))?;
    tx.rollback()?;
    assert_eq!(store.stats()?.pending, 0, "rolled back with the app's row");

    let mut tx = app.transaction()?;
    tx.execute("INSERT INTO users VALUES ('ada@example.com')", &[])?;
    let stored = store.enqueue_tx(&mut tx, NewEvent::new("user.created", json!({"n": 2})))?;
    // Not visible to others before the app commits.
    assert!(store.find(stored.id)?.is_none());
    tx.commit()?;
    let found = store.find(stored.id)?.ok_or("committed event missing")?;
    assert_eq!(found, stored);
    let users: i64 = app.query_one("SELECT count(*) FROM users", &[])?.get(0);
    assert_eq!(users, 1);

    // An invalid event is refused before the app's transaction is touched.
    let mut tx = app.transaction()?;
    let err = store
        .enqueue_tx(&mut tx, NewEvent::new("", json!({})))
        .err()
        .ok_or("an empty type was accepted")?;
    assert!(
        matches!(err.kind(), ErrorKind::InvalidInput { .. }),
        "{err}"
    );
    tx.execute("INSERT INTO users VALUES ('grace@example.com')", &[])?;
    tx.commit()?;
    Ok(())
}

#[test]
#[cfg_attr(
    outbox_no_test_server,
    ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
)]
fn a_prepared_handle_enqueues_in_the_apps_transaction_on_its_own_connection() -> TestResult {
    let Some(schema) = Schema::fresh() else {
        return Ok(());
    };
    let store = open(&schema)?;
    let mut app = schema.client();
    let outbox = store.prepared();
    let event = |n: i32| NewEvent::new("user.created", json!({ "n": n }));

    let mut tx = app.transaction()?;
    outbox.enqueue_tx(&mut tx, event(1))?;
    tx.rollback()?;
    assert_eq!(
        store.stats()?.pending,
        0,
        "rolled back with the app's transaction"
    );

    // Prepared once, then used again: single, batched and a key taken.
    let mut stored = Vec::new();
    for n in 0..3 {
        let mut tx = app.transaction()?;
        stored.push(outbox.enqueue_tx(&mut tx, event(n).with_idempotency_key("k"))?);
        stored.extend(outbox.enqueue_batch_tx(&mut tx, vec![event(10 + n), event(20 + n)])?);
        tx.commit()?;
    }
    assert_eq!(stored[3].id, stored[0].id, "the key's first event, again");
    assert_eq!(store.stats()?.pending, 7);
    for e in &stored {
        assert_eq!(store.find(e.id)?.as_ref(), Some(e));
    }
    let prepared: i64 = app
        .query_one("SELECT count(*) FROM pg_prepared_statements", &[])?
        .get(0);
    assert!(prepared >= 2, "{prepared} statements prepared");

    // Another connection does not know its statements: an error, and
    // nothing written.
    let mut other = schema.client();
    let mut tx = other.transaction()?;
    assert!(outbox.enqueue_tx(&mut tx, event(99)).is_err());
    drop(tx);
    assert_eq!(store.stats()?.pending, 7);
    Ok(())
}

#[test]
#[cfg_attr(
    outbox_no_test_server,
    ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
)]
fn a_plain_sql_insert_wakes_a_dispatcher_in_milliseconds() -> TestResult {
    let Some(schema) = Schema::fresh() else {
        return Ok(());
    };
    let store = open(&schema)?;
    let (tx, rx) = unbounded();
    let dispatcher = Dispatcher::builder(store.clone())
        .workers(1)
        .poll_interval(Duration::from_secs(30))
        .handle("from.sql", move |e: &Event| {
            tx.send((Instant::now(), e.payload.get().to_owned())).ok();
            Ok(())
        })
        .start()?;
    let mut other = schema.client();
    // Spaced further apart than the poller's close watch lasts (1 s).
    for i in 0..3 {
        std::thread::sleep(Duration::from_millis(1500));
        let sent = Instant::now();
        other.execute(
            &format!(
                "INSERT INTO {}.outbox_events (event_type, payload) VALUES ('from.sql', $1::text::json)",
                schema.name
            ),
            &[&format!("{{\"i\": {i},  \"text as written\": true}}")],
        )?;
        let (handled, payload) = rx.recv_timeout(WAIT)?;
        let took = handled.duration_since(sent);
        assert!(
            took < Duration::from_secs(10),
            "event {i} took {took:?} under a 30 s poll"
        );
        assert_eq!(
            payload,
            format!("{{\"i\": {i},  \"text as written\": true}}")
        );
    }
    assert!(dispatcher.shutdown(Duration::from_secs(10)).is_clean());
    Ok(())
}

#[test]
#[cfg_attr(
    outbox_no_test_server,
    ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
)]
fn claimers_share_one_table_without_double_claims_and_keep_key_order() -> TestResult {
    let Some(schema) = Schema::fresh() else {
        return Ok(());
    };
    let store = open(&schema)?;
    let (n, keys) = (400usize, 8usize);
    store.enqueue_batch(
        (0..n)
            .map(|i| {
                NewEvent::new("t", json!({"i": i})).with_ordering_key(format!("k{}", i % keys))
            })
            .collect(),
    )?;
    // Each claimer has its own pool, as separate processes would.
    let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
    let handled: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let claimed: Arc<Mutex<HashMap<i64, usize>>> = Arc::default();
    let start = Arc::new(Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (in_flight, handled, claimed, start) = (
                in_flight.clone(),
                handled.clone(),
                claimed.clone(),
                start.clone(),
            );
            let store = open(&schema);
            std::thread::spawn(move || -> Result<(), String> {
                let store = store.map_err(|e| e.to_string())?;
                start.wait();
                let deadline = Instant::now() + WAIT;
                loop {
                    let batch = store
                        .claim(16, Duration::from_secs(60), None)
                        .map_err(|e| e.to_string())?;
                    if batch.is_empty() {
                        if store.stats().map_err(|e| e.to_string())?.done == n as u64 {
                            return Ok(());
                        }
                        if Instant::now() > deadline {
                            return Err("not finished in time".into());
                        }
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    for e in &batch {
                        let key = e.ordering_key.clone().ok_or("no key")?;
                        *claimed
                            .lock()
                            .map_err(|e| e.to_string())?
                            .entry(e.seq)
                            .or_default() += 1;
                        if !in_flight
                            .lock()
                            .map_err(|e| e.to_string())?
                            .insert(key.clone())
                        {
                            return Err(format!("two events of {key} in flight"));
                        }
                    }
                    for e in batch {
                        let key = e.ordering_key.clone().ok_or("no key")?;
                        handled
                            .lock()
                            .map_err(|e| e.to_string())?
                            .push((key.clone(), e.seq));
                        // Out of the set before the commit that frees the next.
                        in_flight.lock().map_err(|e| e.to_string())?.remove(&key);
                        store
                            .complete(&e.lease().ok_or("no lease")?)
                            .map_err(|e| e.to_string())?;
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| "claimer panicked")??;
    }
    let claimed = claimed.lock().map_err(|e| e.to_string())?;
    assert_eq!(claimed.len(), n);
    assert!(
        claimed.values().all(|&c| c == 1),
        "an event was claimed twice"
    );
    let handled = handled.lock().map_err(|e| e.to_string())?;
    for k in 0..keys {
        let seqs: Vec<i64> = handled
            .iter()
            .filter(|(key, _)| *key == format!("k{k}"))
            .map(|(_, s)| *s)
            .collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "key k{k} out of order: {seqs:?}"
        );
    }
    Ok(())
}

#[test]
#[cfg_attr(
    outbox_no_test_server,
    ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
)]
fn idempotency_keys_hold_across_racing_connections() -> TestResult {
    let Some(schema) = Schema::fresh() else {
        return Ok(());
    };
    let store = open(&schema)?;
    let start = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let store = open(&schema);
            let start = start.clone();
            std::thread::spawn(move || -> Result<_, String> {
                let store = store.map_err(|e| e.to_string())?;
                start.wait();
                store
                    .enqueue(NewEvent::new("t", json!({"who": i})).with_idempotency_key("once"))
                    .map(|e| e.id)
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for t in threads {
        ids.insert(t.join().map_err(|_| "enqueuer panicked")??);
    }
    assert_eq!(ids.len(), 1, "every racer got the one event");
    assert_eq!(store.stats()?.pending, 1);
    Ok(())
}

/// What only the server refuses (a NUL character in a text column, which
/// PostgreSQL cannot hold though SQLite can) is the caller's invalid
/// input, not a database failure to retry, and nothing is written; the
/// batch it was in is refused whole.
#[test]
#[cfg_attr(
    outbox_no_test_server,
    ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
)]
fn data_the_server_refuses_is_invalid_input() -> TestResult {
    let Some(schema) = Schema::fresh() else {
        return Ok(());
    };
    let store = open(&schema)?;
    let err = store
        .enqueue(NewEvent::new("t", json!({})).with_correlation_id("a\u{0}b"))
        .err()
        .ok_or("a NUL character was stored")?;
    assert!(err.is_invalid_input(), "{err}");
    let err = store
        .enqueue_batch(vec![
            NewEvent::new("t", json!({"ok": 1})),
            NewEvent::new("t", json!({"ok": 2})).with_correlation_id("a\u{0}b"),
        ])
        .err()
        .ok_or("a NUL character was stored")?;
    assert!(err.is_invalid_input(), "{err}");
    assert_eq!(store.stats()?.total(), 0);
    Ok(())
}

#[test]
#[cfg_attr(
    outbox_no_test_server,
    ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
)]
fn the_outbox_is_a_guest_in_its_own_schema() -> TestResult {
    let Some(schema) = Schema::fresh() else {
        return Ok(());
    };
    let mut admin = schema.client();
    let outside =
        |c: &mut sqlite_outbox::postgres::Client| -> Result<i64, sqlite_outbox::postgres::Error> {
            Ok(c.query_one(
                // Other tests' schemas, temporary tables and the TOAST tables
                // of our own are left out.
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname <> $1 AND n.nspname NOT LIKE 't\\_%'
               AND n.nspname NOT LIKE 'pg\\_temp%' AND n.nspname NOT LIKE 'pg\\_toast%'",
                &[&schema.name],
            )?
            .get(0))
        };
    let before = outside(&mut admin)?;
    let store = open(&schema)?;
    store.enqueue(NewEvent::new("t", json!({})))?;
    assert_eq!(
        outside(&mut admin)?,
        before,
        "nothing created outside the schema"
    );

    // A newer layout is refused, and left as it is.
    admin.execute(
        &format!(
            "UPDATE {}.outbox_meta SET value = 5 WHERE key = 'schema_version'",
            schema.name
        ),
        &[],
    )?;
    let err = open(&schema).err().ok_or("a newer schema was opened")?;
    assert!(
        matches!(err.kind(), ErrorKind::SchemaTooNew { found: 5, .. }),
        "{err}"
    );

    // Someone else's outbox_events is not taken for ours.
    let Some(foreign) = Schema::fresh() else {
        return Ok(());
    };
    admin.batch_execute(&format!(
        "CREATE SCHEMA {0}; CREATE TABLE {0}.outbox_events (id int)",
        foreign.name
    ))?;
    let err = open(&foreign).err().ok_or("a foreign table was taken")?;
    assert!(matches!(err.kind(), ErrorKind::NotAnOutbox { .. }), "{err}");

    // Names that would need quoting are refused before any SQL.
    let err = PostgresStore::builder(&schema.url)
        .schema("x; DROP TABLE y")
        .build()
        .err()
        .ok_or("a bad schema name was used")?;
    assert!(
        matches!(err.kind(), ErrorKind::InvalidInput { .. }),
        "{err}"
    );
    Ok(())
}

#[test]
fn a_bad_url_or_an_absent_server_is_one_clear_error_without_the_password() -> TestResult {
    let err = PostgresStore::builder("postgres://app:s3cret@127.0.0.1:1/app")
        .connect_timeout(Duration::from_secs(2))
        .build()
        .err()
        .ok_or("connected to nothing")?;
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("s3cret"), "{shown}");
    let err = PostgresStore::open("postgres://[not a url")
        .err()
        .ok_or("a broken URL was accepted")?;
    assert!(
        matches!(err.kind(), ErrorKind::InvalidInput { .. }),
        "{err}"
    );
    Ok(())
}

/// The claim reads the due index, never the whole table, however many
/// events are finished or waiting (checked with EXPLAIN on 20,000 rows).
#[test]
#[cfg_attr(
    outbox_no_test_server,
    ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
)]
fn claims_read_indexes_not_the_table() -> TestResult {
    let Some(schema) = Schema::fresh() else {
        return Ok(());
    };
    let store = open(&schema)?;
    let mut c = schema.client();
    c.batch_execute(&format!(
        "INSERT INTO {0}.outbox_events (event_type, payload, status, completed_at)
           SELECT 't', '{{}}', 'done', 1700000000000 FROM generate_series(1, 15000);
         INSERT INTO {0}.outbox_events (event_type, payload, ordering_key)
           SELECT 't', '{{}}', 'k' || (i % 50) FROM generate_series(1, 5000) AS i;
         ANALYZE {0}.outbox_events",
        schema.name
    ))?;
    let claim = store.statement_text("claim").ok_or("no claim text")?;
    let now = chrono::Utc::now().timestamp_millis();
    let plan: Vec<String> = c
        .query(
            &format!("EXPLAIN {claim}"),
            &[
                &now,
                &(now + 60_000),
                &64i64,
                &None::<Vec<&str>>,
                &None::<Vec<&str>>,
                &"spent",
            ],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(!plan.contains("Seq Scan"), "{plan}");
    assert!(plan.contains("outbox_events_due"), "{plan}");
    Ok(())
}

/// A table altered by hand so that a column no longer reads as the schema
/// says: the claim sets its rows aside as failed, naming the column, and
/// nothing panics.
#[test]
#[cfg_attr(
    outbox_no_test_server,
    ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
)]
fn rows_that_do_not_read_are_set_aside_not_panicked_on() -> TestResult {
    let Some(schema) = Schema::fresh() else {
        return Ok(());
    };
    let store = open(&schema)?;
    let e = store.enqueue(NewEvent::new("t", json!({"a": 1})))?;
    schema.client().batch_execute(&format!(
        "DROP VIEW {0}.outbox_events_readable; DROP VIEW {0}.outbox_events_failed;
         ALTER TABLE {0}.outbox_events ALTER COLUMN user_id TYPE integer USING NULL",
        schema.name
    ))?;
    let claimed = store.claim(10, Duration::from_secs(30), None)?;
    assert!(claimed.is_empty());
    let after = store.find(e.id)?.ok_or("gone")?;
    assert_eq!(after.status, sqlite_outbox::Status::Failed);
    let error = after.last_error.unwrap_or_default();
    assert!(error.contains("user_id"), "{error}");
    assert_eq!(store.stats()?.failed, 1);
    Ok(())
}

#[test]
#[cfg_attr(
    outbox_no_test_server,
    ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
)]
fn a_version_1_schema_gains_the_traceparent_column_with_its_rows_kept() -> TestResult {
    let Some(schema) = Schema::fresh() else {
        return Ok(());
    };
    let kept = open(&schema)?.enqueue(NewEvent::new("t", json!({"kept": true})))?;
    // Version 1 as it was: no traceparent column, in the table or the view.
    let mut admin = schema.client();
    admin.batch_execute(&format!(
        "SET search_path TO {0};
         DROP VIEW outbox_events_readable;
         ALTER TABLE outbox_events DROP COLUMN traceparent;
         ALTER TABLE outbox_events DROP COLUMN priority;
         DROP TABLE outbox_limits;
         CREATE VIEW outbox_events_readable AS SELECT seq, id FROM outbox_events;
         UPDATE outbox_meta SET value = 1 WHERE key = 'schema_version';",
        schema.name
    ))?;
    let store = open(&schema)?;
    let version: i64 = admin
        .query_one(
            &format!(
                "SELECT value FROM {}.outbox_meta WHERE key = 'schema_version'",
                schema.name
            ),
            &[],
        )?
        .get(0);
    assert_eq!(version, PostgresStore::SCHEMA_VERSION);
    assert_eq!(version, 4);
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let traced = store.enqueue(NewEvent::new("t", json!({})).with_traceparent(tp))?;
    assert_eq!(
        store
            .find(traced.id)?
            .and_then(|e| e.traceparent)
            .as_deref(),
        Some(tp)
    );
    assert_eq!(
        store
            .find(kept.id)?
            .map(|e| (e.payload.into_value(), e.traceparent, e.priority)),
        Some((json!({"kept": true}), None, 0))
    );
    // And the priority column (version 4), in the table and the view.
    let urgent = store.enqueue(NewEvent::new("t", json!({})).with_priority(7))?;
    assert_eq!(store.find(urgent.id)?.map(|e| e.priority), Some(7));
    let shown: i16 = admin
        .query_one(
            &format!(
                "SELECT priority FROM {}.outbox_events_readable WHERE id = $1",
                schema.name
            ),
            &[&urgent.id.as_uuid()],
        )?
        .get(0);
    assert_eq!(shown, 7);
    let shown: Option<String> = admin
        .query_one(
            &format!(
                "SELECT traceparent FROM {}.outbox_events_readable WHERE id = $1",
                schema.name
            ),
            &[&traced.id.as_uuid()],
        )?
        .get(0);
    assert_eq!(shown.as_deref(), Some(tp));
    Ok(())
}

#[test]
#[cfg_attr(
    outbox_no_test_server,
    ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
)]
fn a_schema_is_created_only_by_those_allowed_and_read_only_writes_nothing() -> TestResult {
    let Some(schema) = Schema::fresh() else {
        return Ok(());
    };
    let mut admin = schema.client();
    let schemas =
        |admin: &mut sqlite_outbox::postgres::Client| -> Result<i64, Box<dyn std::error::Error>> {
            Ok(admin
                .query_one(
                    "SELECT count(*) FROM pg_namespace WHERE nspname = $1",
                    &[&schema.name],
                )?
                .get(0))
        };
    // A mistyped schema: reported, not created, by a reader or a writer
    // that may not create.
    for builder in [
        PostgresStore::builder(&schema.url)
            .schema(&schema.name)
            .read_only(true),
        PostgresStore::builder(&schema.url)
            .schema(&schema.name)
            .create(false),
    ] {
        let err = builder.build().err().ok_or("a missing outbox was opened")?;
        assert!(matches!(err.kind(), ErrorKind::NotAnOutbox { .. }), "{err}");
        assert!(err.to_string().contains("holds no outbox"), "{err}");
        assert_eq!(schemas(&mut admin)?, 0, "the schema was created");
    }
    let writer = open(&schema)?;
    let e = writer.enqueue(NewEvent::new("t", json!({})))?;
    // Read-only: reads work, the server refuses every write.
    let reader = PostgresStore::builder(&schema.url)
        .schema(&schema.name)
        .read_only(true)
        .build()?;
    assert_eq!(reader.stats()?.pending, 1);
    // Its Debug names where it connects, and never a password.
    let shown = format!("{reader:?}");
    assert!(
        shown.contains("dbname=postgres") && shown.contains(&schema.name),
        "{shown}"
    );
    // The user's own server options are kept beside read-only.
    let with_options = PostgresStore::builder(&format!(
        "{} options='-c statement_timeout=5000'",
        schema.url
    ))
    .schema(&schema.name)
    .read_only(true)
    .build()?;
    let mut c = with_options.connect()?;
    let show = |c: &mut sqlite_outbox::postgres::Client,
                what: &str|
     -> Result<String, Box<dyn std::error::Error>> {
        Ok(c.query_one(&format!("SHOW {what}"), &[])?.get(0))
    };
    assert_eq!(show(&mut c, "statement_timeout")?, "5s");
    assert_eq!(show(&mut c, "default_transaction_read_only")?, "on");
    let err = reader
        .enqueue(NewEvent::new("t", json!({})))
        .err()
        .ok_or("a read-only store wrote")?;
    assert_eq!(err.kind(), &ErrorKind::ReadOnly, "{err}");
    let err = reader.requeue(sqlite_outbox::Requeue::One(e.id)).err();
    assert!(err.is_some_and(|e| e.kind() == &ErrorKind::ReadOnly));
    assert_eq!(writer.stats()?.pending, 1);
    // An older layout is reported to a reader, not migrated.
    admin.batch_execute(&format!(
        "ALTER TABLE {0}.outbox_events DROP COLUMN priority CASCADE;
         DROP TABLE {0}.outbox_limits;
         UPDATE {0}.outbox_meta SET value = 2 WHERE key = 'schema_version'",
        schema.name
    ))?;
    let err = PostgresStore::builder(&schema.url)
        .schema(&schema.name)
        .read_only(true)
        .build()
        .err()
        .ok_or("an older outbox was opened read-only")?;
    assert!(
        matches!(err.kind(), ErrorKind::SchemaMismatch { .. }),
        "{err}"
    );
    // A writer migrates it: the trigger's function gets its search_path.
    open(&schema)?;
    let config: Option<Vec<String>> = admin
        .query_one(
            "SELECT p.proconfig FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = $1 AND p.proname = 'outbox_notify'",
            &[&schema.name],
        )?
        .get(0);
    assert_eq!(
        config,
        Some(vec!["search_path=pg_catalog, pg_temp".to_owned()])
    );
    Ok(())
}

#[test]
#[cfg_attr(
    outbox_no_test_server,
    ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
)]
fn system_schemas_and_reserved_words_are_refused_with_a_reason() -> TestResult {
    let Some(url) = common::pg::url() else {
        return Ok(());
    };
    for (name, says) in [
        ("information_schema", "PostgreSQL itself"),
        ("pg_temp_x", "PostgreSQL itself"),
        ("user", "reserved word"),
        ("order", "reserved word"),
        ("select", "reserved word"),
    ] {
        let err = PostgresStore::builder(&url)
            .schema(name)
            .build()
            .err()
            .ok_or(format!("schema {name} was accepted"))?;
        assert!(
            err.is_invalid_input() && err.to_string().contains(says),
            "{name}: {err}"
        );
    }
    let mut admin = sqlite_outbox::postgres::Client::connect(&url, sqlite_outbox::postgres::NoTls)?;
    let made: i64 = admin
        .query_one(
            "SELECT count(*) FROM information_schema.tables \
             WHERE table_schema = 'information_schema' AND table_name LIKE 'outbox%'",
            &[],
        )?
        .get(0);
    assert_eq!(made, 0);
    Ok(())
}

#[test]
#[cfg_attr(
    outbox_no_test_server,
    ignore = "needs a PostgreSQL server: eval \"$(scripts/postgres.sh start)\""
)]
fn a_table_changed_by_hand_is_named_with_what_the_server_said() -> TestResult {
    let Some(schema) = Schema::fresh() else {
        return Ok(());
    };
    let store = open(&schema)?;
    store.enqueue(NewEvent::new("t", json!({})))?;
    let mut admin = schema.client();
    for (change, says) in [
        ("ALTER TABLE {s}.outbox_events DROP COLUMN traceparent CASCADE", "no column traceparent"),
        ("DROP VIEW {s}.outbox_events_readable, {s}.outbox_events_failed; ALTER TABLE {s}.outbox_events DROP CONSTRAINT created_at_is_milliseconds, ALTER COLUMN created_at DROP DEFAULT, ALTER COLUMN created_at TYPE timestamptz USING to_timestamp(created_at / 1000.0)", "created_at is timestamp with time zone"),
        ("DROP VIEW {s}.outbox_events_readable, {s}.outbox_events_failed; ALTER TABLE {s}.outbox_events ALTER COLUMN id TYPE text", "id is text"),
        ("DROP TABLE {s}.outbox_events CASCADE", "has no table outbox_events"),
    ] {
        let Some(fresh) = Schema::fresh() else {
            return Ok(());
        };
        open(&fresh)?;
        let mut admin2 = fresh.client();
        admin2.batch_execute(&change.replace("{s}", &fresh.name))?;
        let err = open(&fresh).err().ok_or(format!("opened after {change}"))?;
        assert!(
            matches!(err.kind(), ErrorKind::SchemaMismatch { .. }) && err.to_string().contains(says),
            "{change}: {err}"
        );
    }
    // A store that was open when the column went: its next claim says what
    // the server said, with the SQLSTATE, and is a schema problem.
    admin.batch_execute(&format!(
        "ALTER TABLE {}.outbox_events DROP COLUMN traceparent CASCADE",
        schema.name
    ))?;
    let err = store
        .claim(10, std::time::Duration::from_secs(30), None)
        .err()
        .ok_or("claimed without the column")?;
    let text = err.to_string();
    assert!(err.is_schema_problem(), "{text}");
    assert!(
        text.contains("traceparent") && text.contains("does not exist"),
        "{text}"
    );
    assert!(text.contains("SQLSTATE 42703"), "{text}");
    assert!(!text.contains("db error"), "{text}");
    Ok(())
}
