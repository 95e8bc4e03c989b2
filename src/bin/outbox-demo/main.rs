//! The demo: an app writes orders and their events in one transaction, and
//! a dispatcher delivers the events with retries.
//!
//! ```text
//! cargo run --features demo --bin outbox-demo            # uses ./outbox-demo.db
//! cargo run --features demo --bin outbox-demo -- PATH N  # another file, N orders
//! ```
//!
//! A binary rather than an example, so that the first run builds only the
//! library's own dependencies (an example builds every dev-dependency);
//! behind the `demo` feature, so that `cargo install` leaves it out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sqlite_outbox::{
    Dispatcher, Event, HandlerError, NewEvent, Operator, RetryPolicy, SqliteStore,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "outbox-demo.db".to_owned());
    let orders: u64 = match args.next() {
        Some(n) => n.parse().map_err(|e| format!("N must be a number: {e}"))?,
        None => 2_000,
    };
    run(&path, orders).map(|_| ())
}

/// What a run did, for the test that runs this example.
#[derive(Debug)]
pub struct Summary {
    /// Events done in this run.
    pub done: u64,
    /// Events given up on in this run.
    pub failed: u64,
    /// Failed attempts that were retried.
    pub retried: u64,
}

/// Writes `orders` orders with their events to `path` and delivers them.
pub fn run(path: &str, orders: u64) -> Result<Summary, Box<dyn std::error::Error>> {
    // Short retry delays so that retries show within the demo.
    let policy = RetryPolicy::from_schedule([
        Duration::from_millis(50),
        Duration::from_millis(100),
        Duration::from_millis(200),
    ])
    .with_max_attempts(4);
    let store = SqliteStore::builder(path).retry_policy(policy).build()?;
    println!("outbox: {path}");

    store.transaction(|tx| {
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS orders (
                 id INTEGER PRIMARY KEY, customer TEXT NOT NULL, total_cents INTEGER NOT NULL)",
        )?;
        Ok(())
    })?;

    // The dispatcher starts first, so events flow while orders are written.
    let receipts_sent = Arc::new(AtomicU64::new(0));
    let sent = receipts_sent.clone();
    let dispatcher = Dispatcher::builder(store.clone())
        .workers(4)
        .handle("order.placed", |_event: &Event| Ok(()))
        .handle("email.receipt", move |event: &Event| {
            let order = event.payload["order_id"].as_i64().unwrap_or(0);
            // The mail server refuses some first attempts, and one address
            // in 500 does not exist.
            if order % 500 == 499 {
                return Err(HandlerError::permanent("mailbox does not exist"));
            }
            if order % 7 == 0 && event.attempts == 1 {
                return Err(HandlerError::retry("mail server busy, try again"));
            }
            sent.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .start()?;

    let started = Instant::now();
    let batch = 10;
    let mut written = 0;
    while written < orders {
        // One transaction: the app's rows and their events commit together.
        store.transaction(|tx| {
            for _ in 0..batch.min(orders - written) {
                let customer = format!("customer-{}", written % 97);
                tx.execute(
                    "INSERT INTO orders (customer, total_cents) VALUES (?1, ?2)",
                    (&customer, 1_000 + (written % 50) as i64),
                )?;
                let order_id = tx.last_insert_rowid();
                store.enqueue_tx(
                    tx,
                    NewEvent::new("order.placed", json!({"order_id": order_id})),
                )?;
                store.enqueue_tx(
                    tx,
                    NewEvent::new(
                        "email.receipt",
                        json!({"order_id": order_id, "to": customer}),
                    )
                    .with_ordering_key(customer.clone()),
                )?;
                written += 1;
            }
            Ok(())
        })?;
    }
    println!(
        "wrote {written} orders and {} events in {:.2?}",
        written * 2,
        started.elapsed()
    );

    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last_print = Instant::now();
    loop {
        let stats = store.stats()?;
        if stats.pending == 0 && stats.processing == 0 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("events still open after 120 s: {stats:?}").into());
        }
        if last_print.elapsed() >= Duration::from_millis(500) {
            let m = dispatcher.metrics();
            println!(
                "  progress: done {:>6}  retried {:>4}  failed {:>3}  pending {:>6}",
                m.done, m.retried, m.failed, stats.pending
            );
            last_print = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed();
    let report = dispatcher.shutdown(Duration::from_secs(5));
    let m = report.metrics;
    let stats = store.stats()?;
    println!("summary (this run):");
    println!("  done      {:>7}", m.done);
    println!(
        "  retried   {:>7}  (attempts that failed and were retried)",
        m.retried
    );
    println!("  failed    {:>7}  (given up on)", m.failed);
    println!("  receipts  {:>7}", receipts_sent.load(Ordering::Relaxed));
    println!(
        "  claim txs {:>7}  outcome txs {}",
        m.claim_batches, m.settle_batches
    );
    println!(
        "  rate      {:>7.0} events/s over {:.2?}",
        (m.done + m.failed) as f64 / elapsed.as_secs_f64(),
        elapsed
    );
    println!(
        "file totals: {} done, {} failed, {} pending",
        stats.done, stats.failed, stats.pending
    );
    if !report.is_clean() {
        return Err(format!("unclean shutdown: {report:?}").into());
    }
    Ok(Summary {
        done: m.done,
        failed: m.failed,
        retried: m.retried,
    })
}
