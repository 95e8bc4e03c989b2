//! `SqliteStore`: the durable store, one SQLite file shared by any number of
//! threads and processes.
//!
//! One file per seam: `builder` (options, connection settings), `enqueue`
//! (the caller's transaction), `lease` (claims and fenced outcomes),
//! `operator` (operators' reads and writes), `sql` (every statement's
//! text); here the store itself, its connections and the `Store` impl.

mod builder;
mod busy;
mod enqueue;
mod lease;
mod legacy;
mod limits;
mod operator;
mod sql;

pub(crate) use builder::DEFAULT_BUSY_TIMEOUT;
pub use builder::{Durability, SqliteStoreBuilder};

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use crossbeam_channel::Receiver;
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior};

use super::row::row_to_event;
use super::sealed::TypeFilter;
use super::{Ack, Backlog, DestinationState, Notifier, Store};
use crate::clock::{self, Clock};
use crate::error::{Error, ErrorKind, Result};
use crate::event::{Event, NewEvent};
use crate::id::EventId;

use crate::retry::RetryPolicy;
use builder::configure;
use enqueue::insert_all;
use sql::{BACKLOG_SQL, TYPE_OK};

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
///     store.enqueue_tx(tx, NewEvent::new("user.created", json!({"email": "ada@example.com"})))?;
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
    /// The writer gate: every write transaction of this process that goes
    /// through the store (claims, outcomes, enqueues, the app's
    /// [`SqliteStore::transaction`]) passes it first, in arrival order.
    /// Writers queue here, first come first served, instead of sleeping in
    /// SQLite's busy handler, where a thread that commits back to back wins
    /// the lock again and again and the others wait out the busy timeout.
    gate: parking_lot::FairMutex<()>,
    /// A connection that never writes, for `PRAGMA data_version`.
    watcher: Mutex<Option<(Connection, i64)>>,
    /// A connection with `synchronous=NORMAL` for writes whose loss in a
    /// power cut is harmless (claims, lease extensions): see
    /// [`Durability::Full`].
    relaxed: Mutex<Option<Connection>>,
    busy_timeout: Duration,
    durability: Durability,
    max_page_count: Option<u64>,
    /// The columns events are read with (`schema::COLUMNS`, or for an
    /// older file read as it is, a list that reads newer columns as NULL).
    columns: &'static str,
    /// Whether claims of several types read the due index's front first.
    front_claims: lease::FrontClaims,
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
    /// The size the WAL file is cut back to after a checkpoint (`PRAGMA
    /// journal_size_limit`): 16 MiB.
    pub const WAL_SIZE_LIMIT: i64 = builder::WAL_SIZE_LIMIT;
    /// Connections in the store's pool unless the builder says otherwise.
    pub const DEFAULT_POOL_SIZE: u32 = builder::DEFAULT_POOL_SIZE;
    /// How long a write waits for the lock unless the builder says
    /// otherwise: 5 s.
    pub const DEFAULT_BUSY_TIMEOUT: Duration = builder::DEFAULT_BUSY_TIMEOUT;

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
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

    /// Whether the file has the current layout (not an older one read as
    /// it is, read-only).
    fn is_current(&self) -> bool {
        self.inner.columns == super::schema::COLUMNS
    }

    fn now(&self) -> DateTime<Utc> {
        self.inner.clock.now()
    }

    fn conn(&self) -> Result<r2d2::PooledConnection<SqliteConnectionManager>> {
        busy::set_limit(self.inner.busy_timeout);
        Ok(self.inner.pool.get()?)
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = self.conn()?;
        f(&conn)
    }

    /// Waits for this process's turn to write: at most the busy timeout,
    /// like a wait for SQLite's own lock.
    fn gate(&self) -> Result<parking_lot::FairMutexGuard<'_, ()>> {
        self.inner
            .gate
            .try_lock_for(self.inner.busy_timeout)
            .ok_or_else(|| Error::new(ErrorKind::Busy))
    }

    /// A short write transaction of this process's own.
    fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        self.check_not_inside_transaction()?;
        let _turn = self.gate()?;
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
        let _turn = self.gate()?;
        busy::set_limit(self.inner.busy_timeout);
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

fn types_json(types: Option<&[String]>) -> Option<String> {
    types.map(|t| serde_json::Value::from(t.to_vec()).to_string())
}

/// The skipped types, `None` when there are none (the SQL then skips the
/// test).
fn skip<'a>(filter: &TypeFilter<'a>) -> Option<&'a [String]> {
    (!filter.skip.is_empty()).then_some(filter.skip)
}

impl Store for SqliteStore {
    fn settle(&self, acks: &[Ack]) -> Result<Vec<Result<()>>> {
        self.settle_acks(acks)
    }

    fn enqueue_batch(&self, events: Vec<NewEvent>) -> Result<Vec<Event>> {
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

    fn find(&self, id: EventId) -> Result<Option<Event>> {
        self.read(|conn| {
            let sql = format!(
                "SELECT {} FROM outbox_events WHERE id = ?1",
                self.inner.columns
            );
            Ok(conn
                .prepare_cached(&sql)?
                .query_row([id.to_string()], row_to_event)
                .optional()?)
        })
    }

    fn skip_backoff(&self, types: Option<&[String]>) -> Result<u64> {
        let now = clock::to_millis(self.now());
        let types = types_json(types);
        let n = self.write(|tx| {
            Ok(tx
                .prepare_cached(&format!(
                    "UPDATE outbox_events AS e SET next_attempt_at = :now
                     WHERE e.status = 'pending' AND e.attempts > 0 AND e.next_attempt_at > :now
                       AND {TYPE_OK}"
                ))?
                .execute(rusqlite::named_params! {":now": now, ":types": types})?)
        })?;
        if n > 0 {
            self.inner.notifier.notify();
        }
        Ok(n as u64)
    }

    fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    fn retry_policy(&self) -> &RetryPolicy {
        &self.inner.policy
    }
}

impl super::sealed::Sealed for SqliteStore {
    fn record_destination(&self, name: &str, state: Option<&DestinationState>) -> Result<()> {
        self.write_relaxed(|tx| {
            match state {
                Some(s) => tx
                    .prepare_cached(
                        "INSERT INTO outbox_destinations
                           (name, hold, since, next_probe_at, last_error, updated_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                         ON CONFLICT (name) DO UPDATE SET hold = excluded.hold,
                           since = excluded.since, next_probe_at = excluded.next_probe_at,
                           last_error = excluded.last_error, updated_at = excluded.updated_at",
                    )?
                    .execute(rusqlite::params![
                        name,
                        s.hold.as_str(),
                        clock::to_millis(s.since),
                        s.next_probe_at.map(clock::to_millis),
                        s.last_error.as_deref().map(crate::event::capped_error),
                        clock::to_millis(s.updated_at),
                    ])?,
                None => tx
                    .prepare_cached("DELETE FROM outbox_destinations WHERE name = ?1")?
                    .execute([name])?,
            };
            Ok(())
        })
    }

    fn claim_where(
        &self,
        limit: usize,
        lease: Duration,
        filter: &TypeFilter<'_>,
    ) -> Result<Vec<Event>> {
        self.claim_events(limit, lease, filter)
    }

    fn claim_limited(
        &self,
        limit: usize,
        lease: Duration,
        filter: &TypeFilter<'_>,
        shared: &[super::limits::SharedLimit<'_>],
    ) -> Result<super::limits::Limited> {
        self.claim_limited_events(limit, lease, filter, shared)
    }

    fn record_limit(&self, state: &super::LimitState) -> Result<()> {
        self.write_limit(state)
    }

    fn settle_and_claim(
        &self,
        acks: &[Ack],
        limit: usize,
        lease: Duration,
        filter: &TypeFilter<'_>,
    ) -> Result<(Vec<Result<()>>, Vec<Event>)> {
        self.settle_and_claim_events(acks, limit, lease, filter)
    }

    fn backlog_where(&self, filter: &TypeFilter<'_>) -> Result<Backlog> {
        let now = clock::to_millis(self.now());
        let (types, skip) = (types_json(filter.only), types_json(skip(filter)));
        self.read(|conn| {
            let (due, processing, next): (bool, bool, Option<i64>) =
                conn.prepare_cached(&BACKLOG_SQL)?.query_row(
                    rusqlite::named_params! {":now": now, ":types": types, ":skip": skip},
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )?;
            Ok(Backlog {
                due,
                processing,
                next_due_at: next.map(clock::from_millis),
            })
        })
    }

    fn next_wakeup(&self, filter: &TypeFilter<'_>) -> Result<Option<DateTime<Utc>>> {
        let now = clock::to_millis(self.now());
        let (types, skip) = (types_json(filter.only), types_json(skip(filter)));
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
                    rusqlite::named_params! {":now": now, ":types": types, ":skip": skip},
                    |r| r.get(0),
                )?;
            Ok(t.map(clock::from_millis))
        })
    }

    fn has_external_changes(&self) -> Result<bool> {
        let mut watcher = self.inner.watcher.lock().unwrap_or_else(|p| p.into_inner());
        if watcher.is_none() {
            let conn = Connection::open_with_flags(&self.inner.path, self.inner.flags)?;
            busy::install(&conn, self.inner.busy_timeout)?;
            *watcher = Some((conn, i64::MIN));
        }
        busy::set_limit(self.inner.busy_timeout);
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

    fn last_enqueues(&self) -> [Option<std::time::Instant>; 2] {
        self.inner.notifier.last_two()
    }
}
