//! `outbox relay --metrics ADDR`: the relay's own counters and handler run
//! times (through the library's `metrics` facade, rendered by the
//! Prometheus exporter) and the outbox's gauges, at `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlite_outbox::Operator;

use crate::http::{App, Head, Limits, Listener, Reply};
use crate::Failure;

/// Run-time buckets, in seconds: from a local call to a slow webhook.
const BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Installs the recorder and serves `/metrics` on `addr` from the HTTP
/// front's own thread; returns the address it listens on. Nothing a client
/// sends can stop the relay: the front bounds headers, bodies, connections
/// and time, and this server reads no body at all.
pub(crate) fn serve(addr: SocketAddr, store: Arc<dyn Operator>) -> Result<SocketAddr, Failure> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("outbox_handler_duration_seconds".into()),
            BUCKETS,
        )
        .map_err(|e| Failure(format!("--metrics: {e}"), 1))?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| Failure(format!("--metrics: {e}"), 1))?;
    let listener = Listener::bind(addr).map_err(|e| Failure(format!("--metrics: {e}"), 1))?;
    let bound = listener.addr();
    let app = Arc::new(Scrape { handle, store });
    listener
        .spawn(
            app,
            None,
            Limits {
                handlers: 2,
                ..Limits::default()
            },
        )
        .map_err(|e| Failure(format!("--metrics: {e}"), 1))?;
    Ok(bound)
}

struct Scrape {
    handle: PrometheusHandle,
    store: Arc<dyn Operator>,
}

impl App for Scrape {
    fn admit(&self, head: &Head) -> Result<(), Reply> {
        if head.method != "GET" && head.method != "HEAD" {
            let mut r = Reply::text(405, "GET /metrics\n");
            r.headers.push(("Allow", "GET".into()));
            return Err(r);
        }
        if head.path != "/metrics" {
            return Err(Reply::text(404, "see /metrics\n"));
        }
        Ok(())
    }

    fn handle(&self, _head: Head, _body: Vec<u8>) -> Reply {
        let (status, body) = scrape(&self.handle, self.store.as_ref());
        Reply {
            status,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: body.into_bytes(),
            headers: Vec::new(),
        }
    }
}

/// The relay's counters and run times, then the outbox's gauges.
fn scrape(handle: &PrometheusHandle, store: &dyn Operator) -> (u16, String) {
    let mut text = handle.render();
    match store.stats() {
        Ok(stats) => {
            text.push_str(&crate::prometheus::render(&stats));
            (200, text)
        }
        Err(e) => (
            503,
            format!(
                "# the outbox cannot be read: {}\n",
                crate::describe(&e).replace('\n', " ")
            ),
        ),
    }
}
