//! Claims and the fenced outcomes: the two writes a worker makes.

use std::time::Duration;

use rusqlite::{params, Transaction};

use super::sql::{
    claim_by_types_sql, claim_front_sql, ACK_DEFER_SQL, ACK_DONE_SQL, ACK_EXTEND_SQL, ACK_FAIL_SQL,
    ACK_RELEASE_SQL, ACK_RETRY_SQL, CLAIM_DUE_SQL, CLAIM_SQL, CLAIM_STATE_SQL, CLAIM_URGENT_SQL,
    FRONT_SCAN_BATCHES, MAX_TYPED_CLAIM, TYPE_PARAMS,
};
use super::{skip, types_json, SqliteStore};
use crate::clock;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::store::row::decode_row;
use crate::store::sealed::TypeFilter;
use crate::store::{Ack, AckKind, LEASE_EXPIRED_ERROR};
impl SqliteStore {
    pub(super) fn claim_events(
        &self,
        limit: usize,
        lease: Duration,
        filter: &TypeFilter<'_>,
    ) -> Result<Vec<Event>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.write_relaxed(|tx| self.claim_in(tx, limit, lease, filter))
    }

    /// Claims up to `limit` events in the transaction `tx`: the expired
    /// leases on their last attempt fail first, then the due events and
    /// the other expired leases are leased, highest priority first, then
    /// in (due time, enqueue order).
    pub(super) fn claim_in(
        &self,
        tx: &Transaction<'_>,
        limit: usize,
        lease: Duration,
        filter: &TypeFilter<'_>,
    ) -> Result<Vec<Event>> {
        // Read with the lock held: a claim that waited for the lock must
        // not be born with a lease that already ran out.
        let now = self.now();
        let until = clock::add(now, lease);
        let (now_ms, until_ms) = (clock::to_millis(now), clock::to_millis(until));
        let (expired, any_urgent): (bool, bool) = tx
            .prepare_cached(CLAIM_STATE_SQL)?
            .query_row([now_ms], |r| Ok((r.get(0)?, r.get(1)?)))?;
        if expired {
            tx.prepare_cached(
                "UPDATE outbox_events
                 SET status = 'failed', completed_at = ?1, last_error = ?2,
                     locked_at = NULL, locked_until = NULL, lease_token = NULL
                 WHERE status = 'processing' AND locked_until <= ?1 AND attempts >= max_attempts",
            )?
            .execute(params![now_ms, LEASE_EXPIRED_ERROR])?;
        }
        let at = (now_ms, until_ms);
        // Raised priorities first, from their own index; the usual claim
        // takes the rest of the batch.
        let mut rows = if expired || any_urgent {
            run_claim(
                tx,
                &CLAIM_URGENT_SQL[usize::from(expired)],
                limit,
                at,
                filter,
            )?
        } else {
            Vec::new()
        };
        let limit = limit - rows.len();
        if limit == 0 {
            return finish_claim(tx, rows, now_ms);
        }
        let typed = filter
            .only
            .filter(|only| (1..=MAX_TYPED_CLAIM).contains(&only.len()) && filter.skip.is_empty());
        let rest = match typed {
            // Several types, no lease to take back: first the front of the
            // due index, then, if that came up short, each type's stretch
            // of the by-type index for the rest.
            Some(only) if only.len() > 1 && !expired && self.inner.front_claims.try_front() => {
                let mut rows = run_claim(tx, claim_front_sql(only.len()), limit, at, filter)?;
                if rows.len() < limit {
                    let more = run_claim(
                        tx,
                        claim_by_types_sql(only.len(), false),
                        limit - rows.len(),
                        at,
                        filter,
                    )?;
                    self.inner.front_claims.came_up_short(!more.is_empty());
                    rows.extend(more);
                }
                rows
            }
            Some(only) => run_claim(
                tx,
                claim_by_types_sql(only.len(), expired),
                limit,
                at,
                filter,
            )?,
            None if expired => run_claim(tx, &CLAIM_SQL, limit, at, filter)?,
            None => run_claim(tx, &CLAIM_DUE_SQL, limit, at, filter)?,
        };
        rows.extend(rest);
        finish_claim(tx, rows, now_ms)
    }

    pub(super) fn settle_acks(&self, acks: &[Ack]) -> Result<Vec<Result<()>>> {
        if acks.is_empty() {
            return Ok(Vec::new());
        }
        let only_extensions = acks
            .iter()
            .all(|a| matches!(a.kind, AckKind::Extend { .. }));
        let settle = |tx: &Transaction<'_>| self.settle_in(tx, acks);
        if only_extensions {
            self.write_relaxed(settle)
        } else {
            self.write(settle)
        }
    }

    /// Outcomes first, then a claim, in one synced transaction: the claim
    /// sees the events just finished (the next of an ordering key is free).
    pub(super) fn settle_and_claim_events(
        &self,
        acks: &[Ack],
        limit: usize,
        lease: Duration,
        filter: &TypeFilter<'_>,
    ) -> Result<(Vec<Result<()>>, Vec<Event>)> {
        if limit == 0 {
            return Ok((self.settle_acks(acks)?, Vec::new()));
        }
        self.write(|tx| {
            let results = self.settle_in(tx, acks)?;
            Ok((results, self.claim_in(tx, limit, lease, filter)?))
        })
    }

    /// Writes the fenced outcomes in `tx`, one result per ack.
    fn settle_in(&self, tx: &Transaction<'_>, acks: &[Ack]) -> Result<Vec<Result<()>>> {
        let policy = &self.inner.policy;
        let now = clock::to_millis(self.now());
        let mut results = Vec::with_capacity(acks.len());
        // Each statement is looked up once per batch, not once per ack.
        let mut done = None;
        let mut retry = None;
        let mut fail = None;
        let mut extend = None;
        let mut release = None;
        let mut defer = None;
        for ack in acks {
            let l = &ack.lease;
            let changed =
                match &ack.kind {
                    AckKind::Complete => cached(tx, &mut done, ACK_DONE_SQL)?
                        .execute(params![l.seq, l.token, now])?,
                    AckKind::Retry { error, delay } => {
                        let wait =
                            delay.unwrap_or_else(|| policy.jittered_delay(l.attempt, l.seq as u64));
                        let next = clock::to_millis(clock::add(clock::from_millis(now), wait));
                        cached(tx, &mut retry, ACK_RETRY_SQL)?
                            .execute(params![l.seq, l.token, now, error, next])?
                    }
                    AckKind::Fail { error } => cached(tx, &mut fail, ACK_FAIL_SQL)?
                        .execute(params![l.seq, l.token, now, error])?,
                    AckKind::Extend { by } => {
                        let until = clock::to_millis(clock::add(clock::from_millis(now), *by));
                        cached(tx, &mut extend, ACK_EXTEND_SQL)?
                            .execute(params![l.seq, l.token, until])?
                    }
                    AckKind::Release => cached(tx, &mut release, ACK_RELEASE_SQL)?
                        .execute(params![l.seq, l.token])?,
                    AckKind::Defer { error, delay } => {
                        let until = clock::to_millis(clock::add(clock::from_millis(now), *delay));
                        cached(tx, &mut defer, ACK_DEFER_SQL)?
                            .execute(params![l.seq, l.token, until, error])?
                    }
                };
            results.push(if changed == 1 {
                Ok(())
            } else {
                Err(Error::lease_lost(l.id, l.attempt))
            });
        }
        Ok(results)
    }
}

/// Runs the claim statement `sql` for at most `limit` events at
/// `(now, until)` of the types `filter` allows, binding what it names.
fn run_claim(
    tx: &Transaction<'_>,
    sql: &str,
    limit: usize,
    (now, until): (i64, i64),
    filter: &TypeFilter<'_>,
) -> Result<Vec<(Event, Option<String>)>> {
    let mut stmt = tx.prepare_cached(sql)?;
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    let (limit, scan) = (
        count(limit),
        count(limit.saturating_mul(FRONT_SCAN_BATCHES)),
    );
    // The type lists (`TYPE_OK`), as JSON, only for the statements that
    // test them: the dispatcher's usual claims name their types one by one.
    let lists = stmt.parameter_index(":types")?.is_some();
    let (types, skip) = if lists {
        (types_json(filter.only), types_json(skip(filter)))
    } else {
        (None, None)
    };
    let mut args: Vec<(&str, &dyn rusqlite::ToSql)> =
        vec![(":now", &now), (":until", &until), (":limit", &limit)];
    if stmt.parameter_index(":scan")?.is_some() {
        args.push((":scan", &scan));
    }
    if lists {
        args.push((":types", &types));
        args.push((":skip", &skip));
    }
    if stmt.parameter_index(TYPE_PARAMS[0])?.is_some() {
        for (name, t) in TYPE_PARAMS.iter().zip(filter.only.unwrap_or_default()) {
            args.push((name, t));
        }
    }
    let rows = stmt
        .query_map(&args[..], decode_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// Whether a claim of several types reads the front of the due index first
/// (see [`claim_front_sql`]). When other types wait in front, it comes up
/// short and the by-type claim does the work; then the next
/// [`FrontClaims::SKIP_AFTER_SHORT`] claims go straight to the by-type
/// index, so a long front of other types (a destination that is down)
/// costs one front read in that many claims.
#[derive(Debug, Default)]
pub(super) struct FrontClaims {
    skip: std::sync::atomic::AtomicU32,
}

impl FrontClaims {
    const SKIP_AFTER_SHORT: u32 = 32;

    /// True if this claim reads the front first.
    fn try_front(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.skip
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .is_err()
    }

    /// A front read came up short; `found_more` if the by-type claim then
    /// found events of these types behind other types.
    fn came_up_short(&self, found_more: bool) {
        if found_more {
            self.skip
                .store(Self::SKIP_AFTER_SHORT, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// The statement in `slot`, prepared (from the connection's cache) on
/// first use.
fn cached<'s, 'c>(
    tx: &'c Transaction<'_>,
    slot: &'s mut Option<rusqlite::CachedStatement<'c>>,
    sql: &str,
) -> Result<&'s mut rusqlite::CachedStatement<'c>> {
    Ok(match slot {
        Some(s) => s,
        None => slot.insert(tx.prepare_cached(sql)?),
    })
}

/// The claimed rows that can be read, in claim order (highest priority
/// first, then due time, then enqueue order); the others are set aside.
fn finish_claim(
    tx: &Transaction<'_>,
    rows: Vec<(Event, Option<String>)>,
    now: i64,
) -> Result<Vec<Event>> {
    let mut claimed = set_aside_undecodable(tx, rows, now)?;
    claimed.sort_by_key(crate::store::claim_order);
    Ok(claimed)
}

/// Fails, in the claim's own transaction, every claimed row that cannot be
/// read faithfully (another program's bad text, a damaged payload): it ends
/// `failed` with an error naming the column, and every other event keeps
/// flowing. Returns the rest.
fn set_aside_undecodable(
    tx: &Transaction<'_>,
    rows: Vec<(Event, Option<String>)>,
    now: i64,
) -> Result<Vec<Event>> {
    let mut good = Vec::with_capacity(rows.len());
    for (event, problem) in rows {
        let Some(problem) = problem else {
            good.push(event);
            continue;
        };
        let error = format!("the stored row cannot be read: {problem}");
        tracing::error!(seq = event.seq, error = %error, "outbox event set aside as failed");
        tx.prepare_cached(
            "UPDATE outbox_events SET status = 'failed', completed_at = ?2, last_error = ?3,
               locked_at = NULL, locked_until = NULL, lease_token = NULL
             WHERE seq = ?1",
        )?
        .execute(params![event.seq, now, error])?;
    }
    Ok(good)
}
