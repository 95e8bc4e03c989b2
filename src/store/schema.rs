//! The schema and the file it lives in: recognising an outbox file,
//! refusing foreign or newer ones, and creating the schema once even when
//! several processes open a fresh file at the same moment.

use std::time::{Duration, Instant};

use rusqlite::{Connection, Transaction, TransactionBehavior};

use crate::error::{Error, ErrorKind, Result};

/// The only DDL of the crate: `schema.sql` at the top of the repository.
pub const SCHEMA_SQL: &str = include_str!("../../schema.sql");

/// The schema version this crate writes and understands
/// (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 1;

/// The mark of an outbox file (`PRAGMA application_id`): "OUTB".
pub const APPLICATION_ID: i64 = 0x4F55_5442;

/// Every column of `outbox_events`, in the order `row_to_event` reads them.
pub(crate) const COLUMNS: &str = "seq, id, event_type, payload, status, attempts, max_attempts, \
    next_attempt_at, locked_at, locked_until, lease_token, completed_at, delivered_at, \
    last_error, correlation_id, org_id, user_id, ordering_key, idempotency_key, created_at";

struct FileInfo {
    application_id: i64,
    user_version: i64,
    has_table: bool,
}

fn inspect(conn: &Connection) -> Result<FileInfo> {
    // One statement reads one snapshot: a process initialising the file at
    // the same moment is seen wholly before or wholly after.
    let info = conn.query_row(
        "SELECT (SELECT application_id FROM pragma_application_id()),
                (SELECT user_version FROM pragma_user_version()),
                EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'outbox_events')",
        [],
        |r| {
            Ok(FileInfo {
                application_id: r.get(0)?,
                user_version: r.get(1)?,
                has_table: r.get(2)?,
            })
        },
    )?;
    Ok(info)
}

/// What the file needs before it can be used.
#[derive(Debug, PartialEq)]
enum Needs {
    Nothing,
    Init,
}

fn classify(info: &FileInfo) -> Result<Needs> {
    match info.application_id {
        APPLICATION_ID => match info.user_version {
            v if v > SCHEMA_VERSION => Err(Error::new(ErrorKind::SchemaTooNew {
                found: v,
                supported: SCHEMA_VERSION,
            })),
            SCHEMA_VERSION => Ok(Needs::Nothing),
            // Marked but not versioned: an initialisation that never
            // committed its version. The DDL is idempotent.
            _ => Ok(Needs::Init),
        },
        0 if info.user_version != 0 => Err(Error::not_an_outbox(format!(
            "user_version is {} but application_id is not sqlite-outbox's: \
             the file's versioning belongs to another application",
            info.user_version
        ))),
        0 => Ok(Needs::Init),
        other => Err(Error::not_an_outbox(format!(
            "application_id is {other:#x}, not sqlite-outbox's {APPLICATION_ID:#x}"
        ))),
    }
}

/// Validates the file and creates the schema when needed. Safe to run from
/// many processes at once: the creation retries while others hold the lock.
pub(crate) fn prepare_file(
    conn: &Connection,
    read_only: bool,
    busy_timeout: Duration,
) -> Result<()> {
    let info = inspect(conn)?;
    let needs = classify(&info)?;
    if read_only {
        if needs == Needs::Init {
            return Err(Error::not_an_outbox(if info.has_table {
                "the outbox schema is not initialised (open it read-write once)"
            } else {
                "the file has no outbox"
            }));
        }
        return check_columns(conn);
    }
    if needs == Needs::Nothing {
        // Refuse a malformed table before changing anything.
        check_columns(conn)?;
    }
    let deadline = Instant::now() + busy_timeout.max(Duration::from_secs(5)) * 2;
    let mut pause = Duration::from_millis(2);
    loop {
        let attempt = if needs == Needs::Init {
            init_schema(conn)
        } else {
            ensure_wal(conn)
        };
        match attempt {
            Err(e) if e.is_busy() && Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            other => break other?,
        }
    }
    check_columns(conn)
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

fn init_schema(conn: &Connection) -> Result<()> {
    // WAL must be set outside a transaction.
    ensure_wal(conn)?;
    let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    // Another process may have initialised it while we waited.
    if classify(&inspect(&tx)?)? == Needs::Init {
        tx.execute_batch(SCHEMA_SQL)?;
        tx.pragma_update(None, "application_id", APPLICATION_ID)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    tx.commit()?;
    Ok(())
}

fn check_columns(conn: &Connection) -> Result<()> {
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
        Ok(())
    } else {
        Err(Error::new(ErrorKind::SchemaMismatch {
            reason: format!("outbox_events lacks column(s) {}", missing.join(", ")),
        }))
    }
}
