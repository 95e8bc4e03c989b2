//! Limits kept in the file: counted and taken in the claim's own write
//! transaction, which SQLite runs one at a time, so a limit holds across
//! every process on the file.

use std::time::Duration;

use rusqlite::{params, OptionalExtension, Transaction};

use super::sql::TYPE_OK;
use super::{skip, types_json, SqliteStore};
use crate::clock;
use crate::error::Result;
use crate::store::limits::{
    claim_within, Bucket, LimitKind, LimitScope, LimitState, Limited, SharedLimit,
};
use crate::store::sealed::TypeFilter;

impl SqliteStore {
    pub(super) fn claim_limited_events(
        &self,
        limit: usize,
        lease: Duration,
        filter: &TypeFilter<'_>,
        shared: &[SharedLimit<'_>],
    ) -> Result<Limited> {
        self.write_relaxed(|tx| {
            // In whole milliseconds, as the bucket's time is stored: a
            // refill never counts the same fraction of a millisecond twice.
            let now_ms = clock::to_millis(self.now());
            let now = clock::from_millis(now_ms);
            let mut conn = tx;
            claim_within(
                &mut conn,
                (shared, now, limit),
                |tx| live_leases(tx, filter, now_ms),
                |tx, l| read_bucket(tx, l),
                |tx, want| self.claim_in(tx, want, lease, filter),
                |tx, l, b| write_bucket(tx, l, b, now_ms),
            )
        })
    }

    pub(super) fn write_limit(&self, state: &LimitState) -> Result<()> {
        let types = state
            .event_types
            .as_ref()
            .and_then(|t| serde_json::to_string(t).ok());
        self.write_relaxed(|tx| {
            tx.prepare_cached(
                "INSERT INTO outbox_limits (scope, name, kind, max, per_ms, shared, event_types,
                   limited_since, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (scope, name, kind) DO UPDATE SET max = excluded.max,
                   per_ms = excluded.per_ms, shared = excluded.shared,
                   event_types = excluded.event_types, limited_since = excluded.limited_since,
                   updated_at = excluded.updated_at",
            )?
            .execute(params![
                state.scope.as_str(),
                state.name,
                state.kind.as_str(),
                state.kind.max(),
                state.kind.per().map(|p| p.as_millis() as i64),
                state.shared,
                types,
                state.limited_since.map(clock::to_millis),
                clock::to_millis(state.updated_at),
            ])?;
            Ok(())
        })
    }

    /// The limits written down, each concurrency limit with its live
    /// leases counted now; none in a file older than version 6 read as it
    /// is. Rows another program damaged are left out.
    pub(super) fn limits_in(
        &self,
        conn: &rusqlite::Connection,
        now_ms: i64,
    ) -> Result<Vec<LimitState>> {
        if !self.is_current() {
            return Ok(Vec::new());
        }
        let mut stmt = conn.prepare_cached(
            "SELECT scope, name, kind, max, per_ms, shared, event_types, limited_since,
                    updated_at
             FROM outbox_limits ORDER BY scope, name, kind",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0).ok(),
                r.get::<_, String>(1).ok(),
                r.get::<_, String>(2).ok(),
                r.get::<_, i64>(3).ok(),
                r.get::<_, Option<i64>>(4).ok().flatten(),
                r.get::<_, bool>(5).unwrap_or(false),
                r.get::<_, Option<String>>(6).ok().flatten(),
                r.get::<_, Option<i64>>(7).ok().flatten(),
                r.get::<_, i64>(8).unwrap_or(0),
            ))
        })?;
        let mut limits = Vec::new();
        for row in rows {
            let (scope, name, kind, max, per_ms, shared, types, since, updated) = row?;
            let (Some(scope), Some(name), Some(kind), Some(max)) = (
                scope.as_deref().and_then(LimitScope::parse),
                name,
                kind,
                max,
            ) else {
                continue;
            };
            let Some(kind) = LimitKind::from_parts(&kind, max, per_ms) else {
                continue;
            };
            let event_types: Option<Vec<String>> =
                types.and_then(|t| serde_json::from_str(&t).ok());
            let mut state = LimitState {
                scope,
                name,
                kind,
                shared,
                event_types,
                limited_since: since.map(clock::from_millis),
                in_flight: None,
                updated_at: clock::from_millis(updated),
            };
            if let LimitKind::Concurrency(_) = kind {
                let types = covered_types(&state);
                let filter = TypeFilter::only(Some(&types));
                state.in_flight = Some(live_leases(conn, &filter, now_ms)? as u64);
            }
            limits.push(state);
        }
        Ok(limits)
    }
}

/// The types a limit's row names: its list, or the type (or destination)
/// it is named after.
fn covered_types(state: &LimitState) -> Vec<String> {
    state
        .event_types
        .clone()
        .unwrap_or_else(|| vec![state.name.clone()])
}

/// Events of the types `filter` allows under a live lease at `now`.
fn live_leases(conn: &rusqlite::Connection, filter: &TypeFilter<'_>, now: i64) -> Result<usize> {
    let n: i64 = conn
        .prepare_cached(&format!(
            "SELECT count(*) FROM outbox_events AS e
             WHERE e.status = 'processing' AND e.locked_until > :now AND {TYPE_OK}"
        ))?
        .query_row(
            rusqlite::named_params! {
                ":now": now,
                ":types": types_json(filter.only),
                ":skip": types_json(skip(filter)),
            },
            |r| r.get(0),
        )?;
    Ok(usize::try_from(n).unwrap_or(0))
}

fn read_bucket(tx: &Transaction<'_>, shared: &SharedLimit<'_>) -> Result<Option<Bucket>> {
    let row: Option<(Option<f64>, Option<i64>)> = tx
        .prepare_cached(
            "SELECT tokens, refilled_at FROM outbox_limits
             WHERE scope = ?1 AND name = ?2 AND kind = 'rate'",
        )?
        .query_row(params![shared.scope.as_str(), shared.name], |r| {
            Ok((r.get(0).ok().flatten(), r.get(1).ok().flatten()))
        })
        .optional()?;
    Ok(match row {
        Some((Some(tokens), Some(at))) => Some(Bucket {
            tokens,
            at: clock::from_millis(at),
        }),
        _ => None,
    })
}

fn write_bucket(
    tx: &Transaction<'_>,
    shared: &SharedLimit<'_>,
    bucket: Bucket,
    now: i64,
) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO outbox_limits (scope, name, kind, max, per_ms, shared, tokens, refilled_at,
           updated_at)
         VALUES (?1, ?2, 'rate', ?3, ?4, 1, ?5, ?6, ?7)
         ON CONFLICT (scope, name, kind) DO UPDATE SET max = excluded.max,
           per_ms = excluded.per_ms, shared = 1, tokens = excluded.tokens,
           refilled_at = excluded.refilled_at",
    )?
    .execute(params![
        shared.scope.as_str(),
        shared.name,
        shared.kind.max(),
        shared.kind.per().map(|p| p.as_millis() as i64),
        bucket.tokens,
        clock::to_millis(bucket.at),
        now,
    ])?;
    Ok(())
}
