//! The poller: claims due events in batches and queues them for the
//! workers. It sleeps until something can be due (an enqueue in this
//! process, another process's commit, a retry or lease falling due) and
//! never claims more than the workers and the queue can hold. Another
//! process's commits are seen at the next poll, and while they keep
//! bringing events, every [`WATCH_STEP`].
//!
//! Channels: sends claimed events on `jobs` (bounded: room is reserved
//! before each claim); wakes on `wake` (the handle), `store_wake` (an
//! in-process enqueue), `nudge` (the completer freed room); stops on `stop`.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use crossbeam_channel::{select, Receiver, Sender};

use super::{admit, limited, pause, Ctx};
use crate::dispatch::Counters;
use crate::event::{Event, Lease};
use crate::store::sealed::TypeFilter;

/// After an in-process wake-up that found nothing (the enqueuing transaction
/// had not committed yet), look again this often, doubling, for this long.
const EAGER_FIRST_STEP: Duration = Duration::from_millis(1);
const EAGER_WINDOW: Duration = Duration::from_millis(250);

/// After another connection's commit brought events to claim, look for the
/// next one this often (a read of the WAL's header, no write), for this
/// long after the last that did: a stream from another process is picked
/// up in milliseconds, and an idle dispatcher still wakes only once per
/// poll interval.
const WATCH_STEP: Duration = Duration::from_millis(5);
const WATCH_WINDOW: Duration = Duration::from_secs(1);

pub(super) fn poll_loop(
    ctx: &Ctx,
    jobs_tx: &Sender<Event>,
    wake_rx: &Receiver<()>,
    store_wake_rx: &Receiver<()>,
    nudge_rx: &Receiver<()>,
    stop_rx: &Receiver<()>,
) {
    let mut wakeups = Wakeups {
        wake: wake_rx.clone(),
        store_wake: store_wake_rx.clone(),
        nudge: nudge_rx.clone(),
    };
    let types = ctx.types.as_deref();
    let mut claim_now = true;
    let mut woken = false;
    let mut eager: Option<(Instant, Duration)> = None;
    // Until when to watch closely for other connections' commits, and
    // whether this claim follows one. The first claim does: what it finds
    // was written before this dispatcher started.
    let mut watch_until: Option<Instant> = None;
    let mut external = true;
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
        // What may wake the dispatcher: everything of its destinations that
        // are not held back, limited or not.
        let open = ctx.destinations.claimable(types);
        // Offline, or every destination held back: nothing to claim or wait
        // for until a probe, a resume or going online.
        let offline = ctx.destinations.is_offline() || open.is_empty();
        let (mut want, mut got, mut claimed) = (0, 0, false);
        let mut got_limited = 0;
        if claim_now && !offline {
            // Book a write only if one may follow: a full dispatcher
            // claims nothing here.
            if room(ctx) > 0 {
                ctx.shared.pacer.turn(
                    ctx.store.last_enqueues(),
                    &ctx.counters.writes_yielded_to_app,
                );
            }
            let claiming = ctx.shared.claiming();
            want = ctx.batch_size.min(room(ctx));
            // What the usual claim takes: the same, less what limits cover
            // unless they allow a whole claim now (the rest is claimed
            // below, each group as far as its limits allow).
            let (selection, roomy) = limited::usual(ctx, want);
            let result = (want > 0 && !selection.is_empty())
                .then(|| claim_batch(ctx, jobs_tx, want, (&selection.filter(), &roomy), &|_| {}));
            drop(claiming);
            match result {
                Some(Ok(leases)) => {
                    backoff = Duration::from_millis(10);
                    claimed = true;
                    got = leases.len();
                }
                Some(Err(err)) if err.is_schema_problem() => {
                    // No retry mends a table altered by hand: stop claiming,
                    // say why once, and let the handle report it.
                    Counters::add(&ctx.counters.store_errors, 1);
                    tracing::error!(error = %err, "outbox claim failed; the dispatcher stops claiming");
                    ctx.shared.halt(err.to_string());
                    break;
                }
                Some(Err(err)) => {
                    Counters::add(&ctx.counters.store_errors, 1);
                    tracing::warn!(error = %err, "outbox claim failed; retrying");
                    if pause(stop_rx, backoff) {
                        break;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
                None => {}
            }
        }
        // The limited types and destinations, each as far as its limits
        // allow; a rate limit that allows nothing now says when it will.
        let mut limits_next = None;
        if claim_now && !offline && !ctx.limits.is_empty() {
            match limited::claim_groups(ctx, jobs_tx) {
                Ok((n, next)) => {
                    got_limited = n;
                    limits_next = next;
                }
                Err(err) => {
                    Counters::add(&ctx.counters.store_errors, 1);
                    tracing::warn!(error = %err, "outbox claim of limited events failed; retrying");
                    limits_next = Some(ctx.store.clock().now());
                }
            }
        }
        if external && got + got_limited > 0 {
            watch_until = Some(Instant::now() + WATCH_WINDOW);
        }
        external = false;
        send_probes(ctx, jobs_tx);
        if got > 0 && got == want {
            // A full batch: more is probably waiting, so claim again before
            // asking when the next event falls due.
            continue;
        }
        if offline {
            due_at = None;
        } else if claimed || got_limited > 0 {
            due_at = match ctx.store.next_wakeup(&open.filter()) {
                Ok(at) => at,
                // Unknown: look again at the next tick.
                Err(_) => Some(ctx.store.clock().now()),
            };
        }
        if let Some(at) = limits_next {
            due_at = Some(due_at.map_or(at, |d| d.min(at)));
        }
        if woken && got == 0 {
            // Woken by an enqueue whose transaction may not have committed
            // yet: watch for its commit closely for a short while.
            eager = Some((Instant::now() + EAGER_WINDOW, EAGER_FIRST_STEP));
        }
        woken = false;

        let timeout = sleep_for(ctx, due_at, &mut eager, watch_until);
        match wakeups.wait(stop_rx, timeout) {
            Wake::Stop => break,
            Wake::Woken => {
                claim_now = true;
                woken = true;
            }
            Wake::Nudged => claim_now = true,
            Wake::Timeout => {
                let due = due_at.is_some_and(|t| ctx.store.clock().now() >= t);
                external = ctx.store.has_external_changes().unwrap_or(true);
                claim_now = due || external;
                if claim_now {
                    eager = None;
                }
            }
        }
    }
}

/// What ended a wait.
enum Wake {
    Stop,
    /// The handle's `wake`, or an enqueue in this process.
    Woken,
    /// The completer freed room.
    Nudged,
    Timeout,
}

/// The poller's wake-up sources. One whose sender is gone (a completer
/// that died, say) would make `select!` return at once for ever: it
/// becomes `never`.
struct Wakeups {
    wake: Receiver<()>,
    store_wake: Receiver<()>,
    nudge: Receiver<()>,
}

impl Wakeups {
    fn wait(&mut self, stop_rx: &Receiver<()>, timeout: Duration) -> Wake {
        select! {
            recv(stop_rx) -> _ => Wake::Stop,
            recv(self.wake) -> msg => {
                if msg.is_err() { self.wake = crossbeam_channel::never(); }
                Wake::Woken
            }
            recv(self.store_wake) -> msg => {
                if msg.is_err() { self.store_wake = crossbeam_channel::never(); }
                Wake::Woken
            }
            recv(self.nudge) -> msg => {
                if msg.is_err() { self.nudge = crossbeam_channel::never(); }
                Wake::Nudged
            }
            default(timeout) => Wake::Timeout,
        }
    }
}

/// How many more events may be claimed: the capacity (workers plus two
/// batches) less what is in flight.
pub(super) fn room(ctx: &Ctx) -> usize {
    ctx.capacity.saturating_sub(ctx.shared.inflight().len())
}

/// Claims up to `want` events of the types `filter` allows, takes those
/// of the limited groups `roomy` from their limits, records them as in
/// flight, tells `on_claim` and queues them for the workers; returns
/// their leases.
fn claim_batch(
    ctx: &Ctx,
    jobs_tx: &Sender<Event>,
    want: usize,
    (filter, roomy): (&TypeFilter<'_>, &[usize]),
    on_claim: &dyn Fn(&Lease),
) -> crate::Result<Vec<Lease>> {
    let events = ctx.store.claim_where(want, ctx.lease, filter)?;
    limited::took(ctx, roomy, &events);
    Ok(admit(ctx, jobs_tx, events, on_claim))
}

/// Sends one event to each held-back destination whose probe is due (if
/// there is room): the first that gets through brings the destination back.
/// A destination with nothing waiting is simply let go. A database error is
/// counted and logged; the probe goes at the next look.
fn send_probes(ctx: &Ctx, jobs_tx: &Sender<Event>) {
    if let Err(err) = try_send_probes(ctx, jobs_tx) {
        Counters::add(&ctx.counters.store_errors, 1);
        tracing::warn!(error = %err, "outbox probe claim failed; retrying");
    }
}

fn try_send_probes(ctx: &Ctx, jobs_tx: &Sender<Event>) -> crate::Result<()> {
    for destination in ctx.destinations.probes_due() {
        let _claiming = ctx.shared.claiming();
        if room(ctx) == 0 {
            return Ok(());
        }
        let selection = ctx
            .destinations
            .probe_selection(&destination, ctx.types.as_deref());
        let filter = selection.filter();
        // Marked as the probe before a worker can see it, so that it runs.
        let sent = claim_batch(ctx, jobs_tx, 1, (&filter, &[]), &|lease| {
            ctx.destinations.probe_sent(&destination, lease);
        })?;
        if sent.is_empty() {
            ctx.destinations.nothing_to_probe(&destination);
        } else {
            tracing::debug!(destination = %destination, "outbox probing destination");
        }
    }
    Ok(())
}

/// How long to sleep before looking again: the poll interval, cut short by
/// the next due time, the next probe of a destination held back, the
/// eager look-out after an in-process wake-up (which this advances), and
/// the close watch on other connections until `watch_until`.
fn sleep_for(
    ctx: &Ctx,
    due_at: Option<DateTime<Utc>>,
    eager: &mut Option<(Instant, Duration)>,
    watch_until: Option<Instant>,
) -> Duration {
    let due_at = match (due_at, ctx.destinations.next_probe_at()) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let mut timeout = ctx.poll_interval;
    if let Some(at) = due_at {
        let until = (at - ctx.store.clock().now())
            .to_std()
            .unwrap_or(Duration::ZERO)
            + Duration::from_millis(1);
        timeout = timeout.min(until);
    }
    if let Some((end, step)) = *eager {
        if Instant::now() >= end {
            *eager = None;
        } else if step < timeout {
            timeout = step;
            *eager = Some((end, (step * 2).min(Duration::from_millis(32))));
        }
    }
    if watch_until.is_some_and(|t| Instant::now() < t) {
        timeout = timeout.min(WATCH_STEP);
    }
    timeout
}
