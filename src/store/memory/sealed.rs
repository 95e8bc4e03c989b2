//! The dispatcher's tier of the memory model: claims of chosen types,
//! outcomes with a claim in one step, the backlog and destinations.

use super::*;

impl crate::store::sealed::Sealed for MemoryStore {
    fn record_destination(&self, name: &str, state: Option<&DestinationState>) -> Result<()> {
        let mut map = self
            .inner
            .destinations
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match state {
            Some(s) => map.insert(name.to_owned(), s.clone()),
            None => map.remove(name),
        };
        Ok(())
    }

    fn claim_limited(
        &self,
        limit: usize,
        lease: Duration,
        filter: &TypeFilter<'_>,
        shared: &[crate::store::limits::SharedLimit<'_>],
    ) -> Result<crate::store::limits::Limited> {
        let mut limits = self.inner.limits.lock().unwrap_or_else(|p| p.into_inner());
        let now = truncate(self.now());
        crate::store::limits::claim_within(
            &mut limits.buckets,
            (shared, now, limit),
            |_| Ok(self.live_leases(filter, now)),
            |b, l| Ok(b.get(&(l.scope.as_str(), l.name.to_owned())).copied()),
            |_, want| self.claim_where(want, lease, filter),
            |b, l, left| {
                b.insert((l.scope.as_str(), l.name.to_owned()), left);
                Ok(())
            },
        )
    }

    fn record_limit(&self, state: &crate::store::LimitState) -> Result<()> {
        let mut limits = self.inner.limits.lock().unwrap_or_else(|p| p.into_inner());
        limits.states.insert(
            (
                state.scope.as_str(),
                state.name.clone(),
                state.kind.as_str(),
            ),
            state.clone(),
        );
        Ok(())
    }

    fn settle_and_claim(
        &self,
        acks: &[Ack],
        limit: usize,
        lease: Duration,
        filter: &TypeFilter<'_>,
    ) -> Result<(Vec<Result<()>>, Vec<Event>)> {
        let results = self.settle(acks)?;
        // Written: a claim that failed now is the poller's to make later.
        let claimed = self.claim_where(limit, lease, filter).unwrap_or_default();
        Ok((results, claimed))
    }

    fn claim_where(
        &self,
        limit: usize,
        lease: Duration,
        filter: &TypeFilter<'_>,
    ) -> Result<Vec<Event>> {
        let now = truncate(self.now());
        let until = truncate(clock::add(now, lease));
        let mut state = self.state();
        for e in state.rows.values_mut() {
            let expired = e.status == Status::Processing && e.locked_until.is_none_or(|t| t <= now);
            if expired && e.attempts >= e.max_attempts {
                e.last_error = Some(LEASE_EXPIRED_ERROR.to_owned());
                finish(e, Status::Failed, now);
            }
        }
        let keys = key_index(&state, now);
        let mut picked: Vec<_> = state
            .rows
            .values()
            .filter(|e| filter.allows(&e.event_type) && claimable(&keys, e, now))
            .map(|e| (crate::store::claim_order(e), e.seq))
            .collect();
        drop(keys);
        picked.sort();
        picked.truncate(limit);
        let mut claimed = Vec::with_capacity(picked.len());
        for (_, seq) in picked {
            if let Some(e) = state.rows.get_mut(&seq) {
                e.status = Status::Processing;
                e.attempts = e.attempts.saturating_add(1);
                e.locked_at = Some(now);
                e.locked_until = Some(until);
                e.lease_token = Some(new_token());
                claimed.push(e.clone());
            }
        }
        Ok(claimed)
    }

    fn backlog_where(&self, filter: &TypeFilter<'_>) -> Result<Backlog> {
        let now = truncate(self.now());
        let state = self.state();
        let keys = key_index(&state, now);
        let mine = || state.rows.values().filter(|e| filter.allows(&e.event_type));
        Ok(Backlog {
            due: mine().any(|e| e.status == Status::Pending && claimable(&keys, e, now)),
            processing: mine().any(|e| e.status == Status::Processing),
            next_due_at: mine()
                .filter(|e| e.status == Status::Pending && e.next_attempt_at > now)
                .map(|e| e.next_attempt_at)
                .min(),
        })
    }

    fn next_wakeup(&self, filter: &TypeFilter<'_>) -> Result<Option<DateTime<Utc>>> {
        let now = truncate(self.now());
        let state = self.state();
        Ok(state
            .rows
            .values()
            .filter(|e| filter.allows(&e.event_type))
            .filter_map(|e| match e.status {
                Status::Pending => Some(e.next_attempt_at),
                Status::Processing => e.locked_until,
                Status::Done | Status::Failed => None,
            })
            .filter(|t| *t > now)
            .min())
    }

    fn has_external_changes(&self) -> Result<bool> {
        // Nothing outside this process can write to it; in-process writes
        // notify subscribers directly.
        Ok(false)
    }

    fn subscribe(&self) -> Receiver<()> {
        self.inner.notifier.subscribe()
    }

    fn last_enqueues(&self) -> [Option<std::time::Instant>; 2] {
        self.inner.notifier.last_two()
    }
}
