//! The crate's one error type.

use std::fmt;

use crate::id::{EventId, ParseEventIdError};

/// A specialised `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error from the outbox.
///
/// Match on [`Error::kind`] to act on it, or use the `is_*` predicates for the
/// common cases. The underlying SQLite or I/O error, when there is one, is
/// available through [`std::error::Error::source`].
///
/// # Errors from a commit
///
/// When a write fails at its commit (an I/O error while syncing, say), SQLite
/// cannot always tell whether the transaction reached the disk: the outcome
/// is **unknown**, and the event may be present after a restart. To retry an
/// enqueue safely, give the event an idempotency key.
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    source: Option<BoxError>,
}

/// What went wrong, in terms a caller can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The database stayed locked by another connection or process for
    /// longer than the busy timeout. Retrying later is safe.
    Busy,
    /// The lease named by an acknowledgement is no longer held: it expired
    /// and the event was claimed again, or the event is gone. Nothing was
    /// changed.
    LeaseLost {
        /// The event the acknowledgement was about.
        id: EventId,
        /// The attempt whose lease was lost.
        attempt: u32,
    },
    /// No event has this id.
    NotFound {
        /// The id that was looked up.
        id: EventId,
    },
    /// The file is not an outbox database: not SQLite at all, or a SQLite
    /// database of another application.
    NotAnOutbox {
        /// Why the file was rejected.
        reason: String,
    },
    /// The file was written by a newer version of this crate.
    SchemaTooNew {
        /// The schema version found in the file.
        found: i64,
        /// The newest schema version this crate understands.
        supported: i64,
    },
    /// The file claims to be an outbox of a known version, but its table
    /// does not have the expected shape.
    SchemaMismatch {
        /// What is missing or wrong.
        reason: String,
    },
    /// SQLite found the file damaged.
    Corrupt,
    /// The database cannot be written: a read-only file, directory or
    /// mount, or a store opened read-only.
    ReadOnly,
    /// The disk (or the configured size limit) is full. What was committed
    /// before is intact; writes succeed again once space is freed.
    DiskFull,
    /// The caller passed something the outbox cannot accept.
    InvalidInput {
        /// What was wrong with it.
        reason: String,
    },
    /// The operating system reported an I/O error (or the file could not
    /// be opened).
    Io,
    /// Any other SQLite error.
    Sqlite,
    /// Any other PostgreSQL error: the server could not be reached, the
    /// connection dropped, or it refused a statement.
    Postgres,
    /// The connection pool could not hand out a connection in time.
    Pool,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind) -> Self {
        Error {
            inner: Box::new(Inner { kind, source: None }),
        }
    }

    pub(crate) fn with_source(kind: ErrorKind, source: impl Into<BoxError>) -> Self {
        Error {
            inner: Box::new(Inner {
                kind,
                source: Some(source.into()),
            }),
        }
    }

    pub(crate) fn invalid(reason: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidInput {
            reason: reason.into(),
        })
    }

    pub(crate) fn lease_lost(id: EventId, attempt: u32) -> Self {
        Error::new(ErrorKind::LeaseLost { id, attempt })
    }

    pub(crate) fn not_found(id: EventId) -> Self {
        Error::new(ErrorKind::NotFound { id })
    }

    pub(crate) fn not_an_outbox(reason: impl Into<String>) -> Self {
        Error::new(ErrorKind::NotAnOutbox {
            reason: reason.into(),
        })
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.inner.kind
    }

    /// True if the database was locked for longer than the busy timeout.
    pub fn is_busy(&self) -> bool {
        matches!(self.kind(), ErrorKind::Busy)
    }

    /// True if an acknowledgement was refused because its lease moved on.
    pub fn is_lease_lost(&self) -> bool {
        matches!(self.kind(), ErrorKind::LeaseLost { .. })
    }

    /// True if the event looked up does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self.kind(), ErrorKind::NotFound { .. })
    }

    /// True if the disk or the database size limit is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self.kind(), ErrorKind::DiskFull)
    }

    /// True if the caller's input was rejected before anything was written.
    pub fn is_invalid_input(&self) -> bool {
        matches!(self.kind(), ErrorKind::InvalidInput { .. })
    }

    /// True if the outbox's tables are not what this build expects (not an
    /// outbox, a newer schema, or a table or column changed by hand): no
    /// retry will mend it.
    pub fn is_schema_problem(&self) -> bool {
        matches!(
            self.kind(),
            ErrorKind::NotAnOutbox { .. }
                | ErrorKind::SchemaTooNew { .. }
                | ErrorKind::SchemaMismatch { .. }
        )
    }

    /// True if retrying the same call later may succeed: the database was
    /// busy, the disk was full, or the pool had no free connection.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind(),
            ErrorKind::Busy | ErrorKind::DiskFull | ErrorKind::Pool | ErrorKind::Io
        )
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.inner.kind)
            .field("source", &self.inner.source)
            .finish()
    }
}

impl fmt::Display for Error {
    /// What happened, then its cause: `disk I/O error: unable to open
    /// database file` rather than a bare "I/O error". The cause printed here
    /// is [`Error::cause`]; [`std::error::Error::source`] starts below it,
    /// so an error reporter that walks the chain prints nothing twice.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_kind(f)?;
        #[cfg(feature = "postgres")]
        if let Some(db) = self.server_error() {
            // What the server said, with its SQLSTATE, rather than the
            // client's bare "db error".
            write!(f, ": {} (SQLSTATE {})", db.message(), db.code().code())?;
            if let Some(detail) = db.detail() {
                write!(f, "; {detail}")?;
            }
            if let Some(hint) = db.hint() {
                write!(f, "; hint: {hint}")?;
            }
            return Ok(());
        }
        if let Some(cause) = &self.inner.source {
            write!(f, ": {cause}")?;
        }
        Ok(())
    }
}

#[cfg(feature = "postgres")]
impl Error {
    /// The PostgreSQL server's own error (SQLSTATE, message, detail), when
    /// the server refused something.
    pub fn server_error(&self) -> Option<&postgres::error::DbError> {
        self.inner
            .source
            .as_deref()?
            .downcast_ref::<postgres::Error>()?
            .as_db_error()
    }
}

impl Error {
    /// The error this one wraps (a `rusqlite::Error`, an `std::io::Error`, a
    /// `serde_json::Error`), for downcasting. [`Error`]'s `Display` already
    /// includes its message.
    pub fn cause(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.inner.source.as_deref()
    }

    fn fmt_kind(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind() {
            ErrorKind::Busy => f.write_str("database is locked (busy timeout expired)"),
            ErrorKind::LeaseLost { id, attempt } => {
                write!(f, "lease of event {id} (attempt {attempt}) was lost")
            }
            ErrorKind::NotFound { id } => write!(f, "no event with id {id}"),
            ErrorKind::NotAnOutbox { reason } => {
                write!(f, "not an outbox database: {reason}")
            }
            ErrorKind::SchemaTooNew { found, supported } => write!(
                f,
                "outbox schema version {found} is newer than this version supports ({supported})"
            ),
            ErrorKind::SchemaMismatch { reason } => {
                write!(f, "outbox schema does not match: {reason}")
            }
            ErrorKind::Corrupt => f.write_str("database file is corrupt"),
            ErrorKind::ReadOnly => f.write_str("database is read-only"),
            ErrorKind::DiskFull => f.write_str("disk or database size limit is full"),
            ErrorKind::InvalidInput { reason } => write!(f, "invalid input: {reason}"),
            ErrorKind::Io => f.write_str("I/O error"),
            ErrorKind::Sqlite => f.write_str("SQLite error"),
            ErrorKind::Postgres => f.write_str("PostgreSQL error"),
            ErrorKind::Pool => f.write_str("no database connection available"),
        }
    }
}

impl std::error::Error for Error {
    /// The cause of [`Error::cause`]: the one after the message `Display`
    /// already shows.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        #[cfg(feature = "postgres")]
        if self.server_error().is_some() {
            // `Display` showed the server's message, which is all there is.
            return None;
        }
        self.inner.source.as_ref().and_then(|e| e.source())
    }
}

impl From<rusqlite::Error> for Error {
    fn from(err: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode as C;
        let kind = match err.sqlite_error() {
            Some(e) => match e.code {
                C::DatabaseBusy | C::DatabaseLocked => ErrorKind::Busy,
                C::NotADatabase => ErrorKind::NotAnOutbox {
                    reason: "the file is not a SQLite database".into(),
                },
                C::DatabaseCorrupt => ErrorKind::Corrupt,
                C::ReadOnly => ErrorKind::ReadOnly,
                C::DiskFull => ErrorKind::DiskFull,
                C::SystemIoFailure | C::CannotOpen => ErrorKind::Io,
                C::ConstraintViolation => ErrorKind::InvalidInput {
                    reason: "a table constraint rejected the row".into(),
                },
                _ => ErrorKind::Sqlite,
            },
            None => ErrorKind::Sqlite,
        };
        Error::with_source(kind, err)
    }
}

/// A payload or value that could not be turned into JSON or back: invalid
/// input, with serde_json's message as the source. Lets `?` work on
/// `serde_json` calls inside [`crate::SqliteStore::transaction`].
impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::with_source(
            ErrorKind::InvalidInput {
                reason: "JSON could not be read or written".into(),
            },
            e,
        )
    }
}

/// Text that is not an event id: invalid input, saying which text.
impl From<ParseEventIdError> for Error {
    fn from(e: ParseEventIdError) -> Self {
        Error::invalid(e.to_string())
    }
}

/// An I/O error, with the original as the source.
impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::with_source(ErrorKind::Io, e)
    }
}

impl From<r2d2::Error> for Error {
    fn from(err: r2d2::Error) -> Self {
        // r2d2 reports a failed connection set-up as a timeout whose message
        // carries the last error; a busy set-up is the common case.
        Error::with_source(ErrorKind::Pool, err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_says_the_cause_and_the_chain_never_repeats_it() {
        let sqlite = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            Some("database or disk is full".into()),
        );
        let err = Error::from(sqlite);
        assert!(err.is_disk_full());
        assert_eq!(
            err.to_string(),
            "disk or database size limit is full: database or disk is full"
        );
        assert!(err
            .cause()
            .is_some_and(|c| c.downcast_ref::<rusqlite::Error>().is_some()));
        // What a chain-walking reporter adds comes from below the cause.
        let mut chain = Vec::new();
        let mut next = std::error::Error::source(&err);
        while let Some(e) = next {
            chain.push(e.to_string());
            next = e.source();
        }
        let cause = err.cause().map(|c| c.to_string()).unwrap_or_default();
        assert!(chain.iter().all(|c| *c != cause), "{chain:?}");
    }

    #[test]
    fn busy_and_locked_map_to_busy() {
        for code in [rusqlite::ffi::SQLITE_BUSY, rusqlite::ffi::SQLITE_LOCKED] {
            let err = Error::from(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(code),
                None,
            ));
            assert!(err.is_busy(), "{code}");
            assert!(err.is_transient());
        }
    }

    #[test]
    fn result_stays_small() {
        assert_eq!(std::mem::size_of::<Error>(), std::mem::size_of::<usize>());
    }
}
