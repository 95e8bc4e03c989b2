//! The completer: writes outcomes in batches, a few transactions for many
//! events, and in the same transaction claims the room they free; retries
//! errors that can pass and drops (to redelivery) what cannot be written;
//! then lets the poller know there is room again.
//!
//! Channels: receives on `outcomes` (closed when every worker is gone) and
//! `flush` (the deadline to finish by at shutdown); sends on `nudge`, and
//! on `jobs` what it claimed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};

use super::{admit, limited, panic_message, Ctx, Kind, Outcome};
use crate::dispatch::Counters;
use crate::error::Error;
use crate::store::Ack;

/// Most outcomes written in one transaction.
const MAX_SETTLE_BATCH: usize = 512;

/// Writes outcomes in batches until every worker is gone or a flush is
/// requested; returns how many outcomes could not be written.
pub(super) fn completer_loop(
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
        if !batch.is_empty() {
            // Outcomes that arrive while it waits join this batch.
            ctx.shared.pacer.turn(
                ctx.store.last_enqueues(),
                &ctx.counters.writes_yielded_to_app,
            );
        }
        while batch.len() < MAX_SETTLE_BATCH {
            match outcomes_rx.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            let written = catch_unwind(AssertUnwindSafe(|| {
                write_batch(ctx, &mut batch, &mut flush_by, flush_rx)
            }));
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
/// `give_up_at`. A shutdown that begins while this retries sets
/// `give_up_at` through `flush_rx`, so a database that stays locked cannot
/// hold a shutdown past its deadline. Errors that will not go away drop the
/// batch at once.
fn write_batch(
    ctx: &Ctx,
    batch: &mut Vec<Outcome>,
    give_up_at: &mut Option<Instant>,
    flush_rx: &Receiver<Instant>,
) -> bool {
    let acks: Vec<Ack> = batch.iter().map(|o| o.ack.clone()).collect();
    let results = match settle_and_claim(ctx, &acks) {
        Some(results) => results,
        None => match settle_retrying(ctx, &acks, batch, give_up_at, flush_rx) {
            Ok(results) => results,
            Err(written) => return written,
        },
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
                Kind::HeldBack => Counters::add(&c.held_back, 1),
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

/// The first try at writing outcomes: in the same transaction, claims as
/// many events as they free room for, so that a dispatcher that keeps up
/// with its backlog writes once per batch instead of twice. `None` when it
/// did not write (the dispatcher is stopping, nothing may be claimed, or
/// the write failed): the outcomes are then written on their own.
fn settle_and_claim(ctx: &Ctx, acks: &[Ack]) -> Option<Vec<crate::Result<()>>> {
    if ctx.shared.stopping.load(Ordering::SeqCst) || ctx.destinations.is_offline() {
        return None;
    }
    let _claiming = ctx.shared.claiming();
    // Gone once the poller stopped: nothing more is queued then.
    let jobs_tx = ctx.shared.jobs().clone()?;
    let in_hand = ctx.shared.inflight().len().saturating_sub(acks.len());
    let want = ctx.batch_size.min(ctx.capacity.saturating_sub(in_hand));
    let (selection, roomy) = limited::usual(ctx, want);
    if selection.is_empty() {
        return None;
    }
    match ctx
        .store
        .settle_and_claim(acks, want, ctx.lease, &selection.filter())
    {
        Ok((results, events)) => {
            limited::took(ctx, &roomy, &events);
            {
                // The room the outcomes freed is what was just claimed.
                let mut inflight = ctx.shared.inflight();
                for ack in acks {
                    inflight.remove(&(ack.lease().seq, ack.lease().token));
                }
            }
            admit(ctx, &jobs_tx, events, &|_| {});
            Some(results)
        }
        Err(err) => {
            Counters::add(&ctx.counters.store_errors, 1);
            tracing::warn!(error = %err, outcomes = acks.len(), "outbox could not write outcomes; retrying");
            None
        }
    }
}

/// Writes outcomes on their own, retrying what can pass. `Err(true)`: the
/// batch was dropped (an error that will not go away); `Err(false)`: still
/// failing at `give_up_at`.
fn settle_retrying(
    ctx: &Ctx,
    acks: &[Ack],
    batch: &mut Vec<Outcome>,
    give_up_at: &mut Option<Instant>,
    flush_rx: &Receiver<Instant>,
) -> Result<Vec<crate::Result<()>>, bool> {
    let mut backoff = Duration::from_millis(5);
    loop {
        match ctx.store.settle(acks) {
            Ok(results) => return Ok(results),
            Err(err) if is_lasting(&err) => {
                Counters::add(&ctx.counters.store_errors, 1);
                tracing::error!(error = %err, outcomes = acks.len(),
                    "outbox cannot write outcomes and will not retry; their events are redelivered");
                drop_outcomes(ctx, batch);
                return Err(true);
            }
            Err(err) => {
                Counters::add(&ctx.counters.store_errors, 1);
                tracing::warn!(error = %err, outcomes = acks.len(), "outbox could not write outcomes; retrying");
                if let Ok(deadline) = flush_rx.try_recv() {
                    *give_up_at = Some(deadline);
                }
                if give_up_at.is_some_and(|t| Instant::now() >= t) {
                    return Err(false);
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
