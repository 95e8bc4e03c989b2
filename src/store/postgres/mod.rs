//! The outbox on a PostgreSQL server: the same API, guarantees and tests
//! as [`crate::SqliteStore`], for apps that grow out of one file.
//!
//! Claims take a batch in one statement with `FOR UPDATE SKIP LOCKED`, so
//! many dispatchers (on many machines) share one table without waiting on
//! each other. An insert, by the crate or by plain SQL, notifies the
//! schema's channel; a listener thread per store wakes its dispatchers in
//! milliseconds, and polling stays as the fallback.

mod builder;
mod conn;
mod enqueue;
mod lease;
mod limits;
mod listen;
mod migrate;
mod operator;
mod prepared;
mod row;
mod sql;
mod target;
mod tls;

pub use builder::PostgresStoreBuilder;
pub use prepared::PreparedEnqueue;
pub use target::{PostgresTarget, SslMode};

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use crossbeam_channel::Receiver;
use postgres::types::Type;
use postgres::{GenericClient, Row};

use crate::clock::{self, Clock, SystemClock};
use crate::error::{Error, ErrorKind, Result};
use crate::event::{Event, NewEvent, Payload, Status};
use crate::id::EventId;
use crate::retry::RetryPolicy;
use crate::store::sealed::TypeFilter;
use crate::store::{Ack, AckKind, Backlog, DestinationState, Notifier, Store, LEASE_EXPIRED_ERROR};
use builder::pool_error;
use enqueue::is_invalid_data;
use lease::type_lists;
use row::decode;
use sql::Sql;

/// The layout of the outbox's objects in its schema that this build writes
/// (`schema.postgres.sql`); its `outbox_meta` row `schema_version` holds
/// the layout a schema has.
pub(crate) const POSTGRES_SCHEMA_VERSION: i64 = 4;

/// The DDL of a fresh outbox on PostgreSQL, run in the chosen schema.
pub(crate) const POSTGRES_SCHEMA_SQL: &str = include_str!("../../../schema.postgres.sql");

/// The schema the outbox lives in unless the builder names another.
pub(crate) const DEFAULT_POSTGRES_SCHEMA: &str = "outbox";

type Pool = r2d2::Pool<conn::Manager>;
type Tx<'c> = conn::Session<'c, postgres::Transaction<'c>>;

/// A statement and its parameters with their types, run in one round trip
/// on whatever client the caller gave.
type TypedQuery<'q> = dyn FnMut(
        &str,
        &[(&(dyn postgres::types::ToSql + Sync), Type)],
    ) -> std::result::Result<Vec<Row>, postgres::Error>
    + 'q;

/// The values of a typed query's parameters, for a prepared statement
/// (which knows their types already).
fn untyped<'a>(
    p: &[(&'a (dyn postgres::types::ToSql + Sync), Type)],
) -> Vec<&'a (dyn postgres::types::ToSql + Sync)> {
    p.iter().map(|(v, _)| *v).collect()
}

/// The durable outbox on a PostgreSQL server: events in one table of a
/// schema of their own, shared by every process and machine that connects.
/// Clones share one connection pool.
///
/// ```no_run
/// use sqlite_outbox::{NewEvent, PostgresStore, Store};
/// use serde_json::json;
///
/// let store = PostgresStore::open("postgres://app@localhost/app")?;
///
/// // The app's own write and the event commit together, or not at all.
/// let mut client = store.connect()?; // the app's own, with the store's TLS
/// let mut tx = client.transaction()?;
/// tx.execute("INSERT INTO users (email) VALUES ($1)", &[&"ada@example.com"])?;
/// store.enqueue_tx(&mut tx, NewEvent::new("user.created", json!({"email": "ada@example.com"})))?;
/// tx.commit()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    target: Arc<PostgresTarget>,
    schema: String,
    sql: Sql,
    clock: Arc<dyn Clock>,
    policy: RetryPolicy,
    notifier: Arc<Notifier>,
    listener: listen::Listener,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.inner.target)
            .field("schema", &self.inner.schema)
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// The layout of the outbox's objects in its schema that this build
    /// writes (`schema.postgres.sql`); a schema's `outbox_meta` row
    /// `schema_version` holds the layout it has.
    pub const SCHEMA_VERSION: i64 = POSTGRES_SCHEMA_VERSION;
    /// The DDL of a fresh outbox, run in the chosen schema.
    pub const SCHEMA_SQL: &str = POSTGRES_SCHEMA_SQL;
    /// The schema the outbox lives in unless the builder names another.
    pub const DEFAULT_SCHEMA: &str = DEFAULT_POSTGRES_SCHEMA;

    /// Opens (creating if needed) the outbox in schema `outbox` of the
    /// database at `url`: a `postgres://` URL or `host=… user=…` key-value
    /// pairs, as libpq takes them.
    ///
    /// # Errors
    ///
    /// As [`PostgresStoreBuilder::build`].
    pub fn open(url: &str) -> Result<PostgresStore> {
        PostgresStore::builder(url).build()
    }

    /// The schema that holds the outbox.
    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    /// Where the store connects, as it may be shown (no password).
    pub fn target(&self) -> &PostgresTarget {
        &self.inner.target
    }

    /// A new connection of the app's own to the same server, made as the
    /// store makes its own (TLS as `sslmode` says, the same timeouts): for
    /// the transactions that [`enqueue_tx`](Self::enqueue_tx) joins.
    ///
    /// # Errors
    ///
    /// `Postgres` when the server cannot be reached, refuses, or cannot
    /// prove who it is.
    pub fn connect(&self) -> Result<postgres::Client> {
        Ok(self.inner.target.connect()?)
    }

    /// The text of one of the store's statements (`insert`, `insert_all`, `claim_due`,
    /// `ack_done`, `ack_done_all`), for the benchmark's raw loops, which run the same SQL.
    #[doc(hidden)]
    pub fn statement_text(&self, name: &str) -> Option<&str> {
        let sql = &self.inner.sql;
        Some(match name {
            "insert" => &sql.insert,
            "insert_all" => &sql.insert_all,
            "claim" => &sql.claim,
            "claim_due" => &sql.claim_due,
            "ack_done" => &sql.ack_done,
            "ack_done_all" => &sql.ack_done_all,
            _ => return None,
        })
    }

    fn now(&self) -> DateTime<Utc> {
        self.inner.clock.now()
    }

    fn conn(&self) -> Result<r2d2::PooledConnection<conn::Manager>> {
        self.inner.pool.get().map_err(|e| pool_error(&e))
    }

    /// Runs `f` in a transaction on a pooled connection and commits.
    fn write<T>(&self, f: impl FnOnce(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.conn()?;
        let mut tx = conn.transaction()?;
        let out = f(&mut tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// Runs `f` on a pooled connection.
    fn read<T>(
        &self,
        f: impl FnOnce(&mut conn::Session<'_, &mut postgres::Client>) -> Result<T>,
    ) -> Result<T> {
        let mut conn = self.conn()?;
        f(&mut conn.session())
    }
}

impl Store for PostgresStore {
    fn enqueue_batch(&self, events: Vec<NewEvent>) -> Result<Vec<Event>> {
        for event in &events {
            event.checked_payload()?;
        }
        // On the store's own connection the statements are prepared once.
        let mut conn = self.conn()?;
        let mut session = conn.session();
        let mut run = |sql: &str, p: &[(&(dyn postgres::types::ToSql + Sync), Type)]| {
            session.query_pg(sql, &untyped(p))
        };
        self.enqueue_with(&mut run, events)
    }

    fn find(&self, id: EventId) -> Result<Option<Event>> {
        self.read(|c| {
            Ok(c.query_opt(&self.inner.sql.select_by_id, &[&id.as_uuid()])?
                .map(|r| decode(&r).0))
        })
    }

    fn settle(&self, acks: &[Ack]) -> Result<Vec<Result<()>>> {
        if acks.is_empty() {
            return Ok(Vec::new());
        }
        self.write(|tx| self.settle_in(tx, acks))
    }

    fn skip_backoff(&self, types: Option<&[String]>) -> Result<u64> {
        let now = clock::to_millis(self.now());
        let only: Option<Vec<&str>> = types.map(|t| t.iter().map(String::as_str).collect());
        let n = self.write(|tx| {
            let n = tx.execute(&self.inner.sql.skip_backoff, &[&now, &only])?;
            if n > 0 {
                self.notify_others(tx)?;
            }
            Ok(n)
        })?;
        if n > 0 {
            self.inner.notifier.notify();
        }
        Ok(n)
    }

    fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    fn retry_policy(&self) -> &RetryPolicy {
        &self.inner.policy
    }
}

impl crate::store::sealed::Sealed for PostgresStore {
    fn claim_where(
        &self,
        limit: usize,
        lease: Duration,
        filter: &TypeFilter<'_>,
    ) -> Result<Vec<Event>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.write(|tx| self.claim_in(tx, limit, lease, filter))
    }

    fn settle_and_claim(
        &self,
        acks: &[Ack],
        limit: usize,
        lease: Duration,
        filter: &TypeFilter<'_>,
    ) -> Result<(Vec<Result<()>>, Vec<Event>)> {
        self.write(|tx| {
            let results = self.settle_in(tx, acks)?;
            let claimed = if limit == 0 {
                Vec::new()
            } else {
                self.claim_in(tx, limit, lease, filter)?
            };
            Ok((results, claimed))
        })
    }

    fn backlog_where(&self, filter: &TypeFilter<'_>) -> Result<Backlog> {
        let now = clock::to_millis(self.now());
        let (only, skip) = type_lists(filter);
        self.read(|c| {
            let row = c.query_one(&self.inner.sql.backlog, &[&now, &only, &skip])?;
            Ok(Backlog {
                due: row.get(0),
                processing: row.get(1),
                next_due_at: row.get::<_, Option<i64>>(2).map(clock::from_millis),
            })
        })
    }

    fn next_wakeup(&self, filter: &TypeFilter<'_>) -> Result<Option<DateTime<Utc>>> {
        let now = clock::to_millis(self.now());
        let (only, skip) = type_lists(filter);
        self.read(|c| {
            let t: Option<i64> = c
                .query_one(&self.inner.sql.next_wakeup, &[&now, &only, &skip])?
                .get(0);
            Ok(t.map(clock::from_millis))
        })
    }

    /// Always true: the listener only hastens pickup. A `LISTEN`
    /// connection can go deaf without an error (a half-open TCP
    /// connection, a proxy or pooler that stops forwarding), so its
    /// silence proves nothing, and every poll interval looks at the table
    /// (one index probe when nothing is due).
    fn has_external_changes(&self) -> Result<bool> {
        self.inner.listener.ensure_running();
        Ok(true)
    }

    fn subscribe(&self) -> Receiver<()> {
        self.inner.listener.ensure_running();
        self.inner.notifier.subscribe()
    }

    fn last_enqueues(&self) -> [Option<std::time::Instant>; 2] {
        self.inner.notifier.last_two()
    }

    fn claim_limited(
        &self,
        limit: usize,
        lease: Duration,
        filter: &TypeFilter<'_>,
        shared: &[crate::store::limits::SharedLimit<'_>],
    ) -> Result<crate::store::limits::Limited> {
        self.claim_limited_events(limit, lease, filter, shared)
    }

    fn record_limit(&self, state: &crate::store::LimitState) -> Result<()> {
        self.write_limit(state)
    }

    fn record_destination(&self, name: &str, state: Option<&DestinationState>) -> Result<()> {
        let sql = &self.inner.sql;
        self.write(|tx| {
            match state {
                Some(s) => tx.execute(
                    &sql.upsert_destination,
                    &[
                        &name,
                        &s.hold.as_str(),
                        &clock::to_millis(s.since),
                        &s.next_probe_at.map(clock::to_millis),
                        &s.last_error.as_deref().map(crate::event::capped_error),
                        &clock::to_millis(s.updated_at),
                    ],
                )?,
                None => tx.execute(&sql.delete_destination, &[&name])?,
            };
            Ok(())
        })
    }
}

impl From<postgres::Error> for Error {
    fn from(err: postgres::Error) -> Self {
        use postgres::error::SqlState as S;
        let kind = match err.code() {
            Some(c) if *c == S::DISK_FULL => ErrorKind::DiskFull,
            Some(c) if *c == S::READ_ONLY_SQL_TRANSACTION => ErrorKind::ReadOnly,
            Some(c) if *c == S::LOCK_NOT_AVAILABLE || *c == S::T_R_DEADLOCK_DETECTED => {
                ErrorKind::Busy
            }
            Some(c) if is_invalid_data(c) => ErrorKind::InvalidInput {
                reason: "the server refused a value".into(),
            },
            // The outbox's objects are not what the code expects (a column
            // dropped or changed by hand): no retry will help.
            Some(c)
                if *c == S::UNDEFINED_COLUMN
                    || *c == S::UNDEFINED_TABLE
                    || *c == S::UNDEFINED_FUNCTION
                    || *c == S::DATATYPE_MISMATCH
                    || *c == S::INVALID_SCHEMA_NAME =>
            {
                ErrorKind::SchemaMismatch {
                    reason: "an object of the outbox is missing or not of the expected type".into(),
                }
            }
            _ => ErrorKind::Postgres,
        };
        Error::with_source(kind, err)
    }
}
