//! Opening an outbox: the options, the per-connection settings, and the
//! file's creation with private permissions.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, OpenFlags};

use super::{Inner, SqliteStore};
use crate::clock::{Clock, SystemClock};
use crate::error::{Error, ErrorKind, Result};
use crate::retry::RetryPolicy;
use crate::store::schema::prepare_file;
use crate::store::Notifier;
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
    pub(super) fn pragma(self) -> &'static str {
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
    create: bool,
    max_page_count: Option<u64>,
}

/// The size the WAL is truncated back to after a checkpoint
/// (`PRAGMA journal_size_limit`): 16 MiB.
pub(crate) const WAL_SIZE_LIMIT: i64 = 16 * 1024 * 1024;

/// Default connection pool size.
pub(crate) const DEFAULT_POOL_SIZE: u32 = 8;
/// Default busy timeout.
pub(crate) const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

impl SqliteStoreBuilder {
    /// The largest number of open connections, at least 1 (`build` refuses
    /// 0). Default: 8.
    pub fn pool_size(mut self, size: u32) -> Self {
        self.pool_size = size;
        self
    }

    /// How long a write waits for another connection's lock before failing
    /// with [`ErrorKind::Busy`]. Default: 5 s.
    ///
    /// The store's connections look for the lock again every 2 ms
    /// until then, with a busy handler of their own: SQLite's (`PRAGMA
    /// busy_timeout`, which therefore reads 0 on them) sleeps up to 100 ms
    /// between looks, and so loses a busy lock to a writer that frees it
    /// for only a moment.
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

    /// Whether to create the outbox (and the file) when there is none.
    /// Default: true. With false, a missing file, or an app's database
    /// without an outbox (a mistyped path, say), is an error and is left
    /// unchanged: for tools that operate an outbox and must not plant one
    /// in someone else's file.
    pub fn create(mut self, create: bool) -> Self {
        self.create = create;
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
    /// - `InvalidInput`: a pool size of 0.
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
        // Refused, not clamped: like `DispatcherBuilder::start`.
        if self.pool_size == 0 {
            return Err(Error::invalid("pool_size must be at least 1"));
        }
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
        } else if !self.create {
            if !self.path.exists() {
                return Err(Error::with_source(
                    ErrorKind::Io,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("{}: no such file", self.path.display()),
                    ),
                ));
            }
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX
        } else {
            create_private(&self.path)?;
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
        };
        let conn = Connection::open_with_flags(&self.path, flags)?;
        super::busy::install(&conn, self.busy_timeout)?;
        let columns = prepare_file(&conn, self.read_only, self.create, self.busy_timeout)?;
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
                gate: parking_lot::FairMutex::new(()),
                watcher: Mutex::new(None),
                relaxed: Mutex::new(None),
                busy_timeout,
                durability,
                max_page_count,
                columns,
                front_claims: Default::default(),
            }),
        })
    }
}

/// Creates a missing database file readable by its owner only (0600), since
/// payloads often carry personal data or links that act as passwords.
/// SQLite gives its `-wal` and `-shm` files the database file's mode. An
/// existing file keeps its mode.
pub(super) fn create_private(path: &Path) -> Result<()> {
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
pub(super) fn configure(
    conn: &mut Connection,
    busy_timeout: Duration,
    durability: Durability,
    max_page_count: Option<u64>,
) -> rusqlite::Result<()> {
    super::busy::install(conn, busy_timeout)?;
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
            create: true,
            max_page_count: None,
        }
    }
}
