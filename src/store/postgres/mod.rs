//! The outbox on a PostgreSQL server: the same API, guarantees and tests
//! as [`crate::SqliteStore`], for apps that grow out of one file.
//!
//! Claims take a batch in one statement with `FOR UPDATE SKIP LOCKED`, so
//! many dispatchers (on many machines) share one table without waiting on
//! each other. An insert, by the crate or by plain SQL, notifies the
//! schema's channel; a listener thread per store wakes its dispatchers in
//! milliseconds, and polling stays as the fallback.

mod conn;
mod listen;
mod migrate;
mod operator;
mod sql;
mod target;

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
use sql::Sql;

/// The layout of the outbox's objects in its schema that this build writes
/// (`schema.postgres.sql`); its `outbox_meta` row `schema_version` holds
/// the layout a schema has.
pub const POSTGRES_SCHEMA_VERSION: i64 = 3;

/// The DDL of a fresh outbox on PostgreSQL, run in the chosen schema.
pub const POSTGRES_SCHEMA_SQL: &str = include_str!("../../../schema.postgres.sql");

/// The schema the outbox lives in unless the builder names another.
pub const DEFAULT_POSTGRES_SCHEMA: &str = "outbox";

type Pool = r2d2::Pool<conn::Manager>;
type Tx<'c> = conn::Session<'c, postgres::Transaction<'c>>;

/// A statement and its parameters with their types, run in one round trip
/// on whatever client the caller gave.
type TypedQuery<'q> = dyn FnMut(
        &str,
        &[(&(dyn postgres::types::ToSql + Sync), Type)],
    ) -> std::result::Result<Vec<Row>, postgres::Error>
    + 'q;

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

/// Builds a [`PostgresStore`]: where to connect, which schema, and the
/// store's clock and retry policy.
pub struct PostgresStoreBuilder {
    url: String,
    schema: String,
    pool_size: u32,
    connect_timeout: Duration,
    clock: Arc<dyn Clock>,
    policy: RetryPolicy,
    create: bool,
    read_only: bool,
}

impl fmt::Debug for PostgresStoreBuilder {
    /// The connection string as [`PostgresTarget`] shows it: never its
    /// password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let target = PostgresTarget::parse(&self.url).map_or_else(
            |_| "(a connection string that cannot be read)".into(),
            |t| t.to_string(),
        );
        f.debug_struct("PostgresStoreBuilder")
            .field("target", &target)
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("policy", &self.policy)
            .field("create", &self.create)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl PostgresStoreBuilder {
    /// Whether to create the outbox's objects when the schema holds none.
    /// Default: true. With false, a schema without an outbox (a mistyped
    /// name, say) is a `NotAnOutbox` error, and nothing is created.
    pub fn create(mut self, create: bool) -> Self {
        self.create = create;
        self
    }

    /// Open without changing anything: no DDL (a missing or older outbox
    /// is an error, not created or migrated), and every connection's
    /// transactions are read-only (`default_transaction_read_only`), so
    /// the server refuses any write. Default: false.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// The schema that holds the outbox's objects (created if missing):
    /// lowercase ASCII letters, digits and `_`, starting with a letter or
    /// `_`, at most 40 characters. Default: `outbox`.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Connections in the pool. Default: 8.
    pub fn pool_size(mut self, size: u32) -> Self {
        self.pool_size = size;
        self
    }

    /// The longest to wait for a connection, from the pool or the server.
    /// Default: 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The clock that times are taken from. Default: the system clock.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The retry policy for failed attempts.
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Connects, and creates the outbox's objects in the schema if they are
    /// missing (in one transaction, under an advisory lock, so processes
    /// that start together create them once).
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a URL or schema name that cannot be used;
    /// `Postgres` when the server cannot be reached or refuses; `SchemaTooNew`
    /// when the schema holds an outbox written by a newer build;
    /// `NotAnOutbox` when it holds an `outbox_events` table that is not one.
    pub fn build(self) -> Result<PostgresStore> {
        migrate::check_schema_name(&self.schema)?;
        let mut target = PostgresTarget::parse(&self.url)?;
        if target.config().get_connect_timeout().is_none() {
            target.config_mut().connect_timeout(self.connect_timeout);
        }
        if self.read_only {
            let options = match target.config().get_options() {
                Some(o) if !o.trim().is_empty() => {
                    format!("{o} -c default_transaction_read_only=on")
                }
                _ => "-c default_transaction_read_only=on".to_owned(),
            };
            target.config_mut().options(&options);
        }
        let mode = match (self.read_only, self.create) {
            (true, _) => migrate::Mode::ReadOnly,
            (false, true) => migrate::Mode::Create,
            (false, false) => migrate::Mode::Existing,
        };
        let target = Arc::new(target);
        let manager = conn::Manager {
            target: Arc::clone(&target),
        };
        let pool = r2d2::Pool::builder()
            .max_size(self.pool_size.max(1))
            .min_idle(Some(0))
            // A dropped connection fails its next statement (which the
            // caller retries) and is then discarded: no test query per
            // checkout.
            .test_on_check_out(false)
            .connection_timeout(self.connect_timeout)
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build_unchecked(manager);
        // The first connection is made directly: a server that is not
        // there is reported at once, with its cause, not after the pool's
        // timeout.
        let mut client = target.connect()?;
        migrate::migrate(&mut client, &self.schema, mode)?;
        drop(client);
        let notifier = Arc::new(Notifier::default());
        let listener = listen::Listener::new(Arc::clone(&target), &self.schema, notifier.clone());
        Ok(PostgresStore {
            inner: Arc::new(Inner {
                pool,
                sql: Sql::new(&self.schema),
                schema: self.schema,
                target,
                clock: self.clock,
                policy: self.policy,
                notifier,
                listener,
            }),
        })
    }
}

fn pool_error(err: &r2d2::Error) -> Error {
    Error::with_source(ErrorKind::Pool, err.to_string())
}

impl PostgresStore {
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

    /// A builder for a store at `url`.
    pub fn builder(url: &str) -> PostgresStoreBuilder {
        PostgresStoreBuilder {
            url: url.to_owned(),
            schema: DEFAULT_POSTGRES_SCHEMA.to_owned(),
            pool_size: 8,
            connect_timeout: Duration::from_secs(10),
            clock: Arc::new(SystemClock),
            policy: RetryPolicy::default(),
            create: true,
            read_only: false,
        }
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

    /// Adds an event through the caller's client or transaction: inside a
    /// `postgres::Transaction` it commits or rolls back with the app's own
    /// writes. Dispatchers anywhere are woken when it commits.
    ///
    /// # Errors
    ///
    /// `InvalidInput` before anything is written for an invalid event;
    /// database errors from the insert (which leave the caller's
    /// transaction aborted, as any failed statement does).
    pub fn enqueue_tx(&self, client: &mut impl GenericClient, event: NewEvent) -> Result<Event> {
        let mut stored = self.enqueue_batch_tx(client, vec![event])?;
        stored
            .pop()
            .ok_or_else(|| Error::invalid("nothing was enqueued"))
    }

    /// Adds many events through the caller's client or transaction.
    /// Inside a transaction they join it; on a bare client they get one of
    /// their own, all or none.
    ///
    /// # Errors
    ///
    /// As [`PostgresStore::enqueue_tx`]; one invalid event rejects them all.
    pub fn enqueue_batch_tx(
        &self,
        client: &mut impl GenericClient,
        events: Vec<NewEvent>,
    ) -> Result<Vec<Event>> {
        let mut run = |sql: &str, p: &[(&(dyn postgres::types::ToSql + Sync), Type)]| {
            client.query_typed(sql, p)
        };
        self.enqueue_with(&mut run, events)
    }

    /// Checks `events`, then inserts them through `run` in one statement
    /// (all or none, in order), and wakes dispatchers in this process.
    fn enqueue_with(&self, run: &mut TypedQuery<'_>, events: Vec<NewEvent>) -> Result<Vec<Event>> {
        let payloads = events
            .iter()
            .map(NewEvent::checked_payload)
            .collect::<Result<Vec<_>>>()?;
        let now = self.now();
        let stored = if events.len() == 1 {
            events
                .into_iter()
                .zip(&payloads)
                .map(|(event, payload)| self.insert(run, event, payload, now))
                .collect::<Result<Vec<_>>>()?
        } else {
            self.insert_all(run, events, &payloads, now)?
        };
        self.inner.notifier.notify();
        Ok(stored)
    }

    /// Inserts checked events in one statement (all or none, in order) and
    /// returns them as stored.
    fn insert_all(
        &self,
        run: &mut TypedQuery<'_>,
        events: Vec<NewEvent>,
        payloads: &[String],
        now: DateTime<Utc>,
    ) -> Result<Vec<Event>> {
        let policy = &self.inner.policy;
        let col =
            |f: &dyn Fn(&NewEvent) -> Option<String>| events.iter().map(f).collect::<Vec<_>>();
        let ids: Vec<uuid::Uuid> = events.iter().map(|e| e.id.as_uuid()).collect();
        let types = col(&|e| Some(e.event_type.clone()));
        let max: Vec<i64> = events
            .iter()
            .map(|e| i64::from(e.max_attempts.unwrap_or_else(|| policy.max_attempts())))
            .collect();
        let due: Vec<i64> = events
            .iter()
            .map(|e| clock::to_millis(e.due_at(now)))
            .collect();
        let correlation = col(&|e| e.correlation_id.clone());
        let orgs: Vec<Option<uuid::Uuid>> = events.iter().map(|e| e.org_id).collect();
        let users: Vec<Option<uuid::Uuid>> = events.iter().map(|e| e.user_id).collect();
        let keys = col(&|e| e.ordering_key.clone());
        let idem = col(&|e| e.idempotency_key.clone());
        let traces = col(&|e| e.traceparent.clone());
        let created = clock::to_millis(now);
        let rows = run(
            &self.inner.sql.insert_all,
            &[
                (&ids, Type::UUID_ARRAY),
                (&types, Type::TEXT_ARRAY),
                (&payloads, Type::TEXT_ARRAY),
                (&max, Type::INT8_ARRAY),
                (&due, Type::INT8_ARRAY),
                (&correlation, Type::TEXT_ARRAY),
                (&orgs, Type::UUID_ARRAY),
                (&users, Type::UUID_ARRAY),
                (&keys, Type::TEXT_ARRAY),
                (&idem, Type::TEXT_ARRAY),
                (&created, Type::INT8),
                (&traces, Type::TEXT_ARRAY),
            ],
        )
        .map_err(|e| not_stored(e, "an event"))?;
        let seqs: std::collections::HashMap<uuid::Uuid, i64> =
            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let mut stored = Vec::with_capacity(events.len());
        for event in events {
            if let Some(&seq) = seqs.get(&event.id.as_uuid()) {
                stored.push(event.into_pending(seq, now, policy));
                continue;
            }
            // Its idempotency key is taken (perhaps by an earlier event of
            // this batch): the event that holds it.
            let existing = run(
                &self.inner.sql.select_by_key,
                &[(&event.idempotency_key, Type::TEXT)],
            )?;
            match existing.first() {
                Some(row) => stored.push(decode(row).0),
                None => {
                    return Err(Error::invalid(
                        "idempotency conflict without a stored event",
                    ))
                }
            }
        }
        Ok(stored)
    }

    /// Inserts one checked event through `run` (a typed query: one round
    /// trip, on any client) and returns it as stored.
    fn insert(
        &self,
        run: &mut TypedQuery<'_>,
        event: NewEvent,
        payload: &str,
        now: DateTime<Utc>,
    ) -> Result<Event> {
        let policy = &self.inner.policy;
        let max_attempts = i64::from(event.max_attempts.unwrap_or_else(|| policy.max_attempts()));
        let (id, due, created) = (
            event.id.as_uuid(),
            clock::to_millis(event.due_at(now)),
            clock::to_millis(now),
        );
        let inserted = run(
            &self.inner.sql.insert,
            &[
                (&id, Type::UUID),
                (&event.event_type, Type::TEXT),
                (&payload, Type::TEXT),
                (&max_attempts, Type::INT8),
                (&due, Type::INT8),
                (&event.correlation_id, Type::TEXT),
                (&event.org_id, Type::UUID),
                (&event.user_id, Type::UUID),
                (&event.ordering_key, Type::TEXT),
                (&event.idempotency_key, Type::TEXT),
                (&created, Type::INT8),
                (&event.traceparent, Type::TEXT),
            ],
        );
        let inserted = inserted.map_err(|e| not_stored(e, &format!("event {}", event.id)))?;
        if let Some(row) = inserted.first() {
            return Ok(event.into_pending(row.get(0), now, policy));
        }
        // The idempotency key is taken: return the event that holds it.
        let existing = run(
            &self.inner.sql.select_by_key,
            &[(&event.idempotency_key, Type::TEXT)],
        )?;
        match existing.first() {
            Some(row) => Ok(decode(row).0),
            None => Err(Error::invalid(
                "idempotency conflict without a stored event",
            )),
        }
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

    /// Claims up to `limit` events in `tx`: expired leases on their last
    /// attempt fail, and due events and other expired leases are leased,
    /// in (due time, enqueue order), skipping rows another claimer has
    /// locked.
    fn claim_in(
        &self,
        tx: &mut Tx<'_>,
        limit: usize,
        lease: Duration,
        filter: &TypeFilter<'_>,
    ) -> Result<Vec<Event>> {
        let sql = &self.inner.sql;
        let now = self.now();
        let (now_ms, until_ms) = (
            clock::to_millis(now),
            clock::to_millis(clock::add(now, lease)),
        );
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let (only, skip) = type_lists(filter);
        // One statement: fails the leases that ran out on their last
        // attempt, then leases due events and the other run-out leases.
        let rows = tx.query(
            &sql.claim,
            &[
                &now_ms,
                &until_ms,
                &limit,
                &only,
                &skip,
                &LEASE_EXPIRED_ERROR,
            ],
        )?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in &rows {
            let (event, problem) = decode(row);
            match problem {
                None => claimed.push(event),
                Some(problem) => {
                    let error = format!("the stored row cannot be read: {problem}");
                    tracing::error!(seq = event.seq, error = %error, "outbox event set aside as failed");
                    tx.execute(&sql.set_aside, &[&event.seq, &now_ms, &error])?;
                }
            }
        }
        claimed.sort_by_key(|e| (e.next_attempt_at, e.seq));
        Ok(claimed)
    }

    /// Writes the fenced outcomes in `tx`, one result per ack.
    fn settle_in(&self, tx: &mut Tx<'_>, acks: &[Ack]) -> Result<Vec<Result<()>>> {
        let sql = &self.inner.sql;
        let policy = &self.inner.policy;
        let now = clock::to_millis(self.now());
        let mut results = Vec::with_capacity(acks.len());
        let mut released = false;
        let mut rest = acks;
        while let Some(ack) = rest.first() {
            // A run of completions (the common case) is one statement;
            // runs keep the acks' order, so each result is what it would
            // be one by one.
            let run = rest
                .iter()
                .take_while(|a| matches!(a.kind, AckKind::Complete))
                .count();
            if run > 1 {
                let (done, after) = rest.split_at(run);
                results.extend(self.complete_all(tx, done, now)?);
                rest = after;
                continue;
            }
            rest = &rest[1..];
            let l = &ack.lease;
            let changed = match &ack.kind {
                AckKind::Complete => tx.execute(&sql.ack_done, &[&l.seq, &l.token, &now])?,
                AckKind::Retry { error, delay } => {
                    let wait =
                        delay.unwrap_or_else(|| policy.jittered_delay(l.attempt, l.seq as u64));
                    let next = clock::to_millis(clock::add(clock::from_millis(now), wait));
                    tx.execute(&sql.ack_retry, &[&l.seq, &l.token, &now, error, &next])?
                }
                AckKind::Fail { error } => {
                    tx.execute(&sql.ack_fail, &[&l.seq, &l.token, &now, error])?
                }
                AckKind::Extend { by } => {
                    let until = clock::to_millis(clock::add(clock::from_millis(now), *by));
                    tx.execute(&sql.ack_extend, &[&l.seq, &l.token, &until])?
                }
                AckKind::Release => {
                    released = true;
                    tx.execute(&sql.ack_release, &[&l.seq, &l.token])?
                }
                AckKind::Defer { error, delay } => {
                    let until = clock::to_millis(clock::add(clock::from_millis(now), *delay));
                    tx.execute(&sql.ack_defer, &[&l.seq, &l.token, &until, error])?
                }
            };
            results.push(if changed == 1 {
                Ok(())
            } else {
                Err(Error::lease_lost(l.id, l.attempt))
            });
        }
        if released {
            // Events given back are claimable again: tell dispatchers
            // elsewhere, as an insert does.
            self.notify_others(tx)?;
        }
        Ok(results)
    }

    /// Completes the fenced `acks` in one statement: one result each, a
    /// lease named twice is completed once.
    fn complete_all(&self, tx: &mut Tx<'_>, acks: &[Ack], now: i64) -> Result<Vec<Result<()>>> {
        let seqs: Vec<i64> = acks.iter().map(|a| a.lease.seq).collect();
        let tokens: Vec<i64> = acks.iter().map(|a| a.lease.token).collect();
        let rows = tx.query(&self.inner.sql.ack_done_all, &[&seqs, &tokens, &now])?;
        let mut changed: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
        Ok(acks
            .iter()
            .map(|a| {
                if changed.remove(&a.lease.seq) {
                    Ok(())
                } else {
                    Err(Error::lease_lost(a.lease.id, a.lease.attempt))
                }
            })
            .collect())
    }

    /// Wakes the dispatchers that listen on this schema, when `tx` commits.
    fn notify_others(&self, tx: &mut Tx<'_>) -> Result<()> {
        tx.execute(
            "SELECT pg_notify($1, '')",
            &[&self.inner.listener.channel()],
        )?;
        Ok(())
    }
}

/// The type lists of `filter` as the statements take them (`text[]`, NULL
/// for "all" and for "none skipped").
fn type_lists<'a>(filter: &TypeFilter<'a>) -> (Option<Vec<&'a str>>, Option<Vec<&'a str>>) {
    let list = |t: &'a [String]| t.iter().map(String::as_str).collect();
    (
        filter.only.map(list),
        (!filter.skip.is_empty()).then(|| list(filter.skip)),
    )
}

/// An insert the server refused: invalid input when the data was at fault
/// (`what` names the event), else the error as it is.
fn not_stored(e: postgres::Error, what: &str) -> Error {
    match e.code() {
        Some(c) if is_invalid_data(c) || *c == postgres::error::SqlState::UNIQUE_VIOLATION => {
            Error::with_source(
                ErrorKind::InvalidInput {
                    reason: format!("{what} could not be stored (duplicate id or invalid field)"),
                },
                e,
            )
        }
        _ => Error::from(e),
    }
}

/// Data the server refused as invalid: a check constraint, a NUL byte in
/// text, a value out of range.
fn is_invalid_data(code: &postgres::error::SqlState) -> bool {
    use postgres::error::SqlState as S;
    *code == S::CHECK_VIOLATION || *code == S::NOT_NULL_VIOLATION || code.code().starts_with("22")
}

/// Reads a row selected with `sql::COLUMNS`, with the first problem found:
/// the server has checked types, JSON and statuses, so what is left is a
/// number beyond what an event holds.
fn decode(row: &Row) -> (Event, Option<String>) {
    let mut problem: Option<String> = None;
    // A column that does not read as the schema says (a table altered by
    // hand) is noted and given a fallback, never a panic.
    macro_rules! get {
        ($i:expr, $name:expr, $fallback:expr) => {
            match row.try_get($i) {
                Ok(v) => v,
                Err(_) => {
                    problem.get_or_insert_with(|| format!("column {} cannot be read", $name));
                    $fallback
                }
            }
        };
    }
    let payload_text: String = get!(3, "payload", String::new());
    let payload = match Payload::from_stored(payload_text.as_bytes()) {
        Some(p) => p,
        None => {
            problem.get_or_insert_with(|| "column payload is not valid JSON".into());
            Payload::from(serde_json::Value::String(payload_text))
        }
    };
    let status: String = get!(4, "status", String::new());
    let status = status.parse().unwrap_or_else(|_| {
        problem.get_or_insert_with(|| "column status is not a known status".into());
        Status::Pending
    });
    let mut count = |i, name: &str, fallback: u32| {
        let n: i64 = get!(i, name, i64::from(fallback));
        u32::try_from(n).unwrap_or_else(|_| {
            problem.get_or_insert_with(|| format!("column {name} is out of range"));
            fallback
        })
    };
    let (attempts, max_attempts) = (count(5, "attempts", 0), count(6, "max_attempts", 1));
    let mut time = |i, name: &str| get!(i, name, None::<i64>).map(clock::from_millis);
    let (locked_at, locked_until) = (time(8, "locked_at"), time(9, "locked_until"));
    let (completed_at, delivered_at) = (time(11, "completed_at"), time(12, "delivered_at"));
    let event = Event {
        seq: get!(0, "seq", 0),
        id: EventId::from(get!(1, "id", uuid::Uuid::nil())),
        event_type: get!(2, "event_type", String::new()),
        payload,
        status,
        attempts,
        max_attempts,
        next_attempt_at: clock::from_millis(get!(7, "next_attempt_at", 0)),
        locked_at,
        locked_until,
        lease_token: get!(10, "lease_token", None),
        completed_at,
        delivered_at,
        last_error: get!(13, "last_error", None),
        correlation_id: get!(14, "correlation_id", None),
        org_id: get!(15, "org_id", None),
        user_id: get!(16, "user_id", None),
        ordering_key: get!(17, "ordering_key", None),
        idempotency_key: get!(18, "idempotency_key", None),
        created_at: clock::from_millis(get!(19, "created_at", 0)),
        // A hint only: a malformed one reads as none, and is never sent on.
        traceparent: row
            .try_get::<_, Option<String>>(20)
            .ok()
            .flatten()
            .filter(|t| crate::trace::is_valid_traceparent(t)),
    };
    (event, problem)
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
            let values: Vec<&(dyn postgres::types::ToSql + Sync)> =
                p.iter().map(|(v, _)| *v).collect();
            session.query_pg(sql, &values)
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
