//! The operator and unfenced tiers of the memory model.

use crate::store::PriorityStats;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{apply_retry, claimable, finish, key_index, truncate, MemoryStore};
use crate::clock;
use crate::error::{Error, Result};
use crate::event::{Event, Status};
use crate::id::EventId;
use crate::store::legacy::UnfencedStore;
use crate::store::DestinationState;
use crate::store::{
    new_token, throughput_bounds, ListFilter, Operator, Page, Requeue, Stats, Subject, Throughput,
    DEFAULT_LEASE,
};

impl Operator for MemoryStore {
    fn destinations(&self) -> Result<Vec<DestinationState>> {
        Ok(self
            .inner
            .destinations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect())
    }

    fn stats(&self) -> Result<Stats> {
        let now = truncate(self.now());
        let state = self.state();
        let mut stats = Stats::default();
        let mut oldest_due: Option<DateTime<Utc>> = None;
        for e in state.rows.values() {
            let due = e.status == Status::Pending && e.next_attempt_at <= now;
            stats.add(&e.event_type, e.status, 1, u64::from(due));
            if due {
                oldest_due =
                    Some(oldest_due.map_or(e.next_attempt_at, |t| t.min(e.next_attempt_at)));
            }
        }
        stats.oldest_due_age = oldest_due.map(|t| (now - t).to_std().unwrap_or(Duration::ZERO));
        let mut urgent: std::collections::BTreeMap<std::cmp::Reverse<u8>, PriorityStats> =
            std::collections::BTreeMap::new();
        for e in state.rows.values() {
            if e.status == Status::Pending && e.priority > 0 {
                let slot = urgent
                    .entry(std::cmp::Reverse(e.priority))
                    .or_insert_with(|| PriorityStats {
                        priority: e.priority,
                        ..PriorityStats::default()
                    });
                slot.pending += 1;
                slot.due += u64::from(e.next_attempt_at <= now);
            }
        }
        stats.by_priority = urgent.into_values().collect();
        let keys = key_index(&state, now);
        stats.behind_key = state
            .rows
            .values()
            .filter(|e| {
                e.status == Status::Pending
                    && e.next_attempt_at <= now
                    && e.ordering_key.is_some()
                    && !claimable(&keys, e, now)
            })
            .count() as u64;
        drop(state);
        stats.destinations = self
            .inner
            .destinations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let states: Vec<crate::store::LimitState> = self
            .inner
            .limits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .states
            .values()
            .cloned()
            .collect();
        for mut limit in states {
            if let crate::store::LimitKind::Concurrency(_) = limit.kind {
                let types = limit
                    .event_types
                    .clone()
                    .unwrap_or_else(|| vec![limit.name.clone()]);
                let filter = crate::store::sealed::TypeFilter::only(Some(&types));
                limit.in_flight = Some(self.live_leases(&filter, truncate(self.now())) as u64);
            }
            stats.limits.push(limit);
        }
        Ok(stats)
    }

    fn list_page(&self, filter: &ListFilter) -> Result<Page> {
        let state = self.state();
        let (Some(&min), Some(&max)) = (state.rows.keys().next(), state.rows.keys().next_back())
        else {
            return Ok(Page::default());
        };
        let Some(w) = filter.window(min, max) else {
            return Ok(Page::default());
        };
        let matching = state
            .rows
            .range(w.lo..=w.hi)
            .map(|(_, e)| e)
            .filter(|e| filter.matches(e))
            .cloned();
        let events = if filter.newest_first {
            matching.rev().take(filter.limit).collect()
        } else {
            matching.take(filter.limit).collect()
        };
        Ok(filter.page(events, w, min, max))
    }

    fn throughput(&self, since: DateTime<Utc>, bucket: Duration) -> Result<Vec<Throughput>> {
        let (since, enqueued, bucket) = throughput_bounds(since, bucket);
        let mut spans: std::collections::BTreeMap<i64, (u64, u64)> = Default::default();
        for e in self.state().rows.values() {
            let Some(done_at) = e.completed_at.map(clock::to_millis) else {
                continue;
            };
            if done_at < since || clock::to_millis(e.created_at) < enqueued {
                continue;
            }
            let span = spans.entry(done_at / bucket * bucket).or_default();
            match e.status {
                Status::Done => span.0 += 1,
                Status::Failed => span.1 += 1,
                _ => {}
            }
        }
        Ok(spans
            .into_iter()
            .map(|(t, (done, failed))| Throughput::at(t, done, failed))
            .collect())
    }

    fn requeue(&self, which: Requeue) -> Result<u64> {
        let now = truncate(self.now());
        let requeue = |e: &mut Event| {
            e.status = Status::Pending;
            e.attempts = 0;
            e.next_attempt_at = now;
            e.completed_at = None;
        };
        let n = match which {
            Requeue::One(id) => self.with_event(id, |e, _| {
                if e.status != Status::Failed {
                    return Err(Error::invalid(format!(
                        "event {id} is {}, not failed",
                        e.status
                    )));
                }
                requeue(e);
                Ok(1)
            })?,
            Requeue::Type(_) | Requeue::All => {
                let only = match &which {
                    Requeue::Type(t) => Some(t.clone()),
                    _ => None,
                };
                let mut state = self.state();
                let mut n = 0;
                for e in state.rows.values_mut() {
                    if e.status == Status::Failed
                        && only.as_ref().is_none_or(|t| &e.event_type == t)
                    {
                        requeue(e);
                        n += 1;
                    }
                }
                n
            }
        };
        if n > 0 {
            self.inner.notifier.notify();
        }
        Ok(n)
    }

    fn purge(&self, older_than: DateTime<Utc>) -> Result<u64> {
        let cutoff = truncate(older_than);
        Ok(self.remove_where(|e| {
            !(matches!(e.status, Status::Done | Status::Failed) && e.created_at < cutoff)
        }))
    }

    fn erase(&self, subject: Subject) -> Result<u64> {
        Ok(match subject {
            Subject::Org(org) => self.remove_where(|e| e.org_id != Some(org)),
            Subject::User(user) => self.remove_where(|e| e.user_id != Some(user)),
        })
    }

    fn cancel(&self, id: EventId, reason: &str) -> Result<()> {
        self.with_event(id, |e, now| {
            if matches!(e.status, Status::Done | Status::Failed) {
                return Err(Error::invalid(format!(
                    "event {id} is already {}",
                    e.status
                )));
            }
            e.last_error = Some(crate::event::capped_error(reason));
            finish(e, Status::Failed, now);
            Ok(())
        })
    }
}

impl UnfencedStore for MemoryStore {
    fn mark_processing(&self, id: EventId) -> Result<()> {
        self.with_event(id, |e, now| {
            match e.status {
                Status::Pending => e.attempts = e.attempts.saturating_add(1),
                Status::Processing => {}
                Status::Done | Status::Failed => {
                    return Err(Error::invalid(format!("event {id} is {}", e.status)))
                }
            }
            e.status = Status::Processing;
            e.locked_at = Some(now);
            e.locked_until = Some(truncate(clock::add(now, DEFAULT_LEASE)));
            e.lease_token = Some(new_token());
            Ok(())
        })
    }

    fn mark_done(&self, id: EventId) -> Result<()> {
        self.with_event(id, |e, now| {
            finish(e, Status::Done, now);
            Ok(())
        })
    }

    fn mark_delivered(&self, id: EventId) -> Result<()> {
        self.with_event(id, |e, now| {
            e.delivered_at = Some(now);
            Ok(())
        })
    }

    fn mark_retry(&self, id: EventId, error: &str) -> Result<()> {
        let policy = self.inner.policy.clone();
        self.with_event(id, |e, now| {
            apply_retry(e, &policy, &crate::event::capped_error(error), None, now);
            Ok(())
        })
    }

    fn mark_failed(&self, id: EventId, error: &str) -> Result<()> {
        self.with_event(id, |e, now| {
            e.last_error = Some(crate::event::capped_error(error));
            finish(e, Status::Failed, now);
            Ok(())
        })
    }

    fn count_pending(&self) -> Result<u64> {
        Ok(self.stats()?.pending)
    }

    fn count_failed(&self) -> Result<u64> {
        Ok(self.stats()?.failed)
    }
}
