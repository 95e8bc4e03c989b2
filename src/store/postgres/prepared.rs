//! Enqueueing through one of the app's own connections with statements
//! prepared on it once: each enqueue is then one round trip that the
//! server neither parses nor plans again.

use std::collections::HashMap;
use std::sync::Mutex;

use postgres::types::{ToSql, Type};
use postgres::{GenericClient, Statement};

use super::PostgresStore;
use crate::error::Result;
use crate::event::{Event, NewEvent};

/// The outbox's insert statements, prepared on one of the app's
/// connections (from [`PostgresStore::prepared`]). Keep it beside that
/// connection and enqueue through it inside the app's transactions:
///
/// ```no_run
/// use serde_json::json;
/// use sqlite_outbox::postgres::{Client, NoTls};
/// use sqlite_outbox::{NewEvent, PostgresStore};
///
/// let url = "postgres://app@localhost/app";
/// let store = PostgresStore::open(url)?;
/// let mut client = Client::connect(url, NoTls)?;
/// let outbox = store.prepared();
/// for n in 0..3 {
///     let mut tx = client.transaction()?;
///     tx.execute("INSERT INTO notes (n) VALUES ($1)", &[&n])?;
///     outbox.enqueue_tx(&mut tx, NewEvent::new("note.created", json!({ "n": n })))?;
///     tx.commit()?;
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// Statements belong to the connection they were prepared on: use one
/// `PreparedEnqueue` per connection, and a new one after reconnecting.
/// Used on another connection, an enqueue fails (the server knows no such
/// statement, SQLSTATE 26000) and writes nothing.
pub struct PreparedEnqueue {
    store: PostgresStore,
    statements: Mutex<HashMap<String, Statement>>,
}

impl std::fmt::Debug for PreparedEnqueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedEnqueue")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// A handle that enqueues through one of the app's connections with
    /// statements prepared on it at first use: see [`PreparedEnqueue`].
    pub fn prepared(&self) -> PreparedEnqueue {
        PreparedEnqueue {
            store: self.clone(),
            statements: Mutex::new(HashMap::new()),
        }
    }
}

impl PreparedEnqueue {
    /// [`PostgresStore::enqueue_tx`] through statements prepared on
    /// `client`'s connection.
    ///
    /// # Errors
    ///
    /// As [`PostgresStore::enqueue_tx`]; also a server error when `client`
    /// is another connection than the one this handle first ran on.
    pub fn enqueue_tx(&self, client: &mut impl GenericClient, event: NewEvent) -> Result<Event> {
        let mut stored = self.enqueue_batch_tx(client, vec![event])?;
        stored
            .pop()
            .ok_or_else(|| crate::Error::invalid("nothing was enqueued"))
    }

    /// [`PostgresStore::enqueue_batch_tx`] through statements prepared on
    /// `client`'s connection.
    ///
    /// # Errors
    ///
    /// As [`PreparedEnqueue::enqueue_tx`].
    pub fn enqueue_batch_tx(
        &self,
        client: &mut impl GenericClient,
        events: Vec<NewEvent>,
    ) -> Result<Vec<Event>> {
        let mut statements = self
            .statements
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut run = |sql: &str, p: &[(&(dyn ToSql + Sync), Type)]| {
            let statement = match statements.get(sql) {
                Some(s) => s.clone(),
                None => {
                    let types: Vec<Type> = p.iter().map(|(_, t)| t.clone()).collect();
                    let s = client.prepare_typed(sql, &types)?;
                    statements.insert(sql.to_owned(), s.clone());
                    s
                }
            };
            client.query(&statement, &super::untyped(p))
        };
        self.store.enqueue_with(&mut run, events)
    }
}
