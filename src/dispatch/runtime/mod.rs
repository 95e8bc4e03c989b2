//! The dispatcher's threads: one poller that claims, N workers that run
//! handlers, one completer that writes outcomes in batches, and one
//! heartbeat that extends the leases of events still in hand. While events
//! flow, the completer also claims: in the transaction that writes a batch
//! of outcomes, as many events as those outcomes free room for, so a busy
//! dispatcher writes once per batch instead of twice. While the app
//! enqueues fast in this process, the poller and the completer start at
//! most one write a millisecond between them (`pace`), so the app keeps
//! most of SQLite's one writer.
//!
//! ```text
//!   poller ----jobs (bounded)---> workers --outcomes--> completer --> store
//!      ^          ^                                       |  |
//!      |          +------------- claimed with outcomes ---+  |
//!      +-------------------------- nudge --------------------+
//! ```
//!
//! Lock order: `claiming` (held by whoever decides how much to claim, and
//! claims), then the store; the in-flight map's mutex is never held while
//! calling the store or a handler.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender};

use super::destinations::Destinations;
use super::{Counters, Dispatcher, DispatcherBuilder, Handler, ShutdownReport};
use crate::error::{Error, Result};
use crate::event::{Event, Lease};
use crate::store::{Ack, Store};

mod completer;
mod heartbeat;
mod limited;
mod pace;
mod poller;
mod start;
mod worker;

use completer::completer_loop;
use heartbeat::heartbeat_loop;
use poller::poll_loop;
use worker::worker_loop;

pub(crate) use start::start;

type InFlightKey = (i64, i64);

/// The largest batch a handler is given, whatever its limit says: a claim
/// of this many is one transaction, and each waits in memory.
const MAX_HANDLER_BATCH: usize = 10_000;

pub(crate) struct Runtime {
    pub(crate) store: Arc<dyn Store>,
    /// The event types this dispatcher claims (`None`: all).
    pub(crate) types: Option<Arc<[String]>>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) destinations: Arc<Destinations>,
    limits: crate::dispatch::limits::SharedLimits,
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
    /// Held while deciding how much to claim and claiming it (by the
    /// poller, or the completer along with outcomes), so that two claims
    /// never both count the same room.
    claiming: Mutex<()>,
    /// The job queue, for the completer's claims; the poller empties it
    /// when it stops, so the queue closes once no claim is in progress.
    jobs: Mutex<Option<Sender<Event>>>,
    /// Spaces the dispatcher's writes while the app writes in this process.
    pacer: pace::Pacer,
    /// Why the poller stopped claiming on its own: the store said the
    /// outbox's objects are not what this build expects.
    halted: Mutex<Option<String>>,
}

struct InFlight {
    lease: Lease,
    locked_until: DateTime<Utc>,
    /// When it was claimed, for the dispatcher's `max_run_time`.
    claimed_at: Instant,
    /// The limits it counts against, if any.
    group: Option<usize>,
}

impl Shared {
    fn halted(&self) -> Option<String> {
        self.halted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn halt(&self, why: String) {
        *self.halted.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    fn inflight(&self) -> MutexGuard<'_, HashMap<InFlightKey, InFlight>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn claiming(&self) -> MutexGuard<'_, ()> {
        self.claiming.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn jobs(&self) -> MutexGuard<'_, Option<Sender<Event>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Records claimed events as in flight, tells `on_claim` of each, and
/// queues them for the workers; returns their leases. Called with
/// [`Shared::claiming`] held, after reserving room for them.
fn admit(
    ctx: &Ctx,
    jobs_tx: &Sender<Event>,
    events: Vec<Event>,
    on_claim: &dyn Fn(&Lease),
) -> Vec<Lease> {
    let mut leases = Vec::with_capacity(events.len());
    if !events.is_empty() {
        Counters::add(&ctx.counters.claimed, events.len() as u64);
        Counters::add(&ctx.counters.claim_batches, 1);
        let mut inflight = ctx.shared.inflight();
        for e in &events {
            if let (Some(lease), Some(until)) = (e.lease(), e.locked_until) {
                on_claim(&lease);
                leases.push(lease);
                inflight.insert(
                    (lease.seq, lease.token),
                    InFlight {
                        lease,
                        locked_until: until,
                        claimed_at: Instant::now(),
                        group: ctx.limits.group_of(&ctx.destinations, &e.event_type),
                    },
                );
            }
        }
    }
    for e in events {
        // Room was reserved, so this never blocks for long.
        if jobs_tx.send(e).is_err() {
            break;
        }
    }
    leases
}

/// Everything the threads share, cloned into each.
#[derive(Clone)]
struct Ctx {
    store: Arc<dyn Store>,
    counters: Arc<Counters>,
    shared: Arc<Shared>,
    handlers: Arc<HashMap<String, Arc<dyn Handler>>>,
    fallback: Option<Arc<dyn Handler>>,
    destinations: Arc<Destinations>,
    limits: crate::dispatch::limits::SharedLimits,
    types: Option<Arc<[String]>>,
    lease: Duration,
    max_run_time: Option<Duration>,
    max_age: Option<Duration>,
    batch_size: usize,
    capacity: usize,
    poll_interval: Duration,
}

enum Kind {
    Done,
    Retry {
        last: bool,
        panicked: bool,
    },
    Fail,
    Release,
    /// Given back because its destination is held back.
    HeldBack,
}

struct Outcome {
    ack: Ack,
    kind: Kind,
}

impl Runtime {
    /// Why the poller stopped claiming by itself, if it did.
    pub(crate) fn halted(&self) -> Option<String> {
        self.shared.halted()
    }

    pub(crate) fn wake(&self) {
        let _ = self.wake_tx.try_send(());
    }

    /// Makes waiting retries of these types due now, and looks for them.
    pub(crate) fn skip_backoff(&self, types: Option<&[String]>) {
        if let Err(e) = self.store.skip_backoff(types) {
            tracing::warn!(error = %e, "outbox could not make waiting events due");
        }
        self.wake();
    }

    /// True once nothing of this dispatcher's types can be claimed now,
    /// nothing is being handled (here or by another process), and every
    /// outcome this dispatcher produced is written.
    pub(crate) fn is_idle(&self) -> Result<bool> {
        if !self.shared.inflight().is_empty() {
            return Ok(false);
        }
        // Events of destinations held back wait for a later run.
        let selection = self.destinations.claimable(self.types.as_deref());
        if self.destinations.is_offline() || selection.is_empty() {
            return Ok(true);
        }
        let backlog = self.store.backlog_where(&selection.filter())?;
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
        // What this dispatcher held back is no longer held by anyone, and
        // no event waits for its limits any more.
        self.destinations.forget_all();
        self.limits
            .waiting_over(&*self.store, self.store.clock().now());
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
