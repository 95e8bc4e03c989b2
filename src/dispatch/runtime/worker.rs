//! A worker: takes claimed events off the queue, runs the handler for each
//! (a panic in it is a failed attempt), and sends the outcome to the
//! completer. A handler of batches gets, in one call, the events of its
//! types already waiting in the queue, up to its limit. Once the
//! dispatcher is stopping, events still queued are released unstarted.
//!
//! Channels: receives on `jobs`; sends on `outcomes`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use super::{panic_message, Ctx, Kind, OnDrop, Outcome};
use crate::dispatch::{Handler, HandlerError};
use crate::event::{Event, Lease};
use crate::store::Ack;

pub(super) fn worker_loop(ctx: &Ctx, jobs_rx: &Receiver<Event>, outcomes_tx: &Sender<Outcome>) {
    // An event taken off the queue while a batch was gathered, of another
    // handler: it starts the next round.
    let mut next: Option<Event> = None;
    loop {
        let Some(first) = next.take().or_else(|| jobs_rx.recv().ok()) else {
            return;
        };
        let handler = handler_of(ctx, &first.event_type);
        let limit = handler
            .as_ref()
            .map_or(1, |h| h.batch_limit().clamp(1, super::MAX_HANDLER_BATCH));
        let mut events = vec![first];
        // Only what is already claimed and queued: a batch never waits.
        while events.len() < limit {
            let Ok(event) = jobs_rx.try_recv() else { break };
            if same_handler(
                handler.as_ref(),
                handler_of(ctx, &event.event_type).as_ref(),
            ) {
                events.push(event);
            } else {
                next = Some(event);
                break;
            }
        }
        if !deliver(ctx, handler.as_ref(), events, outcomes_tx) {
            if let Some(e) = next.take().and_then(|e| e.lease()) {
                ctx.shared.inflight().remove(&(e.seq, e.token));
            }
            return;
        }
    }
}

fn handler_of(ctx: &Ctx, event_type: &str) -> Option<Arc<dyn Handler>> {
    ctx.handlers
        .get(event_type)
        .or(ctx.fallback.as_ref())
        .cloned()
}

fn same_handler(a: Option<&Arc<dyn Handler>>, b: Option<&Arc<dyn Handler>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

/// Runs `handler` for `events` (one call of `handle`, or of
/// `handle_batch` for several) and sends their outcomes; false once the
/// completer is gone.
fn deliver(
    ctx: &Ctx,
    handler: Option<&Arc<dyn Handler>>,
    events: Vec<Event>,
    outcomes_tx: &Sender<Outcome>,
) -> bool {
    let events: Vec<(Event, Lease)> = events
        .into_iter()
        .filter_map(|e| e.lease().map(|l| (e, l)))
        .collect();
    // If this thread dies holding the events, they are given back (as
    // failed attempts) and leave the in-flight map, so that the heartbeat
    // stops extending leases nobody works under.
    let mut held = OnDrop(Some(|| {
        for (event, lease) in &events {
            let outcome = Outcome {
                ack: Ack::retry(
                    *lease,
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
        }
    }));
    let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(events.len());
    let mut runnable: Vec<usize> = Vec::new();
    for (i, (event, lease)) in events.iter().enumerate() {
        outcomes.push(before_running(ctx, event, *lease));
        if outcomes[i].is_none() {
            runnable.push(i);
        }
    }
    match handler {
        Some(h) if runnable.len() > 1 => {
            let batch: Vec<Event> = runnable.iter().map(|&i| events[i].0.clone()).collect();
            for (&i, result) in runnable.iter().zip(run_batch(h, &batch)) {
                let (event, lease) = &events[i];
                outcomes[i] = Some(outcome_of(ctx, event, *lease, result));
            }
        }
        h => {
            for &i in &runnable {
                let (event, lease) = &events[i];
                outcomes[i] = Some(run_handler(ctx, h, event, *lease));
            }
        }
    }
    held.0 = None;
    let mut sent = 0;
    for (i, ((event, lease), outcome)) in events.iter().zip(outcomes).enumerate() {
        let Some(outcome) = outcome else { continue };
        // `runnable` is in order: whether this event's handler ran.
        if runnable.binary_search(&i).is_ok() && !matches!(outcome.kind, Kind::HeldBack) {
            reached(ctx, &event.event_type, lease);
        }
        if outcomes_tx.send(outcome).is_err() {
            // The completer is gone: nothing of this batch is in hand.
            let mut inflight = ctx.shared.inflight();
            for (_, lease) in &events[sent..] {
                inflight.remove(&(lease.seq, lease.token));
            }
            return false;
        }
        sent = i + 1;
    }
    true
}

/// The outcome of an event that is not to run: the dispatcher is stopping,
/// it is too old, or its destination is held back.
fn before_running(ctx: &Ctx, event: &Event, lease: Lease) -> Option<Outcome> {
    if ctx.shared.stopping.load(Ordering::SeqCst) {
        ctx.destinations.probe_returned(&event.event_type, &lease);
        Some(Outcome {
            ack: Ack::release(lease),
            kind: Kind::Release,
        })
    } else if let Some(note) = too_old(ctx, event) {
        tracing::warn!(event_id = %event.id, "{note}");
        Some(Outcome {
            ack: Ack::fail(lease, &note),
            kind: Kind::Fail,
        })
    } else if !ctx.destinations.may_run(&event.event_type, &lease) {
        // Claimed before its destination was held back: back it goes,
        // unrun, its attempt not spent.
        Some(Outcome {
            ack: Ack::release(lease),
            kind: Kind::HeldBack,
        })
    } else {
        None
    }
}

fn run_handler(
    ctx: &Ctx,
    handler: Option<&Arc<dyn Handler>>,
    event: &Event,
    lease: Lease,
) -> Outcome {
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
    let result = match result {
        Ok(r) => Ran::Returned(r),
        Err(payload) => Ran::Panicked(panic_message(&*payload)),
    };
    outcome_of(ctx, event, lease, result)
}

/// How one event's run ended.
enum Ran {
    Returned(Result<(), HandlerError>),
    Panicked(String),
}

/// Runs `handle_batch` for `batch` (at least two events, or one for a
/// handler of batches), and gives one result per event, in order.
fn run_batch(handler: &Arc<dyn Handler>, batch: &[Event]) -> Vec<Ran> {
    let span = tracing::info_span!(
        "outbox.deliver_batch",
        events = batch.len(),
        event_type = %batch[0].event_type,
    );
    let _entered = span.enter();
    for tp in batch.iter().filter_map(|e| e.traceparent.as_deref()) {
        crate::trace::link_current(tp);
    }
    #[cfg(feature = "metrics")]
    let started = std::time::Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| handler.handle_batch(batch)));
    #[cfg(feature = "metrics")]
    {
        // Each event's share of the call, so the histogram stays per event.
        let share = started.elapsed().as_secs_f64() / batch.len() as f64;
        for e in batch {
            ::metrics::histogram!(
                crate::dispatch::metrics::HANDLER_DURATION,
                "type" => e.event_type.clone()
            )
            .record(share);
        }
    }
    match result {
        Ok(Ok(results)) => {
            let given = results.len();
            let mut results = results.into_iter();
            (0..batch.len())
                .map(|_| match results.next() {
                    Some(r) => Ran::Returned(r),
                    None => Ran::Returned(Err(HandlerError::retry(format!(
                        "the batch handler returned {given} result(s) for {} events",
                        batch.len()
                    )))),
                })
                .collect()
        }
        Ok(Err(err)) => batch
            .iter()
            .map(|_| Ran::Returned(Err(err.copied())))
            .collect(),
        Err(payload) => {
            let message = panic_message(&*payload);
            batch
                .iter()
                .map(|_| Ran::Panicked(message.clone()))
                .collect()
        }
    }
}

/// The outcome of one event's run, as the completer records it.
fn outcome_of(ctx: &Ctx, event: &Event, lease: Lease, ran: Ran) -> Outcome {
    let last = event.attempts >= event.max_attempts;
    match ran {
        Ran::Returned(Ok(())) => Outcome {
            ack: Ack::complete(lease),
            kind: Kind::Done,
        },
        Ran::Returned(Err(err)) if err.is_unavailable() || err.is_busy() => {
            let message = err.message();
            let ack = match err.delay().filter(|_| err.is_busy()) {
                // The destination said when: the event waits until then
                // even across restarts, its attempt not spent.
                Some(after) => {
                    ctx.destinations
                        .busy(&event.event_type, &lease, &message, Some(after));
                    Ack::defer(lease, &message, after)
                }
                None if err.is_busy() => {
                    ctx.destinations
                        .busy(&event.event_type, &lease, &message, None);
                    Ack::release(lease)
                }
                None => {
                    ctx.destinations
                        .unreachable(&event.event_type, &lease, &message);
                    Ack::release(lease)
                }
            };
            Outcome {
                ack,
                kind: Kind::HeldBack,
            }
        }
        Ran::Returned(Err(err)) => {
            let message = err.message();
            if err.is_permanent() {
                tracing::warn!(event_id = %event.id, error = %message, "outbox handler failed permanently");
                Outcome {
                    ack: Ack::fail(lease, &message),
                    kind: Kind::Fail,
                }
            } else {
                tracing::warn!(event_id = %event.id, error = %message, last, "outbox handler failed");
                Outcome {
                    ack: Ack::retry(lease, &message, err.delay()),
                    kind: Kind::Retry {
                        last,
                        panicked: false,
                    },
                }
            }
        }
        Ran::Panicked(what) => {
            let message = format!("handler panicked: {what}");
            tracing::error!(event_id = %event.id, error = %message, "outbox handler panicked");
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
            crate::text::format_duration(age),
            crate::text::format_duration(max)
        )
    })
}
