//! Enqueueing through the caller's connection and transaction, and the
//! checks that keep it inside the caller's transaction on the right file.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use super::sql::{INSERT_SQL, SELECT_BY_KEY_SQL};
use super::SqliteStore;
use crate::clock;
use crate::error::{Error, ErrorKind, Result};
use crate::event::{Event, NewEvent};
use crate::retry::RetryPolicy;
use crate::store::row::row_to_event;
impl SqliteStore {
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
    /// `enqueue_tx` refuses a transaction that has read but not yet written,
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
    pub fn enqueue_tx(&self, conn: &Connection, event: NewEvent) -> Result<Event> {
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
    /// As [`SqliteStore::enqueue_tx`]; one invalid event rejects them all.
    pub fn enqueue_batch_tx(&self, conn: &Connection, events: Vec<NewEvent>) -> Result<Vec<Event>> {
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
    /// as this crate's. Enqueue with `store.enqueue_tx(tx, ...)`; any other
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
        // In turn with the dispatcher's claims and outcomes: see `gate`.
        self.check_not_inside_transaction()?;
        let _turn = self.gate()?;
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
    pub(super) fn check_not_inside_transaction(&self) -> Result<()> {
        if InTransaction::is_inside(self.key()) {
            return Err(Error::invalid(
                "a store write was called inside SqliteStore::transaction, whose own \
                 transaction holds the write lock; inside the closure use \
                 store.enqueue_tx(tx, ...) or store.enqueue_batch_tx(tx, ...), and call other \
                 store methods after it",
            ));
        }
        Ok(())
    }

    /// Refuses a caller's connection that would write elsewhere or fail
    /// under load: see [`SqliteStore::enqueue_tx`].
    fn check_callers_connection(&self, conn: &Connection) -> Result<()> {
        // SQLite's own name for each file: absolute, through symbolic
        // links. Only the same name means the same `-wal` file too; a hard
        // link to the database would have a WAL of its own, so it counts
        // as another file.
        let theirs = conn.path().unwrap_or_default();
        if theirs != self.inner.db_path {
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

/// Checks every event, then inserts them in order, all on `conn`: nothing
/// is written if any is invalid.
pub(super) fn insert_all(
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
        .zip(payloads)
        .map(|(e, p)| insert_event(conn, e, p, now, policy))
        .collect()
}

/// Inserts one checked event and returns it as stored. The row is built
/// from what was inserted rather than read back, so the payload is not
/// parsed again.
fn insert_event(
    conn: &Connection,
    event: NewEvent,
    payload: String,
    now: DateTime<Utc>,
    policy: &RetryPolicy,
) -> Result<Event> {
    let inserted = conn
        .prepare_cached(INSERT_SQL)?
        .execute(params![
            event.id.to_string(),
            event.event_type,
            &payload,
            i64::from(event.max_attempts.unwrap_or_else(|| policy.max_attempts())),
            clock::to_millis(event.due_at(now)),
            event.correlation_id,
            event.org_id.map(|u| u.to_string()),
            event.user_id.map(|u| u.to_string()),
            event.ordering_key,
            event.idempotency_key,
            clock::to_millis(now),
            event.traceparent,
            event.priority,
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
        return Ok(event.into_stored(conn.last_insert_rowid(), now, policy, payload));
    }
    // The idempotency key is taken: return the event that holds it.
    let existing = conn
        .prepare_cached(&SELECT_BY_KEY_SQL)?
        .query_row([&event.idempotency_key], row_to_event)
        .optional()?;
    existing.ok_or_else(|| Error::invalid("idempotency conflict without a stored event"))
}
