//! Schema migrations: files from before the outbox was a guest in the
//! app's database are upgraded on open, with nothing lost, once, by any
//! number of openers at a time, and atomically through `kill -9` and power
//! cuts.

mod common;

use std::path::Path;
use std::sync::{Arc, Barrier};

use common::{secs, TestResult};
use rusqlite::types::Value;
use rusqlite::{Connection, TransactionBehavior};
use serde_json::json;
use sqlite_outbox::{EventId, NewEvent, Operator, SqliteStore, Store, SCHEMA_VERSION};

const V1_DDL: &str = include_str!("../migrations/001_initial.sql");
const TO_V2: &str = include_str!("../migrations/002_guest.sql");
const TO_V3: &str = include_str!("../migrations/003_destinations.sql");
const V1_APPLICATION_ID: i64 = 0x4F55_5442;

/// A file written by the crate at schema version 1: its quickstart demo
/// (done and failed events), two `sync.push` events with every optional
/// field, the first claimed by an `outbox relay` that was then killed (a
/// live lease), and most done events deleted to keep the file small.
const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/v1-from-0.1-dev.db"
);

/// Builds a version-1 file the way version 1 did (its DDL and both header
/// fields in one transaction, WAL on), then runs `rows`.
fn v1_file(path: &Path, rows: &str) -> rusqlite::Result<()> {
    let mut conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(V1_DDL)?;
    tx.pragma_update(None, "application_id", V1_APPLICATION_ID)?;
    tx.pragma_update(None, "user_version", 1)?;
    tx.execute_batch(rows)?;
    tx.commit()
}

/// `count` events with distinct payloads, keys and times.
fn many_events(count: u32) -> String {
    format!(
        "INSERT INTO outbox_events (event_type, payload, ordering_key, next_attempt_at, created_at)
         SELECT 'bulk', json_object('i', i, 'pad', hex(randomblob(40))), 'k' || (i % 50),
                1700000000000 + i, 1700000000000 + i
         FROM (WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count})
               SELECT i FROM n);"
    )
}

type Rows = Vec<Vec<Value>>;

/// Every stored row, column by column, in `seq` order.
fn rows(path: &Path) -> rusqlite::Result<Rows> {
    let conn = Connection::open(path)?;
    // The columns every version has; the ones added since must read NULL
    // in rows carried over.
    let added: i64 = conn.query_row(
        "SELECT count(*) FROM pragma_table_info('outbox_events') WHERE name = 'traceparent'",
        [],
        |r| r.get(0),
    )?;
    if added == 1 {
        let traced: i64 = conn.query_row(
            "SELECT count(*) FROM outbox_events WHERE traceparent IS NOT NULL",
            [],
            |r| r.get(0),
        )?;
        assert_eq!(traced, 0, "a row carried over gained a traceparent");
    }
    let raised: i64 = conn
        .query_row(
            "SELECT count(*) FROM outbox_events WHERE priority <> 0",
            [],
            |r| r.get(0),
        )
        .unwrap_or(0);
    assert_eq!(raised, 0, "a row carried over gained a priority");
    let mut stmt = conn.prepare(
        "SELECT seq, id, event_type, payload, status, attempts, max_attempts, next_attempt_at,
                locked_at, locked_until, lease_token, completed_at, delivered_at, last_error,
                correlation_id, org_id, user_id, ordering_key, idempotency_key, created_at
         FROM outbox_events ORDER BY seq",
    )?;
    let n = stmt.column_count();
    let rows = stmt.query_map([], |r| (0..n).map(|i| r.get::<_, Value>(i)).collect())?;
    rows.collect()
}

/// `(application_id, user_version, schema_version in outbox_meta)`.
fn header(path: &Path) -> rusqlite::Result<(i64, i64, Option<i64>)> {
    let conn = Connection::open(path)?;
    let (app, user, has_meta) = conn.query_row(
        "SELECT (SELECT application_id FROM pragma_application_id()),
                (SELECT user_version FROM pragma_user_version()),
                EXISTS (SELECT 1 FROM sqlite_schema WHERE name = 'outbox_meta')",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, bool>(2)?)),
    )?;
    let meta = if has_meta {
        Some(conn.query_row(
            "SELECT value FROM outbox_meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )?)
    } else {
        None
    };
    Ok((app, user, meta))
}

fn sequence(path: &Path) -> rusqlite::Result<i64> {
    Connection::open(path)?.query_row(
        "SELECT seq FROM sqlite_sequence WHERE name = 'outbox_events'",
        [],
        |r| r.get(0),
    )
}

/// The outbox's objects as SQLite stores them, with comments, spacing and
/// the quoting that `ALTER TABLE ... RENAME` adds taken out.
fn schema_of(path: &Path) -> rusqlite::Result<Vec<(String, String, String)>> {
    let conn = Connection::open(path)?;
    let mut stmt = conn.prepare(
        "SELECT type, name, sql FROM sqlite_schema WHERE name LIKE 'outbox%' ORDER BY name",
    )?;
    let rows = stmt.query_map([], |r| {
        let sql: String = r.get(2)?;
        let code: String = sql
            .lines()
            .map(|l| l.split("--").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join(" ");
        let code = code.split_whitespace().collect::<Vec<_>>().join(" ");
        Ok((
            r.get(0)?,
            r.get(1)?,
            code.replace("\"outbox_events\"", "outbox_events"),
        ))
    })?;
    rows.collect()
}

#[test]
fn a_version_1_file_from_the_crate_is_upgraded_with_nothing_lost() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("app.db");
    std::fs::copy(FIXTURE, &path)?;
    let before = rows(&path)?;
    assert_eq!(before.len(), 54);
    assert_eq!(header(&path)?, (V1_APPLICATION_ID, 1, None));

    let store = SqliteStore::open(&path)?;
    assert_eq!(rows(&path)?, before, "every row, every column, unchanged");
    assert_eq!(
        header(&path)?,
        (0, 0, Some(SCHEMA_VERSION)),
        "header given back"
    );
    assert_eq!(sequence(&path)?, 4002);
    let stats = store.stats()?;
    assert_eq!(
        (stats.done, stats.failed, stats.pending, stats.processing),
        (48, 4, 1, 1)
    );
    store.verify()?;

    // The killed relay's lease still holds its event, and fences.
    let held = store
        .list(&sqlite_outbox::ListFilter {
            status: Some(sqlite_outbox::Status::Processing),
            ..Default::default()
        })?
        .pop()
        .ok_or("the claimed event")?;
    assert_eq!(held.seq, 4001);
    assert!(held.lease_token.is_some());
    // New events continue the sequence.
    assert_eq!(store.enqueue(NewEvent::new("t", json!(1)))?.seq, 4003);

    // Opening again changes nothing.
    drop(store);
    let migrated = rows(&path)?;
    SqliteStore::open(&path)?;
    assert_eq!(rows(&path)?, migrated);
    Ok(())
}

/// A version-2 file (what 0.1 development builds wrote before the
/// destinations) gains the index and the table, keeps its rows, and ends
/// with exactly the schema of a fresh file.
#[test]
fn a_version_2_file_moves_to_the_current_version() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (fresh, old) = (dir.path().join("fresh.db"), dir.path().join("v2.db"));
    SqliteStore::open(&fresh)?;
    let kept = {
        let store = SqliteStore::open(&old)?;
        store.enqueue(NewEvent::new("t", json!({"kept": true})))?
    };
    let conn = Connection::open(&old)?;
    conn.execute_batch(
        "DROP INDEX outbox_events_due_by_type;
         DROP TABLE outbox_destinations;
         DROP INDEX outbox_events_urgent; DROP TABLE outbox_limits;
         ALTER TABLE outbox_events DROP COLUMN priority;
         ALTER TABLE outbox_events DROP COLUMN traceparent;
         UPDATE outbox_meta SET value = 2 WHERE key = 'schema_version';",
    )?;
    drop(conn);
    assert_eq!(header(&old)?, (0, 0, Some(2)));
    // Read-only, it is read as it is.
    let reader = SqliteStore::builder(&old).read_only(true).build()?;
    let stats = reader.stats()?;
    assert_eq!((stats.pending, stats.destinations.len()), (1, 0));
    drop(reader);
    assert_eq!(header(&old)?, (0, 0, Some(2)));
    let store = SqliteStore::open(&old)?;
    assert_eq!(header(&old)?, (0, 0, Some(SCHEMA_VERSION)));
    assert_eq!(SCHEMA_VERSION, 6);
    assert_eq!(schema_of(&fresh)?, schema_of(&old)?);
    assert_eq!(
        store.find(kept.id)?.map(|e| e.payload.into_value()),
        Some(json!({"kept": true}))
    );
    Ok(())
}

/// A version-3 file (the status check spelled as an IN list) is rebuilt
/// with the faster check: every row and the sequence kept, exactly the
/// schema of a fresh file, and the check refusing what it refused.
#[test]
fn a_version_3_file_moves_to_the_current_version_with_every_row_kept() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (fresh, old) = (dir.path().join("fresh.db"), dir.path().join("v3.db"));
    SqliteStore::open(&fresh)?;
    v1_file(&old, &many_events(500))?;
    {
        let conn = Connection::open(&old)?;
        conn.execute_batch("PRAGMA ignore_check_constraints = ON")?;
        conn.execute_batch(TO_V2)?;
        conn.execute_batch(TO_V3)?;
        conn.execute_batch("PRAGMA ignore_check_constraints = OFF")?;
        conn.pragma_update(None, "application_id", 0)?;
        conn.pragma_update(None, "user_version", 0)?;
        // Events in every state, a live lease, and the newest purged so the
        // sequence runs ahead of the rows.
        conn.execute_batch(
            "UPDATE outbox_events SET status = 'done', completed_at = created_at WHERE seq % 5 = 1;
             UPDATE outbox_events SET status = 'failed', completed_at = created_at,
               last_error = 'gave up' WHERE seq % 5 = 2;
             UPDATE outbox_events SET status = 'processing', attempts = 1,
               locked_at = 1700000000000, locked_until = 4102444800000, lease_token = seq
             WHERE seq % 5 = 3;
             DELETE FROM outbox_events WHERE seq > 490;",
        )?;
    }
    assert_eq!(header(&old)?, (0, 0, Some(3)));
    let (before, seq_before) = (rows(&old)?, sequence(&old)?);
    assert_eq!((before.len(), seq_before), (490, 500));
    let store = SqliteStore::open(&old)?;
    assert_eq!(header(&old)?, (0, 0, Some(SCHEMA_VERSION)));
    assert_eq!(rows(&old)?, before, "every column of every row");
    assert_eq!(sequence(&old)?, seq_before);
    assert_eq!(schema_of(&fresh)?, schema_of(&old)?);
    let next = store.enqueue(NewEvent::new("t", json!("after")))?;
    assert_eq!(next.seq, 501, "numbers are never given out twice");
    let conn = Connection::open(&old)?;
    for status in ["pending", "processing", "done", "failed"] {
        let locked = if status == "processing" {
            "1700000000000"
        } else {
            "NULL"
        };
        conn.execute(
            &format!(
                "INSERT INTO outbox_events (event_type, payload, status, locked_at, locked_until)
                 VALUES ('t', '{{}}', ?1, {locked}, {locked})"
            ),
            [status],
        )?;
    }
    for bad in ["Pending", "gone", ""] {
        let err = conn
            .execute(
                "INSERT INTO outbox_events (event_type, payload, status) VALUES ('t', '{}', ?1)",
                [bad],
            )
            .expect_err("an unknown status is refused");
        assert!(err.to_string().contains("status_is_known"), "{err}");
    }
    Ok(())
}

/// An app object with the name of an object the next version adds stops
/// the migration: a clear error at once, and the file as it was.
#[test]
fn a_migration_blocked_by_an_app_object_fails_at_once_and_changes_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let old = dir.path().join("v2.db");
    SqliteStore::open(&old)?.enqueue(NewEvent::new("t", json!(1)))?;
    let conn = Connection::open(&old)?;
    conn.execute_batch(
        "DROP INDEX outbox_events_due_by_type;
         DROP TABLE outbox_destinations;
         DROP INDEX outbox_events_urgent; DROP TABLE outbox_limits;
         ALTER TABLE outbox_events DROP COLUMN priority;
         ALTER TABLE outbox_events DROP COLUMN traceparent;
         UPDATE outbox_meta SET value = 2 WHERE key = 'schema_version';
         CREATE TABLE outbox_destinations (app_owned INTEGER);",
    )?;
    drop(conn);
    let before = schema_of(&old)?;
    let started = std::time::Instant::now();
    let err = SqliteStore::open(&old).expect_err("the migration cannot create its table");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "not retried like a lock: {:?}",
        started.elapsed()
    );
    assert!(
        matches!(err.kind(), sqlite_outbox::ErrorKind::SchemaMismatch { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("version 3"), "{err}");
    assert_eq!(schema_of(&old)?, before, "nothing changed");
    assert_eq!(header(&old)?, (0, 0, Some(2)));
    Ok(())
}

#[test]
fn a_migrated_file_has_exactly_the_schema_of_a_fresh_one() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (fresh, old) = (dir.path().join("fresh.db"), dir.path().join("old.db"));
    SqliteStore::open(&fresh)?;
    v1_file(&old, &many_events(3))?;
    SqliteStore::open(&old)?;
    let fresh_schema = schema_of(&fresh)?;
    assert_eq!(fresh_schema, schema_of(&old)?);
    assert_eq!(fresh_schema.len(), 15, "{fresh_schema:?}");
    // And schema.sql is what `outbox schema` prints: the same objects.
    let conn = Connection::open_in_memory()?;
    conn.execute_batch(sqlite_outbox::SCHEMA_SQL)?;
    let count: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE name LIKE 'outbox%'",
        [],
        |r| r.get(0),
    )?;
    assert_eq!(usize::try_from(count)?, fresh_schema.len());
    Ok(())
}

#[test]
fn version_1_rows_are_repaired_where_safe_and_otherwise_kept_as_they_were() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("app.db");
    // What plain-SQL writers could put into a version-1 table: ids in upper
    // case, times in seconds, a key longer than version 2 allows.
    v1_file(
        &path,
        &format!(
            "INSERT INTO outbox_events (id, event_type, payload, org_id, next_attempt_at, created_at)
             VALUES ('0190F0E0-AAAA-7BBB-8CCC-DDDDEEEEFFFF', 'upper', '{{}}',
                     'ABCDEF00-0000-4000-8000-000000000000', 1700000000, 1700000000);
             INSERT INTO outbox_events (event_type, payload, ordering_key)
             VALUES ('long', '{{}}', replace(hex(zeroblob(150)), '0', 'k'));
             {}
             DELETE FROM outbox_events WHERE seq > 5;",
            many_events(8)
        ),
    )?;
    assert_eq!(sequence(&path)?, 10);
    let store = SqliteStore::open(&path)?;

    let upper: EventId = "0190F0E0-AAAA-7BBB-8CCC-DDDDEEEEFFFF".parse()?;
    let e = store.find(upper)?.ok_or("the upper-case id")?;
    assert_eq!(e.id.to_string(), "0190f0e0-aaaa-7bbb-8ccc-ddddeeeeffff");
    assert_eq!(
        e.org_id.map(|u| u.to_string()).as_deref(),
        Some("abcdef00-0000-4000-8000-000000000000")
    );
    assert_eq!(e.next_attempt_at.timestamp_millis(), 1_700_000_000_000);
    assert_eq!(e.created_at.timestamp_millis(), 1_700_000_000_000);

    // The long key is kept, and its event is delivered like any other: a
    // claim changes no column the new check reads.
    let claimed = store.claim(10, secs(30), None)?;
    assert_eq!(claimed.len(), 5);
    let long = claimed
        .iter()
        .find(|e| e.event_type == "long")
        .ok_or("long")?;
    assert_eq!(long.ordering_key.as_ref().map(String::len), Some(300));
    for event in &claimed {
        store.complete(&event.lease().ok_or("lease")?)?;
    }
    // A new row of that shape is refused at the door.
    let conn = Connection::open(&path)?;
    let err = conn
        .execute(
            "INSERT INTO outbox_events (event_type, payload, ordering_key)
             VALUES ('long', '{}', replace(hex(zeroblob(150)), '0', 'k'))",
            [],
        )
        .expect_err("a 300-byte key");
    assert!(
        err.to_string()
            .contains("ordering_key_is_at_most_255_bytes"),
        "{err}"
    );
    // Numbers purged from the top are not given out again.
    assert_eq!(store.enqueue(NewEvent::new("t", json!(1)))?.seq, 11);
    Ok(())
}

#[test]
fn a_version_1_build_cannot_stamp_a_version_2_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("app.db");
    SqliteStore::open(&path)?.enqueue(NewEvent::new("t", json!(1)))?;
    let before = rows(&path)?;
    // What a version-1 build does with a file whose header fields are 0:
    // run its DDL, then stamp the header, in one transaction.
    let mut conn = Connection::open(&path)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let err = tx.execute_batch(V1_DDL).expect_err("the old DDL must fail");
    assert!(
        err.to_string()
            .contains("there is already a table named outbox_events_failed"),
        "{err}"
    );
    drop(tx);
    assert_eq!(header(&path)?, (0, 0, Some(SCHEMA_VERSION)));
    assert_eq!(rows(&path)?, before);
    Ok(())
}

#[test]
fn openers_racing_on_a_version_1_file_migrate_it_once() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("app.db");
    v1_file(&path, &many_events(2000))?;
    let before = rows(&path)?;
    let barrier = Arc::new(Barrier::new(6));
    let openers: Vec<_> = (0..6)
        .map(|_| {
            let (path, barrier) = (path.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                SqliteStore::open(&path).map(|_| ())
            })
        })
        .collect();
    for opener in openers {
        opener.join().map_err(|_| "opener panicked")??;
    }
    assert_eq!(rows(&path)?, before);
    assert_eq!(header(&path)?, (0, 0, Some(SCHEMA_VERSION)));
    Ok(())
}

#[test]
fn a_read_only_open_reads_a_version_1_file_without_changing_it() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("app.db");
    std::fs::copy(FIXTURE, &path)?;
    let bytes = std::fs::read(&path)?;
    let store = SqliteStore::builder(&path).read_only(true).build()?;
    assert_eq!(store.stats()?.total(), 54);
    drop(store);
    assert!(std::fs::read(&path)? == bytes, "the file changed");
    assert_eq!(header(&path)?, (V1_APPLICATION_ID, 1, None));
    Ok(())
}

/// The migration, interrupted in other processes by `kill -9` and by power
/// cuts (unsynced writes reverted): every interrupted file is either the
/// version-1 file as it was or the complete version-2 one, and opens and
/// upgrades on the next try.
#[cfg(feature = "torture")]
mod interrupted {
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use super::*;
    use common::shim;

    const DRIVER: &str = env!("CARGO_BIN_EXE_outbox-torture");

    fn open_in_child(db: &Path) -> Command {
        let mut c = Command::new(DRIVER);
        c.args(["open", "--db"]).arg(db).stdin(Stdio::null());
        c
    }

    struct Rng(u64);
    impl Rng {
        fn seeded() -> Rng {
            let seed = chrono::Utc::now().timestamp_subsec_nanos() as u64 | 1;
            println!("seed {seed}");
            Rng(seed)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n.max(1)
        }
    }

    /// Checks an interrupted file: intact, and wholly one version. Returns
    /// whether it is still at version 1.
    fn still_version_1(
        path: &Path,
        expected: &[Vec<Value>],
    ) -> Result<bool, Box<dyn std::error::Error>> {
        let check: String =
            Connection::open(path)?.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        assert_eq!(check, "ok");
        let state = header(path)?;
        assert!(
            state == (V1_APPLICATION_ID, 1, None) || state == (0, 0, Some(SCHEMA_VERSION)),
            "a half-migrated header: {state:?}"
        );
        assert!(rows(path)? == expected, "rows changed ({state:?})");
        Ok(state.2.is_none())
    }

    fn fresh_copy(original: &Path, dir: &Path) -> std::io::Result<PathBuf> {
        let work = dir.join("work");
        if work.exists() {
            std::fs::remove_dir_all(&work)?;
        }
        std::fs::create_dir(&work)?;
        let path = work.join("app.db");
        std::fs::copy(original, &path)?;
        Ok(path)
    }

    fn big_version_1_file(dir: &Path) -> Result<(PathBuf, Rows), Box<dyn std::error::Error>> {
        let original = dir.join("v1.db");
        v1_file(&original, &many_events(15_000))?;
        Connection::open(&original)?.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
        let expected = rows(&original)?;
        Ok((original, expected))
    }

    #[test]
    fn kill_9_during_the_migration_leaves_version_1_intact() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (original, expected) = big_version_1_file(dir.path())?;
        // How long a whole migration takes in a child, start-up included.
        let path = fresh_copy(&original, dir.path())?;
        let started = Instant::now();
        assert!(open_in_child(&path).status()?.success());
        let whole = started.elapsed();
        assert!(!still_version_1(&path, &expected)?);
        println!(
            "a migration of {} rows in a child: {whole:?}",
            expected.len()
        );

        let mut rng = Rng::seeded();
        let mut interrupted = 0;
        for round in 0..10 {
            let path = fresh_copy(&original, dir.path())?;
            let mut child = open_in_child(&path).stdout(Stdio::null()).spawn()?;
            let wait = rng.below(whole.as_millis() as u64);
            std::thread::sleep(Duration::from_millis(wait));
            child.kill()?;
            child.wait()?;
            if still_version_1(&path, &expected)? {
                interrupted += 1;
            }
            // The next open finishes the job.
            SqliteStore::open(&path)?;
            assert!(!still_version_1(&path, &expected)?, "round {round}");
        }
        println!("{interrupted} of 10 kills landed before the commit");
        assert!(interrupted > 0, "no kill landed inside the migration");
        Ok(())
    }

    #[test]
    fn a_power_cut_during_the_migration_leaves_version_1_intact() -> TestResult {
        let dir = tempfile::tempdir()?;
        let Some(shim) = shim("crashshim", dir.path()) else {
            return Ok(());
        };
        let (original, expected) = big_version_1_file(dir.path())?;
        let mut rng = Rng::seeded();
        let mut cut = 0;
        for cycle in 0..12u64 {
            let path = fresh_copy(&original, dir.path())?;
            let work = path.parent().ok_or("work dir")?;
            let trigger = if cycle % 2 == 0 {
                ("CRASH_AT_SYNC", 1 + rng.below(3))
            } else {
                ("CRASH_AT_WRITE", 1 + rng.below(3000))
            };
            let out = open_in_child(&path)
                .env("LD_PRELOAD", &shim)
                .env("CRASH_DIR", format!("{}/", work.display()))
                .env(trigger.0, trigger.1.to_string())
                .env(
                    "CRASH_KEEP_PCT",
                    [0, 30, 70][(cycle % 3) as usize].to_string(),
                )
                .env("CRASH_SEED", cycle.to_string())
                .output()?;
            match out.status.code() {
                Some(99) => cut += 1,
                Some(0) => {}
                other => panic!(
                    "cycle {cycle} ({trigger:?}): {other:?} {}",
                    String::from_utf8_lossy(&out.stderr)
                ),
            }
            let old = still_version_1(&path, &expected)?;
            println!(
                "cycle {cycle} {trigger:?}: exit {:?}, version 1 kept: {old}",
                out.status.code()
            );
            SqliteStore::open(&path)?;
            assert!(!still_version_1(&path, &expected)?, "cycle {cycle}");
        }
        assert!(cut >= 6, "the power cut bit in only {cut} of 12 cycles");
        Ok(())
    }
}

/// Only an older file is read without the columns added since: a file that
/// says it is the current version and lacks one was altered by hand, and
/// is refused by name, read-only as well.
#[test]
fn a_current_file_without_a_current_column_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("app.db");
    SqliteStore::open(&path)?.enqueue(NewEvent::new("t", json!(1)))?;
    Connection::open(&path)?.execute_batch(
        "DROP INDEX outbox_events_urgent; DROP TABLE outbox_limits; ALTER TABLE outbox_events DROP COLUMN priority",
    )?;
    for read_only in [true, false] {
        let err = SqliteStore::builder(&path)
            .read_only(read_only)
            .build()
            .err()
            .ok_or("opened")?;
        assert!(
            matches!(err.kind(), sqlite_outbox::ErrorKind::SchemaMismatch { .. })
                && err.to_string().contains("priority"),
            "{err}"
        );
    }
    Ok(())
}

/// A version-5 file (before priorities) with rows a plain-SQL writer put
/// there: read as it is read-only (every event of priority 0), then
/// migrated with its rows kept, and its events claimed after a new urgent
/// one.
#[test]
fn a_version_5_file_gains_priorities() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (fresh, old) = (dir.path().join("fresh.db"), dir.path().join("v5.db"));
    SqliteStore::open(&fresh)?;
    SqliteStore::open(&old)?;
    let conn = Connection::open(&old)?;
    conn.execute_batch(
        "DROP INDEX outbox_events_urgent; DROP TABLE outbox_limits;
         ALTER TABLE outbox_events DROP COLUMN priority;
         UPDATE outbox_meta SET value = 5 WHERE key = 'schema_version';
         INSERT INTO outbox_events (event_type, payload) VALUES ('plain', '{\"n\": 1}');
         INSERT INTO outbox_events (event_type, payload) VALUES ('plain', '{\"n\": 2}');",
    )?;
    drop(conn);
    let reader = SqliteStore::builder(&old).read_only(true).build()?;
    let listed = reader.list(&sqlite_outbox::ListFilter::default())?;
    assert_eq!(
        listed.iter().map(|e| e.priority).collect::<Vec<_>>(),
        [0, 0]
    );
    drop(reader);
    assert_eq!(header(&old)?, (0, 0, Some(5)));
    let store = SqliteStore::open(&old)?;
    assert_eq!(header(&old)?, (0, 0, Some(SCHEMA_VERSION)));
    assert_eq!(schema_of(&fresh)?, schema_of(&old)?);
    let urgent = store.enqueue(NewEvent::new("urgent", json!({})).with_priority(3))?;
    let claimed = store.claim(3, std::time::Duration::from_secs(30), None)?;
    let order: Vec<(&str, u8)> = claimed
        .iter()
        .map(|e| (e.event_type.as_str(), e.priority))
        .collect();
    assert_eq!(order, [("urgent", 3), ("plain", 0), ("plain", 0)]);
    assert_eq!(claimed[0].id, urgent.id);
    Ok(())
}
