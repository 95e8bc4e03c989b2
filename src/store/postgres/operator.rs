//! What operators do on PostgreSQL (stats, list, requeue, cancel, purge,
//! erase) and the unfenced tier: the same statements as on SQLite.

use crate::store::PriorityStats;
use std::time::Duration;

use chrono::{DateTime, Utc};
use postgres::types::ToSql;

use super::sql::NEW_TOKEN;
use super::{decode, PostgresStore};
use crate::clock;
use crate::error::{Error, Result};
use crate::event::{capped_error, Status};
use crate::id::EventId;
use crate::store::count_u64;
use crate::store::legacy::UnfencedStore;
use crate::store::report::{Condition, ConditionValue};
use crate::store::unchanged;
use crate::store::{
    throughput_bounds, DestinationState, Hold, ListFilter, Operator, Page, Requeue, Stats, Store,
    Subject, Throughput, DEFAULT_LEASE,
};

impl From<PostgresStore> for std::sync::Arc<dyn Store> {
    fn from(store: PostgresStore) -> Self {
        std::sync::Arc::new(store)
    }
}

impl PostgresStore {
    /// Runs `sql` (which names the event by `id = $1`, then `params`) and
    /// maps "no row changed" to not found.
    fn update_by_id(&self, id: EventId, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<()> {
        let uuid = id.as_uuid();
        let mut all: Vec<&(dyn ToSql + Sync)> = vec![&uuid];
        all.extend_from_slice(params);
        let n = self.write(|tx| tx.execute(sql, &all))?;
        if n == 0 {
            return Err(Error::not_found(id));
        }
        Ok(())
    }
}

impl Operator for PostgresStore {
    fn stats(&self) -> Result<Stats> {
        let now = clock::to_millis(self.now());
        let (e, d) = (&self.inner.sql.events, &self.inner.sql.destinations);
        let mut conn = self.conn()?;
        // One snapshot, so the counts agree with each other.
        let mut tx = conn
            .client
            .build_transaction()
            .isolation_level(postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()?;
        let mut stats = Stats::default();
        let rows = tx.query(
            &format!(
                "SELECT event_type, status, count(*),
                        count(*) FILTER (WHERE status = 'pending' AND next_attempt_at <= $1)
                 FROM {e} GROUP BY event_type, status"
            ),
            &[&now],
        )?;
        for row in rows {
            // Rows that do not read as the schema says are left out, not
            // fatal.
            let (Ok(event_type), Ok(status), Ok(n), Ok(due)) = (
                row.try_get::<_, String>(0),
                row.try_get::<_, String>(1),
                row.try_get::<_, i64>(2),
                row.try_get::<_, i64>(3),
            ) else {
                continue;
            };
            let status = status.parse().unwrap_or(Status::Pending);
            stats.add(&event_type, status, count_u64(n), count_u64(due));
        }
        let oldest: Option<i64> = tx
            .query_one(
                &format!(
                    "SELECT min(next_attempt_at) FROM {e}
                     WHERE status = 'pending' AND next_attempt_at <= $1"
                ),
                &[&now],
            )?
            .get(0);
        stats.oldest_due_age =
            oldest.map(|t| Duration::from_millis(u64::try_from(now - t).unwrap_or(0)));
        let rows = tx.query(
            &format!(
                "SELECT priority::bigint, count(*), count(*) FILTER (WHERE next_attempt_at <= $1)
                 FROM {} WHERE status = 'pending' AND priority > 0
                 GROUP BY priority ORDER BY priority DESC",
                self.inner.sql.events
            ),
            &[&now],
        )?;
        for row in &rows {
            stats.by_priority.push(PriorityStats {
                priority: u8::try_from(row.get::<_, i64>(0)).unwrap_or(u8::MAX),
                pending: count_u64(row.get(1)),
                due: count_u64(row.get(2)),
            });
        }
        let behind: i64 = tx.query_one(&self.inner.sql.behind_key, &[&now])?.get(0);
        stats.behind_key = count_u64(behind);
        stats.destinations = read_destinations(&mut tx, d)?;
        stats.limits = super::limits::read_limits(&mut tx, &self.inner.schema, e, now)?;
        tx.commit()?;
        Ok(stats)
    }

    fn destinations(&self) -> Result<Vec<DestinationState>> {
        let mut conn = self.conn()?;
        let mut tx = conn.client.build_transaction().read_only(true).start()?;
        let list = read_destinations(&mut tx, &self.inner.sql.destinations)?;
        tx.commit()?;
        Ok(list)
    }

    fn list_page(&self, filter: &ListFilter) -> Result<Page> {
        // The same conditions as on SQLite, only those asked for.
        let mut clauses = vec!["t.seq BETWEEN $1 AND $2".to_owned()];
        if let Some(s) = filter.status {
            clauses.push(format!("t.status = '{}'", s.as_str()));
        }
        let mut args: Vec<Box<dyn ToSql + Sync>> = Vec::new();
        for c in filter.conditions() {
            let n = args.len() + 3;
            let value = match c {
                Condition::Equals(column, v) => {
                    clauses.push(format!("t.{column} = ${n}"));
                    v
                }
                Condition::Contains(column, t) => {
                    clauses.push(format!("strpos(t.{column}, ${n}) > 0"));
                    ConditionValue::Text(t)
                }
            };
            args.push(match value {
                ConditionValue::Text(t) => Box::new(t.to_owned()),
                ConditionValue::Uuid(u) => Box::new(u),
            });
        }
        let order = if filter.newest_first { "DESC" } else { "ASC" };
        let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
        let e = &self.inner.sql.events;
        let sql = format!(
            "SELECT {} FROM {e} AS t WHERE {} ORDER BY t.seq {order} LIMIT {limit}",
            self.inner.sql.columns,
            clauses.join(" AND ")
        );
        let bounds = format!("SELECT (SELECT min(seq) FROM {e}), (SELECT max(seq) FROM {e})");
        self.read(|c| {
            let row = c.query_one(&bounds, &[])?;
            let (Some(min), Some(max)) = (
                row.try_get::<_, Option<i64>>(0)?,
                row.try_get::<_, Option<i64>>(1)?,
            ) else {
                return Ok(Page::default());
            };
            let Some(w) = filter.window(min, max) else {
                return Ok(Page::default());
            };
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![&w.lo, &w.hi];
            params.extend(args.iter().map(|a| a.as_ref()));
            let rows = c.query(&sql, &params)?;
            let events = rows.iter().map(|r| decode(r).0).collect();
            Ok(filter.page(events, w, min, max))
        })
    }

    fn throughput(&self, since: DateTime<Utc>, bucket: Duration) -> Result<Vec<Throughput>> {
        let (since, enqueued, bucket) = throughput_bounds(since, bucket);
        let sql = format!(
            "SELECT completed_at / $3 * $3 AS span,
                    count(*) FILTER (WHERE status = 'done'), count(*) FILTER (WHERE status = 'failed')
             FROM {}
             WHERE status IN ('done', 'failed') AND created_at >= $2 AND completed_at >= $1
             GROUP BY span ORDER BY span",
            self.inner.sql.events
        );
        self.read(|c| {
            let rows = c.query(&sql, &[&since, &enqueued, &bucket])?;
            rows.iter()
                .map(|r| {
                    Ok(Throughput::at(
                        r.try_get(0)?,
                        count_u64(r.try_get(1)?),
                        count_u64(r.try_get(2)?),
                    ))
                })
                .collect()
        })
    }

    fn requeue(&self, which: Requeue) -> Result<u64> {
        let now = clock::to_millis(self.now());
        let e = &self.inner.sql.events;
        let set = format!(
            "UPDATE {e} SET status = 'pending', attempts = 0, next_attempt_at = $1,
               completed_at = NULL WHERE status = 'failed'"
        );
        let n = self.write(|tx| {
            let n = match &which {
                Requeue::One(id) => {
                    tx.execute(&format!("{set} AND id = $2"), &[&now, &id.as_uuid()])?
                }
                Requeue::Type(t) => {
                    tx.execute(&format!("{set} AND event_type = $2"), &[&now, t])?
                }
                Requeue::All => tx.execute(&set, &[&now])?,
            };
            if n > 0 {
                self.notify_others(tx)?;
            }
            Ok(n)
        })?;
        if let (Requeue::One(id), 0) = (&which, n) {
            return Err(unchanged(self, *id, |s| format!("{s}, not failed")));
        }
        if n > 0 {
            self.inner.notifier.notify();
        }
        Ok(n)
    }

    fn cancel(&self, id: EventId, reason: &str) -> Result<()> {
        let now = clock::to_millis(self.now());
        let e = &self.inner.sql.events;
        let changed = self.write(|tx| {
            tx.execute(
                &format!(
                    "UPDATE {e} SET status = 'failed', completed_at = $2, last_error = $3,
                       locked_at = NULL, locked_until = NULL, lease_token = NULL
                     WHERE id = $1 AND status IN ('pending', 'processing')"
                ),
                &[&id.as_uuid(), &now, &capped_error(reason)],
            )
        })?;
        if changed == 1 {
            return Ok(());
        }
        Err(unchanged(self, id, |s| format!("already {s}")))
    }

    fn purge(&self, older_than: DateTime<Utc>) -> Result<u64> {
        let e = &self.inner.sql.events;
        self.write(|tx| {
            tx.execute(
                &format!("DELETE FROM {e} WHERE status IN ('done', 'failed') AND created_at < $1"),
                &[&clock::to_millis(older_than)],
            )
        })
    }

    fn erase(&self, subject: Subject) -> Result<u64> {
        let e = &self.inner.sql.events;
        let (column, id) = match subject {
            Subject::Org(org) => ("org_id", org),
            Subject::User(user) => ("user_id", user),
        };
        self.write(|tx| tx.execute(&format!("DELETE FROM {e} WHERE {column} = $1"), &[&id]))
    }
}

impl UnfencedStore for PostgresStore {
    fn mark_processing(&self, id: EventId) -> Result<()> {
        let now = self.now();
        let until = clock::add(now, DEFAULT_LEASE);
        let e = &self.inner.sql.events;
        let changed = self.write(|tx| {
            tx.execute(
                &format!(
                    "UPDATE {e}
                     SET attempts = attempts + CASE WHEN status = 'pending' THEN 1 ELSE 0 END,
                         status = 'processing', locked_at = $2, locked_until = $3,
                         lease_token = {NEW_TOKEN}
                     WHERE id = $1 AND status IN ('pending', 'processing')"
                ),
                &[
                    &id.as_uuid(),
                    &clock::to_millis(now),
                    &clock::to_millis(until),
                ],
            )
        })?;
        if changed == 0 {
            return Err(unchanged(self, id, |s| s.to_string()));
        }
        Ok(())
    }

    fn mark_done(&self, id: EventId) -> Result<()> {
        let e = &self.inner.sql.events;
        self.update_by_id(
            id,
            &format!(
                "UPDATE {e} SET status = 'done', completed_at = $2,
                   locked_at = NULL, locked_until = NULL, lease_token = NULL WHERE id = $1"
            ),
            &[&clock::to_millis(self.now())],
        )
    }

    fn mark_delivered(&self, id: EventId) -> Result<()> {
        let e = &self.inner.sql.events;
        self.update_by_id(
            id,
            &format!("UPDATE {e} SET delivered_at = $2 WHERE id = $1"),
            &[&clock::to_millis(self.now())],
        )
    }

    fn mark_retry(&self, id: EventId, error: &str) -> Result<()> {
        let now = self.now();
        let policy = &self.inner.policy;
        let e = &self.inner.sql.events;
        let changed = self.write(|tx| {
            let row = tx.query_opt(
                &format!("SELECT seq, attempts FROM {e} WHERE id = $1 FOR UPDATE"),
                &[&id.as_uuid()],
            )?;
            let Some(row) = row else {
                return Ok(0);
            };
            let (seq, attempts): (i64, i64) = (row.get(0), row.get(1));
            let wait = policy.jittered_delay(u32::try_from(attempts).unwrap_or(0), seq as u64);
            tx.execute(
                &format!(
                    "UPDATE {e} SET last_error = $3,
                       status = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'pending' END,
                       completed_at = CASE WHEN attempts >= max_attempts THEN $2::bigint END,
                       next_attempt_at = CASE WHEN attempts >= max_attempts THEN next_attempt_at
                                         ELSE $4::bigint END,
                       locked_at = NULL, locked_until = NULL, lease_token = NULL
                     WHERE seq = $1"
                ),
                &[
                    &seq,
                    &clock::to_millis(now),
                    &capped_error(error),
                    &clock::to_millis(clock::add(now, wait)),
                ],
            )
        })?;
        if changed == 0 {
            return Err(Error::not_found(id));
        }
        Ok(())
    }

    fn mark_failed(&self, id: EventId, error: &str) -> Result<()> {
        let e = &self.inner.sql.events;
        self.update_by_id(
            id,
            &format!(
                "UPDATE {e} SET status = 'failed', completed_at = $2, last_error = $3,
                   locked_at = NULL, locked_until = NULL, lease_token = NULL WHERE id = $1"
            ),
            &[&clock::to_millis(self.now()), &capped_error(error)],
        )
    }

    fn count_pending(&self) -> Result<u64> {
        self.count("pending")
    }

    fn count_failed(&self) -> Result<u64> {
        self.count("failed")
    }
}

impl PostgresStore {
    fn count(&self, status: &str) -> Result<u64> {
        let e = &self.inner.sql.events;
        self.read(|c| {
            let n: i64 = c
                .query_one(
                    &format!("SELECT count(*) FROM {e} WHERE status = $1"),
                    &[&status],
                )?
                .get(0);
            Ok(count_u64(n))
        })
    }
}

/// The destinations written down in table `d`; rows that do not read as
/// the schema says are left out.
fn read_destinations(tx: &mut postgres::Transaction<'_>, d: &str) -> Result<Vec<DestinationState>> {
    let mut list = Vec::new();
    let rows = tx.query(
        &format!(
            "SELECT name, hold, since, next_probe_at, last_error, updated_at
                 FROM {d} ORDER BY name"
        ),
        &[],
    )?;
    for r in rows {
        let hold = match r.try_get::<_, String>(1).as_deref() {
            Ok("unreachable") => Hold::Unreachable,
            Ok("paused") => Hold::Paused,
            _ => continue,
        };
        let (Ok(name), Ok(since), Ok(next), Ok(last_error), Ok(updated)) = (
            r.try_get::<_, String>(0),
            r.try_get::<_, i64>(2),
            r.try_get::<_, Option<i64>>(3),
            r.try_get::<_, Option<String>>(4),
            r.try_get::<_, i64>(5),
        ) else {
            continue;
        };
        list.push(DestinationState {
            name,
            hold,
            since: clock::from_millis(since),
            next_probe_at: next.map(clock::from_millis),
            last_error,
            updated_at: clock::from_millis(updated),
        });
    }
    Ok(list)
}
