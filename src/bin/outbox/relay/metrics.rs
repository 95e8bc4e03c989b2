//! `outbox relay --metrics ADDR`: the relay's own counters and handler run
//! times (through the library's `metrics` facade, rendered by the
//! Prometheus exporter) and the outbox's gauges, at `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlite_outbox::Operator;

use crate::Failure;

/// Run-time buckets, in seconds: from a local call to a slow webhook.
const BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Installs the recorder and serves `/metrics` on `addr` from a thread of
/// its own; returns the address it listens on.
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
    let (server, bound) =
        crate::ui::listen(addr).map_err(|e| Failure(format!("--metrics: {e}"), 1))?;
    std::thread::spawn(move || {
        while let Ok(rq) = server.recv() {
            let (status, body) = if rq.url() == "/metrics" {
                scrape(&handle, store.as_ref())
            } else {
                (404, "see /metrics\n".to_owned())
            };
            let mut res = tiny_http::Response::from_string(body).with_status_code(status);
            if let Ok(h) = tiny_http::Header::from_bytes(
                &b"Content-Type"[..],
                &b"text/plain; version=0.0.4; charset=utf-8"[..],
            ) {
                res.add_header(h);
            }
            let _ = rq.respond(res);
        }
    });
    Ok(bound)
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
