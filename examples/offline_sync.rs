//! An offline-first app queues sync events while the network is down; when
//! it comes back, each document's changes are pushed in the order they were
//! made.
//!
//! ```text
//! cargo run --example offline_sync
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use sqlite_outbox::{
    Dispatcher, Event, HandlerError, NewEvent, Operator, RetryPolicy, SqliteStore,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let pushed = run(&dir.path().join("notes.db"), 5, 20)?;
    for (doc, revisions) in &pushed {
        println!("{doc}: pushed revisions {revisions:?}");
    }
    Ok(())
}

/// Edits `docs` documents `edits` times each while offline, then goes
/// online and returns, per document, the revisions in the order the server
/// received them.
pub fn run(
    path: &std::path::Path,
    docs: usize,
    edits: usize,
) -> Result<BTreeMap<String, Vec<u64>>, Box<dyn std::error::Error>> {
    // Retry quickly while offline; never give up on a sync event.
    let policy = RetryPolicy::constant(Duration::from_millis(20)).with_max_attempts(u32::MAX);
    let store = SqliteStore::builder(path).retry_policy(policy).build()?;
    store.transaction(|tx| {
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS notes (doc TEXT PRIMARY KEY, body TEXT, rev INTEGER)",
        )?;
        Ok(())
    })?;

    let online = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicU64::new(0));
    let server: Arc<Mutex<BTreeMap<String, Vec<u64>>>> = Arc::default();
    let (on, refused_count, srv) = (online.clone(), refused.clone(), server.clone());
    let dispatcher = Dispatcher::builder(store.clone())
        .workers(4)
        .handle("note.changed", move |event: &Event| {
            if !on.load(Ordering::SeqCst) {
                refused_count.fetch_add(1, Ordering::Relaxed);
                return Err(HandlerError::retry("offline: no route to server"));
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
    std::thread::sleep(Duration::from_millis(150));
    println!(
        "offline: {} pending, {} push attempts refused",
        store.stats()?.pending,
        refused.load(Ordering::Relaxed)
    );

    online.store(true, Ordering::SeqCst);
    let started = Instant::now();
    while store.stats()?.done < (docs * edits) as u64 {
        if started.elapsed() > Duration::from_secs(60) {
            return Err("sync did not drain within 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "online: drained {} events in {:.2?}",
        docs * edits,
        started.elapsed()
    );
    let report = dispatcher.shutdown(Duration::from_secs(5));
    if !report.is_clean() {
        return Err(format!("unclean shutdown: {report:?}").into());
    }
    let pushed = server.lock().map_err(|_| "server state poisoned")?.clone();
    Ok(pushed)
}
