//! An offline-first app queues sync events while the network is down; when
//! it comes back, each document's changes are pushed in the order they were
//! made.
//!
//! The default retry policy, no busy loop: while the server cannot be
//! reached the handler says so (`HandlerError::unavailable`), the event goes
//! back without spending an attempt, and the dispatcher only probes the
//! server now and then. When the app learns that the network is back (an OS
//! connectivity callback, here a flag) it says `set_online(true)` and
//! everything flows at once.
//!
//! ```text
//! cargo run --example offline_sync
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use sqlite_outbox::{Dispatcher, Event, HandlerError, NewEvent, Operator, SqliteStore};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let pushed = run(&dir.path().join("notes.db"), 5, 20)?;
    for (doc, revisions) in &pushed {
        println!("{doc}: pushed revisions {revisions:?}");
    }
    Ok(())
}

/// What the sync server received, per document, in order.
type Server = Arc<Mutex<BTreeMap<String, Vec<u64>>>>;

/// Edits `docs` documents `edits` times each while offline, then goes
/// online and returns, per document, the revisions in the order the server
/// received them.
pub fn run(
    path: &std::path::Path,
    docs: usize,
    edits: usize,
) -> Result<BTreeMap<String, Vec<u64>>, Box<dyn std::error::Error>> {
    let store = SqliteStore::open(path)?;
    store.transaction(|tx| {
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS notes (doc TEXT PRIMARY KEY, body TEXT, rev INTEGER)",
        )?;
        Ok(())
    })?;

    let network_up = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let server: Server = Arc::default();
    let (up, call_count, srv) = (network_up.clone(), calls.clone(), server.clone());
    let dispatcher = Dispatcher::builder(store.clone())
        .workers(4)
        .handle("note.changed", move |event: &Event| {
            call_count.fetch_add(1, Ordering::Relaxed);
            if !up.load(Ordering::SeqCst) {
                // Not the event's fault: no attempt is spent.
                return Err(HandlerError::unavailable("no route to the sync server"));
            }
            let doc = event.payload["doc"].as_str().unwrap_or_default().to_owned();
            let rev = event.payload["rev"].as_u64().unwrap_or(0);
            srv.lock()
                .map_err(|_| HandlerError::retry("server state poisoned"))?
                .entry(doc)
                .or_default()
                .push(rev);
            Ok(())
        })
        .start()?;

    // The user edits while offline; every edit and its sync event commit
    // together, keyed by document so that each document syncs in order.
    for rev in 1..=edits as u64 {
        for d in 0..docs {
            let doc = format!("doc-{d}");
            store.transaction(|tx| {
                tx.execute(
                    "INSERT INTO notes (doc, body, rev) VALUES (?1, ?2, ?3)
                     ON CONFLICT (doc) DO UPDATE SET body = excluded.body, rev = excluded.rev",
                    (&doc, format!("text at revision {rev}"), rev as i64),
                )?;
                store.enqueue_tx(
                    tx,
                    NewEvent::new("note.changed", json!({"doc": doc, "rev": rev}))
                        .with_ordering_key(&doc),
                )?;
                Ok(())
            })?;
        }
    }
    // Let the dispatcher find out that the server is down.
    let started = Instant::now();
    while dispatcher.destinations().is_empty() || store.stats()?.processing > 0 {
        if started.elapsed() > Duration::from_secs(30) {
            return Err("the dispatcher never noticed the network was down".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let down = &dispatcher.destinations()[0];
    println!(
        "offline: {} pending, {} handler calls, {} attempts spent; {} held back: {}",
        store.stats()?.pending,
        calls.load(Ordering::Relaxed),
        dispatcher.metrics().retried,
        down.name,
        down.last_error.as_deref().unwrap_or("")
    );

    // The OS says the network is back.
    network_up.store(true, Ordering::SeqCst);
    dispatcher.set_online(true);
    let started = Instant::now();
    let report = dispatcher.drain(Duration::from_secs(60));
    if !report.idle || !report.is_clean() || report.metrics.failed > 0 {
        return Err(format!("sync did not finish: {report:?}").into());
    }
    println!(
        "online: delivered {} events in {:.2?}, {} handler calls in all",
        store.stats()?.done,
        started.elapsed(),
        calls.load(Ordering::Relaxed)
    );
    let pushed = server.lock().map_err(|_| "server state poisoned")?.clone();
    Ok(pushed)
}
