//! With the `opentelemetry` feature, trace context crosses the queue: an
//! event enqueued inside a span carries that span's W3C traceparent, and
//! the span that delivers it links back to it, across threads and however
//! much later. A real OpenTelemetry SDK (in-memory exporter) records the
//! spans. Its own test binary: it installs a global subscriber.
#![cfg(feature = "opentelemetry")]

use std::time::{Duration, Instant};

use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use serde_json::json;
use sqlite_outbox::{Dispatcher, NewEvent, SqliteStore};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

#[test]
fn the_delivery_span_links_to_the_span_that_enqueued() -> Result<(), Box<dyn std::error::Error>> {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    tracing::subscriber::set_global_default(subscriber)?;

    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("o.db"))?;
    let (signup_trace, signup_span, event) = {
        let span = tracing::info_span!("signup");
        let _entered = span.enter();
        let context = span.context();
        let sc = context.span().span_context().clone();
        let event = store.enqueue(NewEvent::new("user.signed_up", json!({})))?;
        (sc.trace_id(), sc.span_id(), event)
    };
    assert_eq!(
        event.traceparent.as_deref(),
        Some(format!("00-{signup_trace}-{signup_span}-01").as_str()),
        "the enqueueing span's context, sampled"
    );
    // Outside any span: nothing to carry.
    let untraced = store.enqueue(NewEvent::new("user.signed_up", json!({})))?;
    assert_eq!(untraced.traceparent, None);

    let dispatcher = Dispatcher::builder(store.clone())
        .handle("user.signed_up", |_| Ok(()))
        .poll_interval(Duration::from_millis(20))
        .start()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let delivery = loop {
        provider.force_flush()?;
        let spans = exporter.get_finished_spans()?;
        let delivered: Vec<_> = spans
            .iter()
            .filter(|s| s.name == "outbox.deliver")
            .collect();
        if delivered.len() == 2 {
            break delivered
                .into_iter()
                .find(|s| !s.links.links.is_empty())
                .cloned()
                .ok_or("no delivery span has a link")?;
        }
        assert!(Instant::now() < deadline, "deliveries not seen: {spans:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(dispatcher.shutdown(Duration::from_secs(5)).is_clean());
    let link = &delivery.links.links[0];
    assert_eq!(link.span_context.trace_id(), signup_trace);
    assert_eq!(link.span_context.span_id(), signup_span);
    assert!(link.span_context.is_remote());
    // A link, not a parent: the delivery runs in a trace of its own.
    assert_ne!(delivery.span_context.trace_id(), signup_trace);
    Ok(())
}
