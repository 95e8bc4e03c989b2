//! A worker: takes claimed events off the queue, runs the handler for each
//! (a panic in it is a failed attempt), and sends the outcome to the
//! completer. Once the dispatcher is stopping, events still queued are
//! released unstarted.
//!
//! Channels: receives on `jobs`; sends on `outcomes`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;

use crossbeam_channel::{Receiver, Sender};

use super::{panic_message, Ctx, Kind, OnDrop, Outcome};
use crate::dispatch::HandlerError;
use crate::event::{Event, Lease};
use crate::store::Ack;

pub(super) fn worker_loop(ctx: &Ctx, jobs_rx: &Receiver<Event>, outcomes_tx: &Sender<Outcome>) {
    for event in jobs_rx.iter() {
        let Some(lease) = event.lease() else {
            continue;
        };
        // If this thread dies holding the event, the event is given back
        // (as a failed attempt) and leaves the in-flight map, so that the
        // heartbeat stops extending a lease nobody works under.
        let mut held = OnDrop(Some(|| {
            let outcome = Outcome {
                ack: Ack::retry(
                    lease,
                    "the dispatcher's worker thread died while handling the event",
                    None,
                ),
                kind: Kind::Retry {
                    last: event.attempts >= event.max_attempts,
                    panicked: true,
                },
            };
            if outcomes_tx.send(outcome).is_err() {
                ctx.shared.inflight().remove(&(lease.seq, lease.token));
            }
        }));
        let outcome = if ctx.shared.stopping.load(Ordering::SeqCst) {
            ctx.destinations.probe_returned(&event.event_type, &lease);
            Outcome {
                ack: Ack::release(lease),
                kind: Kind::Release,
            }
        } else if let Some(note) = too_old(ctx, &event) {
            tracing::warn!(event_id = %event.id, "{note}");
            Outcome {
                ack: Ack::fail(lease, &note),
                kind: Kind::Fail,
            }
        } else if !ctx.destinations.may_run(&event.event_type, &lease) {
            // Claimed before its destination was held back: back it goes,
            // unrun, its attempt not spent.
            Outcome {
                ack: Ack::release(lease),
                kind: Kind::HeldBack,
            }
        } else {
            let outcome = run_handler(ctx, &event, lease);
            if !matches!(outcome.kind, Kind::HeldBack) {
                reached(ctx, &event.event_type, &lease);
            }
            outcome
        };
        held.0 = None;
        if outcomes_tx.send(outcome).is_err() {
            ctx.shared.inflight().remove(&(lease.seq, lease.token));
            break;
        }
    }
}

fn run_handler(ctx: &Ctx, event: &Event, lease: Lease) -> Outcome {
    let span = tracing::info_span!(
        "outbox.deliver",
        event_id = %event.id,
        event_type = %event.event_type,
        attempt = event.attempts,
        correlation_id = event.correlation_id.as_deref().unwrap_or(""),
        traceparent = event.traceparent.as_deref().unwrap_or(""),
    );
    let _entered = span.enter();
    // The work that enqueued the event, as a link: its trace ended long
    // ago, and a retry days later is not its child.
    if let Some(tp) = &event.traceparent {
        crate::trace::link_current(tp);
    }
    let last = event.attempts >= event.max_attempts;
    let handler = ctx
        .handlers
        .get(&event.event_type)
        .or(ctx.fallback.as_ref());
    #[cfg(feature = "metrics")]
    let started = std::time::Instant::now();
    let result = match handler {
        Some(h) => catch_unwind(AssertUnwindSafe(|| h.handle(event))),
        None => Ok(Err(HandlerError::retry(format!(
            "no handler for event type {:?}",
            event.event_type
        )))),
    };
    #[cfg(feature = "metrics")]
    ::metrics::histogram!(
        crate::dispatch::metrics::HANDLER_DURATION,
        "type" => event.event_type.clone()
    )
    .record(started.elapsed().as_secs_f64());
    match result {
        Ok(Ok(())) => Outcome {
            ack: Ack::complete(lease),
            kind: Kind::Done,
        },
        Ok(Err(err)) if err.is_unavailable() => {
            let message = err.message();
            ctx.destinations
                .unreachable(&event.event_type, &lease, &message);
            Outcome {
                ack: Ack::release(lease),
                kind: Kind::HeldBack,
            }
        }
        Ok(Err(err)) => {
            let message = err.message();
            if err.is_permanent() {
                tracing::warn!(error = %message, "outbox handler failed permanently");
                Outcome {
                    ack: Ack::fail(lease, &message),
                    kind: Kind::Fail,
                }
            } else {
                tracing::warn!(error = %message, last, "outbox handler failed");
                Outcome {
                    ack: Ack::retry(lease, &message, err.delay()),
                    kind: Kind::Retry {
                        last,
                        panicked: false,
                    },
                }
            }
        }
        Err(payload) => {
            let message = format!("handler panicked: {}", panic_message(&*payload));
            tracing::error!(error = %message, "outbox handler panicked");
            Outcome {
                ack: Ack::retry(lease, &message, None),
                kind: Kind::Retry {
                    last,
                    panicked: true,
                },
            }
        }
    }
}

/// The handler got past its destination: if that destination was held back
/// as unreachable, its waiting events are made due now and flow again.
fn reached(ctx: &Ctx, event_type: &str, lease: &Lease) {
    let Some(destination) = ctx.destinations.reached(event_type, lease) else {
        return;
    };
    let types = ctx
        .destinations
        .types_of(&destination, ctx.types.as_deref());
    if let Err(e) = ctx.store.skip_backoff(types.as_deref()) {
        tracing::warn!(error = %e, destination = %destination, "outbox could not make waiting events due");
    }
}

/// Why an event is given up on unrun, if it is older than the builder's
/// `max_age`.
fn too_old(ctx: &Ctx, event: &Event) -> Option<String> {
    let max = ctx.max_age?;
    let age = (ctx.store.clock().now() - event.created_at).to_std().ok()?;
    (age > max).then(|| {
        format!(
            "given up: {} old, older than the dispatcher's max_age of {}",
            crate::admin::format_duration(age),
            crate::admin::format_duration(max)
        )
    })
}
