//! The schema and the file it lives in: recognising an outbox, refusing
//! foreign or newer ones, creating the schema once and migrating older
//! layouts forward, even when several processes open a file at once.
//!
//! The file belongs to the app. The outbox is recognised by its own table,
//! `outbox_meta`, and never reads or writes the app's header fields
//! (`user_version`, `application_id`), except to give back the values that
//! schema version 1 stamped there.

use std::time::{Duration, Instant};

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};

use crate::error::{Error, ErrorKind, Result};

/// The DDL of a fresh outbox: `schema.sql` at the top of the repository.
pub const SCHEMA_SQL: &str = include_str!("../../schema.sql");

/// The schema version this crate writes and understands, kept in the
/// `outbox_meta` table (`key = 'schema_version'`).
pub const SCHEMA_VERSION: i64 = 6;

/// The forward-only steps, as `(version reached, SQL)`: each brings a file
/// from the version before to this one, in one write transaction.
const MIGRATIONS: &[(i64, &str)] = &[
    (2, include_str!("../../migrations/002_guest.sql")),
    (3, include_str!("../../migrations/003_destinations.sql")),
    (4, include_str!("../../migrations/004_faster_checks.sql")),
    (5, include_str!("../../migrations/005_traceparent.sql")),
    (
        6,
        include_str!("../../migrations/006_priorities_and_limits.sql"),
    ),
];

/// What schema version 1 wrote into `PRAGMA application_id` ("OUTB").
const V1_APPLICATION_ID: i64 = 0x4F55_5442;

/// Every column of `outbox_events`, in the order `row_to_event` reads them.
pub(crate) const COLUMNS: &str = "seq, id, event_type, payload, status, attempts, max_attempts, \
    next_attempt_at, locked_at, locked_until, lease_token, completed_at, delivered_at, \
    last_error, correlation_id, org_id, user_id, ordering_key, idempotency_key, created_at, \
    traceparent, priority";

/// As [`COLUMNS`], for a file read as it is (read-only) from before
/// version 6, which has no `priority`: it reads as 0.
pub(crate) const COLUMNS_BEFORE_6: &str = "seq, id, event_type, payload, status, attempts, \
    max_attempts, next_attempt_at, locked_at, locked_until, lease_token, completed_at, \
    delivered_at, last_error, correlation_id, org_id, user_id, ordering_key, idempotency_key, \
    created_at, traceparent, 0 AS priority";

/// As [`COLUMNS`], for a file read as it is (read-only) from before
/// version 5, which has no `traceparent` either: it reads as NULL.
pub(crate) const COLUMNS_BEFORE_5: &str = "seq, id, event_type, payload, status, attempts, \
    max_attempts, next_attempt_at, locked_at, locked_until, lease_token, completed_at, \
    delivered_at, last_error, correlation_id, org_id, user_id, ordering_key, idempotency_key, \
    created_at, NULL AS traceparent, 0 AS priority";

/// What one snapshot of the file says about the outbox in it.
#[derive(Debug)]
struct FileInfo {
    application_id: i64,
    user_version: i64,
    /// Any schema object named `outbox_events`.
    has_events: bool,
    /// Any schema object named `outbox_meta`.
    has_meta: bool,
    /// `schema_version` from `outbox_meta`, when that table is ours.
    meta_version: Option<i64>,
}

/// Reads the file's state. Run it inside a transaction, so that all of it
/// comes from one snapshot: a process creating or migrating the outbox at
/// the same moment is seen wholly before or wholly after.
fn inspect(conn: &Connection) -> Result<FileInfo> {
    let mut info = conn.query_row(
        "SELECT (SELECT application_id FROM pragma_application_id()),
                (SELECT user_version FROM pragma_user_version()),
                EXISTS (SELECT 1 FROM sqlite_schema WHERE name = 'outbox_events'),
                EXISTS (SELECT 1 FROM sqlite_schema WHERE name = 'outbox_meta')",
        [],
        |r| {
            Ok(FileInfo {
                application_id: r.get(0)?,
                user_version: r.get(1)?,
                has_events: r.get(2)?,
                has_meta: r.get(3)?,
                meta_version: None,
            })
        },
    )?;
    if info.has_meta {
        info.meta_version = Some(read_meta_version(conn)?);
    }
    Ok(info)
}

fn read_meta_version(conn: &Connection) -> Result<i64> {
    let foreign = || {
        Error::not_an_outbox(
            "the file has an object named outbox_meta that is not sqlite-outbox's \
             (no schema_version in it); refusing to use or change it",
        )
    };
    let value: Option<Value> = conn
        .query_row(
            "SELECT value FROM outbox_meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| match e.sqlite_error_code() {
            // No such column or table shape: someone else's object.
            None | Some(rusqlite::ErrorCode::Unknown) => foreign(),
            Some(_) => Error::from(e),
        })?;
    match value {
        Some(Value::Integer(v)) => Ok(v),
        _ => Err(foreign()),
    }
}

/// What the file needs before it can be used.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Needs {
    /// The outbox is at [`SCHEMA_VERSION`].
    Nothing,
    /// No outbox yet: create it.
    Create,
    /// An outbox at this older version: migrate it.
    Migrate(i64),
}

fn classify(info: &FileInfo) -> Result<Needs> {
    if let Some(version) = info.meta_version {
        return match version {
            v if v > SCHEMA_VERSION => Err(Error::new(ErrorKind::SchemaTooNew {
                found: v,
                supported: SCHEMA_VERSION,
            })),
            SCHEMA_VERSION => Ok(Needs::Nothing),
            // Versions before 2 lived in the header, never in outbox_meta.
            v if v >= 2 => Ok(Needs::Migrate(v)),
            v => Err(Error::new(ErrorKind::SchemaMismatch {
                reason: format!("outbox_meta names schema version {v}, which no release wrote"),
            })),
        };
    }
    // Version 1 kept its version in the header, marked by its application_id.
    if info.application_id == V1_APPLICATION_ID {
        return match info.user_version {
            v if v > 1 => Err(Error::new(ErrorKind::SchemaTooNew {
                found: v,
                supported: SCHEMA_VERSION,
            })),
            _ if info.has_events => Ok(Needs::Migrate(1)),
            _ => Ok(Needs::Create),
        };
    }
    if info.has_events {
        return Err(Error::not_an_outbox(
            "the file has an object named outbox_events that sqlite-outbox did not create \
             (no outbox_meta table); refusing to use or change it",
        ));
    }
    Ok(Needs::Create)
}

/// Reads the file's state from one snapshot.
fn inspect_snapshot(conn: &Connection) -> Result<FileInfo> {
    let tx = Transaction::new_unchecked(conn, TransactionBehavior::Deferred)?;
    let info = inspect(&tx)?;
    tx.finish()?;
    Ok(info)
}

/// Validates the file and creates or migrates the schema when needed. Safe
/// to run from many processes at once: the write retries while others hold
/// the lock, and checks again once it has it. Returns the column list to
/// read events with.
pub(crate) fn prepare_file(
    conn: &Connection,
    read_only: bool,
    create: bool,
    busy_timeout: Duration,
) -> Result<&'static str> {
    let needs = classify(&inspect_snapshot(conn)?)?;
    if !create && !read_only && needs == Needs::Create {
        return Err(Error::not_an_outbox(
            "the file has no outbox (a mistyped path?); `outbox init` creates one",
        ));
    }
    if read_only {
        // An older table is read as it is: a column added since reads
        // as NULL.
        if needs == Needs::Create {
            return Err(Error::not_an_outbox(
                "the file has no outbox (open it read-write once to create one)",
            ));
        }
        return check_columns(conn, needs != Needs::Nothing);
    }
    if needs == Needs::Nothing {
        // Refuse a malformed table before changing anything.
        check_columns(conn, false)?;
    }
    let deadline = Instant::now() + busy_timeout.max(Duration::from_secs(5)) * 2;
    let mut pause = Duration::from_millis(2);
    loop {
        let attempt = if needs == Needs::Nothing {
            ensure_wal(conn)
        } else {
            create_or_migrate(conn)
        };
        match attempt {
            Err(e) if e.is_busy() && Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            other => break other?,
        }
    }
    check_columns(conn, false)
}

/// Turns WAL on (a file restored from a `VACUUM INTO` copy has a rollback
/// journal). WAL is persistent, so this writes only once per file.
fn ensure_wal(conn: &Connection) -> Result<()> {
    let mode: String = conn.pragma_query_value(None, "journal_mode", |r| r.get(0))?;
    if mode.eq_ignore_ascii_case("wal") {
        return Ok(());
    }
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::with_source(
            ErrorKind::Io,
            format!("journal_mode stayed {mode}; WAL needs a writable directory"),
        ));
    }
    Ok(())
}

/// Creates the outbox, or brings an older one to [`SCHEMA_VERSION`], in one
/// `BEGIN IMMEDIATE` transaction: a crash or a power cut in the middle
/// leaves the file as it was.
fn create_or_migrate(conn: &Connection) -> Result<()> {
    // WAL must be set outside a transaction.
    ensure_wal(conn)?;
    let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    // Another process may have done it while we waited for the lock.
    let info = inspect(&tx)?;
    match classify(&info)? {
        Needs::Nothing => {}
        Needs::Create => tx.execute_batch(SCHEMA_SQL)?,
        Needs::Migrate(from) => {
            migrate(&tx, from)?;
            if from == 1 {
                give_back_header(&tx, &info)?;
            }
        }
    }
    tx.commit()?;
    Ok(())
}

fn migrate(tx: &Transaction<'_>, from: i64) -> Result<()> {
    for &(version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > from) {
        tracing::info!(from, to = version, "migrating the outbox schema");
        // Rows an older version accepted are carried over as they are, even
        // where the new checks would refuse them on insert (see the SQL).
        tx.execute_batch("PRAGMA ignore_check_constraints = ON")?;
        let step = tx.execute_batch(sql);
        tx.execute_batch("PRAGMA ignore_check_constraints = OFF")?;
        step.map_err(|e| {
            Error::with_source(
                ErrorKind::SchemaMismatch {
                    reason: format!("migrating the outbox schema to version {version} failed"),
                },
                e,
            )
        })?;
    }
    Ok(())
}

/// Schema version 1 stamped the file header; hand both fields back to the
/// app (0, SQLite's "unset"), in the transaction that moves the version into
/// `outbox_meta`. Only then: a file with that application id and no
/// version-1 table is the app's, header and all.
fn give_back_header(tx: &Transaction<'_>, info: &FileInfo) -> Result<()> {
    if info.application_id == V1_APPLICATION_ID {
        tx.pragma_update(None, "application_id", 0)?;
        if info.user_version == 1 {
            tx.pragma_update(None, "user_version", 0)?;
        }
    }
    Ok(())
}

/// Checks that `outbox_events` has every column; in a file of an older
/// version read as it is, `priority` (version 6) and `traceparent`
/// (version 5) may be missing.
fn check_columns(conn: &Connection, older: bool) -> Result<&'static str> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('outbox_events')")?;
    let present: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let missing: Vec<&str> = COLUMNS
        .split(',')
        .map(str::trim)
        .filter(|c| !present.iter().any(|p| p == c))
        .collect();
    if missing.is_empty() {
        Ok(COLUMNS)
    } else if older && missing == ["priority"] {
        Ok(COLUMNS_BEFORE_6)
    } else if older && missing == ["traceparent", "priority"] {
        Ok(COLUMNS_BEFORE_5)
    } else {
        Err(Error::new(ErrorKind::SchemaMismatch {
            reason: format!("outbox_events lacks column(s) {}", missing.join(", ")),
        }))
    }
}
