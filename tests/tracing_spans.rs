//! Each delivery runs in a `tracing` span carrying the event's id, type,
//! attempt and correlation id, and what goes wrong is logged. (Its own test
//! binary: it installs subscribers, which the library itself never does.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use sqlite_outbox::{Dispatcher, Event, MemoryStore, NewEvent};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Metadata, Subscriber};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

type Spans = Arc<Mutex<Vec<(String, Vec<(String, String)>)>>>;

/// Records every span's name and fields, and every event's level and
/// fields.
struct Capture {
    spans: Spans,
    events: Spans,
    next: AtomicU64,
}

struct Fields(Vec<(String, String)>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name().to_owned(), format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name().to_owned(), value.to_owned()));
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut fields = Fields(Vec::new());
        span.record(&mut fields);
        if let Ok(mut spans) = self.spans.lock() {
            spans.push((span.metadata().name().to_owned(), fields.0));
        }
        Id::from_u64(self.next.fetch_add(1, Ordering::Relaxed) + 1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields(Vec::new());
        event.record(&mut fields);
        if let Ok(mut events) = self.events.lock() {
            events.push((event.metadata().level().to_string(), fields.0));
        }
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[test]
fn every_delivery_has_a_span_with_the_event_fields() -> Result<(), Box<dyn std::error::Error>> {
    let spans: Spans = Arc::default();
    tracing::subscriber::set_global_default(Capture {
        spans: spans.clone(),
        events: Arc::default(),
        next: AtomicU64::new(0),
    })?;
    let store = MemoryStore::new();
    let event = store.enqueue(
        NewEvent::new("email.invite", json!({}))
            .with_correlation_id("req-7")
            .with_traceparent(TRACEPARENT),
    )?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let dispatcher = Dispatcher::builder(store.clone())
        .handle("email.invite", move |_: &Event| {
            tx.send(()).ok();
            Ok(())
        })
        .start()?;
    rx.recv_timeout(Duration::from_secs(10))?;
    dispatcher.shutdown(Duration::from_secs(5));
    let spans = spans.lock().map_err(|_| "poisoned")?;
    let (_, fields) = spans
        .iter()
        .find(|(name, fields)| {
            // The other test's dispatcher threads report here too.
            name == "outbox.deliver"
                && fields.contains(&("event_type".to_owned(), "email.invite".to_owned()))
        })
        .ok_or("no delivery span")?;
    let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
    assert_eq!(get("event_id"), Some(event.id.to_string().as_str()));
    assert_eq!(get("event_type"), Some("email.invite"));
    assert_eq!(get("attempt"), Some("1"));
    assert_eq!(get("correlation_id"), Some("req-7"));
    assert_eq!(get("traceparent"), Some(TRACEPARENT));
    Ok(())
}

/// Dropping a dispatcher whose handler outlives the shutdown deadline says
/// so in a warning, with the count.
#[test]
fn a_drop_that_leaves_a_handler_running_warns() -> Result<(), Box<dyn std::error::Error>> {
    let events: Spans = Arc::default();
    let capture = Capture {
        spans: Arc::default(),
        events: events.clone(),
        next: AtomicU64::new(0),
    };
    let store = MemoryStore::new();
    store.enqueue(NewEvent::new("stuck", json!({})))?;
    let (started_tx, started) = crossbeam_channel::unbounded();
    let (release, released) = crossbeam_channel::unbounded::<()>();
    let dispatcher = Dispatcher::builder(store.clone())
        .shutdown_timeout(Duration::from_millis(100))
        .handle("stuck", move |_: &Event| {
            started_tx.send(()).ok();
            released.recv_timeout(Duration::from_secs(30)).ok();
            Ok(())
        })
        .start()?;
    started.recv_timeout(Duration::from_secs(10))?;
    // A clean drop first: nothing to warn about.
    let idle = Dispatcher::builder(MemoryStore::new())
        .handle("other", |_: &Event| Ok(()))
        .start()?;
    let warnings = |events: &Spans| -> Result<Vec<String>, Box<dyn std::error::Error>> {
        let events = events.lock().map_err(|_| "poisoned")?;
        Ok(events
            .iter()
            .filter(|(level, fields)| {
                level == "WARN"
                    && fields
                        .iter()
                        .any(|(k, v)| k == "message" && v.contains("still running"))
            })
            .map(|(_, fields)| format!("{fields:?}"))
            .collect())
    };
    tracing::subscriber::with_default(capture, || {
        drop(idle);
        assert_eq!(warnings(&events).ok(), Some(vec![]), "a clean drop warned");
        drop(dispatcher);
    });
    release.send(()).ok();
    let warned = warnings(&events)?;
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(
        warned[0].contains(r#"("still_running", "1")"#),
        "{warned:?}"
    );
    Ok(())
}
