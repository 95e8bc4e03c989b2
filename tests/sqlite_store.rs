//! What only the SQLite store has: files, pragmas, transactions shared with
//! the caller, several connections and processes, and failing disks.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{secs, TestResult};
use rusqlite::{Connection, TransactionBehavior};
use serde_json::json;
use sqlite_outbox::{
    legacy::UnfencedStore, Durability, ErrorKind, NewEvent, Operator, SqliteStore, Status, Store,
    SCHEMA_VERSION,
};

fn open(dir: &Path) -> sqlite_outbox::Result<SqliteStore> {
    SqliteStore::open(dir.join("outbox.db"))
}

#[test]
fn enqueue_commits_and_rolls_back_with_the_callers_transaction() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path())?;
    let mut conn = Connection::open(store.path())?;
    conn.execute_batch("CREATE TABLE accounts (id INTEGER PRIMARY KEY, name TEXT)")?;

    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute("INSERT INTO accounts (name) VALUES ('rolled back')", [])?;
    let ghost = store.enqueue_tx(&tx, NewEvent::new("account.created", json!({"n": 1})))?;
    tx.rollback()?;
    assert!(store.find(ghost.id)?.is_none());
    assert_eq!(store.stats()?.total(), 0);

    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute("INSERT INTO accounts (name) VALUES ('kept')", [])?;
    let kept = store.enqueue_tx(&tx, NewEvent::new("account.created", json!({"n": 2})))?;
    tx.commit()?;
    assert_eq!(
        store.find(kept.id)?.map(|e| e.status),
        Some(Status::Pending)
    );
    assert_eq!(store.stats()?.total(), 1);
    let accounts: i64 = conn.query_row("SELECT count(*) FROM accounts", [], |r| r.get(0))?;
    assert_eq!(accounts, 1);
    Ok(())
}

#[test]
fn the_transaction_helper_rolls_back_on_error() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path())?;
    let result: Result<(), sqlite_outbox::Error> = store.transaction(|tx| {
        store.enqueue_tx(tx, NewEvent::new("t", json!(1)))?;
        Err(sqlite_outbox::Error::from(
            rusqlite::Error::QueryReturnedNoRows,
        ))
    });
    assert!(result.is_err());
    assert_eq!(store.stats()?.total(), 0);
    store.transaction(|tx| {
        store
            .enqueue_tx(tx, NewEvent::new("t", json!(2)))
            .map(|_| ())
    })?;
    assert_eq!(store.stats()?.total(), 1);
    Ok(())
}

#[test]
fn enqueue_batch_is_all_or_nothing_outside_a_transaction() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path())?;
    let conn = Connection::open(store.path())?;
    let first = store.enqueue_tx(&conn, NewEvent::new("t", json!(0)))?;
    let err = store
        .enqueue_batch_tx(
            &conn,
            vec![
                NewEvent::new("t", json!(1)),
                NewEvent::new("t", json!(2)).with_id(first.id),
            ],
        )
        .unwrap_err();
    assert!(err.is_invalid_input(), "{err}");
    assert_eq!(store.stats()?.total(), 1);
    let batch = store.enqueue_batch_tx(
        &conn,
        (0..3).map(|i| NewEvent::new("t", json!(i))).collect(),
    )?;
    assert_eq!(batch.len(), 3);
    assert_eq!(store.stats()?.total(), 4);
    Ok(())
}

#[test]
fn pragmas_read_back() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::builder(dir.path().join("full.db")).build()?;
    assert_eq!(store.pragma("journal_mode")?, "wal");
    assert_eq!(store.pragma("synchronous")?, "2", "FULL by default");
    // The header belongs to the app.
    assert_eq!(store.pragma("application_id")?, "0");
    assert_eq!(store.pragma("user_version")?, "0");
    assert_eq!(store.pragma("foreign_keys")?, "1");
    // The WAL shrinks back to 16 MiB after a long reader let it grow.
    assert_eq!(
        store.pragma("journal_size_limit")?,
        (16 * 1024 * 1024).to_string()
    );
    assert_eq!(sqlite_outbox::SqliteStore::WAL_SIZE_LIMIT, 16 * 1024 * 1024);

    let normal = SqliteStore::builder(dir.path().join("normal.db"))
        .durability(Durability::Normal)
        .build()?;
    assert_eq!(normal.pragma("synchronous")?, "1");
    Ok(())
}

fn assert_rejected(bytes: &[u8], expect: impl Fn(&ErrorKind) -> bool, what: &str) -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("x.db");
    std::fs::write(&path, bytes)?;
    let err = SqliteStore::open(&path).expect_err(what);
    assert!(expect(err.kind()), "{what}: got {:?}", err.kind());
    assert!(std::fs::read(&path)? == bytes, "{what}: the file changed");
    assert!(
        !dir.path().join("x.db-wal").exists()
            || std::fs::metadata(dir.path().join("x.db-wal"))?.len() == 0
    );
    Ok(())
}

fn sqlite_file(setup: &str) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("f.db");
    let conn = Connection::open(&path)?;
    conn.execute_batch(setup)?;
    drop(conn);
    Ok(std::fs::read(&path)?)
}

#[test]
fn foreign_and_damaged_files_are_refused_untouched() -> TestResult {
    let not_outbox = |k: &ErrorKind| matches!(k, ErrorKind::NotAnOutbox { .. });
    let mut garbage = vec![0u8; 8192];
    for (i, b) in garbage.iter_mut().enumerate() {
        *b = (i * 7 + 13) as u8;
    }
    assert_rejected(&garbage, not_outbox, "garbage")?;
    assert_rejected(
        br#"{"this": "is json, not a database"}"#,
        not_outbox,
        "text file",
    )?;
    // The app's own tables that happen to have our names are not clobbered.
    assert_rejected(
        &sqlite_file("CREATE TABLE outbox_events (id INTEGER PRIMARY KEY, body TEXT);")?,
        not_outbox,
        "an app table named outbox_events",
    )?;
    assert_rejected(
        &sqlite_file("CREATE VIEW outbox_events AS SELECT 1 AS x;")?,
        not_outbox,
        "an app view named outbox_events",
    )?;
    assert_rejected(
        &sqlite_file("CREATE TABLE outbox_meta (name TEXT, setting TEXT);")?,
        not_outbox,
        "an app table named outbox_meta",
    )?;
    assert_rejected(
        &sqlite_file(
            "CREATE TABLE outbox_meta (key TEXT PRIMARY KEY, value);
             INSERT INTO outbox_meta VALUES ('theme', 'dark');",
        )?,
        not_outbox,
        "an app outbox_meta without our key",
    )?;
    assert_rejected(
        &sqlite_file(
            "CREATE TABLE outbox_meta (key TEXT PRIMARY KEY, value);
             INSERT INTO outbox_meta VALUES ('schema_version', 999);",
        )?,
        |k| {
            matches!(
                k,
                ErrorKind::SchemaTooNew {
                    found: 999,
                    supported: SCHEMA_VERSION
                }
            )
        },
        "newer schema",
    )?;
    assert_rejected(
        &sqlite_file(&format!(
            "CREATE TABLE outbox_meta (key TEXT PRIMARY KEY, value);
             INSERT INTO outbox_meta VALUES ('schema_version', {SCHEMA_VERSION});
             CREATE TABLE outbox_events (seq INTEGER PRIMARY KEY, id TEXT);"
        ))?,
        |k| matches!(k, ErrorKind::SchemaMismatch { .. }),
        "missing columns",
    )?;
    // A version-1 header (its application id) that names a later version.
    assert_rejected(
        &sqlite_file("PRAGMA application_id = 1330992194; PRAGMA user_version = 2;")?,
        |k| matches!(k, ErrorKind::SchemaTooNew { found: 2, .. }),
        "a version-1 style header naming version 2",
    )?;
    // Versions before 2 lived in the file header: one in outbox_meta was
    // written by nobody, and nothing is migrated on its word.
    for version in [1, 0, -3] {
        assert_rejected(
            &sqlite_file(&format!(
                "CREATE TABLE outbox_meta (key TEXT PRIMARY KEY, value);
                 INSERT INTO outbox_meta VALUES ('schema_version', {version});"
            ))?,
            |k| matches!(k, ErrorKind::SchemaMismatch { reason } if reason.contains("no release wrote")),
            "a version no release wrote",
        )?;
    }
    Ok(())
}

#[test]
fn an_app_file_with_its_own_header_fields_keeps_them_byte_for_byte() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("app.db");
    let conn = Connection::open(&path)?;
    // A GeoPackage-like application_id and the app's migration state.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA application_id = 1196444487; PRAGMA user_version = 7;
         CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('hi');",
    )?;
    let header = |p: &Path| -> Result<Vec<u8>, Box<dyn std::error::Error>> {
        let c = Connection::open(p)?;
        c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
        let bytes = std::fs::read(p)?;
        // user_version (offset 60) and application_id (offset 68).
        Ok([&bytes[60..64], &bytes[68..72]].concat())
    };
    let before = header(&path)?;
    let store = SqliteStore::open(&path)?;
    store.transaction(|tx| {
        tx.execute("INSERT INTO notes VALUES ('with an event')", [])?;
        store.enqueue_tx(tx, NewEvent::new("note.created", json!({"n": 2})))?;
        Ok(())
    })?;
    let claimed = store.claim(1, secs(30), None)?;
    store.complete(&claimed[0].lease().ok_or("no lease")?)?;
    store.purge(chrono::Utc::now() + chrono::Duration::days(1))?;
    drop(store);
    SqliteStore::open(&path)?;
    assert_eq!(header(&path)?, before);
    assert_eq!(before, [0, 0, 0, 7, 0x47, 0x50, 0x4B, 0x47]);
    let notes: i64 = conn.query_row("SELECT count(*) FROM notes", [], |r| r.get(0))?;
    assert_eq!(notes, 2);
    Ok(())
}

#[test]
fn a_truncated_file_is_reported_not_panicked_on() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("t.db");
    {
        let store = SqliteStore::open(&path)?;
        let events = (0..2000)
            .map(|i| NewEvent::new("t", json!({"pad": "x".repeat(200), "i": i})))
            .collect();
        store.enqueue_batch(events)?;
        let conn = Connection::open(&path)?;
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
    }
    let bytes = std::fs::read(&path)?;
    std::fs::write(&path, &bytes[..bytes.len() / 2])?;
    let result =
        SqliteStore::open(&path).and_then(|s| s.verify().and_then(|()| s.stats().map(|_| ())));
    let err = result.expect_err("a half file must not look healthy");
    assert!(
        matches!(
            err.kind(),
            ErrorKind::Corrupt | ErrorKind::NotAnOutbox { .. }
        ),
        "{:?}",
        err.kind()
    );
    Ok(())
}

#[test]
fn an_empty_file_is_initialised() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("empty.db");
    std::fs::write(&path, b"")?;
    let store = SqliteStore::open(&path)?;
    store.enqueue(NewEvent::new("t", json!(1)))?;
    assert_eq!(store.pragma("application_id")?, "0");
    Ok(())
}

#[test]
fn an_app_database_gains_the_outbox_and_keeps_its_tables() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("app.db");
    let conn = Connection::open(&path)?;
    conn.execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('hi');")?;
    let store = SqliteStore::open(&path)?;
    store.enqueue(NewEvent::new("t", json!(1)))?;
    let body: String = conn.query_row("SELECT body FROM notes", [], |r| r.get(0))?;
    assert_eq!(body, "hi");
    // Reopening is a no-op.
    drop(store);
    SqliteStore::open(&path)?;
    Ok(())
}

#[test]
fn read_only_stores_read_and_refuse_writes() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("ro.db");
    let rw = SqliteStore::open(&path)?;
    let e = rw.enqueue(NewEvent::new("t", json!(1)))?;
    let before = std::fs::read(&path)?;
    let ro = SqliteStore::builder(&path).read_only(true).build()?;
    assert_eq!(ro.stats()?.pending, 1);
    assert!(ro.find(e.id)?.is_some());
    let errors = [
        ro.enqueue(NewEvent::new("t", json!(2))).map(|_| ()),
        ro.claim(1, secs(30), None).map(|_| ()),
        ro.mark_done(e.id),
    ];
    for err in errors {
        assert_eq!(err.unwrap_err().kind(), &ErrorKind::ReadOnly);
    }
    assert!(std::fs::read(&path)? == before, "the file changed");
    // A missing file is not created by a read-only open.
    let missing = dir.path().join("missing.db");
    assert!(SqliteStore::builder(&missing)
        .read_only(true)
        .build()
        .is_err());
    assert!(!missing.exists());
    Ok(())
}

#[test]
fn raw_sql_inserts_follow_the_documented_contract() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path())?;
    let conn = Connection::open(store.path())?;
    // What an app in another language writes: a type and a payload.
    conn.execute(
        "INSERT INTO outbox_events (event_type, payload) VALUES ('sync.push', '{\"doc\": 7}')",
        [],
    )?;
    let claimed = store.claim(10, secs(30), None)?;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].payload, json!({"doc": 7}));
    // The text as the writer stored it, spacing and all.
    assert_eq!(claimed[0].payload.get(), "{\"doc\": 7}");
    assert_eq!(claimed[0].max_attempts, 10);
    assert_eq!(claimed[0].id.as_uuid().get_version_num(), 4);
    // The table refuses what would break a reader.
    for bad in [
        "INSERT INTO outbox_events (event_type, payload) VALUES ('t', '{not json')",
        "INSERT INTO outbox_events (event_type, payload) VALUES ('', '{}')",
        "INSERT INTO outbox_events (event_type, payload, status) VALUES ('t', '{}', 'weird')",
        "INSERT INTO outbox_events (id, event_type, payload) VALUES ('nope', 't', '{}')",
        "INSERT INTO outbox_events (event_type, payload, status) VALUES ('t', '{}', 'processing')",
    ] {
        let err = conn.execute(bad, []).expect_err(bad);
        assert_eq!(
            err.sqlite_error_code(),
            Some(rusqlite::ErrorCode::ConstraintViolation),
            "{bad}"
        );
    }
    Ok(())
}

#[test]
fn claims_and_maintenance_use_index_range_scans() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path())?;
    let conn = Connection::open(store.path())?;
    let plan = |sql: &str| -> Result<String, rusqlite::Error> {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(3))?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?.join(" | "))
    };
    let cases = [
        ("SELECT seq FROM outbox_events WHERE status = 'pending' AND next_attempt_at <= 5 ORDER BY next_attempt_at, seq LIMIT 10", "outbox_events_due"),
        ("SELECT seq FROM outbox_events WHERE status = 'processing' AND locked_until <= 5 ORDER BY next_attempt_at, seq LIMIT 10", "outbox_events_leases"),
        ("SELECT 1 FROM outbox_events AS b WHERE b.ordering_key = 'k' AND b.status IN ('pending', 'processing') AND b.seq < 9", "outbox_events_ordering"),
        ("DELETE FROM outbox_events WHERE status IN ('done', 'failed') AND created_at < 5", "outbox_events_finished"),
        ("DELETE FROM outbox_events WHERE org_id = 'x'", "outbox_events_org"),
        ("DELETE FROM outbox_events WHERE user_id = 'x'", "outbox_events_user"),
        ("SELECT count(*) FROM outbox_events WHERE status = 'failed'", "outbox_events_failed"),
        // What SqliteStore::backlog asks (relay --drain, many times a second).
        ("SELECT EXISTS (SELECT 1 FROM outbox_events AS e WHERE e.status = 'pending' AND e.next_attempt_at <= 5)", "outbox_events_due"),
        ("SELECT EXISTS (SELECT 1 FROM outbox_events AS e WHERE e.status = 'processing')", "outbox_events_leases"),
        ("SELECT min(e.next_attempt_at) FROM outbox_events AS e WHERE e.status = 'pending' AND e.next_attempt_at > 5", "outbox_events_due"),
    ];
    for (sql, index) in cases {
        let p = plan(sql)?;
        assert!(p.contains(index), "{sql}\n  plan: {p}");
        assert!(
            !p.contains("SCAN outbox_events") || p.contains("USING"),
            "{sql}\n  plan: {p}"
        );
    }
    Ok(())
}

#[test]
fn threads_on_one_file_never_claim_the_same_live_event() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path())?;
    store.enqueue_batch((0..400).map(|i| NewEvent::new("t", json!(i))).collect())?;
    let barrier = Arc::new(Barrier::new(4));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            // Separate stores: separate pools and write locks, as in separate processes.
            let store = SqliteStore::open(store.path());
            let barrier = barrier.clone();
            std::thread::spawn(
                move || -> sqlite_outbox::Result<Vec<sqlite_outbox::EventId>> {
                    let store = store?;
                    barrier.wait();
                    let mut mine = Vec::new();
                    loop {
                        let batch = store.claim(7, secs(300), None)?;
                        if batch.is_empty() {
                            return Ok(mine);
                        }
                        mine.extend(batch.iter().map(|e| e.id));
                    }
                },
            )
        })
        .collect();
    let mut seen = HashSet::new();
    let mut total = 0;
    for h in handles {
        let ids = h.join().map_err(|_| "claimer panicked")??;
        total += ids.len();
        seen.extend(ids);
    }
    assert_eq!(total, 400, "every event claimed once");
    assert_eq!(seen.len(), 400, "no event claimed twice");
    Ok(())
}

#[test]
fn concurrent_first_opens_all_succeed() -> TestResult {
    for round in 0..5 {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("fresh.db");
        let barrier = Arc::new(Barrier::new(6));
        let handles: Vec<_> = (0..6)
            .map(|i| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || -> sqlite_outbox::Result<()> {
                    barrier.wait();
                    let store = SqliteStore::open(&path)?;
                    store.enqueue(NewEvent::new("t", json!(i)))?;
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| "opener panicked")??;
        }
        let store = SqliteStore::open(&path)?;
        assert_eq!(store.stats()?.total(), 6, "round {round}");
    }
    Ok(())
}

#[test]
fn a_locked_database_gives_busy_within_the_timeout() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("locked.db");
    let timeout = Duration::from_millis(300);
    let store = SqliteStore::builder(&path).busy_timeout(timeout).build()?;
    let before = store.enqueue(NewEvent::new("t", json!(0)))?;
    let locker = Connection::open(&path)?;
    locker.execute_batch("BEGIN EXCLUSIVE")?;
    let started = Instant::now();
    let err = store.enqueue(NewEvent::new("t", json!(1))).unwrap_err();
    let waited = started.elapsed();
    assert!(err.is_busy(), "{err:?}");
    assert!(waited >= timeout, "gave up early: {waited:?}");
    assert!(waited < timeout * 5, "hung: {waited:?}");
    // Readers are not blocked by a WAL writer, and nothing was lost.
    assert!(store.find(before.id)?.is_some());
    locker.execute_batch("COMMIT")?;
    store.enqueue(NewEvent::new("t", json!(2)))?;
    assert_eq!(store.stats()?.total(), 2);
    Ok(())
}

/// Another program that holds the write lock most of the time and frees it
/// for 5 ms every 300 ms. SQLite's own busy handler looks again only every
/// 100 ms once it has waited 228 ms, and mostly misses those moments; the
/// outbox looks every 2 ms.
#[test]
fn a_writer_that_frees_the_lock_briefly_still_lets_the_outbox_in() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("busy.db");
    let store = SqliteStore::builder(&path)
        .busy_timeout(Duration::from_secs(2))
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let holder = {
        let (path, stop) = (path.clone(), stop.clone());
        std::thread::spawn(move || -> rusqlite::Result<()> {
            let conn = Connection::open(&path)?;
            conn.busy_timeout(Duration::from_secs(10))?;
            while !stop.load(Ordering::Relaxed) {
                conn.execute_batch("BEGIN IMMEDIATE")?;
                std::thread::sleep(Duration::from_millis(300));
                conn.execute_batch("COMMIT")?;
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        })
    };
    // Let the holder take the lock first.
    std::thread::sleep(Duration::from_millis(20));
    let results: Vec<_> = (0..5)
        .map(|i| store.enqueue(NewEvent::new("t", json!(i))))
        .collect();
    stop.store(true, Ordering::Relaxed);
    holder.join().map_err(|_| "holder panicked")??;
    for r in &results {
        assert!(r.is_ok(), "{r:?}");
    }
    assert_eq!(store.stats()?.total(), 5);
    Ok(())
}

#[test]
fn a_full_disk_fails_cleanly_and_recovers() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("full.db");
    SqliteStore::open(&path)?;
    let store = SqliteStore::builder(&path)
        .max_page_count(40)
        .pool_size(1)
        .build()?;
    let mut committed = Vec::new();
    let err = loop {
        match store.enqueue(NewEvent::new("t", json!({"pad": "x".repeat(500)}))) {
            Ok(e) => committed.push(e.id),
            Err(e) => break e,
        }
        assert!(committed.len() < 10_000, "never filled up");
    };
    assert!(err.is_disk_full(), "{err:?}");
    assert!(!committed.is_empty());
    // A claim and its ack still work when the page count allows them.
    let claimed = store.claim(5, secs(30), None)?;
    for e in &claimed {
        store.complete(&e.lease().ok_or("lease")?)?;
    }
    // Everything committed before is there, and a bigger store resumes.
    drop(store);
    let store = SqliteStore::open(&path)?;
    for id in &committed {
        assert!(store.find(*id)?.is_some());
    }
    store.enqueue(NewEvent::new("t", json!("after")))?;
    store.verify()?;
    Ok(())
}

#[test]
fn backup_includes_commits_still_in_the_wal() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path())?;
    // Keep a reader open so nothing is checkpointed into the main file.
    let reader = Connection::open(store.path())?;
    reader.execute_batch("PRAGMA wal_autocheckpoint = 0")?;
    let events = store.enqueue_batch((0..50).map(|i| NewEvent::new("t", json!(i))).collect())?;
    let copy = dir.path().join("copy.db");
    store.backup(&copy)?;
    let restored = SqliteStore::open(&copy)?;
    assert_eq!(restored.stats()?.total(), 50);
    assert!(restored.find(events[49].id)?.is_some());
    assert!(
        store.backup(&copy).unwrap_err().is_invalid_input(),
        "never overwrites"
    );
    Ok(())
}

#[test]
fn verify_accepts_a_healthy_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path())?;
    store.enqueue(NewEvent::new("t", json!(1)))?;
    store.verify()?;
    Ok(())
}

#[test]
fn enqueue_is_idempotent_across_connections() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path())?;
    let a = Connection::open(store.path())?;
    let first = store.enqueue_tx(&a, NewEvent::new("t", json!(1)).with_idempotency_key("k"))?;
    let again = store.transaction(|tx| {
        store.enqueue_tx(tx, NewEvent::new("t", json!(2)).with_idempotency_key("k"))
    })?;
    assert_eq!(again.id, first.id);
    assert_eq!(again.payload, json!(1));
    assert_eq!(store.stats()?.total(), 1);
    Ok(())
}

#[test]
fn stores_are_send_sync_and_debug() {
    fn check<T: Send + Sync + std::fmt::Debug>() {}
    check::<SqliteStore>();
    check::<sqlite_outbox::MemoryStore>();
    check::<sqlite_outbox::Error>();
    check::<sqlite_outbox::Event>();
    check::<sqlite_outbox::NewEvent>();
    check::<sqlite_outbox::Dispatcher>();
    check::<sqlite_outbox::DispatcherBuilder>();
    check::<sqlite_outbox::RetryPolicy>();
    check::<sqlite_outbox::ManualClock>();
    check::<sqlite_outbox::Stats>();
    check::<sqlite_outbox::HandlerError>();
}

#[test]
fn a_store_debugs_as_its_file_and_settings() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::builder(dir.path().join("shown.db"))
        .durability(Durability::Normal)
        .build()?;
    let shown = format!("{store:?}");
    for part in ["SqliteStore", "shown.db", "Normal", "busy_timeout"] {
        assert!(shown.contains(part), "{shown}");
    }
    Ok(())
}

/// T13: every write path takes the write lock up front (`BEGIN IMMEDIATE`),
/// never by upgrading a read transaction, which fails at once with
/// `SQLITE_BUSY_SNAPSHOT` under contention whatever the busy timeout.
#[test]
fn write_transactions_are_immediate() -> TestResult {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store");
    let mut src = std::fs::read_to_string(dir.join("schema.rs"))?;
    for file in std::fs::read_dir(dir.join("sqlite"))? {
        src += &std::fs::read_to_string(file?.path())?;
    }
    let (mut begins, mut reads) = (0, 0);
    for (n, line) in src.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        if code.contains("TransactionBehavior::Deferred") {
            // Read-only snapshots: inspecting a file before opening it, and
            // the counts of stats().
            reads += 1;
            continue;
        }
        if code.contains("transaction_with_behavior(")
            || code.contains("Transaction::new_unchecked(")
        {
            begins += 1;
            assert!(code.contains("Immediate"), "line {}: {code}", n + 1);
        }
        assert!(
            !code.contains(".transaction()"),
            "line {}: a deferred transaction: {code}",
            n + 1
        );
        assert!(!code.contains("\"BEGIN DEFERRED"), "line {}: {code}", n + 1);
    }
    assert!(begins >= 4, "the check found the write paths ({begins})");
    assert_eq!(
        reads, 2,
        "only inspect_snapshot and stats read in a transaction"
    );
    // No hand-written BEGIN: a failure between it and COMMIT would return a
    // pooled connection still inside a transaction.
    assert_eq!(src.matches("\"BEGIN").count(), 0);
    Ok(())
}

/// T7a: when the size limit is reached mid-flight, a claim or an ack that
/// fails leaves the event to be redelivered, never lost or marked done.
#[test]
fn a_full_disk_never_loses_a_claimed_event() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("full.db");
    let store = SqliteStore::open(&path)?;
    let events = store.enqueue_batch((0..20).map(|i| NewEvent::new("t", json!(i))).collect())?;
    let claimed = store.claim(20, secs(30), None)?;
    drop(store);
    // Fill the file to its cap with another store, then try to finish.
    let capped = SqliteStore::builder(&path)
        .max_page_count(30)
        .pool_size(1)
        .build()?;
    let filler = loop {
        match capped.enqueue(NewEvent::new("filler", json!({"pad": "x".repeat(1000)}))) {
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    assert!(filler.is_disk_full());
    let mut acked = Vec::new();
    for e in &claimed {
        match capped.complete(&e.lease().ok_or("lease")?) {
            Ok(()) => acked.push(e.id),
            Err(err) => assert!(err.is_disk_full(), "{err:?}"),
        }
    }
    drop(capped);
    let store = SqliteStore::builder(&path)
        .clock(Arc::new(sqlite_outbox::ManualClock::at(
            chrono::Utc::now() + chrono::Duration::seconds(60),
        )))
        .build()?;
    for e in &events {
        let now = store.find(e.id)?.ok_or("lost")?;
        if acked.contains(&e.id) {
            assert_eq!(now.status, Status::Done);
        } else {
            assert_eq!(
                now.status,
                Status::Processing,
                "an unacknowledged event changed"
            );
        }
    }
    // After the leases run out the unacknowledged ones come back.
    let again = store.claim(100, secs(30), Some(&["t".to_owned()]))?;
    assert_eq!(again.len(), events.len() - acked.len());
    Ok(())
}

mod payloads {
    use proptest::prelude::*;
    use sqlite_outbox::{NewEvent, SqliteStore};

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

        /// T11: arbitrary bytes as a payload never panic; what parses as
        /// JSON is stored and read back unchanged.
        #[test]
        fn arbitrary_payloads_are_rejected_or_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let text = String::from_utf8_lossy(&bytes);
            match NewEvent::from_json("t", &text) {
                Err(e) => prop_assert!(e.is_invalid_input()),
                Ok(event) => {
                    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
                    let store = SqliteStore::open(dir.path().join("p.db")).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    let value = event.payload().clone();
                    let stored = store.enqueue(event).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    let read = store.find(stored.id).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(read.map(|e| e.payload.into_value()), Some(value));
                }
            }
        }

        #[test]
        fn json_values_round_trip(value in arb_json()) {
            let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let store = SqliteStore::open(dir.path().join("p.db")).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let stored = store.enqueue(NewEvent::new("t", value.clone())).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let read = store.find(stored.id).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(read.map(|e| e.payload.into_value()), Some(value));
        }
    }

    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(serde_json::Value::from),
            ".*".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::btree_map(".{0,8}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }
}

/// T12b: a lock held for half the busy timeout is waited out.
#[test]
fn a_short_lock_is_waited_out() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("short.db");
    let store = SqliteStore::builder(&path)
        .busy_timeout(Duration::from_millis(600))
        .build()?;
    let locker = Connection::open(&path)?;
    locker.execute_batch("BEGIN EXCLUSIVE")?;
    let release = std::thread::spawn(move || -> rusqlite::Result<()> {
        std::thread::sleep(Duration::from_millis(300));
        locker.execute_batch("COMMIT")
    });
    store.enqueue(NewEvent::new("t", json!(1)))?;
    release.join().map_err(|_| "locker panicked")??;
    assert_eq!(store.stats()?.total(), 1);
    Ok(())
}

/// T12d: a file held in exclusive locking mode by another connection is
/// reported as busy, not as damaged.
#[test]
fn an_exclusively_locked_file_is_busy_not_corrupt() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("excl.db");
    SqliteStore::open(&path)?.enqueue(NewEvent::new("t", json!(1)))?;
    let holder = Connection::open(&path)?;
    holder.execute_batch("PRAGMA locking_mode = EXCLUSIVE; BEGIN EXCLUSIVE; COMMIT;")?;
    let err = SqliteStore::builder(&path)
        .busy_timeout(Duration::from_millis(200))
        .build()
        .and_then(|s| s.enqueue(NewEvent::new("t", json!(2))))
        .expect_err("the file is held exclusively");
    assert!(err.is_busy(), "{:?}", err.kind());
    drop(holder);
    assert_eq!(SqliteStore::open(&path)?.stats()?.total(), 1);
    Ok(())
}

/// Payloads often carry personal data: new files are the owner's alone,
/// and the WAL, the shared-memory file and backups follow.
#[test]
fn new_files_are_private_to_their_owner() -> TestResult {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("private.db");
    let store = SqliteStore::open(&path)?;
    store.enqueue(NewEvent::new(
        "t",
        json!({"reset_link": "https://example.com/r/secret"}),
    ))?;
    let backup = dir.path().join("copy.db");
    store.backup(&backup)?;
    let wal = dir.path().join("private.db-wal");
    let shm = dir.path().join("private.db-shm");
    for file in [&path, &wal, &shm, &backup] {
        let mode = std::fs::metadata(file)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}: {mode:o}", file.display());
    }
    // An existing file keeps the mode its owner chose.
    let shared = dir.path().join("shared.db");
    std::fs::write(&shared, b"")?;
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o640))?;
    SqliteStore::open(&shared)?;
    assert_eq!(
        std::fs::metadata(&shared)?.permissions().mode() & 0o777,
        0o640
    );
    Ok(())
}

/// A path is a path: URI parameters such as `nolock=1` cannot switch off
/// the locking that every guarantee between processes rests on.
#[test]
fn uri_parameters_in_a_path_are_not_obeyed() -> TestResult {
    let dir = tempfile::tempdir()?;
    let target = dir.path().join("x.db");
    // As a URI this would open x.db without locks; as a path it names a
    // file under a directory `file:` that does not exist.
    let uri = format!("file:{}?nolock=1", target.display());
    let opened = SqliteStore::open(&uri);
    assert!(opened.is_err(), "a URI was opened as one");
    assert!(!target.exists());
    Ok(())
}

#[test]
fn full_durability_asks_for_full_fsync() -> TestResult {
    let dir = tempfile::tempdir()?;
    let full = SqliteStore::open(dir.path().join("full.db"))?;
    assert_eq!(full.pragma("fullfsync")?, "1");
    assert_eq!(full.pragma("checkpoint_fullfsync")?, "1");
    let normal = SqliteStore::builder(dir.path().join("normal.db"))
        .durability(Durability::Normal)
        .build()?;
    assert_eq!(normal.pragma("fullfsync")?, "0");
    Ok(())
}

/// One row that cannot be read (bytes that are not UTF-8 in a payload or an
/// event type: plain SQL lets them in, `json_valid` accepts them) is set
/// aside as failed with an error naming the column; every other event is
/// delivered, and the row can be listed, shown and found by `verify`.
#[test]
fn an_undecodable_row_is_set_aside_and_the_rest_flows() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path())?;
    store.enqueue(NewEvent::new("t", json!({"n": 1})))?;
    let conn = Connection::open(store.path())?;
    // {"a":"<0xFF>"}
    conn.execute_batch(
        "INSERT INTO outbox_events (event_type, payload)
           VALUES ('t', CAST(X'7B2261223A22FF227D' AS TEXT));
         INSERT INTO outbox_events (event_type, payload)
           VALUES (CAST(X'74FF' AS TEXT), '{}');",
    )?;
    store.enqueue(NewEvent::new("t", json!({"n": 2})))?;
    // Listing, counting and finding still work.
    assert_eq!(store.stats()?.pending, 4);
    assert_eq!(store.list(&sqlite_outbox::ListFilter::default())?.len(), 4);
    let err = store.verify().expect_err("verify sees the bad rows");
    assert_eq!(err.kind(), &ErrorKind::Corrupt);
    let cause = err.to_string();
    assert!(cause.contains("2 event row(s) cannot be read"), "{cause}");
    assert!(
        cause.contains("event seq 2: column payload is not valid UTF-8"),
        "{cause}"
    );
    assert!(cause.contains("event seq 3: column event_type"), "{cause}");

    let claimed = store.claim(10, secs(30), None)?;
    let payloads: Vec<_> = claimed.iter().map(|e| e.payload.clone()).collect();
    assert_eq!(payloads, vec![json!({"n": 1}), json!({"n": 2})]);
    let failed = store.list(&sqlite_outbox::ListFilter {
        status: Some(Status::Failed),
        ..Default::default()
    })?;
    let errors: Vec<String> = failed.iter().filter_map(|e| e.last_error.clone()).collect();
    assert_eq!(errors.len(), 2);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("column payload is not valid UTF-8")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("column event_type is not valid UTF-8")),
        "{errors:?}"
    );
    // An operator can purge them.
    assert_eq!(
        store.purge(chrono::Utc::now() + chrono::Duration::days(1))?,
        2
    );
    Ok(())
}

/// Well-formed JSON that a `serde_json::Value` cannot hold (`json_valid`
/// accepts 1e400) is delivered as stored: the handler has the text, and
/// reading it as a type is a permanent failure, not a stuck claim.
#[test]
fn a_payload_beyond_f64_reaches_the_handler_as_its_text() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path())?;
    Connection::open(store.path())?.execute(
        "INSERT INTO outbox_events (event_type, payload) VALUES ('t', '[1e400]')",
        [],
    )?;
    let claimed = store.claim(10, secs(30), None)?;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].payload.get(), "[1e400]");
    assert_eq!(claimed[0].payload, json!("[1e400]"));
    let err = claimed[0]
        .payload_as::<Vec<f64>>()
        .expect_err("1e400 is not an f64");
    assert!(err.is_permanent(), "{err}");
    assert!(err.to_string().contains("number out of range"), "{err}");
    Ok(())
}

/// The event is written through the caller's connection, inside the
/// caller's transaction: even a DEFERRED one whose first write is the
/// enqueue rolls the event back with the app's row.
#[test]
fn enqueue_first_in_a_deferred_transaction_rolls_back_with_it() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path())?;
    let mut conn = Connection::open(store.path())?;
    conn.execute_batch("CREATE TABLE notes (body TEXT)")?;
    let tx = conn.transaction()?;
    let e = store.enqueue_tx(&tx, NewEvent::new("note.created", json!({})))?;
    tx.execute("INSERT INTO notes VALUES ('x')", [])?;
    tx.rollback()?;
    assert!(store.find(e.id)?.is_none());
    assert_eq!(store.stats()?.total(), 0);
    Ok(())
}

#[test]
fn builders_refuse_what_they_cannot_honour() -> TestResult {
    let dir = tempfile::tempdir()?;
    let err = SqliteStore::builder(dir.path().join("o.db"))
        .pool_size(0)
        .build()
        .expect_err("a pool of no connections");
    assert!(err.is_invalid_input(), "{err}");
    assert!(!dir.path().join("o.db").exists(), "nothing was created");
    let store = open(dir.path())?;
    let err = sqlite_outbox::Dispatcher::builder(store)
        .workers(0)
        .handle("t", |_| Ok(()))
        .start()
        .expect_err("no workers");
    assert!(err.is_invalid_input(), "{err}");
    Ok(())
}

#[test]
fn verify_names_the_first_five_bad_rows_and_counts_all() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path())?;
    let conn = Connection::open(store.path())?;
    for _ in 0..7 {
        conn.execute(
            "INSERT INTO outbox_events (event_type, payload) VALUES ('t', CAST(X'22FF22' AS TEXT))",
            [],
        )?;
    }
    let shown = store.verify().expect_err("seven bad rows").to_string();
    assert!(shown.contains("7 event row(s) cannot be read"), "{shown}");
    assert_eq!(shown.matches("event seq").count(), 5, "{shown}");
    Ok(())
}

#[test]
fn a_duplicate_id_is_refused_naming_the_event() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path())?;
    let first = store.enqueue(NewEvent::new("t", json!(1)))?;
    let err = store
        .enqueue(NewEvent::new("t", json!(2)).with_id(first.id))
        .expect_err("a second event with the same id");
    assert!(err.is_invalid_input());
    assert!(err.to_string().contains(&first.id.to_string()), "{err}");
    Ok(())
}

/// Rows another program wrote into `outbox_destinations` that do not read
/// as a destination are left out of `stats`; they do not break it.
#[test]
fn foreign_destination_rows_are_shown_or_left_out_not_fatal() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = open(dir.path())?;
    let conn = Connection::open(store.path())?;
    conn.execute_batch(
        "PRAGMA ignore_check_constraints = ON;
         INSERT INTO outbox_destinations (name, hold, since, updated_at)
           VALUES ('bogus-hold', 'sideways', 1700000000000, 1700000000000);
         INSERT INTO outbox_destinations (name, hold, since, updated_at)
           VALUES ('text-time', 'paused', 'yesterday', 1700000000000);
         INSERT INTO outbox_destinations (name, hold, since, next_probe_at, last_error, updated_at)
           VALUES ('fine', 'unreachable', 1700000000000, 1700000060000, CAST(x'ff41' AS TEXT), 1700000000000);",
    )?;
    let shown = store.stats()?.destinations;
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert_eq!(shown[0].name, "fine");
    assert_eq!(shown[0].last_error.as_deref(), Some("\u{fffd}A"));
    Ok(())
}

/// An app whose own application id happens to be the one version 1
/// stamped ("OUTB"), with no outbox in its file: the outbox is created and
/// the app's header is left alone.
#[test]
fn an_app_header_that_looks_like_version_1_is_left_alone() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("app.db");
    let conn = Connection::open(&path)?;
    conn.execute_batch(
        "PRAGMA application_id = 1330992194; PRAGMA user_version = 1;
         CREATE TABLE notes (id INTEGER PRIMARY KEY);",
    )?;
    drop(conn);
    let store = SqliteStore::open(&path)?;
    store.enqueue(NewEvent::new("t", json!({})))?;
    assert_eq!(store.pragma("application_id")?, "1330992194");
    assert_eq!(store.pragma("user_version")?, "1");
    Ok(())
}

/// Creating the outbox waits for another connection's lock longer than
/// the busy timeout: an opener retries for twice the larger of the busy
/// timeout and 5 s, so a file another process holds for a few seconds
/// still opens.
#[test]
fn opening_waits_out_a_lock_held_past_the_busy_timeout() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("app.db");
    let holder = Connection::open(&path)?;
    holder.execute_batch("CREATE TABLE notes (id INTEGER PRIMARY KEY); BEGIN IMMEDIATE;")?;
    let release = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(3));
        holder.execute_batch("COMMIT")
    });
    let started = std::time::Instant::now();
    let store = SqliteStore::builder(&path)
        .busy_timeout(std::time::Duration::from_millis(100))
        .build()?;
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(2),
        "it waited"
    );
    release.join().map_err(|_| "the holder panicked")??;
    store.enqueue(NewEvent::new("t", json!({})))?;
    Ok(())
}
