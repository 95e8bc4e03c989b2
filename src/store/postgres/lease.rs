//! Claiming and settling on PostgreSQL: leases taken with `SKIP LOCKED`,
//! outcomes fenced by the lease token, other dispatchers told.

use super::*;

impl PostgresStore {
    /// Claims up to `limit` events in `tx`: expired leases on their last
    /// attempt fail, and due events and other expired leases are leased,
    /// highest priority first, then in (due time, enqueue order), skipping
    /// rows another claimer has locked.
    pub(super) fn claim_in(
        &self,
        tx: &mut Tx<'_>,
        limit: usize,
        lease: Duration,
        filter: &TypeFilter<'_>,
    ) -> Result<Vec<Event>> {
        let sql = &self.inner.sql;
        let now = self.now();
        let (now_ms, until_ms) = (
            clock::to_millis(now),
            clock::to_millis(clock::add(now, lease)),
        );
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let (only, skip) = type_lists(filter);
        // One statement: fails the leases that ran out on their last
        // attempt, then leases due events and the other run-out leases.
        let rows = tx.query(
            &sql.claim,
            &[
                &now_ms,
                &until_ms,
                &limit,
                &only,
                &skip,
                &LEASE_EXPIRED_ERROR,
            ],
        )?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in &rows {
            let (event, problem) = decode(row);
            match problem {
                None => claimed.push(event),
                Some(problem) => {
                    let error = format!("the stored row cannot be read: {problem}");
                    tracing::error!(seq = event.seq, error = %error, "outbox event set aside as failed");
                    tx.execute(&sql.set_aside, &[&event.seq, &now_ms, &error])?;
                }
            }
        }
        claimed.sort_by_key(crate::store::claim_order);
        Ok(claimed)
    }

    /// Writes the fenced outcomes in `tx`, one result per ack.
    pub(super) fn settle_in(&self, tx: &mut Tx<'_>, acks: &[Ack]) -> Result<Vec<Result<()>>> {
        let sql = &self.inner.sql;
        let policy = &self.inner.policy;
        let now = clock::to_millis(self.now());
        let mut results = Vec::with_capacity(acks.len());
        let mut released = false;
        let mut rest = acks;
        while let Some(ack) = rest.first() {
            // A run of completions (the common case) is one statement;
            // runs keep the acks' order, so each result is what it would
            // be one by one.
            let run = rest
                .iter()
                .take_while(|a| matches!(a.kind, AckKind::Complete))
                .count();
            if run > 1 {
                let (done, after) = rest.split_at(run);
                results.extend(self.complete_all(tx, done, now)?);
                rest = after;
                continue;
            }
            rest = &rest[1..];
            let l = &ack.lease;
            let changed = match &ack.kind {
                AckKind::Complete => tx.execute(&sql.ack_done, &[&l.seq, &l.token, &now])?,
                AckKind::Retry { error, delay } => {
                    let wait =
                        delay.unwrap_or_else(|| policy.jittered_delay(l.attempt, l.seq as u64));
                    let next = clock::to_millis(clock::add(clock::from_millis(now), wait));
                    tx.execute(&sql.ack_retry, &[&l.seq, &l.token, &now, error, &next])?
                }
                AckKind::Fail { error } => {
                    tx.execute(&sql.ack_fail, &[&l.seq, &l.token, &now, error])?
                }
                AckKind::Extend { by } => {
                    let until = clock::to_millis(clock::add(clock::from_millis(now), *by));
                    tx.execute(&sql.ack_extend, &[&l.seq, &l.token, &until])?
                }
                AckKind::Release => {
                    released = true;
                    tx.execute(&sql.ack_release, &[&l.seq, &l.token])?
                }
                AckKind::Defer { error, delay } => {
                    let until = clock::to_millis(clock::add(clock::from_millis(now), *delay));
                    tx.execute(&sql.ack_defer, &[&l.seq, &l.token, &until, error])?
                }
            };
            results.push(if changed == 1 {
                Ok(())
            } else {
                Err(Error::lease_lost(l.id, l.attempt))
            });
        }
        if released {
            // Events given back are claimable again: tell dispatchers
            // elsewhere, as an insert does.
            self.notify_others(tx)?;
        }
        Ok(results)
    }

    /// Completes the fenced `acks` in one statement: one result each, a
    /// lease named twice is completed once.
    pub(super) fn complete_all(
        &self,
        tx: &mut Tx<'_>,
        acks: &[Ack],
        now: i64,
    ) -> Result<Vec<Result<()>>> {
        let seqs: Vec<i64> = acks.iter().map(|a| a.lease.seq).collect();
        let tokens: Vec<i64> = acks.iter().map(|a| a.lease.token).collect();
        let rows = tx.query(&self.inner.sql.ack_done_all, &[&seqs, &tokens, &now])?;
        let mut changed: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
        Ok(acks
            .iter()
            .map(|a| {
                if changed.remove(&a.lease.seq) {
                    Ok(())
                } else {
                    Err(Error::lease_lost(a.lease.id, a.lease.attempt))
                }
            })
            .collect())
    }

    /// Wakes the dispatchers that listen on this schema, when `tx` commits.
    pub(super) fn notify_others(&self, tx: &mut Tx<'_>) -> Result<()> {
        tx.execute(
            "SELECT pg_notify($1, '')",
            &[&self.inner.listener.channel()],
        )?;
        Ok(())
    }
}

/// The type lists of `filter` as the statements take them (`text[]`, NULL
/// for "all" and for "none skipped").
pub(super) fn type_lists<'a>(
    filter: &TypeFilter<'a>,
) -> (Option<Vec<&'a str>>, Option<Vec<&'a str>>) {
    let list = |t: &'a [String]| t.iter().map(String::as_str).collect();
    (
        filter.only.map(list),
        (!filter.skip.is_empty()).then(|| list(filter.skip)),
    )
}
