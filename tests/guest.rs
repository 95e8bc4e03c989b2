//! The outbox as a guest in the app's database: the app's migration tools
//! (`rusqlite_migration` in `user_version`, refinery in a table of its own)
//! run on the same file in either order and exactly as they would without
//! the outbox, and `enqueue` refuses the connections and transactions that
//! would write elsewhere or fail under load.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{secs, TestResult};
use rusqlite::{Connection, TransactionBehavior};
use rusqlite_migration::{Migrations, M};
use serde_json::json;
use sqlite_outbox::{Dispatcher, Event, NewEvent, Operator, SqliteStore};

/// The app's migrations, as `rusqlite_migration` runs them (`user_version`).
fn app_migrations(count: usize) -> Migrations<'static> {
    let all = vec![
        M::up("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL);"),
        M::up("ALTER TABLE notes ADD COLUMN tag TEXT;"),
        M::up("CREATE INDEX notes_tag ON notes (tag);"),
    ];
    Migrations::new(all.into_iter().take(count).collect())
}

/// `user_version` and the app's own objects (name, SQL).
type AppView = (i64, Vec<(String, String)>);

/// What the app sees of its file: its own objects and `user_version`.
fn app_view(path: &Path) -> rusqlite::Result<AppView> {
    let conn = Connection::open(path)?;
    let version = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let mut stmt = conn.prepare(
        "SELECT name, sql FROM sqlite_schema
         WHERE name NOT LIKE 'outbox%' AND name NOT LIKE 'sqlite%' ORDER BY name",
    )?;
    let objects = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    Ok((version, objects))
}

/// The same migrations on a file without the outbox.
fn app_alone(dir: &Path, count: usize) -> Result<AppView, Box<dyn std::error::Error>> {
    let path = dir.join("alone.db");
    let mut conn = Connection::open(&path)?;
    app_migrations(count).to_latest(&mut conn)?;
    drop(conn);
    Ok(app_view(&path)?)
}

/// A note and its event, committed together.
fn add_note(store: &SqliteStore, body: &str) -> sqlite_outbox::Result<()> {
    store.transaction(|tx| {
        tx.execute("INSERT INTO notes (body) VALUES (?1)", [body])?;
        store.enqueue_tx(tx, NewEvent::new("note.created", json!({"body": body})))?;
        Ok(())
    })
}

#[test]
fn rusqlite_migration_then_the_outbox() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("app.db");
    let mut conn = Connection::open(&path)?;
    app_migrations(2).to_latest(&mut conn)?;
    let store = SqliteStore::open(&path)?;
    add_note(&store, "first")?;
    // The app's next release adds a migration; the outbox is in the file.
    app_migrations(3).to_latest(&mut conn)?;
    assert_eq!(app_view(&path)?, app_alone(dir.path(), 3)?);
    add_note(&store, "second")?;
    assert_eq!(store.stats()?.pending, 2);
    Ok(())
}

#[test]
fn the_outbox_then_rusqlite_migration() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("app.db");
    let store = SqliteStore::open(&path)?;
    let mut conn = Connection::open(&path)?;
    // Every app migration runs: none is skipped for a user_version the
    // outbox set.
    app_migrations(2).to_latest(&mut conn)?;
    assert_eq!(app_view(&path)?, app_alone(dir.path(), 2)?);
    add_note(&store, "first")?;
    drop(store);
    // Reopening the outbox leaves the app's version alone.
    let store = SqliteStore::open(&path)?;
    app_migrations(3).to_latest(&mut conn)?;
    assert_eq!(app_view(&path)?, app_alone(dir.path(), 3)?);
    add_note(&store, "second")?;
    Ok(())
}

#[test]
fn an_upgraded_version_1_file_hands_user_version_to_the_app() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("app.db");
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/v1-from-0.1-dev.db"
        ),
        &path,
    )?;
    let store = SqliteStore::open(&path)?;
    // Version 1 had stamped user_version = 1; the app's migration 1 would
    // have been skipped. Now all three run.
    let mut conn = Connection::open(&path)?;
    app_migrations(3).to_latest(&mut conn)?;
    assert_eq!(app_view(&path)?.0, 3);
    add_note(&store, "after the upgrade")?;
    assert_eq!(store.stats()?.total(), 55);
    Ok(())
}

fn refinery_migrations(count: usize) -> Result<Vec<refinery::Migration>, refinery::Error> {
    [
        (
            "V1__notes",
            "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL);",
        ),
        ("V2__tags", "ALTER TABLE notes ADD COLUMN tag TEXT;"),
    ]
    .into_iter()
    .take(count)
    .map(|(name, sql)| refinery::Migration::unapplied(name, sql))
    .collect()
}

#[test]
fn refinery_in_either_order() -> TestResult {
    let dir = tempfile::tempdir()?;
    for outbox_first in [true, false] {
        let path = dir.path().join(format!("refinery-{outbox_first}.db"));
        let mut conn = Connection::open(&path)?;
        let store = if outbox_first {
            let store = SqliteStore::open(&path)?;
            refinery::Runner::new(&refinery_migrations(1)?).run(&mut conn)?;
            store
        } else {
            refinery::Runner::new(&refinery_migrations(1)?).run(&mut conn)?;
            SqliteStore::open(&path)?
        };
        add_note(&store, "one")?;
        let report = refinery::Runner::new(&refinery_migrations(2)?).run(&mut conn)?;
        assert_eq!(
            report.applied_migrations().len(),
            1,
            "outbox first: {outbox_first}"
        );
        let applied: i64 =
            conn.query_row("SELECT count(*) FROM refinery_schema_history", [], |r| {
                r.get(0)
            })?;
        assert_eq!(applied, 2);
        conn.execute("UPDATE notes SET tag = 'x'", [])?;
        assert_eq!(store.stats()?.pending, 1);
    }
    Ok(())
}

#[test]
fn enqueue_refuses_a_deferred_transaction_that_has_read() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("app.db"))?;
    let mut conn = Connection::open(store.path())?;
    conn.execute_batch("CREATE TABLE notes (body TEXT)")?;

    // rusqlite's default transaction, reading before it writes.
    let tx = conn.transaction()?;
    let _: i64 = tx.query_row("SELECT count(*) FROM notes", [], |r| r.get(0))?;
    let err = store
        .enqueue_tx(&tx, NewEvent::new("t", json!(1)))
        .expect_err("a deferred transaction that has read");
    assert!(err.is_invalid_input());
    assert!(err.to_string().contains("Immediate"), "{err}");
    drop(tx);

    // A deferred transaction whose first statement writes is a writer.
    let tx = conn.transaction()?;
    tx.execute("INSERT INTO notes VALUES ('x')", [])?;
    store.enqueue_tx(&tx, NewEvent::new("t", json!(2)))?;
    tx.commit()?;
    // So is an immediate one, and a plain connection (its own transaction).
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let _: i64 = tx.query_row("SELECT count(*) FROM notes", [], |r| r.get(0))?;
    store.enqueue_tx(&tx, NewEvent::new("t", json!(3)))?;
    tx.commit()?;
    store.enqueue_tx(&conn, NewEvent::new("t", json!(4)))?;
    assert_eq!(store.stats()?.pending, 3);
    Ok(())
}

#[test]
fn enqueue_refuses_a_connection_to_another_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("app.db"))?;
    for other in [
        Connection::open(dir.path().join("other.db"))?,
        Connection::open_in_memory()?,
    ] {
        let err = store
            .enqueue_tx(&other, NewEvent::new("t", json!(1)))
            .expect_err("another file");
        assert!(
            err.to_string().contains("not to the outbox's file"),
            "{err}"
        );
        let err = store
            .enqueue_batch_tx(&other, vec![NewEvent::new("t", json!(1))])
            .expect_err("another file");
        assert!(err.is_invalid_input());
    }
    // The same file through a symbolic link is the same file (SQLite
    // resolves it, and the WAL is the same).
    let link = dir.path().join("link.db");
    std::os::unix::fs::symlink(dir.path().join("app.db"), &link)?;
    store.enqueue_tx(&Connection::open(&link)?, NewEvent::new("t", json!(2)))?;
    assert_eq!(store.stats()?.total(), 1);
    // A hard link is not: SQLite would keep a second WAL beside it.
    let hard = dir.path().join("hard.db");
    std::fs::hard_link(dir.path().join("app.db"), &hard)?;
    let err = store
        .enqueue_tx(&Connection::open(&hard)?, NewEvent::new("t", json!(3)))
        .expect_err("a hard link");
    assert!(err.to_string().contains("hard.db"), "{err}");
    Ok(())
}

/// The app's own DEFERRED transactions that write first, while a dispatcher
/// claims and acknowledges on the same file: none may fail.
#[test]
fn deferred_writers_beside_a_dispatcher_never_see_a_locked_database() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("app.db"))?;
    let mut conn = Connection::open(store.path())?;
    conn.busy_timeout(secs(5))?;
    conn.execute_batch("CREATE TABLE notes (body TEXT)")?;
    let dispatcher = Dispatcher::builder(store.clone())
        .workers(4)
        .handle("note.created", |_: &Event| Ok(()))
        .start()?;
    let (mut failures, mut written) = (Vec::new(), 0);
    // Write until the dispatcher has delivered some of it meanwhile.
    for i in 0..20_000 {
        if i >= 300 && store.stats()?.done >= 100 {
            break;
        }
        written += 1;
        let result = (|| -> sqlite_outbox::Result<()> {
            let tx = conn.transaction()?;
            tx.execute("INSERT INTO notes VALUES (?1)", [i])?;
            store.enqueue_tx(&tx, NewEvent::new("note.created", json!({"i": i})))?;
            tx.commit()?;
            Ok(())
        })();
        if let Err(e) = result {
            failures.push(e.to_string());
        }
    }
    let done_meanwhile = store.stats()?.done;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while store.stats()?.done < written && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let report = dispatcher.shutdown(Duration::from_secs(10));
    println!("{done_meanwhile} of {written} delivered while the app was writing");
    assert!(
        failures.is_empty(),
        "{} of {written} failed: {:?}",
        failures.len(),
        failures.first()
    );
    assert!(
        done_meanwhile >= 100,
        "the dispatcher never ran beside the app"
    );
    assert_eq!(report.metrics.done, written);
    Ok(())
}
