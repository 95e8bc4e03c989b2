//! An app that publishes its events with the ready-made sinks, in its own
//! dispatcher: notes go to a sync server over HTTP in batches of up to 50
//! (one request for many events), orders go to NATS JetStream when a
//! server is given, deduplicated there by event id.
//!
//! ```text
//! cargo run --example sinks --features http,nats
//! NATS_URL=nats://127.0.0.1:4222 cargo run --example sinks --features http,nats
//! ```
//!
//! With `NATS_URL`, a stream must take the subjects `orders.>`:
//! `nats stream add ORDERS --subjects 'orders.>' --defaults`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use sqlite_outbox::sink::{HttpSink, NatsJetStream};
use sqlite_outbox::{Dispatcher, NewEvent, SqliteStore};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let server = SyncServer::start()?;
    let nats = std::env::var("NATS_URL").ok();
    let summary = run(
        &dir.path().join("app.db"),
        &server.url,
        nats.as_deref(),
        500,
    )?;
    let requests = server.requests();
    println!(
        "{} notes reached the sync server in {} requests ({} at most in one); {} of {} events delivered",
        requests.iter().sum::<usize>(),
        requests.len(),
        requests.iter().max().unwrap_or(&0),
        summary.delivered,
        500 + summary.orders,
    );
    Ok(())
}

/// What one run did.
#[derive(Debug)]
pub struct Summary {
    /// Events the dispatcher delivered.
    pub delivered: u64,
    /// Order events enqueued for JetStream (none without a NATS server).
    pub orders: u64,
}

/// Saves `notes` notes (and an order for every tenth) while the app works,
/// each with its event in the same transaction, then lets one dispatcher
/// deliver them: notes to `sync_url` in batches, orders to NATS when
/// `nats_url` is given.
pub fn run(
    path: &std::path::Path,
    sync_url: &str,
    nats_url: Option<&str>,
    notes: u64,
) -> Result<Summary, Box<dyn std::error::Error>> {
    let store = SqliteStore::open(path)?;
    store.transaction(|tx| {
        tx.execute_batch("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, body TEXT)")?;
        Ok(())
    })?;
    let mut orders = 0;
    for i in 0..notes {
        store.transaction(|tx| {
            tx.execute(
                "INSERT INTO notes (id, body) VALUES (?1, ?2)",
                (i as i64, format!("note {i}")),
            )?;
            store.enqueue_tx(tx, NewEvent::new("note.saved", json!({ "note": i })))?;
            if nats_url.is_some() && i % 10 == 0 {
                store.enqueue_tx(
                    tx,
                    NewEvent::new("order.placed", json!({ "order": i }))
                        .with_ordering_key(format!("customer-{}", i % 3)),
                )?;
            }
            Ok(())
        })?;
        if nats_url.is_some() && i % 10 == 0 {
            orders += 1;
        }
    }
    let sync = HttpSink::builder(sync_url)?.batch(50).build()?;
    let mut dispatcher = Dispatcher::builder(store.clone()).handle_with("note.saved", sync);
    if let Some(url) = nats_url {
        let nats = NatsJetStream::builder(url)
            .subject("orders.{type}")
            .connect()?;
        dispatcher = dispatcher.handle_with("order.placed", nats);
    }
    let report = dispatcher.start()?.drain(Duration::from_secs(60));
    Ok(Summary {
        delivered: report.metrics.done,
        orders,
    })
}

/// A sync server on a free local port that accepts arrays of notes and
/// counts the notes in each request.
pub struct SyncServer {
    /// Where it listens.
    pub url: String,
    counts: Arc<Mutex<Vec<usize>>>,
    server: Arc<tiny_http::Server>,
}

impl SyncServer {
    /// Starts it on a thread of its own.
    pub fn start() -> Result<SyncServer, Box<dyn std::error::Error>> {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").map_err(|e| e.to_string())?);
        let port = server
            .server_addr()
            .to_ip()
            .map(|a| a.port())
            .ok_or("no port")?;
        let counts: Arc<Mutex<Vec<usize>>> = Arc::default();
        let (s, c) = (Arc::clone(&server), Arc::clone(&counts));
        std::thread::spawn(move || {
            while let Ok(mut req) = s.recv() {
                let notes: Result<Vec<serde_json::Value>, _> =
                    serde_json::from_reader(req.as_reader());
                let code = match notes {
                    Ok(notes) => {
                        c.lock().map(|mut c| c.push(notes.len())).ok();
                        204
                    }
                    Err(_) => 400,
                };
                let _ = req.respond(tiny_http::Response::empty(code));
            }
        });
        Ok(SyncServer {
            url: format!("http://127.0.0.1:{port}/sync"),
            counts,
            server,
        })
    }

    /// The number of notes in each request received.
    pub fn requests(&self) -> Vec<usize> {
        self.counts.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl std::fmt::Debug for SyncServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncServer")
            .field("url", &self.url)
            .finish()
    }
}

impl Drop for SyncServer {
    fn drop(&mut self) {
        self.server.unblock();
    }
}
