//! The unfenced tier on SQLite: id-based writes that take no lease.

use rusqlite::{params, OptionalExtension};

use super::SqliteStore;
use crate::clock;
use crate::error::{Error, Result};
use crate::id::EventId;
use crate::store::count_u64;
use crate::store::legacy::UnfencedStore;
use crate::store::unchanged;
use crate::store::DEFAULT_LEASE;

impl UnfencedStore for SqliteStore {
    fn mark_processing(&self, id: EventId) -> Result<()> {
        let now = self.now();
        let until = clock::add(now, DEFAULT_LEASE);
        let changed = self.write(|tx| {
            Ok(tx
                .prepare_cached(
                    "UPDATE outbox_events
                     SET attempts = attempts + (status = 'pending'), status = 'processing',
                         locked_at = ?2, locked_until = ?3, lease_token = random()
                     WHERE id = ?1 AND status IN ('pending', 'processing')",
                )?
                .execute(params![
                    id.to_string(),
                    clock::to_millis(now),
                    clock::to_millis(until)
                ])?)
        })?;
        if changed == 0 {
            return Err(unchanged(self, id, |s| s.to_string()));
        }
        Ok(())
    }

    fn mark_done(&self, id: EventId) -> Result<()> {
        self.update_by_id(
            id,
            "UPDATE outbox_events SET status = 'done', completed_at = ?2,
               locked_at = NULL, locked_until = NULL, lease_token = NULL WHERE id = ?1",
            &[&clock::to_millis(self.now())],
        )
    }

    fn mark_delivered(&self, id: EventId) -> Result<()> {
        self.update_by_id(
            id,
            "UPDATE outbox_events SET delivered_at = ?2 WHERE id = ?1",
            &[&clock::to_millis(self.now())],
        )
    }

    fn mark_retry(&self, id: EventId, error: &str) -> Result<()> {
        let now = self.now();
        let policy = &self.inner.policy;
        let changed = self.write(|tx| {
            let row: Option<(i64, i64)> = tx
                .prepare_cached("SELECT seq, attempts FROM outbox_events WHERE id = ?1")?
                .query_row([id.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let Some((seq, attempts)) = row else {
                return Ok(0);
            };
            let wait = policy.jittered_delay(u32::try_from(attempts).unwrap_or(0), seq as u64);
            Ok(tx
                .prepare_cached(
                    "UPDATE outbox_events SET last_error = ?3,
                       status = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'pending' END,
                       completed_at = CASE WHEN attempts >= max_attempts THEN ?2 END,
                       next_attempt_at = CASE WHEN attempts >= max_attempts THEN next_attempt_at ELSE ?4 END,
                       locked_at = NULL, locked_until = NULL, lease_token = NULL
                     WHERE seq = ?1",
                )?
                .execute(params![
                    seq,
                    clock::to_millis(now),
                    crate::event::capped_error(error),
                    clock::to_millis(clock::add(now, wait))
                ])?)
        })?;
        if changed == 0 {
            return Err(Error::not_found(id));
        }
        Ok(())
    }

    fn mark_failed(&self, id: EventId, error: &str) -> Result<()> {
        self.update_by_id(
            id,
            "UPDATE outbox_events SET status = 'failed', completed_at = ?2, last_error = ?3,
               locked_at = NULL, locked_until = NULL, lease_token = NULL WHERE id = ?1",
            &[
                &clock::to_millis(self.now()),
                &crate::event::capped_error(error),
            ],
        )
    }

    fn count_pending(&self) -> Result<u64> {
        self.read(|conn| {
            let n: i64 = conn
                .prepare_cached("SELECT count(*) FROM outbox_events WHERE status = 'pending'")?
                .query_row([], |r| r.get(0))?;
            Ok(count_u64(n))
        })
    }

    fn count_failed(&self) -> Result<u64> {
        self.read(|conn| {
            let n: i64 = conn
                .prepare_cached("SELECT count(*) FROM outbox_events WHERE status = 'failed'")?
                .query_row([], |r| r.get(0))?;
            Ok(count_u64(n))
        })
    }
}
