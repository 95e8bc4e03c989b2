//! `SqliteStore`: the durable store, one SQLite file shared by any number of
//! threads and processes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use crossbeam_channel::Receiver;
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::types::Value as SqlValue;
use rusqlite::{
    params, Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior,
};
use uuid::Uuid;

use super::row::{decode_row, row_to_event};
use super::schema::{prepare_file, COLUMNS};
use super::{
    Ack, AckKind, Backlog, ListFilter, Notifier, Requeue, Stats, Store, DEFAULT_LEASE,
    LEASE_EXPIRED_ERROR,
};
use crate::clock::{self, Clock, SystemClock};
use crate::error::{Error, ErrorKind, Result};
use crate::event::{Event, EventId, NewEvent, Status};
use crate::retry::RetryPolicy;

/// How hard SQLite works to make a commit survive a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// `synchronous=FULL`: a commit that returned is on disk, across a
    /// process crash and a power loss. The default.
    ///
    /// Enqueues and outcomes (done, retry, failed, release) wait for the
    /// disk. Claims and lease extensions do not: losing one in a power cut
    /// only means the event is claimed again, which at-least-once delivery
    /// allows, and the next synced commit makes them durable anyway.
    ///
    /// It also sets `PRAGMA fullfsync` and `checkpoint_fullfsync`: on macOS
    /// a plain `fsync` leaves the data in the drive's cache, and only
    /// `F_FULLFSYNC` survives a power cut. (Other systems ignore both.)
    #[default]
    Full,
    /// `synchronous=NORMAL`: faster commits that survive a process crash,
    /// **not a power loss**: the last commits before a power cut may be lost.
    Normal,
}

impl Durability {
    fn pragma(self) -> &'static str {
        match self {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        }
    }
}

/// Options for [`SqliteStore`], from [`SqliteStore::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct SqliteStoreBuilder {
    path: PathBuf,
    pool_size: u32,
    busy_timeout: Duration,
    durability: Durability,
    clock: Arc<dyn Clock>,
    policy: RetryPolicy,
    read_only: bool,
    max_page_count: Option<u64>,
}

/// The size the WAL is truncated back to after a checkpoint
/// (`PRAGMA journal_size_limit`): 16 MiB.
pub const WAL_SIZE_LIMIT: i64 = 16 * 1024 * 1024;

/// Default connection pool size.
pub const DEFAULT_POOL_SIZE: u32 = 8;
/// Default busy timeout.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

impl SqliteStoreBuilder {
    /// The largest number of open connections. Default: 8.
    pub fn pool_size(mut self, size: u32) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// How long a write waits for another connection's lock before failing
    /// with [`ErrorKind::Busy`]. Default: 5 s.
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// Commit durability. Default: [`Durability::Full`].
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// The clock for every stored time. Default: [`SystemClock`].
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The retry policy. Default: [`RetryPolicy::default`].
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Open without writing anything: no schema creation, every write fails
    /// with [`ErrorKind::ReadOnly`]. A missing file is an error. Default:
    /// false.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Cap the database at this many pages (`PRAGMA max_page_count`), so a
    /// full "disk" can be tested without root. Default: no cap.
    pub fn max_page_count(mut self, pages: u64) -> Self {
        self.max_page_count = Some(pages);
        self
    }

    /// Opens the file, creating it and its schema when needed.
    ///
    /// # Errors
    ///
    /// - `NotAnOutbox`: not a SQLite file, or a file that holds an
    ///   `outbox_events` or `outbox_meta` of someone else's. The file is
    ///   left unchanged.
    /// - `SchemaTooNew`: written by a newer version of this crate; the file
    ///   is left unchanged.
    /// - `SchemaMismatch`: an outbox whose table is wrong, or a migration
    ///   that failed (the file is left as it was).
    /// - `Busy` if others kept the file locked past the busy timeout, `Io`,
    ///   `ReadOnly`, `Corrupt`.
    pub fn build(self) -> Result<SqliteStore> {
        if self.path.is_dir() {
            return Err(Error::not_an_outbox(format!(
                "{} is a directory, not a database file",
                self.path.display()
            )));
        }
        // No SQLITE_OPEN_URI: a path is a path. `file:x.db?nolock=1` would
        // otherwise turn off the locking every guarantee between processes
        // rests on.
        let flags = if self.read_only {
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
        } else {
            create_private(&self.path)?;
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
        };
        let conn = Connection::open_with_flags(&self.path, flags)?;
        conn.busy_timeout(self.busy_timeout)?;
        prepare_file(&conn, self.read_only, self.busy_timeout)?;
        let db_path = conn.path().unwrap_or_default().to_owned();
        drop(conn);

        let busy_timeout = self.busy_timeout;
        let durability = self.durability;
        let max_page_count = self.max_page_count;
        let manager = SqliteConnectionManager::file(&self.path)
            .with_flags(flags)
            .with_init(move |c| configure(c, busy_timeout, durability, max_page_count));
        let pool = r2d2::Pool::builder()
            .max_size(self.pool_size)
            .min_idle(Some(0))
            .connection_timeout(busy_timeout + Duration::from_secs(1))
            .build(manager)?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                pool,
                flags,
                path: self.path,
                db_path,
                clock: self.clock,
                policy: self.policy,
                notifier: Notifier::default(),
                write_lock: Mutex::new(()),
                watcher: Mutex::new(None),
                relaxed: Mutex::new(None),
                busy_timeout,
                durability,
                max_page_count,
            }),
        })
    }
}

/// Creates a missing database file readable by its owner only (0600), since
/// payloads often carry personal data or links that act as passwords.
/// SQLite gives its `-wal` and `-shm` files the database file's mode. An
/// existing file keeps its mode.
fn create_private(path: &Path) -> Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::with_source(
            ErrorKind::Io,
            std::io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display())),
        )),
    }
}

/// The per-connection settings, applied to every pooled connection.
fn configure(
    conn: &mut Connection,
    busy_timeout: Duration,
    durability: Durability,
    max_page_count: Option<u64>,
) -> rusqlite::Result<()> {
    conn.busy_timeout(busy_timeout)?;
    conn.pragma_update(None, "synchronous", durability.pragma())?;
    // On macOS, fsync() does not reach the platter: only F_FULLFSYNC does.
    // Elsewhere these are stored and ignored.
    let full = durability == Durability::Full;
    conn.pragma_update(None, "fullfsync", full)?;
    conn.pragma_update(None, "checkpoint_fullfsync", full)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Let the WAL shrink back after a checkpoint instead of keeping its
    // high-water size for ever (a long reader can make it grow far past
    // the 1000-page autocheckpoint size).
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    if let Some(pages) = max_page_count {
        conn.pragma_update(None, "max_page_count", pages as i64)?;
    }
    conn.set_prepared_statement_cache_capacity(32);
    Ok(())
}

/// The durable outbox: events in one SQLite file (WAL mode), shared safely by
/// threads and processes. Clones share one connection pool.
///
/// ```
/// use sqlite_outbox::{NewEvent, SqliteStore, Store};
/// use serde_json::json;
///
/// let dir = tempfile::tempdir()?;
/// let store = SqliteStore::open(dir.path().join("app.db"))?;
///
/// // The app's own write and the event commit together, or not at all.
/// store.transaction(|tx| {
///     tx.execute("CREATE TABLE IF NOT EXISTS users (email TEXT)", [])?;
///     tx.execute("INSERT INTO users (email) VALUES ('ada@example.com')", [])?;
///     store.enqueue(tx, NewEvent::new("user.created", json!({"email": "ada@example.com"})))?;
///     Ok(())
/// })?;
///
/// let claimed = store.claim(10, std::time::Duration::from_secs(30), None)?;
/// assert_eq!(claimed.len(), 1);
/// store.complete(&claimed[0].lease().expect("claimed events have a lease"))?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: r2d2::Pool<SqliteConnectionManager>,
    flags: OpenFlags,
    path: PathBuf,
    /// The file's name as SQLite reports it (`sqlite3_db_filename`), to
    /// recognise a caller's connection to the same file cheaply.
    db_path: String,
    clock: Arc<dyn Clock>,
    policy: RetryPolicy,
    notifier: Notifier,
    /// Serialises this process's own short write transactions (claims,
    /// acknowledgements), so that they queue here instead of sleeping in
    /// SQLite's busy handler.
    write_lock: Mutex<()>,
    /// A connection that never writes, for `PRAGMA data_version`.
    watcher: Mutex<Option<(Connection, i64)>>,
    /// A connection with `synchronous=NORMAL` for writes whose loss in a
    /// power cut is harmless (claims, lease extensions): see
    /// [`Durability::Full`].
    relaxed: Mutex<Option<Connection>>,
    busy_timeout: Duration,
    durability: Durability,
    max_page_count: Option<u64>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .field("busy_timeout", &self.inner.busy_timeout)
            .field("durability", &self.inner.durability)
            .field("max_page_count", &self.inner.max_page_count)
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (or creates) the outbox at `path` with default options.
    ///
    /// # Errors
    ///
    /// As [`SqliteStoreBuilder::build`].
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteStore> {
        SqliteStore::builder(path).build()
    }

    /// Options for opening the outbox at `path`.
    pub fn builder(path: impl AsRef<Path>) -> SqliteStoreBuilder {
        SqliteStoreBuilder {
            path: path.as_ref().to_path_buf(),
            pool_size: DEFAULT_POOL_SIZE,
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            durability: Durability::Full,
            clock: Arc::new(SystemClock),
            policy: RetryPolicy::default(),
            read_only: false,
            max_page_count: None,
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Adds an event through the caller's connection, normally inside the
    /// caller's own transaction, so that it commits or rolls back with the
    /// caller's rows. Pass a `&rusqlite::Transaction` (it derefs to a
    /// connection) opened on the outbox file.
    ///
    /// Begin that transaction with `BEGIN IMMEDIATE`
    /// ([`rusqlite::TransactionBehavior::Immediate`], or use
    /// [`SqliteStore::transaction`]). rusqlite's default, DEFERRED, starts
    /// as a reader; once it has read something, turning it into a writer
    /// fails at once with "database is locked" whenever another connection
    /// (a dispatcher, say) wrote in between, and no busy timeout helps. So
    /// `enqueue` refuses a transaction that has read but not yet written,
    /// every time rather than only under load. A DEFERRED transaction whose
    /// first statement writes is fine.
    ///
    /// Dispatchers in this process are woken; if `conn` is inside a
    /// transaction they pick the event up as soon as it commits.
    ///
    /// # Errors
    ///
    /// `InvalidInput` before anything is written: an invalid event, a
    /// connection to another file than the outbox's, or a transaction that
    /// has read but not written (see above). Database errors from the
    /// insert. An error from the caller's later commit means the outcome is
    /// unknown: use an idempotency key to retry safely.
    pub fn enqueue(&self, conn: &Connection, event: NewEvent) -> Result<Event> {
        self.check_callers_connection(conn)?;
        let mut stored = insert_all(conn, vec![event], self.now(), &self.inner.policy)?;
        self.inner.notifier.notify();
        stored
            .pop()
            .ok_or_else(|| Error::invalid("nothing was enqueued"))
    }

    /// Adds many events through the caller's connection, all or none. Inside
    /// a caller's transaction they join it; otherwise they get their own.
    ///
    /// # Errors
    ///
    /// As [`SqliteStore::enqueue`]; one invalid event rejects them all.
    pub fn enqueue_batch(&self, conn: &Connection, events: Vec<NewEvent>) -> Result<Vec<Event>> {
        self.check_callers_connection(conn)?;
        let (now, policy) = (self.now(), &self.inner.policy);
        let stored = if conn.is_autocommit() {
            let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
            let stored = insert_all(&tx, events, now, policy)?;
            tx.commit()?;
            stored
        } else {
            insert_all(conn, events, now, policy)?
        };
        self.inner.notifier.notify();
        Ok(stored)
    }

    /// Runs `f` in a write transaction (`BEGIN IMMEDIATE`) on a pooled
    /// connection and commits if it returns `Ok`, rolls back otherwise.
    /// Use it to write the app's rows and enqueue events together.
    ///
    /// Inside `f`, `?` works on rusqlite, serde_json and I/O errors as well
    /// as this crate's. Enqueue with `store.enqueue(tx, ...)`; any other
    /// write of this store inside `f` fails at once (it would wait for the
    /// lock `f`'s own transaction holds). For an error type of the app's
    /// own, use [`SqliteStore::transaction_with`].
    ///
    /// # Errors
    ///
    /// Whatever `f` returns, and database errors from beginning or
    /// committing (an error from the commit means the outcome is unknown).
    pub fn transaction<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        self.transaction_with(f)
    }

    /// [`SqliteStore::transaction`] for a closure with an error type of the
    /// app's own, which must convert from this crate's [`Error`].
    ///
    /// # Errors
    ///
    /// As [`SqliteStore::transaction`].
    pub fn transaction_with<T, E>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E>
    where
        E: From<Error>,
    {
        let mut conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(Error::from)?;
        let value = {
            let _inside = InTransaction::enter(self.key());
            f(&tx)?
        };
        tx.commit().map_err(Error::from)?;
        self.inner.notifier.notify();
        Ok(value)
    }

    /// This store's identity for [`InTransaction`].
    fn key(&self) -> usize {
        Arc::as_ptr(&self.inner) as usize
    }

    /// Refuses a write of the store's own inside its `transaction` on this
    /// thread: it would wait out the busy timeout for the lock that the
    /// transaction itself holds.
    fn check_not_inside_transaction(&self) -> Result<()> {
        if InTransaction::is_inside(self.key()) {
            return Err(Error::invalid(
                "a store write was called inside SqliteStore::transaction, whose own \
                 transaction holds the write lock; inside the closure use \
                 store.enqueue(tx, ...) or store.enqueue_batch(tx, ...), and call other \
                 store methods after it",
            ));
        }
        Ok(())
    }

    /// Writes a consistent copy of the outbox to `dest` (which must not
    /// exist), including commits still in the WAL, using `VACUUM INTO`.
    ///
    /// # Errors
    ///
    /// `InvalidInput` if `dest` exists; database and I/O errors.
    pub fn backup(&self, dest: impl AsRef<Path>) -> Result<()> {
        let dest = dest.as_ref();
        if dest.exists() {
            return Err(Error::invalid(format!("{} already exists", dest.display())));
        }
        let dest = dest
            .to_str()
            .ok_or_else(|| Error::invalid("backup path is not valid UTF-8"))?;
        // A copy is as private as the outbox: made empty with 0600 first
        // (VACUUM INTO fills an empty file and keeps its mode).
        create_private(Path::new(dest))?;
        let conn = self.conn()?;
        if let Err(e) = conn.execute("VACUUM INTO ?1", [dest]) {
            let _ = std::fs::remove_file(dest);
            return Err(e.into());
        }
        Ok(())
    }

    /// Runs `PRAGMA quick_check`, then reads every event row as a claim
    /// would, and reports damage as [`ErrorKind::Corrupt`]: a file SQLite
    /// finds sound can still hold a payload that is no longer UTF-8 or
    /// JSON (a flipped bit, a plain-SQL writer's bytes).
    ///
    /// # Errors
    ///
    /// `Corrupt` with the findings as the source; database errors.
    pub fn verify(&self) -> Result<()> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare("PRAGMA quick_check")?;
        let lines: Vec<String> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        if lines.len() != 1 || lines[0] != "ok" {
            return Err(Error::with_source(ErrorKind::Corrupt, lines.join("; ")));
        }
        // SQLite's check cannot see a payload that is no longer UTF-8 or
        // JSON: read every row as a claim would.
        let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM outbox_events"))?;
        let mut bad = Vec::new();
        let mut count = 0usize;
        for row in stmt.query_map([], decode_row)? {
            if let (event, Some(problem)) = row? {
                count += 1;
                if bad.len() < 5 {
                    bad.push(format!("event seq {}: {problem}", event.seq));
                }
            }
        }
        if count > 0 {
            return Err(Error::with_source(
                ErrorKind::Corrupt,
                format!("{count} event row(s) cannot be read: {}", bad.join("; ")),
            ));
        }
        Ok(())
    }

    /// Gives up on an event that is not finished: it ends `failed` with
    /// `reason` as its last error, in one statement, so an event that was
    /// delivered a moment before stays `done`. A worker still handling it
    /// finds its lease gone ([`ErrorKind::LeaseLost`]).
    ///
    /// # Errors
    ///
    /// `NotFound`; `InvalidInput` if the event is already done or failed;
    /// database errors.
    pub fn fail_unfinished(&self, id: EventId, reason: &str) -> Result<()> {
        let now = clock::to_millis(self.now());
        let changed = self.write(|tx| {
            Ok(tx
                .prepare_cached(
                    "UPDATE outbox_events SET status = 'failed', completed_at = ?2,
                       last_error = ?3, locked_at = NULL, locked_until = NULL, lease_token = NULL
                     WHERE id = ?1 AND status IN ('pending', 'processing')",
                )?
                .execute(params![
                    id.to_string(),
                    now,
                    crate::event::capped_error(reason)
                ])?)
        })?;
        if changed == 1 {
            return Ok(());
        }
        match self.find_by_id(id)? {
            None => Err(Error::not_found(id)),
            Some(e) => Err(Error::invalid(format!(
                "event {id} is already {}",
                e.status
            ))),
        }
    }

    /// Reads a pragma on a pooled connection, e.g. `"journal_mode"`.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub fn pragma(&self, name: &str) -> Result<String> {
        let conn = self.conn()?;
        let value: SqlValue = conn.pragma_query_value(None, name, |r| r.get(0))?;
        Ok(match value {
            SqlValue::Null => String::new(),
            SqlValue::Integer(i) => i.to_string(),
            SqlValue::Real(f) => f.to_string(),
            SqlValue::Text(t) => t,
            SqlValue::Blob(b) => format!("{b:?}"),
        })
    }

    fn now(&self) -> DateTime<Utc> {
        self.inner.clock.now()
    }

    /// Refuses a caller's connection that would write elsewhere or fail
    /// under load: see [`SqliteStore::enqueue`].
    fn check_callers_connection(&self, conn: &Connection) -> Result<()> {
        let theirs = conn.path().unwrap_or_default();
        if theirs != self.inner.db_path && !same_file(theirs, &self.inner.path) {
            let shown = if theirs.is_empty() {
                "an in-memory or temporary database"
            } else {
                theirs
            };
            return Err(Error::invalid(format!(
                "enqueue was given a connection to {shown}, not to the outbox's file {}",
                self.inner.path.display()
            )));
        }
        #[cfg(feature = "bundled")]
        if !conn.is_autocommit()
            && conn.transaction_state(Some(rusqlite::MAIN_DB))? == rusqlite::TransactionState::Read
        {
            return Err(Error::invalid(
                "enqueue needs a write transaction, but the caller's transaction has read and \
                 not yet written: it is DEFERRED (rusqlite's default), and would fail with \
                 'database is locked' whenever another connection writes first. Begin it with \
                 conn.transaction_with_behavior(TransactionBehavior::Immediate), or use \
                 SqliteStore::transaction",
            ));
        }
        Ok(())
    }

    fn conn(&self) -> Result<r2d2::PooledConnection<SqliteConnectionManager>> {
        Ok(self.inner.pool.get()?)
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = self.conn()?;
        f(&conn)
    }

    /// A short write transaction of this process's own.
    fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        self.check_not_inside_transaction()?;
        let _guard = lock(&self.inner.write_lock);
        let mut conn = self.conn()?;
        immediate(&mut conn, f)
    }

    /// A short write that need not wait for the disk: a claim or a lease
    /// extension lost in a power cut only means the event is claimed again,
    /// which at-least-once delivery allows. The next synced commit (an
    /// enqueue or an outcome) makes it durable too, since the WAL is written
    /// in order.
    fn write_relaxed<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        if self.inner.durability != Durability::Full {
            return self.write(f);
        }
        self.check_not_inside_transaction()?;
        let _guard = lock(&self.inner.write_lock);
        let mut slot = self.inner.relaxed.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let mut conn = Connection::open_with_flags(&self.inner.path, self.inner.flags)?;
            configure(
                &mut conn,
                self.inner.busy_timeout,
                Durability::Normal,
                self.inner.max_page_count,
            )?;
            *slot = Some(conn);
        }
        let Some(conn) = slot.as_mut() else {
            return Err(Error::new(ErrorKind::Pool));
        };
        immediate(conn, f)
    }

    fn update_by_id(&self, id: EventId, sql: &str, args: &[&dyn rusqlite::ToSql]) -> Result<()> {
        let changed = self.write(|tx| {
            let mut all: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(args.len() + 1);
            let id_text = id.to_string();
            all.push(&id_text);
            all.extend_from_slice(args);
            Ok(tx.prepare_cached(sql)?.execute(all.as_slice())?)
        })?;
        if changed == 0 {
            return Err(Error::not_found(id));
        }
        Ok(())
    }
}

/// Runs `f` in a `BEGIN IMMEDIATE` transaction and commits it. When the
/// disk is full, it also tries to give the WAL's space back (a TRUNCATE
/// checkpoint), so that a retry can succeed once the WAL was the problem: on
/// a small disk the WAL may never reach the size at which SQLite would
/// checkpoint it by itself.
fn immediate<T>(conn: &mut Connection, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
    let result = (|| -> Result<T> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let value = f(&tx)?;
        tx.commit()?;
        Ok(value)
    })();
    if let Err(err) = &result {
        if err.is_disk_full() {
            if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
                tracing::warn!(error = %e, "checkpoint after a full disk failed; will retry with the next write");
            }
        }
    }
    result
}

thread_local! {
    /// The stores (by [`SqliteStore::key`]) whose `transaction` closure
    /// this thread is running.
    static INSIDE: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Marks this thread as inside one store's `transaction` while it lives.
struct InTransaction(usize);

impl InTransaction {
    fn enter(key: usize) -> InTransaction {
        INSIDE.with(|k| k.borrow_mut().push(key));
        InTransaction(key)
    }

    fn is_inside(key: usize) -> bool {
        INSIDE.with(|k| k.borrow().contains(&key))
    }
}

impl Drop for InTransaction {
    fn drop(&mut self) {
        INSIDE.with(|k| {
            let mut keys = k.borrow_mut();
            if let Some(i) = keys.iter().rposition(|&x| x == self.0) {
                keys.remove(i);
            }
        });
    }
}

/// Whether SQLite's name for a connection's file (`theirs`) is the file at
/// `ours`, through symbolic links and relative paths.
fn same_file(theirs: &str, ours: &Path) -> bool {
    if theirs.is_empty() {
        return false;
    }
    match (std::fs::canonicalize(theirs), std::fs::canonicalize(ours)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn lock(m: &Mutex<()>) -> MutexGuard<'_, ()> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

const INSERT_SQL: &str = "INSERT INTO outbox_events (id, event_type, payload, status, attempts, \
     max_attempts, next_attempt_at, correlation_id, org_id, user_id, ordering_key, idempotency_key, \
     created_at) VALUES (?1, ?2, ?3, 'pending', 0, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) \
     ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING";

static SELECT_BY_KEY_SQL: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {COLUMNS} FROM outbox_events WHERE idempotency_key = ?1"));

/// Checks every event, then inserts them in order, all on `conn`: nothing
/// is written if any is invalid.
fn insert_all(
    conn: &Connection,
    events: Vec<NewEvent>,
    now: DateTime<Utc>,
    policy: &RetryPolicy,
) -> Result<Vec<Event>> {
    let payloads = events
        .iter()
        .map(NewEvent::checked_payload)
        .collect::<Result<Vec<_>>>()?;
    events
        .into_iter()
        .zip(&payloads)
        .map(|(e, p)| insert_event(conn, e, p, now, policy))
        .collect()
}

/// Inserts one checked event and returns it as stored. The row is built
/// from what was inserted rather than read back, so the payload is not
/// parsed again.
fn insert_event(
    conn: &Connection,
    event: NewEvent,
    payload: &str,
    now: DateTime<Utc>,
    policy: &RetryPolicy,
) -> Result<Event> {
    let inserted = conn
        .prepare_cached(INSERT_SQL)?
        .execute(params![
            event.id.to_string(),
            event.event_type,
            payload,
            i64::from(event.max_attempts.unwrap_or_else(|| policy.max_attempts())),
            clock::to_millis(event.due_at(now)),
            event.correlation_id,
            event.org_id.map(|u| u.to_string()),
            event.user_id.map(|u| u.to_string()),
            event.ordering_key,
            event.idempotency_key,
            clock::to_millis(now),
        ])
        .map_err(|e| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::ConstraintViolation) => Error::with_source(
                ErrorKind::InvalidInput {
                    reason: format!(
                        "event {} could not be stored (duplicate id or invalid field)",
                        event.id
                    ),
                },
                e,
            ),
            _ => Error::from(e),
        })?;
    if inserted == 1 {
        return Ok(event.into_pending(conn.last_insert_rowid(), now, policy));
    }
    // The idempotency key is taken: return the event that holds it.
    let existing = conn
        .prepare_cached(&SELECT_BY_KEY_SQL)?
        .query_row([&event.idempotency_key], row_to_event)
        .optional()?;
    existing.ok_or_else(|| Error::invalid("idempotency conflict without a stored event"))
}

/// Fails, in the claim's own transaction, every claimed row that cannot be
/// read faithfully (another program's bad text, a damaged payload): it ends
/// `failed` with an error naming the column, and every other event keeps
/// flowing. Returns the rest.
fn set_aside_undecodable(
    tx: &Transaction<'_>,
    rows: Vec<(Event, Option<String>)>,
    now: i64,
) -> Result<Vec<Event>> {
    let mut good = Vec::with_capacity(rows.len());
    for (event, problem) in rows {
        let Some(problem) = problem else {
            good.push(event);
            continue;
        };
        let error = format!("the stored row cannot be read: {problem}");
        tracing::error!(seq = event.seq, error = %error, "outbox event set aside as failed");
        tx.prepare_cached(
            "UPDATE outbox_events SET status = 'failed', completed_at = ?2, last_error = ?3,
               locked_at = NULL, locked_until = NULL, lease_token = NULL
             WHERE seq = ?1",
        )?
        .execute(params![event.seq, now, error])?;
    }
    Ok(good)
}

/// An ordering-key event `e` is held back by another event `b` of its key
/// that is earlier and unfinished, or that holds a live lease (the same rule
/// as `claimable` in the memory model).
const KEY_FREE: &str = "(e.ordering_key IS NULL OR NOT EXISTS (
        SELECT 1 FROM outbox_events AS b
        WHERE b.ordering_key = e.ordering_key
          AND b.status IN ('pending', 'processing')
          AND b.seq <> e.seq
          AND (b.seq < e.seq OR (b.status = 'processing' AND b.locked_until > :now))))";

const TYPE_OK: &str = "(:types IS NULL OR e.event_type IN (SELECT value FROM json_each(:types)))";

static BACKLOG_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT
           EXISTS (SELECT 1 FROM outbox_events AS e
                   WHERE e.status = 'pending' AND e.next_attempt_at <= :now
                     AND {TYPE_OK} AND {KEY_FREE}),
           EXISTS (SELECT 1 FROM outbox_events AS e WHERE e.status = 'processing' AND {TYPE_OK}),
           (SELECT min(e.next_attempt_at) FROM outbox_events AS e
            WHERE e.status = 'pending' AND e.next_attempt_at > :now AND {TYPE_OK})"
    )
});

/// Expired leases are taken in the same (due time, enqueue order) as due
/// events; the lease index finds them, and there are few (the events of a
/// crashed or stalled worker), so sorting them is cheap.
///
/// `LIMIT :limit + 0` rather than `LIMIT :limit`: SQLite marks a bare
/// parameter in a LIMIT as one that may change the plan, and then prepares
/// the whole statement again on every execution (measured: 6 % of all
/// instructions while dispatching).
static CLAIM_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE outbox_events
         SET status = 'processing', attempts = attempts + 1, locked_at = :now,
             locked_until = :until, lease_token = random()
         WHERE seq IN (
           SELECT seq FROM (
             SELECT seq, next_attempt_at FROM (
               SELECT e.seq, e.next_attempt_at FROM outbox_events AS e
               WHERE e.status = 'pending' AND e.next_attempt_at <= :now AND {TYPE_OK} AND {KEY_FREE}
               ORDER BY e.next_attempt_at, e.seq LIMIT :limit + 0)
             UNION ALL
             SELECT seq, next_attempt_at FROM (
               SELECT e.seq, e.next_attempt_at FROM outbox_events AS e
               WHERE e.status = 'processing' AND e.locked_until <= :now AND {TYPE_OK} AND {KEY_FREE}
               ORDER BY e.next_attempt_at, e.seq LIMIT :limit + 0))
           ORDER BY next_attempt_at, seq LIMIT :limit + 0)
         RETURNING {COLUMNS}"
    )
});

/// The acknowledgements. Each is fenced: it changes the row only while the
/// lease named by (seq, token) is the current one.
const ACK_DONE_SQL: &str = "UPDATE outbox_events SET status = 'done', completed_at = ?3,
      locked_at = NULL, locked_until = NULL, lease_token = NULL
    WHERE seq = ?1 AND lease_token = ?2 AND status = 'processing'";
const ACK_RETRY_SQL: &str = "UPDATE outbox_events SET last_error = ?4,
      status = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'pending' END,
      completed_at = CASE WHEN attempts >= max_attempts THEN ?3 END,
      next_attempt_at = CASE WHEN attempts >= max_attempts THEN next_attempt_at ELSE ?5 END,
      locked_at = NULL, locked_until = NULL, lease_token = NULL
    WHERE seq = ?1 AND lease_token = ?2 AND status = 'processing'";
const ACK_FAIL_SQL: &str = "UPDATE outbox_events SET status = 'failed', completed_at = ?3,
      last_error = ?4, locked_at = NULL, locked_until = NULL, lease_token = NULL
    WHERE seq = ?1 AND lease_token = ?2 AND status = 'processing'";
const ACK_EXTEND_SQL: &str = "UPDATE outbox_events SET locked_until = ?3
    WHERE seq = ?1 AND lease_token = ?2 AND status = 'processing'";
const ACK_RELEASE_SQL: &str = "UPDATE outbox_events SET status = 'pending',
      attempts = max(attempts - 1, 0), locked_at = NULL, locked_until = NULL, lease_token = NULL
    WHERE seq = ?1 AND lease_token = ?2 AND status = 'processing'";

fn types_json(types: Option<&[String]>) -> Option<String> {
    types.map(|t| serde_json::Value::from(t.to_vec()).to_string())
}

fn count_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl Store for SqliteStore {
    fn create(&self, event: NewEvent) -> Result<Event> {
        let mut created = self.create_batch(vec![event])?;
        created
            .pop()
            .ok_or_else(|| Error::invalid("nothing was enqueued"))
    }

    fn create_batch(&self, events: Vec<NewEvent>) -> Result<Vec<Event>> {
        // Checked before the write lock is taken, so bad input costs no I/O.
        for event in &events {
            event.checked_payload()?;
        }
        // The clock is read once the write lock is held: times written are
        // never older than the commit that writes them.
        let created = self.write(|tx| insert_all(tx, events, self.now(), &self.inner.policy))?;
        self.inner.notifier.notify();
        Ok(created)
    }

    fn find_by_id(&self, id: EventId) -> Result<Option<Event>> {
        self.read(|conn| {
            let sql = format!("SELECT {COLUMNS} FROM outbox_events WHERE id = ?1");
            Ok(conn
                .prepare_cached(&sql)?
                .query_row([id.to_string()], row_to_event)
                .optional()?)
        })
    }

    fn claim(&self, limit: usize, lease: Duration, types: Option<&[String]>) -> Result<Vec<Event>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let types = types_json(types);
        let mut claimed = self.write_relaxed(|tx| {
            // Read with the lock held: a claim that waited for the lock must
            // not be born with a lease that already ran out.
            let now = self.now();
            let until = clock::add(now, lease);
            tx.prepare_cached(
                "UPDATE outbox_events
                 SET status = 'failed', completed_at = ?1, last_error = ?2,
                     locked_at = NULL, locked_until = NULL, lease_token = NULL
                 WHERE status = 'processing' AND locked_until <= ?1 AND attempts >= max_attempts",
            )?
            .execute(params![clock::to_millis(now), LEASE_EXPIRED_ERROR])?;
            let mut stmt = tx.prepare_cached(&CLAIM_SQL)?;
            let rows = stmt
                .query_map(
                    rusqlite::named_params! {
                        ":now": clock::to_millis(now),
                        ":until": clock::to_millis(until),
                        ":limit": i64::try_from(limit).unwrap_or(i64::MAX),
                        ":types": types,
                    },
                    decode_row,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            set_aside_undecodable(tx, rows, clock::to_millis(now))
        })?;
        claimed.sort_by_key(|e| (e.next_attempt_at, e.seq));
        Ok(claimed)
    }

    fn settle(&self, acks: &[Ack]) -> Result<Vec<Result<()>>> {
        if acks.is_empty() {
            return Ok(Vec::new());
        }
        let policy = &self.inner.policy;
        let only_extensions = acks
            .iter()
            .all(|a| matches!(a.kind, AckKind::Extend { .. }));
        let settle = |tx: &Transaction<'_>| {
            let now = clock::to_millis(self.now());
            let mut results = Vec::with_capacity(acks.len());
            for ack in acks {
                let l = &ack.lease;
                let changed = match &ack.kind {
                    AckKind::Complete => tx
                        .prepare_cached(ACK_DONE_SQL)?
                        .execute(params![l.seq, l.token, now])?,
                    AckKind::Retry { error, delay } => {
                        let wait =
                            delay.unwrap_or_else(|| policy.jittered_delay(l.attempt, l.seq as u64));
                        let next = clock::to_millis(clock::add(clock::from_millis(now), wait));
                        tx.prepare_cached(ACK_RETRY_SQL)?
                            .execute(params![l.seq, l.token, now, error, next])?
                    }
                    AckKind::Fail { error } => tx
                        .prepare_cached(ACK_FAIL_SQL)?
                        .execute(params![l.seq, l.token, now, error])?,
                    AckKind::Extend { by } => {
                        let until = clock::to_millis(clock::add(clock::from_millis(now), *by));
                        tx.prepare_cached(ACK_EXTEND_SQL)?
                            .execute(params![l.seq, l.token, until])?
                    }
                    AckKind::Release => tx
                        .prepare_cached(ACK_RELEASE_SQL)?
                        .execute(params![l.seq, l.token])?,
                };
                results.push(if changed == 1 {
                    Ok(())
                } else {
                    Err(Error::lease_lost(l.id, l.attempt))
                });
            }
            Ok(results)
        };
        if only_extensions {
            self.write_relaxed(settle)
        } else {
            self.write(settle)
        }
    }

    fn mark_processing(&self, id: EventId) -> Result<()> {
        let now = self.now();
        let until = clock::add(now, DEFAULT_LEASE);
        let changed = self.write(|tx| {
            Ok(tx
                .prepare_cached(
                    "UPDATE outbox_events
                     SET attempts = attempts + (status = 'pending'), status = 'processing',
                         locked_at = ?2, locked_until = ?3, lease_token = random()
                     WHERE id = ?1 AND status IN ('pending', 'processing')",
                )?
                .execute(params![
                    id.to_string(),
                    clock::to_millis(now),
                    clock::to_millis(until)
                ])?)
        })?;
        if changed == 0 {
            return match self.find_by_id(id)? {
                None => Err(Error::not_found(id)),
                Some(e) => Err(Error::invalid(format!("event {id} is {}", e.status))),
            };
        }
        Ok(())
    }

    fn mark_done(&self, id: EventId) -> Result<()> {
        self.update_by_id(
            id,
            "UPDATE outbox_events SET status = 'done', completed_at = ?2,
               locked_at = NULL, locked_until = NULL, lease_token = NULL WHERE id = ?1",
            &[&clock::to_millis(self.now())],
        )
    }

    fn mark_delivered(&self, id: EventId) -> Result<()> {
        self.update_by_id(
            id,
            "UPDATE outbox_events SET delivered_at = ?2 WHERE id = ?1",
            &[&clock::to_millis(self.now())],
        )
    }

    fn mark_retry(&self, id: EventId, error: &str) -> Result<()> {
        let now = self.now();
        let policy = &self.inner.policy;
        let changed = self.write(|tx| {
            let row: Option<(i64, i64)> = tx
                .prepare_cached("SELECT seq, attempts FROM outbox_events WHERE id = ?1")?
                .query_row([id.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let Some((seq, attempts)) = row else {
                return Ok(0);
            };
            let wait = policy.jittered_delay(u32::try_from(attempts).unwrap_or(0), seq as u64);
            Ok(tx
                .prepare_cached(
                    "UPDATE outbox_events SET last_error = ?3,
                       status = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'pending' END,
                       completed_at = CASE WHEN attempts >= max_attempts THEN ?2 END,
                       next_attempt_at = CASE WHEN attempts >= max_attempts THEN next_attempt_at ELSE ?4 END,
                       locked_at = NULL, locked_until = NULL, lease_token = NULL
                     WHERE seq = ?1",
                )?
                .execute(params![
                    seq,
                    clock::to_millis(now),
                    crate::event::capped_error(error),
                    clock::to_millis(clock::add(now, wait))
                ])?)
        })?;
        if changed == 0 {
            return Err(Error::not_found(id));
        }
        Ok(())
    }

    fn mark_failed(&self, id: EventId, error: &str) -> Result<()> {
        self.update_by_id(
            id,
            "UPDATE outbox_events SET status = 'failed', completed_at = ?2, last_error = ?3,
               locked_at = NULL, locked_until = NULL, lease_token = NULL WHERE id = ?1",
            &[
                &clock::to_millis(self.now()),
                &crate::event::capped_error(error),
            ],
        )
    }

    fn cleanup_old(&self, older_than: DateTime<Utc>) -> Result<u64> {
        let n = self.write(|tx| {
            Ok(tx
                .prepare_cached(
                    "DELETE FROM outbox_events WHERE status IN ('done', 'failed') AND created_at < ?1",
                )?
                .execute([clock::to_millis(older_than)])?)
        })?;
        Ok(n as u64)
    }

    fn count_pending(&self) -> Result<u64> {
        self.read(|conn| {
            let n: i64 = conn
                .prepare_cached("SELECT count(*) FROM outbox_events WHERE status = 'pending'")?
                .query_row([], |r| r.get(0))?;
            Ok(count_u64(n))
        })
    }

    fn count_failed(&self) -> Result<u64> {
        self.read(|conn| {
            let n: i64 = conn
                .prepare_cached("SELECT count(*) FROM outbox_events WHERE status = 'failed'")?
                .query_row([], |r| r.get(0))?;
            Ok(count_u64(n))
        })
    }

    fn delete_by_org(&self, org_id: Uuid) -> Result<u64> {
        let n = self.write(|tx| {
            Ok(tx
                .prepare_cached("DELETE FROM outbox_events WHERE org_id = ?1")?
                .execute([org_id.to_string()])?)
        })?;
        Ok(n as u64)
    }

    fn delete_by_user(&self, user_id: Uuid) -> Result<u64> {
        let n = self.write(|tx| {
            Ok(tx
                .prepare_cached("DELETE FROM outbox_events WHERE user_id = ?1")?
                .execute([user_id.to_string()])?)
        })?;
        Ok(n as u64)
    }

    fn requeue_failed(&self, which: Requeue) -> Result<u64> {
        let now = clock::to_millis(self.now());
        const SET: &str = "UPDATE outbox_events SET status = 'pending', attempts = 0,
                             next_attempt_at = ?1, completed_at = NULL";
        let n = match &which {
            Requeue::One(id) => {
                let n = self.write(|tx| {
                    Ok(tx
                        .prepare_cached(&format!("{SET} WHERE id = ?2 AND status = 'failed'"))?
                        .execute(params![now, id.to_string()])?)
                })?;
                if n == 0 {
                    return match self.find_by_id(*id)? {
                        None => Err(Error::not_found(*id)),
                        Some(e) => Err(Error::invalid(format!(
                            "event {id} is {}, not failed",
                            e.status
                        ))),
                    };
                }
                n
            }
            Requeue::Type(t) => self.write(|tx| {
                Ok(tx
                    .prepare_cached(&format!(
                        "{SET} WHERE status = 'failed' AND event_type = ?2"
                    ))?
                    .execute(params![now, t])?)
            })?,
            Requeue::All => self.write(|tx| {
                Ok(tx
                    .prepare_cached(&format!("{SET} WHERE status = 'failed'"))?
                    .execute(params![now])?)
            })?,
        };
        if n > 0 {
            self.inner.notifier.notify();
        }
        Ok(n as u64)
    }

    fn stats(&self) -> Result<Stats> {
        let now = clock::to_millis(self.now());
        self.read(|conn| {
            // One read transaction, so the counts agree with each other; it
            // ends (rolled back) however this returns.
            let tx = Transaction::new_unchecked(conn, TransactionBehavior::Deferred)?;
            let conn: &Connection = &tx;
            let result = (|| {
                let mut stats = Stats::default();
                let mut stmt = conn.prepare_cached(
                    "SELECT event_type, status, count(*),
                            sum(status = 'pending' AND next_attempt_at <= ?1)
                     FROM outbox_events GROUP BY event_type, status",
                )?;
                // Text another program wrote badly is shown, not fatal.
                let lossy = |r: &rusqlite::Row<'_>, i| -> rusqlite::Result<String> {
                    Ok(match r.get_ref(i)? {
                        rusqlite::types::ValueRef::Text(b) => {
                            String::from_utf8_lossy(b).into_owned()
                        }
                        other => format!("{other:?}"),
                    })
                };
                let rows = stmt.query_map([now], |r| {
                    Ok((
                        lossy(r, 0)?,
                        lossy(r, 1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                })?;
                for row in rows {
                    let (event_type, status, n, due) = row?;
                    let status = status.parse().unwrap_or(Status::Pending);
                    stats.add(&event_type, status, count_u64(n), count_u64(due));
                }
                let oldest: Option<i64> = conn
                    .prepare_cached(
                        "SELECT min(next_attempt_at) FROM outbox_events
                         WHERE status = 'pending' AND next_attempt_at <= ?1",
                    )?
                    .query_row([now], |r| r.get(0))?;
                stats.oldest_due_age =
                    oldest.map(|t| Duration::from_millis(u64::try_from(now - t).unwrap_or(0)));
                Ok(stats)
            })();
            tx.finish()?;
            result
        })
    }

    fn list(&self, filter: &ListFilter) -> Result<Vec<Event>> {
        let mut clauses = Vec::new();
        let mut args: Vec<SqlValue> = Vec::new();
        let mut add = |clause: &str, value: SqlValue| {
            args.push(value);
            clauses.push(format!("{clause} = ?{}", args.len()));
        };
        if let Some(s) = filter.status {
            add("status", SqlValue::Text(s.as_str().into()));
        }
        if let Some(t) = &filter.event_type {
            add("event_type", SqlValue::Text(t.clone()));
        }
        if let Some(o) = filter.org_id {
            add("org_id", SqlValue::Text(o.to_string()));
        }
        if let Some(u) = filter.user_id {
            add("user_id", SqlValue::Text(u.to_string()));
        }
        if let Some(c) = &filter.correlation_id {
            add("correlation_id", SqlValue::Text(c.clone()));
        }
        let where_sql = if clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", clauses.join(" AND "))
        };
        let order = if filter.newest_first { "DESC" } else { "ASC" };
        let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
        let sql = format!(
            "SELECT {COLUMNS} FROM outbox_events {where_sql} ORDER BY seq {order} LIMIT {limit}"
        );
        self.read(|conn| {
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt.query_map(rusqlite::params_from_iter(args), row_to_event)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn next_wakeup(&self, types: Option<&[String]>) -> Result<Option<DateTime<Utc>>> {
        let now = clock::to_millis(self.now());
        let types = types_json(types);
        self.read(|conn| {
            let t: Option<i64> = conn
                .prepare_cached(&format!(
                    "SELECT min(t) FROM (
                       SELECT min(e.next_attempt_at) AS t FROM outbox_events AS e
                       WHERE e.status = 'pending' AND e.next_attempt_at > :now AND {TYPE_OK}
                       UNION ALL
                       SELECT min(e.locked_until) FROM outbox_events AS e
                       WHERE e.status = 'processing' AND e.locked_until > :now AND {TYPE_OK})"
                ))?
                .query_row(
                    rusqlite::named_params! {":now": now, ":types": types},
                    |r| r.get(0),
                )?;
            Ok(t.map(clock::from_millis))
        })
    }

    fn backlog(&self, types: Option<&[String]>) -> Result<Backlog> {
        let now = clock::to_millis(self.now());
        let types = types_json(types);
        self.read(|conn| {
            let (due, processing, next): (bool, bool, Option<i64>) =
                conn.prepare_cached(&BACKLOG_SQL)?.query_row(
                    rusqlite::named_params! {":now": now, ":types": types},
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )?;
            Ok(Backlog {
                due,
                processing,
                next_due_at: next.map(clock::from_millis),
            })
        })
    }

    fn has_external_changes(&self) -> Result<bool> {
        let mut watcher = self.inner.watcher.lock().unwrap_or_else(|p| p.into_inner());
        if watcher.is_none() {
            let conn = Connection::open_with_flags(&self.inner.path, self.inner.flags)?;
            conn.busy_timeout(self.inner.busy_timeout)?;
            *watcher = Some((conn, i64::MIN));
        }
        let Some((conn, last)) = watcher.as_mut() else {
            return Ok(true);
        };
        let version: i64 = conn.pragma_query_value(None, "data_version", |r| r.get(0))?;
        let changed = version != *last;
        *last = version;
        Ok(changed)
    }

    fn subscribe(&self) -> Receiver<()> {
        self.inner.notifier.subscribe()
    }

    fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    fn retry_policy(&self) -> &RetryPolicy {
        &self.inner.policy
    }
}
