//! The heartbeat: extends the leases of events still in hand before they
//! run out, and marks those whose lease moved on so they are not extended
//! again.
//!
//! Channels: stops on `stop`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use crossbeam_channel::Receiver;

use super::{pause, Ctx};
use crate::clock;
use crate::dispatch::Counters;
use crate::event::Lease;
use crate::store::Ack;

pub(super) fn heartbeat_loop(ctx: &Ctx, stop_rx: &Receiver<()>) {
    let tick = (ctx.lease / 4).clamp(Duration::from_millis(5), Duration::from_secs(5));
    loop {
        if pause(stop_rx, tick) {
            break;
        }
        let now = ctx.store.clock().now();
        let half = clock::duration_millis(ctx.lease / 2);
        let mut overran = Vec::new();
        let due: Vec<Lease> = {
            let mut inflight = ctx.shared.inflight();
            for f in inflight.values_mut() {
                let given_up = f.locked_until == DateTime::<Utc>::MAX_UTC;
                if !given_up
                    && ctx
                        .max_run_time
                        .is_some_and(|limit| f.claimed_at.elapsed() > limit)
                {
                    // Left to run out: never extended again.
                    f.locked_until = DateTime::<Utc>::MAX_UTC;
                    overran.push(f.lease);
                }
            }
            inflight
                .values()
                .filter(|f| (f.locked_until - now).num_milliseconds() < half)
                .map(|f| f.lease)
                .collect()
        };
        for lease in overran {
            Counters::add(&ctx.counters.past_max_run_time, 1);
            tracing::warn!(event_id = %lease.id, attempt = lease.attempt,
                "outbox handler ran past max_run_time; its lease is left to run out");
        }
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
                            // Gone from the map: its outcome was written
                            // meanwhile, which is why the extension was
                            // refused. Otherwise the lease is lost: keep it
                            // out of later extensions; the worker's outcome
                            // will be refused too.
                            if let Some(f) = inflight.get_mut(&key) {
                                Counters::add(&ctx.counters.lease_lost, 1);
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
