//! An outbox with an hour of history, to look at with the dashboard:
//! deliveries every minute, a webhook that went down for a while, a few
//! events given up on, some in flight and a backlog nobody is working on.
//!
//! ```text
//! cargo run --example dashboard -- PATH          # writes PATH (default ./dashboard-demo.db)
//! cargo run --features cli --bin outbox -- --db PATH ui
//! ```

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sqlite_outbox::chrono;
use sqlite_outbox::{Ack, ManualClock, NewEvent, SqliteStore, Store};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "dashboard-demo.db".to_owned());
    let made = run(std::path::Path::new(&path))?;
    println!("{path}: {made} events; now run `outbox --db {path} ui`");
    Ok(())
}

const LEASE: Duration = Duration::from_secs(60);

/// Writes the history into a new outbox at `path`; returns how many events.
pub fn run(path: &std::path::Path) -> Result<u64, Box<dyn std::error::Error>> {
    // An hour of events, written on a clock that starts an hour ago.
    let clock = ManualClock::at(chrono::Utc::now() - chrono::Duration::minutes(62));
    let store = SqliteStore::builder(path)
        .clock(Arc::new(clock.clone()))
        .build()?;
    let mut made = 0;
    for minute in 0..60u64 {
        // A webhook endpoint that answered 503 from minute 20 to minute 32.
        let outage = (20..32).contains(&minute);
        let burst = 4 + (minute * 7) % 11 + if minute % 15 == 0 { 12 } else { 0 };
        for i in 0..burst {
            let (kind, payload) = match i % 4 {
                0 => (
                    "email.send",
                    json!({ "to": format!("user{i}@example.com"), "template": "receipt" }),
                ),
                1 => (
                    "webhook.post",
                    json!({ "url": "https://partner.example/hook", "order": minute * 100 + i }),
                ),
                2 => (
                    "sync.push",
                    json!({ "doc": format!("doc-{}", i % 5), "rev": minute }),
                ),
                _ => ("search.index", json!({ "id": minute * 100 + i })),
            };
            // The trace of the request that wrote it, as an app with the
            // `opentelemetry` feature records it.
            let trace = format!("00-{:032x}-{:016x}-01", minute * 1_000 + i + 1, i + 1);
            let mut event = NewEvent::new(kind, payload)
                .with_max_attempts(3)
                .with_traceparent(trace);
            if kind == "sync.push" {
                event = event.with_ordering_key(format!("doc-{}", i % 5));
            }
            store.enqueue(event)?;
            made += 1;
        }
        clock.advance(Duration::from_secs(20));
        let claimed = store.claim(1_000, LEASE, None)?;
        let acks: Vec<Ack> = claimed
            .iter()
            .filter_map(|e| {
                let lease = e.lease()?;
                Some(if e.event_type == "webhook.post" && outage {
                    if e.attempts >= e.max_attempts {
                        Ack::fail(lease, "HTTP 503 Service Unavailable from https://partner.example/hook: upstream connect error")
                    } else {
                        Ack::retry(lease, "HTTP 503 Service Unavailable", Some(Duration::from_secs(90)))
                    }
                } else if e.event_type == "email.send" && e.seq % 97 == 0 {
                    Ack::fail(lease, "550 5.1.1 mailbox unavailable")
                } else {
                    Ack::complete(lease)
                })
            })
            .collect();
        store.settle(&acks)?;
        clock.advance(Duration::from_secs(40));
    }
    // Now: a few events in flight, and a backlog of one type whose
    // dispatcher is not running.
    clock.advance(Duration::from_secs(60));
    for i in 0..3 {
        store.enqueue(NewEvent::new(
            "email.send",
            json!({ "to": format!("late{i}@example.com") }),
        ))?;
    }
    store.claim(3, LEASE, None)?;
    for i in 0..40 {
        store.enqueue(NewEvent::new("report.render", json!({ "report": i })))?;
    }
    clock.advance(Duration::from_secs(55));
    Ok(made + 43)
}
