//! What operators do: look at the outbox, requeue, cancel, purge, erase,
//! check, back up.

use crate::store::PriorityStats;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};

use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{params, Connection, Transaction, TransactionBehavior};

use super::builder::create_private;
use super::sql::BEHIND_KEY_SQL;
use super::SqliteStore;
use crate::clock;
use crate::error::{Error, ErrorKind, Result};
use crate::event::Status;
use crate::id::EventId;
use crate::store::count_u64;
use crate::store::report::{Condition, ConditionValue};
use crate::store::row::{decode_row, row_to_event};
use crate::store::unchanged;
use crate::store::{
    throughput_bounds, DestinationState, Hold, ListFilter, Operator, Page, Requeue, Stats, Subject,
    Throughput,
};
impl SqliteStore {
    /// Writes a consistent copy of the outbox to `dest` (which must not
    /// exist), including commits still in the WAL, using `VACUUM INTO`.
    ///
    /// # Errors
    ///
    /// `InvalidInput` if `dest` exists; database and I/O errors.
    pub fn backup(&self, dest: impl AsRef<Path>) -> Result<()> {
        let dest = dest.as_ref();
        if dest.exists() {
            return Err(Error::invalid(format!("{} already exists", dest.display())));
        }
        let dest = dest
            .to_str()
            .ok_or_else(|| Error::invalid("backup path is not valid UTF-8"))?;
        // A copy is as private as the outbox: made empty with 0600 first
        // (VACUUM INTO fills an empty file and keeps its mode).
        create_private(Path::new(dest))?;
        let conn = self.conn()?;
        if let Err(e) = conn.execute("VACUUM INTO ?1", [dest]) {
            let _ = std::fs::remove_file(dest);
            return Err(e.into());
        }
        Ok(())
    }

    /// Runs `PRAGMA integrity_check`, which also compares every index
    /// with its table (a damaged index can make a claim or an idempotency
    /// check miss or double a row), then reads every event row as a claim
    /// would, and reports damage as [`ErrorKind::Corrupt`]: a file SQLite
    /// finds sound can still hold a payload that is no longer UTF-8 or
    /// JSON (a flipped bit, a plain-SQL writer's bytes). Its time grows
    /// with the file, a few seconds per million events; see
    /// [`SqliteStore::verify_quick`].
    ///
    /// # Errors
    ///
    /// `Corrupt` with the findings as the source; database errors.
    pub fn verify(&self) -> Result<()> {
        self.check("PRAGMA integrity_check")
    }

    /// As [`SqliteStore::verify`] with `PRAGMA quick_check`, which checks
    /// the file's structure but not that indexes match their table: for
    /// files too large to check fully as often as wanted.
    ///
    /// # Errors
    ///
    /// As [`SqliteStore::verify`].
    pub fn verify_quick(&self) -> Result<()> {
        self.check("PRAGMA quick_check")
    }

    fn check(&self, pragma: &str) -> Result<()> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(pragma)?;
        let lines: Vec<String> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        if lines != ["ok"] {
            return Err(Error::with_source(ErrorKind::Corrupt, lines.join("; ")));
        }
        // SQLite's check cannot see a payload that is no longer UTF-8 or
        // JSON: read every row as a claim would.
        let mut stmt =
            conn.prepare(&format!("SELECT {} FROM outbox_events", self.inner.columns))?;
        let mut bad = Vec::new();
        let mut count = 0usize;
        for row in stmt.query_map([], decode_row)? {
            if let (event, Some(problem)) = row? {
                count += 1;
                if bad.len() < 5 {
                    bad.push(format!("event seq {}: {problem}", event.seq));
                }
            }
        }
        if count > 0 {
            return Err(Error::with_source(
                ErrorKind::Corrupt,
                format!("{count} event row(s) cannot be read: {}", bad.join("; ")),
            ));
        }
        Ok(())
    }
}

impl Operator for SqliteStore {
    fn cancel(&self, id: EventId, reason: &str) -> Result<()> {
        let now = clock::to_millis(self.now());
        let changed = self.write(|tx| {
            Ok(tx
                .prepare_cached(
                    "UPDATE outbox_events SET status = 'failed', completed_at = ?2,
                       last_error = ?3, locked_at = NULL, locked_until = NULL, lease_token = NULL
                     WHERE id = ?1 AND status IN ('pending', 'processing')",
                )?
                .execute(params![
                    id.to_string(),
                    now,
                    crate::event::capped_error(reason)
                ])?)
        })?;
        if changed == 1 {
            return Ok(());
        }
        Err(unchanged(self, id, |s| format!("already {s}")))
    }

    fn destinations(&self) -> Result<Vec<DestinationState>> {
        self.read(|conn| read_destinations(conn).map_err(Error::from))
    }

    fn limits(&self) -> Result<Vec<crate::store::LimitState>> {
        let now = clock::to_millis(self.now());
        self.read(|conn| self.limits_in(conn, now))
    }

    fn stats(&self) -> Result<Stats> {
        let now = clock::to_millis(self.now());
        self.read(|conn| {
            // One read transaction, so the counts agree with each other; it
            // ends (rolled back) however this returns.
            let tx = Transaction::new_unchecked(conn, TransactionBehavior::Deferred)?;
            let conn: &Connection = &tx;
            let result = (|| {
                let mut stats = Stats::default();
                let mut stmt = conn.prepare_cached(
                    "SELECT event_type, status, count(*),
                            sum(status = 'pending' AND next_attempt_at <= ?1)
                     FROM outbox_events GROUP BY event_type, status",
                )?;
                // Text another program wrote badly is shown, not fatal.
                let lossy = |r: &rusqlite::Row<'_>, i| -> rusqlite::Result<String> {
                    Ok(match r.get_ref(i)? {
                        rusqlite::types::ValueRef::Text(b) => {
                            String::from_utf8_lossy(b).into_owned()
                        }
                        other => format!("{other:?}"),
                    })
                };
                let rows = stmt.query_map([now], |r| {
                    Ok((
                        lossy(r, 0)?,
                        lossy(r, 1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                })?;
                for row in rows {
                    let (event_type, status, n, due) = row?;
                    let status = status.parse().unwrap_or(Status::Pending);
                    stats.add(&event_type, status, count_u64(n), count_u64(due));
                }
                let oldest: Option<i64> = conn
                    .prepare_cached(
                        "SELECT min(next_attempt_at) FROM outbox_events
                         WHERE status = 'pending' AND next_attempt_at <= ?1",
                    )?
                    .query_row([now], |r| r.get(0))?;
                stats.oldest_due_age =
                    oldest.map(|t| Duration::from_millis(u64::try_from(now - t).unwrap_or(0)));
                stats.by_priority = self.priorities_in(conn, now)?;
                let behind: i64 = conn
                    .prepare_cached(&BEHIND_KEY_SQL)?
                    .query_row(rusqlite::named_params! {":now": now}, |r| r.get(0))?;
                stats.behind_key = count_u64(behind);
                stats.destinations = read_destinations(conn)?;
                stats.limits = self.limits_in(conn, now)?;
                Ok(stats)
            })();
            tx.finish()?;
            result
        })
    }

    fn list_page(&self, filter: &ListFilter) -> Result<Page> {
        // Processing events are few (no more than the leases held): read
        // them through the lease index, not by walking `seq` past every
        // finished event. The status is written into the SQL (it is one of
        // four words) so the planner can match the partial index, and the
        // `+` keeps it from choosing the `seq` order instead.
        let seq = if filter.status == Some(Status::Processing) {
            "+seq"
        } else {
            "seq"
        };
        let mut clauses = vec![format!("{seq} BETWEEN ?1 AND ?2")];
        if let Some(s) = filter.status {
            clauses.push(format!("status = '{}'", s.as_str()));
        }
        let mut args: Vec<SqlValue> = Vec::new();
        for c in filter.conditions() {
            let n = args.len() + 3;
            let (clause, value) = match c {
                Condition::Equals(column, v) => (format!("{column} = ?{n}"), v),
                Condition::Contains(column, t) => (
                    format!("instr({column}, ?{n}) > 0"),
                    ConditionValue::Text(t),
                ),
            };
            clauses.push(clause);
            args.push(match value {
                ConditionValue::Text(t) => SqlValue::Text(t.to_owned()),
                ConditionValue::Uuid(u) => SqlValue::Text(u.to_string()),
            });
        }
        let order = if filter.newest_first { "DESC" } else { "ASC" };
        let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
        let sql = format!(
            "SELECT {} FROM outbox_events WHERE {} ORDER BY {seq} {order} LIMIT {limit}",
            self.inner.columns,
            clauses.join(" AND ")
        );
        self.read(|conn| {
            let bounds: (Option<i64>, Option<i64>) = conn
                .prepare_cached(
                    "SELECT (SELECT min(seq) FROM outbox_events), (SELECT max(seq) FROM outbox_events)",
                )?
                .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            let (Some(min), Some(max)) = bounds else {
                return Ok(Page::default());
            };
            let Some(w) = filter.window(min, max) else {
                return Ok(Page::default());
            };
            let mut stmt = conn.prepare(&sql)?;
            let params = [SqlValue::Integer(w.lo), SqlValue::Integer(w.hi)]
                .into_iter()
                .chain(args);
            let rows = stmt.query_map(rusqlite::params_from_iter(params), row_to_event)?;
            let events = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(filter.page(events, w, min, max))
        })
    }

    fn throughput(&self, since: DateTime<Utc>, bucket: Duration) -> Result<Vec<Throughput>> {
        let (since, enqueued, bucket) = throughput_bounds(since, bucket);
        self.read(|conn| {
            // The retention index's own condition, word for word, so the
            // planner may use it.
            let mut stmt = conn.prepare_cached(
                "SELECT completed_at / ?3 * ?3 AS span, sum(status = 'done'), sum(status = 'failed')
                 FROM outbox_events
                 WHERE status IN ('done', 'failed') AND created_at >= ?2 AND completed_at >= ?1
                 GROUP BY span ORDER BY span",
            )?;
            let rows = stmt.query_map([since, enqueued, bucket], |r| {
                Ok(Throughput::at(
                    r.get(0)?,
                    count_u64(r.get(1)?),
                    count_u64(r.get(2)?),
                ))
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn requeue(&self, which: Requeue) -> Result<u64> {
        let now = clock::to_millis(self.now());
        const SET: &str = "UPDATE outbox_events SET status = 'pending', attempts = 0,
                             next_attempt_at = ?1, completed_at = NULL";
        let n = match &which {
            Requeue::One(id) => {
                let n = self.write(|tx| {
                    Ok(tx
                        .prepare_cached(&format!("{SET} WHERE id = ?2 AND status = 'failed'"))?
                        .execute(params![now, id.to_string()])?)
                })?;
                if n == 0 {
                    return Err(unchanged(self, *id, |s| format!("{s}, not failed")));
                }
                n
            }
            Requeue::Type(t) => self.write(|tx| {
                Ok(tx
                    .prepare_cached(&format!(
                        "{SET} WHERE status = 'failed' AND event_type = ?2"
                    ))?
                    .execute(params![now, t])?)
            })?,
            Requeue::All => self.write(|tx| {
                Ok(tx
                    .prepare_cached(&format!("{SET} WHERE status = 'failed'"))?
                    .execute(params![now])?)
            })?,
        };
        if n > 0 {
            self.inner.notifier.notify();
        }
        Ok(n as u64)
    }
    fn purge(&self, older_than: DateTime<Utc>) -> Result<u64> {
        let n = self.write(|tx| {
            Ok(tx
                .prepare_cached(
                    "DELETE FROM outbox_events WHERE status IN ('done', 'failed') AND created_at < ?1",
                )?
                .execute([clock::to_millis(older_than)])?)
        })?;
        Ok(n as u64)
    }

    fn erase(&self, subject: Subject) -> Result<u64> {
        let (sql, id) = match subject {
            Subject::Org(org) => ("DELETE FROM outbox_events WHERE org_id = ?1", org),
            Subject::User(user) => ("DELETE FROM outbox_events WHERE user_id = ?1", user),
        };
        let n = self.write(|tx| Ok(tx.prepare_cached(sql)?.execute([id.to_string()])?))?;
        Ok(n as u64)
    }
}

/// The destinations dispatchers hold back, as written down (none in a file
/// older than version 3, opened read-only). Another
/// program may have written rows too: a row that does not read as one
/// (an unknown hold, a time that is not a number) is left out, and text
/// that is not UTF-8 is shown with replacement characters.
fn read_destinations(conn: &Connection) -> rusqlite::Result<Vec<DestinationState>> {
    // An older file opened read-only has no such table yet.
    let exists: bool = conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM sqlite_schema
                            WHERE type = 'table' AND name = 'outbox_destinations')",
        )?
        .query_row([], |r| r.get(0))?;
    if !exists {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare_cached(
        "SELECT name, hold, since, next_probe_at, last_error, updated_at
         FROM outbox_destinations ORDER BY name",
    )?;
    let text = |r: &rusqlite::Row<'_>, i| -> rusqlite::Result<Option<String>> {
        Ok(match r.get_ref(i)? {
            ValueRef::Text(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        })
    };
    let time =
        |r: &rusqlite::Row<'_>, i| -> rusqlite::Result<Option<chrono::DateTime<chrono::Utc>>> {
            Ok(match r.get_ref(i)? {
                ValueRef::Integer(ms) => Some(clock::from_millis(ms)),
                _ => None,
            })
        };
    let rows = stmt.query_map([], |r| {
        let hold = match text(r, 1)?.as_deref() {
            Some("unreachable") => Some(Hold::Unreachable),
            Some("paused") => Some(Hold::Paused),
            _ => None,
        };
        Ok(match (text(r, 0)?, hold, time(r, 2)?, time(r, 5)?) {
            (Some(name), Some(hold), Some(since), Some(updated_at)) => Some(DestinationState {
                name,
                hold,
                since,
                next_probe_at: time(r, 3)?,
                last_error: text(r, 4)?,
                updated_at,
            }),
            _ => None,
        })
    })?;
    let mut out = Vec::new();
    for row in rows {
        out.extend(row?);
    }
    Ok(out)
}

impl SqliteStore {
    /// The pending events of each raised priority, highest first; none in
    /// a file older than version 6 read as it is (every event there is of
    /// priority 0).
    fn priorities_in(&self, conn: &Connection, now: i64) -> Result<Vec<PriorityStats>> {
        if !self.is_current() {
            return Ok(Vec::new());
        }
        let mut stmt = conn.prepare_cached(
            "SELECT priority, count(*), sum(next_attempt_at <= ?1) FROM outbox_events
             WHERE status = 'pending' AND priority > 0
             GROUP BY priority ORDER BY priority DESC",
        )?;
        let rows = stmt.query_map([now], |r| {
            Ok(PriorityStats {
                priority: u8::try_from(r.get::<_, i64>(0)?).unwrap_or(u8::MAX),
                pending: count_u64(r.get(1)?),
                due: count_u64(r.get(2)?),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}
