//! The dispatcher's threads: one poller that claims, N workers that run
//! handlers, one completer that writes outcomes in batches, and one
//! heartbeat that extends the leases of events still in hand.
//!
//! ```text
//!   poller --jobs (bounded)--> workers --outcomes--> completer --> store
//!      ^                                                |
//!      +------------------- nudge ----------------------+
//! ```
//!
//! Lock order: the in-flight map's mutex is never held while calling the
//! store or a handler.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender};

use super::{Counters, Dispatcher, DispatcherBuilder, Handler, HandlerError, ShutdownReport};
use crate::clock;
use crate::error::{Error, Result};
use crate::event::{Event, Lease};
use crate::store::{Ack, Store};

/// Most outcomes written in one transaction.
const MAX_SETTLE_BATCH: usize = 512;

/// After an in-process wake-up that found nothing (the enqueuing transaction
/// had not committed yet), look again this often, doubling, for this long.
const EAGER_FIRST_STEP: Duration = Duration::from_millis(1);
const EAGER_WINDOW: Duration = Duration::from_millis(250);

type InFlightKey = (i64, i64);

pub(crate) struct Runtime {
    pub(crate) store: Arc<dyn Store>,
    /// The event types this dispatcher claims (`None`: all).
    pub(crate) types: Option<Arc<[String]>>,
    pub(crate) counters: Arc<Counters>,
    shared: Arc<Shared>,
    wake_tx: Sender<()>,
    stop_poller_tx: Sender<()>,
    stop_heartbeat_tx: Sender<()>,
    flush_tx: Sender<Instant>,
    poller: Option<JoinHandle<()>>,
    heartbeat: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    worker_exit_rx: Receiver<()>,
    completer: Option<JoinHandle<usize>>,
}

struct Shared {
    stopping: AtomicBool,
    inflight: Mutex<HashMap<InFlightKey, InFlight>>,
}

struct InFlight {
    lease: Lease,
    locked_until: DateTime<Utc>,
}

impl Shared {
    fn inflight(&self) -> MutexGuard<'_, HashMap<InFlightKey, InFlight>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Everything the threads share, cloned into each.
#[derive(Clone)]
struct Ctx {
    store: Arc<dyn Store>,
    counters: Arc<Counters>,
    shared: Arc<Shared>,
    handlers: Arc<HashMap<String, Arc<dyn Handler>>>,
    fallback: Option<Arc<dyn Handler>>,
    types: Option<Arc<[String]>>,
    lease: Duration,
    batch_size: usize,
    capacity: usize,
    poll_interval: Duration,
}

enum Kind {
    Done,
    Retry { last: bool, panicked: bool },
    Fail,
    Release,
}

struct Outcome {
    ack: Ack,
    kind: Kind,
}

fn spawn<T: Send + 'static>(
    name: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .map_err(|e| Error::with_source(crate::ErrorKind::Io, e))
}

/// Runs a thread's loop, restarting it when it panics: the panic is
/// counted, logged, and followed by a growing pause, so a loop that panics
/// at once every time cannot spin. Returns once the loop returns.
fn supervise(ctx: &Ctx, thread: &str, mut body: impl FnMut()) {
    let mut pause_for = Duration::from_millis(50);
    loop {
        match catch_unwind(AssertUnwindSafe(&mut body)) {
            Ok(()) => return,
            Err(payload) => {
                Counters::add(&ctx.counters.thread_panics, 1);
                let message = panic_message(&*payload);
                let _ = catch_unwind(AssertUnwindSafe(|| {
                    tracing::error!(thread, panic = %message, "outbox thread panicked; restarting it");
                }));
                if ctx.shared.stopping.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(pause_for);
                pause_for = (pause_for * 2).min(Duration::from_secs(5));
            }
        }
    }
}

pub(crate) fn start(b: DispatcherBuilder) -> Result<Dispatcher> {
    let counters = Arc::new(Counters::default());
    let shared = Arc::new(Shared {
        stopping: AtomicBool::new(false),
        inflight: Mutex::new(HashMap::new()),
    });
    let types: Option<Arc<[String]>> = if b.fallback.is_some() {
        None
    } else {
        let mut t: Vec<String> = b.handlers.keys().cloned().collect();
        t.sort();
        Some(t.into())
    };
    let capacity = b.workers + b.batch_size;
    let ctx = Ctx {
        store: b.store.clone(),
        counters: counters.clone(),
        shared: shared.clone(),
        handlers: Arc::new(b.handlers),
        fallback: b.fallback,
        types: types.clone(),
        lease: b.lease,
        batch_size: b.batch_size,
        capacity,
        poll_interval: b.poll_interval,
    };

    let (jobs_tx, jobs_rx) = bounded::<Event>(capacity);
    let (outcomes_tx, outcomes_rx) = unbounded::<Outcome>();
    let (wake_tx, wake_rx) = bounded::<()>(1);
    let (nudge_tx, nudge_rx) = bounded::<()>(1);
    let (stop_poller_tx, stop_poller_rx) = bounded::<()>(1);
    let (stop_heartbeat_tx, stop_heartbeat_rx) = bounded::<()>(1);
    let (flush_tx, flush_rx) = bounded::<Instant>(1);
    let (worker_exit_tx, worker_exit_rx) = unbounded::<()>();
    let store_wake_rx = b.store.subscribe();

    let mut workers = Vec::with_capacity(b.workers);
    for n in 0..b.workers {
        let (ctx, jobs_rx, outcomes_tx, exit_tx) = (
            ctx.clone(),
            jobs_rx.clone(),
            outcomes_tx.clone(),
            worker_exit_tx.clone(),
        );
        workers.push(spawn(format!("{}-worker-{n}", b.name), move || {
            // Counted as exited however the thread ends.
            let _exited = OnDrop(Some(move || {
                let _ = exit_tx.send(());
            }));
            supervise(&ctx, "worker", || worker_loop(&ctx, &jobs_rx, &outcomes_tx));
        })?);
    }
    drop((jobs_rx, worker_exit_tx));

    let completer = {
        let ctx = ctx.clone();
        spawn(format!("{}-completer", b.name), move || {
            completer_loop(&ctx, &outcomes_rx, &flush_rx, &nudge_tx)
        })?
    };
    drop(outcomes_tx);

    let heartbeat = {
        let ctx = ctx.clone();
        spawn(format!("{}-heartbeat", b.name), move || {
            supervise(&ctx, "heartbeat", || {
                heartbeat_loop(&ctx, &stop_heartbeat_rx)
            });
        })?
    };

    let poller = {
        let ctx = ctx.clone();
        spawn(format!("{}-poller", b.name), move || {
            supervise(&ctx, "poller", || {
                poll_loop(
                    &ctx,
                    &jobs_tx,
                    &wake_rx,
                    &store_wake_rx,
                    &nudge_rx,
                    &stop_poller_rx,
                );
            });
            // Workers see the queue close and exit.
            drop(jobs_tx);
        })?
    };

    Ok(Dispatcher {
        runtime: Some(Runtime {
            store: b.store,
            types,
            counters,
            shared,
            wake_tx,
            stop_poller_tx,
            stop_heartbeat_tx,
            flush_tx,
            poller: Some(poller),
            heartbeat: Some(heartbeat),
            workers,
            worker_exit_rx,
            completer: Some(completer),
        }),
        shutdown_timeout: b.shutdown_timeout,
    })
}

impl Runtime {
    pub(crate) fn wake(&self) {
        let _ = self.wake_tx.try_send(());
    }

    /// True once nothing of this dispatcher's types can be claimed now,
    /// nothing is being handled (here or by another process), and every
    /// outcome this dispatcher produced is written.
    pub(crate) fn is_idle(&self) -> Result<bool> {
        if !self.shared.inflight().is_empty() {
            return Ok(false);
        }
        let backlog = self.store.backlog(self.types.as_deref())?;
        Ok(!backlog.due && !backlog.processing)
    }

    pub(crate) fn shutdown(mut self, deadline: Duration) -> ShutdownReport {
        let until = Instant::now() + deadline;
        let before = self.counters.snapshot();
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = self.stop_poller_tx.try_send(());
        if let Some(poller) = self.poller.take() {
            if poller.join().is_err() {
                tracing::error!("outbox poller thread panicked");
            }
        }
        // The poller dropped the job queue: workers give back what is still
        // queued and exit after their current handler.
        let mut exited = 0;
        while exited < self.workers.len() {
            match self.worker_exit_rx.recv_deadline(until) {
                Ok(()) => exited += 1,
                Err(_) => break,
            }
        }
        let still_running = self.workers.len() - exited;
        for worker in self.workers.drain(..) {
            if worker.is_finished() {
                let _ = worker.join();
            }
            // Otherwise the handler outlived the deadline: the thread is
            // left to finish; its event comes back when the lease runs out.
        }
        let _ = self.stop_heartbeat_tx.try_send(());
        if let Some(heartbeat) = self.heartbeat.take() {
            let _ = heartbeat.join();
        }
        let _ = self
            .flush_tx
            .try_send(until.max(Instant::now() + Duration::from_secs(1)));
        let unwritten = match self.completer.take().map(JoinHandle::join) {
            Some(Ok(n)) => n,
            Some(Err(_)) => {
                tracing::error!("outbox completer thread panicked");
                0
            }
            None => 0,
        };
        let after = self.counters.snapshot();
        ShutdownReport {
            completed: (after.done + after.retried + after.failed)
                - (before.done + before.retried + before.failed),
            released: after.released - before.released,
            still_running,
            unwritten,
            metrics: after,
            idle: false,
        }
    }
}

/// Sleeps up to `d` unless told to stop; true if told to stop.
fn pause(stop_rx: &Receiver<()>, d: Duration) -> bool {
    select! {
        recv(stop_rx) -> _ => true,
        default(d) => false,
    }
}

fn poll_loop(
    ctx: &Ctx,
    jobs_tx: &Sender<Event>,
    wake_rx: &Receiver<()>,
    store_wake_rx: &Receiver<()>,
    nudge_rx: &Receiver<()>,
    stop_rx: &Receiver<()>,
) {
    // A wake-up source whose sender is gone (a completer that died, say)
    // would make `select!` return at once for ever: it becomes `never`.
    let (mut wake_rx, mut store_wake_rx, mut nudge_rx) =
        (wake_rx.clone(), store_wake_rx.clone(), nudge_rx.clone());
    let types = ctx.types.as_deref();
    let mut claim_now = true;
    let mut woken = false;
    let mut eager: Option<(Instant, Duration)> = None;
    let mut backoff = Duration::from_millis(10);
    // The earliest time, known at the last claim, at which something becomes
    // claimable without any write (a delayed or retrying event falling due,
    // a lease running out). Kept until a claim runs again, so a late wake-up
    // cannot skip it.
    let mut due_at: Option<DateTime<Utc>> = None;
    loop {
        if ctx.shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let room = ctx.capacity.saturating_sub(ctx.shared.inflight().len());
        let want = ctx.batch_size.min(room);
        let mut got = 0;
        let mut claimed = false;
        if claim_now && want > 0 {
            match ctx.store.claim(want, ctx.lease, types) {
                Ok(events) => {
                    backoff = Duration::from_millis(10);
                    claimed = true;
                    got = events.len();
                    if got > 0 {
                        Counters::add(&ctx.counters.claimed, got as u64);
                        Counters::add(&ctx.counters.claim_batches, 1);
                        let mut inflight = ctx.shared.inflight();
                        for e in &events {
                            if let (Some(lease), Some(until)) = (e.lease(), e.locked_until) {
                                inflight.insert(
                                    (lease.seq, lease.token),
                                    InFlight {
                                        lease,
                                        locked_until: until,
                                    },
                                );
                            }
                        }
                    }
                    for e in events {
                        // Room was reserved above, so this never blocks for long.
                        if jobs_tx.send(e).is_err() {
                            break;
                        }
                    }
                }
                Err(err) => {
                    Counters::add(&ctx.counters.store_errors, 1);
                    tracing::warn!(error = %err, "outbox claim failed; retrying");
                    if pause(stop_rx, backoff) {
                        break;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            }
        }
        if got > 0 && got == want {
            // A full batch: more is probably waiting, so claim again before
            // asking when the next event falls due.
            continue;
        }
        if claimed {
            due_at = match ctx.store.next_wakeup(types) {
                Ok(at) => at,
                // Unknown: look again at the next tick.
                Err(_) => Some(ctx.store.clock().now()),
            };
        }
        if woken && got == 0 {
            // Woken by an enqueue whose transaction may not have committed
            // yet: watch for its commit closely for a short while.
            eager = Some((Instant::now() + EAGER_WINDOW, EAGER_FIRST_STEP));
        }
        woken = false;

        let mut timeout = ctx.poll_interval;
        if let Some(at) = due_at {
            let until = (at - ctx.store.clock().now())
                .to_std()
                .unwrap_or(Duration::ZERO)
                + Duration::from_millis(1);
            timeout = timeout.min(until);
        }
        if let Some((end, step)) = eager {
            if Instant::now() >= end {
                eager = None;
            } else if step < timeout {
                timeout = step;
                eager = Some((end, (step * 2).min(Duration::from_millis(32))));
            }
        }
        select! {
            recv(stop_rx) -> _ => break,
            recv(wake_rx) -> msg => {
                claim_now = true;
                woken = true;
                if msg.is_err() { wake_rx = crossbeam_channel::never(); }
            }
            recv(store_wake_rx) -> msg => {
                claim_now = true;
                woken = true;
                if msg.is_err() { store_wake_rx = crossbeam_channel::never(); }
            }
            recv(nudge_rx) -> msg => {
                claim_now = true;
                if msg.is_err() { nudge_rx = crossbeam_channel::never(); }
            }
            default(timeout) => {
                let due = due_at.is_some_and(|t| ctx.store.clock().now() >= t);
                claim_now = due || ctx.store.has_external_changes().unwrap_or(true);
                if claim_now {
                    eager = None;
                }
            }
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic payload".to_owned()
    }
}

/// Runs a closure when dropped, also while unwinding.
struct OnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

fn worker_loop(ctx: &Ctx, jobs_rx: &Receiver<Event>, outcomes_tx: &Sender<Outcome>) {
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
            Outcome {
                ack: Ack::release(lease),
                kind: Kind::Release,
            }
        } else {
            run_handler(ctx, &event, lease)
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
    );
    let _entered = span.enter();
    let last = event.attempts >= event.max_attempts;
    let handler = ctx
        .handlers
        .get(&event.event_type)
        .or(ctx.fallback.as_ref());
    let result = match handler {
        Some(h) => catch_unwind(AssertUnwindSafe(|| h.handle(event))),
        None => Ok(Err(HandlerError::retry(format!(
            "no handler for event type {:?}",
            event.event_type
        )))),
    };
    match result {
        Ok(Ok(())) => Outcome {
            ack: Ack::complete(lease),
            kind: Kind::Done,
        },
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

/// Writes outcomes in batches until every worker is gone or a flush is
/// requested; returns how many outcomes could not be written.
fn completer_loop(
    ctx: &Ctx,
    outcomes_rx: &Receiver<Outcome>,
    flush_rx: &Receiver<Instant>,
    nudge_tx: &Sender<()>,
) -> usize {
    let mut batch: Vec<Outcome> = Vec::new();
    let mut flush_by: Option<Instant> = None;
    loop {
        if flush_by.is_none() {
            select! {
                recv(outcomes_rx) -> msg => match msg {
                    Ok(o) => batch.push(o),
                    Err(_) => flush_by = Some(Instant::now() + Duration::from_secs(5)),
                },
                recv(flush_rx) -> msg => {
                    flush_by = Some(msg.unwrap_or_else(|_| Instant::now()));
                }
            }
        }
        while batch.len() < MAX_SETTLE_BATCH {
            match outcomes_rx.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            let written = catch_unwind(AssertUnwindSafe(|| write_batch(ctx, &mut batch, flush_by)));
            match written {
                Ok(true) => {}
                // Gave up at the deadline.
                Ok(false) => return batch.len() + outcomes_rx.try_iter().count(),
                Err(payload) => {
                    Counters::add(&ctx.counters.thread_panics, 1);
                    let message = panic_message(&*payload);
                    let _ = catch_unwind(AssertUnwindSafe(|| {
                        tracing::error!(panic = %message, outcomes = batch.len(),
                            "outbox completer panicked writing outcomes; their events are redelivered");
                    }));
                    drop_outcomes(ctx, &mut batch);
                }
            }
        }
        if batch.is_empty() {
            let _ = nudge_tx.try_send(());
        }
        if flush_by.is_some() && outcomes_rx.is_empty() {
            return 0;
        }
    }
}

/// Gives up on outcomes that cannot be written: their events leave the
/// in-flight map (no more lease extensions), so they are claimed again once
/// their leases run out.
fn drop_outcomes(ctx: &Ctx, batch: &mut Vec<Outcome>) {
    Counters::add(&ctx.counters.dropped_outcomes, batch.len() as u64);
    let mut inflight = ctx.shared.inflight();
    for o in batch.drain(..) {
        inflight.remove(&(o.ack.lease().seq, o.ack.lease().token));
    }
}

/// Errors that retrying cannot cure.
fn is_lasting(err: &Error) -> bool {
    use crate::ErrorKind as K;
    matches!(
        err.kind(),
        K::ReadOnly
            | K::Corrupt
            | K::NotAnOutbox { .. }
            | K::SchemaTooNew { .. }
            | K::SchemaMismatch { .. }
    )
}

/// Writes `batch`, retrying database errors; false if still failing at
/// `give_up_at`. Errors that will not go away drop the batch at once.
fn write_batch(ctx: &Ctx, batch: &mut Vec<Outcome>, give_up_at: Option<Instant>) -> bool {
    let acks: Vec<Ack> = batch.iter().map(|o| o.ack.clone()).collect();
    let mut backoff = Duration::from_millis(5);
    let results = loop {
        match ctx.store.settle(&acks) {
            Ok(results) => break results,
            Err(err) if is_lasting(&err) => {
                Counters::add(&ctx.counters.store_errors, 1);
                tracing::error!(error = %err, outcomes = acks.len(),
                    "outbox cannot write outcomes and will not retry; their events are redelivered");
                drop_outcomes(ctx, batch);
                return true;
            }
            Err(err) => {
                Counters::add(&ctx.counters.store_errors, 1);
                tracing::warn!(error = %err, outcomes = acks.len(), "outbox could not write outcomes; retrying");
                if give_up_at.is_some_and(|t| Instant::now() >= t) {
                    return false;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    };
    let c = &ctx.counters;
    Counters::add(&c.settle_batches, 1);
    {
        let mut inflight = ctx.shared.inflight();
        for o in batch.iter() {
            inflight.remove(&(o.ack.lease().seq, o.ack.lease().token));
        }
    }
    for (o, result) in batch.drain(..).zip(results) {
        match result {
            Err(err) => {
                Counters::add(&c.lease_lost, 1);
                tracing::info!(error = %err, "outbox outcome refused: the lease moved on");
            }
            Ok(()) => match o.kind {
                Kind::Done => Counters::add(&c.done, 1),
                Kind::Fail => Counters::add(&c.failed, 1),
                Kind::Release => Counters::add(&c.released, 1),
                Kind::Retry { last, panicked } => {
                    Counters::add(if last { &c.failed } else { &c.retried }, 1);
                    if panicked {
                        Counters::add(&c.panicked, 1);
                    }
                }
            },
        }
    }
    true
}

fn heartbeat_loop(ctx: &Ctx, stop_rx: &Receiver<()>) {
    let tick = (ctx.lease / 4).clamp(Duration::from_millis(5), Duration::from_secs(5));
    loop {
        if pause(stop_rx, tick) {
            break;
        }
        let now = ctx.store.clock().now();
        let half = clock::duration_millis(ctx.lease / 2);
        let due: Vec<Lease> = ctx
            .shared
            .inflight()
            .values()
            .filter(|f| (f.locked_until - now).num_milliseconds() < half)
            .map(|f| f.lease)
            .collect();
        if due.is_empty() {
            continue;
        }
        let acks: Vec<Ack> = due.iter().map(|l| Ack::extend(*l, ctx.lease)).collect();
        match ctx.store.settle(&acks) {
            Ok(results) => {
                let until = clock::add(now, ctx.lease);
                let mut inflight = ctx.shared.inflight();
                for (lease, result) in due.iter().zip(results) {
                    let key = (lease.seq, lease.token);
                    match result {
                        Ok(()) => {
                            Counters::add(&ctx.counters.extended, 1);
                            if let Some(f) = inflight.get_mut(&key) {
                                f.locked_until = until;
                            }
                        }
                        Err(_) => {
                            Counters::add(&ctx.counters.lease_lost, 1);
                            // Keep it out of later extensions; the worker's
                            // outcome will be refused too.
                            if let Some(f) = inflight.get_mut(&key) {
                                f.locked_until = DateTime::<Utc>::MAX_UTC;
                            }
                        }
                    }
                }
            }
            Err(err) => {
                Counters::add(&ctx.counters.store_errors, 1);
                tracing::warn!(error = %err, "outbox lease extension failed; retrying");
            }
        }
    }
}
