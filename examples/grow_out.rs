//! One program, two databases: the same orders, events and dispatcher on a
//! SQLite file or on a PostgreSQL server, chosen by the URL it is given.
//! Only the app's own transaction differs (a `rusqlite` one or a
//! `postgres` one); the dispatcher, the handlers and the operator's calls
//! do not.
//!
//! ```text
//! cargo run --features postgres --example grow_out -- orders.db
//! cargo run --features postgres --example grow_out -- postgres://app@localhost/app
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sqlite_outbox::postgres::Client;
use sqlite_outbox::{Dispatcher, Event, NewEvent, Operator, PostgresStore, SqliteStore, Store};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "outbox-grow.db".to_owned());
    let done = run(&url, 500)?;
    println!("{done} events done");
    Ok(())
}

/// Where the app keeps its orders and the outbox its events.
enum Db {
    Sqlite(SqliteStore),
    Postgres(PostgresStore, Box<Client>),
}

/// A PostgreSQL connection string (`postgres://…`, `postgresql://…` or
/// libpq's `host=… dbname=…`), else a path to a SQLite file.
fn is_postgres(url: &str) -> bool {
    sqlite_outbox::PostgresTarget::looks_like(url)
}

fn open(url: &str, schema: &str) -> Result<Db, Box<dyn std::error::Error>> {
    if is_postgres(url) {
        let store = PostgresStore::builder(url).schema(schema).build()?;
        // The app's own connection, made as the store makes its own (TLS
        // as the connection string's sslmode says).
        let mut app = store.connect()?;
        app.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {schema}_orders (id bigint PRIMARY KEY, total_cents bigint NOT NULL)"
        ))?;
        Ok(Db::Postgres(store, Box::new(app)))
    } else {
        let store = SqliteStore::open(url)?;
        store.transaction(|tx| {
            tx.execute_batch(&format!(
                "CREATE TABLE IF NOT EXISTS {schema}_orders (id INTEGER PRIMARY KEY, total_cents INTEGER NOT NULL)"
            ))?;
            Ok(())
        })?;
        Ok(Db::Sqlite(store))
    }
}

impl Db {
    /// The app's write and its event, in one transaction of the app's
    /// database: the one place where the two differ.
    fn place_order(&mut self, schema: &str, id: i64) -> Result<(), Box<dyn std::error::Error>> {
        let event = NewEvent::new("order.placed", json!({"order_id": id}));
        let insert = format!("INSERT INTO {schema}_orders (id, total_cents) VALUES ");
        match self {
            Db::Sqlite(store) => store.transaction(|tx| {
                tx.execute(&format!("{insert} (?1, ?2)"), (id, 100 * id))?;
                store.enqueue_tx(tx, event)?;
                Ok(())
            })?,
            Db::Postgres(store, app) => {
                let mut tx = app.transaction()?;
                tx.execute(&format!("{insert} ($1, $2)"), &[&id, &(100 * id)])?;
                store.enqueue_tx(&mut tx, event)?;
                tx.commit()?;
            }
        }
        Ok(())
    }

    /// The store, as everything else takes it.
    fn store(&self) -> Arc<dyn Operator> {
        match self {
            Db::Sqlite(s) => Arc::new(s.clone()),
            Db::Postgres(s, _) => Arc::new(s.clone()),
        }
    }
}

/// Places `orders` orders at `url` and delivers their events; returns how
/// many are done.
pub fn run(url: &str, orders: i64) -> Result<u64, Box<dyn std::error::Error>> {
    run_in(url, "grow", orders)
}

/// As [`run`], with the outbox (on PostgreSQL) and the orders table named
/// after `schema`.
pub fn run_in(url: &str, schema: &str, orders: i64) -> Result<u64, Box<dyn std::error::Error>> {
    let mut db = open(url, schema)?;
    let store = db.store();
    // From here on nothing knows which database it is.
    let dispatcher = Dispatcher::builder(store.clone() as Arc<dyn Store>)
        .workers(4)
        .handle("order.placed", |e: &Event| {
            let _order = e.payload["order_id"].as_i64();
            Ok(())
        })
        .start()?;
    let first = store.stats()?.done;
    for id in 0..orders {
        db.place_order(schema, first as i64 + id)?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.stats()?.done < first + orders as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let report = dispatcher.shutdown(Duration::from_secs(10));
    if !report.is_clean() {
        return Err(format!("unclean shutdown: {report:?}").into());
    }
    Ok(store.stats()?.done - first)
}
