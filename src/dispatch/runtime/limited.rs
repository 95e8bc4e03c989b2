//! Claims of the events limits cover: each limited type or destination on
//! its own, never more than its limits allow (this dispatcher's own, and
//! those every dispatcher keeps together, taken in the claim's
//! transaction), and never more than the room the workers have.

use chrono::{DateTime, Utc};
use crossbeam_channel::Sender;

use super::poller::room;
use super::{admit, Ctx};
use crate::dispatch::destinations::Selection;
use crate::event::Event;

/// What a usual claim of up to `want` events may take: everything of the
/// destinations not held back, less the limited groups, but for those
/// this dispatcher keeps alone whose limits allow `want` more now (a
/// limit far from binding then costs nothing). Returns the groups it lets
/// in; [`took`] counts what the claim took of them.
pub(super) fn usual(ctx: &Ctx, want: usize) -> (Selection, Vec<usize>) {
    let types = ctx.types.as_deref();
    if ctx.limits.is_empty() {
        return (ctx.limits.usual(&ctx.destinations, types, &[]), Vec::new());
    }
    let now = ctx.store.clock().now();
    let inflight = ctx.shared.inflight();
    let roomy: Vec<usize> = ctx
        .limits
        .groups()
        .filter(|(index, group)| {
            !group.has_shared() && {
                let mine = inflight
                    .values()
                    .filter(|f| f.group == Some(*index))
                    .count();
                group.allowance(mine, now) >= want
            }
        })
        .map(|(index, _)| index)
        .collect();
    drop(inflight);
    (ctx.limits.usual(&ctx.destinations, types, &roomy), roomy)
}

/// Takes what a usual claim claimed of each group `roomy` let in from
/// that group's own rate limit.
pub(super) fn took(ctx: &Ctx, roomy: &[usize], events: &[Event]) {
    for (index, group) in ctx.limits.groups().filter(|(i, _)| roomy.contains(i)) {
        let n = events
            .iter()
            .filter(|e| ctx.limits.group_of(&ctx.destinations, &e.event_type) == Some(index))
            .count();
        group.took(n);
    }
}

/// Claims for each limited group as much as its limits and the room allow;
/// returns how many events were claimed, and the earliest time a rate
/// limit that allows nothing now will allow more.
pub(super) fn claim_groups(
    ctx: &Ctx,
    jobs_tx: &Sender<Event>,
) -> crate::Result<(usize, Option<DateTime<Utc>>)> {
    let (mut got, mut next): (usize, Option<DateTime<Utc>>) = (0, None);
    let types = ctx.types.as_deref();
    for (index, group) in ctx.limits.groups() {
        let Some(selection) = ctx.limits.selection(index, &ctx.destinations, types) else {
            continue;
        };
        if selection.is_empty() {
            continue;
        }
        let filter = selection.filter();
        let claiming = ctx.shared.claiming();
        let room = room(ctx);
        if room == 0 {
            break;
        }
        let in_flight = ctx
            .shared
            .inflight()
            .values()
            .filter(|f| f.group == Some(index))
            .count();
        let now = ctx.store.clock().now();
        let own = group.allowance(in_flight, now);
        let fits = ctx.batch_size.min(room);
        let want = fits.min(own);
        let shared = group.shared();
        let (events, allowed, shared_next) = if want == 0 {
            (Vec::new(), 0, None)
        } else if shared.is_empty() {
            (
                ctx.store.claim_where(want, ctx.lease, &filter)?,
                usize::MAX,
                None,
            )
        } else {
            let l = ctx.store.claim_limited(want, ctx.lease, &filter, &shared)?;
            (l.events, l.allowed, l.next_at)
        };
        let n = events.len();
        // What this dispatcher's own rate limit has left, and when it
        // next allows one more if it allows none.
        let own_next = group.took(n);
        admit(ctx, jobs_tx, events, &|_| {});
        drop(claiming);
        got += n;
        // The limits, not the backlog or the room, ended this claim: if
        // more of its events are due, they wait for the limits.
        let cap = own.min(allowed);
        let waiting = n == cap && cap < fits && ctx.store.backlog_where(&filter)?.due;
        group.record(&*ctx.store, waiting, now, false);
        if waiting {
            // A rate limit says when; a concurrency limit frees room when
            // an event finishes (here: the completer's nudge; elsewhere:
            // the next look at other connections' commits).
            for at in [own_next, shared_next].into_iter().flatten() {
                next = Some(next.map_or(at, |t: DateTime<Utc>| t.min(at)));
            }
            if own_next.is_none() && shared_next.is_none() && group.has_shared() {
                let at = crate::clock::add(now, ctx.poll_interval);
                next = Some(next.map_or(at, |t| t.min(at)));
            }
        }
    }
    Ok((got, next))
}
